"""Top-k eigenpairs of an empirical NTK: from a stored kernel, matrix-free, or by Nyström.

Dimensions: N examples, P parameters, k eigenpairs, b vectors in a block, m Nyström landmarks.

    pairs = top_eigenpairs(kernel, num_eigvecs=1000)  # kernel [N, N] array or .npy memmap
    pairs.values, pairs.vectors                       # [k] descending, [N, k] orthonormal
    pairs.residuals, pairs.gaps                       # [k]: ‖Kv − λv‖/λ_1, relative gaps
    pairs.iterations, pairs.passes, pairs.max_residual
    pairs.unresolved, pairs.num_unresolved, pairs.first_unresolved   # [k] bool: gap <= residual
    pairs = matrix_free_eigenpairs(apply_fn, params, x, 10)          # x [N, H, W, C]; no K [N, N]
    pairs = nystrom_eigenpairs(apply_fn, params, x, 10, num_landmarks=500)   # K [N, m] only

How the stored-kernel solver is chosen (``solver="auto"``, :func:`choose_solver`): LAPACK's
MRRR subset driver ``syevr`` (``"evr"``, top-k only) while N <= ``DENSE_MAX_N`` (5,000) and the
kernel plus LAPACK's workspace (≈ 3 N² words) fit in half the RAM, or divide and conquer ``syevd``
(``"evd"``) when k > N / 2; beyond that, Chebyshev-filtered subspace iteration (``"chebyshev"``,
Zhou & Saad 2007): between Rayleigh–Ritz steps the active block X [N, a] is multiplied by a
degree-3 Chebyshev polynomial of K that is at most 1 on [0, λ_b] and grows fast above it, so the
last wanted pairs converge in 2–3 outer iterations instead of 10 (LeNet at N = 6,102, k = 1,000:
8–9 GEMMs K X). Each GEMM is float32 by default (the accuracy target is relative to λ_1, so a
float32 product suffices) and streamed in row panels when K is a ``np.memmap`` (the engine writes
out-of-core kernels as ``.npy`` memmaps); Cholesky QR2 (first pass float64), Rayleigh–Ritz with
SciPy/LAPACK ``eigh``, and converged leading pairs are locked. LAPACK's O(N³) tridiagonal reduction
is memory-bound half of the time; the filter's work is O(N² k) in GEMMs at the matmul rate. The
measured crossover on the project machine is in BENCHMARKS.md ("Eigensolvers:
Chebyshev-filtered subspace iteration"). Plain
subspace iteration (``"subspace"``) and ARPACK Lanczos (``"lanczos"``, small k) remain selectable.

``matrix_free_eigenpairs`` never forms K [N, N]: it applies K·V = J (Jᵀ V) to blocks V [N, b]
through the engine's operator :class:`ntklab.ntk.KernelOperator` (two passes over the data per
product, sharded over the devices, with the engine's implementations
``ntklab.ntk.OPERATOR_IMPLEMENTATIONS``) inside a block Krylov, LOBPCG, Lanczos or subspace
solver. ``nystrom_eigenpairs`` eigendecomposes the Nyström approximation K_nm K_mm⁺ K_nmᵀ built
from m landmark columns of K (from the same operator) and reports its residuals against the true
kernel.

**The solver table.** ``SOLVER_TABLE`` (``ntklab.eigen._solvers``) names every ``ntk.solver``
value once, with whether it needs the formed kernel and the one function that runs it:
``SOLVERS`` = auto, dense, evr, evd, chebyshev, subspace, lanczos, matrix_free, nystrom (choosers,
LAPACK, iterative over a stored kernel, never forming the kernel); ``KERNEL_SOLVERS`` (the first
seven) go through :func:`top_eigenpairs`, ``MATRIX_FREE_SOLVERS`` (``matrix_free``, ``nystrom``)
through :func:`matrix_free_eigenpairs` and :func:`nystrom_eigenpairs`. ``top_eigenpairs(...,
dtype="float64")`` solves a float32 kernel in float64 (LAPACK on a float64 copy, float64
products). The host BLAS/LAPACK work of a solve runs under ``ntklab.threads.host_only``, which
picks the thread count from the idle CPUs; float32 results of near-degenerate pairs depend on
that count (LeNet CIFAR, k = 1,000, float32 Chebyshev: 387 eigenvectors change >1 % of their
labels between 1 and 2 threads), float64 solves do not (BENCHMARKS.md, "Eigensolvers: threads,
float64, kernel regression"). ``METHODS`` are the block methods of ``matrix_free``
(``method=``), not ``ntk.solver`` values.

Every result carries each pair's residual ‖K v_j − λ_j v_j‖ / λ_1 against the true kernel and its
relative gap min(λ_{j−1} − λ_j, λ_j − λ_{j+1}) / λ_1: a pair whose gap is below its residual is
not resolved individually (``Eigenpairs.unresolved``, :func:`unresolved_pairs`,
:func:`resolution_summary`). Eigenvectors are only defined up to sign; each vector's entry of
largest magnitude is made positive, which makes the eigenfunction labels (sign(v) + 1) / 2
reproducible.
"""

from ntklab.eigen._iterative import METHODS, SolverResult
from ntklab.eigen._matrix_free import matrix_free_eigenpairs, nystrom_eigenpairs
from ntklab.eigen._pairs import (
    Eigenpairs,
    max_relative_residual,
    pair_residuals,
    relative_gaps,
    resolution_summary,
    unresolved_pairs,
)
from ntklab.eigen._solvers import (
    KERNEL_SOLVERS,
    MATRIX_FREE_SOLVERS,
    PRECISIONS,
    PRODUCT_DTYPES,
    SOLVER_TABLE,
    SOLVERS,
    KernelSolver,
    Solver,
    SolverSpec,
    resolve_solver,
    top_eigenpairs,
)
from ntklab.eigen._stored import DENSE_MAX_N, choose_solver, default_oversampling

__all__ = [
    "DENSE_MAX_N",
    "KERNEL_SOLVERS",
    "MATRIX_FREE_SOLVERS",
    "METHODS",
    "PRECISIONS",
    "PRODUCT_DTYPES",
    "SOLVERS",
    "SOLVER_TABLE",
    "Eigenpairs",
    "KernelSolver",
    "Solver",
    "SolverResult",
    "SolverSpec",
    "choose_solver",
    "default_oversampling",
    "matrix_free_eigenpairs",
    "max_relative_residual",
    "nystrom_eigenpairs",
    "pair_residuals",
    "relative_gaps",
    "resolution_summary",
    "resolve_solver",
    "top_eigenpairs",
    "unresolved_pairs",
]
