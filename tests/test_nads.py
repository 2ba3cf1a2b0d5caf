"""ntklab.nads: NADs against the SVD of a brute-force mixed Jacobian, and the NAD dataset.

Dimensions: P parameters, D = H·W·C input dimension, N examples.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ntklab.models import build_model, inference_apply_fn, init_variables
from ntklab.nads import mixed_gram, nad_dataset, nad_input, neural_anisotropy_directions

SHAPE = (6, 6, 1)
MODELS = {
    "mlp": {"name": "mlp", "widths": (8,)},
    "lenet": {"name": "lenet"},
    "resnet18": {"name": "resnet18", "stage_sizes": (1,), "width": 2},
}


@functools.cache
def float64_model(model_name: str, *, activation: str = "gelu"):
    """(apply_fn, params, mixed_jacobian_fn) of a tiny model in float64 (call with x64 enabled).

    Cached, so tests of the same model share one apply_fn and hence the compiled functions.
    """
    model = build_model(**MODELS[model_name], activation=activation)
    variables = init_variables(model, jax.random.PRNGKey(0), SHAPE)
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    apply_fn = inference_apply_fn(model, variables)
    return (
        apply_fn,
        variables["params"],
        brute_force_mixed_jacobian_fn(apply_fn, variables["params"]),
    )


def brute_force_mixed_jacobian_fn(apply_fn, params):
    """``x -> A`` = ∂/∂x ∇θ f(θ, x) [P, D] by ``jax.jacfwd`` of ``jax.grad``, flat parameters."""
    flat, unravel = ravel_pytree(params)

    def scalar(p, y):
        return apply_fn(unravel(p), y[None])[0, 0]

    mixed_fn = jax.jit(jax.jacfwd(jax.grad(scalar, argnums=0), argnums=1))
    return lambda x: np.asarray(mixed_fn(flat, jnp.asarray(x))).reshape(flat.size, -1)


def separated_groups(values: np.ndarray, *, gap: float) -> list[slice]:
    """Index ranges of descending ``values`` split wherever consecutive values differ by > gap."""
    cuts = [0, *(np.flatnonzero(-np.diff(values) > gap) + 1), len(values)]
    return [slice(a, b) for a, b in itertools.pairwise(cuts)]


@pytest.mark.parametrize("input_std", [0.0, 1.0])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_nads_are_the_right_singular_vectors_of_the_mixed_jacobian(float64, model_name, input_std):
    apply_fn, params, mixed_jacobian_fn = float64_model(model_name)
    x = nad_input(SHAPE, input_std=input_std, seed=3).astype(np.float64)
    mixed = mixed_jacobian_fn(x)
    _, singular, vh = np.linalg.svd(mixed, full_matrices=False)
    dim = mixed.shape[1]
    assert singular[0] > 0

    # batch_size 5 does not divide D = 36: the last block is partial.
    nads = neural_anisotropy_directions(apply_fn, params, x, batch_size=5)
    assert nads.directions.shape == (dim, dim) and nads.eigvals.shape == (dim,)
    np.testing.assert_allclose(nads.directions @ nads.directions.T, np.eye(dim), atol=1e-12)
    assert np.all(np.diff(nads.eigvals) <= 0)
    np.testing.assert_allclose(nads.eigvals, singular**2, rtol=1e-9, atol=1e-12 * singular[0] ** 2)
    np.testing.assert_allclose(nads.singular_values[:5], singular[:5], rtol=1e-9)
    # Directions of (nearly) equal singular values are defined only as a subspace: compare the
    # orthogonal projectors of groups separated by clear gaps. (The MLP at the origin has one
    # eigenvalue of multiplicity D - 2·width: AᵀA = c·I + a rank-16 term.)
    groups = separated_groups(singular**2, gap=1e-6 * singular[0] ** 2)
    assert groups[0] == slice(0, 1)
    for group in groups:
        expected = vh[group].T @ vh[group]
        found = nads.directions[group].T @ nads.directions[group]
        np.testing.assert_allclose(found, expected, atol=1e-6, err_msg=f"directions {group}")
    # Each direction is a right singular vector: ‖A v‖² is its eigenvalue.
    np.testing.assert_allclose(
        np.sum((mixed @ nads.directions.T) ** 2, axis=0),
        nads.eigvals,
        rtol=1e-8,
        atol=1e-12 * singular[0] ** 2,
    )
    peak = nads.directions[np.arange(dim), np.argmax(np.abs(nads.directions), axis=1)]
    assert np.all(peak > 0)  # sign convention


def test_relu_with_zero_biases_has_a_vanishing_mixed_derivative_at_the_origin(float64):
    """Why compute_nads defaults to GeLU: with ReLU every unit sits at relu'(0) = 0 at x = 0."""
    origin = np.zeros(SHAPE)
    relu_fn, relu_params, _ = float64_model("mlp", activation="relu")
    np.testing.assert_array_equal(mixed_gram(relu_fn, relu_params, origin, batch_size=5), 0.0)
    gelu_fn, gelu_params, _ = float64_model("mlp")
    gelu_eigvals = np.linalg.eigvalsh(mixed_gram(gelu_fn, gelu_params, origin, batch_size=5))
    assert gelu_eigvals.min() > 1e-10 * gelu_eigvals.max() > 0  # full rank: D distinct NADs


