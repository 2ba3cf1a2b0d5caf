"""What the training scripts share: the run folder, the model's functions and the result files.

Each training script (``train_ntk``, ``train_nads``, ``pretrained_ntk_comparison``,
``train_cifar``) writes into its run folder (``paths.run_dir``, by default
``<paths.artifacts>/<script>/.../<run name>``, named after the run's identity: see
:mod:`ntklab.experiments.identity`): ``metrics.jsonl`` (per epoch), ``params.msgpack``,
``metrics.json`` (final metrics and the resolved config), figures, and ``meta.json`` last. Nothing
is written outside the run folder except the pointer ``run.json`` in Hydra's job folder
(:func:`ntklab.experiments.checks.point_to_run`), which lets a sweep's report find its runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import numpy as np
from omegaconf import DictConfig, OmegaConf

from ntklab import artifacts
from ntklab.errors import ConfigError
from ntklab.experiments import identity
from ntklab.experiments.pointers import point_to_run
from ntklab.experiments.validation import validate
from ntklab.linearize import linearize
from ntklab.lr_normalization import LrScale, unit_lr_scale
from ntklab.models import count_params, inference_apply_fn, train_apply_fn
from ntklab.train import TrainConfig, Trainee, eval_apply_fn
from ntklab.types import PyTree

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """The config keys that determine a training run's results (what ``config.json`` records)."""
    return identity.run_identity(cfg)


def check_training(cfg: DictConfig, *checks: Callable[[DictConfig], object]) -> str:
    """The checks every training script makes before writing; returns the run folder's state.

    In order: the config (:func:`~ntklab.experiments.validation.validate`; an ignored ``with_bias``
    is noted), the script's own ``checks`` (its prerequisite run, its data), then the run folder
    (``ntklab.artifacts.folder_state``).

    Raises:
      ConfigError: a config value of the wrong range or choice, or an unknown key.
      FileExistsError: the run folder holds a run of another configuration.
      RunFolderInUse: another process is writing the run folder.
      Exception: whatever the ``checks`` raise.
    """
    validate(cfg)
    if "with_bias" in cfg and not cfg.with_bias and not cfg.get("linearize", True):
        logger.warning(
            "with_bias=false is ignored: it only applies to linearized models (linearize=true)"
        )
    for check in checks:
        check(cfg)
    return artifacts.folder_state(cfg.paths.run_dir, run_identity(cfg), overwrite=cfg.overwrite)


def check_prerequisite(
    cfg: DictConfig,
    path: str | Path,
    *,
    script: str,
    groups: tuple[str, ...],
    command: str,
) -> dict[str, Any] | None:
    """Checks the compute run a training run needs (``compute_ntk`` or ``compute_nads``).

    Args:
      cfg: the training config (``seed``, ``prerequisites`` and the ``groups``).
      path: the compute run's folder.
      script: the compute script's name, for the messages.
      groups: the config groups the run must share with ``cfg`` (``data.root`` and
        ``data.download`` may differ).
      command: the command that makes the run, for the messages.

    Returns:
      The run's ``meta.json``; None when it is missing and ``prerequisites=create`` will make it.

    Raises:
      FileNotFoundError: no finished run there (the message gives the command).
      ValueError: the run was made for another configuration (the message lists the keys).
    """
    path = Path(path)
    if not (path / artifacts.META_FILE).is_file():
        if cfg.get("prerequisites", "require") == "create":
            return None
        raise FileNotFoundError(
            f"no finished {script}.py run in {path} (meta.json missing); add "
            f"prerequisites=create to compute it first, or make it with:\n  {command}"
        )
    meta = artifacts.load_json(path / artifacts.META_FILE)
    found = {group: meta.get("config", {}).get(group) for group in (*groups, "seed")}
    wanted = {group: artifacts.to_container(cfg[group]) for group in groups}
    wanted["seed"] = cfg.seed
    for config in (found, wanted):
        if isinstance(config.get("data"), dict):
            config["data"] = {
                k: v for k, v in config["data"].items() if k not in NON_IDENTITY_DATA_KEYS
            }
    differences = artifacts.differences_of(found, wanted)
    if differences:
        raise ValueError(
            f"the {script}.py run in {path} was made for another configuration ("
            + "; ".join(
                key + ": run has " + change.replace(" -> ", ", this config ")
                for key, _, change in (d.partition(": ") for d in differences)
            )
            + f"); pass the run's settings, or recompute it with:\n  {command} overwrite=true"
        )
    return meta


