"""The store: the kernel in memory, or as a checked, resumable ``.npy`` memmap.

Dimensions: N1 rows, N2 columns, C outputs; a unit's region is rows r0:r1 × columns c0:c1.

    store = KernelStore(plan, units, storage_dtype=np.float32, out="kernel.npy")
    for position, unit, blocks in runner:   # skips store.done
        store.write(position, unit, blocks)
    kernel = store.finish()                  # np.memmap [N1, N2]; store.close() in a finally

With ``out`` the kernel lives in ``out`` (preallocated with ``posix_fallocate`` after a free-space
check, so a full disk fails up front with a message instead of SIGBUS) next to a resume record
``<out>.progress.json`` and a lock file ``<out>.lock`` (``fcntl.flock``; a second process
writing the same ``out`` gets an error naming the first one's PID). The record holds the identity
of the kernel (shape, dtype, output, precision, projection, digests of the inputs and parameters,
and a fingerprint of ``apply_fn``'s traced program; *not* the memory layout: block size, panels,
parameter chunks, devices or implementation) and, per finished unit, its region and a digest of
its stored bytes. On resume the file's header, dtype, shape and size are checked against the
record and the finished units' digests re-read (all of them up to ``VERIFY_ALL_BYTES`` of data,
else the last ``VERIFY_LAST_UNITS``); damaged or missing data are recomputed, never trusted, and a
record from other arguments is refused naming the file. Regions are layout-independent, so a
resume with another batch size, memory budget or device count continues where the run stopped.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from ntklab.locking import LockHeld, acquire_lock, release_lock
from ntklab.ntk._schedule import Plan, Unit

logger = logging.getLogger(__name__)

RECORD_VERSION = 2
VERIFY_ALL_BYTES = 1 << 30
"""On resume every finished unit's digest is re-read when they hold at most this many bytes."""
VERIFY_LAST_UNITS = 8
"""Otherwise the digests of this many most recent units are re-read."""
_SAVE_INTERVAL_S = 1.0  # the record is rewritten at most this often (and on every exit)


def array_digest(*arrays: Any) -> str:
    """sha256 over the dtype, shape and bytes of each array."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(np.asarray(array))
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def apply_fn_fingerprint(plan: Plan) -> str:
    """sha256 of ``apply_fn``'s jaxpr on one example and of its closed-over constants.

    Changes with the activation, the architecture or closed-over arrays (e.g. BatchNorm
    statistics); independent of the block size and devices.
    """
    p = plan.problem
    params = jax.tree.unflatten(p.treedef, [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
                                            for leaf in p.leaves])  # fmt: skip
    example = jax.ShapeDtypeStruct((1, *p.x1.shape[1:]), p.param_dtype)
    closed = jax.make_jaxpr(p.apply_fn)(params, example)
    digest = hashlib.sha256(str(closed.jaxpr).encode())
    digest.update(array_digest(*[np.asarray(c) for c in closed.consts if hasattr(c, "shape")])
                  .encode())  # fmt: skip
    return digest.hexdigest()


def free_bytes(directory: Path) -> int:
    """Bytes available to this user on the file system holding ``directory``."""
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


def _region_digest(kernel: np.ndarray, region: list[int], symmetric: bool) -> str:
    r0, r1, c0, c1 = region
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.ascontiguousarray(kernel[r0:r1, c0:c1]).data)
    if symmetric:
        digest.update(np.ascontiguousarray(kernel[c0:c1, r0:r1]).data)
    return digest.hexdigest()


def _read_header(path: Path) -> tuple[tuple, bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of a ``.npy`` file."""
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(file)
        return tuple(shape), fortran, dtype, file.tell()


class KernelInUseError(RuntimeError):
    """Another process is writing the same kernel file."""


