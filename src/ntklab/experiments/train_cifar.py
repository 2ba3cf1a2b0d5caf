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

import jax
import numpy as np
from omegaconf import DictConfig

from ntklab import artifacts
from ntklab.data import load_dataset_config
from ntklab.experiments.training import (
    fit_model_kwargs,
    mode_name,
    open_training_run,
    order_seed,
    params_sha256,
    run_facts,
    train_config,
    write_results,
)
from ntklab.models import build_model, count_params, init_variables
from ntklab.train import fit

logger = logging.getLogger(__name__)


def run(cfg: DictConfig) -> Path:
    """Trains on a binary dataset's real labels.

    Args:
      cfg: the composed ``config/train_cifar`` config (``seed``, ``linearize``, ``with_bias``,
        ``model``, ``data``, ``train``, ``paths``, ``progress``).

    Returns:
      The run folder.

    Raises:
      ValueError: a dataset that is not binary (e.g. ``cifar10``; use ``cifar2``), an unknown
        model or dataset, or invalid training options.
      FileNotFoundError: the dataset's files are missing.
    """
    timings: dict[str, float] = {}
    config = train_config(cfg)
    model = build_model(**cfg.model)
    tic = time.perf_counter()
    dataset = load_dataset_config(cfg.data, seed=cfg.seed)
    if dataset.num_classes != 2:
        raise ValueError(
            f"train_cifar trains binary classifiers, but data.dataset={cfg.data.dataset!r} has "
            f"{dataset.num_classes} classes; use a binary dataset such as data.dataset=cifar2"
        )
    timings["data_s"] = time.perf_counter() - tic
    with open_training_run(cfg) as run_folder:
        _train(cfg, config, model, dataset, run_folder, timings)
    return run_folder.path


def _train(cfg, config, model, dataset, run_folder: artifacts.RunFolder, timings) -> None:
    """Trains on the dataset's labels and writes the results."""
    run_dir = run_folder.path
    x_train, x_test = dataset.train.images, dataset.test.images
    y_train = dataset.train.labels.astype(np.float32)
    y_test = dataset.test.labels.astype(np.float32)

    variables = init_variables(model, jax.random.PRNGKey(cfg.seed), tuple(x_train.shape[1:]))
    mode = mode_name(linearize=cfg.linearize, with_bias=cfg.with_bias)
    model_kwargs = fit_model_kwargs(
        model,
        variables,
        linearize_at=variables["params"] if cfg.linearize else None,
        with_bias=cfg.with_bias,
    )
    result = fit(
        **model_kwargs,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        config=config,
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
            **run_facts(params_sha256(variables), y_train, y_test),
        },
        meta={
            "num_train": len(x_train),
            "num_test": len(x_test),
            "input_shape": list(x_train.shape[1:]),
            "num_params": count_params(variables["params"]),
            "timings": timings,
        },
        summary_name=f"n_{len(x_train)}-{mode}-seed_{cfg.seed}.json",
    )