NON_IDENTITY_DATA_KEYS = ("root", "download")
"""Data keys that may differ between a training run and its compute run."""


def check_label_idx(label_idx: int, count: int, *, what: str, path: str | Path, fix: str) -> None:
    """Refuses a ``label_idx`` outside the prerequisite run's ``count`` directions.

    Raises:
      ConfigError: naming the valid range and how to get more (``fix``).
    """
    if not 0 <= label_idx < count:
        raise ConfigError(
            f"label_idx={label_idx} is out of range: {path} holds {count} {what}, so label_idx "
            f"must be in 0..{count - 1}{fix}"
        )


@contextlib.contextmanager
def open_training_run(cfg: DictConfig, script: str) -> Iterator[artifacts.RunFolder]:
    """Logs the config and devices, then claims and locks the run folder (see ``open_run``).

    A rerun of the same configuration into the folder continues there (from its checkpoints);
    another configuration is refused unless ``overwrite=true``.

    Raises:
      FileExistsError: the folder holds a run of another configuration.
      RunFolderInUse: another process is writing the folder.
    """
    run_dir = Path(cfg.paths.run_dir)
    logger.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    logger.info("JAX devices: %s", jax.devices())
    with artifacts.open_run(run_dir, run_identity(cfg), overwrite=cfg.overwrite) as run_folder:
        point_to_run(run_dir, script)
        logger.info("writing to %s", run_dir.resolve())
        yield run_folder


def finished_already(cfg: DictConfig, state: str, script: str) -> Path | None:
    """The run folder when it already holds this finished run (logged), else None.

    ``overwrite=true`` computes a finished run again. A finished run that an interrupted overwrite
    kept in ``.replaced/`` is put back first.
    """
    if state != "finished" or cfg.overwrite:
        return None
    run_dir = Path(cfg.paths.run_dir)
    artifacts.restore_replaced(run_dir, run_identity(cfg))  # after an interrupted overwrite
    logger.info("%s already holds this finished run; nothing to do", run_dir)
    point_to_run(run_dir, script)
    return run_dir


def make_trainee(
    model: nn.Module,
    variables: PyTree,
    *,
    linearize_at: PyTree | None = None,
    with_bias: bool = True,
) -> Trainee:
    """What :func:`ntklab.train.fit` trains: a network or its linearization.

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
        return Trainee(
            train_apply_fn=train_apply_fn(model), eval_apply_fn=eval_apply_fn(model), **start
        )
    apply_fn = inference_apply_fn(model, variables)
    return Trainee(apply_fn=linearize(apply_fn, linearize_at, with_bias=with_bias), **start)


def write_results(
    run_folder: artifacts.RunFolder,
    *,
    cfg: DictConfig,
    script: str,
    metrics: dict[str, Any],
    meta: dict[str, Any],
) -> None:
    """Writes ``metrics.json``, then ``meta.json`` (last: the run is complete once it exists).

    Args:
      run_folder: the run folder, from :func:`open_training_run`.
      cfg: the run's config (stored resolved in both files).
      script: the script's name.
      metrics: final metrics (``split/metric`` keys) and other results.
      meta: shapes, timings and other metadata for ``meta.json``.
    """
    run_dir = run_folder.path
    config = artifacts.to_container(cfg)
    artifacts.save_json(run_dir / METRICS_FILE, {"script": script, **metrics, "config": config})
    provenance = (
        {"init_params_sha256": metrics["init_params_sha256"]}
        if "init_params_sha256" in metrics
        else {}
    )
    run_folder.finish(
        {"script": script, "config": config, **provenance, **artifacts.environment_info(), **meta}
    )
    logger.info("done: %s", run_dir)


SAME_KERNEL = "the model starts at θ0 with the initial kernel K_init: ratio 1 by definition"
"""Why ``lr_normalization=ntk`` estimates nothing for a network or linearization from θ0."""


def from_init_lr_scale(config: TrainConfig) -> LrScale:
    """The learning-rate record of a run that starts at θ0 (network or linearization at θ0),
    whose kernel is K_init: ratio 1, nothing estimated; logged once with ``lr_normalization=ntk``."""
    if config.lr_normalization == "none":
        return unit_lr_scale("none", config.max_lr, reason="lr_normalization=none")
    logger.info(
        "lr_normalization=%s: %s; max_lr %g", config.lr_normalization, SAME_KERNEL, config.max_lr
    )
    return unit_lr_scale(config.lr_normalization, config.max_lr, reason=SAME_KERNEL)


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
    return artifacts.file_digest(path)["sha256"]


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
