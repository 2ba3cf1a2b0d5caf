"""A network run's alignment along training and per layer, end to end on a tiny problem.

The history starts from compute_ntk's K_0 quotients (not recomputed) and ends at the alignment the
run reports; the kernel distance equals the Frobenius formula on explicit kernels; the per-layer
quotients sum to the whole kernel's; a run interrupted and resumed writes the identical history.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import compose_config

from ntklab import artifacts
from ntklab.experiments import alignment_run, compute_ntk, train_ntk
from ntklab.ntk import empirical_ntk

COMMON = ["model=mlp", "model.widths=[12,8]", "data.num_train=40", "data.num_test=16"]
TRAIN = ["train.epochs=3", "train.batch_size=20", "train.checkpoint_every=1", "progress=false"]


@pytest.fixture(scope="module")
def compute_runs(tmp_path_factory):
    """Two compute_ntk runs of one seed: with the kernel saved (exact distance) and without."""
    roots = {}
    for name, extra in (("saved", ["ntk.save_kernel=true"]), ("eigenpairs", [])):
        root = tmp_path_factory.mktemp(name)
        compute_ntk.run(
            compose_config(
                "compute_ntk", [*COMMON, "ntk.num_eigvecs=10", f"paths.artifacts={root}", *extra]
            )
        )
        roots[name] = root
    return roots


def train(root, run_dir, *extra):
    cfg = compose_config(
        "train_ntk",
        [*COMMON, *TRAIN, "label_idx=3", "alignment.every=1", f"paths.artifacts={root}",
         f"paths.run_dir={run_dir}", *extra],
    )  # fmt: skip
    return train_ntk.run(cfg)


def test_history_starts_at_k0_and_ends_at_the_reported_alignment(compute_runs, tmp_path):
    root = compute_runs["saved"]
    run_dir = train(root, tmp_path / "run")
    history = artifacts.load_arrays(run_dir / "alignment_history.npz")
    final = artifacts.load_arrays(run_dir / "alignment.npz")
    eigen = root / "eigenfunctions" / "digits" / "mlp" / "seed_0"
    init = artifacts.load_arrays(eigen / "init_quotients.npz")
    np.testing.assert_array_equal(history["epochs"], [0, 1, 2, 3])
    indices = history["indices"]
    np.testing.assert_array_equal(indices, range(10))
    for split in ("train", "test", "all"):
        assert history[split].shape == (4, 10)
        np.testing.assert_array_equal(history[split][0], init[split][indices])  # reused, not redone
        np.testing.assert_array_equal(history[split][-1], final[f"final_{split}"])
        np.testing.assert_array_equal(history[split][0], final[f"init_{split}"])
    assert history["kernel_distance"][0] == 0.0 and str(history["distance_method"]) == "kernel"
    # d(T) against the Frobenius formula on explicit kernels at θ0 and θ_T
    run = artifacts.load_run(eigen)
    trained = artifacts.load_params(run_dir / "params.msgpack", {"params": run.params,
                                                                 "batch_stats": {}})["params"]  # fmt: skip
    k0 = np.asarray(run.kernel(), np.float64)
    kt = np.asarray(empirical_ntk(run.apply_fn, trained, run.x), np.float64)
    exact = 1 - np.sum(k0 * kt) / (np.linalg.norm(k0) * np.linalg.norm(kt))
    assert exact > 1e-4
    np.testing.assert_allclose(history["kernel_distance"][-1], exact, rtol=1e-4)
    layers = artifacts.load_arrays(run_dir / "alignment_layers.npz")
    assert list(layers["layers"]) == ["Dense_0", "Dense_1", "Dense_2"]
    np.testing.assert_allclose(layers["init_all"].sum(0), history["all"][0], rtol=1e-5)
    np.testing.assert_allclose(layers["final_all"].sum(0), history["all"][-1], rtol=1e-5)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["all/alignment_trained"] == pytest.approx(history["all"][-1][3])
    assert metrics["kernel_distance"] == pytest.approx(history["kernel_distance"][-1])
    for name in ("history_3.png", "layers_3.png", "eig_3_all.png"):
        assert (run_dir / "alignment_plots" / name).is_file()
    meta = json.loads((run_dir / "meta.json").read_text())
    assert {"alignment_history.npz", "alignment_layers.npz"} <= set(meta["artifacts"])


def test_without_a_saved_kernel_the_distance_uses_eigenpairs_within_its_bound(
    compute_runs, tmp_path
):
    exact = artifacts.load_arrays(
        train(compute_runs["saved"], tmp_path / "a") / "alignment_history.npz"
    )
    approx = artifacts.load_arrays(
        train(compute_runs["eigenpairs"], tmp_path / "b") / "alignment_history.npz"
    )
    assert str(approx["distance_method"]) == "eigenpairs"
    bound = float(approx["distance_error_bound"])
    assert 0 < bound < 1
    assert np.all(np.abs(approx["kernel_distance"] - exact["kernel_distance"]) <= bound + 1e-6)
    np.testing.assert_array_equal(approx["all"], exact["all"])  # the same θ0 and training


def test_an_interrupted_run_resumes_to_the_identical_history(compute_runs, tmp_path, monkeypatch):
    root = compute_runs["eigenpairs"]
    reference = artifacts.load_arrays(train(root, tmp_path / "whole") / "alignment_history.npz")
    real = alignment_run.AlignmentTracker.measure_fn
    calls = []

    def interrupting(self, total_steps):
        measure = real(self, total_steps)

        def wrapped(state):
            calls.append(int(state.step))
            if len(calls) == 3:  # the third measurement: after epoch 2's checkpoint
                raise KeyboardInterrupt
            return measure(state)

        return wrapped

    monkeypatch.setattr(alignment_run.AlignmentTracker, "measure_fn", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(root, tmp_path / "cut")
    monkeypatch.setattr(alignment_run.AlignmentTracker, "measure_fn", real)
    resumed = artifacts.load_arrays(train(root, tmp_path / "cut") / "alignment_history.npz")
    assert set(resumed) == set(reference)
    for key in reference:
        np.testing.assert_array_equal(resumed[key], reference[key], err_msg=key)


def test_a_compute_run_without_init_quotients_still_aligns(compute_runs, tmp_path, caplog):
    import shutil

    source = compute_runs["eigenpairs"] / "eigenfunctions"
    root = tmp_path / "old"
    shutil.copytree(source, root / "eigenfunctions")
    eigen = root / "eigenfunctions" / "digits" / "mlp" / "seed_0"
    meta = json.loads((eigen / "meta.json").read_text())
    del meta["artifacts"]["init_quotients.npz"]  # as a run made before the file existed
    (eigen / "init_quotients.npz").unlink()
    (eigen / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level("INFO"):
        run_dir = train(root, tmp_path / "run")
    assert "forming K_0 once more" in caplog.text
    history = artifacts.load_arrays(run_dir / "alignment_history.npz")
    reference = artifacts.load_arrays(
        compute_runs["eigenpairs"] / "eigenfunctions" / "digits" / "mlp" / "seed_0"
        / "init_quotients.npz"
    )  # fmt: skip
    np.testing.assert_allclose(history["all"][0], reference["all"], rtol=1e-5)
