"""Every implementation against the brute-force jax.jacrev kernel, on every registered model and on
adversarial models whose Dense-like layers must not be factored (or must be factored exactly)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntklab.models import build_model, inference_apply_fn, init_variables, model_names
from ntklab.ntk import empirical_ntk
from ntklab.ntk._structure import find_dense_layers

NUM_OUTPUTS = 2
REGISTRY_KWARGS = {
    "mlp": {"widths": (6, 5)},
    "lenet": {},
    "resnet18": {"stage_sizes": (1,), "width": 4},
}
REGISTRY_SHAPES = {"mlp": (3, 3, 1), "lenet": (8, 8, 1), "resnet18": (6, 6, 1)}


class MaskedDense(nn.Dense):
    """A Dense subclass with its own __call__: a fixed mask on the kernel."""

    @nn.compact
    def __call__(self, inputs):
        kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features))
        mask = (jnp.arange(kernel.size).reshape(kernel.shape) % 3 != 0).astype(kernel.dtype)
        bias = self.param("bias", self.bias_init, (self.features,))
        return inputs @ (kernel * mask) + bias[None]


class Masked(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(MaskedDense(5, name="masked")(x.reshape(x.shape[0], -1)))
        return nn.Dense(NUM_OUTPUTS)(h)


class Tied(nn.Module):
    """An autoencoder-style tied kernel: the encoder's kernel is reused transposed."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        encoder = nn.Dense(4, name="encoder")
        h = jnp.tanh(encoder(x))
        reconstruction = h @ encoder.variables["params"]["kernel"].T
        return nn.Dense(NUM_OUTPUTS)(jnp.tanh(reconstruction))


class CalledTwice(nn.Module):
    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(4, name="shared")
        h = x.reshape(x.shape[0], -1)[:, :4]
        return nn.Dense(NUM_OUTPUTS)(jnp.tanh(shared(jnp.tanh(shared(h)))))


class Tokens(nn.Module):
    """Dense on token inputs [B, T, d]: its Jacobian is a sum over tokens, not one outer product."""

    @nn.compact
    def __call__(self, x):
        tokens = x.reshape(x.shape[0], -1, 3)
        h = jnp.tanh(nn.Dense(4, name="per_token")(tokens))
        return nn.Dense(NUM_OUTPUTS)(h.reshape(h.shape[0], -1))


class General(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((2, 3), name="general")(x.reshape(x.shape[0], -1))
        return nn.Dense(NUM_OUTPUTS)(jnp.tanh(h.reshape(h.shape[0], -1)))


class WithEinsum(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        h = nn.Einsum((x.shape[-1], 4), "bd,dh->bh", name="einsum")(x)
        return nn.Dense(NUM_OUTPUTS)(jnp.tanh(h))


class Remat(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.remat(nn.Dense)(5, name="remat")(x.reshape(x.shape[0], -1))
        return nn.Dense(NUM_OUTPUTS)(jnp.tanh(h))


ADVERSARIAL = {
    "masked": Masked,
    "tied": Tied,
    "called_twice": CalledTwice,
    "tokens": Tokens,
    "dense_general": General,
    "einsum": WithEinsum,
    "remat": Remat,
}
ADVERSARIAL_SHAPE = (2, 3, 1)  # 6 inputs: two tokens of 3 for Tokens


def plain_jnp_model():
    """No Flax at all: a two-layer tanh network on a dict of arrays."""
    rng = np.random.default_rng(0)
    params = {"w1": rng.standard_normal((6, 5)) / 2, "w2": rng.standard_normal((5, NUM_OUTPUTS))}

    def apply_fn(p, x):
        return jnp.tanh(x.reshape(x.shape[0], -1) @ p["w1"]) @ p["w2"]

    return apply_fn, params, ADVERSARIAL_SHAPE


def make_model(name: str):
    """(apply_fn, float64 params, example shape, name of a layer that must not be factored)."""
    if name == "plain_jnp":
        apply_fn, params, shape = plain_jnp_model()
        return apply_fn, jax.tree.map(jnp.asarray, params), shape, None
    if name in ADVERSARIAL:
        model, shape = ADVERSARIAL[name](), ADVERSARIAL_SHAPE
        params = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, *shape)))["params"]
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)

        def apply_fn(p, x):
            return model.apply({"params": p}, x)

        refused = {"masked": "masked", "tied": "encoder", "called_twice": "shared",
                   "tokens": "per_token", "dense_general": "general", "einsum": "einsum",
                   "remat": "remat"}[name]  # fmt: skip
        return apply_fn, params, shape, refused
    shape = REGISTRY_SHAPES[name]
    model = build_model(name, num_outputs=NUM_OUTPUTS, **REGISTRY_KWARGS[name])
    variables = init_variables(model, jax.random.PRNGKey(2), shape)
    if "batch_stats" in variables:
        variables["batch_stats"] = jax.tree.map(
            lambda s: jnp.asarray(s + 0.3, jnp.float64), variables["batch_stats"]
        )
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables["params"])
    return inference_apply_fn(model, variables), params, shape, None


