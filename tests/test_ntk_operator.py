"""The shared operator: K·V equals the brute-force kernel times V, every output mode and
implementation, on 1 and on 4 forced CPU devices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntklab.models import build_model, inference_apply_fn, init_variables
from ntklab.ntk import KernelOperator

SHAPE = (4, 4, 1)
NUM_OUTPUTS = 3


def model(name: str = "mlp"):
    kwargs = {"mlp": {"widths": (6, 5)}, "lenet": {}}[name]
    shape = SHAPE if name == "mlp" else (8, 8, 1)
    net = build_model(name, num_outputs=NUM_OUTPUTS, **kwargs)
    variables = init_variables(net, jax.random.PRNGKey(0), shape)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables["params"])
    return inference_apply_fn(net, variables), params, shape


def dense_operators(apply_fn, params, x) -> dict[str, np.ndarray]:
    """The kernel as a matrix in each output mode's vector layout (row i·C + c)."""
    tree = jax.jacrev(lambda p: apply_fn(p, x))(params)
    jac = jnp.concatenate([leaf.reshape(*leaf.shape[:2], -1) for leaf in jax.tree.leaves(tree)], 2)
    full = np.asarray(jnp.einsum("icp,jdp->ijcd", jac, jac))
    n, c = full.shape[0], full.shape[2]
    diagonal = np.zeros((n * c, n * c))
    for k in range(c):
        diagonal[k::c, k::c] = full[:, :, k, k]
    return {
        "trace": np.einsum("ijcc->ij", full),
        "full": full.transpose(0, 2, 1, 3).reshape(n * c, n * c),
        "diagonal": diagonal,
    }


@pytest.mark.parametrize("implementation", ["jacobian", "structured", "ntk_vector_products"])
@pytest.mark.parametrize("output", ["trace", "full", "diagonal"])
def test_products_equal_the_dense_kernel(output, implementation, float64):
    apply_fn, params, shape = model()
    x = np.random.default_rng(0).standard_normal((7, *shape))
    expected = dense_operators(apply_fn, params, x)[output]
    operator = KernelOperator(
        apply_fn, params, x, output=output, implementation=implementation, batch_size=3, width=2
    )
    assert operator.implementation == implementation
    vectors = np.random.default_rng(1).standard_normal((operator.shape[0], 3))  # 2 passes
    product = operator.matmat(vectors)
    np.testing.assert_allclose(product, expected @ vectors, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(operator.matmat(vectors[:, 0]), expected @ vectors[:, 0], rtol=1e-10)
    assert operator.num_products == 4 and operator.num_passes == 6 and operator.seconds > 0


def test_width_is_capped_by_the_budget(float64):
    apply_fn, params, shape = model()
    x = np.random.default_rng(6).standard_normal((5, *shape))
    expected = dense_operators(apply_fn, params, x)["trace"]
    num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    per_vector = NUM_OUTPUTS * num_params * 8  # W [C·b, P] in float64
    operator = KernelOperator(
        apply_fn, params, x, implementation="jacobian", width=10, memory_bytes=8 * per_vector
    )
    assert operator.width == 4  # half the budget holds 4 vectors' accumulators
    vectors = np.random.default_rng(7).standard_normal((5, 5))
    np.testing.assert_allclose(operator.matmat(vectors), expected @ vectors, rtol=1e-10)
    assert operator.num_passes == 4  # 4 vectors, then 1 padded to 4


@pytest.mark.slow
def test_structured_operator_on_a_cnn_under_a_tiny_budget(float64):
    apply_fn, params, shape = model("lenet")
    x = np.random.default_rng(2).standard_normal((5, *shape))
    expected = dense_operators(apply_fn, params, x)["trace"]
    operator = KernelOperator(
        apply_fn, params, x, implementation="structured", batch_size=2, memory_bytes=200_000
    )
    assert operator.implementation == "structured"
    assert not operator.cached  # features recomputed in every pass
    assert len(operator._plan.param_groups) > 1  # and the unfactored leaves chunked
    vectors = np.random.default_rng(3).standard_normal((5, 4))
    np.testing.assert_allclose(operator.matmat(vectors), expected @ vectors, rtol=1e-10)


def test_bad_arguments_are_rejected():
    apply_fn, params, shape = model()
    x = np.zeros((3, *shape), np.float32)
    with pytest.raises(ValueError, match="unknown output 'sum'; valid choices: trace"):
        KernelOperator(apply_fn, params, x, output="sum")
    with pytest.raises(ValueError, match="unknown implementation 'magic'"):
        KernelOperator(apply_fn, params, x, implementation="magic")
    operator = KernelOperator(apply_fn, params, x)
    with pytest.raises(ValueError, match=r"vectors must be \[3, b\]"):
        operator.matmat(np.zeros((4, 2)))


FOUR_DEVICE_PREAMBLE = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_prng_impl", "rbg")
jax.config.update("jax_numpy_rank_promotion", "raise")
sys.path.insert(0, {tests!r})
assert len(jax.devices()) == 4, jax.devices()
"""


def run_on_four_devices(body: str, tmp_path: Path) -> None:
    """Runs ``body`` in a fresh Python with 4 forced CPU devices and float64 (the device count is
    fixed when JAX starts); ``body`` can import the test modules and must print SHARDED-OK."""
    script = tmp_path / "four_devices.py"
    script.write_text(FOUR_DEVICE_PREAMBLE.format(tests=str(Path(__file__).parent)) + body)
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and "SHARDED-OK" in result.stdout, result.stderr[-3000:]


SHARDED_SCRIPT = """
from test_ntk_operator import model, dense_operators
from ntklab.ntk import KernelOperator
apply_fn, params, shape = model()
x = np.random.default_rng(4).standard_normal((9, *shape))
dense = dense_operators(apply_fn, params, x)
for output in ("trace", "full"):
    v = np.random.default_rng(5).standard_normal((dense[output].shape[0], 3))
    for implementation in ("jacobian", "structured", "ntk_vector_products"):
        four = KernelOperator(apply_fn, params, x, output=output, implementation=implementation,
                              batch_size=4).matmat(v)
        one = KernelOperator(apply_fn, params, x, output=output, implementation=implementation,
                             batch_size=4, devices=jax.devices()[:1]).matmat(v)
        np.testing.assert_allclose(four, dense[output] @ v, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(four, one, rtol=1e-12, atol=1e-12)
print("SHARDED-OK")
"""


def test_four_devices_give_the_dense_product(tmp_path):
    run_on_four_devices(SHARDED_SCRIPT, tmp_path)
