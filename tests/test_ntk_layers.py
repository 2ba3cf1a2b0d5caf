"""kernel_blocks and layer_names: the trace kernel streamed by block pairs and split by layer,
against brute-force jax.jacrev kernels restricted to each layer's parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ntk_structure import ADVERSARIAL, ADVERSARIAL_SHAPE

from ntklab.models import build_model, inference_apply_fn, init_variables
from ntklab.ntk import KernelBlock, empirical_ntk, kernel_blocks, layer_names
from ntklab.ntk import _blocks as blocks_module

NUM_OUTPUTS = 2
REGISTRY = {
    "mlp": ({"widths": (6, 5)}, (3, 3, 1)),
    "lenet": ({}, (8, 8, 1)),
    "resnet": ({"stage_sizes": (1,), "width": 4}, (6, 6, 1)),  # BatchNorm, convolutions
}
MODELS = [*REGISTRY, "masked", "tied", "called_twice"]


def make_model(name: str):
    """(apply_fn, float64 params) of a registry model or an adversarial model."""
    if name in ADVERSARIAL:
        model = ADVERSARIAL[name]()
        params = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, *ADVERSARIAL_SHAPE)))[
            "params"
        ]
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        return (lambda p, x: model.apply({"params": p}, x)), params, ADVERSARIAL_SHAPE
    kwargs, shape = REGISTRY[name]
    model = build_model("resnet18" if name == "resnet" else name, num_outputs=NUM_OUTPUTS,
                        **kwargs)  # fmt: skip
    variables = init_variables(model, jax.random.PRNGKey(2), shape)
    if "batch_stats" in variables:
        variables["batch_stats"] = jax.tree.map(
            lambda s: jnp.asarray(s + 0.3, jnp.float64), variables["batch_stats"]
        )
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables["params"])
    return inference_apply_fn(model, variables), params, shape


def per_layer_brute_force(apply_fn, params, x) -> np.ndarray:
    """[L, N, N]: Σ_c J_ic J_jc over each layer's leaves (jax.jacrev of the batched outputs)."""
    tree = jax.jit(jax.jacrev(lambda p, x: apply_fn(p, x)))(params, x)  # one compiled program
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = layer_names(params)
    kernels = np.zeros((len(names), len(x), len(x)))
    for path, leaf in paths:
        keys = [str(getattr(k, "key", k)) for k in path]
        layer = names.index("/".join(keys[:-1]) if len(keys) > 1 else keys[0])
        jac = np.asarray(leaf).reshape(len(x), leaf.shape[1], -1)
        kernels[layer] += np.einsum("icp,jcp->ij", jac, jac)
    return kernels


