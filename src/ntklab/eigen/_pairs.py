"""The result type of every eigensolver and the per-pair quality measures: residuals and gaps.

Dimensions: N examples, k eigenpairs.

    pairs.values, pairs.vectors          # [k] descending, [N, k] orthonormal
    pair_residuals(kernel, values, vectors)   # [k]: ‖K v_j − λ_j v_j‖ / λ_1, float64
    relative_gaps(values, next_value)         # [k]: min(λ_{j−1} − λ_j, λ_j − λ_{j+1}) / λ_1
    unresolved_pairs(residuals, gaps)         # [k] bool: gap <= residual
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

MatmatFn = Callable[[np.ndarray], np.ndarray]
"""``matmat(vectors [N, b]) -> K vectors [N, b]`` (float64), an iterative solver's only access to K."""

PANEL_BYTES = 1 << 28
"""Kernel rows are read (and converted) in panels of at most this many bytes (256 MiB)."""

RESIDUAL_PANEL_ROWS = 1024
"""The float64 residual check converts this many kernel rows at a time into one reused buffer
(measured 0.73 s against 1.29 s for 256 MiB panels at N = 6,102, k = 1,000)."""


@dataclasses.dataclass(frozen=True)
class Eigenpairs:
    """Top eigenpairs of a kernel and how well they are resolved.

    Attributes:
      values: eigenvalues [k], descending, float64.
      vectors: orthonormal eigenvectors [N, k], column j belongs to ``values[j]``.
      solver: the solver that produced them: ``"evr"``, ``"evd"``, ``"chebyshev"``,
        ``"subspace"``, ``"lanczos"``, ``"nystrom"`` or ``"matrix_free:<method>"``.
      residuals: ‖K v_j − λ_j v_j‖ / λ_1 of every pair [k] against the true kernel, float64.
      gaps: relative gap of every pair [k], min(λ_{j−1} − λ_j, λ_j − λ_{j+1}) / λ_1 (one-sided
        for j = 1; for j = k against the next eigenvalue when the solver knows it, else one-sided).
        A pair whose gap is below its residual is not resolved: only its cluster's span is.
      iterations: outer iterations of an iterative solver (0 for a direct LAPACK solve).
      passes: full passes over the stored kernel by products (matrix-free: over the data),
        including the residual check; a LAPACK solve counts as 1.
    """

    values: np.ndarray
    vectors: np.ndarray
    solver: str
    residuals: np.ndarray
    gaps: np.ndarray
    iterations: int = 0
    passes: int = 0

    @property
    def max_residual(self) -> float:
        """max_j ‖K v_j − λ_j v_j‖ / λ_1."""
        return float(np.max(self.residuals))

    @property
    def unresolved(self) -> np.ndarray:
        """bool [k]: pairs whose gap is at most their residual (:func:`unresolved_pairs`)."""
        return unresolved_pairs(self.residuals, self.gaps)

    @property
    def num_unresolved(self) -> int:
        """How many pairs are not resolved individually."""
        return int(np.sum(self.unresolved))

    @property
    def first_unresolved(self) -> int | None:
        """Index (0-based) of the first unresolved pair, None when every pair is resolved."""
        return resolution_summary(self.residuals, self.gaps)["first_unresolved"]

    def summary(self) -> dict[str, object]:
        """JSON-ready scalars for ``meta.json``: solver, k, iterations, passes, residual, gap,
        and the unresolved pairs' count and first index (:func:`resolution_summary`)."""
        return {
            "solver": self.solver,
            "num_eigvecs": len(self.values),
            "iterations": int(self.iterations),
            "passes": int(self.passes),
            "max_residual": self.max_residual,
            "min_gap": float(np.min(self.gaps)),
            **resolution_summary(self.residuals, self.gaps),
        }


def unresolved_pairs(residuals: np.ndarray, gaps: np.ndarray, *, margin: float = 1.0) -> np.ndarray:
    """Which eigenpairs are not resolved individually: gap_j <= margin · residual_j.

    A pair whose relative gap min(λ_{j−1} − λ_j, λ_j − λ_{j+1}) / λ_1 is not above its residual
    ‖K v_j − λ_j v_j‖ / λ_1 is, as far as the solve can tell, a member of a (near-)degenerate
    eigenspace: only the span of its cluster is determined, and its vector, hence its labels
    sign(v_j), depend on the solver. Equality counts as unresolved, so an exactly repeated
    eigenvalue is unresolved even with a zero residual. The test is necessary, not sufficient:
    Davis–Kahan bounds the vector's angle by residual / gap, so a pair with gap = 10 · residual
    can still turn by ~0.1 rad and flip the labels of its near-zero entries (LeNet CIFAR kernel,
    k = 1,000 by float32 Chebyshev: ``margin=1`` flags 402 of the 507 eigenvectors whose labels
    differ on more than 1 % of the samples from the exact ones, ``margin=30`` all 507;
    BENCHMARKS.md, "Eigensolvers: threads, float64, kernel regression").

    Args:
      residuals: ‖K v_j − λ_j v_j‖ / λ_1 [k] (``eigen_residuals.npy``).
      gaps: relative gaps [k] (``eigen_gaps.npy``).
      margin: flag gaps up to this multiple of the residual (1: the plain test).

    Returns:
      mask [k], bool.

    Raises:
      ValueError: the shapes differ or are not one-dimensional, or margin is not positive.
    """
    residuals, gaps = np.asarray(residuals, np.float64), np.asarray(gaps, np.float64)
    if residuals.ndim != 1 or residuals.shape != gaps.shape:
        raise ValueError(
            f"residuals and gaps must be [k] of one length, got shapes {residuals.shape} and "
            f"{gaps.shape}"
        )
    if not margin > 0:
        raise ValueError(f"margin={margin!r} is invalid: must be positive")
    return gaps <= margin * residuals


