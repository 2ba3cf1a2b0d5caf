"""Finding a sweep's runs and reading them back, verified against their ``meta.json``.

Dimensions: k eigenpairs, u unresolved eigenvectors.

    found = find_runs("artifacts/sweeps/train_ntk/2026-01-01_12-00-00")  # follows run.json
    found.finished, found.unfinished, found.broken      # run folders; (job folder, reason)
    sweep = read_sweep("artifacts/sweeps/train_ntk/2026-01-01_12-00-00")
    sweep.rows        # one flat dict per sound training run
    sweep.damaged     # (folder, reason) of every run left out
    sweep.eigenfunctions["/abs/artifacts/eigenfunctions/digits/lenet/seed_0"].unresolved  # [u]

A sweep folder holds Hydra's job folders, each with ``run.json`` pointing to its run folder
(``artifacts/<script>/...``); a folder that holds run folders directly (``artifacts/train_ntk``, an
old multirun folder) works too. A run is finished once ``meta.json`` exists. Before a file is read,
it is checked against the size and sha256 ``meta.json`` records; a run with a damaged file (or an
invalid ``meta.json`` or ``metrics.json``) is left out whole and named with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ntklab import artifacts
from ntklab.eigen import unresolved_pairs

logger = logging.getLogger("ntklab.report")

POINTER_FILE = artifacts.POINTER_FILE
"""In Hydra's job folder: ``{"run_dir": <absolute path>, "script": <name>}``."""

METRICS_FILE = "metrics.json"
RUN_MARKERS = (".hydra", "metrics.jsonl", METRICS_FILE, artifacts.CONFIG_FILE, "checkpoints")
"""Entries that make a folder a run folder; it is finished once ``meta.json`` exists."""

RUN_ARRAYS = {
    "alignment.npz": ("indices", "init_all", "final_all"),
    "alignment_history.npz": ("epochs", "indices", "all", "kernel_distance"),
    "alignment_layers.npz": ("layers", "indices", "init_all", "final_all"),
}
"""A training run's arrays the report reads (each verified first, when the run has it), and the
keys it keeps of each."""

KERNEL_REGRESSION_FILE = "kernel_regression.npz"
GAPS_FILE, RESIDUALS_FILE = "eigen_gaps.npy", "eigen_residuals.npy"

_READ_ERRORS = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile)


class Damaged(Exception):
    """A run left out: one of its files is damaged (the message says which and how)."""


@dataclasses.dataclass
class FoundRuns:
    """The run folders below a folder.

    Attributes:
      finished: run folders holding ``meta.json``, in sweep (job) order, each once.
      unfinished: run folders without ``meta.json``, and job folders without ``run.json`` (a
        job that failed or stopped before claiming its run folder, or is still starting).
      broken: ``(job folder, reason)`` of pointers that are invalid or lead to no folder.
      jobs: ``run folder -> job folder`` whose ``run.json`` led to it.
    """

    finished: list[Path] = dataclasses.field(default_factory=list)
    unfinished: list[Path] = dataclasses.field(default_factory=list)
    broken: list[tuple[Path, str]] = dataclasses.field(default_factory=list)
    jobs: dict[Path, Path] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EigenRun:
    """What the report uses of a ``compute_ntk`` run, read back verified.

    Attributes:
      path: the run folder.
      kernel_regression: ``{"label_idx": [k] int, "test_acc": [k], "ridge": []}`` from
        ``kernel_regression.npz``, None when the run has none (older runs).
      unresolved: indices [u] of the unresolved pairs (gap ≤ residual), None without the files.
      problem: why the run is left out (damaged, missing, unfinished), None when it is sound.
    """

    path: Path
    kernel_regression: dict[str, np.ndarray] | None = None
    unresolved: np.ndarray | None = None
    problem: str | None = None


@dataclasses.dataclass
class Sweep:
    """A folder's training runs, read back.

    Attributes:
      folder: the folder the report was asked for.
      rows: one flat dict per sound finished training run (see :func:`read_sweep`).
      unfinished: run (or job) folders skipped because they are not finished.
      damaged: ``(folder, reason)`` of every run left out because a file is damaged or missing.
      unverified: runs whose ``meta.json`` records no digests (older runs), read unchecked.
      eigenfunctions: ``compute_ntk`` run path (as the runs' ``meta.json`` names it) -> its
        :class:`EigenRun`.
    """

    folder: Path
    rows: list[dict[str, Any]]
    unfinished: list[Path]
    damaged: list[tuple[Path, str]]
    unverified: list[Path]
    eigenfunctions: dict[str, EigenRun]


