"""Kernel alignment against brute force: φᵀKφ/‖φ‖² of explicit jacrev kernels, whole and per layer.

The oracle builds every kernel from ``jax.jacrev`` of the model on all N inputs in float64: the
whole trace kernel Σ_c J_c J_cᵀ, and each layer's from the Jacobian columns of that layer's
parameters only. The distance oracle is the Frobenius formula on the explicit matrices.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntklab.alignment import (
    Reference,
    aligned_indices,
    measure_kernel,
    quotients_of_kernel,
    rayleigh_quotients,
)
from ntklab.models import build_model, inference_apply_fn, init_variables

NUM_TRAIN, NUM_TEST = 13, 8
PARTS = {"train": slice(0, NUM_TRAIN), "test": slice(NUM_TRAIN, None), "all": slice(None)}
MODELS = {
    "mlp": {"widths": (16, 8)},
    "lenet": {},
    "resnet18": {"stage_sizes": (1,), "width": 4},  # BatchNorm in inference mode
}


def _problem(name: str, shape=(8, 8, 1)):
    model = build_model(name, num_outputs=2, **MODELS[name])
    variables = init_variables(model, jax.random.PRNGKey(0), shape)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
    if "batch_stats" in variables:  # "trained" running statistics, as alignment uses them
        variables["batch_stats"] = jax.tree.map(
            lambda a: a + rng.uniform(0.2, 0.6, a.shape), variables["batch_stats"]
        )
    apply_fn = inference_apply_fn(model, variables)
    x = rng.normal(size=(NUM_TRAIN + NUM_TEST, *shape))
    return apply_fn, variables["params"], x, rng


def _explicit_kernels(apply_fn, params, x) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The trace kernel [N, N] and each layer's, from jacrev of all outputs (brute force)."""
    jacobians = jax.jit(jax.jacrev(apply_fn))(params, jnp.asarray(x))  # leaves [N, C, ...]
    per_layer: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(jacobians)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        layer = "/".join(keys[:-1]) or keys[0]
        flat = np.asarray(leaf, np.float64).reshape(leaf.shape[0], leaf.shape[1], -1)
        block = np.einsum("icp,jcp->ij", flat, flat)
        per_layer[layer] = per_layer.get(layer, 0.0) + block
    return sum(per_layer.values()), per_layer


def _explicit_quotient(kernel: np.ndarray, vectors: np.ndarray, rows: slice) -> np.ndarray:
    phi = vectors[:, rows]
    return np.einsum("ki,ij,kj->k", phi, kernel[rows, rows], phi) / np.sum(phi**2, axis=1)


@pytest.fixture(scope="module", params=sorted(MODELS))
def problem(request):
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        apply_fn, params, x, rng = _problem(request.param)
        kernel, layers = _explicit_kernels(apply_fn, params, x)
        vectors = rng.normal(size=(5, len(x)))
        yield apply_fn, params, x, vectors, kernel, layers
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def float64_on():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def test_streamed_quotients_and_layers_equal_brute_force(problem, float64_on):
    apply_fn, params, x, vectors, kernel, layers = problem
    measured = measure_kernel(
        apply_fn, params, x, vectors, num_train=NUM_TRAIN, by_layer=True, batch_size=5
    )  # 5 divides neither N_train nor N_test: padding must not leak in
    for split, rows in PARTS.items():
        np.testing.assert_allclose(
            measured.quotients[split], _explicit_quotient(kernel, vectors, rows), rtol=1e-9
        )
    assert measured.layers == list(layers)  # the engine's layer names are the parameter paths
    for name, row in zip(measured.layers, measured.layer_quotients, strict=True):
        np.testing.assert_allclose(
            row, _explicit_quotient(layers[name], vectors, slice(None)), rtol=1e-9, atol=1e-12
        )
    np.testing.assert_allclose(  # the layers' quotients sum to the whole kernel's
        measured.layer_quotients.sum(0), measured.quotients["all"], rtol=1e-10
    )
    np.testing.assert_allclose(measured.frobenius_sq, np.sum(kernel**2), rtol=1e-10)


