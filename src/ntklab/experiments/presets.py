"""Experiment presets: prerequisite runs made on demand, and the sweep's plan and results page.

Dimensions: N examples, B batch size, D = H·W·C input dimension.

A preset (``config/experiment/<name>.yaml``, selected with ``experiment=<name>``) sets
``prerequisites: create`` and registers :class:`PresetCallback` under ``hydra.callbacks``:

    python train_ntk.py -m experiment=eigenfunctions           # prints runs + estimate, sweeps,
                                                                # then writes <sweep dir>/report.md
    python train_ntk.py -m experiment=eigenfunctions hydra.callbacks.preset.dry_run=true  # plan only

With ``prerequisites: create`` a training run whose ``compute_ntk.py`` / ``compute_nads.py`` run
(``paths.eigenfunctions`` / ``paths.nads``) is missing computes it first, in-process, with the
same seed, model and data (:func:`ensure_eigenfunctions`, :func:`ensure_nads`); a run folder
locked by another job is waited for, then loaded.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.global_hydra import GlobalHydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ntklab import artifacts
from ntklab.artifacts import RunFolderInUse

logger = logging.getLogger(__name__)

__all__ = [
    "PREREQUISITES",
    "PresetCallback",
    "ensure_eigenfunctions",
    "ensure_nads",
    "sweep_jobs",
]

PREREQUISITES = ("require", "create")
"""``prerequisites``: ``require`` a finished compute run (error with its command), or ``create`` it."""

DEFAULT_NUM_EIGVECS = 200
"""Eigenpairs a created compute_ntk.py run keeps (its config's default), at least the run's need."""

POLL_S = 2.0
"""Seconds between looks at a prerequisite another job is computing."""

CONFIG_DIR = Path(__file__).resolve().parents[3] / "config"
"""The repository's ``config/``, used when no Hydra app is running (a notebook or a test)."""


# --- prerequisites -----------------------------------------------------------------------------


def ensure_eigenfunctions(cfg: DictConfig, *, num_eigvecs: int) -> None:
    """With ``prerequisites=create``, makes the missing ``compute_ntk.py`` run ``cfg`` trains on.

    The run (``paths.eigenfunctions``) gets ``cfg``'s seed, model and data and
    ``min(N, max(200, num_eigvecs))`` eigenpairs. With ``prerequisites=require`` (or when the run
    exists) nothing happens and loading reports what is missing.

    Args:
      cfg: a validated ``train_ntk`` or ``pretrained_ntk_comparison`` config.
      num_eigvecs: eigenvectors the run needs (``label_idx + 1``).
    """
    if cfg.get("prerequisites", "require") != "create":
        return
    path = Path(cfg.paths.eigenfunctions)

    def create() -> None:
        from ntklab.experiments import compute_ntk

        compute_ntk.run(eigenfunction_config(cfg, num_eigvecs=num_eigvecs))

    _create_once(path, create, what="compute_ntk.py", seed=int(cfg.seed))


def ensure_nads(cfg: DictConfig) -> None:
    """With ``prerequisites=create``, makes the missing ``compute_nads.py`` run (``paths.nads``)
    for ``cfg``'s seed and model; see :func:`ensure_eigenfunctions`."""
    if cfg.get("prerequisites", "require") != "create":
        return
    path = Path(cfg.paths.nads)

    def create() -> None:
        from ntklab.experiments import compute_nads

        compute_nads.run(nads_config(cfg))

    _create_once(path, create, what="compute_nads.py", seed=int(cfg.seed))


def eigenfunction_config(cfg: DictConfig, *, num_eigvecs: int) -> DictConfig:
    """The ``compute_ntk.py`` config of the eigenfunction run a training config needs.

    Args:
      cfg: a ``train_ntk`` or ``pretrained_ntk_comparison`` config.
      num_eigvecs: eigenvectors needed; the run keeps ``min(N, max(200, num_eigvecs))``.
    """
    from ntklab.data import load_dataset_config

    dataset = load_dataset_config(cfg.data, seed=cfg.seed)
    num_samples = len(dataset.train.images) + len(dataset.test.images)
    count = min(num_samples, max(DEFAULT_NUM_EIGVECS, num_eigvecs))
    return _compute_config(
        "compute_ntk/config",
        cfg,
        groups=[f"data={cfg.data.dataset}"],
        values={
            "data": artifacts.to_container(cfg.data),
            "ntk": {"num_eigvecs": count},
            "paths": {"run_dir": str(cfg.paths.eigenfunctions)},
        },
    )


def nads_config(cfg: DictConfig) -> DictConfig:
    """The ``compute_nads.py`` config of the NAD run a ``train_nads`` config needs."""
    return _compute_config(
        "compute_nads/config", cfg, groups=[], values={"paths": {"run_dir": str(cfg.paths.nads)}}
    )


def _compute_config(
    config_name: str, cfg: DictConfig, *, groups: list[str], values: dict[str, Any]
) -> DictConfig:
    """``config_name`` composed for ``cfg``'s seed and model, then ``values`` merged in."""
    composed = compose(config_name, [f"seed={cfg.seed}", f"model={cfg.model.name}", *groups])
    update = {
        "seed": int(cfg.seed),
        "overwrite": False,
        "model": artifacts.to_container(cfg.model),
        **values,
    }
    update["paths"] = {"artifacts": str(cfg.paths.artifacts), **values.get("paths", {})}
    return OmegaConf.merge(composed, update)


def compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """Hydra's ``compose`` in the running app, or on the repository's ``config/`` outside one."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import ntklab.experiments.schema  # noqa: F401  (registers the schemas)

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=config_name, overrides=list(overrides))
    if not (CONFIG_DIR / config_name).with_suffix(".yaml").is_file():
        raise FileNotFoundError(
            f"no {config_name}.yaml in {CONFIG_DIR}: prerequisites=create composes the compute "
            "script's config from the repository's config/ folder"
        )
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def _create_once(path: Path, create: Callable[[], object], *, what: str, seed: int) -> None:
    """Runs ``create`` unless ``path`` holds a finished run; waits while another job holds it."""
    waited = False
    while not (path / artifacts.META_FILE).exists():
        try:
            if not waited:
                logger.info(
                    "prerequisites=create: no finished %s run in %s; computing it now (seed %d)",
                    what,
                    path,
                    seed,
                )
            create()
            return
        except RunFolderInUse as busy:
            if not waited:
                logger.info("%s; waiting for that job, then loading its run", busy)
                waited = True
            time.sleep(POLL_S)
    if waited:
        logger.info("the %s run in %s is finished; loading it", what, path)


# --- the sweep: its jobs, its plan and its results page ----------------------------------------


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """Every job of a multirun as its overrides, in launch order (as Hydra's basic sweeper).

    Args:
      config: the multirun's config (with ``hydra``): ``hydra.sweeper.params`` and the
        command-line overrides ``hydra.overrides.task`` (which win over the params).

    Returns:
      One ``["key=value", ...]`` list per job.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


TIMING_KEYS_IGNORED = ("seed", "order_seed", "label_idx", "progress", "overwrite")
"""Overrides that do not change how long a run takes (one timing covers them)."""


class PresetCallback(Callback):
    """Prints a preset sweep's run count and time estimate first and writes its results page last.

    Registered by the presets under ``hydra.callbacks.preset``.

    Args:
      name: the preset's name (for the printed lines).
      script: the entry script the preset is for (``train_ntk``, ...).
      dry_run: print the plan and exit before any run starts.
      metrics: metric keys the results page plots.
    """

    def __init__(
        self,
        *,
        name: str,
        script: str,
        dry_run: bool = False,
        metrics: Sequence[str] = ("test/acc",),
    ) -> None:
        self.name = name
        self.script = script
        self.dry_run = bool(dry_run)
        self.metrics = list(metrics)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Checks the script, clips the preset's grids, prints the count and the estimate."""
        job_name = config.hydra.job.name
        if job_name != self.script:
            raise ValueError(
                f"experiment={self.name} is a preset of {self.script}.py, not of {job_name}.py; "
                f"run: python {self.script}.py -m experiment={self.name}"
            )
        try:
            for line in clip_grids(config, self.script):
                print(f"preset {self.name}: {line}", flush=True)
        except Exception as error:  # the plan is a convenience: never block the sweep
            print(f"preset {self.name}: grids not checked ({type(error).__name__}: {error})")
        jobs = sweep_jobs(config)
        print(
            f"preset {self.name}: {len(jobs)} runs of {self.script}.py into "
            f"{config.hydra.sweep.dir}",
            flush=True,
        )
        try:
            for line in estimate(config, jobs, self.script):
                print(f"preset {self.name}: {line}", flush=True)
        except Exception as error:
            print(f"preset {self.name}: no time estimate ({type(error).__name__}: {error})")
        if self.dry_run:
            print(f"preset {self.name}: dry run, nothing launched", flush=True)
            raise SystemExit(0)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Runs :func:`ntklab.report.report` on the sweep folder and prints report.md's path."""
        from ntklab.report import report

        folder = Path(config.hydra.sweep.dir)
        try:
            report(folder, metrics=self.metrics)
        except Exception as error:
            print(f"preset {self.name}: no results page ({type(error).__name__}: {error})")
            return
        print(f"preset {self.name}: results page {folder / 'report.md'}", flush=True)


# --- the plan: grids clipped to what the runs have, and the time estimate ----------------------


_JOB_CONFIGS: dict[tuple[int, tuple[str, ...]], DictConfig] = {}


def _job_config(config: DictConfig, job: Sequence[str]) -> DictConfig:
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
    cfg = _job_config(config, job)
    if script == "train_cifar":
        size = _data_sizes(OmegaConf.merge(cfg, {"data": {"num_train": None}}))[1]
        return size + 1, f"the {cfg.data.dataset} train split has {size} images"
    if script == "train_nads":
        shape = _nads_shape(cfg)
        size = int(np.prod(shape))
        return size, f"D = {size} directions for inputs {list(shape)}"
    limit, reason = math.inf, ""
    for seed_job in _distinct_by(sweep_jobs(config), ("seed", "model", "data", "paths")):
        cfg = _job_config(config, seed_job)
        seed = cfg.seed
        path = Path(cfg.paths.eigenfunctions)
        if (path / "eigvals.npy").is_file():
            count = len(np.load(path / "eigvals.npy", mmap_mode="r"))
            why = f"the compute_ntk.py run of seed {seed} has {count} eigenvectors"
        else:
            _, num_train, num_test = _data_sizes(cfg)
            count = min(num_train + num_test, DEFAULT_NUM_EIGVECS)
            why = f"a created compute_ntk.py run of seed {seed} will have {count} eigenvectors"
        if count < limit:
            limit, reason = count, why
    return int(limit), reason


def _distinct_by(jobs: list[list[str]], prefixes: tuple[str, ...]) -> list[list[str]]:
    """One job per distinct combination of the overrides of keys starting with ``prefixes``."""
    seen: dict[tuple[str, ...], list[str]] = {}
    for job in jobs:
        kind = tuple(o for o in job if o.split("=", 1)[0].split(".")[0] in prefixes)
        seen.setdefault(kind, job)
    return list(seen.values())


_SPLITS: dict[str, tuple[tuple[int, ...], int, int]] = {}


def _data_sizes(cfg: DictConfig) -> tuple[tuple[int, ...], int, int]:
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


def _nads_shape(cfg: DictConfig) -> tuple[int, ...]:
    """The input shape of a ``train_nads`` run: its NAD run's, else compute_nads.py's default."""
    meta = Path(cfg.paths.nads) / artifacts.META_FILE
    if meta.is_file():
        shape = artifacts.load_json(meta).get("config", {}).get("nads", {}).get("shape")
        if shape:
            return tuple(int(s) for s in shape)
    return tuple(int(s) for s in compose("compute_nads/config", []).nads.shape)


def estimate(config: DictConfig, jobs: list[list[str]], script: str) -> list[str]:
    """The sweep's estimated training time from one timed step per kind of run.

    Each kind of run (the overrides other than ``TIMING_KEYS_IGNORED``) is composed once; one
    jitted training step at ``train.batch_size`` and one evaluation batch on inputs of the data's
    shape are compiled, then timed; a run takes ``epochs × (steps per epoch × step + evaluation
    of train and test)``. Prerequisite compute runs and the alignment are not in the total: a note
    says which prerequisites are missing.

    Returns:
      Lines to print.
    """
    kinds: dict[tuple[str, ...], list[list[str]]] = {}
    for job in jobs:
        kind = tuple(o for o in job if o.split("=", 1)[0] not in TIMING_KEYS_IGNORED)
        kinds.setdefault(kind, []).append(job)
    total, measured = 0.0, []
    for members in kinds.values():
        cfg = _job_config(config, members[0])
        seconds, what = _run_seconds(cfg, script)
        total += seconds * len(members)
        measured.append(what)
    lines = [
        f"estimated training time {_duration(total)} on {_devices()} "
        f"(one step timed per kind of run: {'; '.join(sorted(set(measured)))})"
    ]
    lines += _prerequisite_notes(config, jobs, script)
    return lines


_STEP_TIMES: dict[str, tuple[float, float]] = {}


def _run_seconds(cfg: DictConfig, script: str) -> tuple[float, str]:
    """Estimated seconds of one run of ``cfg`` and what was timed."""
    from ntklab.train import TrainConfig

    train = TrainConfig.from_mapping(artifacts.to_container(cfg.train))
    if script == "train_nads":
        shape = _nads_shape(cfg)
        num_train, num_test = int(cfg.data.num_train), int(cfg.data.num_test)
    else:
        shape, num_train, num_test = _data_sizes(cfg)
    if script == "pretrained_ntk_comparison":
        models = [(False, True), (True, False), (True, False)]  # network, two linear without bias
    else:
        models = [(bool(cfg.linearize), bool(cfg.with_bias))]
    seconds, timed = 0.0, []
    for linearize, with_bias in models:
        step_s, eval_s = _step_times(cfg, train, shape, linearize=linearize, with_bias=with_bias)
        steps = math.ceil(num_train / train.batch_size)
        eval_batch = min(train.eval_batch_size, max(num_train, num_test))
        evals = math.ceil(num_train / eval_batch) + math.ceil(num_test / eval_batch)
        seconds += train.epochs * (steps * step_s + evals * eval_s) + evals * eval_s
        step = f"{'linear' if linearize else 'network'} {step_s * 1e3:.3g} ms"
        if step not in timed:
            timed.append(step)
    what = f"{cfg.model.name} B={train.batch_size} {list(shape)}: {', '.join(timed)} per step"
    return seconds, what


def _step_times(
    cfg: DictConfig, train: Any, shape: tuple[int, ...], *, linearize: bool, with_bias: bool
) -> tuple[float, float]:
    """Seconds of one jitted training step [B, *shape] and one evaluation batch (cached)."""
    import jax

    from ntklab.experiments.training import fit_model_kwargs
    from ntklab.models import build_model, init_variables
    from ntklab.train_steps import compiled_steps, model_fns

    key = json.dumps(
        [artifacts.to_container(cfg.model), shape, repr(train), linearize, with_bias],
        sort_keys=True,
        default=str,
    )
    if key in _STEP_TIMES:
        return _STEP_TIMES[key]
    model = build_model(**artifacts.to_container(cfg.model))
    variables = init_variables(model, jax.random.PRNGKey(0), shape)
    kwargs = fit_model_kwargs(
        model, variables, linearize_at=variables["params"] if linearize else None,
        with_bias=with_bias,
    )  # fmt: skip
    train_fn, infer = model_fns(
        kwargs["apply_fn"], kwargs.get("train_apply_fn"), kwargs.get("eval_apply_fn"),
        kwargs["batch_stats"],
    )  # fmt: skip
    compiled = compiled_steps(train, max(train.epochs, 1))
    state, _ = compiled.initial_state(kwargs["params"], kwargs["batch_stats"])
    batch = {
        "x": np.zeros((train.batch_size, *shape), np.float32),
        "y": np.zeros((train.batch_size,), np.float32),
    }
    state, _ = jax.block_until_ready(compiled.train_step(train_fn, state, batch))  # compiles
    step_s = math.inf
    for _ in range(3):  # the fastest of three: the least disturbed by other work
        tic = time.perf_counter()
        state, _ = jax.block_until_ready(compiled.train_step(train_fn, state, batch))
        step_s = min(step_s, time.perf_counter() - tic)
    eval_batch = {
        "x": np.zeros((train.eval_batch_size, *shape), np.float32),
        "y": np.zeros((train.eval_batch_size,), np.float32),
        "mask": np.ones((train.eval_batch_size,), bool),
    }
    params, stats = state.params, state.batch_stats
    jax.block_until_ready(compiled.eval_step(infer, params, stats, eval_batch))
    eval_s = math.inf
    for _ in range(3):
        tic = time.perf_counter()
        jax.block_until_ready(compiled.eval_step(infer, params, stats, eval_batch))
        eval_s = min(eval_s, time.perf_counter() - tic)
    _STEP_TIMES[key] = (step_s, eval_s)
    return _STEP_TIMES[key]


def _prerequisite_notes(config: DictConfig, jobs: list[list[str]], script: str) -> list[str]:
    """Which prerequisite compute runs exist, and which the sweep will create."""
    if script == "train_cifar":
        return []
    what = "compute_nads.py" if script == "train_nads" else "compute_ntk.py"
    missing, present = [], []
    for job in _distinct_by(jobs, ("seed", "model", "data", "paths")):
        cfg = _job_config(config, job)
        path = str(cfg.paths.nads if script == "train_nads" else cfg.paths.eigenfunctions)
        if path not in missing + present:
            (present if (Path(path) / artifacts.META_FILE).is_file() else missing).append(path)
    lines = [f"{len(present)} {what} prerequisite run(s) exist"]
    if missing:
        action = "created by the first run that needs each" if _creates(config) else "MISSING"
        lines.append(
            f"{len(missing)} {what} prerequisite run(s) missing, {action} (not in the estimate): "
            + ", ".join(missing)
        )
    if script == "train_ntk":
        lines.append(
            "network runs also measure the end-of-training alignment (not in the estimate)"
        )
    return lines


def _creates(config: DictConfig) -> bool:
    return str(OmegaConf.select(config, "prerequisites", default="require")) == "create"


def _devices() -> str:
    import jax

    devices = jax.devices()
    return f"{len(devices)} {devices[0].platform} device(s)"


def _duration(seconds: float) -> str:
    """``42 s``, ``3.5 min`` or ``2.1 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
