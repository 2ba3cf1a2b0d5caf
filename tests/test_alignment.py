"""Rayleigh quotients (from the kernel and from the operator) equal φᵀKφ/‖φ‖² of an explicitly built eNTK."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

from ntklab.alignment import aligned_indices, rayleigh_quotients
from ntklab.models import build_model, inference_apply_fn, init_variables
from ntklab.ntk import empirical_ntk

NUM_TRAIN, NUM_TEST = 13, 8


@pytest.fixture(scope="module", params=["mlp", "resnet18"])
def setup(request):
    """A model (ResNet with non-trivial BatchNorm statistics), inputs, 5 vectors, explicit K."""
    kwargs = {"mlp": {"widths": (16,)}, "resnet18": {"stage_sizes": (1,), "width": 4}}
    model = build_model(request.param, **kwargs[request.param])
    variables = init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))
    rng = np.random.default_rng(0)
    if "batch_stats" in variables:  # "trained" running statistics, as alignment uses them
        variables["batch_stats"] = jax.tree.map(
            lambda a: a + rng.uniform(0.2, 0.6, a.shape).astype(np.float32),
            variables["batch_stats"],
        )
    apply_fn = inference_apply_fn(model, variables)
    x = rng.normal(size=(NUM_TRAIN + NUM_TEST, 8, 8, 1)).astype(np.float32)
    kernel = empirical_ntk(apply_fn, variables["params"], x).astype(np.float64)
    vectors = rng.normal(size=(5, len(x)))
    return apply_fn, variables["params"], x, vectors, kernel


def explicit(kernel: np.ndarray, vectors: np.ndarray, rows: slice) -> np.ndarray:
    phi = vectors[:, rows]
    return np.einsum("ki,ij,kj->k", phi, kernel[rows, rows], phi) / np.sum(phi**2, axis=1)


@pytest.mark.parametrize("method", ["kernel", "operator"])
def test_matches_the_explicit_kernel_on_train_test_and_all(setup, method):
    apply_fn, params, x, vectors, kernel = setup
    # batch sizes that divide neither N_train, N_test nor k: padding must not leak in
    quotients = rayleigh_quotients(
        apply_fn,
        params,
        x,
        vectors,
        num_train=NUM_TRAIN,
        batch_size=5,
        vector_batch_size=2,
        method=method,
    )
    parts = {
        "train": slice(0, NUM_TRAIN),
        "test": slice(NUM_TRAIN, None),
        "all": slice(None),
    }
    assert set(quotients) == set(parts)
    for split, rows in parts.items():
        assert quotients[split].shape == (5,) and quotients[split].dtype == np.float64
        np.testing.assert_allclose(quotients[split], explicit(kernel, vectors, rows), rtol=2e-4)


@pytest.mark.parametrize("method", ["auto", "operator"])
def test_eigenvectors_give_their_eigenvalues_and_all_is_the_default(setup, method):
    apply_fn, params, x, _, kernel = setup
    eigvals, eigvecs = np.linalg.eigh(kernel)
    top = eigvecs[:, ::-1][:, :3].T
    quotients = rayleigh_quotients(
        apply_fn, params, x, top, batch_size=64, vector_batch_size=8, method=method
    )
    assert set(quotients) == {"all"}
    np.testing.assert_allclose(quotients["all"], eigvals[::-1][:3], rtol=2e-4)


def test_bad_arguments_are_clear_errors(setup):
    apply_fn, params, x, vectors, _ = setup
    with pytest.raises(ValueError, match=r"vectors must be \[k, N\] with N = len\(x\) = 21"):
        rayleigh_quotients(apply_fn, params, x, vectors[:, :-1])
    with pytest.raises(ValueError, match=r"num_train=21 must be between 1 and N - 1 = 20"):
        rayleigh_quotients(apply_fn, params, x, vectors, num_train=21)
    with pytest.raises(ValueError, match="vector_batch_size must be a positive integer"):
        rayleigh_quotients(apply_fn, params, x, vectors, vector_batch_size=0)
    with pytest.raises(ValueError, match="unknown alignment method 'magic'; valid choices: auto"):
        rayleigh_quotients(apply_fn, params, x, vectors, method="magic")


def test_auto_uses_the_kernel_when_it_fits_and_logs(setup, caplog):
    apply_fn, params, x, vectors, kernel = setup
    with caplog.at_level(logging.INFO, logger="ntklab.alignment"):
        small = rayleigh_quotients(apply_fn, params, x, vectors, memory_bytes=10)
    assert "method operator" in caplog.text and "quotients by operator in" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ntklab.alignment"):
        large = rayleigh_quotients(apply_fn, params, x, vectors, memory_bytes=1 << 30)
    assert "method kernel" in caplog.text
    np.testing.assert_allclose(small["all"], explicit(kernel, vectors, slice(None)), rtol=2e-4)
    np.testing.assert_allclose(large["all"], explicit(kernel, vectors, slice(None)), rtol=2e-4)


def test_aligned_indices_default_to_all_and_clamp_with_a_log_line(caplog):
    np.testing.assert_array_equal(aligned_indices(None, num_available=4, label_idx=2), range(4))
    np.testing.assert_array_equal(aligned_indices(2, num_available=4, label_idx=3), [0, 1, 3])
    with caplog.at_level(logging.INFO, logger="ntklab.alignment"):
        clamped = aligned_indices(50, num_available=20, label_idx=0)
    np.testing.assert_array_equal(clamped, range(20))
    assert "50 eigenvectors requested, the run has 20" in caplog.text
    with pytest.raises(ValueError, match=r"label_idx=5 must be in 0\.\.4"):
        aligned_indices(None, num_available=5, label_idx=5)
