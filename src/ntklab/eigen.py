"""Top-k eigenpairs of a symmetric positive semi-definite kernel matrix.

Dimensions: N examples, k eigenpairs.

    pairs = top_eigenpairs(kernel, num_eigvecs=10)   # kernel [N, N]
    pairs.values                                     # [k], descending
    pairs.vectors                                    # [N, k], orthonormal columns

Eigenvectors are only defined up to sign; we fix it so that each vector's entry of largest
magnitude is positive, which makes the eigenfunction labels (sign(v) + 1) / 2 reproducible.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

logger = logging.getLogger(__name__)

Solver = Literal["auto", "dense", "lanczos"]
SOLVERS: tuple[str, ...] = ("auto", "dense", "lanczos")

DENSE_MAX_N = 8192
"""``solver="auto"`` uses dense ``eigh`` up to this N and Lanczos (no O(N³) work) beyond."""


@dataclasses.dataclass(frozen=True)
class Eigenpairs:
    """Top eigenpairs of a kernel.

    Attributes:
      values: eigenvalues [k], descending.
      vectors: orthonormal eigenvectors [N, k], column j belongs to ``values[j]``.
      solver: the solver that produced them (``"dense"`` or ``"lanczos"``).
      max_residual: max_j ‖K v_j − λ_j v_j‖ / λ_1, computed in float64.
    """

    values: np.ndarray
    vectors: np.ndarray
    solver: str
    max_residual: float


def top_eigenpairs(
    kernel: np.ndarray,
    num_eigvecs: int,
    *,
    solver: Solver = "auto",
    tol: float = 0.0,
    seed: int = 0,
) -> Eigenpairs:
    """Computes the ``num_eigvecs`` largest eigenpairs of a symmetric kernel.

    Args:
      kernel: symmetric matrix [N, N] (float32 or float64; a memmap works).
      num_eigvecs: number of eigenpairs k, 1 <= k <= N.
      solver: ``"dense"`` (LAPACK ``eigh`` restricted to the top k), ``"lanczos"`` (ARPACK implicitly
        restarted Lanczos via ``scipy.sparse.linalg.eigsh``: matrix-vector products only), or
        ``"auto"`` (dense up to ``DENSE_MAX_N``, Lanczos beyond, dense when k > N / 4).
      tol: Lanczos relative accuracy (0 means machine precision).
      seed: seeds the Lanczos starting vector.

    Returns:
      The eigenpairs, values descending, with their max relative residual.

    Raises:
      ValueError: a non-square kernel, k outside [1, N], or an unknown solver.
    """
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"kernel must be square [N, N], got shape {kernel.shape}")
    n = kernel.shape[0]
    if not 1 <= num_eigvecs <= n:
        raise ValueError(
            f"num_eigvecs={num_eigvecs} must be between 1 and N={n} (number of samples)"
        )
    if solver not in SOLVERS:
        raise ValueError(f"unknown eigensolver {solver!r}; valid choices: {', '.join(SOLVERS)}")
    if solver == "auto":
        solver = "dense" if n <= DENSE_MAX_N or 4 * num_eigvecs > n else "lanczos"
    if solver == "lanczos" and num_eigvecs >= n - 1:
        logger.info(
            "Lanczos needs k < N - 1; using the dense solver for k=%d, N=%d", num_eigvecs, n
        )
        solver = "dense"
    if solver == "dense":
        values, vectors = _dense_top(np.asarray(kernel), num_eigvecs)
    else:
        operator = scipy.sparse.linalg.aslinearoperator(kernel)
        start = np.random.default_rng(seed).standard_normal(n).astype(kernel.dtype)
        values, vectors = scipy.sparse.linalg.eigsh(
            operator, k=num_eigvecs, which="LA", tol=tol, v0=start
        )
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    vectors = _fix_signs(vectors)
    residual = max_relative_residual(kernel, values, vectors)
    return Eigenpairs(values=values, vectors=vectors, solver=solver, max_residual=residual)


def _dense_top(kernel: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k eigenpairs [k], [N, k] (ascending) of a dense symmetric [N, N] matrix by LAPACK."""
    n = kernel.shape[0]
    if 2 * k <= n:
        # evx (bisection + inverse iteration on the wanted part) is several times faster than
        # evr or a full evd when k << N.
        return scipy.linalg.eigh(
            kernel, subset_by_index=(n - k, n - 1), driver="evx", check_finite=False
        )
    values, vectors = scipy.linalg.eigh(kernel, driver="evd", check_finite=False)
    return values[n - k :], vectors[:, n - k :]


def _fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Flips each column [N, k] so that its entry of largest magnitude is positive."""
    peak = vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])]
    return vectors * np.where(peak < 0, -1, 1).astype(vectors.dtype)


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
    vectors64 = np.asarray(vectors, dtype=np.float64)
    squared = np.zeros(vectors.shape[1])
    for start in range(0, kernel.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        product = np.asarray(kernel[rows], dtype=np.float64) @ vectors64
        squared += np.sum((product - vectors64[rows] * values[None, :]) ** 2, axis=0)
    scale = max(abs(float(values[0])), np.finfo(np.float64).tiny)
    return float(np.sqrt(squared.max()) / scale)
