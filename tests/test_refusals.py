"""Refusals that must leave the disk as it was, and the eigensolve's precision.

A sweep with one bad job is refused before its first job runs; missing data files, partial
``distributed.*`` keys and out-of-range NAD data are refused before any folder exists; the
eigensolve's precision follows ``ntk.eigen_dtype``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, compose_config

from ntklab.errors import ConfigError
from ntklab.experiments import compute_ntk
from ntklab.experiments.kernel_job import FLOAT64_MAX_N, eigen_precision
from ntklab.experiments.validation import validate


def files_below(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def run(tmp_path, script: str, *words: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO_ROOT / script), *words, f"paths.artifacts={tmp_path}"]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_a_sweep_with_one_bad_job_runs_none_and_writes_nothing(tmp_path):
    result = run(
        tmp_path, "compute_ntk.py", "-m", "model=mlp", "model.widths=[8],[0]",
        "data.num_train=20", "data.num_test=8", "ntk.num_eigvecs=3",
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[-1].startswith("error: job 1 of 2 (model.widths=[0]) model: widths=[0]")
    assert files_below(tmp_path) == []  # not even the first (valid) job, nor a sweep folder


def test_missing_data_files_are_refused_before_anything_is_written(tmp_path):
    result = run(tmp_path, "compute_ntk.py", "data.dataset=mnist", f"data.root={tmp_path / 'no'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "train-images-idx3-ubyte" in result.stderr and str(tmp_path / "no") in result.stderr
    assert files_below(tmp_path) == []


def test_partial_distributed_keys_are_refused_before_anything_is_written(tmp_path):
    result = run(tmp_path, "compute_ntk.py", "distributed.num_processes=2")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: distributed.num_processes needs distributed.coordinator")
    assert files_below(tmp_path) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.num_test=0", "data.num_test=0 is invalid: must be null or an integer >= 1"),
        ("data.epsilon=0", "data.epsilon=0.0 is invalid: must be a finite number > 0"),
        ("data.epsilon=-1", "data.epsilon=-1.0 is invalid: must be a finite number > 0"),
    ],
)
def test_nad_data_ranges_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        validate(compose_config("train_nads", ["paths.run_dir=/nonexistent", override]))


def test_eigen_precision_is_float64_up_to_its_bound_then_float32():
    assert eigen_precision("auto", "auto", 6102) == ("float64", "evr")
    assert eigen_precision("auto", "auto", FLOAT64_MAX_N + 1) == ("float32", "auto")
    assert eigen_precision("auto", "chebyshev", 100) == ("float64", "chebyshev")
    assert eigen_precision("float32", "auto", 100) == ("float32", "auto")
    assert eigen_precision("float64", "auto", 10 * FLOAT64_MAX_N) == ("float64", "auto")


@pytest.mark.parametrize(("setting", "dtype"), [("auto", "float64"), ("float32", "float32")])
def test_meta_records_the_eigensolves_precision(tmp_path, setting, dtype):
    cfg = compose_config(
        "compute_ntk",
        ["model=mlp", "model.widths=[8]", "data.num_train=20", "data.num_test=8",
         "ntk.num_eigvecs=3", f"ntk.eigen_dtype={setting}", f"paths.artifacts={tmp_path}"],
    )  # fmt: skip
    run_dir = compute_ntk.run(cfg)
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["eigen"]["dtype"] == dtype and meta["config"]["ntk"]["eigen_dtype"] == setting
    assert meta["eigen"]["max_residual"] < (1e-12 if dtype == "float64" else 1e-4)
