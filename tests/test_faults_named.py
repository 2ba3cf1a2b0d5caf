"""Faults found by the 2026-12-06 fault-injection run, each injected and its outcome asserted.

Truncated artifacts, a short write on a full disk, inputs that must be refused, exit statuses,
messages that name what they know, checkpoints kept, and results that two configurations must not
share. The report's verification of tampered files is tested in test_report_damaged.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, compose_config

from ntklab.artifacts import DamagedArtifactError, load_run
from ntklab.experiments import compute_ntk
from ntklab.experiments.compute_ntk import check_finite_inputs
from ntklab.train_checkpoint import CheckpointStore

TINY = ["model=mlp", "model.widths=[8]", "data.num_train=24", "data.num_test=12"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A finished tiny compute_ntk run with its kernel saved: (artifacts root, run folder)."""
    root = tmp_path_factory.mktemp("made")
    run_dir = compute_ntk.run(
        compose_config(
            "compute_ntk",
            [*TINY, "ntk.num_eigvecs=4", "ntk.save_kernel=true", f"paths.artifacts={root}"],
        )
    )
    return root, run_dir


def snapshot(folder) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def copy_of(made, tmp_path):
    import shutil

    root, run_dir = made
    target = tmp_path / run_dir.relative_to(root)
    shutil.copytree(run_dir, target)
    return tmp_path, target


# --- 1: a truncated artifact is a one-line damaged-file error, exit 1 ----------------------------


@pytest.mark.parametrize("name", ["eigvecs.npy", "init_params.msgpack", "kernel.npy"])
def test_a_truncated_artifact_is_named_as_damaged(made, tmp_path, name):
    _, run_dir = copy_of(made, tmp_path)
    path = run_dir / name
    path.write_bytes(path.read_bytes()[:-100])
    pattern = rf"{re.escape(str(path))} is damaged: its size differs from the one recorded"
    with pytest.raises(DamagedArtifactError, match=pattern):
        load_run(run_dir).kernel() if name == "kernel.npy" else load_run(run_dir)