def _natural(name: str) -> list:
    """Sort key putting job ``2`` before ``10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def find_runs(folder: str | Path) -> FoundRuns:
    """The run folders below ``folder``, following Hydra job folders' ``run.json`` pointers.

    A folder holding ``run.json`` is a job folder: its run folder is the one the pointer names
    (found again below an ancestor when the artifacts folder moved). A folder holding
    ``meta.json`` or one of ``RUN_MARKERS`` is a run folder (folders inside it belong to it), or
    an unfinished job when it only holds ``.hydra``. Hidden folders are skipped.

    Args:
      folder: a sweep folder, a folder holding run folders, or one run folder.

    Returns:
      The :class:`FoundRuns`, finished runs in job order, each run once.

    Raises:
      FileNotFoundError: ``folder`` is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a folder; expected a sweep folder (artifacts/sweeps/<script>/<stamp>) "
            "or a folder holding run folders (artifacts/train_ntk)"
        )
    found, seen = FoundRuns(), set()
    for root, dirs, files in os.walk(folder):
        path, entries = Path(root), {*dirs, *files}
        dirs[:] = sorted((d for d in dirs if not d.startswith(".")), key=_natural)
        if POINTER_FILE in files and artifacts.META_FILE not in files:
            dirs[:] = []
            target, reason = _follow(path)
            if target is None:
                found.broken.append((path, reason))
                continue
            found.jobs.setdefault(target.resolve(), path)
            path = target
        elif artifacts.META_FILE in files or entries & set(RUN_MARKERS):
            dirs[:] = []
        else:
            continue
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        finished = (path / artifacts.META_FILE).is_file()
        (found.finished if finished else found.unfinished).append(path)
    found.jobs = {
        run: found.jobs[run.resolve()] for run in found.finished if run.resolve() in found.jobs
    }
    return found


def _follow(job: Path) -> tuple[Path | None, str]:
    """The run folder a job folder's ``run.json`` names, or None and why not."""
    try:
        pointer = artifacts.load_json(job / POINTER_FILE)
    except ValueError as error:
        return None, str(error)
    run_dir = pointer.get("run_dir") if isinstance(pointer, dict) else None
    if not isinstance(run_dir, str) or not run_dir:
        return None, f"{job / POINTER_FILE} names no run_dir: {json.dumps(pointer)[:200]}"
    target = Path(run_dir)
    if target.is_dir():
        return target, ""
    moved = relocate(target, job)
    if moved is not None:
        logger.info("%s names %s, which is gone; using %s", job / POINTER_FILE, target, moved)
        return moved, ""
    return None, (
        f"{job / POINTER_FILE} points to {target}, which does not exist (deleted, or the "
        "artifacts folder moved)"
    )


def relocate(recorded: Path, near: Path, *, min_parts: int = 3) -> Path | None:
    """Where a recorded run folder lives now, when the artifacts folder was moved or copied.

    Tries the recorded path's trailing parts (longest first, at least ``min_parts``: e.g.
    ``train_ntk/digits/lenet/<run name>``) below ``near`` and each of its ancestors, nearest
    first, and accepts a folder holding ``meta.json`` or ``config.json``.

    Args:
      recorded: the absolute path a pointer or ``meta.json`` names.
      near: a folder of the same artifacts tree (the job folder, the training run).

    Returns:
      The folder, or None.
    """
    parts = recorded.parts[1:]
    for base in (near, *near.parents):
        for start in range(len(parts) - min_parts + 1):
            candidate = base.joinpath(*parts[start:])
            if (candidate / artifacts.META_FILE).is_file() or (
                candidate / artifacts.CONFIG_FILE
            ).is_file():
                return candidate
    return None


