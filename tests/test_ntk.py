"""empirical_ntk against the brute-force jax.jacrev contraction."""

from __future__ import annotations

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


@pytest.mark.parametrize("name", ["mlp", "lenet", "resnet18"])
def test_symmetric_kernel_equals_brute_force(name, float64):
    apply_fn, params, shape = network(name)
    params = as_float64(params)
    x = np.random.default_rng(0).standard_normal((7, *shape))
    kernel = empirical_ntk(apply_fn, params, x, batch_size=3)
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
    with pytest.raises(ValueError, match="unknown implementation 'magic'; valid choices: jacobian"):
        empirical_ntk(apply_fn, params, x, implementation="magic")
    with pytest.raises(ValueError, match="unknown precision 'low'; valid choices: highest"):
        empirical_ntk(apply_fn, params, x, precision="low")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        empirical_ntk(apply_fn, params, x, batch_size=0)
    with pytest.raises(ValueError, match="x2 examples"):
        empirical_ntk(apply_fn, params, x, np.zeros((2, 3, 3, 2), np.float32))
    model = build_model("mlp", widths=(4,), num_outputs=3)
    variables = init_variables(model, jax.random.PRNGKey(0), shape)
    with pytest.raises(ValueError, match=r"scalar-output .* got output shape \(1, 3\)"):
        empirical_ntk(inference_apply_fn(model, variables), variables["params"], x)
