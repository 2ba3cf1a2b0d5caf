"""The eigenfunction runs training scripts read: the ``compute_ntk.py`` run of their seed.

Dimensions: N = N_train + N_test examples (train first, as in the kernel), k eigenpairs.

    check_eigenfunctions(cfg)          # before anything is written: the run, its config, label_idx
    ntk_run = load_eigenfunctions(cfg)  # the run, its data read from cfg.data.root
    labels = eigenfunction_labels(ntk_run.eigvecs, cfg.label_idx)      # [N] in {0, 1}

Shared by ``train_ntk`` and ``pretrained_ntk_comparison``, with the BatchNorm-statistics and
learning-rate records both write.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

import jax
import numpy as np
from omegaconf import DictConfig

from ntklab import artifacts
from ntklab.artifacts import NTKRun, load_run
from ntklab.eigen import unresolved_pairs
from ntklab.experiments.training import check_label_idx, check_prerequisite, hydra_override
from ntklab.types import PyTree

logger = logging.getLogger(__name__)

DEFAULT_NUM_EIGVECS = 200
"""``ntk.num_eigvecs`` of compute_ntk.py's config; the command asks for more when needed."""

BN_STATISTICS = ("initial", "trained")
"""``bn_statistics``: which BatchNorm running statistics a trained model's kernel uses."""


def has_batch_norm(variables: PyTree) -> bool:
    """Whether a model's variables hold BatchNorm running statistics."""
    return bool(jax.tree.leaves(variables.get("batch_stats", {})))


def select_batch_stats(bn_statistics: str, initial: PyTree, trained: PyTree) -> PyTree:
    """The BatchNorm running statistics ``bn_statistics`` names.

    Args:
      bn_statistics: ``initial`` or ``trained`` (one of ``BN_STATISTICS``).
      initial: θ0's statistics (``{}`` without BatchNorm).
      trained: the trained network's statistics.

    Raises:
      ValueError: another value (the message lists the valid ones).
    """
    if bn_statistics == "initial":
        return initial
    if bn_statistics == "trained":
        return trained
    raise ValueError(
        f"bn_statistics={bn_statistics!r} is invalid: must be one of: {', '.join(BN_STATISTICS)}"
    )


def bn_statistics_record(bn_statistics: str, variables: PyTree) -> dict[str, Any]:
    """``bn_statistics`` and ``has_batch_norm`` for metrics.json and meta.json (the key is
    accepted but has no effect when the model has no BatchNorm layers)."""
    return {"bn_statistics": bn_statistics, "has_batch_norm": has_batch_norm(variables)}


def eigenfunction_labels(eigvecs: np.ndarray, label_idx: int) -> np.ndarray:
    """Binary labels ``(sign(v) + 1) / 2`` of eigenvector ``label_idx``, sign(0) taken as +1.

    Args:
      eigvecs: eigenvectors [k, N], one per row.
      label_idx: which eigenvector, 0 <= label_idx < k.

    Returns:
      labels [N], float32 in {0, 1}: 1 where ``v >= 0``.

    Raises:
      ValueError: ``label_idx`` is out of range (the message gives the valid range).
    """
    num_eigvecs = len(eigvecs)
    if isinstance(label_idx, bool) or not isinstance(label_idx, int | np.integer):
        raise ValueError(f"label_idx must be an integer, got {label_idx!r}")
    if not 0 <= label_idx < num_eigvecs:
        raise ValueError(
            f"label_idx={label_idx} is out of range: the run has {num_eigvecs} eigenvectors, so "
            f"label_idx must be in 0..{num_eigvecs - 1}; recompute it with "
            f"ntk.num_eigvecs={label_idx + 1} or more"
        )
    return (eigvecs[label_idx] >= 0).astype(np.float32)


def warn_if_unresolved(run_path: Path, label_idx: int) -> bool | None:
    """Warns when eigenvector ``label_idx`` is not resolved (``ntklab.eigen.unresolved_pairs``):
    its relative gap to the neighbouring eigenvalues is not above its residual ‖Kv − λv‖/λ₁, so v
    is one member of a near-degenerate eigenspace, and its labels depend on the solver.

    Returns:
      Whether it is unresolved (logged); None when the run predates the per-pair files.
    """
    gaps_file, residuals_file = run_path / "eigen_gaps.npy", run_path / "eigen_residuals.npy"
    if not (gaps_file.is_file() and residuals_file.is_file()):
        return None
    gaps, residuals = np.load(gaps_file), np.load(residuals_file)
    if not unresolved_pairs(residuals, gaps)[label_idx]:
        return False
    logger.warning(
        "eigenvector %d is not resolved: its relative gap %.2g is not above its residual %.2g, "
        "so its labels depend on the solver (docs/eigensolvers.md); prefer an index with a larger "
        "gap (eigen_gaps.npy)",
        label_idx,
        gaps[label_idx],
        residuals[label_idx],
    )
    return True


def compute_ntk_command(cfg: DictConfig, *, num_eigvecs: int | None = None) -> str:
    """The ``python compute_ntk.py ...`` command that makes the eigenfunction run ``cfg`` needs.

    Args:
      cfg: a config with ``model``, ``data`` and ``paths.eigenfunctions``.
      num_eigvecs: adds ``ntk.num_eigvecs=...`` (None keeps compute_ntk.py's default, 200).
    """
    words = ["python", "compute_ntk.py", f"seed={cfg.seed}", f"model={cfg.model.name}"]
    model = artifacts.to_container(cfg.model)
    data = artifacts.to_container(cfg.data)
    words += [
        f"model.{key}={hydra_override(value)}" for key, value in model.items() if key != "name"
    ]
    words += [f"data.{key}={hydra_override(value)}" for key, value in data.items()]
    if num_eigvecs is not None:
        words.append(f"ntk.num_eigvecs={num_eigvecs}")
    words.append(f"paths.run_dir={cfg.paths.eigenfunctions}")
    return " ".join(shlex.quote(word) for word in words)


def check_eigenfunctions(cfg: DictConfig) -> dict[str, Any] | None:
    """Checks the ``compute_ntk.py`` run ``cfg`` trains on (``paths.eigenfunctions``).

    Returns:
      Its ``meta.json``, or None when it is missing and ``prerequisites=create`` will make it.

    Raises:
      FileNotFoundError: the run is missing (the message gives the command that makes it).
      ValueError: the run was made for another model, data or seed.
      ConfigError: ``label_idx`` is not the index of one of its eigenvectors.
    """
    needed = cfg.label_idx + 1
    command = compute_ntk_command(cfg, num_eigvecs=needed if needed > DEFAULT_NUM_EIGVECS else None)
    path = Path(cfg.paths.eigenfunctions)
    meta = check_prerequisite(
        cfg, path, script="compute_ntk", groups=("model", "data"), command=command
    )
    if meta is not None:
        count = int(meta.get("eigen", {}).get("num_eigvecs", 0))
        more = compute_ntk_command(cfg, num_eigvecs=needed)
        check_label_idx(
            cfg.label_idx,
            count,
            what="eigenvectors",
            path=path,
            fix=f"; for more, recompute the run with:\n  {more} overwrite=true",
        )
    return meta


def load_eigenfunctions(cfg: DictConfig) -> NTKRun:
    """Loads the checked ``compute_ntk.py`` run at ``paths.eigenfunctions`` (files verified).

    Raises:
      FileNotFoundError: the run or its dataset files are missing.
      DamagedArtifactError: a file of the run differs from the one it wrote.
    """
    check_eigenfunctions(cfg)
    return load_run(cfg.paths.eigenfunctions, data_root=cfg.data.root)
