"""train_ntk, pretrained_ntk_comparison and train_cifar end to end on tiny configs; sweeps + report."""

from __future__ import annotations

import csv
import json
import math
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT, SHARED_DATA, compose_config
from jax.flatten_util import ravel_pytree

from ntklab.artifacts import load_arrays, load_params, load_run
from ntklab.experiments import compute_ntk, pretrained_ntk_comparison, train_cifar, train_ntk
from ntklab.experiments.train_ntk import eigenfunction_labels
from ntklab.models import build_model, inference_apply_fn, init_variables

COMMON = ["model=mlp", "model.widths=[16]", "data.num_train=24", "data.num_test=12"]
TRAIN = ["train.epochs=2", "train.batch_size=12", "progress=false"]
NUM_TRAIN, NUM_TEST, NUM_EIGVECS = 24, 12, 6


@pytest.fixture(scope="module")
def artifacts_dir(tmp_path_factory):
    """A finished compute_ntk run (tiny MLP on digits, 6 eigenpairs) under <tmp>/eigenfunctions."""
    root = tmp_path_factory.mktemp("artifacts")
    cfg = compose_config(
        "compute_ntk",
        [*COMMON, f"ntk.num_eigvecs={NUM_EIGVECS}", f"paths.artifacts={root}"],
    )
    compute_ntk.run(cfg)
    return root


