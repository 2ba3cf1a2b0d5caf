"""``train_cifar.py``: the network or its linearization on a binary dataset with its real labels.

Dimensions: N_train, N_test examples.

    run(cfg)   # writes {paths.run_dir}/metrics.jsonl, metrics.json, params.msgpack, samples.npz
               # (the subsets' indices in the published splits), meta.json

The default dataset is CIFAR-2 (``data.dataset=cifar2``): CIFAR-10 classes 0-4 (label 0) against
5-9 (label 1), on a class-stratified subset of ``data.num_train`` training images (stratified over
the 10 original classes) and ``data.num_test`` test images. ``seed`` draws the initial weights
(``PRNGKey(seed)``), the subsets and the minibatch order. ``linearize=true`` trains the network's
first-order Taylor model at its initial weights instead.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from omegaconf import DictConfig

from ntklab import artifacts
from ntklab.data import load_dataset_config
from ntklab.errors import ConfigError
from ntklab.experiments.identity import mode_name
from ntklab.experiments.training import (
    check_training,
    finished_already,
    from_init_lr_scale,
    make_trainee,
    open_training_run,
    order_seed,
    params_sha256,
    run_facts,
    write_results,
)
from ntklab.experiments.validation import train_config
from ntklab.models import build_model, count_params, init_variables
from ntklab.train import TrainData, fit

logger = logging.getLogger(__name__)


class Checked(NamedTuple):
    """What :func:`check` found: the data and the run folder's state."""

    dataset: Any
    folder: str


def check(cfg: DictConfig) -> Checked:
    """Everything ``run`` checks before it writes (config, data, run folder).

    Raises:
      ConfigError: an invalid key or value, a subset larger than the split, or a dataset that is
        not binary (e.g. ``cifar10``; use ``cifar2``).
      FileNotFoundError: the dataset's files are missing.
      FileExistsError: the run folder holds a run of another configuration.
      RunFolderInUse: another process is writing the run folder.
    """
    loaded = []

    def check_data(cfg: DictConfig) -> None:
        dataset = load_dataset_config(cfg.data, seed=cfg.seed)
        if dataset.num_classes != 2:
            raise ConfigError(
                f"data.dataset={cfg.data.dataset} is invalid here: train_cifar trains binary "
                f"classifiers and it has {dataset.num_classes} classes; use a binary dataset "
                "such as data.dataset=cifar2"
            )
        loaded.append(dataset)

    state = check_training(cfg, check_data)
    return Checked(loaded[0], state)


def run(cfg: DictConfig) -> Path:
    """Trains on a binary dataset's real labels.

    Args:
      cfg: the composed ``config/train_cifar`` config (``seed``, ``linearize``, ``with_bias``,
        ``model``, ``data``, ``train``, ``paths``, ``progress``).

    Returns:
      The run folder (left as it is when it already holds this finished run).

    Raises:
      See :func:`check`.
    """
    tic = time.perf_counter()
    checked = check(cfg)
    done = finished_already(cfg, checked.folder, "train_cifar")
    if done is not None:
        return done
    timings = {"data_s": time.perf_counter() - tic}
    config = train_config(cfg)
    model = build_model(**cfg.model)
    with open_training_run(cfg, "train_cifar") as run_folder:
        _train(cfg, config, model, checked.dataset, run_folder, timings)
    return run_folder.path


def _train(cfg, config, model, dataset, run_folder: artifacts.RunFolder, timings) -> None:
    """Trains on the dataset's labels and writes the results."""
    run_dir = run_folder.path
    x_train, x_test = dataset.train.images, dataset.test.images
    y_train = dataset.train.labels.astype(np.float32)
    y_test = dataset.test.labels.astype(np.float32)

    variables = init_variables(model, jax.random.PRNGKey(cfg.seed), tuple(x_train.shape[1:]))
    mode = mode_name(linearize=cfg.linearize, with_bias=cfg.with_bias)
    trainee = make_trainee(
        model,
        variables,
        linearize_at=variables["params"] if cfg.linearize else None,
        with_bias=cfg.with_bias,
    )
    result = fit(
        trainee,
        TrainData(x_train, y_train, x_test, y_test),
        config,
        seed=order_seed(cfg),
        run_dir=run_dir,
        checkpoint_dir=run_dir / "checkpoints",
        progress=cfg.progress,
        desc=f"{mode} n={len(x_train)}",
    )
    timings["train_s"] = result.final["wall_time_s"]
    artifacts.save_arrays(
        run_dir / "samples.npz",
        train_indices=dataset.train.indices,
        test_indices=dataset.test.indices,
    )
    write_results(
        run_folder,
        cfg=cfg,
        script="train_cifar",
        metrics={
            **result.final,
            "mode": mode,
            "num_train": len(x_train),
            "num_test": len(x_test),
            "lr_normalization": from_init_lr_scale(config).as_dict(),
            **run_facts(params_sha256(variables), y_train, y_test),
        },
        meta={
            "num_train": len(x_train),
            "num_test": len(x_test),
            "input_shape": list(x_train.shape[1:]),
            "num_params": count_params(variables["params"]),
            "timings": timings,
        },
    )
