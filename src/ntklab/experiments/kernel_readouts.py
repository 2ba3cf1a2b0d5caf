"""What compute_ntk reads off the formed kernel beyond its eigenpairs, for the training runs.

Dimensions: N examples (N_train first), k eigenpairs, L layers.

    save_readouts(run_dir, formed, pairs, num_train=n, timings=timings)  # -> meta.json fields

- ``init_quotients.npz``: the Rayleigh quotients φᵀK_0φ/‖φ‖² of every kept eigenvector on the
  train, test and all rows (``train``, ``test``, ``all`` [k]), ‖K_0‖_F² (``frobenius_sq``) and,
  when the layer kernels were kept, ``layers`` [L] and ``layer_all`` [L, k] (each layer's
  quotients; they sum to ``all``). Every network run's alignment starts from these instead of
  forming K_0 again.
- ``kernel_regression.npz``: the test accuracy of kernel regression (the linearization trained to
  convergence, f(θ0) dropped, ridge → 0) on the labels of every kept eigenvector
  (:mod:`ntklab.kernel_regression`): ``label_idx``, ``test_acc`` [k], ``ridge``,
  ``ridge_relative``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ntklab import artifacts
from ntklab.alignment import quotients_of_kernel
from ntklab.eigen import Eigenpairs, resolution_summary
from ntklab.experiments.kernel_job import FormedKernel
from ntklab.kernel_regression import eigenfunction_regression

logger = logging.getLogger(__name__)

__all__ = ["INIT_QUOTIENTS_FILE", "KERNEL_REGRESSION_FILE", "save_readouts"]

INIT_QUOTIENTS_FILE = "init_quotients.npz"
KERNEL_REGRESSION_FILE = "kernel_regression.npz"


def save_readouts(
    run_dir: Path,
    formed: FormedKernel,
    pairs: Eigenpairs,
    *,
    num_train: int,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Writes ``init_quotients.npz`` and ``kernel_regression.npz`` (with a formed kernel).

    Returns:
      ``meta.json`` fields: ``init_quotients`` and ``kernel_regression`` (what was written, or
      why not), and the eigenpairs' ``resolution`` (count and first index of unresolved pairs).
    """
    resolution = resolution_summary(pairs.residuals, pairs.gaps)
    _log_resolution(resolution, len(pairs.values))
    if formed.kernel is None:
        why = "no formed kernel (matrix-free solver): the training runs measure K_0 themselves"
        logger.info("%s and %s not written: %s", INIT_QUOTIENTS_FILE, KERNEL_REGRESSION_FILE, why)
        return {"resolution": resolution, "init_quotients": why, "kernel_regression": why}
    eigvecs = np.ascontiguousarray(pairs.vectors.T)  # [k, N]
    tic = time.perf_counter()
    quotients = _save_quotients(run_dir, formed, eigvecs, num_train)
    timings["quotients_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    regression = eigenfunction_regression(formed.kernel, eigvecs, num_train)
    artifacts.save_arrays(
        run_dir / KERNEL_REGRESSION_FILE,
        label_idx=regression.label_idx,
        test_acc=regression.test_acc,
        ridge=np.float64(regression.ridge),
        ridge_relative=np.float64(regression.ridge_relative),
    )
    timings["kernel_regression_s"] = time.perf_counter() - tic
    logger.info(
        "kernel regression on the %d eigenfunctions (ridge %.3g × trace/N_train, %s): test "
        "accuracy %.3f at k=0, %.3f at k=%d, in %.2f s",
        len(regression.test_acc), regression.ridge_relative, regression.dtype,
        regression.test_acc[0], regression.test_acc[-1], len(regression.test_acc) - 1,
        timings["kernel_regression_s"],
    )  # fmt: skip
    return {
        "resolution": resolution,
        "init_quotients": quotients,
        "kernel_regression": {
            "ridge": float(regression.ridge),
            "ridge_relative": float(regression.ridge_relative),
            "dtype": regression.dtype,
        },
    }


def _save_quotients(
    run_dir: Path, formed: FormedKernel, eigvecs: np.ndarray, num_train: int
) -> dict[str, Any]:
    """``init_quotients.npz``: K_0's quotients (per layer when the layer kernels were kept)."""
    quotients, frobenius_sq = quotients_of_kernel(formed.kernel, eigvecs, num_train=num_train)
    arrays = {**quotients, "frobenius_sq": np.float64(frobenius_sq)}
    if formed.layer_kernels is not None:
        arrays["layers"] = np.array(formed.layers, dtype=str)
        arrays["layer_all"] = np.stack(
            [quotients_of_kernel(layer, eigvecs)[0]["all"] for layer in formed.layer_kernels]
        )
    artifacts.save_arrays(run_dir / INIT_QUOTIENTS_FILE, **arrays)
    return {"frobenius_sq": frobenius_sq, "layers": formed.layers}


def _log_resolution(resolution: dict[str, Any], count: int) -> None:
    unresolved, first = resolution["num_unresolved"], resolution["first_unresolved"]
    if not unresolved:
        logger.info("all %d eigenpairs resolved (every gap above its residual)", count)
        return
    logger.warning(
        "%d of %d eigenpairs are not resolved (gap <= residual), the first at index %d: their "
        "eigenvalues are meaningful but their vectors, hence their labels, depend on the solver "
        "(docs/eigensolvers.md; eigen_gaps.npy, eigen_residuals.npy)",
        unresolved, count, first,
    )  # fmt: skip
