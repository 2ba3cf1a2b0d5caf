"""Top-k eigenpairs of the eNTK without a stored kernel: matrix-free products or Nyström.

Dimensions: N examples, P parameters, C outputs, k eigenpairs, b vectors in a block, m Nyström
landmarks.

    pairs = matrix_free_eigenpairs(apply_fn, params, x, 10)          # x [N, H, W, C]; no K [N, N]
    pairs = nystrom_eigenpairs(apply_fn, params, x, 10, num_landmarks=500)   # K [N, m] only

Both see the kernel (the trace kernel Σ_c for C > 1 outputs) only through the engine's
matrix-free operator :class:`ntklab.ntk.KernelOperator` (sharded over the devices, Dense layers
factored where proven exact), whose implementations are ``ntklab.ntk.OPERATOR_IMPLEMENTATIONS``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import jax
import numpy as np

from ntklab.eigen._iterative import METHODS, SolverResult
from ntklab.eigen._pairs import (
    Eigenpairs,
    MatmatFn,
    relative_gaps,
    residuals_from_products,
    sign_flips,
)
from ntklab.ntk import OPERATOR_IMPLEMENTATIONS, Implementation, KernelOperator, empirical_ntk
from ntklab.progress import progress_bar
from ntklab.types import ApplyFn, PyTree

logger = logging.getLogger(__name__)


Method = Literal["block_krylov", "lobpcg", "lanczos", "subspace"]


def matrix_free_eigenpairs(
    apply_fn: ApplyFn,
    params: PyTree,
    x: np.ndarray | jax.Array,
    num_eigvecs: int,
    *,
    batch_size: int = 256,
    method: Method = "block_krylov",
    implementation: Implementation = "auto",
    oversampling: int = 10,
    num_iterations: int = 100,
    tol: float | None = None,
    seed: int = 0,
    memory_bytes: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    progress: bool = False,
) -> Eigenpairs:
    """Top eigenpairs of the empirical NTK K = J Jᵀ [N, N] without forming K.

    Every access to K is a product K·V = J (Jᵀ V) with a block V [N, b] by
    :class:`ntklab.ntk.KernelOperator`: one pass over the data accumulating Jᵀ V, one giving
    J (Jᵀ V) [N, b]. The blocks' Jacobian features stay on the devices between products when they
    fit half the memory budget (each product is then two matrix products); otherwise they are
    recomputed in every pass, or replaced by VJPs and JVPs (``"ntk_vector_products"``).

    Args:
      apply_fn: ``apply_fn(params, x[B, ...]) -> [B, C]`` with any BatchNorm in inference mode;
        for C > 1 the kernel is the trace kernel Σ_c ∇f_c·∇f_c.
      params: the parameters θ (a pytree, P scalars in all); their dtype sets the passes' dtype.
      x: inputs [N, ...].
      num_eigvecs: number of eigenpairs k, 1 <= k <= N (k < N - 1 for ``"lanczos"``).
      batch_size: examples per data block B (rounded up to a multiple of the device count).
      method: ``"block_krylov"`` (randomized block Krylov with Rayleigh–Ritz and thick restarts,
        blocks of b = k + oversampling vectors; Musco & Musco 2015), ``"lobpcg"``
        (``scipy.sparse.linalg.lobpcg`` with blocks of b vectors, started from one power step),
        ``"lanczos"`` (ARPACK ``eigsh``; one vector per product, so b = 1 and many more passes)
        or ``"subspace"`` (blocked subspace iteration).
      implementation: the operator's, one of ``ntklab.ntk.OPERATOR_IMPLEMENTATIONS``:
        ``"jacobian"``, ``"structured"`` (Dense layers proven exact factored),
        ``"ntk_vector_products"`` (vmapped VJP / JVP per block, no Jacobian stored) or ``"auto"``
        (features when they fit the budget or b exceeds a few vectors, else VJP / JVP products).
      oversampling: extra vectors in a block beyond k (block methods); more speeds convergence
        when eigenvalues near λ_k cluster.
      num_iterations: most block products (``"block_krylov"``: including the first;
        ``"lobpcg"``: its iterations after the start) or ARPACK restarts (``"lanczos"``).
      tol: stop once every top-k residual ‖K v_j − λ_j v_j‖ / λ_1 is below it (``"lanczos"``:
        ARPACK's relative tolerance ‖r_j‖ <= tol·λ_j). None picks max(1e-10, 100·eps) of the
        parameters' dtype: 1.2e-5 in float32, 1e-10 in float64.
      seed: seeds the random starting block.
      memory_bytes: per-device budget of the operator; None as in :func:`ntklab.ntk.empirical_ntk`.
      devices: devices to shard the data blocks over; None: all of ``jax.devices()``.
      progress: show a progress bar over block products (block methods; block Krylov also shows
        the current residual).

    Returns:
      ``Eigenpairs`` with values [k] (descending, float64), orthonormal vectors [N, k] (float64,
      largest-magnitude entry positive), ``solver="matrix_free:<method>"`` and ``max_residual``
      measured with one more product against the true kernel. A solver that hits
      ``num_iterations`` first logs a warning; ``max_residual`` then says how far it got.

    Raises:
      ValueError: an unknown method or implementation (naming the valid choices), k outside its
        range, or a bad option value.
    """
    n = len(x)
    _check_matrix_free(method, implementation, num_eigvecs, n, oversampling, num_iterations, tol)
    block = min(n, num_eigvecs + oversampling)
    options = {"implementation": implementation, "batch_size": batch_size,
               "memory_bytes": memory_bytes, "devices": devices}  # fmt: skip
    width = 1 if method == "lanczos" else block
    operator = KernelOperator(apply_fn, params, x, width=width, **options)
    if tol is None:
        tol = max(1e-10, 100 * float(np.finfo(operator.dtype).eps))
    logger.info(
        "matrix-free eigenpairs (%s, %s): N=%d, P=%d, k=%d, blocks of %d vectors in passes of %d, "
        "%d-example data blocks, tol=%.1e",
        method, operator.implementation, n, operator.num_params, num_eigvecs, block,
        operator.width, operator.batch_size, tol,
    )  # fmt: skip
    values, vectors, result = _run_method(
        method, operator, num_eigvecs, block=block, num_iterations=num_iterations, tol=tol,
        seed=seed, progress=progress,
    )  # fmt: skip
    if method == "lanczos" and not operator.cached:  # one pass pair for k vectors, not k pairs
        checker = KernelOperator(apply_fn, params, x, width=num_eigvecs, **options)
        residuals, passes = _checked_residuals(checker, values, vectors, operator.num_passes)
    else:
        residuals, passes = _checked_residuals(operator, values, vectors, 0)
    return Eigenpairs(
        values=values,
        vectors=vectors,
        solver=f"matrix_free:{method}",
        residuals=residuals,
        gaps=relative_gaps(values, result.next_value),
        iterations=result.iterations,
        passes=passes,
    )


def nystrom_eigenpairs(
    apply_fn: ApplyFn,
    params: PyTree,
    x: np.ndarray | jax.Array,
    num_eigvecs: int,
    *,
    num_landmarks: int,
    seed: int = 0,
    batch_size: int = 256,
    implementation: Implementation = "auto",
    memory_bytes: int | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Eigenpairs:
    """Top eigenpairs of the Nyström approximation K̃ = K_nm K_mm⁺ K_nmᵀ of the empirical NTK.

    The m landmarks are the first m of a seeded permutation of the examples (so the landmark sets
    of one seed are nested: more landmarks never make the approximation worse). Only the kernel
    columns K_nm [N, m] are computed, and K_mm = K_nm[landmarks]. They come from the same
    :class:`ntklab.ntk.KernelOperator` as the residual check: as K·E for the landmarks' unit
    vectors E [N, m] when the operator keeps its features on the devices (one feature pass serves
    columns and residuals), else from :func:`ntklab.ntk.empirical_ntk` on (x, x[landmarks]) (one
    pass over N + m examples). With K_mm = U Λ Uᵀ, eigenvalues below m·eps·λ_max are dropped and
    K̃ = F Fᵀ with F = K_nm U Λ^{-1/2} [N, r]; a thin SVD of F gives the eigenpairs, in float64.

    Args:
      apply_fn: ``apply_fn(params, x[B, ...]) -> [B, C]`` with any BatchNorm in inference mode
        (C > 1: the trace kernel).
      params: the parameters θ (a pytree).
      x: inputs [N, ...].
      num_eigvecs: number of eigenpairs k, 1 <= k <= num_landmarks.
      num_landmarks: landmark count m, k <= m <= N; m = N gives the exact eigenpairs.
      seed: seeds the landmark permutation.
      batch_size: examples per data block, for the kernel columns and the residual's product.
      implementation: one of ``ntklab.ntk.OPERATOR_IMPLEMENTATIONS`` (see
        :func:`matrix_free_eigenpairs`).
      memory_bytes: per-device budget; None as in :func:`ntklab.ntk.empirical_ntk`.
      devices: devices to shard the data blocks over; None: all of ``jax.devices()``.

    Returns:
      ``Eigenpairs`` of K̃ (values [k] descending, vectors [N, k] float64, ``solver="nystrom"``);
      ``max_residual`` is measured against the true kernel K with one matrix-free product, so it
      says how good the approximation is.

    Raises:
      ValueError: k or m out of range, an unknown implementation, or K_mm of numerical rank
        below k.
    """
    _check_implementation(implementation)
    n = len(x)
    _check_num_eigvecs(num_eigvecs, n)
    if (
        isinstance(num_landmarks, bool)
        or not isinstance(num_landmarks, int)
        or not num_eigvecs <= num_landmarks <= n
    ):
        raise ValueError(
            f"num_landmarks={num_landmarks!r} must be an integer between num_eigvecs={num_eigvecs} "
            f"and N={n} (number of samples)"
        )
    options = {"implementation": implementation, "batch_size": batch_size,
               "memory_bytes": memory_bytes, "devices": devices}  # fmt: skip
    operator = KernelOperator(apply_fn, params, x, **options)
    landmarks = np.sort(np.random.default_rng(seed).permutation(n)[:num_landmarks])
    if operator.cached:
        selector = np.zeros((n, num_landmarks), operator.dtype)
        selector[landmarks, np.arange(num_landmarks)] = 1.0
        columns = operator.matmat(selector)
    else:
        columns = empirical_ntk(apply_fn, params, x, x[landmarks], **options)
    values, vectors, next_value = _nystrom_top(columns, landmarks, num_eigvecs)
    vectors = vectors * sign_flips(vectors)
    residuals = _operator_residuals(operator.matmat, values, vectors)
    passes = operator.num_passes + (0 if operator.cached else 1)  # + empirical_ntk's one pass
    logger.info(
        "Nyström eigenpairs: N=%d, m=%d landmarks, k=%d (columns %s); max relative residual "
        "against the true kernel %.2e",
        n, num_landmarks, num_eigvecs,
        "K·E from cached features" if operator.cached else "by empirical_ntk", residuals.max(),
    )  # fmt: skip
    return Eigenpairs(
        values=values,
        vectors=vectors,
        solver="nystrom",
        residuals=residuals,
        gaps=relative_gaps(values, next_value),
        iterations=0,
        passes=passes,
    )


def _check_matrix_free(
    method: str,
    implementation: str,
    num_eigvecs: int,
    n: int,
    oversampling: int,
    num_iterations: int,
    tol: float | None,
) -> None:
    """``matrix_free_eigenpairs``' option checks: ValueError naming the bad value."""
    _check_implementation(implementation)
    if method not in METHODS:
        raise ValueError(
            f"unknown matrix-free method {method!r}; valid choices: {', '.join(METHODS)}"
        )
    _check_positive_int("num_iterations", num_iterations)
    if isinstance(oversampling, bool) or not isinstance(oversampling, int) or oversampling < 0:
        raise ValueError(f"oversampling must be a non-negative integer, got {oversampling!r}")
    _check_num_eigvecs(num_eigvecs, n)
    if method == "lanczos" and num_eigvecs >= n - 1:
        raise ValueError(
            f"method 'lanczos' needs num_eigvecs < N - 1; got num_eigvecs={num_eigvecs}, N={n} "
            "(use method 'block_krylov')"
        )
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")


def _run_method(
    method: str,
    operator: KernelOperator,
    num_eigvecs: int,
    *,
    block: int,
    num_iterations: int,
    tol: float,
    seed: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, SolverResult]:
    """Runs ``METHODS[method]`` on the operator's products with a progress bar over them.

    Returns:
      values [k] descending (float64), vectors [N, k] (largest-magnitude entry positive) and the
      method's result.
    """
    bar = progress_bar(
        total=num_iterations,
        desc=f"matrix-free eigenpairs ({method})",
        unit="product",
        enabled=progress and method != "lanczos",
    )
    try:
        result = METHODS[method](
            operator.matmat,
            operator.num_examples,
            num_eigvecs,
            block=block,
            num_iterations=num_iterations,
            tol=tol,
            rng=np.random.default_rng(seed),
            report=lambda residual, converged=None: (
                bar.update(1) if residual is None else bar.update(1, residual=f"{residual:.2e}")
            ),
        )
    finally:
        bar.close()
    order = np.argsort(result.values)[::-1]
    values, vectors = np.asarray(result.values, np.float64)[order], result.vectors[:, order]
    logger.info(
        "matrix-free eigenpairs (%s): %d vector products in %d passes over the data, %.2f s",
        method, operator.num_products, operator.num_passes, operator.seconds,
    )  # fmt: skip
    return values, vectors * sign_flips(vectors), result


def _check_implementation(implementation: str) -> None:
    if implementation not in OPERATOR_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {implementation!r}; valid choices: "
            f"{', '.join(OPERATOR_IMPLEMENTATIONS)}"
        )


