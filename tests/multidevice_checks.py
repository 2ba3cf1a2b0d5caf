"""Every multi-device check of the suite, in one Python started with 4 forced CPU devices.

    python tests/multidevice_checks.py RESULTS_JSON WORK_DIR

The device count is fixed when JAX starts, so these checks cannot run in the pytest process; one
shared subprocess (started by tests/test_multidevice.py) pays the start-up and the compilations of
the shared models once instead of once per test module. Each check runs on its own: a failing
check records its traceback and the next one still runs. RESULTS_JSON maps every check's name to
"ok", its traceback, or null while it has not run; it is rewritten after each check (a crash
leaves the finished ones).
Checks that were written for two devices use ``jax.devices()[:2]``. Not collected by pytest.
"""

from __future__ import annotations

import os
import sys

# The test session's compile flags (tests/conftest.py), 4 forced devices, and no LLVM
# optimization: these checks compare 1 and 4 devices on tiny shapes, where compiling dominates.
os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    " --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

jax.config.update("jax_default_prng_impl", "rbg")  # as in conftest.py: the same initial weights
jax.config.update("jax_numpy_rank_promotion", "raise")

CHECKS: dict[str, Callable[[Path], None]] = {}


def check(function: Callable[[Path], None]) -> Callable[[Path], None]:
    CHECKS[function.__name__] = function
    return function


def set_x64(enabled: bool) -> None:
    jax.config.update("jax_enable_x64", enabled)


@check
def train_parallel_four_devices_train_the_single_device_params(work: Path) -> None:
    """Data-parallel training: for an MLP and a tiny BatchNorm ResNet, with batch sizes that divide
    over 4 devices and batches that do not (padded and masked for the MLP, replicated for
    BatchNorm), the final params, BatchNorm statistics and per-epoch metrics of fit(devices=4)
    equal those of fit(devices=1) to float32 rounding, and the trained state is replicated."""
    from fitting import fit
    from jax.flatten_util import ravel_pytree

    from ntklab.data import load_dataset
    from ntklab.models import build_model, init_variables, train_apply_fn
    from ntklab.train import TrainConfig, eval_apply_fn

    set_x64(False)
    rtol = 2e-5
    devices = jax.devices()
    data = load_dataset("digits", num_train=24, num_test=11, seed=0)
    arrays = {
        "x_train": data.train.images,
        "y_train": (data.train.labels >= 5).astype(np.float32),
        "x_test": data.test.images,
        "y_test": (data.test.labels >= 5).astype(np.float32),
    }
    models = {
        "mlp": build_model("mlp", widths=(16,)),
        "bn": build_model("resnet18", stage_sizes=(1,), width=4),
    }
    # batch 12: every batch divides; 10: batches 10, 10, 4 (10 padded to 12, or replicated with BN)
    for name, batch_size in (("mlp", 10), ("bn", 12), ("bn", 10)):
        model = models[name]
        variables = init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))
        kwargs = dict(
            train_apply_fn=train_apply_fn(model),
            eval_apply_fn=eval_apply_fn(model),
            params=variables["params"],
            batch_stats=variables.get("batch_stats", {}),
            **arrays,
            config=TrainConfig(epochs=2, batch_size=batch_size, eval_batch_size=5, max_lr=0.1),
            seed=0,
            run_dir=None,
            progress=False,
        )
        one = fit(**kwargs, devices=devices[:1])
        four = fit(**kwargs, devices=devices)
        for tree in ("params", "batch_stats"):
            a = ravel_pytree(getattr(one, tree))[0]
            b = ravel_pytree(getattr(four, tree))[0]
            scale = float(np.abs(a).max()) if a.size else 1.0
            np.testing.assert_allclose(
                b, a, rtol=rtol, atol=rtol * scale, err_msg=f"{name} {batch_size} {tree}"
            )
            moved = ravel_pytree(variables.get(tree, {}))[0]
            assert a.size == 0 or np.abs(a - moved).max() > 1e-3, "training moved nothing"
        for key in ("train/loss", "train/acc", "test/loss", "test/acc", "train/batch_loss"):
            np.testing.assert_allclose(four.history[-1][key], one.history[-1][key], rtol=1e-5)
        leaf = jax.tree.leaves(four.params)[0]
        assert leaf.sharding.device_set == set(devices) and leaf.sharding.is_fully_replicated


