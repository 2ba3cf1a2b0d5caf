"""`seed` varies the initialization: one eigenfunction run per seed, θ0 recorded by digest."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import compose_config

from ntklab.experiments import compute_ntk, train_ntk
from ntklab.experiments.training import majority_rate, order_seed

COMMON = ["model=mlp", "model.widths=[8]", "data.num_train=20", "data.num_test=10"]
TRAIN = ["train.epochs=1", "train.batch_size=10", "progress=false", "alignment.enabled=false"]


def test_two_seeds_give_two_eigenfunction_runs_and_two_initializations(tmp_path):
    digests = {}
    for seed in (0, 1):
        compute_ntk.run(
            compose_config(
                "compute_ntk",
                [*COMMON, f"seed={seed}", "ntk.num_eigvecs=3", f"paths.artifacts={tmp_path}"],
            )
        )
        run_dir = train_ntk.run(
            compose_config(
                "train_ntk",
                [
                    *COMMON,
                    *TRAIN,
                    f"seed={seed}",
                    "label_idx=1",
                    f"paths.artifacts={tmp_path}",
                    f"paths.run_dir={tmp_path / f'train{seed}'}",
                ],
            )
        )
        metrics = json.loads((run_dir / "metrics.json").read_text())
        meta = json.loads((run_dir / "meta.json").read_text())
        init_file = tmp_path / "eigenfunctions/digits/mlp" / f"seed_{seed}" / "init_params.msgpack"
        # the digest is of θ0's serialized bytes: the compute_ntk run's init_params.msgpack
        assert metrics["init_params_sha256"] == hashlib.sha256(init_file.read_bytes()).hexdigest()
        assert meta["init_params_sha256"] == metrics["init_params_sha256"]
        assert meta["eigenfunctions_seed"] == seed
        digests[seed] = metrics["init_params_sha256"]
        assert 0.5 <= metrics["test/majority_rate"] <= 1.0
    assert digests[0] != digests[1]


def test_a_missing_seed_run_prints_the_command_with_that_seed(tmp_path):
    cfg = compose_config(
        "train_ntk",
        [*COMMON, *TRAIN, "seed=7", f"paths.artifacts={tmp_path}", f"paths.run_dir={tmp_path / 'r'}"],
    )  # fmt: skip
    with pytest.raises(FileNotFoundError, match="make it with:") as error:
        train_ntk.run(cfg)
    command = str(error.value).splitlines()[1]  # the line after "make it with:"
    assert "compute_ntk.py seed=7 " in command and command.endswith("/seed_7")
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_order_seed_defaults_to_seed_and_majority_rate_matches_numpy():
    cfg = compose_config("train_ntk", ["seed=3"])
    assert cfg.order_seed is None and order_seed(cfg) == 3
    assert order_seed(compose_config("train_ntk", ["seed=3", "order_seed=5"])) == 5
    labels = np.random.default_rng(0).integers(0, 2, 101).astype(np.float32)
    expected = max(np.mean(labels == 0), np.mean(labels == 1))
    assert majority_rate(labels) == pytest.approx(expected)
    assert majority_rate(np.array([])) is None


def test_an_unresolved_eigenvector_is_warned_about(tmp_path, caplog):
    from ntklab.experiments.train_ntk import warn_if_unresolved

    np.save(tmp_path / "eigen_gaps.npy", np.array([0.5, 1e-9, 0.2]))
    np.save(tmp_path / "eigen_residuals.npy", np.array([1e-7, 1e-6, 1e-7]))
    with caplog.at_level("WARNING"):
        assert warn_if_unresolved(tmp_path, 1)
        assert not warn_if_unresolved(tmp_path, 0)
    assert "eigenvector 1 is not resolved" in caplog.text
    assert not warn_if_unresolved(tmp_path / "missing", 0)


def test_a_large_artifact_is_refused_before_writing_when_the_disk_is_too_small(
    tmp_path, monkeypatch
):
    import collections
    import shutil

    from ntklab import artifacts

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 10**6, 10**6))
    target = tmp_path / "eigvecs.npy"
    target.write_bytes(b"old")
    big = np.zeros(artifacts.LARGE_ARTIFACT_BYTES // 4, np.float32)
    with pytest.raises(OSError, match=r"eigvecs\.npy needs [\d,]+ bytes, 1,000,000 are available"):
        artifacts.save_array(target, big)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "eigvecs.npy"
    ]
    artifacts.save_array(tmp_path / "small.npy", np.zeros(3))  # small arrays are not checked
