"""Top-k eigenpairs of a stored kernel (an array or a ``.npy`` memmap): LAPACK, Chebyshev-filtered
or plain subspace iteration, or ARPACK.

Dimensions: N examples, k eigenpairs, b = k + oversampling vectors in the block.

    pairs = top_eigenpairs(kernel, num_eigvecs=1000)   # kernel [N, N]; solver="auto"
    pairs.values, pairs.vectors, pairs.residuals, pairs.gaps   # [k], [N, k], [k], [k]
"""

from __future__ import annotations

import logging
import os
import time
from typing import Literal

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from ntklab.eigen._chebyshev import chebyshev_subspace_iteration
from ntklab.eigen._iterative import subspace_iteration
from ntklab.eigen._pairs import (
    Eigenpairs,
    pair_residuals,
    relative_gaps,
    residuals_from_products,
    rows_per_panel,
    sign_flips,
)
from ntklab.progress import progress_bar

logger = logging.getLogger(__name__)

Solver = Literal["auto", "dense", "evr", "evd", "chebyshev", "subspace", "lanczos"]
SOLVERS: tuple[str, ...] = ("auto", "dense", "evr", "evd", "chebyshev", "subspace", "lanczos")
ProductDtype = Literal["auto", "float32", "float64"]
PRODUCT_DTYPES: tuple[str, ...] = ("auto", "float32", "float64")

DENSE_MAX_N = 5000
"""``solver="auto"``: LAPACK up to this N (if the kernel's float copy and workspace fit in RAM),
Chebyshev-filtered subspace iteration beyond. Measured on the project machine (2 cores, float32
LeNet eNTK, BENCHMARKS.md "Eigensolvers: Chebyshev-filtered subspace iteration"): LAPACK wins at N = 4,000, k = 1,000 (2.7 s
against 3.2 s), the filter at N = 6,102 for every k from 100 to 2,000 (1.4 s against 5.3 s at
k = 100, 5.5 s against 8.4 s at k = 1,000)."""

DENSE_MEMORY_FRACTION = 0.5
"""LAPACK needs about 3 N² words (the matrix copy, the eigenvectors, workspace); ``auto`` uses it
only while that fits in this fraction of the host RAM."""


CHEBYSHEV_DEGREE = 3
"""Filter degree of ``solver="chebyshev"`` (products per outer iteration): 8 products in all on
LeNet at N = 6,102, k = 1,000; degree 2 needed as many products and one more outer iteration."""


