"""Run folders: claimed, locked, recording their files, finished by ``meta.json``.

    with open_run("artifacts/eigenfunctions/digits/lenet/seed_0", identity) as run:
        save_array(run.path / "eigvals.npy", eigvals)     # [k]; its sha256 is recorded
        run.finish({"script": "compute_ntk", ...})          # meta.json last, listing every file
    folder_state(path, identity)                            # what a run would find, read-only

A run folder is locked (``fcntl.flock`` on ``.lock``) while a run writes it; ``overwrite`` moves
the old run aside (``.replaced/``) and deletes it only once the new run is complete; temporaries
of killed writers are swept when the folder is next opened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax

from ntklab.artifacts._io import (
    _ACTIVE_RUNS,
    CONFIG_FILE,
    META_FILE,
    _json_default,
    file_digest,
    load_json,
    save_json,
)
from ntklab.errors import RunFolderInUse
from ntklab.locking import LockHeld, acquire_lock, lock_holder, release_lock

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
REPLACED_DIR = ".replaced"
"""Where ``overwrite`` keeps the previous run until the new one is complete."""
_TEMP_NAME = re.compile(r"^\..+\.(\d+)-[0-9a-f]{12}(\.[^.]*)?$")


class RunFolder:
    """A run folder claimed by :func:`open_run`: locked, and recording the files written into it.

    Attributes:
      path: the folder.
      files: relative path -> ``{"bytes", "sha256"}`` of every file this run wrote so far.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: dict[str, dict[str, Any]] = {}
        self.finished = False

    def _relative(self, path: Path) -> str | None:
        try:
            return Path(os.path.abspath(path)).relative_to(os.path.abspath(self.path)).as_posix()
        except ValueError:
            return None

    def _before_write(self, path: Path) -> None:
        """The first write replacing a file makes the folder incomplete: ``meta.json`` goes."""
        name = self._relative(path)
        if name is not None and name != META_FILE and not self.finished:
            (self.path / META_FILE).unlink(missing_ok=True)

    def _record(self, path: Path, digest: dict[str, Any] | None) -> None:
        name = self._relative(path)
        if name is not None and name not in (META_FILE, CONFIG_FILE) and digest is not None:
            self.files[name] = digest

    def add_file(self, name: str) -> None:
        """Records a file written without :func:`atomic_path` (e.g. a memory-mapped kernel)."""
        self.files[name] = file_digest(self.path / name)

    def discard(self, name: str) -> None:
        """Deletes a file of an earlier run that this run does not produce (e.g. a stale kernel)."""
        self.files.pop(name, None)
        (self.path / name).unlink(missing_ok=True)

    def finish(self, meta: Mapping[str, Any]) -> None:
        """Writes ``meta.json`` last: ``meta`` plus the working directory and the file list.

        Args:
          meta: JSON-serializable run metadata (config, versions, shapes, timings).
        """
        kept = {  # files deleted during the run (e.g. old checkpoints) are not artifacts
            name: digest for name, digest in self.files.items() if (self.path / name).exists()
        }
        content = {**meta, "working_dir": os.getcwd(), "artifacts": dict(sorted(kept.items()))}
        save_json(self.path / META_FILE, content)
        self.finished = True


@contextlib.contextmanager
def open_run(
    path: str | os.PathLike,
    identity: Mapping[str, Any],
    *,
    overwrite: bool = False,
    foreign_files: bool = False,
) -> Iterator[RunFolder]:
    """Claims, locks and records a run folder for a run whose results ``identity`` determines.

    The identity (the config keys that change the results) is stored in ``config.json``. A folder
    holding a run of a different identity is refused unless ``overwrite`` is set, so results of two
    configurations are never mixed; a folder of the same identity is reused (a resumable run
    continues). A refused run changes nothing on disk. With ``overwrite``, the old run is moved to
    ``.replaced/`` and deleted only once the new run calls :meth:`RunFolder.finish`; if the new run
    fails with an error, the old run is put back (an interrupted one keeps both, and a rerun of
    either command completes or restores its run). A failed run leaves no ``config.json`` stub.

    Args:
      path: the run folder.
      identity: JSON-serializable mapping of the result-determining config.
      overwrite: replace a run of a different identity.
      foreign_files: the folder may hold other files (Hydra's log and ``.hydra/``) without a run.

    Yields:
      The :class:`RunFolder`; call ``finish(meta)`` at the end of a successful run.

    Raises:
      FileExistsError: the folder holds a different run (or other files) and ``overwrite`` is
        false.
      RunFolderInUse: another process is writing the folder ("run folder ... in use by PID ...").
      RuntimeError: called on a process other than 0 of a multi-process JAX run (process 0
        alone writes run folders).
    """
    if jax.distributed.is_initialized() and jax.process_index() != 0:
        raise RuntimeError(
            f"process {jax.process_index()} of a multi-process JAX run tried to claim {path}; "
            "only process 0 writes run folders (ntklab.distributed.is_writer())"
        )
    path = Path(path)
    identity = json.loads(json.dumps(identity, default=_json_default))
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(path):
            yield from _claimed(path, identity, overwrite=overwrite, foreign_files=foreign_files)
    finally:
        if created and path.exists() and not any(path.iterdir()):
            path.rmdir()


