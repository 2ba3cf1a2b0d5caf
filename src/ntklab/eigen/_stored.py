"""One function per eigensolver of a stored kernel (an array or a ``.npy`` memmap), and the two
choosers ``auto`` and ``dense``. The table that names them is ``ntklab.eigen._solvers``.

Dimensions: N examples, k eigenpairs, b = k + oversampling vectors in the block.

    f32 = np.dtype("float32")
    problem = KernelProblem(kernel, 1000, dtype=f32, product_dtype=f32)   # kernel [N, N]
    solution = solve_chebyshev(problem)      # values [k] descending, vectors [N, k], next_value
    choose_solver(6102, 1000, 4)             # "chebyshev": what solver="auto" runs

Every ``solve_*`` takes a :class:`KernelProblem` (checked by ``top_eigenpairs``) and returns a
:class:`Solution`; signs, residuals and gaps are added by the dispatcher.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from ntklab.eigen._chebyshev import chebyshev_subspace_iteration
from ntklab.eigen._iterative import subspace_iteration
from ntklab.eigen._pairs import rows_per_panel
from ntklab.progress import progress_bar

logger = logging.getLogger(__name__)

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


@dataclasses.dataclass(frozen=True)
class KernelProblem:
    """A checked request for the top eigenpairs of a stored kernel.

    Attributes:
      kernel: symmetric PSD matrix [N, N] (an array or a ``np.memmap``).
      num_eigvecs: k, 1 <= k <= N.
      dtype: the working precision of LAPACK and of Lanczos' products (float32 or float64).
      product_dtype: the dtype of the products K X and the block of ``chebyshev``/``subspace``.
      tol: the iterative solvers' tolerance on ‖K v − λ v‖ / λ_1 (None: their default).
      seed: seeds the random starting block or vector.
      oversampling: block vectors beyond k (None: :func:`default_oversampling`).
      num_iterations: most outer iterations (ARPACK: restarts are not capped by it).
      progress: show a progress bar over the iterations.
    """

    kernel: np.ndarray
    num_eigvecs: int
    dtype: np.dtype
    product_dtype: np.dtype
    tol: float | None = None
    seed: int = 0
    oversampling: int | None = None
    num_iterations: int = 100
    progress: bool = False

    @property
    def n(self) -> int:
        return self.kernel.shape[0]


class Solution(NamedTuple):
    """What a stored-kernel solver returns, before signs, residuals and gaps.

    Attributes:
      values: eigenvalues [k], descending.
      vectors: eigenvectors [N, k].
      next_value: λ_{k+1} when the solver knows it (the last pair's gap), else None.
      iterations: outer iterations (0 for LAPACK; products for ARPACK).
      passes: passes over the kernel by products (LAPACK: 1).
      products: K vectors [N, k] from the solver's last products, if it keeps them.
    """

    values: np.ndarray
    vectors: np.ndarray
    next_value: float | None
    iterations: int
    passes: int
    products: np.ndarray | None = None


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


def choose_dense(n: int, num_eigvecs: int, itemsize: int, *, ram_bytes: int | None = None) -> str:
    """``solver="dense"``: LAPACK whatever the size, ``"evd"`` when k > N / 2 or k >= N − 1,
    else ``"evr"`` (``itemsize`` and ``ram_bytes`` are unused: the same signature as
    :func:`choose_solver`)."""
    return "evd" if num_eigvecs >= n - 1 or 2 * num_eigvecs > n else "evr"


def solve_evr(problem: KernelProblem) -> Solution:
    """LAPACK ``syevr`` (MRRR) on the top k + 1 index subset, in ``problem.dtype``."""
    return _lapack_top(problem, "evr")


def solve_evd(problem: KernelProblem) -> Solution:
    """LAPACK ``syevd`` (divide and conquer, all N pairs), in ``problem.dtype``."""
    return _lapack_top(problem, "evd")


def solve_lanczos(problem: KernelProblem) -> Solution:
    """ARPACK ``eigsh`` (implicitly restarted Lanczos) over row-panel products in
    ``problem.dtype``; ``tol`` is ARPACK's relative tolerance (None: machine precision)."""
    n = problem.n
    matmat, counter = _panel_matmat(problem.kernel, problem.dtype)
    operator = scipy.sparse.linalg.LinearOperator(
        (n, n),
        matvec=lambda v: matmat(v.reshape(n, 1)).ravel(),
        matmat=matmat,
        dtype=np.float64,
    )
    start = np.random.default_rng(problem.seed).standard_normal(n)
    values, vectors = scipy.sparse.linalg.eigsh(
        operator,
        k=problem.num_eigvecs,
        which="LA",
        tol=0.0 if problem.tol is None else problem.tol,
        v0=start,
    )
    order = np.argsort(values)[::-1]
    products = counter["products"]
    return Solution(values[order], vectors[:, order], None, products, products)


def solve_chebyshev(problem: KernelProblem) -> Solution:
    """Chebyshev-filtered subspace iteration (degree ``CHEBYSHEV_DEGREE``) with locking."""
    return _block_iteration(problem, chebyshev=True)


def solve_subspace(problem: KernelProblem) -> Solution:
    """Plain blocked subspace iteration with Rayleigh–Ritz and soft locking."""
    return _block_iteration(problem, chebyshev=False)


def _block_iteration(problem: KernelProblem, *, chebyshev: bool) -> Solution:
    """``chebyshev`` or ``subspace`` over products K X in ``problem.product_dtype``, streamed
    over row panels (tol None: 5e-6 with float32 products, 1e-10 with float64)."""
    n, k, dtype = problem.n, problem.num_eigvecs, problem.product_dtype
    tol = problem.tol
    if tol is None:
        tol = 5e-6 if dtype == np.float32 else 1e-10
    oversampling = problem.oversampling
    if oversampling is None:
        oversampling = default_oversampling(k, n)
    block = min(n, k + (max(1, oversampling) if chebyshev else oversampling))
    matmat, counter = _panel_matmat(
        problem.kernel, dtype, result_dtype=dtype if chebyshev else None
    )
    name = "Chebyshev subspace iteration" if chebyshev else "subspace iteration"
    bar = progress_bar(
        total=problem.num_iterations, desc=name, unit="iter", enabled=problem.progress
    )
    started = time.perf_counter()

    def report(residual: float | None, converged: int | None = None) -> None:
        bar.update(1, converged=f"{converged}/{k}", residual=f"{residual:.1e}")
        logger.info(
            "%s: %d products, %d/%d pairs converged, max residual %.2e (tol %.0e), %.1f s",
            name, counter["products"], converged, k, residual, tol,
            time.perf_counter() - started,
        )  # fmt: skip

    logger.info(
        "%s: block of %d vectors (k=%d + %d)%s, %s products over %d-row panels",
        name, block, k, block - k,
        f", filter degree {CHEBYSHEV_DEGREE}" if chebyshev else "", dtype, counter["panel_rows"],
    )  # fmt: skip
    options = dict(
        block=block,
        num_iterations=problem.num_iterations,
        tol=tol,
        rng=np.random.default_rng(problem.seed),
        report=report,
    )
    try:
        if chebyshev:
            result = chebyshev_subspace_iteration(
                matmat, n, k, degree=CHEBYSHEV_DEGREE, dtype=dtype, **options
            )
        else:
            result = subspace_iteration(matmat, n, k, **options)
    finally:
        bar.close()
    return Solution(
        values=result.values,
        vectors=result.vectors,
        next_value=result.next_value,
        iterations=result.iterations,
        passes=counter["products"],
        products=result.products,
    )


def _lapack_top(problem: KernelProblem, driver: str) -> Solution:
    """Top-k eigenpairs [k], [N, k] (descending) and λ_{k+1} (None if k = N) by LAPACK, in
    ``problem.dtype`` (a float32 solve uses ssyev*)."""
    n, k = problem.n, problem.num_eigvecs
    matrix = np.asarray(problem.kernel, dtype=problem.dtype)
    wanted = min(n, k + 1)  # one more for the last pair's gap
    if driver == "evr":
        values, vectors = scipy.linalg.eigh(
            matrix, subset_by_index=(n - wanted, n - 1), driver="evr", check_finite=False
        )
    else:
        values, vectors = scipy.linalg.eigh(matrix, driver="evd", check_finite=False)
    values, vectors = values[::-1][:wanted], vectors[:, ::-1][:, :wanted]
    next_value = float(values[k]) if wanted > k else None
    return Solution(values[:k], np.ascontiguousarray(vectors[:, :k]), next_value, 0, 1)


def working_dtype(kernel: np.ndarray) -> np.dtype:
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