def config(name: str, artifacts_dir, run_dir, *overrides: str):
    return compose_config(
        f"{name}",
        [
            *COMMON,
            *TRAIN,
            f"paths.artifacts={artifacts_dir}",
            f"paths.run_dir={run_dir}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def network_run(artifacts_dir, tmp_path_factory):
    """A network run on label 4, alignment of the top 3 eigenvectors (and the trained one)."""
    run_dir = tmp_path_factory.mktemp("network")
    cfg = config("train_ntk", artifacts_dir, run_dir, "label_idx=4", "alignment.num_eigvecs=3")
    assert train_ntk.run(cfg) == run_dir
    return run_dir


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_network_run_writes_metrics_alignment_and_summary(artifacts_dir, network_run):
    names = {p.relative_to(network_run).as_posix() for p in network_run.rglob("*")}
    plots = {
        f"alignment_plots/eig_4_{s}.{x}" for s in ("train", "test", "all") for x in ("png", "pdf")
    }
    expected = {"metrics.jsonl", "metrics.json", "params.msgpack", "alignment.npz", "meta.json"}
    assert expected | plots <= names
    assert not [name for name in names if name.split("/")[-1].startswith(".")]
    metrics = json.loads((network_run / "metrics.json").read_text())
    assert metrics["script"] == "train_ntk" and metrics["mode"] == "network"
    assert metrics["config"]["label_idx"] == 4 and metrics["label_idx"] == 4
    for key in ("test/acc", "train/acc", "train/loss", "param_distance_sq", "wall_time_s"):
        assert math.isfinite(metrics[key]), key
    assert 0 <= metrics["test/acc"] <= 1 and metrics["param_distance_sq"] > 0
    assert [line["epoch"] for line in read_jsonl(network_run / "metrics.jsonl")] == [0, 1, 2]
    meta = json.loads((network_run / "meta.json").read_text())
    assert meta["num_train"] == NUM_TRAIN and meta["num_test"] == NUM_TEST
    assert (network_run / "meta.json").stat().st_mtime >= (
        network_run / "metrics.json"
    ).stat().st_mtime
    # nothing outside the run folder: beside it only other run folders, no summary files
    assert all(entry.is_dir() for entry in network_run.parent.iterdir())

    alignment = load_arrays(network_run / "alignment.npz")
    np.testing.assert_array_equal(alignment["indices"], [0, 1, 2, 4])
    eigvals = np.load(
        artifacts_dir / "eigenfunctions" / "digits" / "mlp" / "seed_0" / "eigvals.npy"
    )
    # the initial kernel's quotient of its own eigenvector is its eigenvalue (saved by compute_ntk)
    np.testing.assert_allclose(alignment["init_all"], eigvals[[0, 1, 2, 4]], rtol=1e-3)
    np.testing.assert_allclose(alignment["init_eigvals"], eigvals[[0, 1, 2, 4]])
    for split in ("train", "test", "all"):
        final = alignment[f"final_{split}"]
        assert final.shape == (4,) and np.all(final > 0)
        assert np.abs(final - alignment[f"init_{split}"]).max() > 0  # the kernel moved
    assert metrics["all/alignment_trained"] == pytest.approx(alignment["final_all"][3])


def test_labels_are_exactly_the_binarized_eigenvector(artifacts_dir, tmp_path, monkeypatch):
    captured = {}

    def fake_fit(trainee, data, config, **kwargs):
        captured.update(vars(trainee), **data._asdict(), config=config, **kwargs)
        raise InterruptedError  # stop before training

    monkeypatch.setattr(train_ntk, "fit", fake_fit)
    with pytest.raises(InterruptedError):
        train_ntk.run(config("train_ntk", artifacts_dir, tmp_path, "label_idx=3", "linearize=true"))
    run_dir = artifacts_dir / "eigenfunctions" / "digits" / "mlp" / "seed_0"
    v = np.load(run_dir / "eigvecs.npy")[3]
    expected = (np.where(v == 0, 1.0, np.sign(v)) + 1) / 2  # (sign(v) + 1) / 2, sign(0) -> +1
    np.testing.assert_array_equal(captured["y_train"], expected[:NUM_TRAIN])
    np.testing.assert_array_equal(captured["y_test"], expected[NUM_TRAIN:])
    run = load_run(run_dir)
    np.testing.assert_array_equal(captured["x_train"], run.x[:NUM_TRAIN])
    np.testing.assert_array_equal(captured["x_test"], run.x[NUM_TRAIN:])
    # linearize=true: the linearization at θ0 of the run's network drives training, from θ0
    assert captured.get("train_apply_fn") is None
    np.testing.assert_array_equal(ravel_pytree(captured["params"])[0], ravel_pytree(run.params)[0])
    np.testing.assert_allclose(
        captured["apply_fn"](run.params, run.x), run.apply_fn(run.params, run.x), rtol=1e-6
    )
    np.testing.assert_array_equal(eigenfunction_labels(np.array([[-0.5, 0.0, 0.5]]), 0), [0, 1, 1])


def test_linearized_runs_start_where_the_network_does(artifacts_dir, network_run, tmp_path):
    start = read_jsonl(network_run / "metrics.jsonl")[0]
    linear = train_ntk.run(
        config("train_ntk", artifacts_dir, tmp_path / "lin", "label_idx=4", "linearize=true")
    )
    assert not (linear / "alignment.npz").exists()  # alignment is for network runs
    linear_start = read_jsonl(linear / "metrics.jsonl")[0]
    for key in ("train/loss", "train/acc", "test/loss", "test/acc"):
        assert linear_start[key] == pytest.approx(start[key], rel=1e-5), key
    assert json.loads((linear / "metrics.json").read_text())["mode"] == "linear"
    overrides = ("label_idx=4", "linearize=true", "with_bias=false")
    no_bias = train_ntk.run(config("train_ntk", artifacts_dir, tmp_path / "nobias", *overrides))
    assert read_jsonl(no_bias / "metrics.jsonl")[0]["train/loss"] == pytest.approx(math.log(2))


def test_missing_run_error_prints_the_compute_ntk_command(artifacts_dir, tmp_path):
    cfg = config("train_ntk", tmp_path / "empty", tmp_path / "run", "model.activation=tanh")
    with pytest.raises(FileNotFoundError, match=r"no finished compute_ntk\.py run") as error:
        train_ntk.run(cfg)
    command = str(error.value).split("\n")[-1].strip()
    words = shlex.split(command)
    assert words[:4] == ["python", "compute_ntk.py", "seed=0", "model=mlp"]
    compute_cfg = compose_config("compute_ntk", words[2:])  # the command composes ...
    identity = compute_ntk.run_identity(compute_cfg)  # ... into the run this config needs
    assert identity["model"] == {**dict(cfg.model), "widths": [16]}
    assert identity["data"] == {k: v for k, v in cfg.data.items() if k not in ("root", "download")}
    assert compute_cfg.paths.run_dir == cfg.paths.eigenfunctions


def test_out_of_range_label_and_mismatching_run_are_clear_errors(artifacts_dir, tmp_path):
    with pytest.raises(ValueError, match=r"label_idx=6 is out of range: .* holds 6 eigenvectors, so label_idx must be in 0\.\.5") as error:  # fmt: skip
        train_ntk.run(
            config("train_ntk", artifacts_dir, tmp_path, "label_idx=6", "alignment.num_eigvecs=2")
        )
    assert "ntk.num_eigvecs=7 paths.run_dir=" in str(error.value)
    with pytest.raises(ValueError, match=r"another configuration \(model\.widths: run has \[16\], this config \[8\]\)"):  # fmt: skip
        train_ntk.run(config("train_ntk", artifacts_dir, tmp_path, "model.widths=[8]"))


def test_pretrained_comparison_runs_start_from_the_stated_parameters(artifacts_dir, tmp_path):
    run_dir = pretrained_ntk_comparison.run(
        config("pretrained_ntk_comparison", artifacts_dir, tmp_path, "label_idx=1")
    )
    theta0 = load_params(
        artifacts_dir / "eigenfunctions" / "digits" / "mlp" / "seed_0" / "init_params.msgpack"
    )
    trained = load_params(run_dir / "runs" / "network" / "params.msgpack")
    starts = {
        name: load_params(run_dir / "runs" / name / "start_params.msgpack")
        for name in pretrained_ntk_comparison.RUNS
    }
    flat = lambda tree: ravel_pytree(tree["params"])[0]  # noqa: E731
    np.testing.assert_array_equal(flat(starts["network"]), flat(theta0))
    np.testing.assert_array_equal(flat(starts["linear_init"]), flat(theta0))
    np.testing.assert_array_equal(flat(starts["linear_pretrained"]), flat(trained))
    assert np.abs(flat(trained) - flat(theta0)).max() > 0
    for name in ("linear_init", "linear_pretrained"):  # no bias: output 0 at the start
        assert read_jsonl(run_dir / "runs" / name / "metrics.jsonl")[0]["train/loss"] == pytest.approx(math.log(2))  # fmt: skip
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["runs"]) == set(pretrained_ntk_comparison.RUNS)
    for final in metrics["runs"].values():
        assert 0 <= final["test/acc"] <= 1
    assert (run_dir / "comparison.png").exists() and (run_dir / "comparison.pdf").exists()


def test_comparison_setup_linearizes_at_the_trained_params_with_initial_batchnorm(float64):
    """With BatchNorm: (c) is J(θ_T)(θ − θ_T) under the initial statistics, started at θ_T."""
    model = build_model("resnet18", stage_sizes=(1,), width=4)
    init = jax.tree.map(lambda a: np.asarray(a, np.float64), init_variables(model, jax.random.PRNGKey(0), (8, 8, 1)))  # fmt: skip
    rng = np.random.default_rng(0)
    trained = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape), init["params"])
    x = rng.normal(size=(4, 8, 8, 1))
    setup = pretrained_ntk_comparison.comparison_setup(
        "linear_pretrained", model=model, init_variables=init, pretrained_params=trained
    )
    assert setup.params is trained and setup.batch_stats is init["batch_stats"]
    assert setup.train_apply_fn is None
    np.testing.assert_array_equal(setup.apply_fn(trained, x), 0.0)
    direction = jax.tree.map(lambda a: rng.normal(size=a.shape), trained)
    moved = jax.tree.map(lambda a, d: a + d, trained, direction)
    network = inference_apply_fn(model, init)  # initial statistics, inference mode
    expected = jax.jvp(lambda p: network(p, x), (trained,), (direction,))[1]
    np.testing.assert_allclose(setup.apply_fn(moved, x), expected, rtol=1e-9, atol=1e-12)
    first = pretrained_ntk_comparison.comparison_setup(
        "linear_init", model=model, init_variables=init
    )
    assert first.params is init["params"]
    np.testing.assert_array_equal(first.apply_fn(init["params"], x), 0.0)
    network_setup = pretrained_ntk_comparison.comparison_setup("network", model=model, init_variables=init)  # fmt: skip
    assert network_setup.apply_fn is None and network_setup.params is init["params"]
    with pytest.raises(ValueError, match="unknown run 'other'; valid choices: network"):
        pretrained_ntk_comparison.comparison_setup("other", model=model, init_variables=init)


