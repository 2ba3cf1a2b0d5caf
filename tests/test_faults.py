"""Fault injection on run folders (issue #9): each fault is reproduced on a tiny run and the outcome
asserted: the finished run is intact (byte-identical files), or the damage is named, or the error
is one line naming the key, the value and the choices.

Training checkpoints and resume are tested in test_faults_training.py; the engine's store (resume
record, disk space) in test_ntk_store.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO_ROOT, compose_config
from test_data import write_idx_files
from tiny_run import TINY, tiny_config

from ntklab import artifacts
from ntklab.artifacts import DamagedArtifactError, RunFolderInUse, load_run
from ntklab.errors import ConfigError
from ntklab.experiments import compute_ntk, kernel_job, train_ntk
from ntklab.experiments.cli import user_error_message


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), hidden ones included."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny compute_ntk run with its kernel saved: (artifacts dir, run dir)."""
    root = tmp_path_factory.mktemp("finished")
    run_dir = compute_ntk.run(tiny_config(root, "ntk.save_kernel=true"))
    return root, run_dir


@pytest.fixture
def copy(finished, tmp_path):
    """A copy of the finished run: (artifacts dir, run dir), same relative layout."""
    root, run_dir = finished
    target = tmp_path / run_dir.relative_to(root)
    shutil.copytree(run_dir, target)
    return tmp_path, target


# --- items 1, 2, 14: validate before disk; refused or failed runs change nothing -----------------


def test_invalid_option_with_overwrite_leaves_the_finished_run_intact(copy):
    root, run_dir = copy
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match=r"ntk\.solver='eigh' is invalid: must be one of: auto"):
        compute_ntk.run(
            tiny_config(root, "ntk.save_kernel=true", "ntk.solver=eigh", "overwrite=true")
        )
    assert snapshot(run_dir) == before


def test_a_rerun_failing_after_the_claim_keeps_meta_json(copy, monkeypatch):
    """A rerun differing only in a non-result key, refused by the engine, keeps the finished run."""
    root, run_dir = copy
    before = snapshot(run_dir)

    def refuse(*args, **kwargs):
        raise ValueError("the resume record belongs to another layout")

    monkeypatch.setattr(kernel_job, "empirical_ntk", refuse)  # the kernel, whichever path forms it
    monkeypatch.setattr(kernel_job, "kernel_blocks", refuse)
    with pytest.raises(ValueError, match="another layout"):
        compute_ntk.run(
            tiny_config(root, "ntk.save_kernel=true", "ntk.batch_size=8", "overwrite=true")
        )
    assert snapshot(run_dir) == before
    load_run(run_dir)  # still a finished run


def test_overwrite_keeps_the_old_run_until_the_new_one_is_complete(copy, monkeypatch):
    root, run_dir = copy
    before = snapshot(run_dir)
    calls = []

    def fail_after_moving_aside(*args, **kwargs):
        calls.append(sorted(p.name for p in run_dir.iterdir()))
        raise RuntimeError("out of memory")

    monkeypatch.setattr(kernel_job, "top_eigenpairs", fail_after_moving_aside)
    with pytest.raises(RuntimeError, match="out of memory"):
        compute_ntk.run(tiny_config(root, "model.activation=tanh", "overwrite=true"))
    assert ".replaced" in calls[0] and "meta.json" not in calls[0]  # the old run was moved aside
    assert snapshot(run_dir) == before  # and put back when the new run failed

    monkeypatch.undo()
    compute_ntk.run(tiny_config(root, "model.activation=tanh", "overwrite=true"))
    assert load_run(run_dir).config.model.activation == "tanh"
    assert not (run_dir / ".replaced").exists() and not (run_dir / "kernel.npy").exists()


