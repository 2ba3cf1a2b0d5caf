"""A real 2-process JAX cluster on localhost (gloo CPU collectives, 2 forced devices per process):
the multi-host kernel, the operator and ``compute_ntk.py`` (the README's commands) against one
process, a failure in process 0 stopping both, and resume after a kill (kernel and compute_ntk)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("multiprocess_worker.py")
SCRIPT = Path(__file__).resolve().parents[1] / "compute_ntk.py"
CLI_ENV = {
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    "JAX_PLATFORMS": "cpu",
    "JAX_DEFAULT_PRNG_IMPL": "rbg",  # as tests/conftest.py: the same θ0 as this pytest process
}
"""The environment of the README's commands, plus the test suite's PRNG."""
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(mode: str, out_dir: Path, *extra: str) -> list[subprocess.Popen]:
    """Starts the 2 worker processes; each one's output goes to ``out_dir/<mode>_<i>.log``."""
    port = free_port()
    commands = [
        [sys.executable, str(WORKER), str(i), "2", str(port), mode, str(out_dir), *extra]
        for i in range(2)
    ]
    return start(commands, out_dir, mode)


def start(
    commands: list[list[str]], out_dir: Path, name: str, *, env: dict | None = None
) -> list[subprocess.Popen]:
    """Starts one process per command, in ``out_dir``; output to ``out_dir/<name>_<i>.log``."""
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent), **(env or {})}
    if "XLA_FLAGS" in os.environ:  # the test session's compile flags (tests/conftest.py) too
        env["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {env['XLA_FLAGS']}"
    processes = []
    for i, command in enumerate(commands):
        log_path = out_dir / f"{name}_{i}.log"
        with open(log_path, "a") as log:
            processes.append(
                subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out_dir
                )
            )
        processes[-1].log_path = log_path
    return processes


