"""Tests for ntklab.models: registry, parameter counts, shapes, BatchNorm modes, gradients.

Dimensions: B batch, H height, W width, C channels, K outputs.
"""

import dataclasses
import math
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from scipy.special import erf
from scipy.stats import kstest

from ntklab.models import (
    build_model,
    count_params,
    inference_apply_fn,
    init_variables,
    model_names,
    train_apply_fn,
)

CIFAR_SHAPE = (32, 32, 3)
BN_MOMENTUM = 0.9  # the specification, not imported from the code under test
BN_EPSILON = 1e-5
TINY_SHAPE = (8, 8, 3)
TINY_RESNET = {"stage_sizes": (1, 1), "width": 4}
ACTIVATIONS = ["gelu", "relu", "sigmoid", "softplus", "tanh"]
CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"

# Independent numpy activations (float64).
NP_ACTIVATIONS = {
    "gelu": lambda z: 0.5 * z * (1.0 + erf(z / np.sqrt(2.0))),
    "relu": lambda z: np.maximum(z, 0.0),
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "softplus": lambda z: np.log1p(np.exp(z)),
    "tanh": np.tanh,
}


def _tiny_kwargs(name: str) -> dict:
    return {"mlp": {"widths": (16, 8)}, "lenet": {}, "resnet18": TINY_RESNET}[name]


@pytest.fixture(scope="module")
def tiny() -> dict:
    """Model name -> (model with 3 outputs, its variables on TINY_SHAPE), shared by the file."""
    out = {}
    for name in model_names():
        model = build_model(name, num_outputs=3, **_tiny_kwargs(name))
        init_fn = jax.jit(lambda key, model=model: init_variables(model, key, TINY_SHAPE))
        out[name] = (model, init_fn(jax.random.key(0)))
    return out


def _images(seed: int, batch: int, shape: tuple[int, ...] = TINY_SHAPE) -> np.ndarray:
    """Standard normal images [batch, H, W, C], float32."""
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)


def _abstract_params(name: str, input_shape: tuple[int, ...], **kwargs) -> dict:
    """Parameter shapes from jax.eval_shape on init (nothing is run)."""
    model = build_model(name, **kwargs)
    key = jax.random.key(0, impl="threefry2x32")  # the default PRNG; tracing only
    variables = jax.eval_shape(lambda k: init_variables(model, k, input_shape), key)
    return variables["params"]


