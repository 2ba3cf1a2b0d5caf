"""lr_normalization (power iteration, the learning-rate ratio) and bn_statistics, end to end."""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
import pytest
from conftest import compose_config

from ntklab.artifacts import load_arrays, load_json, load_params, load_run
from ntklab.experiments import compute_ntk, pretrained_ntk_comparison, train_ntk
from ntklab.lr_normalization import ntk_lr_scale, ntk_top_eigenvalue, unit_lr_scale
from ntklab.models import build_model, inference_apply_fn, init_variables
from ntklab.ntk import empirical_ntk

MLP = ["model=mlp", "model.widths=[16]"]
RESNET = ["model=resnet18", "model.stage_sizes=[1]", "model.width=4"]
DATA = ["data.num_train=24", "data.num_test=12"]
TRAIN = ["train.epochs=2", "train.batch_size=12", "progress=false"]
NUM_TRAIN = 24


def dense_top_eigenvalue(apply_fn, params, x) -> float:
    """λ_max of the dense eNTK by ``numpy.linalg.eigvalsh`` (the independent reference)."""
    kernel = np.asarray(empirical_ntk(apply_fn, params, x), np.float64)
    return float(np.linalg.eigvalsh((kernel + kernel.T) / 2)[-1])


def tiny_model(name: str):
    if name == "mlp":
        return build_model("mlp", widths=(8, 8))
    return build_model("resnet18", stage_sizes=(1,), width=4)


# --- the power iteration -----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "block_size"), [("mlp", 1), ("mlp", 4), ("resnet18", 4)])
def test_top_eigenvalue_matches_eigvalsh_of_the_dense_kernel(float64, name, block_size):
    model = tiny_model(name)
    variables = jax.tree.map(
        lambda a: np.asarray(a, np.float64),
        init_variables(model, jax.random.PRNGKey(1), (8, 8, 1)),
    )
    x = np.random.default_rng(0).normal(size=(20, 8, 8, 1))
    apply_fn = inference_apply_fn(model, variables)
    expected = dense_top_eigenvalue(apply_fn, variables["params"], x)
    top = ntk_top_eigenvalue(
        apply_fn, variables["params"], x, block_size=block_size, tol=1e-7, max_iterations=200
    )
    assert top.converged and top.residual <= 1e-7
    assert top.iterations < 200
    np.testing.assert_allclose(top.value, expected, rtol=1e-9)


def test_unconverged_estimate_is_flagged_and_bad_options_refused(float64, caplog):
    model = tiny_model("mlp")
    variables = jax.tree.map(
        lambda a: np.asarray(a, np.float64),
        init_variables(model, jax.random.PRNGKey(1), (8, 8, 1)),
    )
    x = np.random.default_rng(0).normal(size=(20, 8, 8, 1))
    apply_fn = inference_apply_fn(model, variables)
    with caplog.at_level(logging.WARNING, logger="ntklab.lr_normalization"):
        top = ntk_top_eigenvalue(
            apply_fn, variables["params"], x, block_size=1, tol=1e-14, max_iterations=2
        )
    assert not top.converged and top.iterations == 2 and top.residual > 1e-14
    assert "not converged after 2 iterations" in caplog.text
    with pytest.raises(ValueError, match="block_size must be an integer >= 1, got 0"):
        ntk_top_eigenvalue(apply_fn, variables["params"], x, block_size=0)
    with pytest.raises(ValueError, match="tol must be a finite number > 0"):
        ntk_top_eigenvalue(apply_fn, variables["params"], x, tol=0.0)
    with pytest.raises(ValueError, match="valid choices: none, ntk"):
        unit_lr_scale("foo", 0.1, reason="test")


