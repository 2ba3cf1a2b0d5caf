"""compute_ntk end to end on a small N, read back through ntklab.artifacts.load_run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, SHARED_DATA, compose_config

from ntklab.artifacts import load_arrays, load_params, load_run
from ntklab.errors import ConfigError
from ntklab.experiments import compute_ntk
from ntklab.ntk import empirical_ntk

SMALL = [
    "model=lenet",
    "data=digits",
    "data.num_train=30",
    "data.num_test=12",
    "ntk.batch_size=16",
    "ntk.num_eigvecs=6",
]


def small_config(tmp_path, *extra: str):
    return compose_config("compute_ntk", [*SMALL, f"paths.artifacts={tmp_path}", *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("compute_ntk")
    run_dir = compute_ntk.run(small_config(tmp_path, "ntk.save_kernel=true"))
    return tmp_path, run_dir


def test_writes_the_documented_layout(finished_run):
    tmp_path, run_dir = finished_run
    assert run_dir == tmp_path / "eigenfunctions" / "digits" / "lenet" / "seed_0"
    names = {p.name for p in run_dir.iterdir()}
    expected = {"eigvals.npy", "eigvecs.npy", "init_params.msgpack", "samples.npz", "kernel.npy"}
    expected |= {"eigen_gaps.npy", "eigen_residuals.npy", "init_quotients.npz"}
    expected |= {"kernel_regression.npz"}
    assert expected | {"meta.json", "config.json", "spectrum.png"} <= names
    assert not [name for name in names if name.startswith(".")]  # no temporary leftovers
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["num_samples"] == 42 and meta["num_train"] == 30 and meta["num_test"] == 12
    assert meta["config"]["model"]["name"] == "lenet"
    assert meta["versions"]["jax"]
    assert set(meta["timings"]) == {
        "data_s", "init_s", "kernel_s", "eigen_s", "quotients_s", "kernel_regression_s", "save_s"
    }  # fmt: skip
    assert meta["eigen"]["num_unresolved"] >= 0 and "first_unresolved" in meta["eigen"]
    assert meta["eigen"]["max_residual"] < 1e-4
    eigvals = np.load(run_dir / "eigvals.npy")
    assert eigvals.shape == (6,) and np.all(np.diff(eigvals) <= 0)
    assert np.load(run_dir / "eigvecs.npy").shape == (6, 42)
    with np.load(run_dir / "samples.npz", allow_pickle=False) as samples:
        assert len(samples["train_indices"]) == 30 and len(samples["test_indices"]) == 12
    assert (run_dir / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(load_params(run_dir / "init_params.msgpack")) == {"params"}


def test_saved_eigenpairs_satisfy_the_recomputed_kernel(finished_run):
    _, run_dir = finished_run
    run = load_run(run_dir)
    assert run.x.shape == (42, 8, 8, 1) and run.num_train == 30
    kernel = empirical_ntk(run.apply_fn, run.params, run.x, batch_size=7)
    np.testing.assert_allclose(kernel, run.kernel(), rtol=1e-5, atol=1e-6 * np.abs(kernel).max())
    residual = kernel.astype(np.float64) @ run.eigvecs.T - run.eigvecs.T * run.eigvals
    assert np.linalg.norm(residual, axis=0).max() / run.eigvals[0] < 1e-4
    reference = np.linalg.eigvalsh(kernel.astype(np.float64))[::-1][:6]
    np.testing.assert_allclose(run.eigvals, reference, rtol=1e-4)
    np.testing.assert_allclose(run.eigvecs @ run.eigvecs.T, np.eye(6), atol=1e-5)


def test_readouts_equal_an_explicit_computation_on_the_saved_kernel(finished_run):
    """init_quotients.npz and kernel_regression.npz against φᵀKφ and a dense solve of the kernel."""
    _, run_dir = finished_run
    run = load_run(run_dir)
    kernel = np.asarray(run.kernel(), np.float64)
    phi, n = run.eigvecs.astype(np.float64), run.num_train
    quotients = load_arrays(run_dir / "init_quotients.npz")
    for split, rows in (("train", slice(0, n)), ("test", slice(n, None)), ("all", slice(None))):
        part = phi[:, rows]
        explicit = np.einsum("ki,ij,kj->k", part, kernel[rows, rows], part)
        np.testing.assert_allclose(quotients[split], explicit / np.sum(part**2, 1), rtol=1e-6)
    np.testing.assert_allclose(quotients["all"], run.eigvals, rtol=1e-4)  # unit eigenvectors
    assert list(quotients["layers"]) == ["Conv_0", "Conv_1", "Dense_0", "Dense_1", "Dense_2"]
    np.testing.assert_allclose(quotients["layer_all"].sum(0), quotients["all"], rtol=1e-5)
    regression = load_arrays(run_dir / "kernel_regression.npz")
    np.testing.assert_array_equal(regression["label_idx"], range(6))
    ridge = float(regression["ridge"])
    labels = np.where(phi >= 0, 1.0, -1.0)  # [k, N]
    coefficients = np.linalg.solve(kernel[:n, :n] + ridge * np.eye(n), labels[:, :n].T)
    predicted = kernel[n:, :n] @ coefficients  # [N_test, k]
    signs = np.where(predicted >= 0, 1.0, -1.0)
    np.testing.assert_allclose(regression["test_acc"], np.mean(signs == labels[:, n:].T, axis=0))


def test_rerun_with_same_config_reuses_and_other_config_is_refused(tmp_path):
    run_dir = compute_ntk.run(small_config(tmp_path, "ntk.save_kernel=true"))
    assert compute_ntk.run(small_config(tmp_path, "ntk.save_kernel=true")) == run_dir
    with pytest.raises(
        FileExistsError, match=r"different configuration \(model\.activation: 'relu' -> 'tanh'\)"
    ):
        compute_ntk.run(small_config(tmp_path, "model.activation=tanh"))
    assert (run_dir / "meta.json").exists()  # the refused run touched nothing
    other = compute_ntk.run(small_config(tmp_path, "model.activation=tanh", "overwrite=true"))
    assert other == run_dir
    assert (
        json.loads((run_dir / "meta.json").read_text())["config"]["model"]["activation"] == "tanh"
    )
    assert not (run_dir / "kernel.npy").exists()  # files of the replaced run are gone


def test_too_many_eigenvectors_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"ntk.num_eigvecs=43 must be between 1 and .* N=42"):
        compute_ntk.run(small_config(tmp_path, "ntk.num_eigvecs=43"))
    assert not (tmp_path / "eigenfunctions").exists()


def test_unknown_names_list_the_valid_choices(tmp_path):
    with pytest.raises(
        ValueError, match=r"data\.dataset='imagenet' is invalid: must be one of: ci"
    ):
        compute_ntk.run(small_config(tmp_path, "data.dataset=imagenet"))
    with pytest.raises(
        ValueError, match=r"model\.name='vgg' is invalid: must be one of: lenet, mlp"
    ):
        compute_ntk.run(small_config(tmp_path, "model.name=vgg"))
    assert not (tmp_path / "eigenfunctions").exists()  # refused before touching disk


def test_load_run_of_a_missing_run_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run compute_ntk\.py"):
        load_run(tmp_path / "nothing")


@pytest.mark.skipif(
    not (SHARED_DATA / "cifar-10-batches-py").exists(),
    reason=f"real CIFAR-10 subset not found at {SHARED_DATA / 'cifar-10-batches-py'}",
)
def test_real_cifar10_subset(tmp_path):
    cfg = compose_config(
        "compute_ntk",
        [
            "model=mlp",
            "model.widths=[32]",
            "data.dataset=cifar10",
            f"data.root={SHARED_DATA}",
            "data.num_train=40",
            "data.num_test=20",
            "ntk.num_eigvecs=5",
            f"paths.artifacts={tmp_path}",
        ],
    )
    run = load_run(compute_ntk.run(cfg))
    assert run.x.shape == (60, 32, 32, 3)
    assert sorted(np.bincount(run.labels[:40], minlength=10)) == [4] * 10  # stratified subset
    kernel = empirical_ntk(run.apply_fn, run.params, run.x)
    residual = kernel.astype(np.float64) @ run.eigvecs.T - run.eigvecs.T * run.eigvals
    assert np.linalg.norm(residual, axis=0).max() / run.eigvals[0] < 1e-4


def test_entry_script_runs_from_the_command_line(tmp_path):
    command = [
        sys.executable,
        "compute_ntk.py",
        *SMALL,
        "model=mlp",
        "ntk.num_eigvecs=3",
        f"paths.artifacts={tmp_path / 'artifacts'}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        tmp_path / "artifacts" / "eigenfunctions" / "digits" / "mlp" / "seed_0" / "meta.json"
    ).exists()
    assert "entries/s" in (tmp_path / "hydra" / "compute_ntk.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["matrix_free", "nystrom"])
def test_matrix_free_solvers_end_to_end(tmp_path, finished_run, solver):
    _, reference_dir = finished_run
    reference = load_run(reference_dir)  # dense eigenpairs of the same (seed-0) kernel
    cfg = small_config(tmp_path, f"ntk.solver={solver}", "ntk.nystrom_dims=42")
    run = load_run(compute_ntk.run(cfg))
    assert run.meta["kernel"] == {"formed": False}
    assert run.meta["eigen"]["solver"].startswith(solver)
    np.testing.assert_allclose(run.eigvals[:3], reference.eigvals[:3], rtol=1e-3)
    overlaps = np.abs(np.sum(run.eigvecs[:3] * reference.eigvecs[:3], axis=1))
    np.testing.assert_allclose(overlaps, 1.0, atol=1e-3)


def test_out_of_core_kernel_is_the_in_memory_kernel(tmp_path, finished_run):
    _, reference_dir = finished_run
    run_dir = compute_ntk.run(small_config(tmp_path, "ntk.out_of_core=true", "ntk.batch_size=8"))
    record = json.loads((run_dir / "kernel.npy.progress.json").read_text())
    assert (
        record["complete"] and record["units_done"] == record["units_total"] == 6
    )  # 6 column blocks
    np.testing.assert_allclose(
        np.load(run_dir / "kernel.npy"), np.load(reference_dir / "kernel.npy"), rtol=1e-5
    )


def test_bad_kernel_options_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"needs the kernel, which ntk\.solver=matrix_free never"):
        compute_ntk.run(small_config(tmp_path, "ntk.solver=matrix_free", "ntk.save_kernel=true"))
    with pytest.raises(ConfigError, match=r"ntk\.output=full is invalid here: .* must be trace"):
        compute_ntk.run(small_config(tmp_path, "ntk.output=full", "overwrite=true"))
    with pytest.raises(ValueError, match=r"ntk\.solver='qr' is invalid: must be one of: auto, de"):
        compute_ntk.run(small_config(tmp_path, "ntk.solver=qr", "overwrite=true"))
    with pytest.raises(
        ValueError, match=r"ntk\.precision='fp8' is invalid: must be one of: float32"
    ):
        compute_ntk.run(small_config(tmp_path, "ntk.precision=fp8", "overwrite=true"))
    with pytest.raises(ValueError, match=r"ntk\.solver=nystrom needs ntk\.nystrom_dims"):
        compute_ntk.run(small_config(tmp_path, "ntk.solver=nystrom"))
    assert not (tmp_path / "eigenfunctions").exists()  # refused before touching disk
