"""The guarantees of docs/reliability.md that no other test checked (issue 22), each fault injected
and its outcome asserted: refusals of every kind through the entry scripts (nothing on disk
changes: every path, mtime and byte), a multirun checking every job first, an interrupted
overwrite keeping both runs, an unfinished run replaced, inputs that changed under a run, the
engine naming a non-finite input, only process 0 writing, and a killed process noticed by the
others.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT, compose_config
from test_data import write_idx_files
from test_multiprocess import free_port
from tiny_run import TINY, tiny_config

from ntklab import artifacts
from ntklab.artifacts import REPLACED_DIR, load_run, open_run
from ntklab.experiments import compute_ntk, kernel_job
from ntklab.experiments.cli import Interrupted
from ntklab.experiments.kernel_job import check_finite
from ntklab.ntk import empirical_ntk, kernel_blocks


def disk_state(folder: Path) -> dict[str, tuple]:
    """Every path under ``folder`` (hidden ones and folders included) -> (mtime_ns, bytes): a
    file or folder created, deleted, renamed or rewritten, even with the same bytes, shows."""
    state = {}
    for path in sorted(folder.rglob("*")):
        stat = path.lstat()
        content = path.read_bytes() if path.is_file() and not path.is_symlink() else None
        state[str(path.relative_to(folder))] = (stat.st_mtime_ns, content)
    return state


def changed(before: dict, after: dict) -> list[str]:
    """The paths that differ between two :func:`disk_state` snapshots."""
    return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny compute_ntk run (relu): (artifacts dir, run dir)."""
    root = tmp_path_factory.mktemp("finished")
    return root, compute_ntk.run(tiny_config(root))


@pytest.fixture
def copy(finished, tmp_path):
    """A copy of the finished run (mtimes kept): (artifacts dir, run dir)."""
    root, run_dir = finished
    target = tmp_path / "artifacts" / run_dir.relative_to(root)
    shutil.copytree(run_dir, target)
    return tmp_path / "artifacts", target


# --- guarantees 1-4, 8: refusals of every kind through the entry scripts write nothing ---------

