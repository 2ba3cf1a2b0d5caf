"""The engine's layerwise Jacobians (CPU, convolution-dominated models) against brute-force
``jax.jacrev``, including convolutions the layerwise plan must refuse (subclass, shared module)."""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntklab.models import build_model, inference_apply_fn, init_variables
from ntklab.ntk import empirical_ntk


class ScaledConv(nn.Conv):
    """A Conv subclass with its own ``__call__``: the patch formula must not be assumed."""

    def __call__(self, inputs):
        return 0.5 * super().__call__(inputs) + 0.1 * jnp.sum(self.variables["params"]["kernel"])


class ConvNet(nn.Module):
    """Conv-dominated: plain convs, a subclassed conv, one conv module used twice, a Dense head."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(128, (3, 3), strides=2)(x))  # covered convolutions: 2/3 of P
        x = nn.relu(ScaledConv(4, (3, 3))(x))
        shared = nn.Conv(4, (3, 3), padding="SAME")
        x = nn.relu(shared(nn.relu(shared(x))))
        return nn.Dense(2)(x.mean(axis=(1, 2)))


def brute_force(apply_fn, params, x):
    """Θ[i, j, c, d] from jax.jacrev of the batched outputs (one jitted program)."""

    @jax.jit
    def kernel(params, x):
        jac = jax.jacrev(lambda p: apply_fn(p, x))(params)
        flat = jnp.concatenate(
            [
                leaf.reshape(x.shape[0], apply_fn(params, x).shape[1], -1)
                for leaf in jax.tree.leaves(jac)
            ],
            axis=2,
        )
        return jnp.einsum("icp,jdp->ijcd", flat, flat)

    return np.asarray(kernel(params, x))


def tiny_resnet():
    model = build_model("resnet18", stage_sizes=(1,), width=4)
    variables = init_variables(model, jax.random.PRNGKey(0), (8, 8, 3))
    return inference_apply_fn(model, variables), variables["params"]


def conv_net():
    model = ConvNet()
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    return (lambda p, x: model.apply({"params": p}, x)), params


@pytest.mark.parametrize("output", ["trace", "full", "diagonal"])
@pytest.mark.parametrize("implementation", ["auto", "jacobian", "structured"])
@pytest.mark.parametrize("build", [tiny_resnet, conv_net], ids=["resnet", "adversarial"])
def test_layerwise_engine_equals_brute_force(build, implementation, output, caplog):
    apply_fn, params = build()
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 8, 8, 3))
    full = brute_force(apply_fn, params, x)
    expected = {
        "full": full,
        "diagonal": np.einsum("ijcc->ijc", full),
        "trace": np.einsum("ijcc->ij", full),
    }[output]
    with caplog.at_level(logging.INFO, logger="ntklab"):
        kernel = empirical_ntk(
            apply_fn, params, x, output=output, implementation=implementation, batch_size=2
        )
    assert "per-example Jacobians layerwise" in caplog.text
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(kernel), expected, rtol=2e-5, atol=2e-6 * scale)