def test_lr_scale_is_the_ratio_of_the_two_top_eigenvalues(float64):
    model = tiny_model("mlp")
    variables = jax.tree.map(
        lambda a: np.asarray(a, np.float64),
        init_variables(model, jax.random.PRNGKey(1), (8, 8, 1)),
    )
    scaled = jax.tree.map(lambda a: 3.0 * a, variables)  # a larger kernel
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 1))
    init_fn, model_fn = inference_apply_fn(model, variables), inference_apply_fn(model, scaled)
    scale = ntk_lr_scale(
        init_fn, variables["params"], model_fn, scaled["params"], x, max_lr=0.5, tol=1e-8
    )
    ratio = dense_top_eigenvalue(init_fn, variables["params"], x) / dense_top_eigenvalue(
        model_fn, scaled["params"], x
    )
    assert ratio < 0.5  # the test can tell a rescaled rate from an unscaled one
    np.testing.assert_allclose(scale.ratio, ratio, rtol=1e-8)
    np.testing.assert_allclose(scale.effective_max_lr, 0.5 * ratio, rtol=1e-8)
    record = scale.as_dict()
    assert record["mode"] == "ntk" and record["lambda_max_init"] == scale.lambda_max_init
    assert json.loads(json.dumps(record)) == record


# --- end to end --------------------------------------------------------------------------------


def make_eigenfunctions(root, model: list[str]) -> None:
    cfg = compose_config(
        "compute_ntk", [*model, *DATA, "ntk.num_eigvecs=4", f"paths.artifacts={root}"]
    )
    compute_ntk.run(cfg)


@pytest.fixture(scope="module")
def mlp_artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlp_artifacts")
    make_eigenfunctions(root, MLP)
    return root


@pytest.fixture(scope="module")
def resnet_artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("resnet_artifacts")
    make_eigenfunctions(root, RESNET)
    return root


def config(script: str, model: list[str], root, run_dir, *overrides: str):
    return compose_config(
        f"{script}",
        [*model, *DATA, *TRAIN, f"paths.artifacts={root}", f"paths.run_dir={run_dir}", *overrides],
    )


def eigenfunction_run(root, name: str):
    return load_run(root / "eigenfunctions" / "digits" / name / "seed_0")


def first_epoch_lr(run_dir, name: str) -> float:
    lines = (run_dir / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[1])["train/lr"]