ALL_MODELS = [*model_names(), *ADVERSARIAL, "plain_jnp"]


def brute_force_full(apply_fn, params, x) -> np.ndarray:
    """Θ[i, j, c, d] from jax.jacrev of the batched outputs [N, C, P] (one jitted program)."""

    @jax.jit
    def kernel(params, x):
        tree = jax.jacrev(lambda p: apply_fn(p, x))(params)
        leaves = jax.tree.leaves(tree)
        jac = jnp.concatenate([leaf.reshape(*leaf.shape[:2], -1) for leaf in leaves], 2)
        return jnp.einsum("icp,jdp->ijcd", jac, jac)

    return np.asarray(kernel(params, x))


REDUCE = {
    "full": lambda k: k,
    "trace": lambda k: np.einsum("ijcc->ij", k),
    "diagonal": lambda k: np.einsum("ijcc->ijc", k),
}


@pytest.fixture(scope="module")
def cases():
    """Per model: apply_fn, params, inputs [5, ...], refused layer, brute-force kernel."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    built = {}
    try:
        for name in ALL_MODELS:
            apply_fn, params, shape, refused = make_model(name)
            x = np.random.default_rng(3).standard_normal((5, *shape))
            built[name] = (apply_fn, params, x, refused, brute_force_full(apply_fn, params, x))
        yield built
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_adversarial_layers_are_not_factored(cases, name, float64):
    apply_fn, params, x, refused, _ = cases[name]
    layers, reasons = find_dense_layers(
        apply_fn, jax.tree.structure(params), jax.tree.leaves(params), x.shape[1:]
    )
    names = [layer.name for layer in layers]
    if refused is not None:
        assert refused not in names
        assert refused in dict(reasons), reasons  # and the log gives a reason
    if name in ("mlp", "lenet"):  # plain Dense heads on flat inputs are factored
        assert names, reasons
    if name == "plain_jnp":
        assert names == []


@pytest.mark.parametrize("implementation", ["auto", "structured", "jacobian"])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_full_kernel_equals_brute_force(cases, name, implementation, float64):
    apply_fn, params, x, _, expected = cases[name]
    kernel = empirical_ntk(
        apply_fn, params, x, output="full", implementation=implementation, batch_size=2
    )
    assert kernel.dtype == np.float64
    np.testing.assert_allclose(kernel, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


@pytest.mark.parametrize("output", ["trace", "diagonal"])
@pytest.mark.parametrize("name", ["mlp", "lenet", "masked", "tied", "tokens"])
def test_structured_reduced_outputs_equal_brute_force(cases, name, output, float64):
    apply_fn, params, x, _, full = cases[name]
    expected = REDUCE[output](full)
    kernel = empirical_ntk(apply_fn, params, x[:4], x, output=output, implementation="structured",
                           batch_size=3)  # fmt: skip
    expected = expected[:4]
    np.testing.assert_allclose(kernel, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


def test_auto_never_reports_structured_without_a_factorable_layer(cases, caplog, float64):
    import logging

    apply_fn, params, x, _, _ = cases["plain_jnp"]
    with caplog.at_level(logging.INFO, logger="ntklab.ntk"):
        empirical_ntk(apply_fn, params, x, implementation="auto")
    assert "no layer qualifies for factoring" in caplog.text
    assert "structured" not in caplog.text.split("cost model")[-1].split("\n")[0]
