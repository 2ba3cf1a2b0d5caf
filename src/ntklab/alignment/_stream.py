"""Alignment measured in one streamed pass over the kernel's blocks, per layer if asked.

Dimensions: N examples (N_train first, then N_test), k vectors, L layers, b1 × b2 a block.

    measurement = measure_kernel(apply_fn, params, x, vectors, num_train=n, by_layer=True,
                                 reference=reference)
    measurement.quotients["train"]      # [k] φᵀK_trφ / ‖φ_tr‖²
    measurement.layer_quotients         # [L, k] φᵀK_lφ / ‖φ‖² (they sum to quotients["all"])
    measurement.kernel_distance         # 1 − ⟨K_0, K⟩_F / (‖K_0‖_F ‖K‖_F)

The kernel K is never held: every block pair (rows, cols) from :func:`ntklab.ntk.kernel_blocks`
adds its share to φᵀKφ (both halves of an off-diagonal pair: weight 2), to each layer's φᵀK_lφ,
to ‖K‖_F² and to ⟨K_0, K⟩_F, then is dropped. The cost is one kernel pass plus O(k·b1·b2) per
block (O(L·k·b1·b2) by layer).

The distance needs K_0 (:class:`Reference`): either the saved kernel (``kernel.npy``, read block
by block: exact) or the top eigenpairs, K_0 ≈ Σ_i λ_i φ_i φ_iᵀ, whose inner product with K is
Σ_i λ_i φ_iᵀKφ_i (read off the measured quotients of the same eigenvectors). Then
|⟨K_0 − K_0^(k), K⟩| ≤ ‖K_0 − K_0^(k)‖_F ‖K‖_F with ‖K_0 − K_0^(k)‖_F² = ‖K_0‖_F² − Σ_i λ_i²,
so the distance is off by at most ``Reference.error_bound`` = √(1 − Σ_i λ_i² / ‖K_0‖_F²).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import jax
import numpy as np

from ntklab import threads
from ntklab.ntk import kernel_blocks, layer_names
from ntklab.types import ApplyFn, PyTree

logger = logging.getLogger(__name__)

__all__ = ["Measurement", "Reference", "measure_kernel"]

SPLITS = ("train", "test", "all")


@dataclasses.dataclass(frozen=True)
class Reference:
    """The kernel K_0 a measurement's distance is taken to.

    Attributes:
      frobenius_sq: ‖K_0‖_F² (exact, recorded when K_0 was formed).
      kernel: K_0 [N, N] itself (e.g. a memory-mapped ``kernel.npy``), or None.
      eigvals: with ``kernel`` None, the top eigenvalues λ [k] of K_0 ...
      positions: ... and the positions [k] of their (unit) eigenvectors among the measured vectors.
    """

    frobenius_sq: float
    kernel: np.ndarray | None = None
    eigvals: np.ndarray | None = None
    positions: np.ndarray | None = None

    @property
    def method(self) -> str:
        """``kernel`` (exact) or ``eigenpairs`` (top-k approximation of K_0)."""
        return "kernel" if self.kernel is not None else "eigenpairs"

    @property
    def error_bound(self) -> float:
        """The largest error of the distance: 0 with the kernel, else √(1 − Σλ²/‖K_0‖_F²)."""
        if self.kernel is not None:
            return 0.0
        captured = float(np.sum(np.square(np.asarray(self.eigvals, np.float64))))
        return math.sqrt(max(0.0, 1.0 - captured / self.frobenius_sq))


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What one pass measured.

    Attributes:
      quotients: ``{"train", "test", "all"}`` -> [k] φᵀKφ/‖φ‖² over those rows (NaN where φ is
        zero there; only ``"all"`` without ``num_train``).
      frobenius_sq: ‖K‖_F².
      layers: the layer names (``ntklab.ntk.layer_names``) with ``by_layer``, else None.
      layer_quotients: [L, k] φᵀK_lφ/‖φ‖² over all rows, with ``by_layer``.
      kernel_distance: 1 − ⟨K_0, K⟩_F/(‖K_0‖_F‖K‖_F) with a reference, else None.
      distance_method: the reference's method (``kernel`` or ``eigenpairs``), or None.
      distance_error_bound: the reference's error bound, or None.
      seconds: wall time of the pass.
    """

    quotients: dict[str, np.ndarray]
    frobenius_sq: float
    layers: list[str] | None = None
    layer_quotients: np.ndarray | None = None
    kernel_distance: float | None = None
    distance_method: str | None = None
    distance_error_bound: float | None = None
    seconds: float = 0.0


class _Sums:
    """The running sums of one pass (float64)."""

    def __init__(self, vectors: np.ndarray, split: int, num_layers: int) -> None:
        k, n = vectors.shape
        self.phi = vectors
        self.split, self.n = split, n
        self.parts = {name: np.zeros(k) for name in ("train", "test", "cross")}
        self.layers = np.zeros((num_layers, k))
        self.frobenius_sq = 0.0
        self.inner = 0.0

    def add(self, rows: slice, cols: slice, block: np.ndarray, layers, k0_block) -> None:
        """Adds one block pair (both halves when it is off the diagonal)."""
        weight = 1.0 if rows == cols else 2.0
        block = np.asarray(block, np.float64)
        p, q = self.phi[:, rows], self.phi[:, cols]
        row_cut = _cut(rows, self.split)
        col_cut = _cut(cols, self.split)
        u_train = block[:, :col_cut] @ q[:, :col_cut].T  # [b1, k]: K φ_train over these columns
        u_test = block[:, col_cut:] @ q[:, col_cut:].T
        p_train, p_test = p[:, :row_cut].T, p[:, row_cut:].T
        self.parts["train"] += weight * np.einsum("ik,ik->k", p_train, u_train[:row_cut])
        self.parts["test"] += weight * np.einsum("ik,ik->k", p_test, u_test[row_cut:])
        self.parts["cross"] += weight * (
            np.einsum("ik,ik->k", p_train, u_test[:row_cut])
            + np.einsum("ik,ik->k", p_test, u_train[row_cut:])
        )
        for index, layer in enumerate(layers if layers is not None else ()):
            product = np.asarray(layer, np.float64) @ q.T
            self.layers[index] += weight * np.einsum("ik,ki->k", product, p)
        self.frobenius_sq += weight * float(np.vdot(block, block))
        if k0_block is not None:
            self.inner += weight * float(np.vdot(np.asarray(k0_block, np.float64), block))


