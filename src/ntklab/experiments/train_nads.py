"""``train_nads.py``: train a network or its linearization on a task along one NAD.

Dimensions: D = H·W·C input dimension, N examples.

    run(cfg)   # writes {paths.run_dir}/metrics.jsonl, metrics.json, params.msgpack, meta.json

The run reads the ``compute_nads.py`` run of the same model (its directions and initial weights
θ0), builds the linearly separable dataset of :func:`ntklab.nads.nad_dataset` whose only
discriminative direction is v = nads[label_idx], and trains the network (or its linearization at
θ0) from θ0 with the shared trainer on the labels (y + 1) / 2 ∈ {0, 1}. ``metrics.json`` holds the
final metrics with ``label_idx`` (= ``nad_idx``), ``linearize`` and ``mode``, so
``python -m ntklab.report`` can aggregate test accuracy against the NAD index.
"""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ntklab import artifacts
from ntklab.experiments.compute_nads import NADRun, load_nads
from ntklab.experiments.presets import ensure_nads
from ntklab.experiments.training import (
    file_sha256,
    fit_model_kwargs,
    hydra_override,
    mode_name,
    open_training_run,
    order_seed,
    run_facts,
    train_config,
    write_results,
)
from ntklab.models import count_params
from ntklab.nads import nad_dataset
from ntklab.train import fit

logger = logging.getLogger(__name__)


def compute_nads_command(cfg: DictConfig) -> str:
    """The ``python compute_nads.py ...`` command that makes the NAD run ``cfg`` needs."""
    words = ["python", "compute_nads.py", f"seed={cfg.seed}", f"model={cfg.model.name}"]
    model = artifacts.to_container(cfg.model)
    words += [
        f"model.{key}={hydra_override(value)}" for key, value in model.items() if key != "name"
    ]
    words.append(f"paths.run_dir={cfg.paths.nads}")
    return " ".join(shlex.quote(word) for word in words)


def _normalized(value: object) -> object:
    return list(value) if isinstance(value, list | tuple) else value


def load_nads_for(cfg: DictConfig) -> NADRun:
    """Loads the ``compute_nads.py`` run at ``paths.nads`` and checks its model matches ``cfg``.

    Args:
      cfg: a config with ``model`` and ``paths.nads``.

    Returns:
      The run.

    Raises:
      FileNotFoundError: no finished run there; the message holds the command that makes it.
      ValueError: the run was computed for another model configuration.
    """
    path = Path(cfg.paths.nads)
    command = compute_nads_command(cfg)
    if not (path / artifacts.META_FILE).exists():
        raise FileNotFoundError(
            f"no finished compute_nads.py run in {path} (meta.json missing; expected nads.npy, "
            f"eigvals.npy, init_params.msgpack, meta.json); make it with:\n  {command}"
        )
    nads = load_nads(path)
    wanted = artifacts.to_container(cfg.model)
    found = dict(nads.config.model)
    differences = [
        f"model.{key}: run has {found.get(key)!r}, this config {wanted.get(key)!r}"
        for key in sorted(set(wanted) | set(found))
        if _normalized(found.get(key)) != _normalized(wanted.get(key))
    ]
    if nads.config.get("seed") is not None and int(nads.config.seed) != int(cfg.seed):
        differences.append(f"seed: run has {nads.config.seed}, this config {cfg.seed}")
    if differences:
        raise ValueError(
            f"the compute_nads.py run in {path} was made for another model ("
            + "; ".join(differences)
            + f"); pass the run's settings, or recompute it with:\n  {command} overwrite=true"
        )
    return nads


def check_label_idx(label_idx: int, num_directions: int) -> None:
    """Raises ValueError unless ``0 <= label_idx < num_directions`` (an integer)."""
    if isinstance(label_idx, bool) or not isinstance(label_idx, int | np.integer):
        raise ValueError(f"label_idx must be an integer, got {label_idx!r}")
    if not 0 <= label_idx < num_directions:
        raise ValueError(
            f"label_idx={label_idx} is out of range: the run has {num_directions} NADs, so "
            f"label_idx must be in 0..{num_directions - 1}"
        )


