"""One covered layer's per-example parameter gradients from its inputs and output sensitivities.

Dimensions: B examples, C outputs; a layer's inputs a [B, 1, ...] (a batch of one per example)
and sensitivities δ [B, C, 1, ...] (∂f_c/∂ of its output).

    y = apply_layer(layer, params, others, a)               # the layer's own computation
    grads = weight_grads(layer, params, others, a, delta)   # {name: [B, C, *param_shape]}

A convolution whose patch formula was verified (``layer.patches``) uses
``_conv_geometry.conv_patch_grads``; every other layer its own VJP, vmapped over examples and
outputs. ``Layer`` (defined here) describes one covered layer call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from ntklab.ntk._conv_geometry import conv_config, conv_patch_grads


@dataclasses.dataclass(frozen=True, eq=False)
class Layer:
    """One covered layer call.

    Attributes:
      path: the module's path (as seen by method interceptors).
      kind: ``"dense"``, ``"conv"`` or ``"batch_norm"``.
      params: (parameter name, leaf index) per parameter of the module.
      in_shape: per-example input shape, with the leading batch axis of one.
      out_shape: per-example output shape, with the leading batch axis of one.
      out_dtype: the output's dtype.
      module: an unbound clone of the module (same attributes), for its own VJP.
      kwargs: the call's static keyword arguments (and extra positional ones, by name).
      patches: whether the convolution's weight gradient uses the verified patch formula.
      host: whether the host formula (``_conv_geometry.host_conv_grads``) matched too.
    """

    path: tuple[str, ...]
    kind: str
    params: tuple[tuple[str, int], ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    out_dtype: Any
    module: nn.Module
    kwargs: tuple[tuple[str, Any], ...]
    patches: bool = False
    host: bool = False

    @property
    def name(self) -> str:
        return "/".join(self.path) or "<root>"

    @property
    def leaf_indices(self) -> tuple[int, ...]:
        return tuple(index for _, index in self.params)


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
