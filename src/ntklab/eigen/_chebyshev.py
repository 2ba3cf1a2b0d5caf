"""Chebyshev-filtered subspace iteration (ChFSI) for the top-k eigenpairs of a stored PSD kernel.

Dimensions: N examples, k eigenpairs, b vectors in the block, a active (unlocked) vectors,
L locked vectors, m filter degree.

    result = chebyshev_subspace_iteration(matmat, n, k, block=k + 150, degree=3, tol=5e-6,
                                          num_iterations=20, rng=rng, report=report,
                                          dtype=np.float32)

Plain subspace iteration multiplies the block by K once per Rayleigh–Ritz step, so pair j
converges like (λ_{b+1} / λ_j)^products: slow for the last wanted pairs of a slowly decaying
spectrum (LeNet's eNTK at N = 6,102 has λ_1100 / λ_1000 = 0.89). A Chebyshev filter of degree m
multiplies the active block by T_m(L), L = (2K − c I) / c, which is bounded by 1 on the unwanted
interval [0, c] (c = the smallest Ritz value of the block, an estimate of λ_b) and grows like
(t + √(t² − 1))^m for t = 2λ/c − 1 > 1: for λ_j / c = 1.25 that is 2.6× per product instead of
1.25× (Zhou & Saad, "A Chebyshev–Davidson algorithm", 2007). The filter is evaluated by the
three-term recurrence, scaled so that the top active Ritz value maps to 1 (no overflow), and reuses
the Rayleigh–Ritz products K Q for its first step, so an outer iteration costs m products of the
active block: m − 1 in the filter and one for Rayleigh–Ritz. Converged leading pairs are locked
(hard locking: later blocks are orthogonalized against them), so the active block shrinks.

Products, the block, the rotations and the small Rayleigh–Ritz ``eigh`` are in ``dtype`` (float32:
twice as fast, accurate to ~1e-7 of λ_1, and the tolerance is relative to λ_1); the first Cholesky
QR pass of a filtered block is float64 (SciPy/LAPACK ``cholesky``, ``solve_triangular``, ``eigh``).
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.linalg
import scipy.linalg.blas

from ntklab.eigen._iterative import ReportFn, SolverResult, _orthonormal_block
from ntklab.eigen._pairs import MatmatFn

logger = logging.getLogger(__name__)

PLAIN_STEP_RATIO = 0.05
"""When the cutoff c is below this fraction of the last wanted Ritz value, one plain product
already damps the unwanted part 20×; the filter then uses degree 1 (this also covers c <= 0, a
rank-deficient kernel, where the filter's interval would be empty)."""

FILTER_RANGE = {False: 1e6, True: 1e10}
"""Most a filtered column's gain may exceed the gain at the last wanted Ritz value, for float32
(False) and float64 (True) blocks; columns above it (the top of the spectrum) take a plain step
instead and are projected out of the filtered tail."""


def chebyshev_subspace_iteration(
    matmat: MatmatFn,
    n: int,
    k: int,
    *,
    block: int,
    num_iterations: int,
    tol: float,
    rng: np.random.Generator,
    report: ReportFn,
    degree: int = 3,
    dtype: np.dtype | type = np.float32,
) -> SolverResult:
    """Top-k eigenpairs of a symmetric PSD K seen through ``matmat``, by ChFSI with locking.

    Args:
      matmat: ``matmat(X [N, a]) -> K X [N, a]``; X is in ``dtype``, the result is cast to it.
      n: N, the kernel's size.
      k: wanted pairs, k < b <= N.
      block: b, the block width (k plus oversampling; the oversampling sets the cutoff c).
      num_iterations: most outer iterations (each: filter, orthonormalization, Rayleigh–Ritz).
      tol: a leading pair locks once ‖K x − θ x‖ / λ_1 < tol.
      rng: the random starting block.
      report: ``report(max_residual, converged)`` after every Rayleigh–Ritz step.
      degree: m, the filter degree (1 is plain subspace iteration with hard locking).
      dtype: the block's and the products' dtype (float32 or float64).

    Returns:
      ``SolverResult`` with values [k] descending, vectors [N, k], the outer iterations, the
      (k+1)-th Ritz value and the products K vectors [N, k] (for residuals without a pass).
    """
    if not 0 < k < block <= n:
        raise ValueError(f"need 0 < k < block <= N, got k={k}, block={block}, N={n}")
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"degree must be a positive integer, got {degree!r}")
    dtype = np.dtype(dtype)

    def product(vectors: np.ndarray) -> np.ndarray:
        return np.asarray(matmat(vectors), dtype=dtype)

    start = rng.standard_normal((n, block)).astype(dtype)
    basis = _orthonormalize(product(start), None, rng)  # range finder: span(K Ω)
    values, basis, images = _rayleigh_ritz(basis, product(basis))
    scale = max(abs(float(values[0])), np.finfo(np.float64).tiny)
    locked: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (values, vectors, products)
    num_locked = 0
    for iteration in range(1, num_iterations + 1):
        wanted = k - num_locked
        residual = images[:, :wanted] - basis[:, :wanted] * values[:wanted].astype(dtype)
        errors = np.linalg.norm(residual, axis=0) / scale
        converged = wanted if (errors < tol).all() else int(np.argmin(errors < tol))
        if iteration == num_iterations and converged < wanted:
            logger.warning(
                "Chebyshev subspace iteration stopped after num_iterations=%d with %d of %d "
                "pairs converged (max relative residual %.2e > tol=%.1e); raise num_iterations "
                "or oversampling",
                num_iterations,
                num_locked + converged,
                k,
                errors.max(),
                tol,
            )
            converged = wanted  # hand back the current Ritz pairs as they are
        locked.append((values[:converged], basis[:, :converged], images[:, :converged]))
        num_locked += converged
        report(float(errors.max()), num_locked)
        if num_locked >= k:
            break
        values, basis, images = values[converged:], basis[:, converged:], images[:, converged:]
        kept = np.concatenate([vectors for _, vectors, _ in locked], axis=1)
        filtered = _chebyshev_filter(
            product, basis, images, values, wanted - converged, degree, kept
        )
        basis = _orthonormalize(filtered, kept, rng)
        values, basis, images = _rayleigh_ritz(basis, product(basis))
    next_value = float(values[converged]) if len(values) > converged else None
    all_values = np.concatenate([v for v, _, _ in locked])[:k]
    order = np.argsort(-all_values, kind="stable")
    return SolverResult(
        values=all_values[order],
        vectors=np.concatenate([x for _, x, _ in locked], axis=1)[:, :k][:, order],
        iterations=iteration,
        next_value=next_value,
        products=np.concatenate([p for _, _, p in locked], axis=1)[:, :k][:, order],
    )


