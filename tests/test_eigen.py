"""top_eigenpairs against numpy.linalg.eigh."""

from __future__ import annotations

import numpy as np
import pytest

from ntklab.eigen import max_relative_residual, top_eigenpairs


def psd_matrix(n: int, *, seed: int = 0, dtype=np.float64) -> np.ndarray:
    """A PSD kernel with a decaying spectrum and well-separated top eigenvalues."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    spectrum = 100.0 * 0.8 ** np.arange(n)
    return ((basis * spectrum) @ basis.T).astype(dtype)


@pytest.mark.parametrize("solver", ["dense", "lanczos", "auto"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_numpy_eigh(solver, dtype):
    kernel = psd_matrix(60, dtype=dtype)
    k = 8
    pairs = top_eigenpairs(kernel, k, solver=solver)
    reference_values, reference_vectors = np.linalg.eigh(kernel.astype(np.float64))
    reference_values, reference_vectors = (
        reference_values[::-1][:k],
        reference_vectors[:, ::-1][:, :k],
    )
    tol = 1e-10 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(pairs.values, reference_values, rtol=tol * 10)
    assert np.all(np.diff(pairs.values) <= 0)
    # Same vectors up to sign (the spectrum is non-degenerate).
    overlaps = np.abs(np.sum(pairs.vectors * reference_vectors, axis=0))
    np.testing.assert_allclose(overlaps, 1.0, atol=tol * 100)
    np.testing.assert_allclose(pairs.vectors.T @ pairs.vectors, np.eye(k), atol=tol * 100)
    assert pairs.max_residual < tol * 100
    assert pairs.solver in {"dense", "lanczos"}


def test_sign_convention_largest_entry_positive():
    pairs = top_eigenpairs(psd_matrix(30, seed=2), 5, solver="dense")
    peaks = pairs.vectors[np.argmax(np.abs(pairs.vectors), axis=0), np.arange(5)]
    assert np.all(peaks > 0)


def test_auto_uses_lanczos_for_large_n(monkeypatch):
    import ntklab.eigen

    monkeypatch.setattr(ntklab.eigen, "DENSE_MAX_N", 50)
    pairs = top_eigenpairs(psd_matrix(80), 4, solver="auto")
    assert pairs.solver == "lanczos"
    pairs = top_eigenpairs(psd_matrix(80), 30, solver="auto")
    assert pairs.solver == "dense"


def test_residual_detects_wrong_pairs():
    kernel = psd_matrix(20)
    pairs = top_eigenpairs(kernel, 3)
    wrong = max_relative_residual(kernel, pairs.values * 1.1, pairs.vectors)
    assert wrong > 0.05
    assert pairs.max_residual < 1e-12


def test_errors_name_the_bad_value():
    kernel = psd_matrix(10)
    with pytest.raises(ValueError, match="num_eigvecs=11 must be between 1 and N=10"):
        top_eigenpairs(kernel, 11)
    with pytest.raises(ValueError, match="num_eigvecs=0"):
        top_eigenpairs(kernel, 0)
    with pytest.raises(ValueError, match="unknown eigensolver 'qr'; valid choices: auto, dense"):
        top_eigenpairs(kernel, 2, solver="qr")
    with pytest.raises(ValueError, match=r"square \[N, N\]"):
        top_eigenpairs(kernel[:5], 2)