def test_kernel_distance_against_the_frobenius_formula(problem, float64_on):
    apply_fn, params, x, _, kernel, _ = problem
    moved = jax.tree.map(lambda a: a * 1.3 + 0.05, params)  # K_t: another point in θ
    k_t, _ = _explicit_kernels(apply_fn, moved, x)
    exact = 1 - np.sum(kernel * k_t) / (np.linalg.norm(kernel) * np.linalg.norm(k_t))
    assert exact > 1e-4  # the kernel moved: the test can fail
    eigvals, eigvecs = np.linalg.eigh(kernel)
    top = eigvecs[:, ::-1].T  # all N eigenvectors: the eigenpair reference is exact too
    reference = Reference(float(np.sum(kernel**2)), kernel=kernel)
    by_kernel = measure_kernel(apply_fn, moved, x, top[:3], reference=reference, batch_size=6)
    np.testing.assert_allclose(by_kernel.kernel_distance, exact, rtol=1e-8)
    assert by_kernel.distance_method == "kernel" and by_kernel.distance_error_bound == 0.0
    for count in (len(x), 4):  # all eigenpairs (exact), then the top 4 (bounded)
        reference = Reference(
            float(np.sum(kernel**2)), eigvals=eigvals[::-1][:count], positions=np.arange(count)
        )
        by_pairs = measure_kernel(apply_fn, moved, x, top[:count], reference=reference)
        assert by_pairs.distance_method == "eigenpairs"
        assert abs(by_pairs.kernel_distance - exact) <= by_pairs.distance_error_bound + 1e-9
        if count == len(x):
            np.testing.assert_allclose(by_pairs.kernel_distance, exact, rtol=1e-6)
            assert by_pairs.distance_error_bound < 1e-6


def test_quotients_of_a_formed_kernel_in_memory_and_memory_mapped(problem, tmp_path):
    _, _, _, vectors, kernel, _ = problem
    path = tmp_path / "kernel.npy"
    np.save(path, kernel.astype(np.float32))
    mapped = np.load(path, mmap_mode="r")
    for source, rtol in ((kernel, 1e-12), (mapped, 1e-5)):
        quotients, frobenius_sq = quotients_of_kernel(source, vectors, num_train=NUM_TRAIN)
        for split, rows in PARTS.items():
            np.testing.assert_allclose(
                quotients[split], _explicit_quotient(kernel, vectors, rows), rtol=rtol
            )
        np.testing.assert_allclose(frobenius_sq, np.sum(kernel**2), rtol=rtol)
    only_all, _ = quotients_of_kernel(kernel, vectors)
    assert set(only_all) == {"all"}
    with pytest.raises(ValueError, match=r"num_train=21 must be between 1 and N - 1 = 20"):
        quotients_of_kernel(kernel, vectors, num_train=21)


@pytest.mark.parametrize("method", ["kernel", "operator"])
def test_rayleigh_quotients_by_either_method_match(problem, method, float64_on):
    apply_fn, params, x, vectors, kernel, _ = problem
    quotients = rayleigh_quotients(
        apply_fn, params, x, vectors, num_train=NUM_TRAIN, batch_size=5, vector_batch_size=2,
        method=method,
    )  # fmt: skip
    assert set(quotients) == set(PARTS)
    for split, rows in PARTS.items():
        assert quotients[split].shape == (5,) and quotients[split].dtype == np.float64
        np.testing.assert_allclose(
            quotients[split], _explicit_quotient(kernel, vectors, rows), rtol=1e-8
        )


def test_bad_arguments_are_clear_errors(problem):
    apply_fn, params, x, vectors, _, _ = problem
    with pytest.raises(ValueError, match=r"vectors must be \[k, N\] with N = len\(x\) = 21"):
        rayleigh_quotients(apply_fn, params, x, vectors[:, :-1])
    with pytest.raises(ValueError, match=r"num_train=21 must be between 1 and N - 1 = 20"):
        measure_kernel(apply_fn, params, x, vectors, num_train=21)
    with pytest.raises(ValueError, match="vector_batch_size must be a positive integer"):
        rayleigh_quotients(apply_fn, params, x, vectors, vector_batch_size=0)
    with pytest.raises(ValueError, match="unknown alignment method 'magic'; valid choices: auto"):
        rayleigh_quotients(apply_fn, params, x, vectors, method="magic")
    with pytest.raises(ValueError, match=r"reference kernel is \(3, 3\)"):
        measure_kernel(apply_fn, params, x, vectors, reference=Reference(1.0, np.eye(3)))
    with pytest.raises(ValueError, match="positions must index the 5 measured vectors"):
        bad = Reference(1.0, eigvals=np.ones(2), positions=np.array([0, 5]))
        measure_kernel(apply_fn, params, x, vectors, reference=bad)


def test_aligned_indices_default_to_all_and_clamp_with_a_log_line(caplog):
    np.testing.assert_array_equal(aligned_indices(None, num_available=4, label_idx=2), range(4))
    np.testing.assert_array_equal(aligned_indices(2, num_available=4, label_idx=3), [0, 1, 3])
    with caplog.at_level(logging.INFO, logger="ntklab.alignment"):
        clamped = aligned_indices(50, num_available=20, label_idx=0)
    np.testing.assert_array_equal(clamped, range(20))
    assert "50 eigenvectors requested, the run has 20" in caplog.text
    with pytest.raises(ValueError, match=r"label_idx=5 must be in 0\.\.4"):
        aligned_indices(None, num_available=5, label_idx=5)