def _chebyshev_filter(
    product,
    basis: np.ndarray,
    images: np.ndarray,
    values: np.ndarray,
    wanted: int,
    degree: int,
    locked: np.ndarray | None = None,
) -> np.ndarray:
    """The next block [N, a] from Ritz vectors ``basis`` [N, a] (values descending), their
    products ``images`` = K basis, and m − 1 more products of the tail.

    The head (Ritz values whose filter gain would exceed ``FILTER_RANGE`` times the gain at the
    last wanted one) takes a plain step, K basis, already known; it converges fast anyway
    (θ ≫ c). The tail gets T_m(L) basis / T_m(t_top) for L = (2K − c I)/c, c = values[-1], by
    the scaled three-term recurrence, with the head and the locked vectors projected out after
    every product: otherwise a tail column's small components along the top eigenvectors,
    amplified by up to T_m(t_1) / T_m(t_k) (1e12 for LeNet), would bury its own in rounding.
    """
    cutoff, last = float(values[-1]), min(wanted, len(values)) - 1  # last: the last wanted
    if degree == 1 or cutoff <= PLAIN_STEP_RATIO * float(values[last]):
        return images  # one plain product: K basis

    def mapped(t: np.ndarray | float) -> np.ndarray | float:
        return 2.0 * np.asarray(t, dtype=np.float64) / cutoff - 1.0

    gains = np.polynomial.chebyshev.chebval(mapped(values), np.eye(degree + 1)[degree])
    budget = FILTER_RANGE[np.dtype(basis.dtype).itemsize > 4] * gains[last]
    head = int(np.sum(gains > budget))
    if head == len(values):
        return images
    tail, tail_images = basis[:, head:], images[:, head:]
    pieces = [b for b in (locked, basis[:, :head]) if b is not None and b.shape[1]]
    deflate = np.concatenate(pieces, axis=1) if pieces else None

    def project(block: np.ndarray) -> np.ndarray:
        if deflate is not None:
            block -= deflate @ (deflate.T @ block)
        return block

    top = float(mapped(values[head]))
    previous_norm, current_norm = 1.0, top  # T_0(t_top), T_1(t_top)
    previous = tail
    current = project(((2.0 / cutoff) * tail_images - tail) * (1.0 / top))
    for _ in range(2, degree + 1):
        next_norm = 2.0 * top * current_norm - previous_norm
        step = (2.0 / cutoff) * product(current) - current  # L current
        step *= 2.0 * current_norm / next_norm
        step -= previous * (previous_norm / next_norm)
        previous, current = current, project(step)
        previous_norm, current_norm = current_norm, next_norm
    return np.concatenate([images[:, :head], current], axis=1)