def default_oversampling(num_eigvecs: int, n: int) -> int:
    """Extra block vectors for subspace iteration (plain or Chebyshev-filtered): max(20, k / 10),
    capped by N − k."""
    return min(n - num_eigvecs, max(20, num_eigvecs // 10))


def choose_solver(n: int, num_eigvecs: int, itemsize: int, *, ram_bytes: int | None = None) -> str:
    """``solver="auto"``: ``"evr"`` while N <= ``DENSE_MAX_N`` and LAPACK fits (3 N² words in
    ``DENSE_MEMORY_FRACTION`` of RAM), else ``"chebyshev"``; ``"evd"`` whenever k > N / 2 and
    LAPACK fits (the whole spectrum is then cheaper than a subset or a block of k vectors), and
    for k >= N − 1 (the iterative solvers need k < N − 1)."""
    if ram_bytes is None:
        ram_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fits = 3 * n * n * itemsize <= DENSE_MEMORY_FRACTION * ram_bytes
    if num_eigvecs >= n - 1 or (fits and 2 * num_eigvecs > n):
        return "evd"
    if n <= DENSE_MAX_N and fits:
        return "evr"
    return "chebyshev"


def top_eigenpairs(
    kernel: np.ndarray,
    num_eigvecs: int,
    *,
    solver: Solver = "auto",
    tol: float | None = None,
    seed: int = 0,
    oversampling: int | None = None,
    num_iterations: int = 100,
    product_dtype: ProductDtype = "auto",
    verify: bool = True,
    progress: bool = False,
) -> Eigenpairs:
    """Computes the ``num_eigvecs`` largest eigenpairs of a symmetric PSD kernel.

    Args:
      kernel: symmetric matrix [N, N] (float32 or float64; a ``np.memmap`` is streamed in row
        panels by ``chebyshev``, ``subspace`` and ``lanczos`` and never loaded whole).
      num_eigvecs: number of eigenpairs k, 1 <= k <= N.
      solver: ``"evr"`` (LAPACK ``syevr`` on the top-k index subset, MRRR), ``"evd"`` (LAPACK
        divide and conquer, all N pairs), ``"dense"`` (whichever of the two ``auto`` would take),
        ``"chebyshev"`` (subspace iteration whose block is multiplied by a degree-3 Chebyshev
        filter between Rayleigh–Ritz steps, with locking: large GEMMs over the stored kernel,
        several times fewer than plain), ``"subspace"`` (plain blocked subspace iteration with
        Rayleigh–Ritz and soft locking), ``"lanczos"`` (ARPACK ``eigsh``: matrix-vector products), or
        ``"auto"`` (:func:`choose_solver`).
      tol: iterative solvers stop once every ‖K v_j − λ_j v_j‖ / λ_1 < tol (``lanczos``: ARPACK's
        relative tolerance). None: 5e-6 for ``chebyshev``/``subspace`` with float32 products, 1e-10 with
        float64 products, 0 (machine precision) for ``lanczos``.
      seed: seeds the random starting block (iterative solvers).
      oversampling: block vectors beyond k for ``chebyshev`` (at least 1) and ``subspace``
        (None: ``default_oversampling``).
      num_iterations: most outer iterations of ``chebyshev``/``subspace`` (or ARPACK restarts).
      product_dtype: dtype of the products K X in ``chebyshev``/``subspace`` (``chebyshev`` also
        keeps its block in it): ``"float32"`` (a float32 GEMM,
        about 2× faster; residuals reach ~1e-6 of λ_1), ``"float64"``, or ``"auto"`` (the
        kernel's dtype; float32 for a float16 kernel).
      verify: measure every pair's residual in float64 with one more pass over the kernel
        (otherwise ``chebyshev``/``subspace`` report the residuals of their own last products).
      progress: show a progress bar over the iterations (converged pairs, residual).

    Returns:
      The eigenpairs (values descending, float64) with per-pair residuals and gaps, the
      iterations and the passes over the kernel.

    Raises:
      ValueError: a non-square kernel, k outside [1, N], or an unknown option.
    """
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"kernel must be square [N, N], got shape {kernel.shape}")
    n = kernel.shape[0]
    if isinstance(num_eigvecs, bool) or not isinstance(num_eigvecs, int | np.integer):
        raise ValueError(f"num_eigvecs must be an integer, got {num_eigvecs!r}")
    if not 1 <= num_eigvecs <= n:
        raise ValueError(
            f"num_eigvecs={num_eigvecs} must be between 1 and N={n} (number of samples)"
        )
    if solver not in SOLVERS:
        raise ValueError(f"unknown eigensolver {solver!r}; valid choices: {', '.join(SOLVERS)}")
    if product_dtype not in PRODUCT_DTYPES:
        raise ValueError(
            f"unknown product_dtype {product_dtype!r}; valid choices: {', '.join(PRODUCT_DTYPES)}"
        )
    if oversampling is not None and (
        isinstance(oversampling, bool) or not isinstance(oversampling, int) or oversampling < 0
    ):
        raise ValueError(f"oversampling must be a non-negative integer, got {oversampling!r}")
    if (
        isinstance(num_iterations, bool)
        or not isinstance(num_iterations, int)
        or num_iterations < 1
    ):
        raise ValueError(f"num_iterations must be a positive integer, got {num_iterations!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    requested = solver
    if solver in ("auto", "dense"):
        solver = choose_solver(n, num_eigvecs, kernel.dtype.itemsize)
        if requested == "dense" and solver == "chebyshev":
            solver = "evd" if 2 * num_eigvecs > n else "evr"
    if solver in ("lanczos", "subspace", "chebyshev") and num_eigvecs >= n - 1:
        logger.info("%s needs k < N - 1; using LAPACK for k=%d, N=%d", solver, num_eigvecs, n)
        solver = "evd"
    tic = time.perf_counter()
    logger.info(
        "top %d eigenpairs of a %s kernel [%d, %d]%s by %s",
        num_eigvecs,
        kernel.dtype,
        n,
        n,
        " (memmap)" if isinstance(kernel, np.memmap) else "",
        solver,
    )
    products = None
    if solver in ("evr", "evd"):
        values, vectors, next_value = _lapack_top(kernel, num_eigvecs, solver)
        iterations, passes = 0, 1
    elif solver == "lanczos":
        matmat, counter = _panel_matmat(kernel, _working_dtype(kernel))
        operator = scipy.sparse.linalg.LinearOperator(
            (n, n),
            matvec=lambda v: matmat(v.reshape(n, 1)).ravel(),
            matmat=matmat,
            dtype=np.float64,
        )
        start = np.random.default_rng(seed).standard_normal(n)
        values, vectors = scipy.sparse.linalg.eigsh(
            operator, k=num_eigvecs, which="LA", tol=0.0 if tol is None else tol, v0=start
        )
        order = np.argsort(values)[::-1]
        values, vectors, next_value = values[order], vectors[:, order], None
        iterations, passes = counter["products"], counter["products"]
    else:
        dtype = np.dtype(_working_dtype(kernel) if product_dtype == "auto" else product_dtype)
        if tol is None:
            tol = 5e-6 if dtype == np.float32 else 1e-10
        if oversampling is None:
            oversampling = default_oversampling(num_eigvecs, n)
        chebyshev = solver == "chebyshev"
        block = min(n, num_eigvecs + (max(1, oversampling) if chebyshev else oversampling))
        matmat, counter = _panel_matmat(kernel, dtype, result_dtype=dtype if chebyshev else None)
        name = "Chebyshev subspace iteration" if chebyshev else "subspace iteration"
        bar = progress_bar(total=num_iterations, desc=name, unit="iter", enabled=progress)
        started = time.perf_counter()

        def report(residual: float | None, converged: int | None = None) -> None:
            bar.update(1, converged=f"{converged}/{num_eigvecs}", residual=f"{residual:.1e}")
            logger.info(
                "%s: %d products, %d/%d pairs converged, max residual %.2e (tol %.0e), %.1f s",
                name,
                counter["products"],
                converged,
                num_eigvecs,
                residual,
                tol,
                time.perf_counter() - started,
            )

        logger.info(
            "%s: block of %d vectors (k=%d + %d)%s, %s products over %d-row panels",
            name,
            block,
            num_eigvecs,
            block - num_eigvecs,
            f", filter degree {CHEBYSHEV_DEGREE}" if chebyshev else "",
            dtype,
            counter["panel_rows"],
        )
        options = dict(
            block=block,
            num_iterations=num_iterations,
            tol=tol,
            rng=np.random.default_rng(seed),
            report=report,
        )
        try:
            if chebyshev:
                result = chebyshev_subspace_iteration(
                    matmat, n, num_eigvecs, degree=CHEBYSHEV_DEGREE, dtype=dtype, **options
                )
            else:
                result = subspace_iteration(matmat, n, num_eigvecs, **options)
        finally:
            bar.close()
        values, vectors, next_value = result.values, result.vectors, result.next_value
        products, iterations, passes = result.products, result.iterations, counter["products"]
    values = np.asarray(values, dtype=np.float64)
    signs = sign_flips(np.asarray(vectors))
    vectors = np.asarray(vectors) * signs
    if verify or products is None:
        residuals = pair_residuals(kernel, values, vectors)
        passes += 1
    else:
        residuals = residuals_from_products(products * signs, values, vectors)
    gaps = relative_gaps(values, next_value)
    logger.info(
        "%s: %d eigenpairs in %.2f s, %d iterations, %d passes over the kernel, max residual %.2e",
        solver,
        num_eigvecs,
        time.perf_counter() - tic,
        iterations,
        passes,
        residuals.max(),
    )
    return Eigenpairs(
        values=values,
        vectors=vectors,
        solver=solver,
        residuals=residuals,
        gaps=gaps,
        iterations=iterations,
        passes=passes,
    )


def _lapack_top(
    kernel: np.ndarray, k: int, driver: str
) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Top-k eigenpairs [k], [N, k] (descending) and λ_{k+1} (None if k = N) by LAPACK, in the
    kernel's precision (float32 kernels use ssyev*)."""
    n = kernel.shape[0]
    matrix = np.asarray(kernel, dtype=_working_dtype(kernel))
    wanted = min(n, k + 1)  # one more for the last pair's gap
    if driver == "evr":
        values, vectors = scipy.linalg.eigh(
            matrix, subset_by_index=(n - wanted, n - 1), driver="evr", check_finite=False
        )
    else:
        values, vectors = scipy.linalg.eigh(matrix, driver="evd", check_finite=False)
    values, vectors = values[::-1][:wanted], vectors[:, ::-1][:, :wanted]
    next_value = float(values[k]) if wanted > k else None
    return values[:k], np.ascontiguousarray(vectors[:, :k]), next_value


def _working_dtype(kernel: np.ndarray) -> np.dtype:
    """The kernel's dtype, or float32 for a float16 kernel (LAPACK and GEMMs need >= float32)."""
    return np.dtype(np.float32) if kernel.dtype.itemsize < 4 else np.dtype(kernel.dtype)


def _panel_matmat(kernel: np.ndarray, dtype: np.dtype, result_dtype: np.dtype | None = None):
    """``matmat(V [N, b]) -> K V [N, b]`` (``result_dtype``, default float64) by GEMMs in
    ``dtype`` over row panels of the kernel (a memmap is read panel by panel, never whole), and a
    counter of products."""
    step = rows_per_panel(kernel, dtype.itemsize)
    counter = {"products": 0, "panel_rows": min(step, kernel.shape[0])}
    whole = not isinstance(kernel, np.memmap) and kernel.dtype == dtype
    result_dtype = np.dtype(np.float64 if result_dtype is None else result_dtype)

    def matmat(vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors)
        right = vectors.astype(dtype, copy=False)
        counter["products"] += 1
        if whole:
            return np.asarray(kernel @ right, dtype=result_dtype)
        product = np.empty((kernel.shape[0], vectors.shape[1]), dtype=result_dtype)
        for start in range(0, kernel.shape[0], step):
            rows = slice(start, start + step)
            product[rows] = np.asarray(kernel[rows], dtype=dtype) @ right
        return product

    return matmat, counter
