"""ntklab.analytic against quadrature, closed-form special cases and wide empirical NTKs.

Dimensions: N examples (N1 rows, N2 columns), D input dimension, L hidden layers.

The references here never use the arc-cosine formulas under test: Gaussian expectations come
from scipy numerical quadrature, special cases from hand algebra, and the limits from the
empirical kernels of finite-width Flax networks.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from scipy import integrate

from ntklab.analytic import relu_mlp_nngp, relu_mlp_ntk
from ntklab.models import build_model, inference_apply_fn, init_variables
from ntklab.ntk import empirical_ntk

SQRT2 = math.sqrt(2.0)
IMAGE_SHAPE = (4, 4, 1)  # D = 16
DIM = math.prod(IMAGE_SHAPE)
WIDTHS = (256, 1024, 4096)
SEEDS = (0, 1, 2, 3)
DEPTH = 2
WEIGHT_STD = SQRT2
BIAS_STD = 0.5


def sphere_images(num: int, seed: int) -> np.ndarray:
    """Points on the sphere of radius √D as images [num, 4, 4, 1], float32 (xᵀx / D = 1)."""
    x = np.random.default_rng(seed).standard_normal((num, DIM))
    x *= math.sqrt(DIM) / np.linalg.norm(x, axis=1, keepdims=True)
    return x.reshape(num, *IMAGE_SHAPE).astype(np.float32)


# --- independent references -------------------------------------------------------------------


def gaussian_relu_moments(var_u: float, var_v: float, cov: float) -> tuple[float, float]:
    """(E[relu(u) relu(v)], P(u > 0, v > 0)) for (u, v) ~ N(0, [[var_u, cov], [cov, var_v]]).

    2-D quadrature of the Gaussian density over the positive quadrant; needs |ρ| < 1.
    """
    det = var_u * var_v - cov**2
    assert det > 0, "quadrature reference needs a non-degenerate covariance"
    inv = np.array([[var_v, -cov], [-cov, var_u]]) / det
    norm = 1.0 / (2 * math.pi * math.sqrt(det))

    def density(v: float, u: float) -> float:
        return norm * math.exp(
            -0.5 * (inv[0, 0] * u * u + 2 * inv[0, 1] * u * v + inv[1, 1] * v * v)
        )

    opts = {"epsabs": 1e-11, "epsrel": 1e-10}
    product = integrate.dblquad(lambda v, u: u * v * density(v, u), 0, np.inf, 0, np.inf, **opts)
    quadrant = integrate.dblquad(density, 0, np.inf, 0, np.inf, **opts)
    return product[0], quadrant[0]


def relu_second_moment(var: float) -> float:
    """E[relu(u)²] for u ~ N(0, var) by 1-D quadrature."""
    sd = math.sqrt(var)
    value, _ = integrate.quad(
        lambda u: u * u * math.exp(-0.5 * u * u / var) / (sd * math.sqrt(2 * math.pi)), 0, np.inf
    )
    return value


def quadrature_kernels(
    x: np.ndarray, y: np.ndarray, *, depth: int, weight_std: float, bias_std: float
) -> tuple[float, float]:
    """(NNGP, NTK) of one pair by the layer recursion with every expectation by quadrature."""
    w2, b2 = weight_std**2, bias_std**2
    x, y = np.ravel(x).astype(np.float64), np.ravel(y).astype(np.float64)
    var_x = w2 * (x @ x) / x.size + b2
    var_y = w2 * (y @ y) / y.size + b2
    cov = w2 * (x @ y) / x.size + b2
    ntk = cov
    for _ in range(depth):
        product, quadrant = gaussian_relu_moments(var_x, var_y, cov)
        cov, cov_dot = w2 * product + b2, w2 * quadrant
        var_x, var_y = w2 * relu_second_moment(var_x) + b2, w2 * relu_second_moment(var_y) + b2
        ntk = ntk * cov_dot + cov
    return cov, ntk


# --- the closed forms against quadrature ------------------------------------------------------


@pytest.mark.parametrize(
    ("var_u", "var_v", "rho"), [(1.0, 1.0, 0.3), (2.0, 0.5, -0.7), (0.8, 1.7, 0.95)]
)
def test_one_layer_expectations_match_quadrature(var_u, var_v, rho):
    """Depth 1 is σ_w² E[relu relu] + σ_b² and Σ^(0) σ_w² P(u, v > 0) + Σ^(1)."""
    weight_std, bias_std = 1.3, 0.1
    # Two inputs in D = 2 whose Σ^(0) has the wanted variances and correlation.
    target = np.array(
        [[var_u, rho * math.sqrt(var_u * var_v)], [rho * math.sqrt(var_u * var_v), var_v]]
    )
    gram = (target - bias_std**2) * 2 / weight_std**2  # xᵀx' for D = 2
    x = np.linalg.cholesky(gram)  # rows x_i with x_i · x_j = gram[i, j]
    product, quadrant = gaussian_relu_moments(var_u, var_v, target[0, 1])
    nngp = relu_mlp_nngp(x[:1], x[1:], depth=1, weight_std=weight_std, bias_std=bias_std)
    ntk = relu_mlp_ntk(x[:1], x[1:], depth=1, weight_std=weight_std, bias_std=bias_std)
    expected_nngp = weight_std**2 * product + bias_std**2
    expected_ntk = target[0, 1] * weight_std**2 * quadrant + expected_nngp
    np.testing.assert_allclose(nngp[0, 0], expected_nngp, rtol=1e-8)
    np.testing.assert_allclose(ntk[0, 0], expected_ntk, rtol=1e-8)


@pytest.mark.parametrize("depth", [2, 3])
def test_deep_kernels_match_quadrature_recursion(depth):
    x = sphere_images(3, seed=1) * np.array([1.0, 0.6, 1.5], np.float32)[:, None, None, None]
    opts = {"depth": depth, "weight_std": 1.2, "bias_std": 0.3}
    nngp, ntk = relu_mlp_nngp(x, **opts), relu_mlp_ntk(x, **opts)
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        expected_nngp, expected_ntk = quadrature_kernels(x[i], x[j], **opts)
        np.testing.assert_allclose(nngp[i, j], expected_nngp, rtol=1e-7)
        np.testing.assert_allclose(ntk[i, j], expected_ntk, rtol=1e-7)


# --- closed-form special cases and kernel properties ------------------------------------------


def test_depth_zero_is_the_linear_kernel():
    rng = np.random.default_rng(2)
    x1, x2 = rng.standard_normal((5, 3, 2, 1)), rng.standard_normal((4, 3, 2, 1))
    expected = 1.7**2 * x1.reshape(5, 6) @ x2.reshape(4, 6).T / 6 + 0.2**2
    for fn in (relu_mlp_nngp, relu_mlp_ntk):
        got = fn(x1, x2, depth=0, weight_std=1.7, bias_std=0.2)
        np.testing.assert_allclose(got, expected, rtol=1e-13)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_diagonal_closed_form(depth):
    """With σ_b = 0 and θ = 0: Σ^(h)(x, x) = (σ_w²/2)^h s_0, Σ̇ = σ_w²/2, Θ = (L + 1) Σ^(L)."""
    weight_std = 1.1
    x = np.random.default_rng(3).standard_normal((6, 10))
    s0 = weight_std**2 * np.sum(x * x, axis=1) / 10
    nngp = relu_mlp_nngp(x, depth=depth, weight_std=weight_std, bias_std=0.0)
    ntk = relu_mlp_ntk(x, depth=depth, weight_std=weight_std, bias_std=0.0)
    np.testing.assert_allclose(np.diag(nngp), (weight_std**2 / 2) ** depth * s0, rtol=1e-13)
    np.testing.assert_allclose(np.diag(ntk), (depth + 1) * np.diag(nngp), rtol=1e-13)


def test_antipodal_and_collinear_pairs():
    """ρ = ±1 up to rounding: the clip keeps arccos finite and the limits come out exactly."""
    x = np.random.default_rng(4).standard_normal((1, 37)) * 0.1
    pairs = np.concatenate([x, -x, 3 * x, -7 * x])
    nngp = relu_mlp_nngp(pairs, depth=1, weight_std=SQRT2, bias_std=0.0)
    ntk = relu_mlp_ntk(pairs, depth=1, weight_std=SQRT2, bias_std=0.0)
    assert np.all(np.isfinite(nngp)) and np.all(np.isfinite(ntk))
    # relu(u) relu(-u) = 0 and relu'(u) relu'(-u) = 0: opposite directions are uncorrelated.
    np.testing.assert_allclose(nngp[0, 1], 0.0, atol=1e-7)
    np.testing.assert_allclose(ntk[0, 1], 0.0, atol=1e-7)
    # Collinear (θ = 0): Σ^(1) = σ_w²/2 · 2 · 3 · xᵀx/D (as on the diagonal, scaled by 3).
    s0 = 2 * float(x[0] @ x[0]) / 37
    np.testing.assert_allclose(nngp[0, 2], 3 * s0, rtol=1e-7)
    np.testing.assert_allclose(ntk[0, 2], 3 * s0 + 3 * s0, rtol=1e-7)
    np.testing.assert_allclose(ntk[2, 3], 0.0, atol=1e-7)


def test_zero_input_gives_zero_row_without_bias():
    x = np.random.default_rng(5).standard_normal((4, 8))
    x[2] = 0.0
    for fn in (relu_mlp_nngp, relu_mlp_ntk):
        kernel = fn(x, depth=3, weight_std=SQRT2, bias_std=0.0)
        assert np.all(np.isfinite(kernel))
        np.testing.assert_array_equal(kernel[2], 0.0)
        np.testing.assert_array_equal(kernel[:, 2], 0.0)


def test_positive_homogeneity_without_bias():
    """With σ_b = 0 every Σ^(h) is bilinear in the input scales and Σ̇ scale-free."""
    rng = np.random.default_rng(6)
    x1, x2 = rng.standard_normal((3, 12)), rng.standard_normal((5, 12))
    opts = {"depth": 3, "weight_std": 1.3, "bias_std": 0.0}
    for fn in (relu_mlp_nngp, relu_mlp_ntk):
        np.testing.assert_allclose(fn(2.5 * x1, 0.3 * x2, **opts), 0.75 * fn(x1, x2, **opts))


@pytest.mark.parametrize("fn", [relu_mlp_nngp, relu_mlp_ntk])
def test_symmetric_psd_and_cross_blocks_consistent(fn):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((30, 4, 4, 1)).astype(np.float32)
    x[5] = x[4]  # a duplicate point makes the kernel singular
    x[6] = -2 * x[3]
    opts = {"depth": 3, "weight_std": SQRT2, "bias_std": 0.1}
    kernel = fn(x, **opts)
    assert kernel.shape == (30, 30)
    assert kernel.dtype == np.float64
    np.testing.assert_array_equal(kernel, kernel.T)
    eigenvalues = np.linalg.eigvalsh(kernel)
    assert eigenvalues[0] >= -1e-12 * eigenvalues[-1]
    cross = fn(x[:12], x[12:], **opts)
    np.testing.assert_allclose(cross, kernel[:12, 12:], rtol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth": -1}, "depth must be a non-negative integer, got -1"),
        ({"depth": 1.5}, "depth must be a non-negative integer, got 1.5"),
        ({"depth": True}, "depth must be a non-negative integer, got True"),
        ({"weight_std": 0.0}, "weight_std must be a positive finite number, got 0.0"),
        ({"weight_std": math.nan}, "weight_std must be a positive finite number, got nan"),
        ({"bias_std": -0.1}, "bias_std must be a non-negative finite number, got -0.1"),
        ({"bias_std": math.inf}, "bias_std must be a non-negative finite number, got inf"),
    ],
)
def test_bad_options(kwargs, match):
    opts = {"depth": 2, "weight_std": 1.0, "bias_std": 0.0} | kwargs
    with pytest.raises(ValueError, match=match):
        relu_mlp_ntk(np.ones((2, 3)), **opts)


def test_bad_inputs():
    opts = {"depth": 1, "weight_std": 1.0, "bias_std": 0.0}
    with pytest.raises(ValueError, match=r"x1 examples have shape \(3,\) but x2 examples \(4,\)"):
        relu_mlp_nngp(np.ones((2, 3)), np.ones((2, 4)), **opts)
    with pytest.raises(ValueError, match="x1 must be a non-empty batch"):
        relu_mlp_ntk(np.ones((0, 3)), **opts)
    with pytest.raises(ValueError, match="x2 has 1 non-finite values"):
        relu_mlp_ntk(np.ones((2, 3)), np.array([[1.0, np.nan, 0.0]]), **opts)


# --- infinite-width limit of the Flax network ----------------------------------------------------


def ntk_mlp(width: int):
    """The library MLP of depth DEPTH and the given width in NTK parameterization."""
    widths = (width,) * DEPTH
    return build_model(
        "mlp", widths=widths, parameterization="ntk", weight_std=WEIGHT_STD, bias_std=BIAS_STD
    )


@pytest.fixture(scope="module")
def convergence() -> dict:
    """Width -> mean relative Frobenius errors over SEEDS of (eNTK, last-hidden-layer kernel).

    The network is the library MLP, depth 2, NTK parameterization, on 8 points of the sphere
    in D = 16; the eNTK comes from ``ntklab.ntk.empirical_ntk`` in float32. The second kernel,
    σ_w²/n φ(x)ᵀφ(x') + σ_b² from the last hidden features φ = relu(h_L) [8, n], is what the
    output layer's weights and bias alone contribute to the eNTK and tends to the NNGP Σ^(L).

    In NTK parameterization every weight and bias is N(0, 1) whatever the width, so each seed
    initializes the widest network once and the narrower ones take the leading corner of each
    parameter array (one compilation instead of one per width).
    """
    x = sphere_images(8, seed=0)
    opts = {"depth": DEPTH, "weight_std": WEIGHT_STD, "bias_std": BIAS_STD}
    ntk, nngp = relu_mlp_ntk(x, **opts), relu_mlp_nngp(x, **opts)
    widest = ntk_mlp(max(WIDTHS))
    init_fn = jax.jit(lambda key: init_variables(widest, key, IMAGE_SHAPE)["params"])
    params_by_seed = [init_fn(jax.random.key(seed)) for seed in SEEDS]
    errors = {}
    for width in WIDTHS:
        model = ntk_mlp(width)
        shapes = jax.eval_shape(
            lambda model=model: init_variables(model, jax.random.key(0), IMAGE_SHAPE)
        )
        apply_fn = inference_apply_fn(model, {})  # no BatchNorm statistics
        ntk_errors, nngp_errors = [], []
        for wide_params in params_by_seed:
            params = jax.tree.map(
                lambda p, s: p[tuple(slice(0, n) for n in s.shape)], wide_params, shapes["params"]
            )
            # With 8 examples and P ≈ 17M, VJP-then-JVP products are about twice as fast as
            # forming the [8, P] Jacobian (what "auto" picks).
            kernel = empirical_ntk(apply_fn, params, x, implementation="ntk_vector_products")
            ntk_errors.append(np.linalg.norm(kernel - ntk) / np.linalg.norm(ntk))
            _, state = model.apply({"params": params}, x, capture_intermediates=True)
            hidden = state["intermediates"][f"Dense_{DEPTH - 1}"]["__call__"][0]  # h_L [8, n]
            features = np.maximum(np.asarray(hidden, np.float64), 0.0)
            last_layer = WEIGHT_STD**2 * features @ features.T / width + BIAS_STD**2
            nngp_errors.append(np.linalg.norm(last_layer - nngp) / np.linalg.norm(nngp))
        errors[width] = (float(np.mean(ntk_errors)), float(np.mean(nngp_errors)))
    return errors


@pytest.mark.parametrize(("kind", "index"), [("ntk", 0), ("nngp", 1)])
def test_empirical_kernels_converge_to_analytic(convergence, kind, index):
    errors = np.array([convergence[width][index] for width in WIDTHS])
    message = f"{kind} relative errors per width {dict(zip(WIDTHS, errors.round(4), strict=True))}"
    assert np.all(np.isfinite(errors)), message
    assert errors[1] < errors[0], message
    # Fluctuations shrink like width^(-1/2): a 16x wider network has about 1/4 of the error.
    assert errors[-1] < 0.6 * errors[0], message
    assert errors[-1] < 0.1, message