def _claimed(
    path: Path, identity: Any, *, overwrite: bool, foreign_files: bool
) -> Iterator[RunFolder]:
    """The body of :func:`open_run`, with the lock held."""
    _sweep_temporaries(path)
    replaced = path / REPLACED_DIR
    config_path = path / CONFIG_FILE
    if _restorable(path, identity):  # back to the run an interrupted overwrite moved aside
        _restore(path)
    existing = _read_identity(path)
    _check_claim(path, identity, existing, overwrite=overwrite, foreign_files=foreign_files)
    moved_aside = False
    if existing is not None and existing != identity:
        moved_aside = _move_aside(path)
    elif existing == identity and overwrite and (path / META_FILE).is_file():
        moved_aside = _move_aside(path)  # computed again: kept until the new run is complete
    if existing != identity or moved_aside:
        save_json(config_path, identity)
    run = RunFolder(path)
    _ACTIVE_RUNS.append(run)
    try:
        yield run
    except Exception:
        if moved_aside:
            logger.warning("the new run failed; %s holds the previous run again", path)
            _restore(path)
        elif not _holds_results(path) and existing != identity:
            config_path.unlink(missing_ok=True)  # no stub that would refuse a corrected run
        raise
    finally:
        _ACTIVE_RUNS.remove(run)
    if not run.finished:
        raise RuntimeError(f"the run in {path} ended without RunFolder.finish(meta)")
    if replaced.exists():
        shutil.rmtree(replaced)


def _check_claim(
    path: Path, identity: Any, existing: Any, *, overwrite: bool, foreign_files: bool
) -> None:
    """Refuses a folder holding results of another identity (or of none) unless ``overwrite``.

    Raises:
      FileExistsError: naming the folder and the differing keys.
    """
    if existing is not None and existing != identity:
        if not overwrite and _holds_results(path):
            differences = ", ".join(differences_of(existing, identity)) or "unknown keys"
            state = "a run" if (path / META_FILE).exists() else "an unfinished run"
            raise FileExistsError(
                f"{path} holds {state} with a different configuration ({differences}); "
                "refusing to mix them. Pass overwrite=true to replace it, or choose another "
                "folder with paths.run_dir=..."
            )
    elif existing is None and not overwrite and not foreign_files and _holds_results(path):
        raise FileExistsError(
            f"{path} is not empty and holds no {CONFIG_FILE}; refusing to write a run into it. "
            "Pass overwrite=true or choose another folder with paths.run_dir=..."
        )


FOLDER_STATES = ("absent", "empty", "unfinished", "finished", "replaced")
"""What :func:`folder_state` finds: no folder; a folder without a run; this run unfinished
(resumable) or finished (also when an interrupted overwrite kept it in ``.replaced/``: see
:func:`restore_replaced`); a run of another identity that ``overwrite`` will replace."""


def folder_state(
    path: str | os.PathLike,
    identity: Mapping[str, Any],
    *,
    overwrite: bool = False,
    foreign_files: bool = False,
) -> str:
    """What :func:`open_run` would find in ``path``, checked without creating or changing a file.

    Returns:
      One of ``FOLDER_STATES``.

    Raises:
      FileExistsError: the folder holds another run (or other files) and ``overwrite`` is false.
      RunFolderInUse: another process is writing the folder.
    """
    path = Path(path)
    if not path.exists():
        return "absent"
    holder = lock_holder(path / LOCK_FILE)
    if holder is not None:
        raise RunFolderInUse(
            f"run folder {path} in use by PID {holder}; wait for it to finish, or choose "
            "another folder with paths.run_dir=..."
        )
    identity = json.loads(json.dumps(identity, default=_json_default))
    if _restorable(path, identity):  # restore_replaced puts it back
        return "finished"
    existing = _read_identity(path)
    _check_claim(path, identity, existing, overwrite=overwrite, foreign_files=foreign_files)
    if existing == identity:
        return "finished" if (path / META_FILE).is_file() else "unfinished"
    return "replaced" if existing is not None and _holds_results(path) else "empty"