def assemble(parts: list[KernelBlock], n: int, num_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """The full kernel [N, N] and per-layer kernels [L, N, N] from the yielded upper triangle;
    asserts every block pair comes once with rows.start <= cols.start and tiles the triangle."""
    kernel = np.full((n, n), np.nan)
    layers = np.full((num_layers, n, n), np.nan)
    covered = np.zeros((n, n), int)
    for part in parts:
        assert part.rows.start <= part.cols.start
        covered[part.rows, part.cols] += 1
        kernel[part.rows, part.cols] = part.block
        layers[:, part.rows, part.cols] = part.layers
        if part.rows != part.cols:
            covered[part.cols, part.rows] += 1
            kernel[part.cols, part.rows] = part.block.T
            layers[:, part.cols, part.rows] = part.layers.transpose(0, 2, 1)
    assert (covered == 1).all(), "every entry once: the pairs tile the upper triangle"
    return kernel, layers


@pytest.fixture(scope="module")
def cases():
    """Per model: apply_fn, params, x [5, ...] and the per-layer brute-force kernels."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    built = {}
    try:
        for name in MODELS:
            apply_fn, params, shape = make_model(name)
            x = np.random.default_rng(3).standard_normal((5, *shape))
            built[name] = (apply_fn, params, x, per_layer_brute_force(apply_fn, params, x))
        yield built
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.mark.parametrize("name", MODELS)
def test_per_layer_blocks_equal_brute_force(cases, name, float64):
    apply_fn, params, x, expected = cases[name]
    parts = list(kernel_blocks(apply_fn, params, x, by_layer=True, batch_size=2))
    assert len(parts) == 6  # 3 blocks of 2, 2, 1 examples: 3·4/2 pairs
    assert all(part.block.dtype == np.float64 for part in parts)
    kernel, layers = assemble(parts, len(x), len(layer_names(params)))
    scale = np.abs(expected).max()
    np.testing.assert_allclose(layers, expected, rtol=1e-10, atol=1e-10 * scale)
    np.testing.assert_allclose(kernel, layers.sum(0), rtol=1e-12, atol=1e-12 * scale)
    whole = empirical_ntk(apply_fn, params, x, batch_size=2)
    np.testing.assert_allclose(kernel, whole, rtol=1e-12, atol=1e-12 * scale)


@pytest.mark.parametrize("implementation", ["jacobian", "structured"])
@pytest.mark.parametrize("name", ["lenet", "tied"])
def test_every_feature_implementation_by_layer(cases, name, implementation, float64):
    apply_fn, params, x, expected = cases[name]
    parts = kernel_blocks(apply_fn, params, x, by_layer=True, implementation=implementation,
                          batch_size=3)  # fmt: skip
    _, layers = assemble(list(parts), len(x), len(layer_names(params)))
    np.testing.assert_allclose(layers, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


def test_parameter_chunks_by_layer(cases, float64):
    apply_fn, params, x, expected = cases["mlp"]
    # A budget below one block's Jacobian: the parameters are split into chunks of leaves.
    parts = kernel_blocks(apply_fn, params, x, by_layer=True, implementation="jacobian",
                          batch_size=2, memory_bytes=2_000)  # fmt: skip
    _, layers = assemble(list(parts), len(x), len(layer_names(params)))
    np.testing.assert_allclose(layers, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


def test_float32_layers_sum_to_the_block(cases):
    apply_fn, params, x, expected = cases["lenet"]
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    parts = list(kernel_blocks(apply_fn, params, x.astype(np.float32), by_layer=True,
                               batch_size=2))  # fmt: skip
    for part in parts:
        assert part.block.dtype == np.float32 and part.layers.dtype == np.float32
        np.testing.assert_allclose(part.layers.sum(0), part.block, rtol=1e-6)
    _, layers = assemble(parts, len(x), len(layer_names(params)))
    np.testing.assert_allclose(layers, expected, rtol=2e-5, atol=2e-6 * np.abs(expected).max())


def test_without_layers_and_by_products(cases, float64):
    apply_fn, params, x, expected = cases["mlp"]
    for implementation in ("auto", "ntk_vector_products"):
        parts = list(kernel_blocks(apply_fn, params, x, implementation=implementation,
                                   batch_size=2))  # fmt: skip
        assert all(part.layers is None for part in parts)
        kernel = np.zeros((len(x), len(x)))
        for part in parts:
            kernel[part.rows, part.cols] = part.block
            kernel[part.cols, part.rows] = part.block.T
        np.testing.assert_allclose(kernel, expected.sum(0), rtol=1e-10)


def test_by_layer_refuses_products_and_auto_forms_features(cases, monkeypatch, float64):
    apply_fn, params, x, expected = cases["mlp"]
    with pytest.raises(ValueError, match="by_layer=True needs an implementation that forms"):
        kernel_blocks(apply_fn, params, x, by_layer=True, implementation="ntk_vector_products")
    with pytest.raises(ValueError, match="unknown implementation"):
        kernel_blocks(apply_fn, params, x, implementation="fastest")
    # Where the cost model picks NTK-vector products, by_layer takes a feature implementation.
    choose = blocks_module._schedule.choose_plan

    def products_first(problem, implementation, **layout):
        name = "ntk_vector_products" if implementation == "auto" else implementation
        return choose(problem, name, **layout)

    monkeypatch.setattr(blocks_module._schedule, "choose_plan", products_first)
    parts = list(kernel_blocks(apply_fn, params, x, by_layer=True, batch_size=2))
    _, layers = assemble(parts, len(x), len(layer_names(params)))
    np.testing.assert_allclose(layers, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


def test_layer_names():
    tree = {
        "Conv_0": {"kernel": np.zeros(2), "bias": np.zeros(1)},
        "Block_0": {"Dense_0": {"kernel": np.zeros(2), "bias": np.zeros(1)}},
        "scale": np.zeros(3),
    }
    assert layer_names(tree) == ["Conv_0", "Block_0/Dense_0", "scale"]
    assert layer_names([np.zeros(2), (np.zeros(1), np.zeros(1))]) == ["0", "1"]
    _, params, _ = make_model("lenet")
    assert layer_names(params) == ["Conv_0", "Conv_1", "Dense_0", "Dense_1", "Dense_2"]


# The per-layer blocks check on 2 devices is layers_two_devices_give_the_single_device_layers in
# tests/multidevice_checks.py (one shared 4-device subprocess for the whole suite, run by
# tests/test_multidevice.py).
