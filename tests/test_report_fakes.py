"""Fake run folders for the report's tests, in the real layout and formats, and checks of them.

    art = tmp_path / "artifacts"
    eigen = write_compute_run(art / "eigenfunctions/digits/lenet/seed_0", num_eigvecs=12)
    run = write_training_run(art / "train_ntk/digits/lenet/label_3-network-seed_0-3f2a9c1b",
                             config=ntk_config(3, 0, False), metrics={"test/acc": 0.9},
                             eigenfunctions=eigen, job=art / "sweeps/train_ntk/stamp/0")

Every file is written through ``ntklab.artifacts`` and ``meta.json`` (last) records the size and
sha256 of each, as ``RunFolder.finish`` does; a job folder holds ``.hydra/`` and ``run.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ntklab import artifacts


def finish(folder: Path, meta: dict) -> None:
    """Writes ``meta.json`` listing every file of ``folder`` but itself and ``config.json``."""
    recorded = {
        path.relative_to(folder).as_posix(): artifacts.file_digest(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name not in ("meta.json", "config.json")
    }
    artifacts.save_json(folder / "meta.json", {**meta, "artifacts": recorded})


def write_job(job: Path, run_dir: Path, script: str) -> None:
    """A Hydra job folder pointing to ``run_dir``."""
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (job / f"{script}.log").write_text("")
    artifacts.save_json(job / "run.json", {"run_dir": str(run_dir.resolve()), "script": script})


def ntk_config(label_idx: int, seed: int, linearize: bool, **extra) -> dict:
    """A train_ntk config as metrics.json stores it."""
    return {
        "seed": seed,
        "label_idx": label_idx,
        "linearize": linearize,
        "model": {"name": "lenet", "widths": [4]},
        "data": {"dataset": "digits", "num_train": 30},
        "train": {"max_lr": 0.05, "lr_normalization": "none"},
        "paths": {"artifacts": "/somewhere"},
        **extra,
    }


def write_training_run(
    folder: Path,
    *,
    config: dict,
    metrics: dict,
    script: str = "train_ntk",
    arrays: dict[str, dict[str, np.ndarray]] | None = None,
    eigenfunctions: Path | None = None,
    job: Path | None = None,
    finished: bool = True,
) -> Path:
    """A training run folder: config.json, metrics.jsonl, metrics.json, arrays, meta.json last.

    Args:
      folder: the run folder (created).
      config: the resolved config.
      metrics: final metrics (``mode``, ``label_idx``, ``test/acc``, ...).
      script: the entry script.
      arrays: ``file name -> arrays`` (``alignment.npz`` ...), written with save_arrays.
      eigenfunctions: the compute_ntk run, recorded in meta.json.
      job: a Hydra job folder to point here with run.json.
      finished: write meta.json.

    Returns:
      ``folder``.
    """
    folder.mkdir(parents=True)
    artifacts.save_json(folder / "config.json", {"seed": config.get("seed")})
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 0}) + "\n")
    artifacts.save_json(folder / "metrics.json", {"script": script, **metrics, "config": config})
    for name, content in (arrays or {}).items():
        artifacts.save_arrays(folder / name, **content)
    if finished:
        meta = {"script": script, "config": config}
        if eigenfunctions is not None:
            meta["eigenfunctions"] = str(eigenfunctions.resolve())
        finish(folder, meta)
    if job is not None:
        write_job(job, folder, script)
    return folder


def write_compute_run(
    folder: Path,
    *,
    num_eigvecs: int = 12,
    test_acc: np.ndarray | None = None,
    unresolved: tuple[int, ...] = (),
) -> Path:
    """A compute_ntk run folder: eigvals, eigvecs, residuals, gaps, kernel_regression.npz.

    Args:
      folder: the run folder (created).
      num_eigvecs: k.
      test_acc: kernel regression's test accuracy per index [k]; None: no kernel_regression.npz
        (an older run).
      unresolved: indices whose gap is set below their residual.

    Returns:
      ``folder``.
    """
    folder.mkdir(parents=True)
    artifacts.save_json(folder / "config.json", {"seed": 0})
    artifacts.save_array(folder / "eigvals.npy", np.linspace(2.0, 1.0, num_eigvecs))
    artifacts.save_array(folder / "eigvecs.npy", np.eye(num_eigvecs, 20))
    residuals = np.full(num_eigvecs, 1e-6)
    gaps = np.full(num_eigvecs, 1e-2)
    gaps[list(unresolved)] = 1e-7
    artifacts.save_array(folder / "eigen_residuals.npy", residuals)
    artifacts.save_array(folder / "eigen_gaps.npy", gaps)
    if test_acc is not None:
        artifacts.save_arrays(
            folder / "kernel_regression.npz",
            label_idx=np.arange(num_eigvecs),
            test_acc=np.asarray(test_acc, np.float64),
            ridge=np.float64(1e-8),
        )
    finish(folder, {"script": "compute_ntk"})
    return folder


def test_fake_runs_verify_like_real_ones(tmp_path):
    eigen = write_compute_run(tmp_path / "eigen", test_acc=np.full(12, 0.7), unresolved=(2,))
    run = write_training_run(
        tmp_path / "run",
        config=ntk_config(2, 0, False),
        metrics={"test/acc": 0.9},
        arrays={"alignment.npz": {"indices": np.arange(3)}},
        eigenfunctions=eigen,
        job=tmp_path / "job",
    )
    for folder in (eigen, run):
        meta = artifacts.load_json(folder / "meta.json")
        artifacts.verify_artifacts(folder, meta)  # raises when a digest is wrong
        assert "config.json" not in meta["artifacts"]
    meta = artifacts.load_json(run / "meta.json")
    assert {"metrics.json", "metrics.jsonl", "alignment.npz"} <= set(meta["artifacts"])
    assert meta["eigenfunctions"] == str(eigen.resolve())
    pointer = artifacts.load_json(tmp_path / "job" / "run.json")
    assert pointer == {"run_dir": str(run.resolve()), "script": "train_ntk"}
