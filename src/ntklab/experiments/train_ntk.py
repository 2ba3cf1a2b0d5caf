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

import logging
import math
import time
from pathlib import Path

from omegaconf import DictConfig

from ntklab.artifacts import NTKRun
from ntklab.experiments.alignment_run import AlignmentTracker
from ntklab.experiments.eigenfunctions import (
    bn_statistics_record,
    check_eigenfunctions,
    eigenfunction_labels,
    load_eigenfunctions,
    warn_if_unresolved,
)
from ntklab.experiments.identity import mode_name
from ntklab.experiments.prerequisites import ensure_eigenfunctions
from ntklab.experiments.training import (
    check_training,
    file_sha256,
    finished_already,
    from_init_lr_scale,
    make_trainee,
    ntk_run_meta,
    open_training_run,
    order_seed,
    run_facts,
    write_results,
)
from ntklab.experiments.validation import train_config
from ntklab.train import TrainData, fit

logger = logging.getLogger(__name__)


def check(cfg: DictConfig) -> str:
    """Everything ``run`` checks before it writes; returns the run folder's state.

    Raises:
      ConfigError: an invalid key or value, or ``label_idx`` beyond the run's eigenvectors.
      FileNotFoundError: the compute_ntk.py run is missing (the message gives the command).
      ValueError: the compute_ntk.py run was made for another configuration.
      FileExistsError: the run folder holds a run of another configuration.
      RunFolderInUse: another process is writing the run folder.
    """
    return check_training(cfg, check_eigenfunctions)


def run(cfg: DictConfig) -> Path:
    """Trains on eigenfunction labels and, for network runs, measures the kernel's alignment.

    Args:
      cfg: the composed ``config/train_ntk`` config (``seed``, ``label_idx``, ``linearize``,
        ``with_bias``, ``model``, ``data``, ``train``, ``alignment``, ``paths``, ``progress``).

    Returns:
      The run folder (left as it is when it already holds this finished run).

    Raises:
      See :func:`check`.
    """
    timings: dict[str, float] = {}
    done = finished_already(cfg, check(cfg), "train_ntk")
    if done is not None:
        return done
    config = train_config(cfg)
    tic = time.perf_counter()
    ensure_eigenfunctions(cfg, num_eigvecs=cfg.label_idx + 1)  # prerequisites=create
    ntk_run = load_eigenfunctions(cfg)
    labels = eigenfunction_labels(ntk_run.eigvecs, cfg.label_idx)
    unresolved = warn_if_unresolved(ntk_run.path, cfg.label_idx)
    timings["load_s"] = time.perf_counter() - tic
    with open_training_run(cfg, "train_ntk") as run_folder:
        _train(cfg, config, ntk_run, labels, run_folder, timings, unresolved)
    return run_folder.path


def _train(cfg, config, ntk_run: NTKRun, labels, run_folder, timings, unresolved) -> None:
    """Trains, measures the alignment along training (network runs) and writes the results."""
    run_dir = run_folder.path
    n = ntk_run.num_train
    logger.info(
        "label_idx=%d (λ=%.4g): %d train / %d test samples, %.1f%% of train labels are 1",
        cfg.label_idx, ntk_run.eigvals[cfg.label_idx], n, ntk_run.num_samples - n,
        100 * labels[:n].mean(),
    )  # fmt: skip
    mode = mode_name(linearize=cfg.linearize, with_bias=cfg.with_bias)
    trainee = make_trainee(
        ntk_run.model,
        ntk_run.variables,
        linearize_at=ntk_run.params if cfg.linearize else None,
        with_bias=cfg.with_bias,
    )
    tracker, measures = None, None
    if cfg.alignment.enabled and not cfg.linearize:
        tic = time.perf_counter()
        tracker = AlignmentTracker(cfg, ntk_run)
        timings["alignment_init_s"] = time.perf_counter() - tic
        total_steps = config.epochs * math.ceil(n / config.batch_size)
        measures = {"alignment": tracker.measure_fn(total_steps)}
    result = fit(
        trainee,
        TrainData(ntk_run.x[:n], labels[:n], ntk_run.x[n:], labels[n:]),
        config,
        seed=order_seed(cfg),
        run_dir=run_dir,
        checkpoint_dir=run_dir / "checkpoints",
        measures=measures,
        measure_every=cfg.alignment.every,
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
        "label_unresolved": unresolved,  # its labels depend on the solver (None: not recorded)
        "train/label_mean": float(labels[:n].mean()),
        "test/label_mean": float(labels[n:].mean()) if ntk_run.num_samples > n else None,
        **run_facts(file_sha256(ntk_run.path / "init_params.msgpack"), labels[:n], labels[n:]),
    }
    if tracker is not None:
        metrics.update(tracker.save(run_dir, result.measurements))
        # the passes over K_t ran inside the training loop: count them apart
        timings["alignment_s"] = sum(m["alignment"]["seconds"] for m in result.measurements)
        timings["train_s"] -= timings["alignment_s"]
    write_results(
        run_folder,
        cfg=cfg,
        script="train_ntk",
        metrics=metrics,
        meta={**ntk_run_meta(ntk_run, timings), **facts},
    )
