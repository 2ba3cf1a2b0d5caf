"""Closed-form kernel regression on eigenfunction labels: the linearized network's t → ∞ limit.

Dimensions: N examples (N_tr train rows first, then N_te test rows), k eigenvectors.

    result = eigenfunction_regression(kernel, eigvecs, num_train)  # kernel [N, N], eigvecs [k, N]
    result.test_acc          # [k] float64: test accuracy on the labels sign(φ_k)
    result.label_idx         # [k] int: which eigenvector (row of eigvecs) each entry is
    result.ridge, result.ridge_relative   # absolute ridge, and relative to trace(K_tr,tr) / N_tr

Gradient flow on the squared loss of the network linearized at θ_0 (f_lin(x) = f_0(x) + J(x)(θ −
θ_0)), started from f_0 = 0 on the labels y, converges to the kernel regressor of the eNTK K:
f_∞(x_te) = K_te,tr K_tr,tr⁻¹ y_tr. This module computes it for the labels of every eigenvector
at once: y = +1 where φ_k >= 0 else −1, prediction K_te,tr (K_tr,tr + ridge·I)⁻¹ y_tr on the test
rows, accuracy = the fraction of test rows where sign(prediction) (0 counting as +1) equals y.
One Cholesky factorization of K_tr,tr + ridge·I serves all k right-hand sides. The kernel may be
a ``np.memmap`` of a ``.npy`` file (as ``compute_ntk`` writes it): K_tr,tr and K_te,tr are read in
row panels, K_te,tr is never held whole.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Sequence

import numpy as np
import scipy.linalg

from ntklab import threads

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_RIDGE_RELATIVE", "KernelRegression", "eigenfunction_regression"]

DEFAULT_RIDGE_RELATIVE = 1e-5
"""Default ridge relative to the mean train diagonal trace(K_tr,tr) / N_tr: 4.5x the spectral norm
of a float32 kernel's own rounding error, inside the plateau of the ridge → 0 limit (see
:func:`eigenfunction_regression` for the measurement)."""

MEMORY_FRACTION = 0.25
"""K_tr,tr is factored in float64 while its 8 N_tr² bytes fit this fraction of the host RAM
(``memory_bytes=None``), else in float32."""

PANEL_BYTES = 1 << 27
"""Kernel rows are read (and converted) in panels of at most this many bytes (128 MiB)."""


@dataclasses.dataclass(frozen=True)
class KernelRegression:
    """Test accuracies of kernel regression on eigenfunction labels.

    Attributes:
      label_idx: eigenvector indices [k], int (rows of ``eigvecs``).
      test_acc: test accuracy of each [k], float64, in [0, 1].
      ridge: the absolute ridge added to the diagonal of K_tr,tr.
      ridge_relative: ``ridge`` / (trace(K_tr,tr) / N_tr).
      num_train: N_tr, the train rows (the first rows of the kernel).
      num_test: N_te = N − N_tr, the test rows.
      dtype: the precision of the Cholesky factorization, ``"float64"`` or ``"float32"``.
    """

    label_idx: np.ndarray
    test_acc: np.ndarray
    ridge: float
    ridge_relative: float
    num_train: int
    num_test: int
    dtype: str = "float64"


def eigenfunction_regression(
    kernel: np.ndarray,
    eigvecs: np.ndarray,
    num_train: int,
    *,
    ridge: float | None = None,
    ridge_relative: float | None = None,
    label_idx: Sequence[int] | np.ndarray | None = None,
    memory_bytes: int | None = None,
) -> KernelRegression:
    """Test accuracy of the kernel regressor on the labels sign(φ_k) of every eigenvector.

    For each eigenvector φ (a row of ``eigvecs``, train entries first): y = +1 where φ >= 0 else
    −1, prediction ŷ_te = K_te,tr (K_tr,tr + ridge·I)⁻¹ y_tr, accuracy = mean(sign(ŷ_te) ==
    y_te) with sign(0) = +1. K_tr,tr + ridge·I is Cholesky-factored once (float64 while it fits
    ``memory_bytes``, else float32 with a log line); predictions are accumulated in float64.

    The default ridge, ``DEFAULT_RIDGE_RELATIVE`` = 1e-5 · trace(K_tr,tr) / N_tr, was chosen by
    measurement on the float32 eNTK of LeNet at initialization on the CIFAR-10 subset (N_tr =
    5,085, N_te = 1,017, all 200 saved eigenvectors; BENCHMARKS.md, "Eigensolvers: threads,
    float64, kernel regression"). Accuracies of all 200 are identical to the ridge → 0 limit
    (checked independently from a float64 eigendecomposition of K_tr,tr, whose smallest
    eigenvalue is 5.7e-3 · trace / N_tr) for ridge_relative from 1e-10 to 3e-7; at 1e-6 one
    eigenvector moves by one test row, at 1e-5 18 of 200 by one row (mean |Δacc| 9e-5, the size
    of the float32-vs-float64 kernel difference), at 1e-4 95 by up to 3 rows, and from 1e-3 on
    the ridge visibly smooths the labels (mean accuracy 0.8162 → 0.8196 at 1e-3, 0.8400 at
    1e-2). The floor is the kernel's own float32 rounding: ‖K_float32 − K‖₂ = 2.2e-6 · trace /
    N_tr, and a rank-deficient kernel of the same scale stored in float32 has eigenvalues down to
    −1.3e-6 · trace / N_tr, so a ridge below ~3e-6 may fail Cholesky (or fit rounding) on a
    singular kernel. 1e-5 is the smallest half-decade safely above that floor; pass
    ``ridge_relative`` (or ``ridge``) to override, e.g. 1e-8 on a float64 kernel.

    Args:
      kernel: symmetric PSD kernel [N, N] (an array or a ``np.memmap``; float16/32/64).
      eigvecs: eigenvectors [k, N] as rows (``eigvecs.npy``), train entries first.
      num_train: N_tr, 1 <= N_tr <= N − 1; rows N_tr..N − 1 are the test rows.
      ridge: absolute ridge >= 0 (None: from ``ridge_relative``).
      ridge_relative: ridge / (trace(K_tr,tr) / N_tr), >= 0 (None: ``DEFAULT_RIDGE_RELATIVE``);
        give at most one of ``ridge`` and ``ridge_relative``.
      label_idx: which rows of ``eigvecs`` to use (None: all k).
      memory_bytes: budget for the factor of K_tr,tr (None: a quarter of the host RAM).

    Returns:
      ``KernelRegression`` with ``test_acc`` [k] float64 in the order of ``label_idx``.

    Raises:
      ValueError: shapes that do not match, ``num_train`` out of range, a negative or non-finite
        ridge, both ridges given, ``label_idx`` out of range, a non-finite kernel entry (naming
        its row), a kernel with trace(K_tr,tr) <= 0, or K_tr,tr + ridge·I not positive definite
        (then pass a larger ridge).
    """
    n = _check_shapes(kernel, eigvecs, num_train)
    indices = _check_label_idx(label_idx, len(eigvecs))
    ridge_value, relative = _check_ridges(ridge, ridge_relative)
    num_test, k = n - num_train, len(indices)
    labels = np.where(np.asarray(eigvecs[indices], dtype=np.float64) >= 0, 1.0, -1.0).T  # [N, k]
    budget = memory_bytes if memory_bytes is not None else _default_memory_bytes()
    dtype = np.dtype(np.float64 if 8 * num_train**2 <= budget else np.float32)
    if dtype == np.float32:
        logger.info(
            "kernel regression: K_tr,tr in float64 needs %.2f GB > budget %.2f GB; factoring it "
            "in float32 (needs ridge_relative >~ 1e-5 to stay accurate)",
            8 * num_train**2 / 1e9, budget / 1e9,
        )  # fmt: skip
    tic = time.perf_counter()
    flops = num_train**3 / 3 + 2.0 * num_train**2 * k + 2.0 * num_test * num_train * k
    with threads.host_only(flops=flops, what="kernel regression"):
        matrix = _train_block(kernel, num_train, dtype)
        scale = float(np.trace(matrix, dtype=np.float64)) / num_train
        if not scale > 0:
            raise ValueError(
                f"trace(K_tr,tr) / N_tr = {scale!r} must be positive: the kernel is zero or not PSD"
            )
        if ridge_value is None:
            ridge_value = relative * scale
        factor = _cholesky(matrix, ridge_value, ridge_value / scale)
        coefficients = scipy.linalg.cho_solve(
            (factor, True), labels[:num_train].astype(dtype), check_finite=False
        ).astype(np.float64)
        predictions = _test_predictions(kernel, num_train, coefficients)
    accuracy = np.mean(np.where(predictions >= 0, 1.0, -1.0) == labels[num_train:], axis=0)
    result = KernelRegression(
        label_idx=indices,
        test_acc=accuracy.astype(np.float64),
        ridge=float(ridge_value),
        ridge_relative=float(ridge_value / scale),
        num_train=int(num_train),
        num_test=int(num_test),
        dtype=dtype.name,
    )
    logger.info(
        "kernel regression on %d eigenfunction labels: N_tr=%d, N_te=%d, ridge %.3g (%.1e x "
        "trace/N_tr), %s Cholesky, %.2f s; test accuracy mean %.4f, min %.4f, max %.4f",
        k, num_train, num_test, result.ridge, result.ridge_relative, dtype.name,
        time.perf_counter() - tic, accuracy.mean(), accuracy.min(), accuracy.max(),
    )  # fmt: skip
    return result


def _check_shapes(kernel: np.ndarray, eigvecs: np.ndarray, num_train: int) -> int:
    """N, after checking kernel [N, N], eigvecs [k, N] and 1 <= num_train <= N − 1."""
    if getattr(kernel, "ndim", None) != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"kernel must be square [N, N], got shape {np.shape(kernel)}")
    n = kernel.shape[0]
    if getattr(eigvecs, "ndim", None) != 2 or eigvecs.shape[1] != n or eigvecs.shape[0] < 1:
        raise ValueError(
            f"eigvecs must be [k, N] with k >= 1 and N={n} (the kernel's size), got shape "
            f"{np.shape(eigvecs)}"
        )
    if isinstance(num_train, bool) or not isinstance(num_train, int | np.integer):
        raise ValueError(f"num_train must be an integer, got {num_train!r}")
    if not 1 <= num_train <= n - 1:
        raise ValueError(
            f"num_train={num_train} must be between 1 and N - 1={n - 1} (at least one train and "
            "one test row)"
        )
    return n


def _check_label_idx(label_idx: Sequence[int] | np.ndarray | None, k: int) -> np.ndarray:
    if label_idx is None:
        return np.arange(k)
    indices = np.asarray(label_idx)
    if indices.ndim != 1 or not len(indices) or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"label_idx must be a non-empty list of integers, got {label_idx!r}")
    bad = indices[(indices < 0) | (indices >= k)]
    if len(bad):
        raise ValueError(f"label_idx={int(bad[0])} is out of range: eigvecs has k={k} rows")
    return indices.astype(np.int64)


def _check_ridges(ridge: float | None, ridge_relative: float | None) -> tuple[float | None, float]:
    """(absolute ridge or None, relative ridge used when it is None)."""
    if ridge is not None and ridge_relative is not None:
        raise ValueError(f"give ridge={ridge!r} or ridge_relative={ridge_relative!r}, not both")
    for name, value in (("ridge", ridge), ("ridge_relative", ridge_relative)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float | np.floating)
            or not math.isfinite(value) or value < 0
        ):  # fmt: skip
            raise ValueError(f"{name}={value!r} is invalid: must be a finite number >= 0")
    if ridge is not None:
        return float(ridge), math.nan
    return None, float(DEFAULT_RIDGE_RELATIVE if ridge_relative is None else ridge_relative)


def _default_memory_bytes() -> int:
    return int(MEMORY_FRACTION * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _panel_rows(width: int, itemsize: int) -> int:
    return max(1, PANEL_BYTES // max(1, width * itemsize))


def _train_block(kernel: np.ndarray, num_train: int, dtype: np.dtype) -> np.ndarray:
    """K_tr,tr [N_tr, N_tr] in ``dtype``, read in row panels (each checked for finiteness)."""
    matrix = np.empty((num_train, num_train), dtype=dtype)
    step = _panel_rows(num_train, max(kernel.dtype.itemsize, dtype.itemsize))
    for start in range(0, num_train, step):
        stop = min(start + step, num_train)
        matrix[start:stop] = kernel[start:stop, :num_train]
        _check_finite(matrix[start:stop], start)
    return matrix


def _test_predictions(kernel: np.ndarray, num_train: int, coefficients: np.ndarray) -> np.ndarray:
    """K_te,tr α [N_te, k] in float64, α [N_tr, k], from row panels of K_te,tr."""
    n = kernel.shape[0]
    predictions = np.empty((n - num_train, coefficients.shape[1]))
    step = _panel_rows(num_train, 8)
    for start in range(num_train, n, step):
        stop = min(start + step, n)
        panel = np.asarray(kernel[start:stop, :num_train], dtype=np.float64)
        _check_finite(panel, start)
        predictions[start - num_train : stop - num_train] = panel @ coefficients
    return predictions


def _check_finite(panel: np.ndarray, first_row: int) -> None:
    bad = np.argwhere(~np.isfinite(panel))
    if len(bad):
        row, column = int(bad[0, 0]) + first_row, int(bad[0, 1])
        raise ValueError(
            f"the kernel has non-finite entries in rows {first_row}..{first_row + len(panel) - 1}"
            f", first at [{row}, {column}]: {panel[bad[0, 0], bad[0, 1]]}"
        )


def _cholesky(matrix: np.ndarray, ridge: float, relative: float) -> np.ndarray:
    """Lower Cholesky factor of ``matrix`` + ridge·I, in place."""
    matrix[np.diag_indices_from(matrix)] += ridge
    try:
        factor, _ = scipy.linalg.cho_factor(
            matrix, lower=True, overwrite_a=True, check_finite=False
        )
    except np.linalg.LinAlgError as error:
        raise ValueError(
            f"K_tr,tr + ridge·I is not positive definite in {matrix.dtype} at ridge={ridge:.3g} "
            f"(ridge_relative={relative:.1e}): the kernel is not PSD to this precision; pass a "
            "larger ridge"
        ) from error
    return factor