def wait_all(processes: list[subprocess.Popen], *, expect: int = 0) -> list[str]:
    """Waits for every process; once one fails (or the timeout passes) the others are killed, so
    a process left waiting in a collective for a dead peer cannot hang the test. With ``expect``
    non-zero, every process must exit with that status by itself (none is killed early)."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            if not expect and any(p.poll() not in (None, 0) for p in processes):
                break
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process in processes:
        process.wait()
    outputs = [process.log_path.read_text(errors="replace") for process in processes]
    for i, (process, output) in enumerate(zip(processes, outputs, strict=True)):
        assert process.returncode == expect, (
            f"process {i} exited {process.returncode}:\n{output[-3000:]}"
        )
    return outputs


@pytest.fixture(scope="module")
def single_process():
    """The kernel [N, N] and an operator product [N, 3] computed in this (1-process) pytest."""
    sys.path.insert(0, str(WORKER.parent))
    import multiprocess_worker

    from ntklab.ntk import empirical_ntk

    apply_fn, params, x = multiprocess_worker.problem()
    kernel = np.asarray(empirical_ntk(apply_fn, params, x, batch_size=4))
    vectors = np.random.default_rng(1).standard_normal((len(x), 3))
    return kernel, vectors


def kill_then_rerun(mode: str, out_dir: Path) -> None:
    """Starts the ``mode`` workers with process 1 SIGKILLing itself after 2 kernel units, then
    kills process 0 (it would stop by itself after JAX's heartbeat timeout)."""
    processes = launch(mode, out_dir, "2")
    processes[1].wait(timeout=TIMEOUT_S)
    assert processes[1].returncode == -9, processes[1].log_path.read_text()[-3000:]
    processes[0].kill()
    processes[0].wait()


@pytest.fixture(scope="module")
def kernel_cluster(tmp_path_factory) -> tuple[Path, list[str]]:
    """The ``kernel`` workers killed mid-kernel (``out=``), then rerun to the end: the kernel in
    memory and on disk, and K·V, from the rerun; and the rerun's outputs."""
    out_dir = tmp_path_factory.mktemp("kernel_cluster")
    kill_then_rerun("kernel", out_dir)
    assert (out_dir / "kernel.npy").exists()
    return out_dir, wait_all(launch("kernel", out_dir))


def test_kernel_in_memory_and_on_disk_match_one_process(single_process, kernel_cluster):
    kernel, _ = single_process
    out_dir, _ = kernel_cluster
    scale = np.abs(kernel).max()
    # The worker's own brute-force jacrev kernel: same problem in the cluster as in pytest.
    np.testing.assert_allclose(
        np.load(out_dir / "kernel_local_jacrev.npy"), kernel, atol=1e-6 * scale
    )
    np.testing.assert_allclose(np.load(out_dir / "kernel_in_memory.npy"), kernel, atol=1e-6 * scale)
    np.testing.assert_allclose(np.load(out_dir / "kernel.npy"), kernel, atol=1e-6 * scale)


def test_operator_matches_one_process(single_process, kernel_cluster):
    kernel, vectors = single_process
    expected = kernel.astype(np.float64) @ vectors
    product = np.load(kernel_cluster[0] / "operator_product.npy")
    np.testing.assert_allclose(product, expected, atol=1e-5 * np.abs(expected).max())


def test_killed_process_resumes_to_the_identical_kernel(kernel_cluster):
    out_dir, outputs = kernel_cluster
    assert "resuming" in outputs[0] and "units already done" in outputs[0]
    resumed = np.load(out_dir / "kernel.npy")  # killed mid-kernel, then finished by the rerun
    np.testing.assert_array_equal(resumed, np.load(out_dir / "kernel_in_memory.npy"))


def compute_ntk_commands(artifacts: Path, *extra: str) -> list[list[str]]:
    """The README's two ``compute_ntk.py`` commands (one per process) on the tiny config."""
    sys.path.insert(0, str(WORKER.parent))
    import multiprocess_worker

    port = free_port()
    overrides = [*multiprocess_worker.compute_ntk_overrides(artifacts), *extra]
    return [
        [sys.executable, str(SCRIPT), *overrides,
         *multiprocess_worker.distributed_overrides(i, 2, port)]
        for i in range(2)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def compute_ntk_cluster(tmp_path_factory) -> tuple[Path, dict, list[str]]:
    """``compute_ntk.run`` in 2 processes killed mid-kernel, then finished by the README's two
    ``compute_ntk.py`` commands: (run folder, the killed run's resume record, their outputs)."""
    out_dir = tmp_path_factory.mktemp("compute_ntk_cluster")
    kill_then_rerun("compute_ntk", out_dir)
    records = list((out_dir / "artifacts").rglob("kernel.npy.progress.json"))
    assert len(records) == 1, records
    run_dir = records[0].parent
    assert not (run_dir / "meta.json").exists()
    record = json.loads(records[0].read_text())
    commands = compute_ntk_commands(out_dir / "artifacts")
    outputs = wait_all(start(commands, out_dir, "cli", env=CLI_ENV))
    return run_dir, record, outputs


def test_compute_ntk_end_to_end(compute_ntk_cluster, tmp_path):
    from conftest import compose_config

    from ntklab import artifacts
    from ntklab.experiments import compute_ntk

    run_dir, _, outputs = compute_ntk_cluster
    assert all("JAX process" in output and "4 global devices" in output for output in outputs)
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["num_processes"] == 2 and len(meta["devices"]) == 4
    assert meta["eigen"]["max_residual"] < 1e-4
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # lock released
    run = artifacts.load_run(run_dir)  # every file's checksum verified
    # The same command in this single process gives the same kernel and eigenpairs.
    sys.path.insert(0, str(WORKER.parent))
    import multiprocess_worker

    overrides = multiprocess_worker.compute_ntk_overrides(tmp_path / "single")
    reference = artifacts.load_run(compute_ntk.run(compose_config("compute_ntk", overrides)))
    kernel = np.asarray(reference.kernel())
    np.testing.assert_allclose(run.kernel(), kernel, atol=1e-6 * np.abs(kernel).max())
    np.testing.assert_allclose(run.eigvals, reference.eigvals, rtol=1e-5)
    overlaps = np.abs(np.sum(run.eigvecs * reference.eigvecs, axis=1))
    np.testing.assert_allclose(overlaps, 1.0, atol=1e-4)


def test_compute_ntk_killed_process_resumes(compute_ntk_cluster):
    """Process 1 died mid-kernel; the same commands in both processes continued from the record."""
    run_dir, record, outputs = compute_ntk_cluster
    assert 0 < record["units_done"] < record["units_total"]
    assert f"{record['units_done']} of {record['units_total']} units already done" in outputs[0]
    finished = json.loads((run_dir / "kernel.npy.progress.json").read_text())
    assert finished["complete"] and finished["identity"] == record["identity"]


def test_compute_ntk_failure_in_process_0_stops_both(tmp_path):
    """Process 0 refuses the run folder; process 1 stops too, with process 0's message."""
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("not a run\n")
    commands = compute_ntk_commands(tmp_path / "artifacts", f"paths.run_dir={run_dir}")
    outputs = wait_all(start(commands, tmp_path, "refused", env=CLI_ENV), expect=1)
    assert "error: " + str(run_dir) + " is not empty" in outputs[0]
    assert "error: process 0 of 2 failed: " + str(run_dir) + " is not empty" in outputs[1]
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]
