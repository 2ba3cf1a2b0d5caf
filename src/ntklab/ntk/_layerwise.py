"""Per-example Jacobians of Dense/Conv/BatchNorm networks from one batched backward pass.

Dimensions: B examples per block, C outputs, P_leaf parameters of one leaf, H/W spatial sizes,
d_in/d_out a layer's input/output channels, K kernel offsets (kh·kw).

    plan = layerwise_plan(apply_fn, treedef, leaves, x.shape[1:])   # _layerwise_plan, not traced
    feats = layerwise_features(apply_fn, treedef, leaves, group, x, C, plan=plan)
    # x [B, ...] -> one per-example Jacobian [B, C, P_leaf] per leaf of ``group``
    jacobians, factors = layerwise_parts(..., factored=paths)   # + (inputs, δ) per path

``jax.vmap(jax.jacrev(f))`` over all parameters makes XLA run every layer's weight gradient once
per example (a convolution's becomes a grouped convolution over the examples, slow on CPUs).
Here, as in ``vmap(jacrev)``, every example is its own batch of one (so the result is the
Jacobian of ``apply_fn(params, x_i[None])[0]`` whatever the model does across a batch), but the
backward pass is taken only with respect to a zero perturbation added to the output of every
covered layer: it yields each layer's per-example output sensitivities δ [B, C, ...] and needs
only input gradients. Each covered layer's per-example weight gradient is then formed from its
recorded input and δ (``_layer_grads``): a convolution's as one batched matrix product of its
input patches with δ (Σ_p patch_p ⊗ δ_p), a Dense or BatchNorm layer's by the layer's own VJP
vmapped over examples and outputs (a_i ⊗ δ_i; Σ_p x̂_p δ_p and Σ_p δ_p). Layers named in
``factored`` return their inputs and δ instead (factored Dense layers and convolutions, and
convolutions whose gradients the host forms).

Which layers are covered, and the proof that each is exact, is ``_layerwise_plan``'s job. Leaves
not covered are differentiated by ``jax.jacrev`` in the same pass (exact for any model).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ntklab.ntk._layer_grads import weight_grads
from ntklab.ntk._layerwise_plan import Layer, LayerwisePlan
from ntklab.types import ApplyFn


def layerwise_features(
    apply_fn: ApplyFn,
    treedef: Any,
    leaves: list[jax.Array],
    group: tuple[int, ...],
    x: jax.Array,
    num_outputs: int,
    *,
    plan: LayerwisePlan,
    axis_name: str | None = None,
) -> tuple[jax.Array, ...]:
    """Per-example Jacobians of the outputs wrt the leaves ``group``: one [B, C, P_leaf] each
    (see :func:`layerwise_parts`, of which this is the part without factored layers)."""
    jacobians, _ = layerwise_parts(
        apply_fn, treedef, leaves, group, x, num_outputs, plan=plan, axis_name=axis_name
    )
    return jacobians


def layerwise_parts(
    apply_fn: ApplyFn,
    treedef: Any,
    leaves: list[jax.Array],
    group: tuple[int, ...],
    x: jax.Array,
    num_outputs: int,
    *,
    plan: LayerwisePlan,
    axis_name: str | None = None,
    factored: tuple[tuple[str, ...], ...] = (),
) -> tuple[tuple[jax.Array, ...], tuple[tuple[jax.Array, jax.Array], ...]]:
    """Per-example Jacobians of the outputs wrt the leaves ``group``: one [B, C, P_leaf] each,
    and per covered layer path in ``factored`` its inputs and sensitivities instead of a Jacobian.

    Same contract as ``vmap(jacrev)`` per leaf (jit- and ``shard_map``-compatible): leaves of
    covered layers come from one backward pass to the layer outputs plus per-layer formulas,
    the others from ``jax.jacrev`` in the same pass.

    Args:
      apply_fn: ``apply_fn(params, x[B, ...]) -> [B, C]``.
      treedef: the parameters' tree structure; ``leaves`` its leaves.
      group: indices of the leaves whose Jacobians are returned, in that order.
      x: a block of examples [B, ...].
      num_outputs: C.
      plan: from :func:`layerwise_plan` for the same model and example shape.
      axis_name: inside ``shard_map``, the batch axis: the replicated leaves are marked
        varying (``jax.lax.pcast``) so derivatives are not summed over devices.
      factored: paths of covered layers (e.g. Dense layers proven factorable elsewhere) whose
        per-example inputs and output sensitivities are returned instead of their Jacobians;
        their leaves must not be in ``group``.

    Returns:
      ``(jacobians, factors)``: one [B, C, P_leaf] array per leaf of ``group``, and per path of
      ``factored`` the pair (inputs [B, *in_shape], sensitivities [B, C, *out_shape]) with the
      layer's per-example shapes (leading axis of one) as recorded in the plan.

    Raises:
      RuntimeError: if a planned layer is not met while tracing (the plan is for another model),
        or a path of ``factored`` is not a covered layer.
    """
    group = tuple(group)
    members = set(group)
    by_factored = {path: k for k, path in enumerate(factored)}
    if set(by_factored) - {layer.path for layer in plan.layers}:
        raise RuntimeError("layerwise plan: a factored layer is not a covered layer")
    active = [
        layer
        for layer in plan.layers
        if members & set(layer.leaf_indices) or layer.path in by_factored
    ]
    covered = {i for layer in active for i in layer.leaf_indices}
    rest = [i for i in group if i not in covered]

    def vary(value: jax.Array) -> jax.Array:
        return value if axis_name is None else jax.lax.pcast(value, axis_name, to="varying")

    others: dict[int, dict] = {}
    outputs = _perturbed_outputs(apply_fn, treedef, leaves, rest, active, others)
    rest_leaves = [vary(leaves[i]) for i in rest]
    perturbations = [vary(jnp.zeros(layer.out_shape, layer.out_dtype)) for layer in active]
    jacobian = jax.jacrev(outputs, argnums=(0, 1), has_aux=True)
    (rest_jacobians, deltas), inputs = jax.vmap(jacobian, in_axes=(None, None, 0))(
        rest_leaves, perturbations, x
    )
    b = x.shape[0]
    features = {
        i: jac.reshape(b, num_outputs, -1) for i, jac in zip(rest, rest_jacobians, strict=True)
    }
    factors: list = [None] * len(factored)
    for k, layer in enumerate(active):
        if layer.path in by_factored:
            factors[by_factored[layer.path]] = (inputs[k], deltas[k])
            continue
        params = {name: vary(leaves[i]) for name, i in layer.params}
        grads = weight_grads(layer, params, others.get(k, {}), inputs[k], deltas[k])
        for name, i in layer.params:
            if i in members:
                features[i] = grads[name].reshape(b, num_outputs, -1)
    return tuple(features[i] for i in group), tuple(factors)


def _perturbed_outputs(
    apply_fn: ApplyFn,
    treedef: Any,
    leaves: list[jax.Array],
    rest: list[int],
    active: list[Layer],
    others: dict[int, dict],
):
    """``outputs(rest_leaves, perturbations, example) -> (f [C], inputs per active layer)``:
    one example's outputs with ``perturbations[k]`` added to active layer k's output and the
    leaves ``rest`` replaced; each layer's other variable collections are recorded in ``others``.
    """
    by_path = {layer.path: k for k, layer in enumerate(active)}

    def outputs(rest_leaves: list, perturbations: list, example: jax.Array):
        merged = list(leaves)
        for position, index in enumerate(rest):
            merged[index] = rest_leaves[position]
        inputs: dict[int, jax.Array] = {}

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            k = by_path.get(module.path) if context.method_name == "__call__" else None
            if k is None or type(module) is not type(active[k].module):
                return next_fun(*args, **kwargs)
            params = module.variables.get("params", {})
            if any(params.get(name) is not merged[i] for name, i in active[k].params):
                raise RuntimeError(f"layerwise plan does not match layer {active[k].name}")
            others.setdefault(k, {c: v for c, v in module.variables.items() if c != "params"})
            inputs[k] = args[0]
            return next_fun(*args, **kwargs) + perturbations[k]

        with nn.intercept_methods(interceptor):
            out = apply_fn(jax.tree.unflatten(treedef, merged), example[None])[0]
        if len(inputs) != len(active):
            missing = [layer.name for k, layer in enumerate(active) if k not in inputs]
            raise RuntimeError(f"layerwise plan: layer(s) {', '.join(missing)} not called")
        return out, [inputs[k] for k in range(len(active))]

    return outputs
