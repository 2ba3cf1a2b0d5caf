"""``pretrained_ntk_comparison.py``: is the network's kernel after training better than at init?

Dimensions: N = N_train + N_test examples (train first), P parameters.

    run(cfg)   # writes {paths.run_dir}/runs/{network,linear_init,linear_pretrained}/metrics.jsonl,
               # params.msgpack, start_params.msgpack; metrics.json, comparison.png/.pdf, meta.json

On the labels of ``train_ntk`` (the sign of eigenvector ``label_idx`` of the compute_ntk.py run),
three runs with the same data order (``seed``) and training options:

- ``network``: the network from θ0 (BatchNorm in training mode), reaching θ_T;
- ``linear_init``: the linearization without bias at θ0, ``J(θ0, x)(θ − θ0)``, from θ0, with the
  initial BatchNorm statistics in inference mode;
- ``linear_pretrained``: the linearization without bias at the network's trained parameters,
  ``J(θ_T, x)(θ − θ_T)`` with BatchNorm statistics reset to the initial ones, from θ_T.

Both linear models output 0 at their starting point, so they differ only in their tangent kernel.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flax import linen as nn
from omegaconf import DictConfig

from ntklab import artifacts
from ntklab.experiments.train_ntk import check_label_idx, eigenfunction_labels, load_ntk_run
from ntklab.experiments.training import (
    file_sha256,
    fit_model_kwargs,
    ntk_run_meta,
    open_training_run,
    order_seed,
    run_facts,
    train_config,
    write_results,
)
from ntklab.plots import comparison_figure
from ntklab.train import fit
from ntklab.types import PyTree

logger = logging.getLogger(__name__)

RUNS = ("network", "linear_init", "linear_pretrained")
"""The three runs, in the order they are trained."""


def comparison_setup(
    name: str,
    *,
    model: nn.Module,
    init_variables: PyTree,
    pretrained_params: PyTree | None = None,
) -> dict[str, Any]:
    """The model arguments of :func:`ntklab.train.fit` for one of the three runs.

    Args:
      name: one of ``RUNS``.
      model: the Flax module.
      init_variables: ``{"params": θ0, "batch_stats": ...}`` at initialization.
      pretrained_params: θ_T of the ``network`` run; needed for ``linear_pretrained``.

    Returns:
      ``apply_fn`` or ``train_apply_fn``/``eval_apply_fn``, ``params`` and ``batch_stats``.

    Raises:
      ValueError: unknown name, or ``linear_pretrained`` without ``pretrained_params``.
    """
    if name == "network":
        return fit_model_kwargs(model, init_variables)
    if name == "linear_init":
        return fit_model_kwargs(
            model, init_variables, linearize_at=init_variables["params"], with_bias=False
        )
    if name == "linear_pretrained":
        if pretrained_params is None:
            raise ValueError("linear_pretrained needs the network run's trained parameters")
        variables = {**init_variables, "params": pretrained_params}  # initial BatchNorm stats
        return fit_model_kwargs(model, variables, linearize_at=pretrained_params, with_bias=False)
    raise ValueError(f"unknown run {name!r}; valid choices: {', '.join(RUNS)}")


def run(cfg: DictConfig) -> Path:
    """Trains the three models and compares their accuracies.

    Args:
      cfg: the composed ``config/pretrained_ntk_comparison`` config (``seed``, ``label_idx``,
        ``model``, ``data``, ``train``, ``paths``, ``progress``).

    Returns:
      The run folder.

    Raises:
      FileNotFoundError: the compute_ntk.py run is missing (the message gives the command).
      ValueError: ``label_idx`` out of range, a mismatching run, or invalid training options.
    """
    config = train_config(cfg)
    check_label_idx(cfg.label_idx)
    ntk_run = load_ntk_run(cfg, num_eigvecs=cfg.label_idx + 1)
    labels = eigenfunction_labels(ntk_run.eigvecs, cfg.label_idx)
    with open_training_run(cfg) as run_folder:
        _compare(cfg, config, ntk_run, labels, run_folder)
    return run_folder.path


def _compare(cfg, config, ntk_run, labels, run_folder: artifacts.RunFolder) -> None:
    """Trains the three runs, plots their accuracies and writes the results."""
    run_dir = run_folder.path
    n = ntk_run.num_train
    data = {
        "x_train": ntk_run.x[:n],
        "y_train": labels[:n],
        "x_test": ntk_run.x[n:],
        "y_test": labels[n:],
    }
    finals: dict[str, dict] = {}
    timings: dict[str, float] = {}
    pretrained = None
    for name in RUNS:
        setup = comparison_setup(
            name,
            model=ntk_run.model,
            init_variables=ntk_run.variables,
            pretrained_params=pretrained,
        )
        folder = run_dir / "runs" / name
        artifacts.save_params(
            folder / "start_params.msgpack",
            {"params": setup["params"], "batch_stats": setup["batch_stats"]},
        )
        tic = time.perf_counter()
        result = fit(
            **setup,
            **data,
            config=config,
            seed=order_seed(cfg),
            run_dir=folder,
            checkpoint_dir=run_dir / "checkpoints" / name,
            progress=cfg.progress,
            desc=name,
        )
        timings[f"{name}_s"] = time.perf_counter() - tic
        finals[name] = result.final
        if name == "network":
            pretrained = result.params

    accuracies = {
        name: {key: final[key] for key in ("train/acc", "test/acc")}
        for name, final in finals.items()
    }
    figure = comparison_figure(
        accuracies,
        title=f"{cfg.model.name} on {cfg.data.dataset}, labels sign(v_{cfg.label_idx})",
    )
    for suffix in ("png", "pdf"):
        artifacts.save_figure(figure, run_dir / f"comparison.{suffix}")
    logger.info("test accuracies: %s", {k: round(v["test/acc"], 4) for k, v in accuracies.items()})
    write_results(
        run_folder,
        cfg=cfg,
        script="pretrained_ntk_comparison",
        metrics={
            "label_idx": cfg.label_idx,
            "eigval": float(ntk_run.eigvals[cfg.label_idx]),
            "train/label_mean": float(np.mean(labels[:n])),
            **run_facts(file_sha256(ntk_run.path / "init_params.msgpack"), labels[:n], labels[n:]),
            "runs": finals,
        },
        meta=ntk_run_meta(ntk_run, timings),
        summary_name=f"label_{cfg.label_idx}-seed_{cfg.seed}.json",
    )