def test_pretrained_comparison_normalizes_run_c_by_the_dense_kernel_ratio(mlp_artifacts, tmp_path):
    run_dir = pretrained_ntk_comparison.run(
        config(
            "pretrained_ntk_comparison",
            MLP,
            mlp_artifacts,
            tmp_path,
            "label_idx=1",
            "train.lr_normalization=ntk",
            "train.max_lr=0.5",
        )
    )
    ntk_run = eigenfunction_run(mlp_artifacts, "mlp")
    x_train = ntk_run.x[:NUM_TRAIN]
    theta_t = load_params(run_dir / "runs" / "network" / "params.msgpack")
    lambda_init = dense_top_eigenvalue(
        inference_apply_fn(ntk_run.model, ntk_run.variables), ntk_run.params, x_train
    )
    lambda_t = dense_top_eigenvalue(
        inference_apply_fn(ntk_run.model, theta_t), theta_t["params"], x_train
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    meta = load_json(run_dir / "meta.json")
    record = metrics["lr_normalization"]
    assert meta["lr_normalization"] == record
    c = record["linear_pretrained"]
    np.testing.assert_allclose(c["lambda_max_init"], lambda_init, rtol=1e-3)
    np.testing.assert_allclose(c["lambda_max_model"], lambda_t, rtol=1e-3)
    np.testing.assert_allclose(c["ratio"], lambda_init / lambda_t, rtol=1e-3)
    assert abs(c["ratio"] - 1) > 1e-2  # training moved the kernel enough to tell them apart
    np.testing.assert_allclose(c["effective_max_lr"], 0.5 * c["ratio"], rtol=1e-12)
    assert c["max_lr"] == 0.5 and c["mode"] == "ntk" and c["reason"] is None
    for name in ("network", "linear_init"):  # K_init itself: nothing estimated
        assert record[name]["ratio"] == 1.0 and record[name]["effective_max_lr"] == 0.5
        assert record[name]["lambda_max_init"] is None and "by definition" in record[name]["reason"]
    # the trainer used the effective rate: same schedule, (c)'s lr is the network's × ratio
    np.testing.assert_allclose(
        first_epoch_lr(run_dir, "linear_pretrained"),
        first_epoch_lr(run_dir, "network") * c["ratio"],
        rtol=1e-6,
    )
    np.testing.assert_allclose(first_epoch_lr(run_dir, "linear_init"), first_epoch_lr(run_dir, "network"))  # fmt: skip
    for content in (metrics, meta):
        assert content["bn_statistics"] == "initial" and content["has_batch_norm"] is False
    saved = load_json(run_dir / "runs" / "linear_pretrained" / "lr_normalization.json")
    assert saved == c


def test_lr_normalization_none_estimates_nothing(mlp_artifacts, tmp_path):
    run_dir = train_ntk.run(
        config("train_ntk", MLP, mlp_artifacts, tmp_path, "label_idx=1", "alignment.enabled=false")
    )
    meta = load_json(run_dir / "meta.json")
    assert meta["lr_normalization"]["mode"] == "none"
    assert meta["lr_normalization"]["ratio"] == 1.0
    assert meta["lr_normalization"]["lambda_max_model"] is None
    assert meta["bn_statistics"] == "trained" and meta["has_batch_norm"] is False


@pytest.mark.parametrize("bn_statistics", ["initial", "trained"])
def test_linear_pretrained_uses_the_chosen_batch_stats(float64, bn_statistics):
    """(c)'s model is J(θ_T)(θ − θ_T) under exactly the statistics bn_statistics names."""
    model = tiny_model("resnet18")
    init = jax.tree.map(
        lambda a: np.asarray(a, np.float64),
        init_variables(model, jax.random.PRNGKey(0), (8, 8, 1)),
    )
    rng = np.random.default_rng(0)
    trained = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape), init["params"])
    trained_stats = jax.tree.map(
        lambda a: a + 0.5 + 0.2 * rng.random(size=a.shape), init["batch_stats"]
    )
    setup = pretrained_ntk_comparison.comparison_setup(
        "linear_pretrained",
        model=model,
        init_variables=init,
        pretrained_params=trained,
        pretrained_batch_stats=trained_stats,
        bn_statistics=bn_statistics,
    )
    chosen = init["batch_stats"] if bn_statistics == "initial" else trained_stats
    other = trained_stats if bn_statistics == "initial" else init["batch_stats"]
    assert setup.batch_stats is chosen
    x = rng.normal(size=(4, 8, 8, 1))
    direction = jax.tree.map(lambda a: rng.normal(size=a.shape), trained)
    moved = jax.tree.map(lambda a, d: a + d, trained, direction)

    def manual(stats):
        network = inference_apply_fn(model, {"params": trained, "batch_stats": stats})
        return jax.jvp(lambda p: network(p, x), (trained,), (direction,))[1]

    got = setup.apply_fn(moved, x)
    np.testing.assert_allclose(got, manual(chosen), rtol=1e-9, atol=1e-12)
    assert np.abs(got - manual(other)).max() > 1e-3  # the choice matters


def test_trained_statistics_are_required_where_they_matter():
    model = tiny_model("resnet18")
    init = init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))
    with pytest.raises(ValueError, match="needs the network run's BatchNorm statistics"):
        pretrained_ntk_comparison.comparison_setup(
            "linear_pretrained",
            model=model,
            init_variables=init,
            pretrained_params=init["params"],
            bn_statistics="trained",
        )
    with pytest.raises(ValueError, match="bn_statistics='x' is invalid: must be one of: initial"):
        pretrained_ntk_comparison.comparison_setup(
            "linear_pretrained",
            model=model,
            init_variables=init,
            pretrained_params=init["params"],
            bn_statistics="x",
        )


