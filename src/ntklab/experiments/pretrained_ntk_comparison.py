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
  ``J(θ_T, x)(θ − θ_T)``, from θ_T, with the BatchNorm running statistics ``bn_statistics``
  names: ``initial`` (the default: reset to θ0's) or ``trained`` (those the network reached).

Both linear models output 0 at their starting point, so they differ only in their tangent kernel.
One ``bn_statistics`` choice covers (c)'s linearization, hence its kernel, its training and its
learning-rate estimate; models without BatchNorm accept and record the key (``has_batch_norm:
false``), which then has no effect.

**Step sizes.** With ``train.lr_normalization=ntk``, (c) trains with ``max_lr · λ_max(K_init) /
λ_max(K_(c))``: the top eNTK eigenvalues on the train set of the initial network and of (c)'s
model (the network's at θ_T under (c)'s statistics), each from a few matrix-free power iterations
(:mod:`ntklab.lr_normalization`); the estimate is saved in
``runs/linear_pretrained/lr_normalization.json`` and reused when the run resumes. (a) and (b)
start at θ0 with the kernel K_init, so their ratio is 1 by definition and is not estimated.
``lr_normalization`` in metrics.json and meta.json records, per run, the λ_max estimates, the ratio
and the effective ``max_lr``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flax import linen as nn
from omegaconf import DictConfig

from ntklab import artifacts
from ntklab.experiments.eigenfunctions import (
    bn_statistics_record,
    check_eigenfunctions,
    eigenfunction_labels,
    has_batch_norm,
    load_eigenfunctions,
    select_batch_stats,
    warn_if_unresolved,
)
from ntklab.experiments.prerequisites import ensure_eigenfunctions
from ntklab.experiments.training import (
    check_training,
    file_sha256,
    finished_already,
    from_init_lr_scale,
    majority_rate,
    make_trainee,
    ntk_run_meta,
    open_training_run,
    order_seed,
    run_facts,
    write_results,
)
from ntklab.experiments.validation import train_config
from ntklab.lr_normalization import LrScale, ntk_lr_scale
from ntklab.models import inference_apply_fn
from ntklab.plots import comparison_figure
from ntklab.train import TrainConfig, TrainData, Trainee, fit
from ntklab.types import PyTree

logger = logging.getLogger(__name__)

RUNS = ("network", "linear_init", "linear_pretrained")
"""The three runs, in the order they are trained."""

LR_SCALE_FILE = "lr_normalization.json"
"""(c)'s learning-rate estimate in its run folder, reused on resume (the same lr bit for bit)."""


def comparison_setup(
    name: str,
    *,
    model: nn.Module,
    init_variables: PyTree,
    pretrained_params: PyTree | None = None,
    pretrained_batch_stats: PyTree | None = None,
    bn_statistics: str = "initial",
) -> dict[str, Any]:
    """The model arguments of :func:`ntklab.train.fit` for one of the three runs.

    Args:
      name: one of ``RUNS``.
      model: the Flax module.
      init_variables: ``{"params": θ0, "batch_stats": ...}`` at initialization.
      pretrained_params: θ_T of the ``network`` run; needed for ``linear_pretrained``.
      pretrained_batch_stats: the ``network`` run's final BatchNorm statistics; needed for
        ``linear_pretrained`` with ``bn_statistics="trained"`` when the model has BatchNorm.
      bn_statistics: ``linear_pretrained``'s statistics: ``initial`` (θ0's) or ``trained``.

    Returns:
      ``apply_fn`` or ``train_apply_fn``/``eval_apply_fn``, ``params`` and ``batch_stats``.

    Raises:
      ValueError: unknown name or ``bn_statistics``, or ``linear_pretrained`` without
        ``pretrained_params`` (or without ``pretrained_batch_stats`` when they are needed).
    """
    if name == "network":
        return make_trainee(model, init_variables)
    if name == "linear_init":
        return make_trainee(
            model, init_variables, linearize_at=init_variables["params"], with_bias=False
        )
    if name == "linear_pretrained":
        if pretrained_params is None:
            raise ValueError("linear_pretrained needs the network run's trained parameters")
        init_stats = init_variables.get("batch_stats", {})
        if pretrained_batch_stats is None and bn_statistics == "trained":
            if has_batch_norm(init_variables):
                raise ValueError(
                    "linear_pretrained with bn_statistics='trained' needs the network run's "
                    "BatchNorm statistics (pretrained_batch_stats)"
                )
            pretrained_batch_stats = init_stats  # no BatchNorm: nothing to choose
        stats = select_batch_stats(bn_statistics, init_stats, pretrained_batch_stats)
        variables = {**init_variables, "params": pretrained_params}
        if "batch_stats" in init_variables:
            variables["batch_stats"] = stats
        return make_trainee(model, variables, linearize_at=pretrained_params, with_bias=False)
    raise ValueError(f"unknown run {name!r}; valid choices: {', '.join(RUNS)}")


def check(cfg: DictConfig) -> str:
    """Everything ``run`` checks before it writes (those of ``train_ntk.check``); returns the run
    folder's state."""
    return check_training(cfg, check_eigenfunctions)


def run(cfg: DictConfig) -> Path:
    """Trains the three models and compares their accuracies.

    Args:
      cfg: the composed ``config/pretrained_ntk_comparison`` config (``seed``, ``label_idx``,
        ``model``, ``data``, ``train``, ``paths``, ``progress``).

    Returns:
      The run folder (left as it is when it already holds this finished run).

    Raises:
      See :func:`check`.
    """
    done = finished_already(cfg, check(cfg), "pretrained_ntk_comparison")
    if done is not None:
        return done
    config = train_config(cfg)
    ensure_eigenfunctions(cfg, num_eigvecs=cfg.label_idx + 1)  # prerequisites=create
    ntk_run = load_eigenfunctions(cfg)
    labels = eigenfunction_labels(ntk_run.eigvecs, cfg.label_idx)
    unresolved = warn_if_unresolved(ntk_run.path, cfg.label_idx)
    with open_training_run(cfg, "pretrained_ntk_comparison") as run_folder:
        _compare(cfg, config, ntk_run, labels, run_folder, unresolved)
    return run_folder.path


def _compare(cfg, config, ntk_run, labels, run_folder: artifacts.RunFolder, unresolved) -> None:
    """Trains the three runs, plots their accuracies and writes the results."""
    run_dir = run_folder.path
    n = ntk_run.num_train
    data = TrainData(ntk_run.x[:n], labels[:n], ntk_run.x[n:], labels[n:])
    finals: dict[str, dict] = {}
    timings: dict[str, float] = {}
    scales: dict[str, LrScale] = {}
    pretrained, pretrained_stats = None, None
    for name in RUNS:
        setup = comparison_setup(
            name,
            model=ntk_run.model,
            init_variables=ntk_run.variables,
            pretrained_params=pretrained,
            pretrained_batch_stats=pretrained_stats,
            bn_statistics=cfg.bn_statistics,
        )
        folder = run_dir / "runs" / name
        artifacts.save_params(
            folder / "start_params.msgpack",
            {"params": setup.params, "batch_stats": setup.batch_stats},
        )
        if name == "linear_pretrained" and config.lr_normalization == "ntk":
            tic = time.perf_counter()
            scales[name] = _pretrained_lr_scale(config, ntk_run, setup, data.x_train, folder)
            timings["lr_normalization_s"] = time.perf_counter() - tic
        else:
            scales[name] = from_init_lr_scale(config)  # (a), (b): K_init itself
        tic = time.perf_counter()
        result = fit(
            setup,
            data,
            dataclasses.replace(config, max_lr=scales[name].effective_max_lr),
            seed=order_seed(cfg),
            run_dir=folder,
            checkpoint_dir=run_dir / "checkpoints" / name,
            progress=cfg.progress,
            desc=name,
        )
        timings[f"{name}_s"] = time.perf_counter() - tic
        finals[name] = result.final
        if name == "network":
            pretrained, pretrained_stats = result.params, result.batch_stats

    accuracies = {
        name: {key: final[key] for key in ("train/acc", "test/acc")}
        for name, final in finals.items()
    }
    figure = comparison_figure(
        accuracies,
        title=f"{cfg.model.name} on {cfg.data.dataset}, labels sign(v_{cfg.label_idx})",
        chance={
            "train/acc": majority_rate(labels[:n]),
            "test/acc": majority_rate(labels[n:]),
        },
    )
    for suffix in ("png", "pdf"):
        artifacts.save_figure(figure, run_dir / f"comparison.{suffix}")
    logger.info("test accuracies: %s", {k: round(v["test/acc"], 4) for k, v in accuracies.items()})
    facts = {
        "lr_normalization": {name: scale.as_dict() for name, scale in scales.items()},
        **bn_statistics_record(cfg.bn_statistics, ntk_run.variables),
    }
    write_results(
        run_folder,
        cfg=cfg,
        script="pretrained_ntk_comparison",
        metrics={
            "label_idx": cfg.label_idx,
            "eigval": float(ntk_run.eigvals[cfg.label_idx]),
            "label_unresolved": unresolved,
            "train/label_mean": float(np.mean(labels[:n])),
            **run_facts(file_sha256(ntk_run.path / "init_params.msgpack"), labels[:n], labels[n:]),
            **facts,
            "runs": finals,
        },
        meta={**ntk_run_meta(ntk_run, timings), **facts},
    )


def _pretrained_lr_scale(
    config: TrainConfig,
    ntk_run: artifacts.NTKRun,
    setup: Trainee,
    x_train: np.ndarray,
    folder: Path,
) -> LrScale:
    """(c)'s learning rate under ``lr_normalization=ntk``: ``max_lr · λ_max(K_init) / λ_max(K_(c))``.

    K_init is the initial network's eNTK (θ0, θ0's BatchNorm statistics), K_(c) that of the model
    (c) trains, both on the train set [N_train, ...]. (c)'s model J(θ_T)(θ − θ_T) has, at every
    θ, the network's eNTK at θ_T under (c)'s BatchNorm statistics ``setup.batch_stats`` (those
    ``bn_statistics`` chose), so that network is what the estimate multiplies with (it is also
    cheaper than differentiating the linearization). A saved estimate in ``folder`` (an
    interrupted run's) is reused, so a resumed run has the identical learning rate.
    """
    path = folder / LR_SCALE_FILE
    if path.is_file():
        scale = LrScale.from_dict(artifacts.load_json(path))
        logger.info(
            "lr_normalization=ntk: reusing %s: ratio %.6g, max_lr %.6g -> %.6g",
            path,
            scale.ratio,
            scale.max_lr,
            scale.effective_max_lr,
        )
        return scale
    pretrained = {"params": setup.params, "batch_stats": setup.batch_stats}
    scale = ntk_lr_scale(
        inference_apply_fn(ntk_run.model, ntk_run.variables),
        ntk_run.params,
        inference_apply_fn(ntk_run.model, pretrained),
        setup.params,
        x_train,
        max_lr=config.max_lr,
    )
    artifacts.save_json(path, scale.as_dict())
    return scale
