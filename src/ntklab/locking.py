"""Exclusive, non-blocking file locks that record their holder's PID (``fcntl.flock``).

fd = acquire_lock(Path("run/.lock"))      # raises LockHeld(pid) if another process holds it
lock_holder(Path("run/.lock"))            # its PID, or None; read-only
...
release_lock(Path("run/.lock"), fd)
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class LockHeld(Exception):
    """Another process holds the lock; ``pid`` is the PID it wrote (or ``"unknown"``)."""

    def __init__(self, pid: str) -> None:
        super().__init__(pid)
        self.pid = pid


def acquire_lock(lock_path: Path) -> int:
    """Locks ``lock_path`` (created if missing) and writes this process's PID into it.

    Returns:
      The open file descriptor holding the lock (pass it to :func:`release_lock`).

    Raises:
      LockHeld: another process holds the lock.
    """
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockHeld(pid) from None
        try:  # the holder before us may have unlinked the file between our open and our lock
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def release_lock(lock_path: Path, fd: int) -> None:
    """Removes ``lock_path`` and releases the lock held through ``fd``."""
    lock_path.unlink(missing_ok=True)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def lock_holder(lock_path: Path) -> str | None:
    """The PID holding ``lock_path``, or None when nobody does; creates and changes nothing.

    A lock file is removed when released, so one that exists was left by a holder that is still
    running or was killed; a killed holder's file is stale (its PID is gone, or the lock is free).
    """
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        if pid.isdigit() and not _alive(int(pid)):
            return None
        try:  # a live PID: confirm that it holds the lock (PIDs are reused)
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return pid
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