def _resnet_param_count(
    stage_sizes: tuple[int, ...], width: int, in_channels: int, num_outputs: int
) -> int:
    """Independent arithmetic: 3x3 convs without bias, BN has scale + bias, 1x1 projections."""
    total = 9 * in_channels * width + 2 * width
    c_in = width
    for stage, num_blocks in enumerate(stage_sizes):
        c = width * 2**stage
        for block in range(num_blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            total += 9 * c_in * c + 2 * c + 9 * c * c + 2 * c
            if stride != 1 or c_in != c:
                total += c_in * c + 2 * c
            c_in = c
    return total + c_in * num_outputs + num_outputs


# --- registry and configs -------------------------------------------------------------------


def test_model_names_sorted():
    assert model_names() == ["lenet", "mlp", "resnet18"]


def test_unknown_model_lists_valid_names():
    with pytest.raises(
        ValueError, match=r"unknown model 'vgg'; valid choices: lenet, mlp, resnet18"
    ):
        build_model("vgg")


@pytest.mark.parametrize("name", ["lenet", "mlp", "resnet18"])
def test_unknown_kwarg_names_it_and_valid_fields(name):
    with pytest.raises(ValueError, match=r"'depth'.*valid fields: num_outputs, activation"):
        build_model(name, depth=3)


@pytest.mark.parametrize("name", ["lenet", "mlp", "resnet18"])
def test_unknown_activation_lists_valid_names(name):
    expected = r"unknown activation 'swish'; valid choices: gelu, relu, sigmoid, softplus, tanh"
    with pytest.raises(ValueError, match=expected):
        build_model(name, activation="swish")
    # Constructing the class directly still fails at init.
    model = type(build_model(name))(activation="swish")
    with pytest.raises(ValueError, match=expected):
        init_variables(model, jax.random.key(0), TINY_SHAPE)


@pytest.mark.parametrize("num_outputs", [0, -1, 2.0, True])
def test_bad_num_outputs(num_outputs):
    with pytest.raises(ValueError, match="num_outputs"):
        build_model("mlp", num_outputs=num_outputs)


@pytest.mark.parametrize("input_shape", [(32, 32), (1, 32, 32, 3), (32, 0, 3)])
def test_bad_input_shape(input_shape):
    with pytest.raises(ValueError, match="input_shape"):
        init_variables(build_model("mlp"), jax.random.key(0), input_shape)


def test_list_fields_become_tuples():
    assert build_model("mlp", widths=[7, 5]).widths == (7, 5)
    assert build_model("resnet18", stage_sizes=[1, 1]).stage_sizes == (1, 1)


@pytest.mark.parametrize("name", ["lenet", "mlp", "resnet18"])
def test_config_matches_model_defaults(name):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(overrides=[f"+model={name}"]).model
    assert cfg.name == name
    model = build_model(**cfg)
    default = build_model(name)
    fields = {key for key in cfg if key != "name"}
    assert fields == {f.name for f in dataclasses.fields(default)} - {"parent", "name"}
    for key in fields:
        assert getattr(model, key) == getattr(default, key), key


# --- parameter counts ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [("mlp", 317_501), ("lenet", 136_121)])
def test_exact_param_counts(name, expected):
    assert count_params(_abstract_params(name, CIFAR_SHAPE)) == expected


def test_resnet18_param_count():
    count = count_params(_abstract_params("resnet18", CIFAR_SHAPE))
    assert 11_100_000 <= count <= 11_250_000
    assert count == _resnet_param_count((2, 2, 2, 2), 64, 3, 1)


@pytest.mark.parametrize(("name", "last_hidden"), [("mlp", 100), ("lenet", 84), ("resnet18", 512)])
def test_param_count_grows_with_outputs(name, last_hidden):
    one = count_params(_abstract_params(name, CIFAR_SHAPE, num_outputs=1))
    ten = count_params(_abstract_params(name, CIFAR_SHAPE, num_outputs=10))
    assert ten - one == 9 * (last_hidden + 1)


def test_count_params_concrete_arrays():
    tree = {"a": jnp.zeros((3, 4)), "b": [jnp.zeros(5), jnp.zeros(())]}
    assert count_params(tree) == 18


# --- shapes and forward references ------------------------------------------------------------


def test_init_variables_collections(tiny):
    for name, (_, variables) in tiny.items():
        expected = {"params", "batch_stats"} if name == "resnet18" else {"params"}
        assert set(variables) == expected, name


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("name", ["lenet", "mlp", "resnet18"])
def test_output_shapes(tiny, name, activation):
    model = build_model(name, num_outputs=3, activation=activation, **_tiny_kwargs(name))
    variables = tiny[name][1]  # parameter shapes do not depend on the activation
    x = _images(1, 2)
    y = inference_apply_fn(model, variables)(variables["params"], x)
    y_train, _ = train_apply_fn(model)(variables["params"], variables.get("batch_stats", {}), x)
    assert y.shape == (2, 3)
    assert y_train.shape == (2, 3)
    assert bool(jnp.all(jnp.isfinite(y)))


def test_non_image_input_rejected():
    model = build_model("mlp")
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        model.init(jax.random.key(0), jnp.zeros((2, 12)))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_matches_numpy(tiny, activation):
    model = build_model("mlp", num_outputs=3, activation=activation, **_tiny_kwargs("mlp"))
    params = tiny["mlp"][1]["params"]
    x = _images(2, 3)
    act = NP_ACTIVATIONS[activation]
    h = np.asarray(x, np.float64).reshape(3, -1)
    for layer in ("Dense_0", "Dense_1"):
        h = act(h @ np.asarray(params[layer]["kernel"]) + np.asarray(params[layer]["bias"]))
    expected = h @ np.asarray(params["Dense_2"]["kernel"]) + np.asarray(params["Dense_2"]["bias"])
    y = inference_apply_fn(model, {})(params, x)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def _conv(x, kernel, *, stride=1, padding="SAME"):
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def test_lenet_matches_reference(tiny):
    model, variables = tiny["lenet"]
    params = variables["params"]
    x = _images(3, 2)

    def pool(h):  # 2x2 mean by reshape, [B, H, W, C] -> [B, H/2, W/2, C]
        b, hh, ww, c = h.shape
        return h.reshape(b, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))

    h = x
    for layer in ("Conv_0", "Conv_1"):
        bias = params[layer]["bias"][None, None, None, :]
        h = pool(jax.nn.relu(_conv(h, params[layer]["kernel"]) + bias))
    h = h.reshape(2, -1)
    for layer in ("Dense_0", "Dense_1"):
        h = jax.nn.relu(h @ params[layer]["kernel"] + params[layer]["bias"][None, :])
    expected = h @ params["Dense_2"]["kernel"] + params["Dense_2"]["bias"][None, :]
    y = inference_apply_fn(model, {})(params, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_gelu_is_exact():
    from ntklab.models.activations import get_activation

    z = np.linspace(-4.0, 4.0, 41)
    got = np.asarray(get_activation("gelu")(jnp.asarray(z, jnp.float32)))
    np.testing.assert_allclose(got, NP_ACTIVATIONS["gelu"](z), atol=1e-6)


# --- MLP parameterizations --------------------------------------------------------------------


def test_unknown_parameterization_lists_choices():
    expected = r"unknown parameterization 'mup'; valid choices: standard, ntk"
    with pytest.raises(ValueError, match=expected):
        build_model("mlp", parameterization="mup")
    with pytest.raises(ValueError, match=expected):
        type(build_model("mlp"))(parameterization="mup")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_std": 0.0}, "weight_std must be positive and finite, got 0.0"),
        ({"weight_std": -1.0}, "weight_std must be positive and finite, got -1.0"),
        ({"weight_std": math.inf}, "weight_std must be positive and finite, got inf"),
        ({"weight_std": "1.4"}, "weight_std must be a positive number, got '1.4'"),
        ({"bias_std": -0.1}, "bias_std must be non-negative and finite, got -0.1"),
        ({"bias_std": math.nan}, "bias_std must be non-negative and finite, got nan"),
        ({"bias_std": True}, "bias_std must be a non-negative number, got True"),
    ],
)
def test_bad_ntk_stds(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model("mlp", parameterization="ntk", **kwargs)


@pytest.mark.parametrize("kwargs", [{"weight_std": 1.4}, {"bias_std": 0.1}])
def test_stds_rejected_under_standard_parameterization(kwargs):
    with pytest.raises(ValueError, match="apply only to parameterization='ntk'"):
        build_model("mlp", **kwargs)


def test_ntk_parameterization_keeps_tree_and_count():
    standard = _abstract_params("mlp", CIFAR_SHAPE)
    ntk = _abstract_params("mlp", CIFAR_SHAPE, parameterization="ntk", bias_std=0.1)
    assert count_params(ntk) == 317_501
    assert jax.tree.structure(ntk) == jax.tree.structure(standard)
    assert jax.tree.map(lambda a: a.shape, ntk) == jax.tree.map(lambda a: a.shape, standard)


def test_ntk_init_is_standard_normal():
    """Every weight and bias ~ N(0, 1), whatever the fan-in and σ_w, σ_b."""
    model = build_model(
        "mlp", widths=(512, 512), parameterization="ntk", weight_std=1.5, bias_std=0.3
    )
    params = jax.jit(lambda key: init_variables(model, key, TINY_SHAPE))(jax.random.key(3))
    params = jax.tree.map(lambda p: np.asarray(p, np.float64).ravel(), params["params"])
    for layer in ("Dense_0", "Dense_1"):  # kernels [192, 512], [512, 512]; biases [512]
        for leaf in ("kernel", "bias"):
            assert kstest(params[layer][leaf], "norm").pvalue > 1e-4, (layer, leaf)
    # Many entries pin the moments down tightly.
    weights = params["Dense_1"]["kernel"]
    assert abs(weights.mean()) < 5 / 512
    assert abs(weights.var() - 1.0) < 5 * math.sqrt(2) / 512


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_ntk_mlp_matches_numpy(activation, float64):
    weight_std, bias_std = 1.3, 0.7
    model = build_model(
        "mlp",
        num_outputs=3,
        activation=activation,
        widths=(16, 8),
        parameterization="ntk",
        weight_std=weight_std,
        bias_std=bias_std,
    )
    params = jax.jit(lambda key: init_variables(model, key, TINY_SHAPE))(jax.random.key(4))
    params = jax.tree.map(lambda p: np.asarray(p, np.float64), params["params"])
    x = np.asarray(_images(11, 3), np.float64)
    act = NP_ACTIVATIONS[activation]

    def dense(h, layer):  # σ_w/√fan_in · h W + σ_b · b
        kernel, bias = params[layer]["kernel"], params[layer]["bias"]
        return weight_std / math.sqrt(kernel.shape[0]) * (h @ kernel) + bias_std * bias

    h = act(dense(x.reshape(3, -1), "Dense_0"))
    expected = dense(act(dense(h, "Dense_1")), "Dense_2")
    y = jax.jit(inference_apply_fn(model, {}))(params, x)
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-12, atol=1e-12)