HOLD_LOCK = """
import sys, time
from ntklab import artifacts
with artifacts.open_run(sys.argv[1], {"held": True}, foreign_files=True):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.mark.slow  # eleven entry-script processes (~3 s of imports each): ~15-25 s on 2 cores
def test_refusals_of_every_kind_change_nothing_on_disk(copy, tmp_path):
    """Each refusal exits with its status and one `error:` line, before Hydra creates a folder:
    every path under the test's folder (the artifacts, Hydra's log folders, the working
    directory) keeps its mtime and bytes, folders included."""
    root, _ = copy
    work = tmp_path / "work"  # the commands' working directory, inside the snapshot
    work.mkdir()
    empty = tmp_path / "no_data"
    empty.mkdir()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("not a run\n")
    busy = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(busy)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        at = f"paths.artifacts={root}"
        train = [*TINY[:4], "train.epochs=1", at]
        cases = {  # name: (script and overrides, exit status, pattern of the error line)
            "config error": (["compute_ntk.py", *TINY, "ntk.num_eigvecs=0", at], 2,
                             r"^error: ntk\.num_eigvecs=0 .*must be"),
            "missing prerequisite run": (["train_ntk.py", *train, "seed=3"], 1,
                                         r"^error: no finished compute_ntk\.py run in .*seed_3"),
            "prerequisite of another configuration": (
                ["train_ntk.py", *train, "model.activation=tanh"], 1,
                r"^error: the compute_ntk\.py run in .* was made for another configuration"),
            "run folder of another configuration": (
                ["compute_ntk.py", *TINY, "model.activation=tanh", at], 1,
                r"^error: .*seed_0 holds a run with a different configuration"),
            "run folder in use": (
                ["compute_ntk.py", *TINY, at, f"paths.run_dir={busy}"], 1,
                rf"^error: run folder {re.escape(str(busy))} in use by PID {holder.pid}"),
            "invalid option with overwrite": (
                ["compute_ntk.py", *TINY, "ntk.solver=eigh", "overwrite=true", at], 2,
                r"^error: ntk\.solver='eigh' is invalid: must be one of"),
            "missing dataset files, compute_ntk": (
                ["compute_ntk.py", *TINY, "data=mnist", f"data.root={empty}", at], 1,
                rf"^error: .*{re.escape(str(empty))}"),
            "missing dataset files, train_cifar": (
                ["train_cifar.py", "model=mlp", f"data.root={empty}", at], 1,
                rf"^error: .*{re.escape(str(empty))}"),
            "distributed keys in part": (
                ["compute_ntk.py", *TINY, "distributed.num_processes=2", at], 2,
                r"^error: distributed\.num_processes needs distributed\.coordinator_address "
                r"and distributed\.process_id too"),
            "non-empty folder without config.json, training script": (
                ["train_ntk.py", *train, f"paths.run_dir={taken}"], 1,
                rf"^error: {re.escape(str(taken))} is not empty and holds no config\.json"),
            "multirun, second job refused": (
                ["train_ntk.py", "-m", "label_idx=0,9", *train], 2,
                r"^error: job 1 of 2 \(label_idx=9\) label_idx=9 is out of range"),
        }  # fmt: skip
        before = disk_state(tmp_path)
        processes = {
            name: subprocess.Popen(
                [sys.executable, str(REPO_ROOT / command[0]), *command[1:]],
                cwd=work,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "HYDRA_FULL_ERROR": ""},
            )
            for name, (command, _, _) in cases.items()
        }
        outcomes = {name: process.communicate(timeout=300) for name, process in processes.items()}
        after = disk_state(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    for name, (_, code, pattern) in cases.items():
        _, stderr = outcomes[name]
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert processes[name].returncode == code, (name, stderr[-2000:])
        assert "Traceback" not in stderr and len(errors) == 1, (name, stderr[-2000:])
        assert re.search(pattern, errors[0]), (name, pattern, errors[0])
    assert changed(before, after) == []  # no Hydra folder, no run folder, no file touched


# --- guarantee 4: distributed keys given in part are a config error, before anything ------------


def test_distributed_keys_given_in_part_are_refused_by_check(tmp_path):
    from ntklab.errors import ConfigError
    from ntklab.experiments.cli import user_error_message

    for keys, missing in (
        (["distributed.num_processes=2"], "distributed.coordinator_address and "),
        (["distributed.coordinator_address=127.0.0.1:1234", "distributed.process_id=0"], ""),
    ):
        with pytest.raises(ConfigError, match=rf"needs {missing}distributed\.") as error:
            compute_ntk.check(tiny_config(tmp_path, *keys))
        assert user_error_message(error.value)[1] == 2
    assert list(tmp_path.iterdir()) == []


# --- guarantee 8: a non-empty folder without config.json, training scripts ---------------------


@pytest.mark.parametrize(
    "script", ["train_ntk", "train_nads", "train_cifar", "pretrained_ntk_comparison"]
)
def test_a_foreign_folder_is_refused_by_the_training_scripts(script, tmp_path, monkeypatch):
    """The training scripts' folder check (``check_training``'s last step) refuses a non-empty
    folder without config.json, and leaves it as it was; the prerequisite checks are stubbed."""
    from ntklab.experiments import checks, training

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("not a run\n")
    before = disk_state(tmp_path)
    cfg = compose_config(script, ["model=mlp", f"paths.run_dir={taken}"])
    module = checks.script_module(script)
    monkeypatch.setattr(
        module, "check_training", lambda cfg, *checks_: training.check_training(cfg)
    )
    with pytest.raises(FileExistsError, match=rf"{re.escape(str(taken))} is not empty and holds"):
        module.check(cfg)
    assert changed(before, disk_state(tmp_path)) == []


# --- guarantee 12: an interrupted overwrite keeps both runs -------------------------------------


def interrupt_overwrite(run_dir: Path, root: Path, how: type[BaseException], monkeypatch) -> None:
    """Runs the `model.activation=tanh overwrite=true` command over the finished relu run and
    interrupts it while it computes its kernel, once it has written a file of its own (as an
    out-of-core kernel is)."""

    def interrupted(*args, **kwargs):
        (run_dir / "kernel.npy").write_bytes(b"\x93NUMPY partial kernel")
        if how is Interrupted:
            raise Interrupted("terminated (SIGTERM)", 143)  # what the SIGTERM handler raises
        raise how

    monkeypatch.setattr(kernel_job, "empirical_ntk", interrupted)
    monkeypatch.setattr(kernel_job, "kernel_blocks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compute_ntk.run(tiny_config(root, "model.activation=tanh", "overwrite=true"))
    monkeypatch.undo()


@pytest.mark.parametrize("how", ["Ctrl-C", "SIGTERM", "kill"])
def test_an_interrupted_overwrite_keeps_both_runs_and_the_old_command_restores_the_old_run(
    copy, monkeypatch, how
):
    root, run_dir = copy
    old = disk_state(run_dir)
    interrupt_overwrite(
        run_dir, root, {"SIGTERM": Interrupted}.get(how, KeyboardInterrupt), monkeypatch
    )
    if how == "kill":  # SIGKILL runs no handler: the lock file and a temporary stay behind
        (run_dir / ".lock").write_text("999999")
        (run_dir / ".eigvals.999999-0123456789ab.npy").write_bytes(b"half")
    # Both runs are kept: the old one byte for byte (and mtime) in .replaced/, the new one's
    # config.json and file in the folder.
    replaced = disk_state(run_dir / REPLACED_DIR)
    assert replaced == old
    assert json.loads((run_dir / "config.json").read_text())["model"]["activation"] == "tanh"
    assert (run_dir / "kernel.npy").read_bytes() == b"\x93NUMPY partial kernel"
    with pytest.raises(FileNotFoundError, match=r"the run it replaces is kept in .*\.replaced"):
        load_run(run_dir)
    # The old command (no overwrite) finds its finished run and puts it back, computing nothing.
    assert compute_ntk.check(tiny_config(root)).folder == "finished"
    monkeypatch.setattr(kernel_job, "empirical_ntk", pytest.fail)
    monkeypatch.setattr(kernel_job, "kernel_blocks", pytest.fail)
    assert compute_ntk.run(tiny_config(root)) == run_dir
    assert disk_state(run_dir) == old  # every file back, same bytes and mtimes, nothing else
    assert load_run(run_dir).config.model.activation == "relu"


def test_rerunning_an_interrupted_overwrite_completes_it_and_deletes_the_old_run(copy, monkeypatch):
    root, run_dir = copy
    interrupt_overwrite(run_dir, root, KeyboardInterrupt, monkeypatch)
    assert (run_dir / REPLACED_DIR / "meta.json").is_file()
    compute_ntk.run(tiny_config(root, "model.activation=tanh", "overwrite=true"))
    assert load_run(run_dir).config.model.activation == "tanh"
    assert not (run_dir / REPLACED_DIR).exists() and not (run_dir / "kernel.npy").exists()


@pytest.mark.parametrize("script", ["compute_nads", "train_nads"])
def test_the_other_scripts_restore_a_finished_run_an_overwrite_left_aside(script, tmp_path):
    """compute_nads.run, and the training scripts' finished_already, put the run back too."""
    from ntklab.experiments import compute_nads, training

    path = tmp_path / "run"
    cfg = compose_config(script, ["model=mlp", f"paths.run_dir={path}"])
    own = (compute_nads if script == "compute_nads" else training).run_identity(cfg)
    with open_run(path, own) as run:
        artifacts.save_array(run.path / "result.npy", np.arange(3))
        run.finish({"script": script})
    old = disk_state(path)
    with pytest.raises(KeyboardInterrupt), open_run(path, {"other": 1}, overwrite=True) as run:
        artifacts.save_array(run.path / "partial.npy", np.zeros(3))
        raise KeyboardInterrupt
    assert disk_state(path / REPLACED_DIR) == old
    if script == "compute_nads":
        assert compute_nads.run(cfg) == path
    else:
        assert training.check_training(cfg) == "finished"
        assert training.finished_already(cfg, "finished", script) == path
    assert disk_state(path) == old