def restore_replaced(path: str | os.PathLike, identity: Mapping[str, Any]) -> bool:
    """Puts back the finished run of ``identity`` that an interrupted overwrite kept in
    ``.replaced/``, deleting the unfinished run that was replacing it (with the folder locked).

    :func:`folder_state` calls such a folder ``"finished"``; a script that then leaves the
    finished run as it is calls this first, so that the folder holds it again.

    Returns:
      Whether a run was put back.

    Raises:
      RunFolderInUse: another process is writing the folder.
    """
    path = Path(path)
    identity = json.loads(json.dumps(identity, default=_json_default))
    if not _restorable(path, identity):
        return False
    with _locked(path):
        if not _restorable(path, identity):  # another process got there first
            return False
        logger.info(
            "%s: restoring the finished run of this configuration that an interrupted overwrite "
            "kept in %s; the unfinished run that was replacing it is deleted",
            path,
            REPLACED_DIR,
        )
        _restore(path)
    return True


def _restorable(path: Path, identity: Any) -> bool:
    """Whether ``.replaced/`` holds a finished run of ``identity`` and the folder none."""
    replaced = path / REPLACED_DIR
    return (
        not (path / META_FILE).exists()
        and (replaced / META_FILE).is_file()
        and _read_identity(replaced) == identity
    )


def _restore(path: Path) -> None:
    """Replaces the folder's run files by the run kept in ``.replaced/``."""
    replaced = path / REPLACED_DIR
    _clear(path)
    _move_contents(replaced, path)
    replaced.rmdir()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Holds ``path/.lock`` (``fcntl.flock``) for the block; its content is the holder's PID."""
    lock_path = path / LOCK_FILE
    try:
        fd = acquire_lock(lock_path)
    except LockHeld as held:
        raise RunFolderInUse(
            f"run folder {path} in use by PID {held.pid}; wait for it to finish, or choose "
            "another folder with paths.run_dir=..."
        ) from None
    try:
        yield
    finally:
        release_lock(lock_path, fd)


def _sweep_temporaries(path: Path) -> None:
    """Deletes temporaries left by killed writers (the lock guarantees none is writing)."""
    for candidate in path.rglob(".*"):
        if candidate.is_file() and _TEMP_NAME.match(candidate.name):
            logger.info("removing %s, left by an interrupted process", candidate)
            candidate.unlink(missing_ok=True)


def _read_identity(path: Path) -> Any:
    config_path = path / CONFIG_FILE
    return load_json(config_path) if config_path.exists() else None


def _run_files(path: Path) -> list[Path]:
    """A folder's entries that belong to runs: all but the lock, ``.replaced/`` and Hydra's own
    files (``.hydra/``, the job's ``*.log``) when the folder is Hydra's output folder."""
    return [
        child
        for child in path.iterdir()
        if child.name not in (LOCK_FILE, REPLACED_DIR, ".hydra") and not child.name.endswith(".log")
    ]


def _holds_results(path: Path) -> bool:
    """Whether the folder holds run files other than ``config.json``."""
    return any(child.name != CONFIG_FILE for child in _run_files(path))


def _remove(child: Path) -> None:
    if child.is_dir() and not child.is_symlink():
        shutil.rmtree(child)
    else:
        child.unlink()


def _clear(path: Path) -> None:
    for child in _run_files(path):
        _remove(child)


def _move_contents(source: Path, target: Path) -> None:
    for child in _run_files(source):
        os.replace(child, target / child.name)


def _move_aside(path: Path) -> bool:
    """Moves a finished run's files into ``.replaced/``; deletes an unfinished one's.

    Returns:
      Whether ``.replaced/`` now holds a run to restore if the new run fails.
    """
    replaced = path / REPLACED_DIR
    if not (path / META_FILE).exists():  # an unfinished run of another identity: nothing to keep
        _clear(path)
        return replaced.exists()
    if replaced.exists():
        shutil.rmtree(replaced)
    replaced.mkdir()
    _move_contents(path, replaced)
    return True


def differences_of(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys where two nested configs differ, as ``"key: old -> new"`` lines."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            found += differences_of(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]
