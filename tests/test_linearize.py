"""linearize: f_lin(θ0) = f(θ0), same gradient at θ0, and exactly first order (vs. jax.jacrev)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from ntklab.linearize import linearize
from ntklab.models import build_model, inference_apply_fn, init_variables

MODELS = {
    "mlp": {"widths": (12,)},
    "resnet18": {"stage_sizes": (1,), "width": 4},
}


def tiny_setup(name: str):
    """A float64 model on 8x8x1 inputs, BatchNorm statistics perturbed away from (0, 1)."""
    model = build_model(name, **MODELS[name])
    variables = init_variables(model, jax.random.PRNGKey(1), (8, 8, 1))
    variables = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
    if "batch_stats" in variables:
        rng = np.random.default_rng(0)
        variables["batch_stats"] = jax.tree.map(
            lambda a: a + rng.uniform(0.1, 0.5, a.shape), variables["batch_stats"]
        )
    x = np.random.default_rng(2).normal(size=(5, 8, 8, 1))
    return model, variables, inference_apply_fn(model, variables), x


def random_like(tree, seed: int, scale: float = 1e-2):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: scale * rng.normal(size=a.shape), tree)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_equals_network_at_theta0_with_the_same_gradient(name, float64):
    _, variables, apply_fn, x = tiny_setup(name)
    params0 = variables["params"]
    weights = np.random.default_rng(3).normal(size=(len(x), 1))

    @jax.jit  # one compilation for all the values compared
    def values(params0, x):
        models = {
            "network": apply_fn,
            "linear": linearize(apply_fn, params0),
            "linear_nobias": linearize(apply_fn, params0, with_bias=False),
        }
        outputs = {name: fn(params0, x) for name, fn in models.items()}
        grads = {
            name: ravel_pytree(jax.grad(lambda p, fn=fn: jnp.sum(weights * fn(p, x)))(params0))[0]
            for name, fn in models.items()
        }
        return outputs, grads

    outputs, grads = values(params0, x)
    np.testing.assert_allclose(outputs["linear"], outputs["network"], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(outputs["linear_nobias"], 0.0)
    for name in ("linear", "linear_nobias"):
        np.testing.assert_allclose(grads[name], grads["network"], rtol=1e-10, atol=1e-12)
    assert np.abs(grads["network"]).max() > 0


def test_is_the_first_order_taylor_model(float64):
    """f_lin(θ0 + δ) = f(θ0) + J δ with J from brute-force jacrev, for a finite δ."""
    _, variables, apply_fn, x = tiny_setup("mlp")
    params0 = variables["params"]
    flat0, unravel = ravel_pytree(params0)
    jacobian = jax.jit(jax.jacrev(lambda theta: apply_fn(unravel(theta), x)[:, 0]))(flat0)  # [B, P]
    delta = random_like(params0, seed=4, scale=0.3)
    params = jax.tree.map(lambda a, d: a + d, params0, delta)
    expected = np.asarray(apply_fn(params0, x))[:, 0] + jacobian @ ravel_pytree(delta)[0]
    evaluate = jax.jit(lambda fn, p: fn(p, x)[:, 0])
    np.testing.assert_allclose(evaluate(linearize(apply_fn, params0), params), expected, rtol=1e-10)
    np.testing.assert_allclose(
        evaluate(linearize(apply_fn, params0, with_bias=False), params),
        jacobian @ ravel_pytree(delta)[0],
        rtol=1e-10,
        atol=1e-12,
    )
    # ... and it is not the network: a finite step changes the network at second order.
    assert np.abs(evaluate(Partial(apply_fn), params) - expected).max() > 1e-6


def test_theta0_is_a_leaf_not_a_compiled_constant(float64):
    """Under jit θ0 is an input buffer: the linearization is a pytree whose leaves are θ0."""
    _, variables, apply_fn, x = tiny_setup("mlp")
    params0 = variables["params"]
    f_lin = linearize(apply_fn, params0)
    leaves = jax.tree.leaves(f_lin)
    assert len(leaves) == len(jax.tree.leaves(params0))
    assert all(a is b for a, b in zip(leaves, jax.tree.leaves(params0), strict=True))
    lowered = jax.jit(lambda fn, p, inputs: fn(p, inputs)).lower(f_lin, params0, x)
    flat_size = ravel_pytree(params0)[0].size
    assert len(lowered.as_text()) < 8 * flat_size  # no dense<...> copy of the P parameters
    shifted = jax.tree.map(lambda a: a + 1.0, params0)
    np.testing.assert_allclose(  # the jitted call reads the θ0 it is given
        jax.jit(lambda fn, p, inputs: fn(p, inputs))(linearize(apply_fn, shifted), shifted, x),
        apply_fn(shifted, x),
        rtol=1e-12,
    )


@pytest.mark.parametrize(
    "implementation", ["auto", "jacobian", "structured", "ntk_vector_products"]
)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_engine_kernel_of_linearization_is_the_network_kernel_at_theta0(
    name, implementation, float64
):
    """The eNTK engine on f_lin at θ ≠ θ0 (its leaves are marked varying inside shard_map while
    θ0 is not) equals the network's kernel at θ0 from brute-force jacrev."""
    from ntklab.ntk import KernelOperator, empirical_ntk

    _, variables, apply_fn, x = tiny_setup(name)
    params0 = variables["params"]
    params = jax.tree.map(lambda a, d: a + d, params0, random_like(params0, seed=3))
    jac = jax.jacrev(lambda p: apply_fn(p, x)[:, 0])(params0)
    flat = np.concatenate([np.reshape(leaf, (len(x), -1)) for leaf in jax.tree.leaves(jac)], 1)
    expected = flat @ flat.T
    f_lin = linearize(apply_fn, params0)
    kernel = empirical_ntk(f_lin, params, x, implementation=implementation, batch_size=2)
    np.testing.assert_allclose(kernel, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())
    vectors = np.random.default_rng(4).normal(size=(len(x), 2))
    operator = KernelOperator(f_lin, params, x, implementation=implementation, batch_size=2)
    np.testing.assert_allclose(operator.matmat(vectors), expected @ vectors, rtol=1e-8)