# --- guarantee 13: an unfinished run of another identity is deleted by overwrite ----------------


def unfinished_run(path: Path) -> None:
    """An interrupted run of identity {"a": 1}: config.json and one file, no meta.json."""
    with pytest.raises(KeyboardInterrupt), open_run(path, {"a": 1}) as run:
        artifacts.save_array(run.path / "partial.npy", np.zeros(3))
        raise KeyboardInterrupt


def test_an_unfinished_run_of_another_identity_is_deleted_not_kept(tmp_path):
    path = tmp_path / "run"
    unfinished_run(path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "partial.npy"]
    assert artifacts.folder_state(path, {"a": 2}, overwrite=True) == "replaced"
    with open_run(path, {"a": 2}, overwrite=True) as run:
        kept = sorted(p.name for p in path.iterdir())
        assert kept == [".lock", "config.json"]  # the new run's, and nothing moved aside
        artifacts.save_array(run.path / "result.npy", np.ones(3))
        run.finish({"script": "test"})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "meta.json", "result.npy"]
    assert json.loads((path / "config.json").read_text()) == {"a": 2}


def test_an_unfinished_run_is_not_restored_when_its_replacement_fails(tmp_path):
    path = tmp_path / "run"
    unfinished_run(path)
    with (
        pytest.raises(RuntimeError, match="solver failed"),
        open_run(path, {"a": 2}, overwrite=True),
    ):
        raise RuntimeError("solver failed")
    assert list(path.iterdir()) == []  # neither the old unfinished run nor a config.json stub


