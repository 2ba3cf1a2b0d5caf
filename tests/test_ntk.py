"""empirical_ntk against the brute-force jax.jacrev contraction."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntklab.models import build_model, inference_apply_fn, init_variables
from ntklab.ntk import empirical_ntk

MODELS = {
    "mlp": ({"widths": (16, 8)}, (6, 6, 2)),
    "lenet": ({}, (8, 8, 3)),
    "resnet18": ({"width": 16}, (8, 8, 3)),  # the ResNet-18 layout at a quarter of its width
}


def brute_force_ntk(apply_fn, params, x1, x2) -> np.ndarray:
    """K = J1 J2ᵀ from full jax.jacrev Jacobians of the batched outputs [N, P]."""

    @jax.jit
    def jacobian(x):
        tree = jax.jacrev(lambda p: apply_fn(p, x)[:, 0])(params)
        return jnp.concatenate([leaf.reshape(len(x), -1) for leaf in jax.tree.leaves(tree)], 1)

    return np.asarray(jacobian(x1) @ jacobian(x2).T)


def network(name: str, *, seed: int = 0, activation: str = "gelu"):
    kwargs, shape = MODELS[name]
    model = build_model(name, activation=activation, **kwargs)
    variables = init_variables(model, jax.random.PRNGKey(seed), shape)
    if "batch_stats" in variables:
        # Non-trivial inference statistics, so the test sees BatchNorm's effect on the kernel.
        stats_key = jax.random.PRNGKey(seed + 1)
        variables["batch_stats"] = jax.tree.map(
            lambda s: s + 0.1 * jnp.abs(jax.random.normal(stats_key, s.shape)),
            variables["batch_stats"],
        )
    return inference_apply_fn(model, variables), variables["params"], shape


def as_float64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


@pytest.mark.parametrize("implementation", ["jacobian", "structured"])
@pytest.mark.parametrize("name", ["mlp", "lenet", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_symmetric_kernel_equals_brute_force(name, implementation, float64):
    apply_fn, params, shape = network(name)
    params = as_float64(params)
    x = np.random.default_rng(0).standard_normal((7, *shape))
    kernel = empirical_ntk(apply_fn, params, x, batch_size=3, implementation=implementation)
    expected = brute_force_ntk(apply_fn, params, x, x)
    assert kernel.shape == (7, 7)
    assert kernel.dtype == np.float64
    np.testing.assert_allclose(kernel, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())
    np.testing.assert_array_equal(kernel, kernel.T)


@pytest.mark.parametrize("name", ["mlp", "lenet"])
def test_cross_kernel_equals_brute_force(name, float64):
    apply_fn, params, shape = network(name, seed=3)
    params = as_float64(params)
    rng = np.random.default_rng(1)
    x1, x2 = rng.standard_normal((5, *shape)), rng.standard_normal((9, *shape))
    kernel = empirical_ntk(apply_fn, params, x1, x2, batch_size=4)
    expected = brute_force_ntk(apply_fn, params, x1, x2)
    assert kernel.shape == (5, 9)
    np.testing.assert_allclose(kernel, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


def test_float32_kernel_close_to_float64():
    apply_fn, params, shape = network("lenet")
    x = np.random.default_rng(2).standard_normal((6, *shape)).astype(np.float32)
    kernel = empirical_ntk(apply_fn, params, x, batch_size=4)
    assert kernel.dtype == np.float32
    expected = brute_force_ntk(apply_fn, params, x, x)
    np.testing.assert_allclose(kernel, expected, rtol=2e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("x2_is_none", [True, False])
def test_panels_under_a_small_memory_budget_give_the_same_kernel(x2_is_none, float64):
    apply_fn, params, shape = network("mlp")
    params = as_float64(params)
    x = np.random.default_rng(4).standard_normal((11, *shape))
    x2 = None if x2_is_none else x[::-1]
    one_panel = empirical_ntk(apply_fn, params, x, x2, batch_size=2)
    num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    # Budget for two blocks of 2 examples: one row block per panel plus the column block.
    tiny = empirical_ntk(apply_fn, params, x, x2, batch_size=2, memory_bytes=2 * 2 * num_params * 8)
    np.testing.assert_allclose(tiny, one_panel, rtol=1e-12, atol=0)
    np.testing.assert_allclose(
        one_panel, brute_force_ntk(apply_fn, params, x, x if x2 is None else x2), rtol=1e-10
    )


def test_batch_larger_than_inputs():
    apply_fn, params, shape = network("mlp")
    x = np.random.default_rng(5).standard_normal((3, *shape)).astype(np.float32)
    np.testing.assert_allclose(
        empirical_ntk(apply_fn, params, x, batch_size=1000),
        empirical_ntk(apply_fn, params, x, batch_size=1),
        rtol=1e-5,
    )


def test_non_finite_block_is_named():
    apply_fn, params, shape = network("mlp", activation="relu")
    x = np.random.default_rng(6).standard_normal((6, *shape)).astype(np.float32)
    x[4, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"rows 0:3, cols 3:6 has non-finite"):
        empirical_ntk(apply_fn, params, x, batch_size=3)


def test_bad_arguments_are_rejected():
    apply_fn, params, shape = network("mlp")
    x = np.zeros((2, *shape), np.float32)
    with pytest.raises(
        ValueError, match=r"unknown implementation 'magic'; valid choices: auto, jacobian"
    ):
        empirical_ntk(apply_fn, params, x, implementation="magic")
    with pytest.raises(ValueError, match=r"unknown precision 'low'; valid choices: float32, tf32"):
        empirical_ntk(apply_fn, params, x, precision="low")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        empirical_ntk(apply_fn, params, x, batch_size=0)
    with pytest.raises(ValueError, match="x2 examples"):
        empirical_ntk(apply_fn, params, x, np.zeros((2, 3, 3, 2), np.float32))
    for name, value in [("output", "sum"), ("projection", "sparse"), ("storage_dtype", "int8")]:
        with pytest.raises(ValueError, match=f"unknown {name} '{value}'; valid choices: "):
            empirical_ntk(apply_fn, params, x, **{name: value})


# ---------------------------------------------------------------------------------------------
# Kernel variants, implementations, devices, out-of-core resume, chunking, projection, precision


def brute_force_full(apply_fn, params, x1, x2) -> np.ndarray:
    """Θ[i, j, c, d] from full jax.jacrev Jacobians [N, C, P]."""

    @jax.jit
    def jacobian(x):
        tree = jax.jacrev(lambda p: apply_fn(p, x))(params)
        leaves = jax.tree.leaves(tree)
        return jnp.concatenate([leaf.reshape(*leaf.shape[:2], -1) for leaf in leaves], 2)

    return np.asarray(jnp.einsum("icp,jdp->ijcd", jacobian(x1), jacobian(x2)))


def multi_output_network(name: str, num_outputs: int):
    kwargs, shape = MODELS[name]
    if name == "mlp":
        kwargs = {"widths": (12,)}
    model = build_model(name, activation="gelu", num_outputs=num_outputs, **kwargs)
    variables = init_variables(model, jax.random.PRNGKey(7), shape)
    return inference_apply_fn(model, variables), as_float64(variables["params"]), shape


REDUCE = {
    "full": lambda k: k,
    "trace": lambda k: np.einsum("ijcc->ij", k),
    "diagonal": lambda k: np.einsum("ijcc->ijc", k),
}


@pytest.mark.parametrize("implementation", ["jacobian", "structured", "ntk_vector_products"])
@pytest.mark.parametrize("output", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_every_output_mode_and_implementation_equals_brute_force(
    implementation, output, symmetric, float64
):
    apply_fn, params, shape = multi_output_network("mlp", 3)
    rng = np.random.default_rng(8)
    x1 = rng.standard_normal((5, *shape))
    x2 = None if symmetric else rng.standard_normal((4, *shape))
    kernel = empirical_ntk(
        apply_fn, params, x1, x2, output=output, implementation=implementation, batch_size=2
    )
    expected = REDUCE[output](brute_force_full(apply_fn, params, x1, x1 if symmetric else x2))
    assert kernel.shape == expected.shape
    np.testing.assert_allclose(kernel, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


def test_products_take_columns_a_few_at_a_time(float64):
    """Blocks wider than ``PRODUCTS_COLUMNS`` (and not a multiple of it) are mapped in pieces."""
    from ntklab.ntk._features import PRODUCTS_COLUMNS

    apply_fn, params, shape = multi_output_network("mlp", 2)
    rng = np.random.default_rng(10)
    x1 = rng.standard_normal((PRODUCTS_COLUMNS + 5, *shape))
    x2 = rng.standard_normal((PRODUCTS_COLUMNS + 3, *shape))
    products = empirical_ntk(apply_fn, params, x1, x2, output="full",
                             implementation="ntk_vector_products", batch_size=len(x1))  # fmt: skip
    expected = brute_force_full(apply_fn, params, x1, x2)
    np.testing.assert_allclose(products, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


@pytest.mark.slow
def test_products_equal_contraction_on_a_cnn(float64):
    apply_fn, params, shape = multi_output_network("lenet", 2)
    x = np.random.default_rng(9).standard_normal((5, *shape))
    contraction = empirical_ntk(apply_fn, params, x, output="full", implementation="jacobian")
    products = empirical_ntk(
        apply_fn, params, x, output="full", implementation="ntk_vector_products", batch_size=3
    )
    np.testing.assert_allclose(products, contraction, rtol=1e-10, atol=1e-12)


def test_structured_factors_exactly_the_dense_layers():
    from ntklab.ntk._structure import find_dense_layers

    apply_fn, params, shape = network("lenet")
    leaves = jax.tree.leaves(params)
    layers, _ = find_dense_layers(apply_fn, jax.tree.structure(params), leaves, shape)
    # LeNet's three Dense layers (120, 84, 1 units), each with its kernel and bias leaf.
    assert [(layer.d_in, layer.d_out) for layer in layers] == [(64, 120), (120, 84), (84, 1)]
    for layer in layers:
        assert leaves[layer.kernel].shape == (layer.d_in, layer.d_out)
        assert leaves[layer.bias].shape == (layer.d_in, layer.d_out)[1:]


def test_structured_with_a_shared_dense_layer_is_not_factored(float64):
    import flax.linen as nn

    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(4)
            h = x.reshape(x.shape[0], -1)[:, :4]
            return nn.Dense(1)(jnp.tanh(dense(jnp.tanh(dense(h)))))

    model = Shared()
    x = np.random.default_rng(3).standard_normal((5, 2, 2, 1))
    params = as_float64(jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"])

    def apply_fn(p, inputs):
        return model.apply({"params": p}, inputs)

    kernel = empirical_ntk(apply_fn, params, x, implementation="structured")
    expected = brute_force_ntk(apply_fn, params, x, x)
    np.testing.assert_allclose(kernel, expected, rtol=1e-10, atol=1e-12)


def test_auto_follows_the_cost_model():
    from ntklab.ntk import _problem, _schedule

    apply_fn, params, shape = network("lenet")
    x = np.zeros((4, *shape), np.float32)
    options = {
        "symmetric": True,
        "output": "trace",
        "precision": "float32",
        "projection": "rademacher",
        "projection_seed": 0,
        "devices": tuple(jax.devices()),
    }
    problem = _problem.make_problem(apply_fn, params, x, x, projection_dim=None, **options)
    layout = {"batch_size": 4, "memory_bytes": None, "param_chunk_size": None}
    # A forward pass costs at least 2 FLOPs per parameter, so for one output contraction beats
    # NTK-vector products; LeNet's Dense layers hold most parameters, so factoring them wins.
    assert problem.forward_flops() >= 2 * problem.num_params
    assert _schedule.choose_plan(problem, "auto", **layout).implementation == "structured"
    projected = _problem.make_problem(apply_fn, params, x, x, projection_dim=8, **options)
    assert _schedule.choose_plan(projected, "auto", **layout).implementation == "jacobian"


@pytest.mark.parametrize("x2_is_none", [True, False])
def test_parameter_chunks_give_the_unchunked_kernel(x2_is_none, float64):
    apply_fn, params, shape = network("lenet")
    params = as_float64(params)
    x = np.random.default_rng(10).standard_normal((7, *shape))
    x2 = None if x2_is_none else x[:5]
    whole = empirical_ntk(apply_fn, params, x, x2, batch_size=3)
    chunked = empirical_ntk(apply_fn, params, x, x2, batch_size=3, param_chunk_size=500)
    np.testing.assert_allclose(chunked, whole, rtol=1e-12, atol=1e-12 * np.abs(whole).max())


@pytest.mark.parametrize("storage_dtype", ["float16", "float32", "float64"])
def test_storage_dtypes(storage_dtype):
    apply_fn, params, shape = network("mlp")
    x = np.random.default_rng(11).standard_normal((6, *shape)).astype(np.float32)
    reference = empirical_ntk(apply_fn, params, x)
    stored = empirical_ntk(apply_fn, params, x, storage_dtype=storage_dtype)
    assert stored.dtype == np.dtype(storage_dtype)
    rtol = {"float16": 2e-3, "float32": 0, "float64": 0}[storage_dtype]
    np.testing.assert_allclose(stored, reference, rtol=rtol, atol=0)


class Interrupted(Exception):
    pass


def interrupt_after(count: int):
    def hook(units_done: int) -> None:
        if units_done == count:
            raise Interrupted

    return hook


@pytest.mark.parametrize(
    ("x2_is_none", "memory_blocks", "param_chunk_size"),
    [(True, None, None), (True, 3, None), (False, 3, None), (True, None, 700)],
)
def test_resume_after_interruption_gives_the_identical_kernel(
    tmp_path, x2_is_none, memory_blocks, param_chunk_size
):
    apply_fn, params, shape = network("lenet")
    x = np.random.default_rng(12).standard_normal((9, *shape)).astype(np.float32)
    x2 = None if x2_is_none else x[:7]
    num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    options = {
        "batch_size": 2,
        "memory_bytes": None if memory_blocks is None else memory_blocks * 2 * num_params * 4,
        "param_chunk_size": param_chunk_size,
    }
    reference = empirical_ntk(apply_fn, params, x, x2, **options)
    out = tmp_path / "kernel.npy"
    for stop_at in (1, 3):  # interrupted twice, at different places
        with pytest.raises(Interrupted):
            empirical_ntk(apply_fn, params, x, x2, out=out, _after_unit=interrupt_after(stop_at),
                          **options)  # fmt: skip
        record = json.loads((tmp_path / "kernel.npy.progress.json").read_text())
        assert record["units_done"] == stop_at and not record["complete"]
    resumed = empirical_ntk(apply_fn, params, x, x2, out=out, **options)
    assert isinstance(resumed, np.memmap)
    np.testing.assert_array_equal(np.asarray(resumed), reference)
    assert json.loads((tmp_path / "kernel.npy.progress.json").read_text())["complete"]


def test_resume_record_from_other_arguments_is_refused(tmp_path):
    apply_fn, params, shape = network("mlp")
    x = np.random.default_rng(13).standard_normal((6, *shape)).astype(np.float32)
    out = tmp_path / "kernel.npy"
    with pytest.raises(Interrupted):
        empirical_ntk(apply_fn, params, x, out=out, batch_size=2, _after_unit=interrupt_after(1))
    with pytest.raises(ValueError, match=r"different arguments \(changed: inputs_sha256\)"):
        empirical_ntk(apply_fn, params, x + 1, out=out, batch_size=2)


KILL_SCRIPT = """
import os, signal, sys
import jax, numpy as np
jax.config.update("jax_default_prng_impl", "rbg")  # as in conftest.py: the same initial weights
sys.path.insert(0, {tests!r})
from test_ntk import network
from ntklab.ntk import empirical_ntk
apply_fn, params, shape = network("lenet")
x = np.random.default_rng(14).standard_normal((10, *shape)).astype(np.float32)
kill_at = int(sys.argv[1])
if len(sys.argv) > 4:  # first an uninterrupted out-of-core run of its own, in this process
    fresh = empirical_ntk(apply_fn, params, x, out=sys.argv[4], batch_size=2)
    np.save(sys.argv[5], np.asarray(fresh))