def _orthonormalize(
    block: np.ndarray, basis: np.ndarray | None, rng: np.random.Generator
) -> np.ndarray:
    """Orthonormal columns [N, a] (``block``'s dtype) spanning ``block`` [N, a] minus its part in
    span(basis [N, L]), by Cholesky QR2. The first pass runs in ``block``'s dtype when its
    Cholesky factor is well conditioned (κ < 1 / (100 √ε): CholQR2 is then orthonormal to
    rounding), else in float64 (the range finder's block K Ω leans towards the top eigenvectors);
    Householder QR takes over when even the float64 factor is rank deficient."""
    dtype = block.dtype
    for _ in range(2):
        if basis is not None and basis.shape[1]:
            block = block - basis @ (basis.T @ block)
        norms = np.maximum(np.linalg.norm(block, axis=0), np.finfo(dtype).tiny)
        for precision in dict.fromkeys((dtype, np.dtype(np.float64))):
            scaled = np.asarray(block, dtype=precision) / norms.astype(precision)
            factor = _cholesky(_gram(scaled))
            if factor is None:
                continue
            diagonal = np.abs(np.diag(factor))
            if diagonal.min() > 100 * np.sqrt(np.finfo(precision).eps) * diagonal.max():
                break
            if precision == np.float64 and diagonal.min() > np.sqrt(np.finfo(np.float64).eps):
                break  # good enough for a first pass; the second one is well conditioned
            factor = None
        if factor is None:
            logger.debug("Cholesky QR lost rank; falling back to Householder QR")
            fallback = _orthonormal_block(np.asarray(block, np.float64), _wide(basis), rng)
            return np.ascontiguousarray(fallback, dtype=dtype)
        block = scipy.linalg.solve_triangular(
            factor, scaled.T, trans="T", lower=False, check_finite=False, overwrite_b=True
        ).T.astype(dtype, copy=False)
    return np.ascontiguousarray(block)


def _cholesky(gram: np.ndarray) -> np.ndarray | None:
    """Upper Cholesky factor of a Gram matrix (upper triangle given), None if not positive."""
    try:
        return scipy.linalg.cholesky(gram, lower=False, check_finite=False)
    except np.linalg.LinAlgError:
        return None


def _gram(block: np.ndarray) -> np.ndarray:
    """blockᵀ block [a, a] (upper triangle only) by BLAS ``syrk``: half a GEMM's work."""
    syrk = scipy.linalg.blas.dsyrk if block.dtype == np.float64 else scipy.linalg.blas.ssyrk
    return syrk(1.0, block.T, trans=0, lower=0)


def _wide(basis: np.ndarray | None) -> np.ndarray | None:
    return None if basis is None or not basis.shape[1] else np.asarray(basis, np.float64)


def _rayleigh_ritz(
    basis: np.ndarray, images: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ritz values [a] (float64, descending), vectors [N, a] and their products [N, a] from an
    orthonormal basis [N, a] and its products K basis [N, a]."""
    gram = basis.T @ images
    values, rotation = scipy.linalg.eigh((gram + gram.T) / 2, driver="evd", check_finite=False)
    rotation = np.ascontiguousarray(rotation[:, ::-1])
    return values[::-1].astype(np.float64), basis @ rotation, images @ rotation
