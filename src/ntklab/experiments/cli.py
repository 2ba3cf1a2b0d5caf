"""The entry scripts' ``main``: ``@hydra.main`` with the config schema, and user errors as one line.

    @cli.hydra_main("compute_ntk")
    def main(cfg: DictConfig) -> None:
        compute_ntk.run(cfg)

A user error (a bad key or value, missing files, a refused or busy run folder, a damaged file, a
non-finite kernel, a full disk, a distributed runtime that cannot start, a failed peer process)
is printed as one or two lines on stderr, without a traceback; the exit status is 2 for usage
errors (the config) and 1 otherwise. Ctrl-C (or SIGTERM) says
what the run folder keeps and whether rerunning the same command resumes (exit 130 / 143).
``HYDRA_FULL_ERROR=1`` shows the full traceback instead, as in Hydra.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from ntklab.errors import ConfigError, DistributedError, PeerFailed, RunFolderInUse
from ntklab.experiments.checks import Refused

__all__ = ["USAGE_ERROR", "Interrupted", "hydra_main", "user_error_message"]

USAGE_ERROR = 2
"""Exit status of a config error (as argparse uses)."""
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    RunFolderInUse,
    OSError,
    DistributedError,
    PeerFailed,
)
"""Errors whose message is for the user: printed without a traceback, exit status 1."""
Task = Callable[[DictConfig], Any]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run; ``str()`` says what the run folder keeps."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def hydra_main(config_name: str) -> Callable[[Task], Callable[[], None]]:
    """``@hydra.main(version_base="1.3", config_path="config", config_name=...)``, plus the checks.

    The command was checked before (:class:`ntklab.experiments.checks.Checks`, registered in
    ``config/hydra/default.yaml``); errors are reported as described in the module docstring.

    Args:
      config_name: the primary config, e.g. ``"compute_ntk"``.
    """

    def decorator(task: Task) -> Callable[[], None]:
        @functools.wraps(task)
        def checked(cfg: DictConfig) -> None:
            try:
                task(cfg)
            except KeyboardInterrupt as interrupt:
                code = getattr(interrupt, "exit_code", 130)
                raise Interrupted(_interruption_message(cfg), code) from interrupt

        entry = hydra.main(version_base="1.3", config_path="config", config_name=config_name)(
            checked
        )  # Hydra finds config_path next to the script: it unwraps `checked` to `task`

        @functools.wraps(task)
        def main() -> None:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                try:
                    entry()
                except Refused as refused:  # show the check's own error and traceback
                    raise refused.error from None
                return
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
            os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises; we print the message
            try:
                entry()
            except Refused as refused:  # by the checks, before Hydra created any folder
                message, code = user_error_message(refused.error)
                if message is None:
                    raise refused.error from None
                _exit(f"error: {message}", code)
            except Interrupted as interrupt:
                _exit(f"interrupted: {interrupt}", interrupt.exit_code)
            except KeyboardInterrupt:
                _exit("interrupted before the run started; nothing was written", 130)
            except Exception as error:
                message, code = user_error_message(error)
                if message is None:
                    raise
                _exit(f"error: {message}", code)
            finally:
                os.environ.pop("HYDRA_FULL_ERROR", None)
                signal.signal(signal.SIGTERM, previous)

        return main

    return decorator


def user_error_message(error: BaseException) -> tuple[str | None, int]:
    """The line(s) to print for a user error and the exit status; ``(None, 1)`` for a bug.

    Args:
      error: the exception the run (or Hydra's composition) raised.
    """
    if isinstance(error, ConfigError):
        return str(error), USAGE_ERROR
    if isinstance(error, HydraException):  # composition: unknown key, wrong type, bad override
        return _composition_message(error), USAGE_ERROR
    if isinstance(error, OmegaConfBaseException):
        return _omegaconf_message(error), USAGE_ERROR
    if isinstance(error, json.JSONDecodeError):
        return f"invalid JSON: {error}", 1
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError | FileExistsError):
        if error.filename is not None:
            return f"{error.strerror or error}: {error.filename}", 1
        return str(error), 1
    if isinstance(error, USER_ERRORS):
        return str(error), 1
    return None, 1


def _composition_message(error: HydraException) -> str:
    cause = error.__cause__
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and cause.full_key:
        schema = cause.object_type
        group = cause.full_key.rpartition(".")[0] or "the top level"
        if dataclasses.is_dataclass(schema):
            fields = ", ".join(f.name for f in dataclasses.fields(schema))
            return f"unknown key {cause.full_key}; valid keys of {group}: {fields}"
        parent = getattr(cause, "parent_node", None)
        if isinstance(parent, DictConfig) and "not in struct" in str(cause):  # e.g. model.*
            fields = ", ".join(str(key) for key in parent.keys())
            return f"unknown key {cause.full_key}; valid keys of {group}: {fields}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(cause, OmegaConfBaseException):  # "Error merging override key=value"
        return f"{lines[0].removeprefix('Error merging override ')}: {_omegaconf_message(cause)}"
    if "Config search path:" in lines:
        lines = lines[: lines.index("Config search path:")]
    head, *options = lines
    return f"{head}; {options[0]} {', '.join(options[1:])}" if options else head


def _omegaconf_message(error: OmegaConfBaseException) -> str:
    first = str(error).splitlines()[0].strip() if str(error) else type(error).__name__
    key = getattr(error, "full_key", None)
    return f"{first} (key {key})" if key else first


def _interruption_message(cfg: DictConfig) -> str:
    """What the interrupted run's folder keeps, and how to continue."""
    try:
        run_dir = Path(cfg.paths.run_dir)
    except Exception:  # no folder to describe (e.g. paths.run_dir cannot resolve)
        return "nothing was written"
    if not run_dir.is_dir():
        return "nothing was written"
    kept = sorted(
        child.name + ("/" if child.is_dir() else "")
        for child in run_dir.iterdir()
        if not child.name.startswith(".") and not child.name.endswith(".log")
    )
    resumable = [name for name in kept if name in ("kernel.npy", "checkpoints/")]
    if "kernel.npy" in kept:  # the engine's resume record says how far the kernel got
        try:
            record = json.loads((run_dir / "kernel.npy.progress.json").read_text())
            done = f"kernel.npy: {record['units_done']}/{record['units_total']} units"
            kept[kept.index("kernel.npy")] = done
        except (OSError, ValueError, KeyError, TypeError):
            pass
    rerun = "rerun the same command"
    if resumable:
        return f"{run_dir} keeps the finished part ({', '.join(kept)}); {rerun} to resume from it"
    return (
        f"{run_dir} keeps no finished part ({', '.join(kept) or 'empty'}); {rerun} to start again"
    )


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Interrupted("terminated (SIGTERM)", 128 + signum)


def _exit(message: str, code: int) -> None:
    sys.stderr.write(message.rstrip() + "\n")
    sys.stderr.flush()
    raise SystemExit(code)
