"""Iterative top-k eigensolvers that see a symmetric PSD kernel only through ``matmat``.

Dimensions: N examples, k eigenpairs, b vectors in a block, m basis vectors, L locked vectors.

    result = METHODS["subspace"](matmat, n, k, block=k + 100, num_iterations=50, tol=1e-5,
                                 rng=np.random.default_rng(0), report=lambda *a: None)
    result.values, result.vectors    # [k] descending, [N, k]; result.iterations, result.next_value

``subspace`` (blocked subspace iteration with Rayleigh–Ritz and hard locking) is the solver for a
stored kernel at large k: each iteration is one product K X [N, N] × [N, a] over the a still-active
vectors (a large GEMM, streamed over row panels for a memmap), Cholesky QR2 orthonormalization
(GEMMs), and an a × a Rayleigh–Ritz ``eigh``; converged leading pairs are locked and leave the
block, so later iterations shrink. ``block_krylov`` (growing block Krylov basis with thick
restarts) converges in fewer products and suits matrix-free products where each product is a pass
over the data; ``lobpcg`` and ``lanczos`` wrap SciPy's LOBPCG and ARPACK. All work in float64 on the
host; products may be computed in float32 by ``matmat``. Every method returns ``SolverResult``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from ntklab.eigen._pairs import MatmatFn

logger = logging.getLogger(__name__)

KRYLOV_MAX_BLOCKS = 5
"""Block Krylov keeps at most this many blocks of basis vectors, then restarts thick."""

KRYLOV_KEEP_BLOCKS = 2
"""A thick restart keeps this many blocks' worth of the top Ritz vectors (and their products)."""

ReportFn = Callable[..., None]
"""``report(residual: float | None, converged: int | None = None)`` after every product."""


class SolverResult(NamedTuple):
    """What an iterative method returns.

    Attributes:
      values: Ritz values [k], descending.
      vectors: Ritz vectors [N, k].
      iterations: products (block methods) or restarts (Lanczos) used.
      next_value: the (k+1)-th Ritz value if the method has one (for the last pair's gap).
      products: the products K vectors [N, k] from the last iteration, if the method keeps them.
    """

    values: np.ndarray
    vectors: np.ndarray
    iterations: int
    next_value: float | None = None
    products: np.ndarray | None = None


def _orthonormal_block(
    block: np.ndarray, basis: np.ndarray | None, rng: np.random.Generator
) -> np.ndarray:
    """Orthonormal columns [N, b] spanning ``block`` [N, b] minus its part in span(basis [N, m]).

    Columns that are (numerically) in the span of the basis and the other columns are replaced by
    random directions, so the block keeps its width (and its compiled shape).
    """
    block = block / np.maximum(np.linalg.norm(block, axis=0), np.finfo(np.float64).tiny)
    for _ in range(3):
        for _ in range(2):  # classical Gram–Schmidt, twice, is enough
            if basis is not None:
                block = block - basis @ (basis.T @ block)
        q, r = np.linalg.qr(block)
        weak = np.abs(np.diag(r)) < 1e-8
        if not weak.any():
            return q
        block = q
        block[:, weak] = rng.standard_normal((len(block), int(weak.sum())))
    raise RuntimeError("could not extend the Krylov basis with independent directions")


def _cholesky_qr(
    block: np.ndarray, basis: np.ndarray | None, rng: np.random.Generator
) -> np.ndarray:
    """Like ``_orthonormal_block`` but by Cholesky QR2 (two Gram matrices and triangular solves,
    all GEMM-shaped, several times faster than Householder QR for tall blocks [N, b]); falls back
    to Householder QR when the block is too ill-conditioned for a Cholesky factor."""
    tiny = np.finfo(np.float64).tiny
    for _ in range(2):
        if basis is not None and basis.shape[1]:
            block = block - basis @ (basis.T @ block)
        block = block / np.maximum(np.linalg.norm(block, axis=0), tiny)
        try:
            factor = scipy.linalg.cholesky(block.T @ block, lower=False, check_finite=False)
        except np.linalg.LinAlgError:
            return _orthonormal_block(block, basis, rng)
        if np.abs(np.diag(factor)).min() < 1e-6:  # nearly dependent columns
            return _orthonormal_block(block, basis, rng)
        block = scipy.linalg.solve_triangular(
            factor, block.T, trans="T", lower=False, check_finite=False
        ).T
    return np.ascontiguousarray(block)


