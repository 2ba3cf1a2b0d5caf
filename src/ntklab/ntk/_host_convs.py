"""Convolutions whose per-example weight gradients the host forms, beside XLA's next block.

Dimensions: B examples per block, C outputs, P_leaf parameters of one leaf.

    convs = host_conv_layers(layerwise_plan)        # covered convolutions with a verified formula
    feats = finish(feats, group, convs)              # Features.host_factors -> Jacobian leaves

On one CPU device (host contraction), a model whose convolutions hold few of its parameters
(LeNet: 2 %) pays most of its feature time for the convolutions' per-example weight gradients,
which ``vmap(jacrev)`` makes XLA:CPU run as grouped convolutions over the examples. Here the
feature pass is the layerwise one (``_layerwise``: one backward pass to the layer outputs, Dense
layers factored) and returns each such convolution's inputs and sensitivities; the host turns
them into Jacobians with NumPy's BLAS (``_conv_geometry.host_conv_grads``, no patches formed)
while XLA computes the next block's features. A convolution is used here only when the
layerwise plan covers it (its leaves reach the outputs only through its one call), its patch
formula applies and both the XLA and the host formula matched the layer's own VJP on a probe.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ntklab.ntk._conv_geometry import conv_config, host_conv_grads, host_conv_inputs
from ntklab.ntk._feature_block import Features
from ntklab.ntk._layerwise_plan import LayerwisePlan


@dataclasses.dataclass(frozen=True)
class HostConv:
    """A covered convolution whose per-example weight gradients the host forms.

    Attributes:
      path: the module's path (as seen by method interceptors).
      params: (parameter name, leaf index) per parameter (``kernel``, optionally ``bias``).
      config: its ``_conv_geometry.conv_config``, as sorted (key, value) pairs (hashable).
    """

    path: tuple[str, ...]
    params: tuple[tuple[str, int], ...]
    config: tuple[tuple[str, object], ...]

    @property
    def leaf_indices(self) -> tuple[int, ...]:
        return tuple(index for _, index in self.params)

    @property
    def name(self) -> str:
        return "/".join(self.path) or "<root>"

    def grads(
        self, padded: np.ndarray, delta: np.ndarray, bias: np.ndarray
    ) -> dict[int, np.ndarray]:
        """Per leaf index its per-example Jacobians [B, C, P_leaf].

        Args:
          padded: the layer's inputs from ``_conv_geometry.host_conv_inputs`` [B, d_in, ...].
          delta: its sensitivities [B, C, 1, *spatial_out, d_out].
          bias: Σ_p δ_p [B, C, d_out] (used if the layer has a bias).
        """
        config = {key: list(value) if key == "pads" else value for key, value in self.config}
        names = dict(self.params)
        b, c = delta.shape[:2]
        grads = {names["kernel"]: host_conv_grads(config, padded, delta).reshape(b, c, -1)}
        if "bias" in names:
            grads[names["bias"]] = bias
        return grads

    def prepare(self, a: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """XLA's part (traced): the inputs a [B, 1, *spatial_in, d_in] padded channel-major,
        δ [B, C, 1, *spatial_out, d_out] as it is, and Σ_p δ_p [B, C, d_out]."""
        config = {key: list(value) if key == "pads" else value for key, value in self.config}
        spatial = tuple(range(2, delta.ndim - 1))
        return host_conv_inputs(config, a), delta, delta.sum(axis=spatial)


def host_conv_layers(plan: LayerwisePlan) -> tuple[HostConv, ...]:
    """The covered convolutions of ``plan`` whose patch and host formulas matched their VJP."""
    convs = []
    for layer in plan.layers:
        if layer.kind != "conv" or not (layer.patches and layer.host):
            continue
        config = conv_config(layer.module, layer.in_shape)
        frozen = tuple(
            (key, tuple(map(tuple, value)) if key == "pads" else value)
            for key, value in sorted(config.items())
        )
        convs.append(HostConv(path=layer.path, params=layer.params, config=frozen))
    return tuple(convs)


def finish(feats: Features, group: tuple[int, ...], convs: tuple[HostConv, ...]) -> Features:
    """``feats`` with the host convolutions' Jacobians formed and put in ``group`` order.

    Args:
      feats: a block's features whose ``leaves`` hold the Jacobians of ``group`` without the
        leaves of ``convs``, and whose ``host_factors`` hold ``convs``' prepared inputs,
        sensitivities and bias gradients (:meth:`HostConv.prepare`).
      group: the leaf indices of the finished ``leaves``, in order.
      convs: the host convolutions, in the order of ``host_factors``.

    Returns:
      the features with ``leaves`` [B, C, P_leaf] per leaf of ``group`` (NumPy arrays for the
      host convolutions' leaves) and no ``host_factors``.
    """
    if not feats.host_factors:
        return feats
    on_host: dict[int, np.ndarray] = {}
    for conv, factors in zip(convs, feats.host_factors, strict=True):
        on_host.update(conv.grads(*(np.asarray(factor) for factor in factors)))
    pieces = iter(feats.leaves)
    leaves = tuple(on_host[i] if i in on_host else next(pieces) for i in group)
    return feats._replace(leaves=leaves, host_factors=())
