"""A command is checked before anything is written: the Hydra callback of every entry script.

``config/hydra/default.yaml`` registers :class:`Checks`. Hydra calls it after composing the config
and before it creates its own folders, so a refused command (a bad key or value, a missing
prerequisite, a run folder holding another configuration or in use by another process, missing
data) creates and changes no file anywhere:

- a single run (``on_run_start``): the script's ``check(cfg)``;
- a multirun (``on_multirun_start``): a preset's grids are clipped first (values the runs cannot
  have are dropped with a line saying so), then every job's ``check(cfg)``, before the first job
  starts; an error names the job's overrides.

Each script module (``ntklab.experiments.<script>``) has ``check(cfg)``, which raises the errors
its ``run(cfg)`` would raise before touching the disk, and ``run(cfg)`` calls it again itself (a
notebook or test that composes a config and calls ``run`` gets the same checks).

Once a run has claimed its folder, :func:`ntklab.experiments.pointers.point_to_run` writes
``run.json`` (the run folder's path) into Hydra's job folder, so ``python -m ntklab.report <sweep
folder>`` finds a sweep's run folders wherever they live.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ntklab.errors import ConfigError
from ntklab.experiments.validation import check_command_line

logger = logging.getLogger(__name__)

__all__ = [
    "SCRIPTS",
    "Checks",
    "Refused",
    "check_job",
    "script_module",
]

SCRIPTS = (
    "compute_ntk",
    "compute_nads",
    "train_ntk",
    "train_nads",
    "train_cifar",
    "pretrained_ntk_comparison",
)
"""The entry scripts; each is the Hydra job name of ``<script>.py`` and a module of this package."""


def script_module(script: str) -> Any:
    """The module ``ntklab.experiments.<script>`` (with ``check`` and ``run``).

    Raises:
      ValueError: ``script`` is not one of ``SCRIPTS``.
    """
    if script not in SCRIPTS:
        raise ValueError(f"unknown entry script {script!r}; valid choices: {', '.join(SCRIPTS)}")
    return importlib.import_module(f"ntklab.experiments.{script}")


def check_job(config: DictConfig, script: str | None = None) -> Any:
    """Runs ``script``'s ``check`` on a composed config (``script``: Hydra's job name).

    Returns:
      What ``check`` returns (the run folder's state, among others).
    """
    script = script or str(config.hydra.job.name)
    return script_module(script).check(config)


class Refused(BaseException):
    """A command refused by :class:`Checks`; ``error`` is what the check raised.

    Hydra 1.3 turns an ``Exception`` raised in a callback into a warning and goes on, so the
    refusal travels as a ``BaseException``; ``ntklab.experiments.cli`` prints ``error`` as one
    line (or re-raises it with ``HYDRA_FULL_ERROR=1``).
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class Checks(Callback):
    """Hydra callback: checks the command (every job of a multirun) before any folder exists."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Checks a single run's config and run folder."""
        script = str(config.hydra.job.name)
        if script not in SCRIPTS:  # another app using these configs: nothing to check
            return
        try:
            check_command_line(config, config.hydra.overrides.task)
            check_job(config, script)
        except Exception as error:
            raise Refused(error) from error

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Clips a preset's grids, then checks every job of the sweep."""
        script = str(config.hydra.job.name)
        if script not in SCRIPTS:
            return
        try:
            _check_sweep(config, script)
        except Exception as error:
            raise Refused(error) from error


def _check_sweep(config: DictConfig, script: str) -> None:
    """The multirun checks of :class:`Checks` (see the module docstring)."""
    from ntklab.experiments.sweeps import clip_grids, preset_name, sweep_jobs

    check_command_line(config, config.hydra.overrides.task)
    name = preset_name(config)
    if name is not None:
        _check_preset_script(config, name, script)
        for line in clip_grids(config, script):
            print(f"preset {name}: {line}", flush=True)
    loader = GlobalHydra.instance().config_loader()
    jobs = sweep_jobs(config)
    values: dict[str, set[str]] = {}
    for job in jobs:
        for override in job:
            values.setdefault(override.split("=", 1)[0], set()).add(override)
    for number, job in enumerate(jobs):
        job_config = loader.load_sweep_config(config, list(job))
        try:
            check_job(job_config, script)
        except Exception as error:
            swept = [o for o in job if len(values[o.split("=", 1)[0]]) > 1]
            _name_the_job(error, number, len(jobs), swept)
            raise


def _check_preset_script(config: DictConfig, name: str, script: str) -> None:
    """Refuses a preset given to another script than its own."""
    own = str(config.hydra.callbacks.preset.get("script"))
    if own != script:
        raise ConfigError(
            f"experiment={name} is a preset of {own}.py, not of {script}.py; run: "
            f"python {own}.py -m experiment={name}"
        )


def _name_the_job(error: Exception, number: int, count: int, job: list[str]) -> None:
    """Prefixes a job's error message with the job (``job 3 of 54 (label_idx=9 ...)``)."""
    where = f"job {number} of {count} ({' '.join(job)}) "
    if error.args and isinstance(error.args[0], str):
        error.args = (where + error.args[0], *error.args[1:])