def _display(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder`` when inside it, else absolute."""
    try:
        return str(path.resolve().relative_to(folder.resolve())) or "."
    except ValueError:
        return str(path.resolve())


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _verified(path: Path, name: str, recorded: dict[str, Any] | None) -> Path:
    """``path / name`` after checking it against ``meta.json``'s record (when there is one).

    Raises:
      Damaged: the file is not recorded, missing, or its size or sha256 differs.
    """
    if recorded is not None:
        if name not in recorded:
            raise Damaged(f"{name} is not recorded in {artifacts.META_FILE}")
        try:
            artifacts.verify_file(path / name, recorded[name])
        except ValueError as error:
            raise Damaged(_one_line(error)) from error
    return path / name


def _read_meta(path: Path) -> dict[str, Any]:
    """A run's ``meta.json``.

    Raises:
      Damaged: it is not valid JSON or not an object.
    """
    try:
        meta = artifacts.load_json(path / artifacts.META_FILE)
    except (ValueError, OSError) as error:
        raise Damaged(_one_line(error)) from error
    if not isinstance(meta, dict):
        raise Damaged(f"{path / artifacts.META_FILE} is not a JSON object")
    return meta


def _read_run(path: Path, folder: Path, job: Path | None) -> tuple[dict[str, Any] | None, bool]:
    """One finished run folder as a flat row, every file it reads verified first.

    Returns:
      ``(row, verified)``: row None when the folder is not a training run (no ``metrics.json``
      recorded or present, e.g. a ``compute_ntk`` run); verified False when ``meta.json`` records
      no digests (an older run).

    Raises:
      Damaged: ``meta.json`` or ``metrics.json`` is invalid, or a file the report reads is not
        the one ``meta.json`` records (the message names the file and what differs).
    """
    meta = _read_meta(path)
    recorded = meta.get("artifacts")
    if recorded is not None and not isinstance(recorded, dict):
        raise Damaged(f"{path / artifacts.META_FILE}: 'artifacts' is not a mapping")
    if not (path / METRICS_FILE).exists() and METRICS_FILE not in (recorded or {}):
        return None, True
    try:
        metrics = artifacts.load_json(_verified(path, METRICS_FILE, recorded))
    except (ValueError, OSError) as error:
        raise Damaged(_one_line(error)) from error
    if not isinstance(metrics, dict):
        raise Damaged(f"{path / METRICS_FILE} is not a JSON object")
    arrays = {}
    for name, keys in RUN_ARRAYS.items():
        if not (path / name).exists() and name not in (recorded or {}):
            continue
        if recorded is not None and name not in recorded:
            logger.warning("%s: %s is not recorded in meta.json; not used", path, name)
            continue
        try:
            content = artifacts.load_arrays(_verified(path, name, recorded))
        except _READ_ERRORS as error:
            raise Damaged(f"{path / name} cannot be read: {_one_line(error)}") from error
        problem = _array_problem(name, content, keys)
        if problem is None:
            arrays[name.removesuffix(".npz")] = {key: content[key] for key in keys}
        else:  # a sound file of another format (an older run): the run stays, the file goes
            logger.warning("%s: %s %s; not used", path, name, problem)
    config = flatten(metrics.pop("config", {}) or {})
    row = {**config, **flatten(metrics)}
    row["run_dir"] = _display(path, folder)
    if job is not None:
        row["job"] = _display(job, folder)
    row["_config_keys"] = set(config)
    row["_path"] = path
    row["_arrays"] = arrays
    row["_eigenfunctions"] = meta.get("eigenfunctions")
    return row, recorded is not None


def _array_problem(name: str, arrays: dict[str, np.ndarray], keys: tuple[str, ...]) -> str | None:
    """Why the report cannot use an alignment file (missing keys, shapes that disagree), or None.

    Expected: ``indices`` [k]; ``alignment.npz``: ``init_all``, ``final_all`` [k];
    ``alignment_history.npz``: ``epochs`` [T], ``all`` [T, k], ``kernel_distance`` [T];
    ``alignment_layers.npz``: ``layers`` [L], ``init_all``, ``final_all`` [L, k].
    """
    missing = [key for key in keys if key not in arrays]
    if missing:
        return f"lacks {', '.join(missing)} (has {', '.join(sorted(arrays))})"
    k = np.shape(arrays["indices"])
    if name == "alignment.npz":
        expected = {"init_all": k, "final_all": k}
    elif name == "alignment_history.npz":
        t = np.shape(arrays["epochs"])
        expected = {"all": t + k, "kernel_distance": t}
    else:
        layers = np.shape(arrays["layers"])
        expected = {"init_all": layers + k, "final_all": layers + k}
    for key, shape in expected.items():
        if np.shape(arrays[key]) != shape:
            return f"has {key} of shape {list(np.shape(arrays[key]))}, expected {list(shape)}"
    return None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as dotted keys (``{"data": {"num_train": 30}}`` -> ``data.num_train``);
    lists become JSON strings."""
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    if isinstance(tree, list):
        return {prefix[:-1]: json.dumps(tree)}
    return {prefix[:-1]: tree}


def read_eigenfunctions(recorded: str, near: Path) -> EigenRun:
    """The kernel-regression accuracies and unresolved pairs of a ``compute_ntk`` run, verified.

    Args:
      recorded: the run's path as a training run's ``meta.json`` names it (``eigenfunctions``).
      near: the training run folder (to find the run again when the artifacts folder moved).

    Returns:
      The :class:`EigenRun`; ``problem`` says why it is left out when it is missing, unfinished
      or damaged (then nothing of it is used).
    """
    path = Path(recorded)
    if not path.is_dir():
        path = relocate(path, near) or path
    if not (path / artifacts.META_FILE).is_file():
        state = "does not exist" if not path.is_dir() else "is unfinished (no meta.json)"
        return EigenRun(path, problem=f"eigenfunction run {path} {state}")
    try:
        meta = _read_meta(path)
        recorded_files = meta.get("artifacts")
        regression = None
        if (path / KERNEL_REGRESSION_FILE).exists():
            regression = artifacts.load_arrays(
                _verified(path, KERNEL_REGRESSION_FILE, recorded_files)
            )
            regression = {key: regression[key] for key in ("label_idx", "test_acc", "ridge")}
        unresolved = None
        if (path / GAPS_FILE).exists() and (path / RESIDUALS_FILE).exists():
            gaps, residuals = (
                np.load(_verified(path, name, recorded_files), allow_pickle=False)
                for name in (GAPS_FILE, RESIDUALS_FILE)
            )
            unresolved = np.flatnonzero(unresolved_pairs(residuals, gaps))
    except (Damaged, *_READ_ERRORS) as error:
        return EigenRun(path, problem=f"eigenfunction run {path} is damaged: {_one_line(error)}")
    return EigenRun(path, kernel_regression=regression, unresolved=unresolved)


def read_sweep(folder: str | Path) -> Sweep:
    """Reads every finished training run below ``folder``, leaving out damaged ones.

    Unfinished runs are skipped and damaged runs left out, each with a warning naming it.

    Args:
      folder: a sweep folder (job folders with ``run.json``) or a folder holding run folders.

    Returns:
      The :class:`Sweep`. Each row holds the run's resolved config as dotted keys, its metrics,
      ``run_dir`` (relative to ``folder`` when inside it, else absolute), ``job`` (the job folder,
      for runs found through ``run.json``) and private keys: ``_config_keys`` (the keys from the
      config), ``_path`` (the run folder), ``_arrays`` (``alignment``, ``alignment_history``,
      ``alignment_layers`` -> their arrays, when the run has them) and ``_eigenfunctions`` (the
      ``compute_ntk`` run's path, or None).

    Raises:
      FileNotFoundError: ``folder`` is not a folder, or no sound finished run is below it (the
        message counts the unfinished and names the damaged runs).
    """
    folder = Path(folder)
    found = find_runs(folder)
    for path in found.unfinished:
        logger.warning("skipping unfinished run %s (no %s)", path, artifacts.META_FILE)
    rows, damaged, unverified = [], list(found.broken), []
    for job, reason in found.broken:
        logger.warning("leaving out job %s: %s", job, reason)
    for path in found.finished:
        try:
            row, verified = _read_run(path, folder, found.jobs.get(path))
        except Damaged as error:
            damaged.append((path, str(error).replace(f"{path}{os.sep}", "")))
            logger.warning("leaving out damaged run %s: %s", path, error)
            continue
        if row is not None:
            rows.append(row)
            if not verified:
                unverified.append(path)
    if not rows:
        raise FileNotFoundError(_nothing_found(folder, found.unfinished, damaged))
    eigen: dict[str, EigenRun] = {}
    for row in rows:
        recorded = row["_eigenfunctions"]
        if isinstance(recorded, str) and recorded not in eigen:
            eigen[recorded] = read_eigenfunctions(recorded, row["_path"])
            if eigen[recorded].problem:
                logger.warning("%s", eigen[recorded].problem)
    return Sweep(folder, rows, found.unfinished, damaged, unverified, eigen)


def _nothing_found(folder: Path, unfinished: list[Path], damaged: list[tuple[Path, str]]) -> str:
    message = f"no finished run below {folder}"
    if unfinished:
        message += f"; {len(unfinished)} unfinished run(s) skipped"
    if damaged:
        named = "; ".join(f"{path}: {reason}" for path, reason in damaged)
        message += f"; {len(damaged)} damaged run(s) left out ({named})"
    if not unfinished and not damaged:
        message += (
            f": expected run folders with {METRICS_FILE} and {artifacts.META_FILE} written by "
            "train_ntk.py, train_nads.py, train_cifar.py or pretrained_ntk_comparison.py, or a "
            f"sweep folder whose job folders hold {POINTER_FILE}"
        )
    return message


def collect(folder: str | Path) -> list[dict[str, Any]]:
    """The rows of every sound finished training run below ``folder`` (:func:`read_sweep`).

    Args:
      folder: a sweep folder or a folder holding run folders.

    Returns:
      One flat dict per run (see :func:`read_sweep`).

    Raises:
      FileNotFoundError: no sound finished run below ``folder``.
    """
    return read_sweep(folder).rows
