"""How many BLAS/LAPACK threads NumPy and SciPy use in ntklab's hot paths, beside XLA's pool.

NumPy and SciPy each bring an OpenBLAS (or MKL) with its own thread pool, XLA:CPU brings a third.
OpenBLAS splits a product statically over its threads, and an idle worker spins for a while
before it sleeps: on a machine with other load (a browser, a neighbour's job, the second pytest
worker) a thread that is not scheduled stalls the whole product, and the spinning workers take
cores from XLA. Measured on the 2-core project machine (BENCHMARKS.md, "Threads under load"):
with two busy processes beside it, the LeNet CIFAR kernel took 22-35 s with the default two BLAS
threads against 9.7 s with one; on a quiet machine the two are equal.

The policy (``auto``) hands work to one pool at a time:

- ``beside_xla()``: BLAS work interleaved with XLA work (the engine's host contraction between
  Jacobian blocks, kernel-vector products): one BLAS thread, so no BLAS worker spins while XLA
  computes the next block.
- ``host_only(flops)``: work during which XLA is idle (eigensolvers, alignment quotients, kernel
  regression): as many BLAS threads as CPUs were idle over the last few tens of milliseconds
  (at least one, at most the CPUs this process may use). Small work (under ``SMALL_FLOPS``) runs
  on one thread without measuring.

A user who sets ``OPENBLAS_NUM_THREADS`` (or ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ...) keeps
that setting: ntklab then limits nothing (policy ``user``). ``NTKLAB_BLAS_THREADS=<n>`` fixes the
count for every phase instead.

    with threads.host_only(flops=2 * n * n * k):
        values, vectors = scipy.linalg.eigh(...)
    logger.info("BLAS threads: %s", threads.describe())
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "SMALL_FLOPS",
    "USER_VARIABLES",
    "available_cpus",
    "beside_xla",
    "describe",
    "host_only",
    "idle_cpus",
    "policy",
]

USER_VARIABLES = (
    "OPENBLAS_NUM_THREADS",
    "GOTO_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
)
"""Environment variables by which a user sets the BLAS thread count: ntklab then limits nothing."""
FIXED_VARIABLE = "NTKLAB_BLAS_THREADS"
"""``NTKLAB_BLAS_THREADS=<n>``: n BLAS threads in every phase (policy ``fixed``)."""
SMALL_FLOPS = 2e9
"""Host work below this many floating-point operations runs on one thread (a few ms at most)."""
IDLE_WINDOW_S = 0.03
"""How long the idle CPUs are measured before a host phase."""

_controller = None


def policy() -> str:
    """``user`` (a BLAS variable is set), ``fixed`` (``NTKLAB_BLAS_THREADS``) or ``auto``."""
    if any(os.environ.get(name) for name in USER_VARIABLES):
        return "user"
    if os.environ.get(FIXED_VARIABLE):
        return "fixed"
    return "auto"


def describe() -> str:
    """One line saying which policy runs, for the logs."""
    kind = policy()
    if kind == "user":
        settings = ", ".join(f"{n}={os.environ[n]}" for n in USER_VARIABLES if os.environ.get(n))
        return f"user ({settings}; ntklab limits nothing)"
    if kind == "fixed":
        return f"fixed ({FIXED_VARIABLE}={_fixed_count()} in every phase)"
    return (
        f"auto (1 thread beside XLA; host-only phases use the idle CPUs, "
        f"{available_cpus()} available)"
    )


def available_cpus() -> int:
    """CPUs this process may run on: its affinity set, capped by a cgroup CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        count = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(count, quota)) if quota else max(1, count)


def idle_cpus(window_s: float = IDLE_WINDOW_S) -> float:
    """How many of this process's CPUs other processes left idle over the next ``window_s`` s.

    Read from ``/proc/stat`` (Linux): the CPUs' idle time in the window, plus the time this very
    process used (its own BLAS workers still spinning after a product are not load). Elsewhere it
    falls back to CPUs minus the 1-minute load average.
    """
    cpus = _affinity()
    before, own_before = _cpu_times(cpus), _own_cpu_seconds()
    if before is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        return max(0.0, available_cpus() - load)
    tic = time.perf_counter()
    time.sleep(window_s)
    after, own_after = _cpu_times(cpus), _own_cpu_seconds()
    elapsed = time.perf_counter() - tic
    if after is None:
        return 0.0
    idle = total = 0
    for cpu, (idle_after, total_after) in after.items():
        idle_before, total_before = before.get(cpu, (idle_after, total_after))
        idle += idle_after - idle_before
        total += total_after - total_before
    if total <= 0:
        return float(available_cpus())
    own = max(0.0, own_after - own_before) / max(elapsed, 1e-9)
    return min(float(available_cpus()), len(after) * idle / total + own)


def _own_cpu_seconds() -> float:
    """User + system CPU seconds this process has used (all its threads)."""
    times = os.times()
    return times.user + times.system


@contextlib.contextmanager
def beside_xla() -> Iterator[int]:
    """BLAS work interleaved with XLA's: one thread under ``auto``. Yields the thread count."""
    kind = policy()
    if kind == "user":
        yield 0
        return
    count = _fixed_count() if kind == "fixed" else 1
    with _limit(count):
        yield count


@contextlib.contextmanager
def host_only(flops: float | None = None, *, what: str = "") -> Iterator[int]:
    """BLAS/LAPACK work while XLA is idle: the idle CPUs under ``auto``. Yields the thread count.

    Args:
      flops: the work's floating-point operations, if known; under ``SMALL_FLOPS`` one thread.
      what: a name for the log line (logged at INFO when more than one thread runs).
    """
    kind = policy()
    if kind == "user":
        yield 0
        return
    if kind == "fixed":
        count = _fixed_count()
    elif flops is not None and flops < SMALL_FLOPS:
        count = 1
    else:
        idle = idle_cpus()
        count = max(1, min(available_cpus(), int(idle + 0.5)))
        logger.log(
            logging.INFO if what else logging.DEBUG,
            "%s: %d BLAS thread(s) (%.1f of %d CPUs idle)",
            what or "host phase",
            count,
            idle,
            available_cpus(),
        )
    with _limit(count):
        yield count


@contextlib.contextmanager
def _limit(count: int) -> Iterator[None]:
    controller = _threadpools()
    if controller is None:
        yield
        return
    with controller.limit(limits=count, user_api="blas"):
        yield


def _threadpools():
    """threadpoolctl's controller of NumPy's and SciPy's BLAS libraries (made once)."""
    global _controller
    try:
        import threadpoolctl
    except ImportError:  # an optional dependency of scikit-learn, normally present
        return None
    if _controller is None:
        import numpy  # noqa: F401  (both BLAS libraries loaded, so the controller covers both)
        import scipy.linalg  # noqa: F401

        _controller = threadpoolctl.ThreadpoolController()
    return _controller


def _fixed_count() -> int:
    value = os.environ.get(FIXED_VARIABLE, "")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(
            f"{FIXED_VARIABLE}={value!r} is invalid: must be a positive integer (or unset for "
            "the automatic policy)"
        )
    return int(value)


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:
        return set(range(os.cpu_count() or 1))


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]] | None:
    """``{cpu: (idle jiffies, total jiffies)}`` from /proc/stat, or None where it is absent."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    times = {}
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        cpu = int(name[3:])
        if cpu in cpus:
            values = [int(v) for v in fields[:8]]
            times[cpu] = (values[3] + values[4], sum(values))  # idle + iowait, all but guest
    return times or None


def _cgroup_quota() -> int | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` quota, rounded up; None without a quota."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, -(-int(quota) // int(period)))