# --- guarantee 40: load_run refuses inputs that differ from the recorded digest -----------------


def test_load_run_refuses_dataset_files_that_give_other_inputs(tmp_path):
    data = tmp_path / "data" / "mnist"
    labels = (np.arange(16) % 10, np.arange(8) % 10)
    write_idx_files(data, *labels, gz=False)
    cfg = compose_config(
        "compute_ntk",
        ["model=mlp", "model.widths=[4]", "data.dataset=mnist", f"data.root={data.parent}",
         "ntk.num_eigvecs=3", f"paths.artifacts={tmp_path / 'artifacts'}"],
    )  # fmt: skip
    run_dir = compute_ntk.run(cfg)
    assert load_run(run_dir).num_train == 16
    write_idx_files(data, *labels, gz=False, seed=1)  # the same labels, other pixels
    with pytest.raises(ValueError, match=r"no longer give the inputs this run used"):
        load_run(run_dir)


# --- guarantee 43: only process 0 writes run folders --------------------------------------------


def test_open_run_on_another_process_raises_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    path = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"process 1 of a multi-process .* only process 0"):
        with open_run(path, {"a": 1}):
            pytest.fail("claimed on process 1")
    assert not path.exists()


# --- guarantees 25, 26: non-finite values named exactly -----------------------------------------