@check
def ntk_four_devices_give_the_single_device_kernel(work: Path) -> None:
    """empirical_ntk sharded over 4 devices equals one device: MLP and LeNet, symmetric and cross
    kernels, and the full multi-output kernel by either implementation."""
    from test_ntk import as_float64, multi_output_network, network

    from ntklab.ntk import empirical_ntk

    set_x64(True)
    rng = np.random.default_rng(15)
    for name in ("mlp", "lenet"):
        apply_fn, params, shape = network(name)
        params = as_float64(params)
        x = rng.standard_normal((7, *shape))
        for x2 in (None, x[:5]):
            one = empirical_ntk(apply_fn, params, x, x2, batch_size=3, devices=jax.devices()[:1])
            four = empirical_ntk(apply_fn, params, x, x2, batch_size=3)
            np.testing.assert_allclose(four, one, rtol=1e-12, atol=1e-12 * np.abs(one).max())
    apply_fn, params, shape = multi_output_network("mlp", 3)
    x = rng.standard_normal((6, *shape))
    for implementation in ("jacobian", "ntk_vector_products"):
        one = empirical_ntk(apply_fn, params, x, output="full", implementation=implementation,
                            devices=jax.devices()[:1], batch_size=3)  # fmt: skip
        four = empirical_ntk(apply_fn, params, x, output="full", implementation=implementation,
                             batch_size=3)  # fmt: skip
        np.testing.assert_allclose(four, one, rtol=1e-12, atol=1e-12 * np.abs(one).max())