def test_a_truncated_artifact_stops_train_ntk_in_one_line(made, tmp_path):
    root, run_dir = copy_of(made, tmp_path)
    eigvecs = run_dir / "eigvecs.npy"
    eigvecs.write_bytes(eigvecs.read_bytes()[:-64])
    result = subprocess.run(
        [sys.executable, "train_ntk.py", *TINY, "train.epochs=1", f"paths.artifacts={root}",
         f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[-1].startswith(f"error: {eigvecs} is damaged: its size differs")


# --- 2: a disk that fills during np.save names the file and says so ------------------------------


def test_a_short_write_is_a_full_disk_naming_the_file(made, tmp_path, monkeypatch):
    root, run_dir = copy_of(made, tmp_path)
    before = snapshot(run_dir)

    def short_write(file, array, **kwargs):  # what ndarray.tofile raises: no errno
        file.write(b"\x93NUMPY partial")
        raise OSError(f"{array.nbytes} requested and 14 written")

    monkeypatch.setattr(np, "save", short_write)
    with pytest.raises(OSError, match=r"No space left on device \(a short write") as error:
        compute_ntk.run(
            compose_config(
                "compute_ntk",
                [*TINY, "ntk.num_eigvecs=4", "ntk.save_kernel=true", "overwrite=true",
                 f"paths.artifacts={root}"],
            )
        )  # fmt: skip
    assert error.value.filename.startswith(str(run_dir)) and error.value.errno == 28
    from ntklab.experiments.cli import user_error_message

    message, code = user_error_message(error.value)
    assert code == 1 and message.startswith("No space left on device") and str(run_dir) in message
    assert snapshot(run_dir) == before  # the finished run is back, untouched


# --- 4, 5: inputs refused in one line with exit 2, before anything is written -------------------

REFUSED = {
    "model.widths=[0]": (
        "compute_ntk.py",
        [*TINY, "model.widths=[0]"],
        r"^error: model: widths=\[0\] is invalid: every width must be an integer >= 1$",
    ),
    "order_seed=-1": (
        "train_ntk.py",
        [*TINY, "order_seed=-1"],
        r"^error: order_seed=-1 is invalid: must be null or an integer >= 0$",
    ),
    "train.momentum=2": (
        "train_ntk.py",
        [*TINY, "train.momentum=2"],
        r"^error: train\.momentum=2\.0 is invalid: must be a number in \[0, 1\)$",
    ),
    "ntk.output=full": (
        "compute_ntk.py",
        [*TINY, "ntk.output=full", "ntk.num_eigvecs=4"],
        r"^error: ntk\.output=full is invalid here: .* must be trace",
    ),
    "data.num_train=100000": (
        "compute_ntk.py",
        [*TINY, "data.num_train=100000"],
        r"^error: data\.num_train=100000 is invalid: must be an integer between 1 and the train",
    ),
    "nystrom without dims": (
        "compute_ntk.py",
        [*TINY, "ntk.solver=nystrom", "ntk.num_eigvecs=3"],
        r"^error: ntk\.solver=nystrom needs ntk\.nystrom_dims",
    ),
    "label_idx beyond": (
        "train_ntk.py",
        [*TINY, "label_idx=9"],
        r"^ +python compute_ntk\.py .* ntk\.num_eigvecs=10 .* overwrite=true$",
    ),
}


def test_bad_inputs_exit_2_in_one_line_and_write_nothing(made, tmp_path):
    root, _ = copy_of(made, tmp_path)
    before = snapshot(tmp_path)
    processes = {
        name: subprocess.Popen(
            [sys.executable, script, *words, f"paths.artifacts={root}"],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (script, words, _) in REFUSED.items()
    }
    for name, (_, _, pattern) in REFUSED.items():
        _, stderr = processes[name].communicate(timeout=300)
        lines = stderr.strip().splitlines()
        assert processes[name].returncode == 2, (name, stderr[-2000:])
        assert "Traceback" not in stderr and re.search(pattern, lines[-1]), (name, lines[-3:])
        if name != "label_idx beyond":  # that one gives the command on a second line
            assert len(lines) == 1, (name, lines)
    assert snapshot(tmp_path) == before  # no folder, no Hydra log, nothing


def test_with_bias_is_ignored_by_a_network_run_and_says_so(made, tmp_path, caplog):
    from ntklab.experiments import train_ntk

    root, _ = copy_of(made, tmp_path)

    def cfg(*extra):
        return compose_config(
            "train_ntk", [*TINY, "train.epochs=1", "alignment.enabled=false", "progress=false",
                          f"paths.artifacts={root}", *extra],
        )  # fmt: skip

    plain = cfg()
    ignored = cfg("with_bias=false")
    assert ignored.paths.run_dir == plain.paths.run_dir  # the same run: with_bias has no effect
    with caplog.at_level("WARNING"):
        run_dir = train_ntk.run(ignored)
    assert "with_bias=false is ignored: it only applies to linearized models" in caplog.text
    assert cfg("linearize=true", "with_bias=false").paths.run_dir != plain.paths.run_dir
    assert train_ntk.run(plain) == run_dir  # finished: the same folder, left as it is


# --- 6: messages that say what they know ---------------------------------------------------------


def test_a_non_finite_input_is_named_by_its_row():
    images = np.zeros((70, 4, 4, 1), np.float32)
    images[5, 1, 2, 0] = np.nan
    images[40, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"in 2 row\(s\), the first in row 5 \(1 value\(s\)\)"):
        check_finite_inputs(images, "the train images")


def test_after_an_interrupted_clean_up_two_checkpoints_remain(tmp_path):
    """A kill between a checkpoint's rename and the clean-up of older ones leaves three files;
    the next start keeps the newest two (as documented)."""
    store = CheckpointStore(tmp_path / "checkpoints", {"run": 1})
    state = {"w": np.zeros(3, np.float32)}
    for epoch in (1, 2):
        store.save(epoch, state, [{"epoch": epoch}], elapsed_s=0.0)
    newest = store.save(3, state, [{"epoch": 3}], elapsed_s=0.0)
    older = tmp_path / "checkpoints" / "epoch_000001.msgpack"  # as if the clean-up never ran
    older.write_bytes(newest.read_bytes())
    assert len(store.paths()) == 3
    restored = store.restore(state)
    assert restored.epoch == 3 and [epoch for epoch, _ in store.paths()] == [3, 2]


# --- 7: nothing two configurations share ---------------------------------------------------------


def test_runs_differing_only_in_lr_normalization_have_their_own_folders(tmp_path):
    folders = {
        value: compose_config(
            "pretrained_ntk_comparison",
            [f"train.lr_normalization={value}", f"paths.artifacts={tmp_path}"],
        ).paths.run_dir
        for value in ("none", "ntk")
    }
    assert folders["none"] != folders["ntk"]
    assert "lr_none" in folders["none"] and "lr_ntk" in folders["ntk"]


@pytest.mark.parametrize(
    ("script", "override"),
    [
        ("train_ntk", "train.max_lr=0.1"),
        ("train_nads", "data.sigma=2"),
        ("train_cifar", "train.epochs=7"),
        ("pretrained_ntk_comparison", "bn_statistics=trained"),
    ],
)
def test_every_result_determining_key_changes_the_run_folder(script, override, tmp_path):
    base = compose_config(script, [f"paths.artifacts={tmp_path}"]).paths.run_dir
    other = compose_config(script, [f"paths.artifacts={tmp_path}", override]).paths.run_dir
    same = compose_config(script, [f"paths.artifacts={tmp_path}", "progress=false"]).paths.run_dir
    assert other != base and same == base
    assert os.path.dirname(other) == os.path.dirname(base)  # sibling folders
