"""What the training scripts share: the run folder, the model's functions and the result files.

Each training script (``train_ntk``, ``pretrained_ntk_comparison``, ``train_cifar``) writes into
its Hydra run folder (``paths.run_dir``, by default ``${hydra:runtime.output_dir}``):
``metrics.jsonl`` (per epoch), ``params.msgpack``, ``metrics.json`` (final metrics and the
resolved config), figures, and ``meta.json`` last; plus a copy of ``metrics.json`` with the run
folder's path under ``paths.summary_dir`` in ``artifacts/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from ntklab import artifacts
from ntklab.experiments.schema import validate
from ntklab.linearize import linearize
from ntklab.models import count_params, inference_apply_fn, train_apply_fn
from ntklab.train import TrainConfig, eval_apply_fn
from ntklab.types import PyTree

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


NON_IDENTITY_KEYS = {
    "": ("paths", "progress", "overwrite", "prerequisites"),
    "data": ("root", "download"),
    "train": ("eval_batch_size", "checkpoint_every"),
    "alignment": ("batch_size", "vector_batch_size"),
}
"""Config keys that do not change a training run's results, left out of its folder's identity."""


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """The config keys that determine a training run's results (what ``config.json`` records)."""
    identity = {
        key: artifacts.to_container(cfg[key]) if isinstance(cfg[key], DictConfig) else cfg[key]
        for key in cfg
        if key not in NON_IDENTITY_KEYS[""]
    }
    for group, keys in NON_IDENTITY_KEYS.items():
        for key in keys if group and group in identity else ():
            identity[group].pop(key, None)
    return identity


def run_dir_of(cfg: DictConfig) -> Path:
    """``paths.run_dir``, resolved.

    Raises:
      ValueError: ``paths.run_dir`` is Hydra's output folder but the config was not composed by
        ``@hydra.main`` (e.g. ``hydra.compose`` in a notebook or test): set it explicitly.
    """
    try:
        return Path(cfg.paths.run_dir)
    except InterpolationResolutionError as error:
        raise ValueError(
            "paths.run_dir is ${hydra:runtime.output_dir}, which exists only in a run started by "
            "@hydra.main; set paths.run_dir=<folder> when calling run(cfg) directly"
        ) from error


@contextlib.contextmanager
def open_training_run(cfg: DictConfig) -> Iterator[artifacts.RunFolder]:
    """Logs the config and devices, then claims and locks the run folder (see ``open_run``).

    A rerun of the same configuration into the folder continues there; another configuration is
    refused unless ``overwrite=true``. Hydra's own files in the folder (``.hydra/``, the log) stay.

    Raises:
      ValueError: ``paths.run_dir`` cannot be resolved (see :func:`run_dir_of`).
      FileExistsError: the folder holds a run of another configuration.
      RunFolderInUse: another process is writing the folder.
    """
    run_dir = run_dir_of(cfg)
    logger.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    logger.info("JAX devices: %s", jax.devices())
    with artifacts.open_run(
        run_dir, run_identity(cfg), overwrite=cfg.overwrite, foreign_files=True
    ) as run_folder:
        logger.info("writing to %s", run_dir.resolve())
        yield run_folder


def train_config(cfg: DictConfig) -> TrainConfig:
    """Checks the whole config (:func:`~ntklab.experiments.schema.validate`) and returns the
    ``train:`` block as a :class:`~ntklab.train.TrainConfig`."""
    validate(cfg)
    return TrainConfig.from_mapping(artifacts.to_container(cfg.train))


def mode_name(*, linearize: bool, with_bias: bool = True) -> str:
    """``network``, ``linear`` or ``linear_nobias``: the model a run trains."""
    if not linearize:
        return "network"
    return "linear" if with_bias else "linear_nobias"


