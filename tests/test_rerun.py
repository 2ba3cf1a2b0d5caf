"""The same training command always lands in the same run folder; another configuration never.

A finished run is left as it is (rerunning a sweep skips finished runs); an interrupted one resumes
from its checkpoints (tests/test_faults_training.py kills and resumes it bit for bit).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT, compose_config

from ntklab.experiments import compute_ntk

COMMON = ["model=mlp", "model.widths=[8]", "data.num_train=20", "data.num_test=10"]


def test_the_same_command_twice_lands_in_the_same_folder_and_skips_the_finished_run(tmp_path):
    artifacts = f"paths.artifacts={tmp_path / 'artifacts'}"

    def run(script: str, *words: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(REPO_ROOT / script), *COMMON, artifacts, *words]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    def run_dir_of(result: subprocess.CompletedProcess) -> Path:
        logs = sorted((tmp_path / "artifacts" / "logs" / "train_ntk").glob("*/run.json"))
        return Path(json.loads(logs[-1].read_text())["run_dir"])

    compute_ntk.run(compose_config("compute_ntk", [*COMMON, artifacts, "ntk.num_eigvecs=3"]))
    train = ("label_idx=1", "train.epochs=2", "train.batch_size=10", "alignment.enabled=false")
    first = run("train_ntk.py", *train)
    assert first.returncode == 0, first.stderr[-2000:]
    runs = tmp_path / "artifacts" / "train_ntk" / "digits" / "mlp"
    folders = sorted(runs.iterdir())
    assert len(folders) == 1 and (folders[0] / "meta.json").is_file()
    assert folders[0].name.startswith("label_1-network-seed_0-")
    params = (folders[0] / "params.msgpack").read_bytes()
    second = run("train_ntk.py", *train, "progress=false")  # progress does not name the folder
    assert second.returncode == 0, second.stderr[-2000:]
    assert sorted(runs.iterdir()) == folders
    assert "already holds this finished run; nothing to do" in second.stdout + second.stderr
    assert (folders[0] / "params.msgpack").read_bytes() == params
    other = run("train_ntk.py", "label_idx=1", "train.epochs=1", "train.batch_size=10",
                "alignment.enabled=false")  # fmt: skip
    assert other.returncode == 0, other.stderr[-2000:]
    assert len(list(runs.iterdir())) == 2 and run_dir_of(other) not in folders
