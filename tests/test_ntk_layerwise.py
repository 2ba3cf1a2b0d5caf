"""Layerwise per-example Jacobians (ntklab.ntk._layerwise) against brute-force jax.jacrev."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as Spec

from ntklab.models import build_model, inference_apply_fn, init_variables, model_names
from ntklab.ntk._layerwise import layerwise_features
from ntklab.ntk._layerwise_plan import layerwise_plan

# The engine's layerwise path is tested end to end in test_ntk_layerwise_engine.py and
# test_ntk_host_convs.py; these exhaustive checks of its pieces compile many models (minutes on 2
# cores), so they run with `python -m pytest -m slow`.
pytestmark = pytest.mark.slow

TINY = {
    "mlp": ({"widths": (6, 5)}, (4, 4, 2)),
    "lenet": ({}, (8, 8, 3)),
    "resnet18": ({"width": 4, "stage_sizes": (1, 1)}, (8, 8, 3)),
}


def reference_jacobians(apply_fn, params, x, group=None) -> list[np.ndarray]:
    """vmap(jacrev) of apply_fn(params, x_i[None])[0] per leaf: [N, C, P_leaf] each."""
    leaves, treedef = jax.tree.flatten(params)
    group = tuple(range(len(leaves))) if group is None else group

    def outputs(group_leaves, example):
        merged = list(leaves)
        for position, index in enumerate(group):
            merged[index] = group_leaves[position]
        return apply_fn(jax.tree.unflatten(treedef, merged), example[None])[0]

    jacobians = jax.jit(jax.vmap(jax.jacrev(outputs), in_axes=(None, 0)))(  # one compile
        [leaves[i] for i in group], x
    )
    c = jacobians[0].shape[1]
    return [np.asarray(j).reshape(len(x), c, -1) for j in jacobians]


def layerwise(apply_fn, params, x, group=None):
    leaves, treedef = jax.tree.flatten(params)
    group = tuple(range(len(leaves))) if group is None else group
    plan = layerwise_plan(apply_fn, treedef, leaves, x.shape[1:])
    num_outputs = jax.eval_shape(apply_fn, params, x[:1]).shape[1]
    fn = jax.jit(
        lambda lv, xb: layerwise_features(apply_fn, treedef, lv, group, xb, num_outputs, plan=plan)
    )
    return [np.asarray(f) for f in fn(leaves, x)], plan


def assert_close(got, want, rtol=1e-10):
    assert len(got) == len(want)
    scale = max(float(np.max(np.abs(w))) for w in want)
    assert scale > 0
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=0, atol=rtol * scale)


def perturbed(variables, seed=3):
    """Float64 variables with every leaf shifted, so no BN scale/statistic is trivially 0 or 1."""
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    shifted = [
        jnp.asarray(leaf, jnp.float64) + 0.3 * jax.random.uniform(k, leaf.shape, jnp.float64)
        for leaf, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, shifted)


def registry_network(name, num_outputs=1):
    kwargs, shape = TINY[name]
    model = build_model(name, num_outputs=num_outputs, activation="gelu", **kwargs)
    variables = perturbed(init_variables(model, jax.random.PRNGKey(0), shape))
    x = jax.random.normal(jax.random.PRNGKey(1), (5, *shape), jnp.float64)
    return inference_apply_fn(model, variables), variables["params"], x


def flax_network(module, x, *, mutable_stats=False):
    variables = perturbed(jax.jit(module.init)(jax.random.PRNGKey(0), x[:1]))
    stats = variables.get("batch_stats")

    def apply_fn(params, xb):
        if stats is None:
            return module.apply({"params": params}, xb)
        if mutable_stats:
            out, _ = module.apply(
                {"params": params, "batch_stats": stats}, xb, mutable=["batch_stats"]
            )
            return out
        return module.apply({"params": params, "batch_stats": stats}, xb)

    return apply_fn, variables["params"]


def test_registry_covers_every_model():
    assert set(TINY) == set(model_names())


@pytest.mark.parametrize(("name", "num_outputs"), [("mlp", 3), ("lenet", 1), ("resnet18", 2)])
def test_registry_models_equal_jacrev(name, num_outputs, float64):
    apply_fn, params, x = registry_network(name, num_outputs)
    got, plan = layerwise(apply_fn, params, x)
    assert_close(got, reference_jacobians(apply_fn, params, x))
    # Every leaf of the registry models is covered layerwise (nothing left to jacrev).
    assert plan.covered == frozenset(range(len(jax.tree.leaves(params))))
    assert not plan.refused
    convs = [layer for layer in plan.layers if layer.kind == "conv"]
    assert all(layer.patches for layer in convs)


def test_leaf_subgroup_in_any_order(float64):
    apply_fn, params, x = registry_network("lenet", 2)
    num_leaves = len(jax.tree.leaves(params))
    group = (num_leaves - 1, 3, 0, 7)
    got, _ = layerwise(apply_fn, params, x, group)
    assert_close(got, reference_jacobians(apply_fn, params, x, group))


def test_float32_matches_to_rounding():
    apply_fn, params, x = registry_network("resnet18")
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    x = x.astype(jnp.float32)
    got, plan = layerwise(apply_fn, params, x)
    assert plan.layers
    assert_close(got, reference_jacobians(apply_fn, params, x), rtol=1e-4)


class ConvChain(nn.Module):
    """Convs of the given configurations in sequence (tanh between), then a Dense head."""

    convs: tuple[dict, ...]
    num_outputs: int = 2

    @nn.compact
    def __call__(self, x):
        for conv in self.convs:
            x = jnp.tanh(nn.Conv(**conv)(x))
        return nn.Dense(self.num_outputs)(x.reshape(x.shape[0], -1))


CONV_CHAINS = {
    "strided_dilated_grouped_padded": (
        {"features": 4, "kernel_size": (3, 3), "strides": 2},
        {"features": 4, "kernel_size": (3, 2), "kernel_dilation": (2, 1)},
        {"features": 6, "kernel_size": (3, 3), "feature_group_count": 2},
        {"features": 4, "kernel_size": (3, 3), "padding": ((2, 0), (1, 2))},
        {"features": 4, "kernel_size": (3, 3), "padding": "CIRCULAR", "strides": 2},
        {"features": 3, "kernel_size": (2, 2), "use_bias": False, "strides": (2, 1)},
    ),
    "even_valid_reflect_depthwise": (
        {"features": 4, "kernel_size": (4, 4), "strides": 3},
        {"features": 4, "kernel_size": (2, 2), "padding": "REFLECT"},
        {"features": 8, "kernel_size": (2, 2), "feature_group_count": 4, "padding": "VALID"},
        {"features": 3, "kernel_size": (1, 1), "use_bias": False, "padding": 1},
    ),
}


@pytest.mark.parametrize("chain", sorted(CONV_CHAINS))
def test_conv_configurations_equal_jacrev(chain, float64):
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 9, 8, 4), jnp.float64)
    apply_fn, params = flax_network(ConvChain(CONV_CHAINS[chain]), x)
    got, plan = layerwise(apply_fn, params, x)
    assert_close(got, reference_jacobians(apply_fn, params, x))
    convs = [layer for layer in plan.layers if layer.kind == "conv"]
    assert len(convs) == len(CONV_CHAINS[chain])
    assert all(conv.patches for conv in convs)  # the patch formula was exercised, not the VJP


def test_conv_without_patch_formula_uses_own_vjp(float64):
    convs = (
        {"features": 3, "kernel_size": (3, 3), "input_dilation": 2, "padding": ((1, 1), (1, 1))},
        {"features": 2, "kernel_size": (2, 2), "mask": np.tril(np.ones((2, 2, 3, 2)))},
    )
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 5, 2), jnp.float64)
    apply_fn, params = flax_network(ConvChain(convs), x)
    got, plan = layerwise(apply_fn, params, x)
    assert_close(got, reference_jacobians(apply_fn, params, x))
    conv_layers = [layer for layer in plan.layers if layer.kind == "conv"]
    assert len(conv_layers) == 2 and not any(layer.patches for layer in conv_layers)


def test_conv_1d_on_tokens_equal_jacrev(float64):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = jnp.tanh(nn.Conv(3, (3,), strides=2)(x))  # [B, T, d] inputs
            h = jnp.tanh(nn.Dense(4)(h))  # Dense on tokens: Σ_t a_t ⊗ δ_t
            return nn.Dense(2)(h.reshape(h.shape[0], -1))

    x = jax.random.normal(jax.random.PRNGKey(1), (4, 7, 2), jnp.float64)
    apply_fn, params = flax_network(Net(), x)
    got, plan = layerwise(apply_fn, params, x)
    assert_close(got, reference_jacobians(apply_fn, params, x))
    assert len(plan.layers) == 3


class Tied(nn.Module):
    """A conv kernel also used in plain jnp (its sum scales the features)."""

    @nn.compact
    def __call__(self, x):
        conv = nn.Conv(3, (3, 3))
        h = jnp.tanh(conv(x))
        h = h * jnp.sum(conv.variables["params"]["kernel"] ** 2)
        return nn.Dense(2)(h.reshape(h.shape[0], -1))


class Twice(nn.Module):
    """One conv module (one kernel) applied twice."""

    @nn.compact
    def __call__(self, x):
        conv = nn.Conv(x.shape[-1], (3, 3))
        h = conv(jnp.tanh(conv(x)))
        return nn.Dense(2)(h.reshape(h.shape[0], -1))


class ScaledConv(nn.Conv):
    """A Conv subclass with its own ``__call__``."""

    def __call__(self, x):
        return 2.0 * super().__call__(x) + 1.0


class Subclass(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(ScaledConv(3, (3, 3))(x))
        return nn.Dense(2)(h.reshape(h.shape[0], -1))


class TrainModeBN(nn.Module):
    """BatchNorm with batch statistics: must not be covered by the running-average formula."""

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(3, (3, 3))(x)
        h = nn.BatchNorm(use_running_average=False)(h)
        return nn.Dense(2)(jnp.tanh(h).reshape(h.shape[0], -1))


class CallModeBN(nn.Module):
    """BatchNorm whose mode is given in the call: running averages, so it is covered."""

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(3, (3, 3))(x)
        h = nn.BatchNorm()(h, use_running_average=True)
        return nn.Dense(2)(jnp.tanh(h).reshape(h.shape[0], -1))


class Remat(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.remat(nn.Conv)(3, (3, 3))(x))
        return nn.Dense(2)(h.reshape(h.shape[0], -1))


ADVERSARIAL = {
    "tied": (Tied, "Conv_0", "also used outside"),
    "twice": (Twice, "Conv_0", "called 2 times"),
    "subclass": (Subclass, "ScaledConv_0", "subclass of Conv"),
    "train_mode_bn": (TrainModeBN, "BatchNorm_0", "batch statistics"),
    "remat": (Remat, None, None),
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_adversarial_models_fall_back_exactly(case, float64):
    cls, refused_name, reason = ADVERSARIAL[case]
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 6, 2), jnp.float64)
    apply_fn, params = flax_network(cls(), x, mutable_stats=case == "train_mode_bn")
    got, plan = layerwise(apply_fn, params, x)
    assert_close(got, reference_jacobians(apply_fn, params, x))
    covered = {layer.name for layer in plan.layers}
    assert "Dense_0" in covered  # the unaffected head is still covered
    assert not any(layer.kind == "conv" and layer.name != "Conv_0" for layer in plan.layers) or (
        case == "train_mode_bn"
    )
    if refused_name is not None:
        refused = dict(plan.refused)
        assert refused_name in refused and reason in refused[refused_name], plan.refused
        assert refused_name not in covered
    else:  # remat wraps the conv in a subclass: its leaves are not covered
        assert len(plan.covered) == 2


def test_batch_norm_mode_from_call_is_covered(float64):
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 6, 2), jnp.float64)
    apply_fn, params = flax_network(CallModeBN(), x)
    got, plan = layerwise(apply_fn, params, x)
    assert_close(got, reference_jacobians(apply_fn, params, x))
    assert "BatchNorm_0" in {layer.name for layer in plan.layers}


def test_inside_shard_map(float64):
    apply_fn, params, x = registry_network("lenet", 2)
    leaves, treedef = jax.tree.flatten(params)
    group = tuple(range(len(leaves)))
    plan = layerwise_plan(apply_fn, treedef, leaves, x.shape[1:])
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("batch",))

    def per_device(lv, xb):
        return layerwise_features(apply_fn, treedef, lv, group, xb, 2, plan=plan, axis_name="batch")

    fn = jax.jit(
        jax.shard_map(
            per_device, mesh=mesh, in_specs=(Spec(), Spec("batch")), out_specs=Spec("batch")
        )
    )
    got = [np.asarray(f) for f in fn(leaves, x)]
    assert_close(got, reference_jacobians(apply_fn, params, x))


def test_model_without_layers_falls_back(float64):
    def apply_fn(params, xb):
        return jnp.tanh(xb.reshape(xb.shape[0], -1) @ params["w"]) @ params["v"]

    params = {"w": jnp.ones((8, 3)) * 0.1, "v": jnp.arange(6.0).reshape(3, 2)}
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 2, 2, 2), jnp.float64)
    got, plan = layerwise(apply_fn, params, x)
    assert not plan.layers
    assert_close(got, reference_jacobians(apply_fn, params, x))