@check
def operator_four_devices_give_the_dense_product(work: Path) -> None:
    """KernelOperator.matmat on 4 devices equals the dense kernel times V and one device, for every
    output mode with a dense layout and every implementation."""
    from test_ntk_operator import dense_operators, model

    from ntklab.ntk import KernelOperator

    set_x64(True)
    apply_fn, params, shape = model()
    x = np.random.default_rng(4).standard_normal((9, *shape))
    dense = dense_operators(apply_fn, params, x)
    for output in ("trace", "full"):
        v = np.random.default_rng(5).standard_normal((dense[output].shape[0], 3))
        for implementation in ("jacobian", "structured", "ntk_vector_products"):
            four = KernelOperator(apply_fn, params, x, output=output,
                                  implementation=implementation, batch_size=4).matmat(v)  # fmt: skip
            one = KernelOperator(apply_fn, params, x, output=output, implementation=implementation,
                                 batch_size=4, devices=jax.devices()[:1]).matmat(v)  # fmt: skip
            np.testing.assert_allclose(four, dense[output] @ v, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(four, one, rtol=1e-12, atol=1e-12)


@check
def eigen_matrix_free_on_four_devices_equals_one_device(work: Path) -> None:
    """matrix_free_eigenpairs on 4 devices (blocks of 8 over 30 rows: 4 rows padded) equals one
    device and numpy's eigh, signs included, by either implementation."""
    from test_eigen import NETWORKS, build_model, inference_apply_fn, init_variables

    from ntklab.eigen import matrix_free_eigenpairs
    from ntklab.ntk import empirical_ntk

    set_x64(True)
    _, kwargs, shape = NETWORKS["mlp"]
    model = build_model("mlp", activation="gelu", **kwargs)
    variables = init_variables(model, jax.random.PRNGKey(0), shape)
    apply_fn = inference_apply_fn(model, variables)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    x = np.random.default_rng(6).standard_normal((30, *shape))
    kernel = empirical_ntk(apply_fn, params, x, devices=jax.devices()[:1])
    values = np.linalg.eigvalsh(kernel)
    for implementation in ("structured", "ntk_vector_products"):
        pairs = {
            count: matrix_free_eigenpairs(
                apply_fn,
                params,
                x,
                4,
                batch_size=8,
                oversampling=4,
                implementation=implementation,
                devices=jax.devices()[:count],
            )
            for count in (1, 4)
        }
        one, four = pairs[1], pairs[4]
        np.testing.assert_allclose(four.values, one.values, rtol=1e-12)
        np.testing.assert_allclose(four.values, values[::-1][:4], rtol=1e-9)
        np.testing.assert_allclose(np.abs(four.vectors.T @ one.vectors), np.eye(4), atol=1e-8)
        np.testing.assert_allclose(four.vectors, one.vectors, atol=1e-8)  # same signs
        assert four.max_residual < 1e-9 and one.max_residual < 1e-9


@check
def conv_factors_two_devices_contract_factors_with_xla(work: Path) -> None:
    """Sharded over two devices the factored convolution blocks are contracted by XLA
    (``conv_block``), every convolution of the chain factored, against brute-force jacrev."""
    from test_ntk_conv_factors import CHAINS, ConvChain, brute_force, network, reduce

    from ntklab.ntk import _conv_factors, _problem, _schedule, empirical_ntk

    set_x64(True)
    two = tuple(jax.devices()[:2])
    saved = _conv_factors.FACTOR_MAX_RATIO, _schedule.LAYERWISE_MIN_CONV_FRACTION
    _conv_factors.FACTOR_MAX_RATIO = float("inf")
    _schedule.LAYERWISE_MIN_CONV_FRACTION = 0.0
    try:
        x = jax.random.normal(jax.random.PRNGKey(1), (5, 9, 8, 3), np.float64)
        for chain in sorted(CHAINS)[:1]:
            apply_fn, params = network(ConvChain(CHAINS[chain], num_outputs=3), x)
            full = brute_force(apply_fn, params, x)
            for output in ("trace", "full"):  # "diagonal" is contracted by XLA on one device too
                problem = _problem.make_problem(
                    apply_fn, params, x, x, symmetric=True, output=output, precision="float32",
                    projection_dim=None, projection="rademacher", projection_seed=0, devices=two,
                )  # fmt: skip
                plan = _schedule.choose_plan(
                    problem, "structured", batch_size=2, memory_bytes=None, param_chunk_size=None
                )
                assert len(plan.convs) == len(CHAINS[chain]), plan.convs
                kernel = empirical_ntk(apply_fn, params, x, output=output,
                                       implementation="structured", batch_size=2,
                                       devices=two)  # fmt: skip
                expected = reduce(full, output)
                np.testing.assert_allclose(kernel, expected, rtol=1e-10,
                                           atol=1e-10 * np.abs(expected).max())  # fmt: skip
    finally:
        _conv_factors.FACTOR_MAX_RATIO, _schedule.LAYERWISE_MIN_CONV_FRACTION = saved


@check
def layers_two_devices_give_the_single_device_layers(work: Path) -> None:
    """kernel_blocks(by_layer=True) on two devices equals one device, per layer and in total."""
    from test_ntk_layers import assemble, make_model

    from ntklab.ntk import kernel_blocks, layer_names

    set_x64(True)
    for name in ("mlp", "lenet"):
        apply_fn, params, shape = make_model(name)
        x = np.random.default_rng(5).standard_normal((5, *shape))
        kernels = []
        for devices in (jax.devices()[:1], jax.devices()[:2]):
            parts = list(kernel_blocks(apply_fn, params, x, by_layer=True, batch_size=2,
                                       devices=devices))  # fmt: skip
            kernels.append(assemble(parts, len(x), len(layer_names(params))))
        (one, one_layers), (two, two_layers) = kernels
        scale = np.abs(one).max()
        np.testing.assert_allclose(two_layers, one_layers, rtol=1e-12, atol=1e-12 * scale)
        np.testing.assert_allclose(two, one, rtol=1e-12, atol=1e-12 * scale)


@check
def store_other_device_count_resumes_to_the_same_kernel(work: Path) -> None:
    """A kernel interrupted on 4 devices resumes on one device (other batch size) to the
    one-device kernel."""
    from test_ntk_store import SHAPE, model

    from ntklab.ntk import empirical_ntk

    set_x64(True)
    apply_fn, params = model()
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.random.default_rng(1).standard_normal((10, *SHAPE))
    reference = empirical_ntk(apply_fn, params, x, batch_size=4, devices=jax.devices()[:1])
    out = work / "store_kernel.npy"

    class Stop(Exception):
        pass

    def hook(done):
        if done == 3:
            raise Stop

    try:
        empirical_ntk(apply_fn, params, x, out=out, batch_size=4, _after_unit=hook)  # 4 devices
    except Stop:
        pass
    else:
        raise AssertionError("the 4-device run was not interrupted")
    kernel = empirical_ntk(apply_fn, params, x, out=out, batch_size=2, devices=jax.devices()[:1])
    np.testing.assert_allclose(np.asarray(kernel), reference, rtol=1e-12, atol=1e-12)


def main(results_path: Path, work: Path) -> None:
    assert len(jax.devices()) == 4, jax.devices()
    results: dict[str, str | None] = dict.fromkeys(CHECKS)  # None: not run (yet)
    results_path.write_text(json.dumps(results, indent=1))
    for name, function in CHECKS.items():
        start = time.perf_counter()
        try:
            function(work)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
        finally:
            set_x64(False)
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
        results_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
