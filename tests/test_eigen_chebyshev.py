"""Chebyshev-filtered subspace iteration (``solver="chebyshev"``) against numpy.linalg.eigh."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from numpy.polynomial import chebyshev
from test_eigen import assert_projectors_match, clustered_spectrum, psd_matrix, reference

import ntklab.eigen._pairs
from ntklab.eigen import max_relative_residual, top_eigenpairs
from ntklab.eigen._chebyshev import _chebyshev_filter, chebyshev_subspace_iteration


def power_law_spectrum(n: int) -> np.ndarray:
    """A slowly decaying NTK-like spectrum (λ_j ∝ j^-0.9 after one outlier): the last wanted
    pairs of a k = n / 4 request are close to the cutoff, where plain subspace iteration crawls."""
    return np.concatenate([[500.0], 40.0 * (1.0 + np.arange(n - 1)) ** -0.9])


def no_report(residual, converged=None):
    return None


def solve(matmat, n, k, *, block, tol, num_iterations, **options):
    """``chebyshev_subspace_iteration`` from a fixed seed, without progress reports."""
    return chebyshev_subspace_iteration(
        matmat,
        n,
        k,
        block=block,
        num_iterations=num_iterations,
        tol=tol,
        rng=np.random.default_rng(0),
        report=no_report,
        **options,
    )


@pytest.mark.parametrize("product_dtype, tol", [("float32", 1e-5), ("float64", 1e-10)])
def test_chebyshev_on_a_slowly_decaying_spectrum(product_dtype, tol):
    # Decaying and clustered spectra run in test_eigen's SOLVER_CASES; this one has no clear gap
    # after the outlier, the case the filter is for.
    n, k = 160, 40
    kernel = psd_matrix(n, seed=2, spectrum=power_law_spectrum(n))
    pairs = top_eigenpairs(
        kernel, k, solver="chebyshev", product_dtype=product_dtype, oversampling=12, seed=1
    )
    values, _ = reference(kernel, k)
    np.testing.assert_allclose(pairs.values, values[:k], rtol=0, atol=tol * values[0])
    assert np.all(np.diff(pairs.values) <= 0)
    np.testing.assert_allclose(pairs.vectors.T @ pairs.vectors, np.eye(k), atol=10 * tol)
    independent = np.linalg.norm(kernel @ pairs.vectors - pairs.vectors * pairs.values, axis=0)
    np.testing.assert_allclose(pairs.residuals, independent / values[0], rtol=1e-6, atol=1e-15)
    assert pairs.max_residual < tol
    expected = np.minimum(
        np.concatenate([[np.inf], values[: k - 1] - values[1:k]]), values[:k] - values[1 : k + 1]
    )
    np.testing.assert_allclose(pairs.gaps, expected / values[0], rtol=0, atol=10 * tol)
    assert pairs.passes > pairs.iterations  # several products per outer iteration + the check


@pytest.mark.parametrize("degree", [2, 3, 5])
def test_filter_is_the_scaled_chebyshev_polynomial(degree):
    # Oracle: V diag(T_m(t(λ)) / T_m(t(θ_top))) Vᵀ Q from numpy's eigendecomposition.
    n, a = 50, 8
    kernel = psd_matrix(n, seed=7)
    spectrum, eigenvectors = np.linalg.eigh(kernel)
    basis, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((n, a)))
    values = np.sort(np.random.default_rng(1).uniform(0.5, 30.0, a))[::-1]
    filtered = _chebyshev_filter(lambda v: kernel @ v, basis, kernel @ basis, values, a, degree)
    cutoff, top = values[-1], values[0]
    coefficients = np.zeros(degree + 1)
    coefficients[degree] = 1.0
    gain = chebyshev.chebval(2 * spectrum / cutoff - 1, coefficients)
    gain /= chebyshev.chebval(2 * top / cutoff - 1, coefficients)
    expected = (eigenvectors * gain) @ (eigenvectors.T @ basis)
    np.testing.assert_allclose(filtered, expected, rtol=1e-10, atol=1e-12)


def test_filter_takes_a_plain_step_when_the_cutoff_is_negligible():
    n = 30
    kernel = psd_matrix(n, seed=3)
    basis, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((n, 4)))
    images = kernel @ basis
    for cutoff in (0.0, -1e-9, 1e-4):  # rank-deficient kernels put Ritz values at 0
        values = np.array([10.0, 5.0, 1.0, cutoff])

        def never(v):
            raise AssertionError("the plain step needs no product")

        np.testing.assert_array_equal(_chebyshev_filter(never, basis, images, values, 3, 3), images)


def test_the_filter_saves_products_on_a_slowly_decaying_spectrum():
    # Same tolerance and block: degree 3 needs clearly fewer products than degree 1 (plain
    # subspace iteration with locking), which is why it beats LAPACK at N = 6,102.
    n, k = 400, 100
    kernel = psd_matrix(n, seed=5, spectrum=power_law_spectrum(n))
    counts = {}
    for degree in (1, 3):
        calls: list[int] = []

        def matmat(v, calls=calls):
            calls.append(v.shape[1])
            return kernel @ v

        result = solve(
            matmat,
            n,
            k,
            block=k + 10,
            num_iterations=500,
            tol=1e-8,
            degree=degree,
            dtype=np.float64,
        )
        assert max_relative_residual(kernel, result.values, result.vectors) < 1e-8
        counts[degree] = sum(calls)
    assert counts[3] < 0.6 * counts[1], counts


def test_exactly_degenerate_spectrum():
    n = 120
    basis, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((n, n)))
    spectrum = np.concatenate([[5.0, 5.0, 5.0], 2.0 * 0.9 ** np.arange(n - 3)])
    kernel = (basis * spectrum) @ basis.T
    cluster = basis[:, :3] @ basis[:, :3].T
    for k in (2, 3, 5):
        result = solve(
            lambda v: kernel @ v,
            n,
            k,
            block=k + 4,
            num_iterations=200,
            tol=1e-11,
            dtype=np.float64,
        )
        np.testing.assert_allclose(result.values, spectrum[:k], rtol=1e-9)
        top = result.vectors[:, : min(k, 3)]
        np.testing.assert_allclose(cluster @ top, top, atol=1e-8)


@pytest.mark.parametrize("k", [5, 12])
def test_rank_deficient_kernel(k, caplog):
    # Rank 8: for k = 12 the last four wanted eigenvalues are 0 and the filter falls back to a
    # plain step; every returned pair must still be an eigenpair of K.
    # The block (k + 20 columns) is wider than the rank, so K Ω is rank deficient and Cholesky QR
    # hands over to Householder QR with fresh random columns.
    n, rank = 60, 8
    features = np.random.default_rng(4).standard_normal((n, rank)) * 2.0 ** -np.arange(rank)
    kernel = features @ features.T
    caplog.set_level(logging.DEBUG, logger="ntklab.eigen._chebyshev")
    pairs = top_eigenpairs(kernel, k, solver="chebyshev", product_dtype="float64")
    assert "falling back to Householder QR" in caplog.text
    values, _ = reference(kernel, k)
    np.testing.assert_allclose(pairs.values, values[:k], rtol=0, atol=1e-10 * values[0])
    assert pairs.max_residual < 1e-10
    np.testing.assert_allclose(pairs.vectors.T @ pairs.vectors, np.eye(k), atol=1e-9)


@pytest.mark.parametrize("degree", [3, 6, 12])
def test_float32_filter_of_high_degree_still_converges(degree):
    # λ_1 / λ_k = 1,400 and degree 12: the gain at λ_1 is ~1e30 times the gain at λ_k. Filtering
    # the whole block buries the tail columns' own components in float32 rounding (residuals
    # stalled at 1e-2); the top takes plain steps and is projected out of the filtered tail.
    n, k = 200, 50
    kernel = psd_matrix(n, seed=6, spectrum=power_law_spectrum(n), dtype=np.float32)
    result = solve(
        lambda v: kernel @ v,
        n,
        k,
        block=k + 8,
        num_iterations=12,
        tol=1e-5,
        degree=degree,
        dtype=np.float32,
    )
    assert max_relative_residual(kernel, result.values, result.vectors) < 1e-5


def test_memmap_kernel_is_streamed_in_panels(tmp_path, monkeypatch):
    monkeypatch.setattr(ntklab.eigen._pairs, "PANEL_BYTES", 16 * 100 * 4)
    kernel = psd_matrix(100, seed=4, dtype=np.float32, spectrum=clustered_spectrum(100))
    path = tmp_path / "kernel.npy"
    np.save(path, kernel)
    mapped = np.load(path, mmap_mode="r")
    pairs = top_eigenpairs(mapped, 25, solver="chebyshev")
    values, vectors = reference(kernel, 25)
    np.testing.assert_allclose(pairs.values, values[:25], rtol=0, atol=2e-6 * values[0])
    assert_projectors_match(pairs.vectors, values, vectors, atol=2e-3)
    assert pairs.max_residual < 5e-6
    unverified = top_eigenpairs(mapped, 25, solver="chebyshev", verify=False)
    np.testing.assert_allclose(unverified.residuals, pairs.residuals, rtol=0.5, atol=2e-7)
    assert unverified.passes == pairs.passes - 1


def test_iteration_cap_warns_and_reports_the_true_residual(caplog):
    kernel = psd_matrix(200, seed=8, spectrum=power_law_spectrum(200))
    pairs = top_eigenpairs(kernel, 50, solver="chebyshev", num_iterations=2, oversampling=2)
    assert "Chebyshev subspace iteration stopped after num_iterations=2" in caplog.text
    assert pairs.max_residual > 1e-5
    assert pairs.max_residual == pytest.approx(
        max_relative_residual(kernel, pairs.values, pairs.vectors)
    )


def test_float16_kernel_and_the_smallest_block():
    kernel = psd_matrix(50, seed=5).astype(np.float16)
    pairs = top_eigenpairs(kernel, 5, solver="chebyshev", oversampling=0)  # clamped to 1
    values, _ = reference(kernel, 5)
    np.testing.assert_allclose(pairs.values, values[:5], rtol=0, atol=1e-5 * values[0])
    assert pairs.max_residual < 1e-5
    with pytest.raises(ValueError, match="degree must be a positive integer"):
        solve(
            lambda v: v,
            10,
            2,
            block=4,
            num_iterations=1,
            tol=1e-3,
            degree=0,
        )