def fit_model_kwargs(
    model: nn.Module,
    variables: PyTree,
    *,
    linearize_at: PyTree | None = None,
    with_bias: bool = True,
) -> dict[str, Any]:
    """The model arguments of :func:`ntklab.train.fit` for a network or its linearization.

    Args:
      model: the Flax module.
      variables: ``{"params": θ_start, "batch_stats": ...}`` (``batch_stats`` only with BatchNorm):
        training starts from these parameters and statistics.
      linearize_at: None trains the network (BatchNorm in training mode, evaluation in inference
        mode with the state's statistics); otherwise the parameters θ* at which to linearize the
        network, taken in inference mode with ``variables["batch_stats"]``.
      with_bias: with ``linearize_at``, keep f(θ*, x).

    Returns:
      ``apply_fn`` or ``train_apply_fn`` + ``eval_apply_fn``, plus ``params`` and ``batch_stats``.
    """
    start = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    if linearize_at is None:
        return {
            "apply_fn": None,
            "train_apply_fn": train_apply_fn(model),
            "eval_apply_fn": eval_apply_fn(model),
            **start,
        }
    apply_fn = inference_apply_fn(model, variables)
    return {"apply_fn": linearize(apply_fn, linearize_at, with_bias=with_bias), **start}


def write_results(
    run_folder: artifacts.RunFolder,
    *,
    cfg: DictConfig,
    script: str,
    metrics: dict[str, Any],
    meta: dict[str, Any],
    summary_name: str,
) -> None:
    """Writes ``metrics.json``, the summary under ``paths.summary_dir``, then ``meta.json``.

    Args:
      run_folder: the run folder, from :func:`open_training_run`.
      cfg: the run's config (stored resolved in both files).
      script: the script's name.
      metrics: final metrics (``split/metric`` keys) and other results.
      meta: shapes, timings and other metadata for ``meta.json``.
      summary_name: file name of the summary in ``paths.summary_dir``.
    """
    run_dir = run_folder.path
    config = artifacts.to_container(cfg)
    content = {"script": script, **metrics, "config": config}
    artifacts.save_json(run_dir / METRICS_FILE, content)
    summary = Path(cfg.paths.summary_dir) / summary_name
    artifacts.save_json(summary, {**content, "run_dir": str(run_dir.resolve())})
    provenance = (
        {"init_params_sha256": metrics["init_params_sha256"]}
        if "init_params_sha256" in metrics
        else {}
    )
    run_folder.finish(
        {"script": script, "config": config, **provenance, **artifacts.environment_info(), **meta}
    )
    logger.info("done: %s (summary %s)", run_dir, summary)


def order_seed(cfg: DictConfig) -> int:
    """The minibatch-order seed: ``order_seed``, or ``seed`` when it is null."""
    value = cfg.get("order_seed")
    return int(cfg.seed if value is None else value)


def params_sha256(variables: PyTree) -> str:
    """sha256 of θ0's flax-msgpack bytes (``params`` and any ``batch_stats``), serialized as
    :func:`ntklab.artifacts.save_params` writes them."""
    return hashlib.sha256(flax.serialization.to_bytes(jax.device_get(variables))).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (e.g. a run's ``init_params.msgpack``: θ0 as saved)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def majority_rate(labels: np.ndarray) -> float | None:
    """The fraction of ``labels`` [n] in the most common class: what a constant prediction scores.

    Returns None for no labels.
    """
    labels = np.asarray(labels).reshape(-1)
    if not labels.size:
        return None
    _, counts = np.unique(labels, return_counts=True)
    return float(counts.max() / labels.size)


def run_facts(init_params_sha256: str, y_train: np.ndarray, y_test: np.ndarray) -> dict[str, Any]:
    """What every training run records about its start: ``init_params_sha256`` (which θ0: the
    sha256 of its serialized bytes) and ``train/majority_rate``, ``test/majority_rate`` (the
    chance level of its labels)."""
    return {
        "init_params_sha256": init_params_sha256,
        "train/majority_rate": majority_rate(y_train),
        "test/majority_rate": majority_rate(y_test),
    }


def hydra_override(value: object) -> str:
    """A config value written as a Hydra command-line override value (``null``, ``[1,2]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_override(v) for v in value) + "]"
    return str(value)


def ntk_run_meta(ntk_run: artifacts.NTKRun, timings: dict[str, float]) -> dict[str, Any]:
    """``meta.json`` fields of a training run on a ``compute_ntk`` run's samples."""
    n = ntk_run.num_train
    return {
        "eigenfunctions": str(ntk_run.path.resolve()),
        "eigenfunctions_seed": ntk_run.config.seed,
        "num_train": n,
        "num_test": ntk_run.num_samples - n,
        "input_shape": list(ntk_run.x.shape[1:]),
        "num_params": count_params(ntk_run.params),
        "timings": timings,
    }