def test_ntk_parameterization_from_config():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        overrides = ["+model=mlp", "model.parameterization=ntk", "model.weight_std=1.4142"]
        cfg = compose(overrides=overrides).model
    model = build_model(**cfg)
    assert (model.parameterization, model.weight_std, model.bias_std) == ("ntk", 1.4142, 0.0)


# --- ResNet BatchNorm -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_resnet(tiny):
    return tiny["resnet18"]


def test_last_bn_scale_zero_at_init(tiny_resnet):
    model, variables = tiny_resnet
    blocks = [key for key in variables["params"] if key.startswith("stage")]
    assert len(blocks) == sum(model.stage_sizes)
    for block in blocks:
        assert not np.any(np.asarray(variables["params"][block]["bn2"]["scale"]))
        assert np.all(np.asarray(variables["params"][block]["bn1"]["scale"]) == 1.0)


def test_residual_branch_silent_at_init(tiny_resnet):
    """At init, each block is act(shortcut(x)): a forward pass that skips conv1/conv2 agrees."""
    model, variables = tiny_resnet
    params = variables["params"]
    x = _images(4, 3)

    def bn(h, p):  # inference mode with initial statistics mean 0, var 1
        scale, bias = p["scale"][None, None, None, :], p["bias"][None, None, None, :]
        return h / np.sqrt(1.0 + BN_EPSILON) * scale + bias

    h = jax.nn.relu(bn(_conv(x, params["stem_conv"]["kernel"]), params["stem_bn"]))
    h = jax.nn.relu(h)  # stage1_block1: identity shortcut
    proj = params["stage2_block1"]
    h = jax.nn.relu(bn(_conv(h, proj["proj_conv"]["kernel"], stride=2), proj["proj_bn"]))
    expected = h.mean(axis=(1, 2)) @ params["head"]["kernel"] + params["head"]["bias"][None, :]
    y = inference_apply_fn(model, variables)(params, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_train_mode_updates_batch_stats(tiny_resnet):
    model, variables = tiny_resnet
    params, batch_stats = variables["params"], variables["batch_stats"]
    x = _images(5, 4)
    _, new_stats = jax.jit(train_apply_fn(model))(params, batch_stats, x)
    # Independent update of the stem BN running averages (Flax uses the biased variance).
    h = np.asarray(_conv(x, params["stem_conv"]["kernel"]), np.float64)
    expected_mean = (1 - BN_MOMENTUM) * h.mean(axis=(0, 1, 2))
    expected_var = BN_MOMENTUM * 1.0 + (1 - BN_MOMENTUM) * h.var(axis=(0, 1, 2))
    stem = new_stats["stem_bn"]
    np.testing.assert_allclose(np.asarray(stem["mean"]), expected_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(stem["var"]), expected_var, rtol=1e-4, atol=1e-6)
    # Inference mode leaves every statistic unchanged even when the collection is mutable.
    _, updates = model.apply(variables, x, train=False, mutable=["batch_stats"])
    for old, new in zip(
        jax.tree.leaves(batch_stats), jax.tree.leaves(updates["batch_stats"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(old), np.asarray(new))


def test_inference_independent_of_batch(tiny_resnet):
    model, variables = tiny_resnet
    x = _images(6, 4)
    # Shifted params make the residual branches nonzero.
    params = jax.tree.map(lambda p: np.asarray(p) + np.float32(0.1), variables["params"])
    _, batch_stats = train_apply_fn(model)(params, variables["batch_stats"], _images(7, 8))
    apply_fn = inference_apply_fn(model, {"params": params, "batch_stats": batch_stats})
    alone, batched = apply_fn(params, x[:1]), apply_fn(params, x)
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(batched[0]), rtol=1e-5, atol=1e-6)
    # The learned statistics are used: they change the output.
    initial = inference_apply_fn(model, variables)(params, x)
    assert not np.allclose(np.asarray(initial), np.asarray(batched), rtol=1e-3, atol=1e-3)
    # Sanity: train mode does depend on the other batch members.
    train_fn = train_apply_fn(model)
    train_alone = train_fn(params, batch_stats, x[:1])[0]
    train_batched = train_fn(params, batch_stats, x)[0]
    assert not np.allclose(np.asarray(train_alone[0]), np.asarray(train_batched[0]), atol=1e-4)


def test_train_apply_without_batchnorm_returns_empty_stats(tiny):
    model, variables = tiny["mlp"]
    y, stats = jax.jit(train_apply_fn(model))(variables["params"], {}, _images(8, 2))
    assert y.shape == (2, 3)
    assert stats == {}


# --- gradients and float64 --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lenet", "mlp", "resnet18"])
def test_grad_float64_matches_finite_difference(tiny, name, float64):
    model = build_model(name, num_outputs=3, activation="tanh", **_tiny_kwargs(name))
    variables = tiny[name][1]
    params = jax.tree.map(lambda p: np.asarray(p, np.float64) + 0.05, variables["params"])
    x = np.asarray(_images(9, 3), np.float64)
    apply_fn = inference_apply_fn(model, variables)
    assert jax.eval_shape(apply_fn, params, x).dtype == jnp.float64

    def loss(p):
        return jnp.sum(apply_fn(p, x) ** 2)

    loss_and_grad = jax.jit(jax.value_and_grad(loss))  # one compilation serves the FD too
    _, grads = loss_and_grad(params)
    assert all(g.dtype == jnp.float64 for g in jax.tree.leaves(grads))
    rng = np.random.default_rng(1)
    direction = jax.tree.map(lambda p: rng.standard_normal(p.shape), params)
    eps = 1e-6
    shifted = [jax.tree.map(lambda p, v, s=s: p + s * eps * v, params, direction) for s in (1, -1)]
    numeric = (loss_and_grad(shifted[0])[0] - loss_and_grad(shifted[1])[0]) / (2 * eps)
    analytic = sum(
        np.vdot(np.asarray(g), v)
        for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
    )
    assert math.isclose(float(analytic), float(numeric), rel_tol=1e-6, abs_tol=1e-9)


def test_train_apply_batchnorm_model_needs_batch_stats(tiny_resnet):
    model, variables = tiny_resnet
    with pytest.raises(flax.errors.ScopeCollectionNotFound):
        train_apply_fn(model)(variables["params"], {}, _images(10, 2))


def test_init_variables_equals_eager_init_and_survives_value_dependent_python():
    """init_variables compiles ``model.init`` as one program: the values equal the eager init's;
    a module branching in Python on its input's values falls back to the eager init."""
    model = build_model("lenet")
    key = jax.random.PRNGKey(7)
    eager = model.init(key, jnp.zeros((1, 32, 32, 3), jnp.float32), train=False)
    compiled = init_variables(model, key, (32, 32, 3))
    for got, want in zip(jax.tree.leaves(compiled), jax.tree.leaves(eager["params"]), strict=True):
        np.testing.assert_array_equal(got, want)

    class Branching(flax.linen.Module):
        @flax.linen.compact
        def __call__(self, x, train: bool = False):
            scale = 2.0 if float(x.sum()) >= 0 else 1.0  # needs a concrete value
            return flax.linen.Dense(1)(x.reshape((x.shape[0], -1))) * scale

    variables = init_variables(Branching(), key, (4, 4, 1))
    assert variables["params"]["Dense_0"]["kernel"].shape == (16, 1)