def resolution_summary(
    residuals: np.ndarray, gaps: np.ndarray, *, margin: float = 1.0
) -> dict[str, int | None]:
    """``{"num_unresolved": count, "first_unresolved": first index or None}`` of
    :func:`unresolved_pairs` (JSON-ready; indices 0-based, eigenvalues descending)."""
    mask = unresolved_pairs(residuals, gaps, margin=margin)
    first = int(np.argmax(mask)) if mask.any() else None
    return {"num_unresolved": int(mask.sum()), "first_unresolved": first}


def sign_flips(vectors: np.ndarray) -> np.ndarray:
    """±1 per column [k] that makes each column's entry of largest magnitude positive."""
    peak = vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])]
    return np.where(peak < 0, -1, 1).astype(vectors.dtype)


def fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Flips each column [N, k] so that its entry of largest magnitude is positive."""
    return vectors * sign_flips(vectors)


def rows_per_panel(kernel: np.ndarray, itemsize: int = 8) -> int:
    """Kernel rows per panel so that a panel of ``itemsize``-byte entries fits ``PANEL_BYTES``."""
    return max(1, PANEL_BYTES // max(1, kernel.shape[1] * itemsize))


def pair_residuals(
    kernel: np.ndarray, values: np.ndarray, vectors: np.ndarray, *, panel_rows: int | None = None
) -> np.ndarray:
    """Returns ‖K v_j − λ_j v_j‖ / λ_1 of every pair [k], in float64.

    Args:
      kernel: [N, N] (an array or a ``np.memmap``, read in row panels converted to float64).
      values: eigenvalues [k], descending (``values[0]`` is λ_1).
      vectors: eigenvectors [N, k].
      panel_rows: kernel rows converted to float64 at a time (None: ``RESIDUAL_PANEL_ROWS``;
        never more than ``PANEL_BYTES`` worth).
    """
    vectors64 = np.asarray(vectors, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    step = min(panel_rows or RESIDUAL_PANEL_ROWS, rows_per_panel(kernel), kernel.shape[0])
    panel = np.empty((step, kernel.shape[1]))  # reused: no page faults on fresh panels
    product = np.empty((step, vectors.shape[1]))
    squared = np.zeros(vectors.shape[1])
    for start in range(0, kernel.shape[0], step):
        stop = min(start + step, kernel.shape[0])
        rows, part = slice(start, stop), product[: stop - start]
        np.copyto(panel[: stop - start], kernel[rows])
        np.matmul(panel[: stop - start], vectors64, out=part)
        part -= vectors64[rows] * values[None, :]
        squared += np.einsum("ij,ij->j", part, part)
    return np.sqrt(squared) / _scale(values)


def max_relative_residual(
    kernel: np.ndarray, values: np.ndarray, vectors: np.ndarray, *, rows_per_chunk: int = 4096
) -> float:
    """Returns max_j ‖K v_j − λ_j v_j‖ / λ_1 in float64.

    Args:
      kernel: [N, N].
      values: eigenvalues [k], descending (``values[0]`` is λ_1).
      vectors: eigenvectors [N, k].
      rows_per_chunk: kernel rows converted to float64 at a time (bounds memory).
    """
    return float(pair_residuals(kernel, values, vectors, panel_rows=rows_per_chunk).max())


def residuals_from_products(
    products: np.ndarray, values: np.ndarray, vectors: np.ndarray
) -> np.ndarray:
    """‖K v_j − λ_j v_j‖ / λ_1 [k] from products K V [N, k], values [k] and vectors V [N, k]."""
    values = np.asarray(values, dtype=np.float64)
    residuals = np.asarray(products, dtype=np.float64) - np.asarray(vectors, np.float64) * values
    return np.linalg.norm(residuals, axis=0) / _scale(values)


def relative_gaps(values: np.ndarray, next_value: float | None = None) -> np.ndarray:
    """Relative gap of every pair [k]: min(λ_{j−1} − λ_j, λ_j − λ_{j+1}) / λ_1.

    Args:
      values: eigenvalues [k], descending.
      next_value: λ_{k+1} if known (then the last pair's gap is two-sided), else None.

    Returns:
      gaps [k], float64; with k = 1 and no ``next_value``, [inf].
    """
    values = np.asarray(values, dtype=np.float64)
    extended = values if next_value is None else np.append(values, float(next_value))
    differences = extended[:-1] - extended[1:]  # λ_j − λ_{j+1}
    left = np.concatenate([[np.inf], differences[: len(values) - 1]])
    right = differences if next_value is not None else np.append(differences, np.inf)
    return np.minimum(left, right[: len(values)]) / _scale(values)


def _scale(values: np.ndarray) -> float:
    return max(abs(float(values[0])), np.finfo(np.float64).tiny)
