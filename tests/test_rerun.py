"""Rerunning the same training command lands in the same folder and resumes its checkpoints."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT

COMMON = ["model=mlp", "model.widths=[8]", "data.num_train=20", "data.num_test=10"]


def test_the_same_command_twice_resumes_in_the_same_folder(tmp_path):
    artifacts = f"paths.artifacts={tmp_path / 'artifacts'}"

    def run(script: str, *words: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(REPO_ROOT / script), *COMMON, artifacts, *words]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    made = run("compute_ntk.py", "ntk.num_eigvecs=3")
    assert made.returncode == 0, made.stderr[-2000:]
    train = ("label_idx=1", "train.epochs=2", "train.batch_size=10", "alignment.enabled=false")
    first = run("train_ntk.py", *train)
    assert first.returncode == 0, first.stderr[-2000:]
    folders = sorted((tmp_path / "outputs" / "train_ntk").iterdir())
    assert len(folders) == 1 and (folders[0] / "meta.json").is_file()
    params = (folders[0] / "params.msgpack").read_bytes()
    second = run("train_ntk.py", *train, "progress=false")  # progress does not name the folder
    assert second.returncode == 0, second.stderr[-2000:]
    assert sorted((tmp_path / "outputs" / "train_ntk").iterdir()) == folders
    log = (folders[0] / "train_ntk.log").read_text()
    assert "resumed from epoch 2 of 2" in log
    assert (folders[0] / "params.msgpack").read_bytes() == params