def test_the_engine_names_the_input_whose_kernel_entries_are_non_finite():
    from ntklab.models import build_model, inference_apply_fn, init_variables

    model = build_model("mlp", widths=(8,), num_outputs=1)
    variables = init_variables(model, jax.random.PRNGKey(0), (4, 4, 1))
    apply_fn = inference_apply_fn(model, variables)
    x = np.random.default_rng(0).standard_normal((64, 4, 4, 1)).astype(np.float32)
    x[5, 1, 2, 0] = np.nan
    expected = (
        r"kernel block rows 0:64, cols 0:64 has non-finite values \(127 of 4096\), the first "
        r"at \[0, 5\]; every entry of example\(s\) 5 is non-finite: check their inputs"
    )
    with pytest.raises(ValueError, match=expected):
        empirical_ntk(apply_fn, variables["params"], x)
    with pytest.raises(ValueError, match=expected):
        next(iter(kernel_blocks(apply_fn, variables["params"], x)))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_the_engine_names_the_first_entry_of_a_later_block(tmp_path):
    from ntklab.models import build_model, inference_apply_fn, init_variables

    model = build_model("mlp", widths=(8,), num_outputs=1)
    variables = init_variables(model, jax.random.PRNGKey(0), (4, 4, 1))
    apply_fn = inference_apply_fn(model, variables)
    x = np.random.default_rng(0).standard_normal((12, 4, 4, 1)).astype(np.float32)
    x[10, 0, 0, 0] = np.inf
    expected = (
        r"kernel block rows 0:4, cols 8:12 has non-finite values \(4 of 16\), the first at "
        r"\[0, 10\]; every entry of example\(s\) 10 is non-finite"
    )
    for out in (None, tmp_path / "kernel.npy"):  # in memory, and the out-of-core store
        with pytest.raises(ValueError, match=expected):
            empirical_ntk(apply_fn, variables["params"], x, batch_size=4, out=out)


def test_a_non_finite_kernel_is_counted_and_its_first_entry_named():
    kernel = np.ones((64, 64), np.float32)
    kernel[5, :] = np.nan
    kernel[:, 5] = np.nan
    kernel[40, 41] = np.inf
    with pytest.raises(
        ValueError, match=r"has 128 non-finite entries in 64 row\(s\), the first at \[0, 5\] = nan"
    ):
        check_finite(kernel, rows_per_block=16)


# --- guarantee 42: a killed process is noticed by the others within distributed.timeout_s -------

KILLED = """
import os, signal, sys, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
from ntklab import distributed
process, port, victim, timeout_s = (int(a) for a in sys.argv[1:])
distributed.initialize({"coordinator_address": f"127.0.0.1:{port}", "num_processes": 2,
                        "process_id": process, "timeout_s": timeout_s})
with distributed.together() as run:
    run.step("started")
    if process == victim:
        print(f"killed at {time.time()}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    run.step("claim")  # waits for the victim, which never comes
print("not reached", flush=True)
"""


@pytest.mark.slow  # two 2-process clusters and a heartbeat timeout: ~10-15 s on 2 cores
def test_a_killed_process_is_noticed_by_the_other_within_the_timeout(tmp_path):
    """Process 1 killed: process 0 (the coordinator) misses its heartbeats and stops within
    timeout_s; process 0 killed: process 1 loses the coordinator and stops at once. Either way
    the survivor aborts with JAX's message instead of waiting."""
    timeout_s = 4
    clusters = {}
    for victim in (0, 1):
        port = free_port()
        clusters[victim] = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    textwrap.dedent(KILLED),
                    *map(str, (i, port, victim, timeout_s)),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(2)
        ]
    ended: dict[tuple[int, int], float] = {}
    deadline = time.monotonic() + 120
    while len(ended) < 4 and time.monotonic() < deadline:
        for victim, processes in clusters.items():
            for i, process in enumerate(processes):
                if (victim, i) not in ended and process.poll() is not None:
                    ended[victim, i] = time.time()
        time.sleep(0.05)
    for processes in clusters.values():
        for process in processes:
            if process.poll() is None:
                process.kill()
    for victim, processes in clusters.items():
        outputs = [process.communicate()[0] for process in processes]
        survivor = 1 - victim
        assert processes[victim].returncode == -signal.SIGKILL, outputs[victim][-2000:]
        killed_at = float(re.search(r"killed at ([\d.]+)", outputs[victim]).group(1))
        assert processes[survivor].returncode == -signal.SIGABRT, outputs[survivor][-3000:]
        assert "JAX distributed service detected fatal errors" in outputs[survivor]
        assert "not reached" not in outputs[survivor]
        assert ended[victim, survivor] - killed_at < timeout_s + 3, (victim, outputs[survivor])
