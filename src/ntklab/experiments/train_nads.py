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
from ntklab.experiments.identity import mode_name
from ntklab.experiments.prerequisites import ensure_nads
from ntklab.experiments.training import (
    check_label_idx,
    check_prerequisite,
    check_training,
    file_sha256,
    finished_already,
    from_init_lr_scale,
    hydra_override,
    make_trainee,
    open_training_run,
    order_seed,
    run_facts,
    write_results,
)
from ntklab.experiments.validation import train_config
from ntklab.models import count_params
from ntklab.nads import nad_dataset
from ntklab.train import TrainData, fit

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


def check(cfg: DictConfig) -> str:
    """Everything ``run`` checks before it writes; returns the run folder's state.

    Raises:
      ConfigError: an invalid key or value, or ``label_idx`` beyond the run's directions.
      FileNotFoundError: the compute_nads.py run is missing (the message gives the command).
      ValueError: the compute_nads.py run was made for another model or seed.
      FileExistsError: the run folder holds a run of another configuration.
      RunFolderInUse: another process is writing the run folder.
    """
    return check_training(cfg, _check_nads)


def _check_nads(cfg: DictConfig) -> None:
    """The compute_nads.py run ``cfg`` trains on, and ``label_idx`` among its directions."""
    meta = check_prerequisite(
        cfg, cfg.paths.nads, script="compute_nads", groups=("model",),
        command=compute_nads_command(cfg),
    )  # fmt: skip
    if meta is not None:
        count = int(meta.get("input_dim", 0))
        check_label_idx(cfg.label_idx, count, what="NADs", path=cfg.paths.nads, fix="")


def run(cfg: DictConfig) -> Path:
    """Trains on the task along NAD ``label_idx``.

    Args:
      cfg: the composed ``config/train_nads`` config (``seed``, ``label_idx``, ``linearize``,
        ``with_bias``, ``model``, ``data``, ``train``, ``paths``, ``progress``).

    Returns:
      The run folder (left as it is when it already holds this finished run).

    Raises:
      See :func:`check`.
    """
    done = finished_already(cfg, check(cfg), "train_nads")
    if done is not None:
        return done
    timings: dict[str, float] = {}
    config = train_config(cfg)
    tic = time.perf_counter()
    ensure_nads(cfg)  # prerequisites=create
    check(cfg)  # the NAD run exists now: its directions and label_idx
    nads = load_nads(cfg.paths.nads)
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
    with open_training_run(cfg, "train_nads") as run_folder:
        _train(cfg, config, nads, data, y_train, y_test, run_folder, timings)
    return run_folder.path


def _train(cfg, config, nads: NADRun, data, y_train, y_test, run_folder, timings) -> None:
    """Trains on the NAD task and writes the results."""
    run_dir = run_folder.path
    mode = mode_name(linearize=cfg.linearize, with_bias=cfg.with_bias)
    trainee = make_trainee(
        nads.model,
        nads.variables,
        linearize_at=nads.params if cfg.linearize else None,
        with_bias=cfg.with_bias,
    )
    result = fit(
        trainee,
        TrainData(data.x_train, y_train, data.x_test, y_test),
        config,
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
        "lr_normalization": from_init_lr_scale(config).as_dict(),
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
    )