class KernelStore:
    """Holds the kernel and records finished units (see the module docstring)."""

    def __init__(
        self,
        plan: Plan,
        units: list[Unit],
        *,
        storage_dtype: np.dtype,
        out: str | os.PathLike | None,
    ) -> None:
        self.plan, self.units = plan, units
        self.storage_dtype = np.dtype(storage_dtype)
        self.done: set[int] = set()
        self.shape = plan.problem.kernel_shape()
        self.symmetric = plan.problem.symmetric
        self.is_writer = jax.process_index() == 0
        self.record_path: Path | None = None
        self._lock_fd: int | None = None
        if out is None:
            self.kernel = np.empty(self.shape, dtype=self.storage_dtype)
            return
        self.path = Path(out)
        self.record_path = self.path.with_name(self.path.name + ".progress.json")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.kernel = None
        self.entries: list[dict] = []
        self._last_save = 0.0
        if self.is_writer:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._lock()
                self.identity = self._identity()
                self._open()
            except BaseException:
                self.close()
                raise
        if jax.process_count() > 1:  # every process must skip the same units
            mask = np.zeros(len(units), np.int8)
            mask[list(self.done)] = 1
            mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
            self.done = {int(i) for i in np.flatnonzero(mask)}

    # ---------------------------------------------------------------------------- opening

    def _identity(self) -> dict:
        p = self.plan.problem
        return {
            "shape": list(self.shape),
            "storage_dtype": self.storage_dtype.name,
            "output": p.output,
            "precision": p.precision,
            "projection_dim": p.projection_dim,
            "projection": p.projection,
            "projection_seed": p.projection_seed,
            "symmetric": p.symmetric,
            "inputs_sha256": array_digest(p.x1, *(() if p.symmetric else (p.x2,))),
            "params_sha256": array_digest(*[np.asarray(leaf) for leaf in p.leaves]),
            "apply_fn_sha256": apply_fn_fingerprint(self.plan),
        }

    def _lock(self) -> None:
        try:
            self._lock_fd = acquire_lock(self.lock_path)
        except LockHeld as held:
            raise KernelInUseError(
                f"{self.path} is being written by another process (PID {held.pid}, lock "
                f"{self.lock_path}); wait for it to finish or choose another out="
            ) from None

    def _open(self) -> None:
        record = self._read_record()
        if record is not None:
            self._check_identity(record)
            problem = self._file_problem(record)
            if problem is None:
                self.kernel = np.load(self.path, mmap_mode="r+", allow_pickle=False)
                self._verify(record["units"])
                logger.info("eNTK: resuming %s: %d of %d units already done", self.path,
                            len(self.done), len(self.units))  # fmt: skip
                return
            logger.warning("eNTK: %s is inconsistent with its resume record (%s); recomputing",
                           self.path, problem)  # fmt: skip
        self._create()
        self._save_record(force=True)

    def _read_record(self) -> dict | None:
        if not self.record_path.exists():
            return None
        try:
            record = json.loads(self.record_path.read_text())
            if record.get("version") != RECORD_VERSION:
                raise ValueError(f"record version {record.get('version')!r}")
            record["identity"], record["units"], record["file"]
            return record
        except (ValueError, KeyError, TypeError) as error:
            logger.warning("eNTK: unreadable resume record %s (%s); recomputing %s",
                           self.record_path, error, self.path)  # fmt: skip
            return None

    def _check_identity(self, record: dict) -> None:
        old = record["identity"]
        if old == self.identity:
            return
        changed = sorted(key for key in self.identity if old.get(key) != self.identity[key])
        raise ValueError(
            f"{self.path} has a resume record {self.record_path} from different arguments "
            f"(changed: {', '.join(changed)}); delete {self.path} and {self.record_path} to "
            "start over"
        )

    def _file_problem(self, record: dict) -> str | None:
        """Why the kernel file cannot hold the recorded data, or None."""
        if not self.path.exists():
            return "the file is missing"
        try:
            shape, fortran, dtype, offset = _read_header(self.path)
        except (ValueError, OSError) as error:
            return f"unreadable .npy header: {error}"
        expected = {"shape": tuple(self.shape), "fortran_order": False, "dtype": self.storage_dtype}
        found = {"shape": shape, "fortran_order": fortran, "dtype": dtype}
        for key, value in expected.items():
            if found[key] != value:
                return f"header {key} {found[key]} instead of {value}"
        size = offset + int(np.prod(self.shape)) * self.storage_dtype.itemsize
        actual = self.path.stat().st_size
        if actual != size or record["file"].get("size") != size:
            return f"file size {actual} bytes instead of {size}"
        return None

    def _verify(self, entries: list[dict]) -> None:
        """Re-reads finished units' digests; keeps those that match, marks new units done."""
        itemsize = self.storage_dtype.itemsize * int(np.prod(self.shape[2:]))
        total = sum((e["region"][1] - e["region"][0]) * (e["region"][3] - e["region"][2])
                    for e in entries) * itemsize  # fmt: skip
        check_from = 0 if total <= VERIFY_ALL_BYTES else max(0, len(entries) - VERIFY_LAST_UNITS)
        kept = []
        for index, entry in enumerate(entries):
            if index >= check_from:
                digest = _region_digest(self.kernel, entry["region"], self.symmetric)
                if digest != entry["digest"]:
                    logger.warning(
                        "eNTK: %s rows %d:%d, cols %d:%d do not match their recorded digest; "
                        "recomputing them", self.path, *entry["region"],
                    )  # fmt: skip
                    continue
            kept.append(entry)
        self.entries = kept
        covered = _Coverage([e["region"] for e in kept], self.symmetric)
        for position, unit in enumerate(self.units):
            if covered.contains(self.plan.region(unit)):
                self.done.add(position)

    def _create(self) -> None:
        """A new preallocated ``.npy`` file (temp name, then renamed into place)."""
        header = {"descr": np.lib.format.dtype_to_descr(self.storage_dtype),
                  "fortran_order": False, "shape": tuple(self.shape)}  # fmt: skip
        data_bytes = int(np.prod(self.shape)) * self.storage_dtype.itemsize
        directory = self.path.parent
        needed = data_bytes + 4096
        old = self.path.stat().st_size if self.path.exists() else 0
        available = free_bytes(directory) + old
        if needed > available:
            raise OSError(
                errno.ENOSPC,
                f"not enough disk space for the kernel {self.path}: {needed:,} bytes needed, "
                f"{available:,} available in {directory}",
            )
        temp = directory / f".{self.path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            with open(temp, "wb") as file:
                np.lib.format.write_array_header_1_0(file, header)
                offset = file.tell()
                file.flush()
                try:
                    os.posix_fallocate(file.fileno(), offset, max(data_bytes, 1))
                except OSError as error:
                    raise OSError(
                        error.errno,
                        f"cannot allocate the kernel {self.path}: {data_bytes:,} bytes needed, "
                        f"{free_bytes(directory):,} available in {directory} ({error.strerror})",
                    ) from error
                file.truncate(offset + data_bytes)
            os.replace(temp, self.path)
        finally:
            temp.unlink(missing_ok=True)
        self.kernel = np.load(self.path, mmap_mode="r+", allow_pickle=False)

    # ----------------------------------------------------------------------------- writing

    def _save_record(self, *, force: bool = False) -> None:
        if self.record_path is None or not self.is_writer or self.kernel is None:
            return
        now = time.monotonic()
        if not force and now - self._last_save < _SAVE_INTERVAL_S:
            return
        self.kernel.flush()  # the blocks reach the file before the record counts them
        complete = len(self.done) == len(self.units)
        record = {
            "version": RECORD_VERSION,
            "identity": self.identity,
            "file": {
                "size": self.path.stat().st_size,
                "dtype": self.storage_dtype.str,
                "shape": list(self.shape),
            },
            "implementation": self.plan.implementation,
            "units_done": len(self.done),
            "units_total": len(self.units),
            "complete": complete,
            "units": self.entries,
        }
        temp = self.record_path.with_name(
            f".{self.record_path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        )
        try:
            temp.write_text(json.dumps(record) + "\n")
            os.replace(temp, self.record_path)
        finally:
            temp.unlink(missing_ok=True)
        self._last_save = now

    def write(self, position: int, unit: Unit, blocks: dict[int, jax.Array]) -> int:
        """Stores a unit's blocks (and their mirror images); returns the entries written."""
        plan = self.plan
        cols = plan.col_slices[unit.column]
        entries = 0
        for i, block in blocks.items():
            rows = plan.row_slices[i]
            values = _to_host(block)[: rows.stop - rows.start, : cols.stop - cols.start]
            if not np.all(np.isfinite(values)):
                raise ValueError(non_finite_block_message(values, rows, cols))
            stored = values.astype(self.storage_dtype)
            if not np.all(np.isfinite(stored)):
                raise ValueError(
                    f"kernel block rows {rows.start}:{rows.stop}, cols {cols.start}:{cols.stop} "
                    f"overflows storage dtype {self.storage_dtype.name}; use a wider storage_dtype"
                )
            mirrored = self.symmetric and rows != cols
            entries += values.shape[0] * values.shape[1] * (2 if mirrored else 1)
            if self.kernel is None:
                continue
            self.kernel[rows, cols] = stored
            if mirrored:  # K[j, i] = K[i, j]ᵀ, with the logit axes swapped for "full"
                full = plan.problem.output == "full"
                axes = (1, 0, 3, 2) if full else (1, 0, *range(2, stored.ndim))
                self.kernel[cols, rows] = stored.transpose(axes)
        self.done.add(position)
        if self.record_path is not None and self.kernel is not None:
            region = list(plan.region(unit))
            self.entries = [e for e in self.entries if not _overlaps(e["region"], region,
                                                                     self.symmetric)]  # fmt: skip
            digest = _region_digest(self.kernel, region, self.symmetric)
            self.entries.append({"region": region, "digest": digest})
            self._save_record()
        return entries

    def finish(self) -> np.ndarray | None:
        """The finished kernel (the memmap with ``out``; None on non-writer processes)."""
        self._save_record(force=True)
        return self.kernel

    def close(self) -> None:
        """Saves the record of what is done and releases the lock (on every exit path)."""
        if self.record_path is not None and self.kernel is not None:
            self._save_record(force=True)
        if self._lock_fd is not None:
            release_lock(self.lock_path, self._lock_fd)
            self._lock_fd = None


def _overlaps(a: list[int], b: list[int], symmetric: bool) -> bool:
    def meets(x, y):
        return x[0] < y[1] and y[0] < x[1] and x[2] < y[3] and y[2] < x[3]

    return meets(a, b) or (symmetric and meets(a, [b[2], b[3], b[0], b[1]]))


class _Coverage:
    """Which kernel entries a set of regions (and, if symmetric, their mirrors) covers."""

    def __init__(self, regions: list[list[int]], symmetric: bool) -> None:
        self.regions = [tuple(r) for r in regions]
        if symmetric:
            self.regions += [(c0, c1, r0, r1) for r0, r1, c0, c1 in self.regions]

    def contains(self, region: tuple[int, int, int, int]) -> bool:
        r0, r1, c0, c1 = region
        inside = [r for r in self.regions if r[0] < r1 and r0 < r[1] and r[2] < c1 and c0 < r[3]]
        rows = sorted({r0, r1, *(max(r0, min(r1, v)) for r in inside for v in r[:2])})
        cols = sorted({c0, c1, *(max(c0, min(c1, v)) for r in inside for v in r[2:])})
        grid = np.zeros((len(rows) - 1, len(cols) - 1), bool)
        for a0, a1, b0, b1 in inside:
            i0, i1 = np.searchsorted(rows, [max(a0, r0), min(a1, r1)])
            j0, j1 = np.searchsorted(cols, [max(b0, c0), min(b1, c1)])
            grid[i0:i1, j0:j1] = True
        return bool(grid.all())


def _to_host(array: jax.Array | np.ndarray) -> np.ndarray:
    """A device array as a NumPy array on every process (gathered across hosts if needed)."""
    if isinstance(array, np.ndarray) or array.is_fully_addressable:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def non_finite_block_message(values: np.ndarray, rows: slice, cols: slice) -> str:
    """Names what is non-finite in a kernel block [..., r, c] of ``rows`` x ``cols``: how many
    values, the first entry (kernel indices), and the examples whose every entry is non-finite
    (what one non-finite input gives: its row and its column)."""
    bad = ~np.isfinite(values)
    mask = bad.reshape(-1, *bad.shape[-2:]).any(axis=0)  # [r, c]; any layer, with by_layer
    row, col = (int(i) for i in np.argwhere(mask)[0])
    message = (
        f"kernel block rows {rows.start}:{rows.stop}, cols {cols.start}:{cols.stop} has "
        f"non-finite values ({int(bad.sum())} of {values.size}), the first at "
        f"[{rows.start + row}, {cols.start + col}]"
    )
    whole = sorted(
        {rows.start + int(i) for i in np.flatnonzero(mask.all(axis=1))}
        | {cols.start + int(j) for j in np.flatnonzero(mask.all(axis=0))}
    )
    if whole and not mask.all():
        shown = ", ".join(str(i) for i in whole[:8]) + (", ..." if len(whole) > 8 else "")
        return f"{message}; every entry of example(s) {shown} is non-finite: check their inputs"
    return f"{message}; check the model parameters and inputs"
