"""The shared trainer: kernel-regression closed form, full-set evaluation, BatchNorm, options."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fitting import fit
from jax.flatten_util import ravel_pytree

from ntklab.data import load_dataset
from ntklab.linearize import linearize
from ntklab.models import build_model, inference_apply_fn, init_variables, train_apply_fn
from ntklab.train import (
    TrainConfig,
    eval_apply_fn,
    learning_rate_fn,
)

NUM_TRAIN, NUM_TEST = 24, 11


@pytest.fixture(scope="module")
def digits():
    """A tiny binary digits problem: labels 1 for digits >= 5."""
    data = load_dataset("digits", num_train=NUM_TRAIN, num_test=NUM_TEST, seed=0)
    return {
        "x_train": data.train.images,
        "y_train": (data.train.labels >= 5).astype(np.float32),
        "x_test": data.test.images,
        "y_test": (data.test.labels >= 5).astype(np.float32),
    }


@pytest.fixture(scope="module")
def mlp():
    """The model, its variables and fit's model arguments (shared: compiled steps are reused)."""
    model = build_model("mlp", widths=(16,))
    variables = init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))
    return model, variables, network_kwargs(model, variables)


def network_kwargs(model, variables):
    return {
        "train_apply_fn": train_apply_fn(model),
        "eval_apply_fn": eval_apply_fn(model),
        "params": variables["params"],
        "batch_stats": variables.get("batch_stats", {}),
    }


def accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((np.asarray(outputs)[:, 0] > 0) == (labels > 0.5)))


def test_linearized_mse_gradient_descent_is_kernel_regression(float64):
    """Full-batch GD on MSE of f_lin: test predictions follow the closed form in the eNTK.

    With K = J Jᵀ on the train set and K* = J(x*) Jᵀ, T steps of θ ← θ − η/N Jᵀ(f − y) give
    f_T(x*) = f0(x*) + K* K⁻¹ (I − (I − ηK/N)^T)(y − f0(X)), which tends to kernel regression
    f0(x*) + K* K⁻¹ (y − f0(X)). J comes from brute-force jax.jacrev, not from the code under test.
    """
    data = load_dataset("digits", num_train=10, num_test=5, seed=0)
    x, x_test = data.train.images.astype(np.float64), data.test.images.astype(np.float64)
    y = (data.train.labels >= 5).astype(np.float64)
    y_test = (data.test.labels >= 5).astype(np.float64)
    model = build_model("mlp", widths=(16,))
    variables = init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))
    params0 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    apply_fn = inference_apply_fn(model, variables)
    flat0, unravel = ravel_pytree(params0)
    jac = jax.jit(jax.jacrev(lambda theta, inputs: apply_fn(unravel(theta), inputs)[:, 0]))
    j_train, j_test = np.asarray(jac(flat0, x)), np.asarray(jac(flat0, x_test))
    kernel, cross = j_train @ j_train.T, j_test @ j_train.T
    f0_train = np.asarray(apply_fn(params0, x))[:, 0]
    f0_test = np.asarray(apply_fn(params0, x_test))[:, 0]
    n = len(x)
    lr = n / np.linalg.eigvalsh(kernel)[-1]  # stable and fast: η λ_max / N = 1

    f_lin = linearize(apply_fn, params0)
    predict = jax.jit(lambda p: f_lin(p, x_test)[:, 0])

    def predictions(state):  # an evaluator: the test predictions after every epoch
        return {f"pred/{i}": value for i, value in enumerate(np.asarray(predict(state.params)))}

    config = TrainConfig(
        epochs=400,
        batch_size=64,  # >= N: full batch
        optimizer="sgd",
        momentum=0.0,
        lr_schedule="fixed",
        max_lr=lr,
        loss="mse",
        evaluate_every=1,
    )
    result = fit(
        apply_fn=f_lin,
        params=params0,
        batch_stats={},
        x_train=x,
        y_train=y,
        x_test=x_test,
        y_test=y_test,
        config=config,
        seed=0,
        run_dir=None,
        progress=False,
        evaluators={"predictions": predictions},
    )
    for epochs in (1, 7, 400):
        decay = np.linalg.matrix_power(np.eye(n) - lr * kernel / n, epochs)
        closed_form = f0_test + cross @ np.linalg.solve(
            kernel, (np.eye(n) - decay) @ (y - f0_train)
        )
        predicted = [result.history[epochs][f"pred/{i}"] for i in range(len(x_test))]
        np.testing.assert_allclose(predicted, closed_form, rtol=1e-9, atol=1e-10)
    regression = f0_test + cross @ np.linalg.solve(kernel, y - f0_train)
    np.testing.assert_allclose(predict(result.params), regression, atol=1e-5)
    assert np.abs(regression - f0_test).max() > 0.1  # training moved the predictions


