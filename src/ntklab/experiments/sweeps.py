"""A multirun's plan: its jobs in launch order, each job's config, and a preset's grids clipped to
what the runs can have.

    jobs = sweep_jobs(config)          # [["label_idx=0", "linearize=true", "seed=0"], ...]
    lines = clip_grids(config, "train_ntk")   # drops label_idx values beyond the eigenvectors
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ntklab import artifacts
from ntklab.experiments.prerequisites import DEFAULT_NUM_EIGVECS, compose

__all__ = ["clip_grids", "data_sizes", "job_config", "nads_shape", "preset_name", "sweep_jobs"]


def preset_name(config: DictConfig) -> str | None:
    """The name of the preset a multirun's config selected (``experiment=<name>``), or None."""
    callback = OmegaConf.select(config, "hydra.callbacks.preset")
    return None if callback is None else str(callback.get("name"))


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """Every job of a multirun as its overrides, in launch order (as Hydra's basic sweeper).

    Args:
      config: the multirun's config (with ``hydra``): ``hydra.sweeper.params`` and the
        command-line overrides ``hydra.overrides.task`` (which win over the params).

    Returns:
      One ``["key=value", ...]`` list per job.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    # Hydra's basic sweeper's order: the cartesian product of the overrides' values; a key given
    # twice (preset params, then the command line) keeps its first position and its last value.
    choices: dict[str, list[str]] = {}
    for override in overrides:
        key = override.get_key_element()
        if override.is_sweep_override():
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*choices.values())]


_JOB_CONFIGS: dict[tuple[int, tuple[str, ...]], DictConfig] = {}


def job_config(config: DictConfig, job: Sequence[str]) -> DictConfig:
    """One job's composed config, as the launcher composes it (cached)."""
    key = (id(config), tuple(job))
    if key not in _JOB_CONFIGS:
        loader = GlobalHydra.instance().config_loader()
        _JOB_CONFIGS[key] = loader.load_sweep_config(config, list(job))
    return _JOB_CONFIGS[key]


def clip_grids(config: DictConfig, script: str) -> list[str]:
    """Drops values of the preset's grid (``hydra.sweeper.params``) beyond what the runs have.

    ``label_idx`` of eigenfunction sweeps stops below the eigenvector count (the existing run's,
    else ``min(N, 200)`` for one created), of NAD sweeps below D; ``data.num_train`` of CIFAR-2
    sweeps at the train split's size. Values given on the command line are kept.

    Returns:
      One line per clipped key, saying what was dropped and why.
    """
    params = config.hydra.sweeper.get("params") or {}
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = {
        override.get_key_element()
        for override in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    }
    key = {"train_ntk": "label_idx", "pretrained_ntk_comparison": "label_idx"}.get(script)
    key = key or {"train_nads": "label_idx", "train_cifar": "data.num_train"}.get(script)
    if key is None or key not in params or key in given:
        return []
    values = [v.strip() for v in str(params[key]).split(",")]
    limit, reason = _limit(config, script)
    kept = [v for v in values if v == "null" or int(v) < limit]
    if kept == values:
        return []
    if not kept:
        raise ValueError(f"every {key} of the grid is beyond the runs' limit: {reason}")
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.sweeper.params[key] = ",".join(kept)
    dropped = ",".join(v for v in values if v not in kept)
    return [f"{key}={dropped} dropped from the grid ({reason})"]


def _limit(config: DictConfig, script: str) -> tuple[int, str]:
    """The exclusive upper bound of the preset's swept key, and why."""
    job = sweep_jobs(config)[0]
    cfg = job_config(config, job)
    if script == "train_cifar":
        size = data_sizes(OmegaConf.merge(cfg, {"data": {"num_train": None}}))[1]
        return size + 1, f"the {cfg.data.dataset} train split has {size} images"
    if script == "train_nads":
        shape = nads_shape(cfg)
        size = int(np.prod(shape))
        return size, f"D = {size} directions for inputs {list(shape)}"
    limit, reason = math.inf, ""
    for seed_job in distinct_by(sweep_jobs(config), ("seed", "model", "data", "paths")):
        cfg = job_config(config, seed_job)
        seed = cfg.seed
        path = Path(cfg.paths.eigenfunctions)
        if (path / "eigvals.npy").is_file():
            count = len(np.load(path / "eigvals.npy", mmap_mode="r"))
            why = f"the compute_ntk.py run of seed {seed} has {count} eigenvectors"
        else:
            _, num_train, num_test = data_sizes(cfg)
            count = min(num_train + num_test, DEFAULT_NUM_EIGVECS)
            why = f"a created compute_ntk.py run of seed {seed} will have {count} eigenvectors"
        if count < limit:
            limit, reason = count, why
    return int(limit), reason


def distinct_by(jobs: list[list[str]], prefixes: tuple[str, ...]) -> list[list[str]]:
    """One job per distinct combination of the overrides of keys starting with ``prefixes``."""
    seen: dict[tuple[str, ...], list[str]] = {}
    for job in jobs:
        kind = tuple(o for o in job if o.split("=", 1)[0].split(".")[0] in prefixes)
        seen.setdefault(kind, job)
    return list(seen.values())


_SPLITS: dict[str, tuple[tuple[int, ...], int, int]] = {}


def data_sizes(cfg: DictConfig) -> tuple[tuple[int, ...], int, int]:
    """``(image shape, num_train, num_test)`` of a run's data (the full splits are read once)."""
    from ntklab.data import load_dataset_config

    data = artifacts.to_container(cfg.data)
    full = {**data, "num_train": None, "num_test": None}
    key = json.dumps(full, sort_keys=True)
    if key not in _SPLITS:
        dataset = load_dataset_config(full, seed=0)
        shape = tuple(int(s) for s in dataset.train.images.shape[1:])
        _SPLITS[key] = (shape, len(dataset.train.images), len(dataset.test.images))
    shape, train_size, test_size = _SPLITS[key]
    num_train = train_size if data["num_train"] is None else min(data["num_train"], train_size)
    num_test = test_size if data["num_test"] is None else min(data["num_test"], test_size)
    return shape, num_train, num_test


def nads_shape(cfg: DictConfig) -> tuple[int, ...]:
    """The input shape of a ``train_nads`` run: its NAD run's, else compute_nads.py's default."""
    meta = Path(cfg.paths.nads) / artifacts.META_FILE
    if meta.is_file():
        shape = artifacts.load_json(meta).get("config", {}).get("nads", {}).get("shape")
        if shape:
            return tuple(int(s) for s in shape)
    return tuple(int(s) for s in compose("compute_nads", []).nads.shape)
