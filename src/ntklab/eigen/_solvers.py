"""The table of every eigensolver (``ntk.solver``) and ``top_eigenpairs``, the stored-kernel
dispatcher.

Dimensions: N examples, k eigenpairs.

    SOLVER_TABLE["chebyshev"].needs_kernel                  # True: eigendecomposes a formed K
    pairs = top_eigenpairs(kernel, num_eigvecs=1000)        # kernel [N, N]; solver="auto"
    pairs.values, pairs.vectors, pairs.residuals, pairs.gaps   # [k], [N, k], [k], [k]

``SOLVERS`` lists every name in the table's order: the two choosers first (``auto``, the default,
and ``dense``), then LAPACK (``evr``, ``evd``), the iterative solvers of a stored kernel
(``chebyshev``, ``subspace``, ``lanczos``), and last the two that never form the kernel
(``matrix_free``, ``nystrom``). ``KERNEL_SOLVERS`` are the names ``top_eigenpairs`` takes,
``MATRIX_FREE_SOLVERS`` the others (their functions take ``apply_fn, params, x``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal, NamedTuple

import numpy as np

from ntklab import threads
from ntklab.eigen import _stored
from ntklab.eigen._matrix_free import matrix_free_eigenpairs, nystrom_eigenpairs
from ntklab.eigen._pairs import (
    Eigenpairs,
    pair_residuals,
    relative_gaps,
    residuals_from_products,
    sign_flips,
)
from ntklab.eigen._stored import KernelProblem, Solution, default_oversampling, working_dtype

logger = logging.getLogger(__name__)

Kind = Literal["chooser", "direct", "iterative", "matrix_free"]


class SolverSpec(NamedTuple):
    """One row of the solver table.

    Attributes:
      name: the ``solver=`` / ``ntk.solver`` value.
      needs_kernel: True when the solver eigendecomposes a formed kernel [N, N].
      kind: ``"chooser"`` (picks another solver: ``function(n, k, itemsize) -> name``),
        ``"direct"`` (LAPACK) or ``"iterative"`` (``function(KernelProblem) -> Solution``), or
        ``"matrix_free"`` (``function(apply_fn, params, x, num_eigvecs, **options) ->
        Eigenpairs``, the public entry point).
      function: see ``kind``.
      flops: rough floating-point operations of a solve at (N, k), for the BLAS thread policy
        (None for choosers and matrix-free solvers).
      summary: one line for documentation and logs.
    """

    name: str
    needs_kernel: bool
    kind: Kind
    function: Callable
    flops: Callable[[int, int], float] | None
    summary: str


def _block_width(n: int, k: int) -> int:
    return min(n, k + max(1, default_oversampling(k, n)))


SOLVER_TABLE: dict[str, SolverSpec] = {
    spec.name: spec
    for spec in (
        SolverSpec(
            "auto", True, "chooser", _stored.choose_solver, None,
            "evr while N <= DENSE_MAX_N and LAPACK fits, evd when k > N/2, else chebyshev",
        ),
        SolverSpec(
            "dense", True, "chooser", _stored.choose_dense, None,
            "LAPACK whatever N: evd when k > N/2, else evr",
        ),
        SolverSpec(
            "evr", True, "direct", _stored.solve_evr,
            lambda n, k: 4 / 3 * n**3 + 6.0 * n * n * k,
            "LAPACK syevr (MRRR) on the top-k index subset",
        ),
        SolverSpec(
            "evd", True, "direct", _stored.solve_evd, lambda n, k: 4.0 * n**3 + 2.0 * n * n * k,
            "LAPACK syevd (divide and conquer), all N pairs",
        ),
        SolverSpec(
            "chebyshev", True, "iterative", _stored.solve_chebyshev,
            lambda n, k: 20.0 * n * n * _block_width(n, k),
            "Chebyshev-filtered subspace iteration with locking (GEMMs over row panels)",
        ),
        SolverSpec(
            "subspace", True, "iterative", _stored.solve_subspace,
            lambda n, k: 40.0 * n * n * _block_width(n, k),
            "plain blocked subspace iteration with Rayleigh-Ritz and soft locking",
        ),
        SolverSpec(
            "lanczos", True, "iterative", _stored.solve_lanczos,
            lambda n, k: 8.0 * n * n * (k + 10),
            "ARPACK eigsh (implicitly restarted Lanczos, matrix-vector products)",
        ),
        SolverSpec(
            "matrix_free", False, "matrix_free", matrix_free_eigenpairs, None,
            "block Krylov over kernel-vector products K V = J (J^T V); K is never formed",
        ),
        SolverSpec(
            "nystrom", False, "matrix_free", nystrom_eigenpairs, None,
            "Nystrom approximation from m landmark columns K [N, m]",
        ),
    )
}  # fmt: skip
"""Every eigensolver by name, in the documented order of ``SOLVERS``."""

SOLVERS: tuple[str, ...] = tuple(SOLVER_TABLE)
"""Every ``ntk.solver`` name: auto, dense, evr, evd, chebyshev, subspace, lanczos, matrix_free,
nystrom (choosers, LAPACK, iterative over a stored kernel, never forming the kernel)."""
KERNEL_SOLVERS: tuple[str, ...] = tuple(s.name for s in SOLVER_TABLE.values() if s.needs_kernel)
"""The solvers that eigendecompose a formed kernel: the names :func:`top_eigenpairs` takes."""
MATRIX_FREE_SOLVERS: tuple[str, ...] = tuple(
    s.name for s in SOLVER_TABLE.values() if not s.needs_kernel
)
"""The solvers that never form the kernel: ``matrix_free`` and ``nystrom``."""

Solver = Literal[
    "auto", "dense", "evr", "evd", "chebyshev", "subspace", "lanczos", "matrix_free", "nystrom"
]
KernelSolver = Literal["auto", "dense", "evr", "evd", "chebyshev", "subspace", "lanczos"]
Precision = Literal["auto", "float32", "float64"]
PRECISIONS: tuple[str, ...] = ("auto", "float32", "float64")
"""Choices of ``dtype=`` and ``product_dtype=``."""
PRODUCT_DTYPES = PRECISIONS


def resolve_solver(solver: str, n: int, num_eigvecs: int, itemsize: int = 4) -> str:
    """The stored-kernel solver that ``solver`` runs for N, k and the working precision's
    ``itemsize``: a chooser's pick, and ``"evd"`` for an iterative solver when k >= N − 1.

    Raises:
      ValueError: ``solver`` is not one of ``KERNEL_SOLVERS``.
    """
    spec = _kernel_spec(solver)
    if spec.kind == "chooser":
        spec = SOLVER_TABLE[spec.function(n, num_eigvecs, itemsize)]
    if spec.kind == "iterative" and num_eigvecs >= n - 1:
        logger.info("%s needs k < N - 1; using LAPACK for k=%d, N=%d", spec.name, num_eigvecs, n)
        return "evd"
    return spec.name


def top_eigenpairs(
    kernel: np.ndarray,
    num_eigvecs: int,
    *,
    solver: KernelSolver = "auto",
    dtype: Precision = "auto",
    tol: float | None = None,
    seed: int = 0,
    oversampling: int | None = None,
    num_iterations: int = 100,
    product_dtype: Precision = "auto",
    verify: bool = True,
    progress: bool = False,
) -> Eigenpairs:
    """Computes the ``num_eigvecs`` largest eigenpairs of a symmetric PSD kernel.

    Args:
      kernel: symmetric matrix [N, N] (float16, float32 or float64; a ``np.memmap`` is streamed in
        row panels by ``chebyshev``, ``subspace`` and ``lanczos`` and never loaded whole).
      num_eigvecs: number of eigenpairs k, 1 <= k <= N.
      solver: one of ``KERNEL_SOLVERS``: ``"evr"`` (LAPACK ``syevr`` on the top-k index subset,
        MRRR), ``"evd"`` (LAPACK divide and conquer, all N pairs), ``"dense"`` (whichever of the
        two suits k), ``"chebyshev"`` (subspace iteration whose block is multiplied by a
        degree-3 Chebyshev filter between Rayleigh–Ritz steps, with locking: large GEMMs over the
        stored kernel, several times fewer than plain), ``"subspace"`` (plain blocked subspace
        iteration with Rayleigh–Ritz and soft locking), ``"lanczos"`` (ARPACK ``eigsh``:
        matrix-vector products), or ``"auto"`` (:func:`choose_solver`).
      dtype: the working precision: ``"float64"`` runs LAPACK on a float64 copy and makes the
        products of the iterative solvers float64 (for pairs beyond float32's resolution; the
        copy is 8 N² bytes); ``"float32"``; ``"auto"``: the kernel's dtype (float32 for float16).
      tol: iterative solvers stop once every ‖K v_j − λ_j v_j‖ / λ_1 < tol (``lanczos``: ARPACK's
        relative tolerance). None: 5e-6 for ``chebyshev``/``subspace`` with float32 products,
        1e-10 with float64 products, 0 (machine precision) for ``lanczos``.
      seed: seeds the random starting block (iterative solvers).
      oversampling: block vectors beyond k for ``chebyshev`` (at least 1) and ``subspace``
        (None: ``default_oversampling``).
      num_iterations: most outer iterations of ``chebyshev``/``subspace``.
      product_dtype: dtype of the products K X in ``chebyshev``/``subspace`` (``chebyshev`` also
        keeps its block in it): ``"float32"`` (a float32 GEMM, about 2× faster; residuals reach
        ~1e-6 of λ_1), ``"float64"``, or ``"auto"`` (the working precision ``dtype``).
      verify: measure every pair's residual in float64 with one more pass over the kernel
        (otherwise ``chebyshev``/``subspace`` report the residuals of their own last products).
      progress: show a progress bar over the iterations (converged pairs, residual).

    Returns:
      The eigenpairs (values descending, float64) with per-pair residuals and gaps, the
      iterations and the passes over the kernel. The host BLAS/LAPACK work (solve and residual
      check) runs in one ``threads.host_only`` scope.

    Raises:
      ValueError: a non-square kernel, k outside [1, N], an unknown option, or a matrix-free
        solver (those take ``apply_fn, params, x``: see ``SOLVER_TABLE``).
    """
    problem = _problem(
        kernel, num_eigvecs, solver=solver, dtype=dtype, tol=tol, seed=seed,
        oversampling=oversampling, num_iterations=num_iterations, product_dtype=product_dtype,
        progress=progress,
    )  # fmt: skip
    n = problem.n
    name = resolve_solver(solver, n, num_eigvecs, problem.dtype.itemsize)
    spec = SOLVER_TABLE[name]
    tic = time.perf_counter()
    logger.info(
        "top %d eigenpairs of a %s kernel [%d, %d]%s by %s in %s",
        num_eigvecs, kernel.dtype, n, n, " (memmap)" if isinstance(kernel, np.memmap) else "",
        name, problem.product_dtype if spec.kind == "iterative" else problem.dtype,
    )  # fmt: skip
    flops = spec.flops(n, num_eigvecs) + (2.0 * n * n * num_eigvecs if verify else 0.0)
    with threads.host_only(flops=flops, what="eigensolver"):
        solution = spec.function(problem)
        pairs = _eigenpairs(kernel, name, solution, verify=verify)
    logger.info(
        "%s: %d eigenpairs in %.2f s, %d iterations, %d passes over the kernel, max residual "
        "%.2e, %d unresolved (gap <= residual)",
        name, num_eigvecs, time.perf_counter() - tic, pairs.iterations, pairs.passes,
        pairs.max_residual, pairs.num_unresolved,
    )  # fmt: skip
    return pairs


def _kernel_spec(solver: str) -> SolverSpec:
    spec = SOLVER_TABLE.get(solver) if isinstance(solver, str) else None
    if spec is None:
        raise ValueError(
            f"unknown eigensolver {solver!r}; valid choices: {', '.join(KERNEL_SOLVERS)}"
        )
    if not spec.needs_kernel:
        raise ValueError(
            f"eigensolver {solver!r} never forms the kernel: call "
            f"ntklab.eigen.{spec.function.__name__}(apply_fn, params, x, num_eigvecs, ...) "
            f"instead; top_eigenpairs takes {', '.join(KERNEL_SOLVERS)}"
        )
    return spec


def _problem(
    kernel: np.ndarray, num_eigvecs: int, *, solver: str, dtype: str, product_dtype: str,
    oversampling: int | None, num_iterations: int, tol: float | None, seed: int, progress: bool,
) -> KernelProblem:  # fmt: skip
    """Checks ``top_eigenpairs``' arguments (raising ValueError naming the bad value) and
    resolves the working precisions."""
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"kernel must be square [N, N], got shape {kernel.shape}")
    n = kernel.shape[0]
    if isinstance(num_eigvecs, bool) or not isinstance(num_eigvecs, int | np.integer):
        raise ValueError(f"num_eigvecs must be an integer, got {num_eigvecs!r}")
    if not 1 <= num_eigvecs <= n:
        raise ValueError(
            f"num_eigvecs={num_eigvecs} must be between 1 and N={n} (number of samples)"
        )
    _kernel_spec(solver)
    for option, value in (("dtype", dtype), ("product_dtype", product_dtype)):
        if value not in PRECISIONS:
            raise ValueError(f"unknown {option} {value!r}; valid choices: {', '.join(PRECISIONS)}")
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
    working = working_dtype(kernel) if dtype == "auto" else np.dtype(dtype)
    products = working if product_dtype == "auto" else np.dtype(product_dtype)
    return KernelProblem(
        kernel, int(num_eigvecs), dtype=working, product_dtype=products, tol=tol, seed=seed,
        oversampling=oversampling, num_iterations=num_iterations, progress=progress,
    )  # fmt: skip


def _eigenpairs(kernel: np.ndarray, name: str, solution: Solution, *, verify: bool) -> Eigenpairs:
    """Signs (largest-magnitude entry positive), float64 residuals and gaps of a solution."""
    values = np.asarray(solution.values, dtype=np.float64)
    signs = sign_flips(np.asarray(solution.vectors))
    vectors = np.asarray(solution.vectors) * signs
    passes = solution.passes
    if verify or solution.products is None:
        residuals = pair_residuals(kernel, values, vectors)
        passes += 1
    else:
        residuals = residuals_from_products(solution.products * signs, values, vectors)
    return Eigenpairs(
        values=values,
        vectors=vectors,
        solver=name,
        residuals=residuals,
        gaps=relative_gaps(values, solution.next_value),
        iterations=solution.iterations,
        passes=passes,
    )