def test_evaluates_every_sample_and_writes_the_log(digits, mlp, tmp_path):
    model, variables, kwargs = mlp
    config = TrainConfig(epochs=2, batch_size=10, eval_batch_size=4)  # 4 divides neither set
    result = fit(
        **kwargs,
        **digits,
        config=config,
        seed=0,
        run_dir=tmp_path,
        progress=False,
    )
    apply_fn = inference_apply_fn(model, variables)
    final = result.final
    train_outputs = apply_fn(result.params, digits["x_train"])
    test_outputs = apply_fn(result.params, digits["x_test"])
    assert final["train/acc"] == pytest.approx(accuracy(train_outputs, digits["y_train"]))
    assert final["test/acc"] == pytest.approx(accuracy(test_outputs, digits["y_test"]))
    bce = optax.sigmoid_binary_cross_entropy(test_outputs[:, 0], digits["y_test"])
    assert final["test/loss"] == pytest.approx(float(jnp.mean(bce)), rel=1e-5)
    start, end = ravel_pytree(variables["params"])[0], ravel_pytree(result.params)[0]
    assert final["param_distance_sq"] == pytest.approx(float(np.sum((end - start) ** 2)), rel=1e-5)
    assert final["param_distance_sq"] > 0 and final["wall_time_s"] > 0
    assert final["epoch"] == 2 and final["step"] == 2 * math.ceil(NUM_TRAIN / 10)

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1, 2] and lines == result.history
    expected = {"train/lr", "train/batch_loss", "train/loss", "train/acc", "test/loss", "test/acc"}
    assert expected | {"epoch", "step", "train/epoch_s"} == set(lines[1])
    assert lines[1]["train/lr"] == pytest.approx(0.05 * (1 - 2 / 6))  # linear: 3rd of 6 steps
    assert (tmp_path / "params.msgpack").exists()
    assert np.isfinite(ravel_pytree(variables["params"])[0]).all()  # inputs were not donated


def test_seeded_reshuffles_are_reproducible(digits, mlp):
    _, _, kwargs = mlp
    config = TrainConfig(epochs=2, batch_size=10, eval_batch_size=4)

    def train(seed):
        result = fit(
            **kwargs,
            **digits,
            config=config,
            seed=seed,
            run_dir=None,
            progress=False,
        )
        return ravel_pytree(result.params)[0]

    first, again, other = train(0), train(0), train(1)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-6  # another seed, another minibatch order


def test_batchnorm_statistics_train_and_evaluation_uses_them(digits):
    model = build_model("resnet18", stage_sizes=(1,), width=4)
    variables = init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))
    kwargs = network_kwargs(model, variables)
    evaluations = []
    result = fit(
        **kwargs,
        **digits,
        config=TrainConfig(epochs=1, batch_size=12),
        seed=0,
        run_dir=None,
        progress=False,
        evaluators={
            "probe": lambda state: evaluations.append(state) or {"probe/steps": state.step}
        },
    )
    initial = ravel_pytree(variables["batch_stats"])[0]
    assert np.abs(ravel_pytree(result.batch_stats)[0] - initial).max() > 1e-4
    trained = inference_apply_fn(model, {"batch_stats": result.batch_stats})
    outputs = trained(result.params, digits["x_test"])
    assert result.final["test/acc"] == pytest.approx(accuracy(outputs, digits["y_test"]))
    stale = inference_apply_fn(model, variables)(result.params, digits["x_test"])
    assert np.abs(np.asarray(outputs) - np.asarray(stale)).max() > 1e-4  # the stats matter
    assert result.final["probe/steps"] == 2 and len(evaluations) == 1
    with pytest.raises(ValueError, match="needs eval_apply_fn"):
        fit(**{**kwargs, "eval_apply_fn": None}, **digits, config=TrainConfig(epochs=1),
            seed=0, run_dir=None, progress=False)  # fmt: skip