def _check_num_eigvecs(num_eigvecs: int, n: int) -> None:
    if (
        isinstance(num_eigvecs, bool)
        or not isinstance(num_eigvecs, int)
        or not 1 <= num_eigvecs <= n
    ):
        raise ValueError(
            f"num_eigvecs={num_eigvecs!r} must be between 1 and N={n} (number of samples)"
        )


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _checked_residuals(
    checker: KernelOperator, values: np.ndarray, vectors: np.ndarray, earlier_passes: int
) -> tuple[np.ndarray, int]:
    """True residuals [k] of the pairs by one product of ``checker``, and all passes over the
    data (``checker``'s plus ``earlier_passes`` of another operator), with a log line."""
    residuals = _operator_residuals(checker.matmat, values, vectors)
    logger.info("matrix-free eigenpairs: max relative residual %.2e", residuals.max())
    return residuals, checker.num_passes + earlier_passes


def _operator_residuals(matmat: MatmatFn, values: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """‖K v_j − λ_j v_j‖ / λ_1 [k] (float64) with one product; values [k], vectors [N, k]."""
    return residuals_from_products(matmat(vectors), values, vectors)


def _nystrom_top(
    columns: np.ndarray, landmarks: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Top-k eigenpairs [k], [N, k] (descending) of K_nm K_mm⁺ K_nmᵀ from columns K_nm [N, m],
    and its (k+1)-th eigenvalue (None when the approximation has rank k)."""
    eps = float(np.finfo(columns.dtype).eps)
    columns = np.asarray(columns, dtype=np.float64)
    core = columns[landmarks]
    core_values, core_vectors = np.linalg.eigh((core + core.T) / 2)
    kept = core_values > len(landmarks) * eps * max(core_values.max(), 0.0)
    if kept.sum() < k:
        raise ValueError(
            f"the landmark kernel K_mm has numerical rank {kept.sum()} < num_eigvecs={k}; use more "
            "landmarks (num_landmarks) or fewer eigenpairs"
        )
    factor = columns @ (core_vectors[:, kept] / np.sqrt(core_values[kept]))
    left, singular, _ = np.linalg.svd(factor, full_matrices=False)
    next_value = float(singular[k] ** 2) if len(singular) > k else None
    return singular[:k] ** 2, left[:, :k], next_value