def test_a_failed_run_leaves_no_stub_that_refuses_the_corrected_run(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"ntk\.solver=nystrom needs ntk\.nystrom_dims"):
        compute_ntk.run(tiny_config(tmp_path, "ntk.solver=nystrom"))
    assert not (tmp_path / "eigenfunctions").exists()

    def crash(*args, **kwargs):
        raise RuntimeError("crash inside the solver")

    monkeypatch.setattr(kernel_job, "nystrom_eigenpairs", crash)
    with pytest.raises(RuntimeError, match="crash inside"):
        compute_ntk.run(tiny_config(tmp_path, "ntk.solver=nystrom", "ntk.nystrom_dims=20"))
    assert not (
        tmp_path / "eigenfunctions" / "digits" / "mlp" / "seed_0"
    ).exists()  # no config.json stub
    monkeypatch.undo()
    run_dir = compute_ntk.run(tiny_config(tmp_path, "ntk.solver=nystrom", "ntk.nystrom_dims=30"))
    assert load_run(run_dir).config.ntk.nystrom_dims == 30


def test_a_refused_rerun_changes_nothing(copy):
    root, run_dir = copy
    before = snapshot(run_dir)
    with pytest.raises(
        FileExistsError, match=r"different configuration \(model\.activation: 'relu' -> 'tanh'\)"
    ):
        compute_ntk.run(tiny_config(root, "model.activation=tanh"))
    assert snapshot(run_dir) == before


# --- item 4: checksums of every artifact ---------------------------------------------------------


@pytest.mark.parametrize("name", ["eigvecs.npy", "init_params.msgpack", "samples.npz"])
def test_flipped_bytes_are_named(copy, name):
    _, run_dir = copy
    path = run_dir / name
    data = bytearray(path.read_bytes())
    data[len(data) - 3] ^= 0x01  # inside the payload: the file still parses
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedArtifactError, match=rf"{name} is damaged: its sha256 differs"):
        load_run(run_dir)


def test_train_ntk_refuses_a_damaged_eigenfunction_run(copy, tmp_path):
    root, run_dir = copy
    path = run_dir / "eigvecs.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x80
    path.write_bytes(bytes(data))
    cfg = compose_config(
        "train_ntk",
        [
            *TINY[:4],
            "train.epochs=1",
            "progress=false",
            f"paths.artifacts={root}",
            f"paths.run_dir={tmp_path / 'train'}",
        ],
    )
    with pytest.raises(DamagedArtifactError, match=r"eigvecs\.npy is damaged"):
        train_ntk.run(cfg)
    assert not (tmp_path / "train").exists()


def test_meta_json_lists_size_and_sha256_of_every_file(finished):
    _, run_dir = finished
    meta = json.loads((run_dir / "meta.json").read_text())
    listed = set(meta["artifacts"])
    on_disk = {p.name for p in run_dir.iterdir() if p.name not in ("meta.json", "config.json")}
    assert listed == on_disk
    for name, record in meta["artifacts"].items():
        data = (run_dir / name).read_bytes()
        assert record["bytes"] == len(data)
        assert record["sha256"] == hashlib.sha256(data).hexdigest()


def test_damaged_kernel_is_named_when_read(copy):
    _, run_dir = copy
    with open(run_dir / "kernel.npy", "r+b") as f:
        f.seek(-5, os.SEEK_END)
        f.write(b"\x7f")
    run = load_run(run_dir)
    with pytest.raises(DamagedArtifactError, match=r"kernel\.npy is damaged"):
        run.kernel()


def test_bad_json_names_the_file(copy):
    _, run_dir = copy
    (run_dir / "meta.json").write_text('{"config": ')
    with pytest.raises(ValueError, match=r"meta\.json is not valid JSON"):
        load_run(run_dir)


# --- item 5: no stale kernel ---------------------------------------------------------------------


def test_rerun_without_saving_the_kernel_leaves_no_stale_kernel(copy):
    root, run_dir = copy
    compute_ntk.run(tiny_config(root))  # finished: left as it is
    assert (run_dir / "kernel.npy").exists()
    compute_ntk.run(tiny_config(root, "overwrite=true"))  # computed again, kernel not saved
    assert not (run_dir / "kernel.npy").exists()
    with pytest.raises(FileNotFoundError, match=r"without ntk\.save_kernel=true"):
        load_run(run_dir).kernel()


def test_a_kernel_file_not_written_by_the_run_is_never_returned(copy):
    _, run_dir = copy
    meta = json.loads((run_dir / "meta.json").read_text())
    del meta["artifacts"]["kernel.npy"]  # as if kernel.npy were left by an earlier run
    (run_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match=r"without ntk\.save_kernel=true"):
        load_run(run_dir).kernel()


