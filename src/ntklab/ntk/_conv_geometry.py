"""The geometry of an ``nn.Conv``: its patch formula, output shape and per-example weight gradients.

Dimensions: B examples, C outputs, K kernel offsets (prod(kernel_size)), S output positions,
d_in/d_out input/output channels, g feature groups.

    config = conv_config(module, in_shape)           # None: a configuration the formulas skip
    patches = conv_patches(config, a)                 # a [B, 1, *spatial_in, d_in] -> [B, K, g, d_in/g, S]
    grads = conv_patch_grads(config, a, delta, True)  # XLA: {"kernel": [B, C, *k, d_in/g, d_out], "bias"}
    padded = host_conv_inputs(config, a)              # XLA: [B, d_in, *spatial_padded]
    kernel = host_conv_grads(config, padded, delta)   # NumPy: [B, C, *k, d_in/g, d_out], same sums

A convolution's per-example weight gradient is Σ_p patch_p ⊗ δ_p. :func:`conv_patch_grads` forms
the patches (K shifted copies of the input) and contracts them with δ in XLA.
:func:`host_conv_grads` never forms them: it stacks the input's shifts along every spatial axis
but the first (K / k_0 copies) and reads the first axis's shifts as row windows of that stack, so
each example's gradient is k_0 plain [K / k_0 · d_in, S] x [S, d_out] products with operands
that are views (LeNet's first convolution: 5 copies of the input instead of 25); XLA pads its
input channel-major first (:func:`host_conv_inputs`), so the copies move whole rows.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding


def conv_config(module: nn.Conv, in_shape: tuple[int, ...]) -> dict | None:
    """The patch formula's view of an ``nn.Conv``, or None for configurations it does not do.

    Args:
      module: the convolution (its attributes only).
      in_shape: its per-example input shape [1, *spatial_in, d_in].

    Returns:
      ``{"kernel_size", "strides", "dilation", "pads" [(lo, hi)] per spatial axis, "mode"
      ("constant", "wrap" or "reflect"), "groups"}``, or None (masked or unshared weights, a
      custom convolution, input dilation, mixed dtypes, a padding like ``CAUSAL``).
    """
    if (
        not module.shared_weights
        or module.mask is not None
        or module.conv_general_dilated is not None
        or module.conv_general_dilated_cls is not None
        or (module.dtype is not None and module.dtype != module.param_dtype)
    ):
        return None
    kernel_size = (
        (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
    )
    spatial = len(kernel_size)

    def broadcast(value: Any) -> tuple[int, ...]:
        value = 1 if value is None else value
        return (value,) * spatial if isinstance(value, int) else tuple(value)

    strides, input_dilation, dilation = map(
        broadcast, (module.strides, module.input_dilation, module.kernel_dilation)
    )
    if any(d != 1 for d in input_dilation) or len(in_shape) != spatial + 2:
        return None
    padding = canonicalize_padding(module.padding, spatial)
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation, strict=True)]
    mode = "constant"
    if padding in ("CIRCULAR", "REFLECT"):
        mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
        pads = [((k - 1) // 2, k // 2) for k in dilated]
    elif isinstance(padding, str):
        if padding not in ("SAME", "VALID", "SAME_LOWER"):
            return None  # e.g. CAUSAL
        pads = jax.lax.padtype_to_pads(in_shape[1:-1], dilated, strides, padding)
    else:
        pads = [tuple(p) for p in padding]
    return {
        "kernel_size": kernel_size,
        "strides": strides,
        "dilation": dilation,
        "pads": [tuple(int(v) for v in p) for p in pads],
        "mode": mode,
        "groups": module.feature_group_count,
    }


def conv_output_spatial(config: dict, spatial_in: tuple[int, ...]) -> tuple[int, ...]:
    """The convolution's output spatial shape for inputs of spatial shape ``spatial_in``."""
    out = []
    for size, (lo, hi), k, d, st in zip(
        spatial_in, config["pads"], config["kernel_size"], config["dilation"], config["strides"],
        strict=True,
    ):  # fmt: skip
        out.append((size + lo + hi - ((k - 1) * d + 1)) // st + 1)
    return tuple(out)


def conv_patches(config: dict, a: jax.Array) -> jax.Array:
    """Channel-major input patches of a convolution.

    Args:
      config: from :func:`conv_config`.
      a: layer inputs [B, 1, *spatial_in, d_in].

    Returns:
      [B, K, groups, d_in / groups, positions] (K kernel offsets, positions = prod(spatial_out)):
      patch_p of example b is ``patches[b, :, :, :, p]``, ordered like the kernel's
      [*kernel_size, d_in / groups] axes.
    """
    b, d_in, groups = a.shape[0], a.shape[-1], config["groups"]
    spatial_in = a.shape[2:-1]
    a = host_conv_inputs(config, a)  # [B, d_in, *spatial_padded]
    spatial_out = conv_output_spatial(config, spatial_in)
    slices = []
    for offset in itertools.product(*(range(k) for k in config["kernel_size"])):
        start = [0, 0] + [o * d for o, d in zip(offset, config["dilation"], strict=True)]
        limit = [b, d_in] + [
            s + (n - 1) * st + 1
            for s, n, st in zip(start[2:], spatial_out, config["strides"], strict=True)
        ]  # fmt: skip
        slices.append(jax.lax.slice(a, start, limit, [1, 1, *config["strides"]]))
    positions = math.prod(spatial_out)
    return jnp.stack(slices, axis=1).reshape(b, len(slices), groups, -1, positions)


def conv_patch_grads(
    config: dict, a: jax.Array, delta: jax.Array, use_bias: bool
) -> dict[str, jax.Array]:
    """Per-example conv weight gradients Σ_p patch_p ⊗ δ_p (traced, XLA).

    Args:
      config: from :func:`conv_config`.
      a: layer inputs [B, 1, *spatial_in, d_in].
      delta: output sensitivities [B, C, 1, *spatial_out, d_out].
      use_bias: also return the bias gradient Σ_p δ_p.

    Returns:
      ``{"kernel": [B, C, *kernel_size, d_in / groups, d_out], "bias": [B, C, d_out]}``.
    """
    b, c = delta.shape[:2]
    d_in, d_out, groups = a.shape[-1], delta.shape[-1], config["groups"]
    # Channel-major patches [B, K, g, d_in / g, positions], so each example's product is a plain
    # [K·d_in, positions] x [positions, d_out] GEMM writing the kernel layout directly.
    patches = conv_patches(config, a)
    positions = patches.shape[-1]
    delta = delta.reshape(b, c, positions, groups, d_out // groups)
    kernel = jnp.einsum(
        "bkgip,bcpgo->bckigo", patches, delta, precision=jax.lax.Precision.HIGHEST
    ).reshape(b, c, *config["kernel_size"], d_in // groups, d_out)
    grads = {"kernel": kernel}
    if use_bias:
        grads["bias"] = delta.sum(axis=2).reshape(b, c, d_out)
    return grads


def host_conv_inputs(config: dict, a: jax.Array) -> jax.Array:
    """A convolution's inputs as :func:`host_conv_grads` and :func:`conv_patches` read them (XLA).

    Args:
      config: from :func:`conv_config`.
      a: layer inputs [B, 1, *spatial_in, d_in].

    Returns:
      the inputs channel-major and padded as the convolution pads them: [B, d_in,
      *spatial_padded] (negative padding crops).
    """
    a = jnp.moveaxis(a[:, 0], -1, 1)  # [B, d_in, *spatial_in]
    pads = [(0, 0), (0, 0), *config["pads"]]
    if any(p != (0, 0) for p in pads):
        if config["mode"] == "constant":
            a = jax.lax.pad(a, jnp.zeros((), a.dtype), [(lo, hi, 0) for lo, hi in pads])
        else:
            a = jnp.pad(a, pads, mode=config["mode"])
    return a


def host_conv_grads(config: dict, padded: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Per-example conv kernel gradients Σ_p patch_p ⊗ δ_p on the host with NumPy's BLAS,
    without forming the patches.

    The shifts of the spatial axes after the first are stacked once (K / k_0 strided copies of
    the padded input, channel-major so each copy moves whole rows); the first axis's offset k is
    then the window of rows d_0·k + s_0·y of that stack, a view (a copy for strides s_0 > 1),
    and each example's gradient for offset k is one [K / k_0 · d_in/g, S] x [S, d_out/g]
    product per feature group.

    Args:
      config: from :func:`conv_config`.
      padded: the inputs from :func:`host_conv_inputs` [B, d_in, *spatial_padded].
      delta: output sensitivities [B, C, 1, *spatial_out, d_out].

    Returns:
      the kernel gradients [B, C, *kernel_size, d_in / groups, d_out] (the sums of
      :func:`conv_patch_grads`, in another order), in the inputs' dtype.
    """
    b, c, d_in, d_out = padded.shape[0], delta.shape[1], padded.shape[1], delta.shape[-1]
    groups, sizes, step = config["groups"], config["kernel_size"], config["strides"][0]
    d_in_g, d_out_g = d_in // groups, d_out // groups
    spatial_out = tuple(delta.shape[3:-1])
    stack = _shift_stack(config, padded, spatial_out)  # [B, K', d_in, H', *spatial_out[1:]]
    shifts, positions = stack.shape[1], math.prod(spatial_out)
    sens = delta.reshape(b, c, positions, d_out)
    kernel = np.empty((b, c, sizes[0], shifts, d_in_g, d_out), np.result_type(padded, delta))
    for k in range(sizes[0]):
        start = k * config["dilation"][0]
        rows = stack[:, :, :, start : start + step * (spatial_out[0] - 1) + 1 : step]
        for g in range(groups):
            inputs = rows[:, :, g * d_in_g : (g + 1) * d_in_g].reshape(b, 1, -1, positions)
            outputs = sens[..., g * d_out_g : (g + 1) * d_out_g]
            kernel[:, :, k, :, :, g * d_out_g : (g + 1) * d_out_g] = np.matmul(
                inputs, outputs
            ).reshape(b, c, shifts, d_in_g, d_out_g)
    return kernel.reshape(b, c, *sizes, d_in_g, d_out).astype(padded.dtype, copy=False)


def _shift_stack(config: dict, padded: np.ndarray, spatial_out: tuple[int, ...]) -> np.ndarray:
    """[B, K', d_in, H', *spatial_out[1:]]: the padded inputs' strided shifts along every
    spatial axis but the first, one per kernel offset of those axes (K' = prod(kernel_size[1:]))."""
    rest = list(zip(config["kernel_size"][1:], config["dilation"][1:], config["strides"][1:],
                    spatial_out[1:], strict=True))  # fmt: skip
    offsets = list(itertools.product(*(range(k) for k, _, _, _ in rest)))
    b, d_in, first = padded.shape[:3]
    stack = np.empty((b, len(offsets), d_in, first, *spatial_out[1:]), padded.dtype)
    for position, offset in enumerate(offsets):
        index = [slice(None), slice(None), slice(None)]
        for o, (_, d, s, n) in zip(offset, rest, strict=True):
            index.append(slice(o * d, o * d + s * (n - 1) + 1, s))
        stack[:, position] = padded[tuple(index)]
    return stack