def hook(done):
    if done == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
kernel = empirical_ntk(apply_fn, params, x, out=sys.argv[2], batch_size=2, _after_unit=hook)
np.save(sys.argv[3], np.asarray(kernel))
"""


def test_resume_after_sigkill(tmp_path):
    """Killed (SIGKILL) after 4 units, resumed by another process. The killed process first made
    an uninterrupted out-of-core kernel on its own file, the reference for the resumed one (it
    used to take a third process; any other process than the resuming one is as good)."""
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    out, final = tmp_path / "kernel.npy", tmp_path / "final.npy"
    fresh_out, fresh_final = tmp_path / "fresh.npy", tmp_path / "fresh_final.npy"
    killed = subprocess.run(
        [sys.executable, script, "4", out, final, fresh_out, fresh_final], capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL and not final.exists(), killed.stderr[-2000:]
    assert fresh_final.exists() and out.exists()
    resumed = subprocess.run([sys.executable, script, "-1", out, final], capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    # Bit for bit what an uninterrupted out-of-core run gives, and to float32 rounding the
    # in-memory kernel (another process may pick other XLA kernels, so not bit for bit).
    np.testing.assert_array_equal(np.load(final), np.load(fresh_final))
    apply_fn, params, shape = network("lenet")
    x = np.random.default_rng(14).standard_normal((10, *shape)).astype(np.float32)
    np.testing.assert_allclose(
        np.load(final), empirical_ntk(apply_fn, params, x, batch_size=2), rtol=2e-6, atol=1e-6
    )


# The sharded-kernel check on 4 devices is ntk_four_devices_give_the_single_device_kernel in
# tests/multidevice_checks.py (one shared 4-device subprocess for the whole suite, run by
# tests/test_multidevice.py).


@pytest.mark.slow
def test_projection_error_shrinks_with_dimension():
    apply_fn, params, shape = network("lenet")
    x = np.random.default_rng(16).standard_normal((12, *shape)).astype(np.float32)
    exact = empirical_ntk(apply_fn, params, x)
    top = np.linalg.eigh(exact)[1][:, -1]
    errors, overlaps = [], []
    for dim in (8, 64, 512):
        approx = np.mean(
            [empirical_ntk(apply_fn, params, x, projection_dim=dim, projection_seed=s)
             for s in range(3)],
            axis=0,
        )  # fmt: skip
        errors.append(np.linalg.norm(approx - exact) / np.linalg.norm(exact))
        overlaps.append(abs(np.linalg.eigh(approx)[1][:, -1] @ top))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.1 and overlaps[2] > 0.99


@pytest.mark.slow
@pytest.mark.parametrize("projection", ["rademacher", "gaussian"])
def test_projection_is_seeded_and_chunk_independent(projection):
    apply_fn, params, shape = network("lenet")
    x = np.random.default_rng(17).standard_normal((5, *shape)).astype(np.float32)
    options = {"projection_dim": 32, "projection": projection, "projection_seed": 3}
    first = empirical_ntk(apply_fn, params, x, **options)
    np.testing.assert_array_equal(first, empirical_ntk(apply_fn, params, x, **options))
    chunked = empirical_ntk(apply_fn, params, x, param_chunk_size=400, **options)
    np.testing.assert_allclose(chunked, first, rtol=1e-5, atol=1e-5 * np.abs(first).max())
    other = empirical_ntk(apply_fn, params, x, **{**options, "projection_seed": 4})
    assert not np.allclose(other, first)


@pytest.mark.parametrize(("precision", "low", "high"), [
    ("float32", 0, 1e-5), ("tf32", 1e-5, 3e-3), ("bfloat16", 1e-4, 3e-2),
])  # fmt: skip
def test_precision_error_against_float64(precision, low, high, float64):
    apply_fn, params, shape = network("lenet")
    x = np.random.default_rng(18).standard_normal((8, *shape)).astype(np.float32)
    exact = empirical_ntk(apply_fn, as_float64(params), x.astype(np.float64))
    kernel = empirical_ntk(apply_fn, params, x, precision=precision)
    error = np.abs(kernel - exact).max() / np.abs(exact).max()
    assert low <= error < high
