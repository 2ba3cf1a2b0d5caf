"""``train_ntk.py``: train a network or its linearization on the sign of an eNTK eigenvector.

Dimensions: N = N_train + N_test examples (train first, as in the kernel), k eigenpairs, k' the
eigenvectors whose alignment is measured.

    run(cfg)   # writes {paths.run_dir}/metrics.jsonl, metrics.json, params.msgpack,
               #        alignment.npz, alignment_plots/eig_{label_idx}_{train|test|all}.png, meta.json

The run reads the ``compute_ntk.py`` run of the same model and data (same initial weights θ0,
same samples in the same order), labels sample i with ``(sign(v[label_idx, i]) + 1) / 2`` where
sign(0) counts as +1 (so the label is ``v >= 0``), trains on the first ``num_train`` samples and
tests on the rest. For network runs it then measures how the kernel rotated: for each of the top
``alignment.num_eigvecs`` initial eigenvectors φ_v (and the trained one) the Rayleigh quotient
φ_vᵀ K_T φ_v / ‖φ_v‖² of the end-of-training eNTK K_T, at the trained parameters with BatchNorm in
inference mode, on train, test and all samples. ``bn_statistics`` picks K_T's running statistics:
``trained`` (the default: those the network reached) or ``initial`` (θ0's); K_0 always uses θ0's.
Models without BatchNorm accept and record the key, which has no effect (``has_batch_norm:
false`` in metrics.json and meta.json).

``train.lr_normalization=ntk`` rescales the learning rate by λ_max(K_init) / λ_max(K_model)
(:mod:`ntklab.lr_normalization`); the network and the linearization at θ0 both start with the
kernel K_init, so here the ratio is 1 by definition and nothing is estimated. The record
(``lr_normalization`` in metrics.json and meta.json) says so.
"""

from __future__ import annotations

import functools
import logging
import shlex
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.tree_util import Partial
from omegaconf import DictConfig

from ntklab import artifacts
from ntklab.alignment import rayleigh_quotients
from ntklab.artifacts import NTKRun, load_run
from ntklab.experiments.presets import ensure_eigenfunctions
from ntklab.experiments.training import (
    file_sha256,
    fit_model_kwargs,
    hydra_override,
    mode_name,
    ntk_run_meta,
    open_training_run,
    order_seed,
    run_facts,
    train_config,
    write_results,
)
from ntklab.lr_normalization import LrScale, unit_lr_scale
from ntklab.plots import alignment_figure
from ntklab.train import TrainConfig, eval_apply_fn, fit
from ntklab.types import PyTree

logger = logging.getLogger(__name__)

DEFAULT_NUM_EIGVECS = 200
"""``ntk.num_eigvecs`` of compute_ntk.py's config; the command asks for more when needed."""

NON_IDENTITY_DATA_KEYS = ("root", "download")
"""Data keys that may differ between this run and the eigenfunction run."""

BN_STATISTICS = ("initial", "trained")
"""``bn_statistics``: which BatchNorm running statistics a trained model's kernel uses."""

SAME_KERNEL = "the model starts at θ0 with the initial kernel K_init: ratio 1 by definition"
"""Why ``lr_normalization=ntk`` estimates nothing for a network or linearization from θ0."""


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


def from_init_lr_scale(config: TrainConfig) -> LrScale:
    """The learning-rate record of a run that starts at θ0 (network or linearization at θ0),
    whose kernel is K_init: ratio 1, nothing estimated; logged once with ``lr_normalization=ntk``."""
    if config.lr_normalization == "none":
        return unit_lr_scale("none", config.max_lr, reason="lr_normalization=none")
    logger.info(
        "lr_normalization=%s: %s; max_lr %g", config.lr_normalization, SAME_KERNEL, config.max_lr
    )
    return unit_lr_scale(config.lr_normalization, config.max_lr, reason=SAME_KERNEL)


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