def _cut(span: slice, split: int) -> int:
    """How many of the span's positions lie before ``split`` (the train rows)."""
    return min(max(split - span.start, 0), span.stop - span.start)


def measure_kernel(
    apply_fn: ApplyFn,
    params: PyTree,
    x: np.ndarray | jax.Array,
    vectors: np.ndarray,
    *,
    num_train: int | None = None,
    by_layer: bool = False,
    reference: Reference | None = None,
    batch_size: int = 256,
    implementation: str = "auto",
    progress: bool = False,
) -> Measurement:
    """Quotients φᵀKφ/‖φ‖², per layer, and the distance to K_0, in one pass over K's blocks.

    Args:
      apply_fn: ``apply_fn(params, x[B, ...]) -> [B, C]``, BatchNorm in inference mode (for C > 1
        the trace kernel).
      params: parameters at which K is taken.
      x: inputs [N, ...] in the order of the vectors' entries.
      vectors: vectors [k, N], one per row.
      num_train: rows ``[:num_train]`` are the train part (quotients of both diagonal blocks too).
      by_layer: also the quotients of each layer's kernel (that layer's parameters only).
      reference: K_0 for the kernel distance (None: no distance).
      batch_size: examples per block.
      implementation: the engine's implementation (one that forms features with ``by_layer``).
      progress: show the engine's progress bar.

    Returns:
      The :class:`Measurement`.

    Raises:
      ValueError: shapes that do not match, ``num_train`` outside [1, N − 1], a reference of
        another size, or a reference whose eigenvector positions are not among the vectors.
    """
    vectors = np.asarray(vectors, np.float64)
    n = len(x)
    if vectors.ndim != 2 or vectors.shape[1] != n:
        raise ValueError(f"vectors must be [k, N] with N = len(x) = {n}, got {vectors.shape}")
    if num_train is not None and not 1 <= num_train < n:
        raise ValueError(f"num_train={num_train} must be between 1 and N - 1 = {n - 1}")
    _check_reference(reference, n, len(vectors))
    names = layer_names(params) if by_layer else None
    sums = _Sums(vectors, n if num_train is None else num_train, len(names or ()))
    tic = time.perf_counter()
    blocks = kernel_blocks(
        apply_fn, params, x, by_layer=by_layer, batch_size=batch_size,
        implementation=implementation, progress=progress,
    )  # fmt: skip
    with threads.beside_xla():
        for rows, cols, block, layers in blocks:
            k0_block = None
            if reference is not None and reference.kernel is not None:
                k0_block = reference.kernel[rows, cols]
            sums.add(rows, cols, block, layers, k0_block)
    return _measurement(sums, num_train, names, reference, time.perf_counter() - tic)


def _check_reference(reference: Reference | None, n: int, k: int) -> None:
    if reference is None:
        return
    if reference.kernel is not None and tuple(reference.kernel.shape) != (n, n):
        raise ValueError(f"the reference kernel is {reference.kernel.shape}, not [N, N] = {n}")
    if reference.kernel is None:
        positions = np.asarray(reference.positions)
        if reference.eigvals is None or len(positions) != len(reference.eigvals):
            raise ValueError("an eigenpair reference needs eigvals [k] and their positions [k]")
        if len(positions) and (positions.min() < 0 or positions.max() >= k):
            raise ValueError(f"reference positions must index the {k} measured vectors")


def _measurement(sums: _Sums, num_train, names, reference, seconds: float) -> Measurement:
    phi, split = sums.phi, sums.split
    norms = {
        "train": np.sum(phi[:, :split] ** 2, axis=1),
        "test": np.sum(phi[:, split:] ** 2, axis=1),
        "all": np.sum(phi**2, axis=1),
    }
    numerators = {
        "train": sums.parts["train"],
        "test": sums.parts["test"],
        "all": sums.parts["train"] + sums.parts["test"] + sums.parts["cross"],
    }
    kept = SPLITS if num_train is not None else ("all",)
    quotients = {name: _ratio(numerators[name], norms[name]) for name in kept}
    layer_quotients = _ratio(sums.layers, norms["all"][None, :]) if names is not None else None
    distance = method = bound = None
    if reference is not None:
        inner = sums.inner
        if reference.kernel is None:  # ⟨Σ λ φφᵀ, K⟩ = Σ λ φᵀKφ for unit φ
            positions = np.asarray(reference.positions)
            inner = float(np.dot(reference.eigvals, numerators["all"][positions]))
        scale = math.sqrt(reference.frobenius_sq * sums.frobenius_sq)
        distance = 1.0 - inner / scale if scale > 0 else math.nan
        method, bound = reference.method, reference.error_bound
    return Measurement(
        quotients=quotients,
        frobenius_sq=sums.frobenius_sq,
        layers=names,
        layer_quotients=layer_quotients,
        kernel_distance=distance,
        distance_method=method,
        distance_error_bound=bound,
        seconds=seconds,
    )


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)
