"""Factored convolutions: a convolution's kernel term from its input patches and sensitivities.

Dimensions: B examples (B1 rows, B2 columns), C outputs, S output positions, F = K·d_in the
patch size (K kernel offsets), d_out output channels.

A convolution's per-example weight gradient is Σ_p patch_p ⊗ δ_p, so its kernel term is

    Θ_l[i, j, c, d] = Σ_{p,q} (patch_ip · patch_jq + [bias]) (δ_icp · δ_jdq),

which costs S²·(F + c·d_out) per pair of examples instead of c·F·d_out for the contracted
Jacobian (c = C, or C² for ``output="full"``), and never forms the layer's [B, C, F·d_out]
Jacobian. It pays where the output has few positions: ResNet-18's last stage (4×4 positions,
F = 4,608, d_out = 512) at 0.56x the FLOPs and 1/32 of the memory; the earlier stages (S ≥ 64)
stay in the Jacobian.

    convs = conv_factors(plan, leaves, output, num_outputs)       # which layers, logged
    patches, sens = patch_factors(config, a, delta)               # [B, S, F], [B, C, S, d_out]
    block = conv_block(pr, pc, sr, sc, bias, output, dot)         # XLA, [B1, B2] for trace
    block = host_conv_block(pr, pc, sr, sc, bias, output)         # NumPy's BLAS, same sums

Only convolutions whose patch formula ``_layerwise_plan`` proved exact (type exactly ``nn.Conv``,
called once, parameters used only by that call, formula matched on a probe) with one feature
group are factored.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntklab.ntk._conv_geometry import conv_patches
from ntklab.ntk._layerwise_plan import Layer, LayerwisePlan

logger = logging.getLogger(__name__)

FACTOR_MAX_RATIO = 1.0
"""A convolution is factored when its factored contraction costs at most this fraction of the
FLOPs of contracting its Jacobian (the Jacobian's formation and memory traffic come on top)."""
MAX_INTERMEDIATE_ELEMENTS = 1 << 24
"""Largest sensitivity Gram [rows·S, B2·S] (times C² for ``full``) formed at once; rows are
processed in chunks below it (64 MiB in float32)."""


@dataclasses.dataclass(frozen=True)
class ConvFactor:
    """A convolution proven factorable, with the sizes of its factors."""

    path: tuple[str, ...]  # the module's path, as seen by method interceptors
    kernel: int  # leaf index of the kernel [*kernel_size, d_in, d_out]
    bias: int | None  # leaf index of the bias [d_out]
    positions: int  # S, output positions per example
    patch_dim: int  # F = prod(kernel_size)·d_in
    d_out: int

    @property
    def leaf_indices(self) -> tuple[int, ...]:
        return (self.kernel,) if self.bias is None else (self.kernel, self.bias)

    @property
    def name(self) -> str:
        return "/".join(self.path) or "<root>"

    def factor_size(self, num_outputs: int) -> int:
        """Floats per example of its factors: S·(F + C·d_out)."""
        return self.positions * (self.patch_dim + num_outputs * self.d_out)

    def contraction_size(self, per_output: int) -> int:
        """Multiply-adds per pair of examples of the factored term (c = per_output)."""
        return self.positions**2 * (self.patch_dim + per_output * (self.d_out + 1))

    def jacobian_size(self, per_output: int) -> int:
        """Multiply-adds per pair of examples of contracting its Jacobian instead."""
        return per_output * (self.patch_dim + (self.bias is not None)) * self.d_out


def conv_factors(
    plan: LayerwisePlan, leaves: list, output: str, num_outputs: int
) -> tuple[ConvFactor, ...]:
    """The covered convolutions of ``plan`` that are cheaper factored, in call order (logged)."""
    per_output = num_outputs**2 if output == "full" else num_outputs
    chosen, skipped = [], []
    for layer in plan.layers:
        factor = _factor_of(layer, leaves)
        if factor is None:
            continue
        ratio = factor.contraction_size(per_output) / factor.jacobian_size(per_output)
        (chosen if ratio <= FACTOR_MAX_RATIO else skipped).append((factor, ratio))
    if chosen:
        logger.info(
            "eNTK structure: factored %d convolution(s): %s",
            len(chosen),
            ", ".join(f"{f.name} ({f.positions} positions, {r:.2f}x)" for f, r in chosen),
        )
    if skipped:
        logger.info(
            "eNTK structure: %d convolution(s) kept as Jacobians (factored they would cost "
            "%.2fx-%.2fx the FLOPs)",
            len(skipped),
            min(r for _, r in skipped),
            max(r for _, r in skipped),
        )
    return tuple(factor for factor, _ in chosen)


def _factor_of(layer: Layer, leaves: list) -> ConvFactor | None:
    if layer.kind != "conv" or not layer.patches or layer.module.feature_group_count != 1:
        return None
    names = dict(layer.params)
    if set(names) - {"kernel", "bias"}:
        return None
    kernel_shape = tuple(leaves[names["kernel"]].shape)
    return ConvFactor(
        path=layer.path,
        kernel=names["kernel"],
        bias=names.get("bias"),
        positions=math.prod(layer.out_shape[1:-1]),
        patch_dim=math.prod(kernel_shape[:-1]),
        d_out=kernel_shape[-1],
    )


def patch_factors(config: dict, a: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A convolution's factors: inputs a [B, 1, *spatial_in, d_in] and sensitivities δ
    [B, C, 1, *spatial_out, d_out] -> patches [B, S, F] and δ [B, C, S, d_out]."""
    b, c, d_out = delta.shape[0], delta.shape[1], delta.shape[-1]
    patches = conv_patches(config, a)  # [B, K, 1, d_in, S]
    positions = patches.shape[-1]
    patches = jnp.swapaxes(patches.reshape(b, -1, positions), 1, 2)
    return patches, delta.reshape(b, c, positions, d_out)


def _row_chunk(b1: int, b2: int, positions: int, per_row: int) -> int:
    """Example rows per chunk so the sensitivity Gram stays under the intermediate limit."""
    per_example = positions * positions * b2 * per_row
    return max(1, min(b1, MAX_INTERMEDIATE_ELEMENTS // max(per_example, 1)))


def conv_block(
    pr: jax.Array,
    pc: jax.Array,
    sr: jax.Array,
    sc: jax.Array,
    bias: bool,
    output: str,
    dot: Callable[[jax.Array, jax.Array, str], jax.Array],
) -> jax.Array:
    """The factored term of one block pair (traced; ``dot(a, b, spec)`` does the products).

    Args:
      pr, pc: patches of the rows [B1, S, F] and columns [B2, S, F].
      sr, sc: sensitivities [B1, C, S, d_out] and [B2, C, S, d_out].
      bias: whether the layer has a bias (adds 1 to every patch product).
      output: ``"trace"`` -> [B1, B2], ``"diagonal"`` -> [B1, B2, C], ``"full"`` ->
        [B1, B2, C, C].
    """
    b1, c, s = sr.shape[0], sr.shape[1], sr.shape[2]
    b2 = sc.shape[0]
    hi = jax.lax.Precision.HIGHEST
    step = _row_chunk(b1, b2, s, c * c if output == "full" else c)
    parts = []
    for start in range(0, b1, step):
        rows = slice(start, min(start + step, b1))
        patch_gram = dot(pr[rows], pc, "ipf,jqf->ipjq") + (1.0 if bias else 0.0)
        if output == "trace":
            sens = dot(sr[rows], sc, "icpe,jcqe->ipjq")
            parts.append((patch_gram * sens).sum(axis=(1, 3)))
        elif output == "diagonal":
            sens = dot(sr[rows], sc, "icpe,jcqe->icpjq")
            parts.append(jnp.einsum("ipjq,icpjq->ijc", patch_gram, sens, precision=hi))
        else:
            sens = dot(sr[rows], sc, "icpe,jdqe->icpjdq")
            parts.append(jnp.einsum("ipjq,icpjdq->ijcd", patch_gram, sens, precision=hi))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def host_conv_block(
    pr: np.ndarray, pc: np.ndarray, sr: np.ndarray, sc: np.ndarray, bias: bool, output: str
) -> np.ndarray:
    """:func:`conv_block` for ``trace`` and ``full`` with NumPy's BLAS (one CPU device)."""
    b1, c, s, e = sr.shape
    b2, f = pc.shape[0], pc.shape[2]
    patch_cols = pc.reshape(b2 * s, f)
    if output == "trace":  # rows (i, p), features (c, e)
        sens_rows = np.ascontiguousarray(sr.transpose(0, 2, 1, 3)).reshape(b1 * s, c * e)
        sens_cols = np.ascontiguousarray(sc.transpose(0, 2, 1, 3)).reshape(b2 * s, c * e)
        block = np.empty((b1, b2), np.result_type(pr, sr))
    else:  # rows (i, c, p), features e
        sens_rows, sens_cols = sr.reshape(b1 * c * s, e), sc.reshape(b2 * c * s, e)
        block = np.empty((b1, b2, c, c), np.result_type(pr, sr))
    step = _row_chunk(b1, b2, s, c * c if output == "full" else c)
    for start in range(0, b1, step):
        stop = min(start + step, b1)
        patch_gram = pr[start:stop].reshape(-1, f) @ patch_cols.T
        if bias:
            patch_gram += 1.0
        if output == "trace":
            gram = sens_rows[start * s : stop * s] @ sens_cols.T
            gram *= patch_gram
            block[start:stop] = gram.reshape(stop - start, s, b2, s).sum(axis=(1, 3))
        else:
            gram = sens_rows[start * c * s : stop * c * s] @ sens_cols.T
            gram = gram.reshape(stop - start, c, s, b2, c, s)
            gram *= patch_gram.reshape(stop - start, 1, s, b2, 1, s)
            block[start:stop] = gram.sum(axis=(2, 5)).transpose(0, 2, 1, 3)
    return block