# --- item 8: locked run folders, unique temporaries ----------------------------------------------

HOLD_LOCK = """
import sys, time
from ntklab import artifacts
with artifacts.open_run(sys.argv[1], {"held": True}, foreign_files=True) as run:
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_process_gets_run_folder_in_use(tmp_path):
    run_dir = tmp_path / "eigenfunctions" / "digits" / "mlp" / "seed_0"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            RunFolderInUse, match=rf"run folder .*mlp/seed_0 in use by PID {holder.pid}"
        ):
            compute_ntk.run(tiny_config(tmp_path))
        assert json.loads((run_dir / "config.json").read_text()) == {"held": True}
    finally:
        holder.kill()
        holder.wait()
    compute_ntk.run(tiny_config(tmp_path, "overwrite=true"))  # the lock died with its holder


def test_temporaries_are_unique_per_process_and_swept_after_a_kill(copy):
    root, run_dir = copy
    stale = [
        run_dir / ".spectrum.999999-0123456789ab.png",
        run_dir / ".eigvals.4242-a1b2c3d4e5f6.npy",
    ]
    for path in stale:
        path.write_bytes(b"half a file")
    with artifacts.atomic_path(run_dir / "x.png") as temp:
        assert f".x.{os.getpid()}-" in temp.name and temp.suffix == ".png"
        (run_dir / "x.png").unlink(missing_ok=True)
    compute_ntk.run(tiny_config(root, "ntk.save_kernel=true", "overwrite=true"))
    assert not any(path.exists() for path in stale)
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]


def test_artifacts_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        run_dir = compute_ntk.run(tiny_config(tmp_path))
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run_dir.iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_full_disk_names_the_file_and_keeps_the_finished_run(copy, monkeypatch):
    root, run_dir = copy
    before = snapshot(run_dir)

    def disk_full(file, array, **kwargs):
        file.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    with pytest.raises(OSError, match=r"No space left on device") as error:
        compute_ntk.run(tiny_config(root, "ntk.save_kernel=true", "overwrite=true"))
    assert error.value.filename == str(run_dir / "eigvals.npy")
    assert user_error_message(error.value) == (
        f"No space left on device: {run_dir / 'eigvals.npy'}",
        1,
    )
    assert snapshot(run_dir) == before  # no temporary left, the finished run untouched


# --- item 13: non-finite kernel ------------------------------------------------------------------


def test_non_finite_kernel_is_a_clear_error(tmp_path, monkeypatch):
    real_ntk, real_blocks = kernel_job.empirical_ntk, kernel_job.kernel_blocks

    def poisoned(*args, **kwargs):
        kernel = np.array(real_ntk(*args, **kwargs))
        kernel[5, 7] = np.nan
        return kernel

    def poisoned_blocks(*args, **kwargs):
        for rows, cols, block, layers in real_blocks(*args, **kwargs):
            if rows.start <= 5 < rows.stop and cols.start <= 7 < cols.stop:
                block = np.array(block)
                block[5 - rows.start, 7 - cols.start] = np.nan
            yield rows, cols, block, layers

    monkeypatch.setattr(kernel_job, "empirical_ntk", poisoned)
    monkeypatch.setattr(kernel_job, "kernel_blocks", poisoned_blocks)
    with pytest.raises(ValueError, match=r"non-finite entries .*first at \[5, 7\]"):
        compute_ntk.run(tiny_config(tmp_path))
    assert not (tmp_path / "eigenfunctions" / "digits" / "mlp" / "seed_0").exists()


# --- item 15: relative data.root -----------------------------------------------------------------


def test_relative_data_root_resolves_against_the_runs_working_dir(tmp_path, monkeypatch):
    work = tmp_path / "work"
    write_idx_files(work / "data" / "mnist", np.arange(16) % 10, np.arange(8) % 10, gz=False)
    monkeypatch.chdir(work)
    cfg = compose_config(
        "compute_ntk",
        [
            "model=mlp",
            "model.widths=[4]",
            "data.dataset=mnist",
            "data.root=data",
            "ntk.num_eigvecs=3",
            f"paths.artifacts={tmp_path / 'artifacts'}",
        ],
    )
    run_dir = compute_ntk.run(cfg)
    monkeypatch.chdir(tmp_path)
    assert load_run(run_dir).x.shape == (24, 28, 28, 1)
    shutil.move(work / "data", tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=r"load_run\(\.\.\., data_root=<folder>\)"):
        load_run(run_dir)
    assert load_run(run_dir, data_root=tmp_path / "moved").num_train == 16


# --- items 9, 12, 13: the entry scripts: one clean line, exit status -----------------------------

INTERRUPT = """
import os, runpy, signal, sys, time
import ntklab.experiments.kernel_job as experiment

