"""Convolutions whose per-example Jacobians the host forms (ntklab.ntk._host_convs): the NumPy
formula against each layer's own VJP over convolution configurations, and the engine using it
against brute-force jax.jacrev, including convolutions the layerwise plan must refuse."""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ntk_structure import brute_force_full

from ntklab.ntk import empirical_ntk
from ntklab.ntk._conv_geometry import conv_config, host_conv_grads, host_conv_inputs

CONFIGURATIONS = {
    "same": ({"kernel_size": (3, 3)}, (7, 6, 2)),
    "strided": ({"kernel_size": (3, 3), "strides": 2}, (9, 8, 2)),
    "strided_first_axis": ({"kernel_size": (2, 3), "strides": (3, 1)}, (9, 8, 2)),
    "dilated": ({"kernel_size": (3, 2), "kernel_dilation": (2, 1), "padding": "VALID"}, (9, 8, 2)),
    "explicit_negative": ({"kernel_size": (3, 3), "padding": ((2, -1), (1, 2))}, (7, 6, 2)),
    "circular": ({"kernel_size": (3, 3), "padding": "CIRCULAR", "strides": 2}, (7, 6, 2)),
    "reflect": ({"kernel_size": (2, 2), "padding": "REFLECT"}, (5, 6, 2)),
    "groups": ({"kernel_size": (3, 3), "feature_group_count": 2}, (6, 5, 4)),
    "no_bias": ({"kernel_size": (2, 2), "use_bias": False}, (5, 5, 3)),
    "one_dim": ({"kernel_size": (3,), "strides": 2}, (9, 3)),
    "three_dim": ({"kernel_size": (2, 3, 2), "strides": (1, 2, 1)}, (4, 6, 5, 2)),
}


@pytest.mark.parametrize("name", sorted(CONFIGURATIONS))
def test_host_formula_equals_the_layers_own_vjp(name, float64):
    options, shape = CONFIGURATIONS[name]
    module = nn.Conv(features=4, **options)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 1, *shape))
    params = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.asarray(a[0]))["params"]
    params = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float64), params)
    out_shape = jax.eval_shape(lambda x: module.apply({"params": params}, x), a[0]).shape
    delta = rng.standard_normal((3, 2, *out_shape))  # [B, C, 1, *spatial_out, d_out]

    def one(example, cotangent):  # the layer's own VJP per example and output
        _, pullback = jax.vjp(lambda p: module.apply({"params": p}, example), params)
        return pullback(cotangent)[0]["kernel"]

    expected = np.asarray(jax.vmap(jax.vmap(one, in_axes=(None, 0)))(a, delta))
    config = conv_config(module, tuple(a.shape[1:]))
    assert config is not None
    padded = np.asarray(host_conv_inputs(config, jnp.asarray(a)))
    got = host_conv_grads(config, padded, delta)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * np.abs(expected).max())


class SmallConvs(nn.Module):
    """Dense-dominated, like LeNet: two plain convolutions (strided, circular), then Dense."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Conv(4, (3, 3), strides=2)(x))
        h = jnp.tanh(nn.Conv(4, (2, 2), padding="CIRCULAR")(h))
        h = jnp.tanh(nn.Dense(40)(h.reshape(h.shape[0], -1)))
        return nn.Dense(3)(h)


class ScaledConv(nn.Conv):
    """A Conv subclass with its own __call__: not covered, its leaves come from jacrev."""

    def __call__(self, inputs):
        return 0.5 * super().__call__(inputs) + 0.1 * jnp.sum(self.variables["params"]["kernel"])


class AdversarialConvs(nn.Module):
    """Dense-dominated with a plain, a subclassed and a shared convolution."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Conv(4, (3, 3))(x))
        h = jnp.tanh(ScaledConv(4, (3, 3))(h))
        shared = nn.Conv(4, (3, 3), padding="SAME")
        h = jnp.tanh(shared(jnp.tanh(shared(h))))
        h = jnp.tanh(nn.Dense(40)(h.reshape(h.shape[0], -1)))
        return nn.Dense(2)(h)


@pytest.mark.parametrize("module", [SmallConvs, AdversarialConvs], ids=["small", "adversarial"])
def test_engine_with_host_convolutions_equals_brute_force(module, caplog, float64):
    model = module()
    x = np.random.default_rng(1).standard_normal((5, 6, 6, 2))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 2)))["params"]
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)

    def apply_fn(p, xb):
        return model.apply({"params": p}, xb)

    full = brute_force_full(apply_fn, params, x)
    for output, expected in (("full", full), ("trace", np.einsum("ijcc->ij", full))):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ntklab.ntk"):
            kernel = empirical_ntk(apply_fn, params, x, output=output, batch_size=2)
        assert "formed on the host" in caplog.text
        scale = np.abs(expected).max()
        np.testing.assert_allclose(kernel, expected, rtol=1e-10, atol=1e-10 * scale)
    # Off the host contraction (diagonal output) the plan does without them, same kernel.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ntklab.ntk"):
        diagonal = empirical_ntk(apply_fn, params, x, output="diagonal", batch_size=2)
    assert "formed on the host" not in caplog.text
    expected = np.einsum("ijcc->ijc", full)
    np.testing.assert_allclose(diagonal, expected, rtol=1e-10, atol=1e-10 * np.abs(full).max())


def test_switched_off_with_the_layerwise_jacobians(monkeypatch, caplog):
    model = SmallConvs()
    x = np.random.default_rng(1).standard_normal((4, 6, 6, 2)).astype(np.float32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 2)))["params"]

    def apply_fn(p, xb):
        return model.apply({"params": p}, xb)

    with caplog.at_level(logging.INFO, logger="ntklab.ntk"):
        on = empirical_ntk(apply_fn, params, x, batch_size=2)
    assert "formed on the host" in caplog.text
    monkeypatch.setenv("NTKLAB_LAYERWISE", "0")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ntklab.ntk"):
        off = empirical_ntk(apply_fn, params, x, batch_size=2)
    assert "formed on the host" not in caplog.text
    np.testing.assert_allclose(on, off, rtol=2e-5, atol=2e-6 * np.abs(off).max())