def run(cfg: DictConfig) -> Path:
    """Trains on the task along NAD ``label_idx``.

    Args:
      cfg: the composed ``config/train_nads`` config (``seed``, ``label_idx``, ``linearize``,
        ``with_bias``, ``model``, ``data``, ``train``, ``paths``, ``progress``).

    Returns:
      The run folder.

    Raises:
      FileNotFoundError: the compute_nads.py run is missing (the message gives the command).
      ValueError: ``label_idx`` out of range, a mismatching run, or invalid data or training
        options.
    """
    timings: dict[str, float] = {}
    config = train_config(cfg)
    tic = time.perf_counter()
    ensure_nads(cfg)  # prerequisites=create
    nads = load_nads_for(cfg)
    check_label_idx(cfg.label_idx, len(nads.directions))
    data = nad_dataset(
        nads.directions[cfg.label_idx],
        shape=nads.shape,
        num_train=cfg.data.num_train,
        num_test=cfg.data.num_test,
        epsilon=cfg.data.epsilon,
        sigma=cfg.data.sigma,
        seed=cfg.seed,
    )
    y_train = ((data.y_train + 1) // 2).astype(np.float32)
    y_test = ((data.y_test + 1) // 2).astype(np.float32)
    timings["data_s"] = time.perf_counter() - tic
    logger.info(
        "NAD %d (σ²=%.4g): %d train / %d test samples of shape %s, %.1f%% of train labels are 1",
        cfg.label_idx,
        nads.eigvals[cfg.label_idx],
        len(y_train),
        len(y_test),
        list(nads.shape),
        100 * y_train.mean(),
    )

    with open_training_run(cfg) as run_folder:
        _train(cfg, config, nads, data, y_train, y_test, run_folder, timings)
    return run_folder.path


def _train(cfg, config, nads: NADRun, data, y_train, y_test, run_folder, timings) -> None:
    """Trains on the NAD task and writes the results."""
    run_dir = run_folder.path
    mode = mode_name(linearize=cfg.linearize, with_bias=cfg.with_bias)
    model_kwargs = fit_model_kwargs(
        nads.model,
        nads.variables,
        linearize_at=nads.params if cfg.linearize else None,
        with_bias=cfg.with_bias,
    )
    result = fit(
        **model_kwargs,
        x_train=data.x_train,
        y_train=y_train,
        x_test=data.x_test,
        y_test=y_test,
        config=config,
        seed=order_seed(cfg),
        run_dir=run_dir,
        checkpoint_dir=run_dir / "checkpoints",
        progress=cfg.progress,
        desc=f"{mode} NAD {cfg.label_idx}",
    )
    timings["train_s"] = result.final["wall_time_s"]

    metrics = {
        **result.final,
        "label_idx": cfg.label_idx,
        "nad_idx": cfg.label_idx,
        "linearize": bool(cfg.linearize),
        "mode": mode,
        "eigval": float(nads.eigvals[cfg.label_idx]),
        "train/label_mean": float(y_train.mean()),
        "test/label_mean": float(y_test.mean()),
        **run_facts(file_sha256(nads.path / "init_params.msgpack"), y_train, y_test),
    }
    write_results(
        run_folder,
        cfg=cfg,
        script="train_nads",
        metrics=metrics,
        meta={
            "nads": str(nads.path.resolve()),
            "nads_seed": nads.config.seed,
            "nads_input_std": nads.config.nads.input_std,
            "num_train": len(y_train),
            "num_test": len(y_test),
            "input_shape": list(nads.shape),
            "num_params": count_params(nads.params),
            "timings": timings,
        },
        summary_name=f"nad_{cfg.label_idx}-{mode}-seed_{cfg.seed}.json",
    )