how = sys.argv[-1]

def interrupted(*args, **kwargs):
    if how == "SIGTERM":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    raise KeyboardInterrupt

experiment.empirical_ntk = experiment.kernel_blocks = interrupted
script, overrides = sys.argv[1], sys.argv[2:-1]
sys.argv = [script, *overrides]
runpy.run_path(script, run_name="__main__")
"""
"""Runs an entry script whose kernel computation is interrupted by Ctrl-C or SIGTERM."""


def test_entry_scripts_report_errors_and_interruptions_in_one_line(copy, tmp_path):
    """All cases run as parallel subprocesses; test_config.py checks every message in process."""
    root, _ = copy
    interrupted_dir = tmp_path / "interrupted"
    fresh = f"paths.artifacts={tmp_path / 'artifacts'}"

    hydra_dirs = (tmp_path / "hydra" / str(index) for index in range(100))

    def script(*arguments: str) -> list[str]:
        return [sys.executable, *arguments, f"hydra.run.dir={next(hydra_dirs)}"]

    def interrupt(how: str) -> list[str]:
        overrides = [*TINY, "ntk.out_of_core=true", f"paths.run_dir={interrupted_dir / how}"]
        return [*script("-c", textwrap.dedent(INTERRUPT), "compute_ntk.py", *overrides), how]

    cases = {  # name: (command, HYDRA_FULL_ERROR, exit status, pattern of the last line)
        "added key": (
            script("compute_ntk.py", "+ntk.num_eigvec=10", fresh),
            "",
            2,
            r"^error: unknown key ntk\.num_eigvec; valid keys of ntk: batch_size, num_eigvecs",
        ),
        "wrong type": (
            script("train_ntk.py", "linearize=maybe", fresh),
            "",
            2,
            r"^error: linearize=maybe: Value 'maybe' is not a valid bool",
        ),
        "lenient bool": (
            script("train_ntk.py", "with_bias=no", fresh),
            "",
            2,
            r"^error: with_bias='no' is invalid: must be true or false$",
        ),
        "refused folder": (
            script("compute_ntk.py", "model.activation=tanh", *TINY, f"paths.artifacts={root}"),
            "",
            1,
            r"^error: .*mlp/seed_0 holds a run with a different configuration \(model\.activation: 'relu' -> 'tanh'\)",
        ),
        "full traceback": (
            script("train_ntk.py", "train.epochs=0", fresh),
            "1",
            1,
            r"^ntklab\.errors\.ConfigError: train\.epochs=0 is invalid",
        ),
        "Ctrl-C": (
            interrupt("SIGINT"),
            "",
            130,
            rf"^interrupted: {interrupted_dir / 'SIGINT'} keeps .*; rerun the same command to",
        ),
        "SIGTERM": (
            interrupt("SIGTERM"),
            "",
            143,
            rf"^interrupted: {interrupted_dir / 'SIGTERM'} keeps .*; rerun the same command to",
        ),
    }
    processes = {
        name: subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HYDRA_FULL_ERROR": full_error},
        )
        for name, (command, full_error, _, _) in cases.items()
    }
    for name, (_, full_error, code, pattern) in cases.items():
        _, stderr = processes[name].communicate(timeout=300)
        lines = stderr.strip().splitlines()
        assert processes[name].returncode == code, (name, stderr[-2000:])
        assert re.search(pattern, lines[-1]), (name, pattern, lines[-1])
        if full_error:
            assert "Traceback" in stderr
        else:  # one line, or two with Hydra's "Error executing job with overrides: [...]"
            assert "Traceback" not in stderr and len(lines) <= 2, (name, stderr[-2000:])
    assert not (tmp_path / "artifacts").exists()  # no usage error touched the disk
