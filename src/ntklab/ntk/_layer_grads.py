"""One covered layer's per-example parameter gradients from its inputs and output sensitivities.

Dimensions: B examples, C outputs; a layer's inputs a [B, 1, ...] (a batch of one per example)
and sensitivities δ [B, C, 1, ...] (∂f_c/∂ of its output).

    y = apply_layer(layer, params, others, a)               # the layer's own computation
    grads = weight_grads(layer, params, others, a, delta)   # {name: [B, C, *param_shape]}

A convolution whose patch formula was verified (``layer.patches``) uses
``_conv_geometry.conv_patch_grads``; every other layer its own VJP, vmapped over examples and
outputs. ``layer`` is a ``_layerwise_plan.Layer``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax

from ntklab.ntk._conv_geometry import conv_config, conv_patch_grads

if TYPE_CHECKING:
    from ntklab.ntk._layerwise_plan import Layer


def apply_layer(layer: Layer, params: dict, others: dict, x: jax.Array) -> jax.Array:
    """The layer's own computation on ``x`` with the given parameters (a clone of the module).

    Args:
      layer: the covered layer call.
      params: its parameters by name.
      others: its other variable collections (e.g. ``batch_stats``).
      x: its input [1, ...].

    Returns:
      its output [1, ...].
    """
    return layer.module.apply({"params": params, **others}, x, **dict(layer.kwargs))


def own_vjp_grads(
    layer: Layer, params: dict, others: dict, a: jax.Array, delta: jax.Array
) -> dict[str, jax.Array]:
    """Per-example parameter gradients by the layer's own VJP, vmapped over examples and outputs.

    Args:
      layer: the covered layer call.
      params: its parameters by name; others: its other variable collections.
      a: layer inputs [B, 1, ...]; delta: sensitivities [B, C, 1, ...].

    Returns:
      per parameter name its gradients [B, C, *param_shape].
    """

    def one(example: jax.Array, cotangent: jax.Array) -> dict:
        _, pullback = jax.vjp(lambda p: apply_layer(layer, p, others, example), params)
        return pullback(cotangent)[0]

    return jax.vmap(jax.vmap(one, in_axes=(None, 0)))(a, delta)


def weight_grads(
    layer: Layer, params: dict, others: dict, a: jax.Array, delta: jax.Array
) -> dict[str, jax.Array]:
    """Per-example parameter gradients: the verified patch formula or the layer's own VJP.

    Args:
      layer: the covered layer call.
      params: its parameters by name; others: its other variable collections.
      a: layer inputs [B, 1, ...]; delta: sensitivities [B, C, 1, ...].

    Returns:
      per parameter name its gradients [B, C, *param_shape], in the parameter's dtype.
    """
    if layer.patches:
        config = conv_config(layer.module, tuple(a.shape[1:]))
        grads = conv_patch_grads(config, a, delta, "bias" in params)
        return {name: grads[name].astype(params[name].dtype) for name in params}
    return own_vjp_grads(layer, params, others, a, delta)