def test_learning_rate_schedules():
    def values(schedule, total_steps=100):
        fn = learning_rate_fn(TrainConfig(max_lr=0.1, lr_schedule=schedule), total_steps)
        return np.asarray(jax.jit(jax.vmap(fn))(jnp.arange(total_steps + 1)))

    np.testing.assert_allclose(values("linear")[[0, 50, 100]], [0.1, 0.05, 0.0], atol=1e-7)
    np.testing.assert_allclose(values("fixed"), 0.1)
    cyclic = values("cyclic")  # one-cycle: 0.1/25 -> 0.1 at 30% -> ~0
    assert cyclic[0] == pytest.approx(0.1 / 25) and cyclic.argmax() == 30
    assert cyclic.max() == pytest.approx(0.1) and cyclic[-1] < 1e-5


@pytest.mark.parametrize(("optimizer", "schedule"), [("sgd", "cyclic"), ("adam", "fixed")])
def test_optimizers_and_schedules_lower_the_loss(digits, mlp, optimizer, schedule):
    _, _, kwargs = mlp
    config = TrainConfig(
        epochs=3,
        batch_size=NUM_TRAIN,
        optimizer=optimizer,
        max_lr=0.01,
        lr_schedule=schedule,
        weight_decay=1e-4,
    )
    result = fit(**kwargs, **digits, config=config, seed=0, run_dir=None, progress=False)
    assert result.history[-1]["train/loss"] < result.history[0]["train/loss"]


def test_invalid_inputs_are_clear_errors(digits, mlp):
    model, variables, _ = mlp
    with pytest.raises(
        ValueError, match=r"train\.optimizer='rmsprop' is invalid: must be one of: sgd"
    ):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match=r"train\.lr_schedule='step' is invalid: must be one of"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match=r"unknown key train\.lr; valid keys of train: epochs"):
        TrainConfig.from_mapping({"lr": 0.1})
    with pytest.raises(
        ValueError, match=r"train\.batch_size=0 is invalid: must be an integer >= 1"
    ):
        TrainConfig(batch_size=0)
    with pytest.raises(
        ValueError, match=r"train\.checkpoint_every=0 is invalid: must be null .* or"
    ):
        TrainConfig(checkpoint_every=0)
    with pytest.raises(ValueError, match=r"train\.epochs=0 is invalid: must be an integer >= 1"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match=r"train\.momentum=1\.0 is invalid: must be a number in"):
        TrainConfig(momentum=1.0)
    assert TrainConfig(epochs=95).checkpoint_interval() == 10  # about 10%
    assert TrainConfig(epochs=3).checkpoint_interval() == 1
    assert TrainConfig(epochs=95, checkpoint_every=7).checkpoint_interval() == 7
    common = {**digits, "config": TrainConfig(epochs=1), "seed": 0, "run_dir": None}
    apply_fn = inference_apply_fn(model, variables)
    with pytest.raises(ValueError, match="give exactly one of apply_fn"):
        fit(apply_fn=apply_fn, train_apply_fn=train_apply_fn(model), params=variables["params"],
            batch_stats={}, **common)  # fmt: skip
    with pytest.raises(ValueError, match="y_train must hold labels 0 and 1"):
        fit(apply_fn=apply_fn, params=variables["params"], batch_stats={},
            **{**common, "y_train": digits["y_train"] * 2})  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"non-finite training loss .* in epoch 1"):
        fit(apply_fn=apply_fn, params=variables["params"], batch_stats={}, progress=False,
            **{**common, "config": TrainConfig(epochs=1, batch_size=4, max_lr=1e30, loss="mse")})  # fmt: skip