def warn_if_unresolved(run_path: Path, label_idx: int) -> bool:
    """Warns when eigenvector ``label_idx`` is not resolved: its relative gap to the neighbouring
    eigenvalues is below its residual ‖Kv − λv‖/λ₁, so v is an arbitrary mix of nearby directions.

    Returns:
      True when a warning was logged (False also when the run predates the per-pair files).
    """
    gaps_file, residuals_file = run_path / "eigen_gaps.npy", run_path / "eigen_residuals.npy"
    if not (gaps_file.is_file() and residuals_file.is_file()):
        return False
    gap = float(np.load(gaps_file)[label_idx])
    residual = float(np.load(residuals_file)[label_idx])
    if gap >= residual:
        return False
    logger.warning(
        "eigenvector %d is not resolved: its relative gap %.2g is below its residual %.2g, so its "
        "labels depend on the solver; prefer an index with a larger gap (eigen_gaps.npy)",
        label_idx,
        gap,
        residual,
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


def load_ntk_run(cfg: DictConfig, *, num_eigvecs: int = 0) -> NTKRun:
    """Loads the ``compute_ntk.py`` run at ``paths.eigenfunctions`` and checks it matches ``cfg``.

    Args:
      cfg: a config with ``model``, ``data``, ``label_idx`` and ``paths.eigenfunctions``.
      num_eigvecs: eigenvectors the caller needs (for the printed command).

    Returns:
      The run, its data read from ``cfg.data.root``.

    Raises:
      FileNotFoundError: no finished run there; the message holds the command that makes it.
      ValueError: the run was computed for another model or data configuration, or ``label_idx``
        is not the index of one of its eigenvectors.
    """
    path = Path(cfg.paths.eigenfunctions)
    command = compute_ntk_command(
        cfg, num_eigvecs=num_eigvecs if num_eigvecs > DEFAULT_NUM_EIGVECS else None
    )
    if not (path / artifacts.META_FILE).exists():
        raise FileNotFoundError(
            f"no finished compute_ntk.py run in {path} (meta.json missing); make it with:\n"
            f"  {command}"
        )
    run = load_run(path, data_root=cfg.data.root)
    wanted = {"model": artifacts.to_container(cfg.model), "data": artifacts.to_container(cfg.data)}
    found = {"model": dict(run.config.model), "data": dict(run.config.data)}
    differences = [
        f"{group}.{key}: run has {found[group].get(key)!r}, this config {wanted[group].get(key)!r}"
        for group in ("model", "data")
        for key in sorted(set(wanted[group]) | set(found[group]))
        if not (group == "data" and key in NON_IDENTITY_DATA_KEYS)
        and _normalized(found[group].get(key)) != _normalized(wanted[group].get(key))
    ]
    if run.config.get("seed") is not None and int(run.config.seed) != int(cfg.seed):
        differences.append(f"seed: run has {run.config.seed}, this config {cfg.seed}")
    if differences:
        raise ValueError(
            f"the compute_ntk.py run in {path} was made for another configuration ("
            + "; ".join(differences)
            + f"); pass the run's settings, or recompute it with:\n  {command} overwrite=true"
        )
    count = len(run.eigvecs)
    if not 0 <= cfg.label_idx < count:
        command = compute_ntk_command(cfg, num_eigvecs=max(num_eigvecs, cfg.label_idx + 1))
        raise ValueError(
            f"label_idx={cfg.label_idx} is out of range: {path} holds {count} eigenvectors, so "
            f"label_idx must be in 0..{count - 1}; for more, recompute the run with:\n"
            f"  {command} overwrite=true"
        )
    return run


def check_label_idx(label_idx: object) -> None:
    """Raises ValueError unless ``label_idx`` is an integer (its range is checked on loading)."""
    if isinstance(label_idx, bool) or not isinstance(label_idx, int):
        raise ValueError(f"label_idx must be an integer, got {label_idx!r}")


def _normalized(value: object) -> object:
    return list(value) if isinstance(value, list | tuple) else value


def run(cfg: DictConfig) -> Path:
    """Trains on eigenfunction labels and, for network runs, measures the kernel's alignment.

    Args:
      cfg: the composed ``config/train_ntk`` config (``seed``, ``label_idx``, ``linearize``,
        ``with_bias``, ``model``, ``data``, ``train``, ``alignment``, ``paths``, ``progress``).

    Returns:
      The run folder.

    Raises:
      FileNotFoundError: the compute_ntk.py run is missing (the message gives the command).
      ValueError: ``label_idx`` or ``alignment.num_eigvecs`` out of range, a mismatching run, or
        invalid training options.
    """
    timings: dict[str, float] = {}
    config = train_config(cfg)
    check_label_idx(cfg.label_idx)
    tic = time.perf_counter()
    ensure_eigenfunctions(cfg, num_eigvecs=cfg.label_idx + 1)  # prerequisites=create
    ntk_run = load_ntk_run(cfg, num_eigvecs=cfg.label_idx + 1)
    labels = eigenfunction_labels(ntk_run.eigvecs, cfg.label_idx)
    warn_if_unresolved(ntk_run.path, cfg.label_idx)
    timings["load_s"] = time.perf_counter() - tic
    with open_training_run(cfg) as run_folder:
        _train(cfg, config, ntk_run, labels, run_folder, timings)
    return run_folder.path


def _train(cfg, config, ntk_run: NTKRun, labels, run_folder, timings) -> None:
    """Trains, measures the alignment (network runs) and writes the results."""
    run_dir = run_folder.path
    n = ntk_run.num_train
    logger.info(
        "label_idx=%d (λ=%.4g): %d train / %d test samples, %.1f%% of train labels are 1",
        cfg.label_idx,
        ntk_run.eigvals[cfg.label_idx],
        n,
        ntk_run.num_samples - n,
        100 * labels[:n].mean(),
    )

    mode = mode_name(linearize=cfg.linearize, with_bias=cfg.with_bias)
    model_kwargs = fit_model_kwargs(
        ntk_run.model,
        ntk_run.variables,
        linearize_at=ntk_run.params if cfg.linearize else None,
        with_bias=cfg.with_bias,
    )
    result = fit(
        **model_kwargs,
        x_train=ntk_run.x[:n],
        y_train=labels[:n],
        x_test=ntk_run.x[n:],
        y_test=labels[n:],
        config=config,
        seed=order_seed(cfg),
        run_dir=run_dir,
        checkpoint_dir=run_dir / "checkpoints",
        progress=cfg.progress,
        desc=f"{mode} label {cfg.label_idx}",
    )
    timings["train_s"] = result.final["wall_time_s"]

    facts = {
        "lr_normalization": from_init_lr_scale(config).as_dict(),
        **bn_statistics_record(cfg.bn_statistics, ntk_run.variables),
    }
    metrics = {
        **result.final,
        **facts,
        "label_idx": cfg.label_idx,
        "mode": mode,
        "eigval": float(ntk_run.eigvals[cfg.label_idx]),
        "train/label_mean": float(labels[:n].mean()),
        "test/label_mean": float(labels[n:].mean()) if ntk_run.num_samples > n else None,
        **run_facts(file_sha256(ntk_run.path / "init_params.msgpack"), labels[:n], labels[n:]),
    }
    if _aligns(cfg):
        tic = time.perf_counter()
        metrics.update(_alignment(cfg, ntk_run, result.params, result.batch_stats, run_dir))
        timings["alignment_s"] = time.perf_counter() - tic

    write_results(
        run_folder,
        cfg=cfg,
        script="train_ntk",
        metrics=metrics,
        meta={**ntk_run_meta(ntk_run, timings), **facts},
        summary_name=f"label_{cfg.label_idx}-{mode}-seed_{cfg.seed}.json",
    )


def _stats_first(eval_apply, batch_stats, params, x):
    return eval_apply(params, batch_stats, x)


def _aligns(cfg: DictConfig) -> bool:
    return bool(cfg.alignment.enabled) and not cfg.linearize


def _alignment(cfg, ntk_run: NTKRun, params, batch_stats, run_dir: Path) -> dict[str, float]:
    """Saves ``alignment.npz`` and its plots; returns the trained eigenvector's quotients.

    K_0 is taken at θ0 with θ0's BatchNorm statistics, K_T at ``params`` with the statistics
    ``cfg.bn_statistics`` names (``batch_stats``: the trained ones, or θ0's).
    """
    available = len(ntk_run.eigvecs)
    num_eigvecs = min(cfg.alignment.num_eigvecs or available, available)
    if num_eigvecs < (cfg.alignment.num_eigvecs or 0):
        logger.info(
            "alignment.num_eigvecs=%d: the run has %d eigenvectors; aligning all of them",
            cfg.alignment.num_eigvecs,
            available,
        )
    indices = np.array(sorted(set(range(num_eigvecs)) | {cfg.label_idx}))
    vectors = ntk_run.eigvecs[indices]
    options = {
        "num_train": ntk_run.num_train,
        "batch_size": cfg.alignment.batch_size,
        "vector_batch_size": cfg.alignment.vector_batch_size,
        "progress": cfg.progress,
    }
    # One function of (batch_stats, params, x) for both kernels, so the VJP compiles once.
    stats_first = functools.partial(_stats_first, eval_apply_fn(ntk_run.model))
    init_stats = ntk_run.variables.get("batch_stats", {})
    final_stats = select_batch_stats(cfg.bn_statistics, init_stats, batch_stats)
    initial = rayleigh_quotients(
        Partial(stats_first, init_stats), ntk_run.params, ntk_run.x, vectors, **options
    )
    final = rayleigh_quotients(
        Partial(stats_first, final_stats), params, ntk_run.x, vectors, **options
    )
    artifacts.save_arrays(
        run_dir / "alignment.npz",
        indices=indices,
        init_eigvals=ntk_run.eigvals[indices],
        **{f"init_{split}": values for split, values in initial.items()},
        **{f"final_{split}": values for split, values in final.items()},
    )
    position = int(np.searchsorted(indices, cfg.label_idx))
    for split in ("train", "test", "all"):
        figure = alignment_figure(
            indices,
            ntk_run.eigvals[indices],
            final[split],
            init_quotients=initial[split],
            trained_idx=cfg.label_idx,
            title=f"{cfg.model.name} on {cfg.data.dataset}, trained on v_{cfg.label_idx} ({split})",
        )
        for suffix in ("png", "pdf"):
            path = run_dir / "alignment_plots" / f"eig_{cfg.label_idx}_{split}.{suffix}"
            artifacts.save_figure(figure, path)
    return {f"{split}/alignment_trained": float(final[split][position]) for split in final} | {
        f"{split}/alignment_trained_init": float(initial[split][position]) for split in initial
    }
