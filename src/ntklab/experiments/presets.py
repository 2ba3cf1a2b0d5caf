"""Experiment presets: the callback that prints a sweep's plan first and its results page last.

A preset (``config/experiment/<name>.yaml``, selected with ``experiment=<name>``) sets
``prerequisites: create`` and registers :class:`PresetCallback` under ``hydra.callbacks``:

    python train_ntk.py -m experiment=eigenfunctions           # prints runs + estimate, sweeps,
                                                                # then writes <sweep dir>/report.md
    python train_ntk.py -m experiment=eigenfunctions hydra.callbacks.preset.dry_run=true  # plan only

The plan is made by :mod:`ntklab.experiments.sweeps` (jobs, clipped grids) and
:mod:`ntklab.experiments.estimate` (time); missing compute runs are made by
:mod:`ntklab.experiments.prerequisites`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ntklab.experiments.estimate import estimate
from ntklab.experiments.prerequisites import (
    PREREQUISITES,
    compose,
    ensure_eigenfunctions,
    ensure_nads,
)
from ntklab.experiments.sweeps import clip_grids, preset_name, sweep_jobs

__all__ = [
    "PREREQUISITES",
    "PresetCallback",
    "clip_grids",
    "compose",
    "ensure_eigenfunctions",
    "ensure_nads",
    "preset_name",
    "sweep_jobs",
]


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
        jobs = sweep_jobs(config)  # the grids were clipped by ntklab.experiments.checks.Checks
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
