"""train_nads end to end: the missing-run command, metrics files, and learning along the top NAD."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, compose_config

from ntklab.experiments import compute_nads, train_nads

CNN_NADS = ["model=lenet", "nads.shape=[8,8,1]", "nads.num_plot=2"]
TRAIN = [
    "model=lenet",
    "data.num_train=300",
    "data.num_test=300",
    "train.epochs=20",
    "train.batch_size=32",
    "progress=false",
]


@pytest.fixture(scope="module")
def lenet_nads(tmp_path_factory):
    """The NADs of a LeNet on [8, 8, 1] inputs (D = 64), under ``<tmp>/nads/lenet``."""
    artifacts_dir = tmp_path_factory.mktemp("train_nads")
    compute_nads.run(
        compose_config("compute_nads", [*CNN_NADS, f"paths.artifacts={artifacts_dir}"])
    )
    return artifacts_dir


def train_cfg(artifacts_dir, run_dir, *extra: str):
    return compose_config(
        "train_nads",
        [*TRAIN, f"paths.artifacts={artifacts_dir}", f"paths.run_dir={run_dir}", *extra],
    )


@pytest.mark.parametrize("linearize", [False, True])
def test_training_on_the_top_nad_of_a_small_cnn_beats_chance(lenet_nads, tmp_path, linearize):
    run_dir = train_nads.run(train_cfg(lenet_nads, tmp_path / "run", f"linearize={linearize}"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/acc"] > 0.85 and metrics["train/acc"] > 0.85  # chance is 0.5 ± 0.03
    assert metrics["label_idx"] == metrics["nad_idx"] == 0
    assert metrics["linearize"] is linearize
    assert metrics["mode"] == ("linear" if linearize else "network")
    assert metrics["param_distance_sq"] > 0
    assert abs(metrics["test/label_mean"] - 0.5) < 0.1
    history = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(history) == 21 and json.loads(history[0])["epoch"] == 0
    assert {"metrics.json", "metrics.jsonl", "params.msgpack", "meta.json"} <= {
        p.name for p in run_dir.iterdir()
    }
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["num_train"] == 300 and meta["input_shape"] == [8, 8, 1]


def test_the_bottom_nad_is_much_harder_than_the_top_one(lenet_nads, tmp_path):
    """The NAD phenomenon itself: the same short training fails along the last direction."""
    run_dir = train_nads.run(train_cfg(lenet_nads, tmp_path / "run", "label_idx=63"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["nad_idx"] == 63 and metrics["test/acc"] < 0.75


def test_missing_run_prints_the_command_that_makes_it(tmp_path):
    overrides = ["model=mlp", "model.widths=[8]", "data.num_train=64", "data.num_test=32"]
    cfg = compose_config(
        "train_nads",
        [
            *overrides,
            "train.epochs=1",
            "progress=false",
            f"paths.artifacts={tmp_path}",
            f"paths.run_dir={tmp_path / 'run'}",
        ],
    )
    with pytest.raises(FileNotFoundError, match="make it with:") as error:
        train_nads.run(cfg)
    command = str(error.value).splitlines()[-1].strip()
    assert command.startswith("python compute_nads.py seed=0 model=mlp model.num_outputs=1 ")
    assert "model.activation=gelu" in command and "'model.widths=[8]'" in command
    assert command.endswith(f" paths.run_dir={tmp_path}/nads/mlp/seed_0")
    words = shlex.split(command)
    assert words[:2] == ["python", "compute_nads.py"]
    # The printed command makes exactly the run the training needs (D = 1,024 for a tiny MLP).
    compute_nads.run(compose_config("compute_nads", [*words[2:], "nads.num_plot=2"]))
    run_dir = train_nads.run(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["config"]["label_idx"] == 0 and "test/acc" in metrics


def test_out_of_range_label_and_other_model_are_clear_errors(lenet_nads, tmp_path):
    with pytest.raises(ValueError, match=r"label_idx=64 is out of range: .* 64 NADs"):
        train_nads.run(train_cfg(lenet_nads, tmp_path / "a", "label_idx=64"))
    with pytest.raises(
        ValueError, match=r"another configuration \(model\.activation: run has 'gel"
    ):
        train_nads.run(train_cfg(lenet_nads, tmp_path / "b", "model.activation=tanh"))


def test_entry_script_runs_from_the_command_line(lenet_nads, tmp_path):
    command = [
        sys.executable,
        "train_nads.py",
        *TRAIN,
        "train.epochs=1",  # the script and Hydra's run folder are under test
        "label_idx=3",
        f"paths.artifacts={lenet_nads}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Hydra's folder holds its log and a pointer to the run folder, which holds no Hydra file.
    assert (tmp_path / "hydra" / "train_nads.log").exists()
    run_dir = Path(json.loads((tmp_path / "hydra" / "run.json").read_text())["run_dir"])
    assert run_dir.parent == lenet_nads / "train_nads" / "lenet"
    assert run_dir.name.startswith("nad_3-network-seed_0-")
    assert not (run_dir / ".hydra").exists() and not list(run_dir.glob("*.log"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["nad_idx"] == 3 and metrics["linearize"] is False and metrics["epoch"] == 1
