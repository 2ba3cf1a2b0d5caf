"""The BLAS thread policy: who decides, how many threads each phase gets, and that it holds.

The thread counts are read back from the BLAS libraries themselves (threadpoolctl), so a scope
that does not limit anything fails.
"""

from __future__ import annotations

import pytest
import scipy.linalg  # noqa: F401  (SciPy's own OpenBLAS is loaded, as in a real run)
import threadpoolctl

from ntklab import threads


def blas_threads() -> set[int]:
    return {pool["num_threads"] for pool in threadpoolctl.threadpool_info()
            if pool["user_api"] == "blas"}  # fmt: skip


@pytest.fixture
def auto(monkeypatch):
    for name in (*threads.USER_VARIABLES, threads.FIXED_VARIABLE):
        monkeypatch.delenv(name, raising=False)


def test_auto_gives_one_thread_beside_xla_and_the_idle_cpus_to_host_work(auto, monkeypatch):
    assert threads.policy() == "auto" and threads.describe().startswith("auto")
    with threads.beside_xla() as count:
        assert count == 1 and blas_threads() == {1}
    cpus = threads.available_cpus()
    monkeypatch.setattr(threads, "idle_cpus", lambda *args: float(cpus))
    with threads.host_only(flops=1e12) as count:
        assert count == cpus and blas_threads() == {cpus}
    monkeypatch.setattr(threads, "idle_cpus", lambda *args: 0.2)  # a busy machine
    with threads.host_only(flops=1e12) as count:
        assert count == 1 and blas_threads() == {1}
    with threads.host_only(flops=1e6) as count:  # small work: no measurement, one thread
        assert count == 1


def test_a_users_setting_is_left_alone(monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    assert threads.policy() == "user" and "OPENBLAS_NUM_THREADS=2" in threads.describe()
    before = blas_threads()
    with threads.beside_xla() as count:
        assert count == 0 and blas_threads() == before
    with threads.host_only(flops=1e12) as count:
        assert count == 0 and blas_threads() == before


def test_a_fixed_count_applies_to_every_phase(auto, monkeypatch):
    monkeypatch.setenv(threads.FIXED_VARIABLE, "1")
    assert threads.policy() == "fixed"
    with threads.beside_xla() as a, threads.host_only(flops=1e12) as b:
        assert a == b == 1 and blas_threads() == {1}
    monkeypatch.setenv(threads.FIXED_VARIABLE, "zero")
    with pytest.raises(ValueError, match=r"NTKLAB_BLAS_THREADS='zero' is invalid"):
        with threads.beside_xla():
            pass


def test_idle_cpus_adds_back_the_processes_own_cpu_time(auto, monkeypatch):
    """Two CPUs fully busy in the window, one of them by this very process: one CPU counts as
    idle (its own BLAS workers spinning after a product are not another process's load)."""
    readings = iter([{0: (0, 0), 1: (0, 0)}, {0: (0, 100), 1: (0, 100)}])  # no idle jiffies
    own = iter([10.0, 10.0 + 0.05])  # 0.05 CPU seconds in a 0.05 s window: one CPU
    monkeypatch.setattr(threads, "_cpu_times", lambda cpus: next(readings))
    monkeypatch.setattr(threads, "_own_cpu_seconds", lambda: next(own))
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    clock = iter([0.0, 0.05])
    monkeypatch.setattr(threads.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: None)
    assert threads.idle_cpus(0.05) == pytest.approx(1.0)