def write_tiny_cifar(folder, *, per_class: int = 2):
    """CIFAR-10 python batches (real format) with per_class images of each class per batch."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    labels = np.repeat(np.arange(10), per_class)
    for name in [f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.permutation(labels)],
            b"data": rng.integers(0, 256, size=(labels.size, 3072), dtype=np.uint8),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    names = [
        n.encode() for n in ("airplane automobile bird cat deer dog frog horse ship truck").split()
    ]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))


def test_train_cifar_on_a_tiny_cifar_folder(tmp_path, monkeypatch):
    write_tiny_cifar(tmp_path / "data" / "cifar-10-batches-py")
    captured = {}
    real_fit = train_cifar.fit

    def spy(trainee, data, config, **kwargs):
        captured.update(data._asdict())
        return real_fit(trainee, data, config, **kwargs)

    monkeypatch.setattr(train_cifar, "fit", spy)
    overrides = [
        "model=mlp", "model.widths=[16]", f"data.root={tmp_path / 'data'}", "data.num_train=20",
        "data.num_test=10", "train.epochs=1", "train.batch_size=10", "progress=false",
        f"paths.artifacts={tmp_path / 'artifacts'}", f"paths.run_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    run_dir = train_cifar.run(compose_config("train_cifar", [*overrides, "linearize=true"]))
    samples = load_arrays(run_dir / "samples.npz")
    raw_labels = []
    for b in range(1, 6):
        with open(tmp_path / "data" / "cifar-10-batches-py" / f"data_batch_{b}", "rb") as f:
            raw_labels += pickle.load(f, encoding="bytes")[b"labels"]
    expected = (np.array(raw_labels)[samples["train_indices"]] >= 5).astype(np.float32)
    np.testing.assert_array_equal(captured["y_train"], expected)  # classes 5-9 are label 1
    assert 0 < expected.mean() < 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["mode"] == "linear" and metrics["num_train"] == 20 and metrics["num_test"] == 10
    assert not (tmp_path / "artifacts").exists()  # nothing written outside paths.run_dir
    with pytest.raises(ValueError, match=r"data\.dataset=cifar10 is invalid here: .* 10 classes"):
        train_cifar.run(compose_config("train_cifar", [*overrides, "data.dataset=cifar10"]))


@pytest.mark.skipif(
    not (SHARED_DATA / "cifar-10-batches-py").exists(),
    reason=f"real CIFAR-10 subset not found at {SHARED_DATA / 'cifar-10-batches-py'}",
)
def test_train_cifar_on_the_real_subset(tmp_path):
    overrides = [
        "model=mlp", "model.widths=[16]", f"data.root={SHARED_DATA}", "data.num_train=40",
        "data.num_test=20", "train.epochs=1", "train.batch_size=20", "progress=false",
        f"paths.artifacts={tmp_path / 'artifacts'}", f"paths.run_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    run_dir = train_cifar.run(compose_config("train_cifar", overrides))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["mode"] == "network" and metrics["num_train"] == 40
    assert 0 <= metrics["test/acc"] <= 1 and metrics["config"]["data"]["dataset"] == "cifar2"


@pytest.mark.slow  # a subprocess running four Hydra jobs, then the report
def test_multirun_sweep_and_report(artifacts_dir, tmp_path):
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, "train_ntk.py", "-m", "label_idx=0,1", "linearize=true,false", *COMMON,
        "train.epochs=1", "train.batch_size=24", "alignment.num_eigvecs=2", "progress=false",
        f"paths.artifacts={artifacts_dir}", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    pointers = sorted(sweep.glob("*/run.json"))  # Hydra's job folders point at the run folders
    assert [p.parent.name for p in pointers] == ["0", "1", "2", "3"]
    runs = [Path(json.loads(p.read_text())["run_dir"]) for p in pointers]
    assert all((run / "metrics.json").is_file() and (run / "meta.json").is_file() for run in runs)
    assert all(run.parent == artifacts_dir / "train_ntk" / "digits" / "mlp" for run in runs)
    assert (sweep / "0" / "train_ntk.log").exists() and not list(runs[0].glob("*.log"))

    report = subprocess.run(
        [sys.executable, "-m", "ntklab.report", str(sweep)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    with open(sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["label_idx"], r["mode"]) for r in rows) == [
        ("0", "linear"), ("0", "network"), ("1", "linear"), ("1", "network"),
    ]  # fmt: skip
    assert all(0 <= float(r["test/acc"]) <= 1 for r in rows)
    for suffix in ("png", "pdf"):
        assert (sweep / f"train_ntk-digits-mlp-test_acc-vs-label_idx.{suffix}").stat().st_size > 0


@pytest.mark.parametrize(
    ("preset", "plugin", "target"),
    [
        ("joblib_local", "hydra_plugins.hydra_joblib_launcher", "JoblibLauncher"),
        ("submitit_slurm_gpu", "hydra_plugins.hydra_submitit_launcher", "SlurmLauncher"),
    ],
)
def test_launcher_presets_compose(preset, plugin, target):
    pytest.importorskip(plugin, reason=f"{plugin} not installed (pip install -e '.[sweep,slurm]')")
    cfg = compose_config_with_hydra("train_ntk", [f"hydra/launcher={preset}"])
    assert cfg.hydra.launcher._target_.endswith(target)


def compose_config_with_hydra(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