@pytest.fixture(scope="module")
def resnet_alignments(resnet_artifacts, tmp_path_factory):
    """train_ntk network runs of the tiny ResNet with each bn_statistics (same training)."""
    runs = {}
    for choice in ("initial", "trained"):
        run_dir = tmp_path_factory.mktemp(f"resnet_{choice}")
        cfg = config(
            "train_ntk",
            RESNET,
            resnet_artifacts,
            run_dir,
            "label_idx=1",
            "alignment.num_eigvecs=2",
            "train.epochs=1",
            f"bn_statistics={choice}",
        )
        runs[choice] = train_ntk.run(cfg)
    return runs


def test_alignment_kernel_uses_the_chosen_batch_stats(resnet_artifacts, resnet_alignments):
    ntk_run = eigenfunction_run(resnet_artifacts, "resnet18")
    trained = {
        choice: load_params(path / "params.msgpack") for choice, path in resnet_alignments.items()
    }
    flat = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]  # noqa: E731
    np.testing.assert_array_equal(flat(trained["initial"]), flat(trained["trained"]))
    theta_t, trained_stats = trained["trained"]["params"], trained["trained"]["batch_stats"]
    init_stats = ntk_run.variables["batch_stats"]
    assert np.abs(flat(trained_stats) - flat(init_stats)).max() > 1e-2
    finals = {}
    for choice, path in resnet_alignments.items():
        alignment = load_arrays(path / "alignment.npz")
        stats = init_stats if choice == "initial" else trained_stats
        network = inference_apply_fn(ntk_run.model, {"params": theta_t, "batch_stats": stats})
        kernel = np.asarray(empirical_ntk(network, theta_t, ntk_run.x), np.float64)
        vectors = ntk_run.eigvecs[alignment["indices"]]
        expected = np.einsum("kn,nm,km->k", vectors, kernel, vectors) / np.sum(vectors**2, 1)
        np.testing.assert_allclose(alignment["final_all"], expected, rtol=1e-4)
        finals[choice] = alignment["final_all"]
        meta = load_json(path / "meta.json")
        assert meta["bn_statistics"] == choice and meta["has_batch_norm"] is True
    assert np.abs(finals["initial"] / finals["trained"] - 1).max() > 1e-3


def test_pretrained_comparison_with_trained_statistics_end_to_end(resnet_artifacts, tmp_path):
    """bn_statistics=trained: (c) starts from (a)'s statistics, and the lr estimate uses them."""
    run_dir = pretrained_ntk_comparison.run(
        config(
            "pretrained_ntk_comparison",
            RESNET,
            resnet_artifacts,
            tmp_path,
            "label_idx=1",
            "train.epochs=1",
            "bn_statistics=trained",
            "train.lr_normalization=ntk",
        )
    )
    ntk_run = eigenfunction_run(resnet_artifacts, "resnet18")
    network = load_params(run_dir / "runs" / "network" / "params.msgpack")
    start = load_params(run_dir / "runs" / "linear_pretrained" / "start_params.msgpack")
    flat = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]  # noqa: E731
    np.testing.assert_array_equal(flat(start), flat(network))  # θ_T and the trained statistics
    x_train = ntk_run.x[:NUM_TRAIN]
    lambdas = {
        choice: dense_top_eigenvalue(
            inference_apply_fn(ntk_run.model, {"params": network["params"], "batch_stats": stats}),
            network["params"],
            x_train,
        )
        for choice, stats in (
            ("initial", ntk_run.variables["batch_stats"]),
            ("trained", network["batch_stats"]),
        )
    }
    meta = load_json(run_dir / "meta.json")
    c = meta["lr_normalization"]["linear_pretrained"]
    np.testing.assert_allclose(c["lambda_max_model"], lambdas["trained"], rtol=1e-3)
    assert abs(lambdas["initial"] / lambdas["trained"] - 1) > 1e-2  # the statistics matter
    assert meta["bn_statistics"] == "trained" and meta["has_batch_norm"] is True