def _ritz(basis: np.ndarray, products: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rayleigh–Ritz on orthonormal basis [N, a] with products K basis [N, a]: values [a]
    descending and the rotation [a, a]."""
    gram = basis.T @ products
    values, rotation = scipy.linalg.eigh((gram + gram.T) / 2, driver="evr", check_finite=False)
    return values[::-1], rotation[:, ::-1]


def subspace_iteration(
    matmat: MatmatFn,
    n: int,
    k: int,
    *,
    block: int,
    num_iterations: int,
    tol: float,
    rng: np.random.Generator,
    report: ReportFn,
) -> SolverResult:
    """Top-k eigenpairs by blocked subspace iteration with Rayleigh–Ritz and soft locking.

    The basis B [N, b] holds c converged Ritz vectors and b − c active ones. An iteration
    multiplies only the active ones, X ← orth(K X) against the converged, and runs Rayleigh–Ritz
    over all of B with the stored products K B (converged columns keep theirs: a rotation of
    exact products is exact), so converged vectors are refined for free and the coupling between
    them and the active ones is never dropped. The leading pairs with ‖K x − θ x‖ / λ_1 < tol
    count as converged. Pair j converges like (λ_{b+1} / λ_j)^iterations, so the oversampling
    (b − k) sets the speed of the last pairs. Products come from ``matmat`` (a float32 GEMM is
    enough: residuals are relative to λ_1); the basis and Rayleigh–Ritz are float64.
    """
    basis = _cholesky_qr(rng.standard_normal((n, block)), None, rng)
    products = matmat(basis)
    for iteration in range(1, num_iterations + 1):
        values, rotation = _ritz(basis, products)
        basis, products = basis @ rotation, products @ rotation
        scale = max(abs(float(values[0])), np.finfo(np.float64).tiny)
        errors = np.linalg.norm(products[:, :k] - basis[:, :k] * values[None, :k], axis=0) / scale
        converged = k if (errors < tol).all() else int(np.argmin(errors < tol))
        report(float(errors.max()), converged)
        if converged >= k or basis.shape[1] == n:
            break
        if iteration == num_iterations:
            logger.warning(
                "subspace iteration stopped after num_iterations=%d with %d of %d pairs converged "
                "(max relative residual %.2e > tol=%.1e); raise num_iterations or oversampling",
                num_iterations,
                converged,
                k,
                errors.max(),
                tol,
            )
            break
        kept = basis[:, :converged]
        active = _cholesky_qr(products[:, converged:], kept, rng)
        basis = np.concatenate([kept, active], axis=1)
        products = np.concatenate([products[:, :converged], matmat(active)], axis=1)
    return SolverResult(
        values=values[:k],
        vectors=basis[:, :k],
        iterations=iteration,
        next_value=float(values[k]) if len(values) > k else None,
        products=products[:, :k],
    )


def block_krylov(
    matmat: MatmatFn,
    n: int,
    k: int,
    *,
    block: int,
    num_iterations: int,
    tol: float,
    rng: np.random.Generator,
    report: Callable[[float | None], None],
) -> SolverResult:
    """Top-k eigenpairs by randomized block Krylov iteration with Rayleigh–Ritz.

    The basis Q [N, m] grows by one block of b vectors per product: the residuals K v − θ v of the
    top b Ritz vectors, orthonormalized against Q, which spans the same space as the next block
    Krylov power K^j Ω but is better conditioned. The products K Q are kept, so the Rayleigh
    quotient Qᵀ K Q and the Ritz residuals cost no extra products. When Q would exceed
    ``KRYLOV_MAX_BLOCKS`` blocks it restarts with the top Ritz vectors (thick restart).
    """
    max_basis = min(n, KRYLOV_MAX_BLOCKS * block)
    basis = _orthonormal_block(rng.standard_normal((n, block)), None, rng)
    products = matmat(basis)
    gram = basis.T @ products
    for iteration in range(1, num_iterations + 1):
        ritz_values, rotation = np.linalg.eigh((gram + gram.T) / 2)
        ritz_values, rotation = ritz_values[::-1], rotation[:, ::-1]
        kept = min(basis.shape[1], KRYLOV_KEEP_BLOCKS * block)
        ritz, images = basis @ rotation[:, :kept], products @ rotation[:, :kept]
        residuals = images - ritz * ritz_values[None, :kept]
        scale = max(abs(ritz_values[0]), np.finfo(np.float64).tiny)
        errors = np.linalg.norm(residuals[:, :k], axis=0) / scale
        report(float(errors.max()), int(np.sum(errors < tol)))
        if errors.max() < tol or basis.shape[1] == n:
            break
        if iteration == num_iterations:
            logger.warning(
                "block Krylov stopped after num_iterations=%d products with max relative residual "
                "%.2e > tol=%.1e; raise num_iterations or oversampling",
                num_iterations,
                errors.max(),
                tol,
            )
            break
        if basis.shape[1] + block > max_basis and kept < basis.shape[1]:
            basis, products, gram = ritz, images, np.diag(ritz_values[:kept])
        width = min(block, n - basis.shape[1])
        new = _orthonormal_block(residuals[:, :width], basis, rng)
        new_products = matmat(new)
        cross = basis.T @ new_products
        gram = np.block([[gram, cross], [cross.T, new.T @ new_products]])
        basis = np.concatenate([basis, new], axis=1)
        products = np.concatenate([products, new_products], axis=1)
    return SolverResult(
        values=ritz_values[:k],
        vectors=ritz[:, :k],
        iterations=iteration,
        next_value=float(ritz_values[k]) if len(ritz_values) > k else None,
        products=images[:, :k],
    )


def lobpcg(
    matmat: MatmatFn,
    n: int,
    k: int,
    *,
    block: int,
    num_iterations: int,
    tol: float,
    rng: np.random.Generator,
    report: Callable[[float | None], None],
) -> SolverResult:
    """Top-k eigenpairs by SciPy's LOBPCG on a ``LinearOperator``, blocks of b vectors.

    LOBPCG's tolerance is absolute (‖K x − θ x‖ per vector), so it is scaled by σ_max(K Ω) <= λ_1
    from one power step K Ω of a random orthonormal block Ω, whose range starts the iteration.
    """
    start = _orthonormal_block(rng.standard_normal((n, block)), None, rng)
    image = matmat(start)
    report(None)
    scale = float(np.linalg.norm(image, 2))
    count = [1]

    def counted(vectors: np.ndarray) -> np.ndarray:
        product = matmat(vectors)
        count[0] += 1
        report(None)
        return product

    operator = scipy.sparse.linalg.LinearOperator(
        (n, n), matvec=lambda v: counted(v.reshape(n, 1)).ravel(), matmat=counted, dtype=np.float64
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values, vectors = scipy.sparse.linalg.lobpcg(
            operator,
            _orthonormal_block(image, None, rng),
            tol=tol * scale,
            maxiter=num_iterations,
            largest=True,
        )
    messages = [" ".join(str(warning.message).split()) for warning in caught]
    for message in messages:
        logger.debug("scipy lobpcg: %s", message)
    if any("not reaching the requested tolerance" in message for message in messages):
        logger.warning(
            "LOBPCG stopped after num_iterations=%d iterations above tol=%.1e; raise "
            "num_iterations or oversampling",
            num_iterations,
            tol,
        )
    order = np.argsort(values)[::-1]
    return SolverResult(
        values=values[order[:k]],
        vectors=vectors[:, order[:k]],
        iterations=count[0],
        next_value=float(values[order[k]]) if len(order) > k else None,
    )


def lanczos(
    matmat: MatmatFn,
    n: int,
    k: int,
    *,
    block: int,
    num_iterations: int,
    tol: float,
    rng: np.random.Generator,
    report: Callable[[float | None], None],
) -> SolverResult:
    """Top-k eigenpairs by ARPACK's implicitly restarted Lanczos (one vector per product)."""
    operator = scipy.sparse.linalg.LinearOperator(
        (n, n), matvec=lambda v: matmat(v.reshape(n, 1)).ravel(), matmat=matmat, dtype=np.float64
    )
    try:
        values, vectors = scipy.sparse.linalg.eigsh(
            operator,
            k=k,
            which="LA",
            tol=tol,
            v0=rng.standard_normal(n),
            ncv=min(n, max(2 * k + 1, block, 20)),
            maxiter=num_iterations,
        )
    except scipy.sparse.linalg.ArpackNoConvergence as error:
        if len(error.eigenvalues) < k:
            raise RuntimeError(
                f"Lanczos converged {len(error.eigenvalues)} of {k} eigenpairs in "
                f"{num_iterations} restarts; raise num_iterations or tol"
            ) from error
        logger.warning(
            "Lanczos stopped after num_iterations=%d restarts above tol=%.1e; raise num_iterations",
            num_iterations,
            tol,
        )
        values, vectors = error.eigenvalues, error.eigenvectors
    order = np.argsort(values)[::-1]
    return SolverResult(values=values[order], vectors=vectors[:, order], iterations=0)


METHODS: dict[str, Callable[..., SolverResult]] = {
    "block_krylov": block_krylov,
    "lobpcg": lobpcg,
    "lanczos": lanczos,
    "subspace": subspace_iteration,
}