def test_bad_arguments_are_clear_errors():
    model = build_model("mlp", widths=(4,), num_outputs=2, activation="gelu")
    variables = init_variables(model, jax.random.PRNGKey(0), SHAPE)
    apply_fn = inference_apply_fn(model, variables)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match=r"one scalar output .* shape \(1, 2\)"):
        mixed_gram(apply_fn, variables["params"], x)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        mixed_gram(apply_fn, variables["params"], x, batch_size=0)
    with pytest.raises(ValueError, match=r"shape must be \[H, W, C\]"):
        mixed_gram(apply_fn, variables["params"], x[0])
    with pytest.raises(ValueError, match="input_std must be a finite number >= 0, got -1"):
        nad_input(SHAPE, input_std=-1.0, seed=0)


def test_nad_input_is_the_origin_or_a_seeded_gaussian_draw():
    np.testing.assert_array_equal(nad_input(SHAPE, input_std=0.0, seed=0), 0.0)
    draw = nad_input((16, 16, 4), input_std=2.0, seed=5)
    assert draw.shape == (16, 16, 4) and draw.dtype == np.float32
    assert abs(draw.std() - 2.0) < 0.15 and abs(draw.mean()) < 0.2
    np.testing.assert_array_equal(draw, nad_input((16, 16, 4), input_std=2.0, seed=5))
    assert not np.array_equal(draw, nad_input((16, 16, 4), input_std=2.0, seed=6))


# ------------------------------------------------------------------------------------------------
# The NAD dataset
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def direction() -> np.ndarray:
    """A random (not axis-aligned) direction [8, 8, 2], deliberately not unit norm."""
    return 3.0 * np.random.default_rng(0).standard_normal((8, 8, 2))


@pytest.mark.parametrize(("epsilon", "sigma"), [(1.0, 1.0), (0.2, 3.0)])
def test_dataset_has_exactly_one_discriminative_direction(direction, epsilon, sigma):
    data = nad_dataset(
        direction,
        shape=(8, 8, 2),
        num_train=2000,
        num_test=1000,
        epsilon=epsilon,
        sigma=sigma,
        seed=1,
    )
    v = (direction / np.linalg.norm(direction)).reshape(-1)
    np.testing.assert_allclose(data.direction.reshape(-1), v)
    for x, y, n in ((data.x_train, data.y_train, 2000), (data.x_test, data.y_test, 1000)):
        assert x.shape == (n, 8, 8, 2) and x.dtype == np.float32 and y.shape == (n,)
        assert set(np.unique(y)) == {-1, 1}
        assert abs(y.mean()) < 4 / np.sqrt(n)  # uniform labels: balanced up to sampling noise
        flat = x.reshape(n, -1).astype(np.float64)
        along = flat @ v
        # The optimal linear classifier sign(<x, v>) is perfect: every sample sits at ±ε/2.
        assert np.mean(np.sign(along) == y) == 1.0
        np.testing.assert_allclose(along, 0.5 * epsilon * y, atol=1e-5 * sigma * 8 + 1e-6)
        # The noise is orthogonal to v (to float32 precision) and has variance σ² elsewhere.
        noise = flat - 0.5 * epsilon * y[:, None] * v[None, :]
        assert np.abs(noise @ v).max() <= 1e-6 * np.linalg.norm(noise, axis=1).max()
        assert abs(np.mean(noise**2) * v.size / (v.size - 1) - sigma**2) < 0.05 * sigma**2
        # No other direction separates the classes: the class means differ only along v.
        gap = flat[y == 1].mean(axis=0) - flat[y == -1].mean(axis=0)
        orthogonal = gap - (gap @ v) * v
        assert np.linalg.norm(orthogonal) < 6 * sigma * np.sqrt(v.size * 4 / n)
        np.testing.assert_allclose(gap @ v, epsilon, rtol=1e-5)


def test_dataset_is_seeded_and_the_test_set_does_not_depend_on_num_train(direction):
    options = {"shape": (8, 8, 2), "num_test": 50}
    first = nad_dataset(direction, num_train=100, seed=4, **options)
    again = nad_dataset(direction, num_train=100, seed=4, **options)
    more = nad_dataset(direction, num_train=300, seed=4, **options)
    other = nad_dataset(direction, num_train=100, seed=5, **options)
    np.testing.assert_array_equal(first.x_train, again.x_train)
    np.testing.assert_array_equal(first.y_train, again.y_train)
    np.testing.assert_array_equal(first.x_test, more.x_test)
    np.testing.assert_array_equal(first.y_test, more.y_test)
    assert not np.array_equal(first.x_train, other.x_train)
    assert not np.array_equal(first.x_train[:50], first.x_test)


def test_dataset_errors_name_the_bad_value(direction):
    options = {"shape": (8, 8, 2), "num_train": 4, "num_test": 4}
    with pytest.raises(ValueError, match=r"direction has 128 entries but shape \[8, 8, 1\]"):
        nad_dataset(direction, **{**options, "shape": (8, 8, 1)})
    with pytest.raises(ValueError, match="non-zero, got norm 0"):
        nad_dataset(np.zeros_like(direction), **options)
    with pytest.raises(ValueError, match="num_train must be a positive integer, got 0"):
        nad_dataset(direction, **{**options, "num_train": 0})
    with pytest.raises(ValueError, match="epsilon must be a finite number > 0, got 0"):
        nad_dataset(direction, epsilon=0.0, **options)
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0, got -1"):
        nad_dataset(direction, sigma=-1.0, **options)
