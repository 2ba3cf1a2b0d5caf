"""The Jacobian features of one block of examples, as the feature pass hands them on."""

from __future__ import annotations

from typing import NamedTuple

import jax


class Features(NamedTuple):
    """Jacobian features of one block of examples (a pytree).

    Attributes:
      leaves: per unfactored leaf its Jacobian [B, C, P_leaf], or one projected [B, C, K].
      inputs: per factored Dense layer its inputs a [B, d_in].
      sensitivities: per factored Dense layer ∂f/∂y δ [B, C, d_out].
      patches: per factored convolution its input patches [B, S, F].
      patch_sensitivities: per factored convolution δ [B, C, S, d_out].
      host_factors: per convolution whose gradients the host forms (``_host_convs``) its inputs
        padded channel-major [B, d_in, *spatial_padded], sensitivities [B, C, 1, *spatial_out,
        d_out] and bias gradients [B, C, d_out]; empty once the host has turned them into
        leaves.
    """

    leaves: tuple[jax.Array, ...]
    inputs: tuple[jax.Array, ...] = ()
    sensitivities: tuple[jax.Array, ...] = ()
    patches: tuple[jax.Array, ...] = ()
    patch_sensitivities: tuple[jax.Array, ...] = ()
    host_factors: tuple[tuple[jax.Array, jax.Array], ...] = ()
