"""Eigenpairs (LAPACK, subspace iteration, Lanczos, matrix-free, Nyström) against numpy.linalg.eigh."""

from __future__ import annotations

import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntklab.eigen._stored
from ntklab.eigen import (
    METHODS,
    choose_solver,
    matrix_free_eigenpairs,
    max_relative_residual,
    nystrom_eigenpairs,
    pair_residuals,
    relative_gaps,
    top_eigenpairs,
)
from ntklab.models import build_model, inference_apply_fn, init_variables
from ntklab.ntk import empirical_ntk


def psd_matrix(n: int, *, seed: int = 0, dtype=np.float64, spectrum=None) -> np.ndarray:
    """A PSD kernel Q diag(spectrum) Qᵀ; default: decaying 100·0.8^j, well-separated top values."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    if spectrum is None:
        spectrum = 100.0 * 0.8 ** np.arange(n)
    return ((basis * spectrum) @ basis.T).astype(dtype)


def clustered_spectrum(n: int) -> np.ndarray:
    """An NTK-like spectrum: one outlier, clusters of nearly equal values, a power-law tail."""
    tail = 50.0 * (1.0 + np.arange(n - 1)) ** -1.2
    tail[3:6] = tail[3] * (1 - 1e-9 * np.arange(3))  # a 3-fold cluster (gap 1e-9 relative)
    tail[10:12] = tail[10]  # an exactly double eigenvalue
    return np.concatenate([[1e4], tail])


def reference(kernel: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh(np.asarray(kernel, dtype=np.float64))
    return values[::-1], vectors[:, ::-1]


def assert_projectors_match(vectors, reference_values, reference_vectors, *, atol):
    """‖P_j − P_j^ref‖₂ <= atol for every top-j group ending at a clear gap (1e-3 of λ_1)."""
    k = vectors.shape[1]
    gaps = (reference_values[:k] - reference_values[1 : k + 1]) / reference_values[0]
    checked = [j + 1 for j in range(k) if gaps[j] > 1e-3]
    assert checked, "no spectral gap to compare subspaces at"
    for j in checked:
        ours = vectors[:, :j] @ vectors[:, :j].T
        theirs = reference_vectors[:, :j] @ reference_vectors[:, :j].T
        assert np.linalg.norm(ours - theirs, 2) < atol, f"top-{j} subspaces differ"


SOLVER_CASES = [
    ("evr", "auto", 1e-10),
    ("evd", "auto", 1e-10),
    ("lanczos", "auto", 1e-10),
    ("subspace", "float64", 1e-10),
    ("subspace", "float32", 1e-5),
    ("chebyshev", "float64", 1e-10),
    ("chebyshev", "float32", 1e-5),
]


@pytest.mark.parametrize("solver, product_dtype, tol", SOLVER_CASES)
@pytest.mark.parametrize("spectrum", ["decaying", "clustered"])
def test_stored_solvers_match_numpy_eigh(solver, product_dtype, tol, spectrum):
    n, k = 90, 20
    values_in = None if spectrum == "decaying" else clustered_spectrum(n)
    kernel = psd_matrix(n, spectrum=values_in)
    pairs = top_eigenpairs(
        kernel, k, solver=solver, product_dtype=product_dtype, oversampling=10, seed=1
    )
    values, vectors = reference(kernel, k)
    assert pairs.solver == solver
    assert pairs.values.shape == (k,) and pairs.vectors.shape == (n, k)
    np.testing.assert_allclose(pairs.values, values[:k], rtol=0, atol=tol * values[0])
    assert np.all(np.diff(pairs.values) <= 0)
    np.testing.assert_allclose(pairs.vectors.T @ pairs.vectors, np.eye(k), atol=10 * tol)
    assert_projectors_match(pairs.vectors, values, vectors, atol=100 * tol)
    # Residuals of every pair, recomputed here from the explicit float64 kernel.
    independent = np.linalg.norm(kernel @ pairs.vectors - pairs.vectors * pairs.values, axis=0)
    np.testing.assert_allclose(pairs.residuals, independent / values[0], rtol=1e-6, atol=1e-15)
    assert pairs.max_residual < tol
    # Gaps from numpy's eigenvalues (the last pair's gap is two-sided for every solver but ARPACK).
    expected = np.minimum(
        np.concatenate([[np.inf], values[: k - 1] - values[1:k]]), values[:k] - values[1 : k + 1]
    )
    if solver == "lanczos":
        expected[-1] = values[k - 2] - values[k - 1]
    np.testing.assert_allclose(pairs.gaps, expected / values[0], rtol=0, atol=10 * tol)
    peaks = pairs.vectors[np.argmax(np.abs(pairs.vectors), axis=0), np.arange(k)]
    assert np.all(peaks > 0)
    assert pairs.passes >= 1 and (pairs.iterations > 0) == (
        solver in ("subspace", "chebyshev", "lanczos")
    )


def test_clustered_pairs_are_flagged_unresolved():
    kernel = psd_matrix(60, spectrum=clustered_spectrum(60))
    pairs = top_eigenpairs(kernel, 14, solver="subspace", product_dtype="float64")
    unresolved = pairs.gaps <= pairs.residuals + 1e-8
    # The 3-fold near-cluster (indices 4..6) and the exact double (11, 12) are not resolved.
    assert set(np.flatnonzero(unresolved)) == {4, 5, 6, 11, 12}
    assert pairs.summary()["num_unresolved"] == 5


@pytest.mark.parametrize("product_dtype", ["float32", "float64"])
def test_subspace_streams_a_memmap_kernel(product_dtype, tmp_path, monkeypatch):
    # Panels of 16 rows: the kernel file is read panel by panel (7 panels for N = 100).
    monkeypatch.setattr(ntklab.eigen._pairs, "PANEL_BYTES", 16 * 100 * 8)
    dtype = np.float32
    kernel = psd_matrix(100, seed=4, dtype=dtype, spectrum=clustered_spectrum(100))
    path = tmp_path / "kernel.npy"
    np.save(path, kernel)
    mapped = np.load(path, mmap_mode="r")
    assert isinstance(mapped, np.memmap)
    k = 25
    pairs = top_eigenpairs(mapped, k, solver="subspace", product_dtype=product_dtype)
    values, vectors = reference(kernel, k)
    np.testing.assert_allclose(pairs.values, values[:k], rtol=0, atol=2e-6 * values[0])
    # Davis–Kahan: sin∠ <= ‖r‖ / gap = 5e-6 λ_1 / (λ_2 − λ_3) ≈ 2e-3 for this spectrum.
    assert_projectors_match(pairs.vectors, values, vectors, atol=2e-3)
    assert pairs.max_residual < 5e-6
    assert pairs.passes == pairs.iterations + 1  # one product per iteration + the check
    # Residuals measured from the solver's own products agree with the float64 check.
    unverified = top_eigenpairs(
        mapped, k, solver="subspace", product_dtype=product_dtype, verify=False
    )
    np.testing.assert_allclose(unverified.residuals, pairs.residuals, rtol=0.5, atol=2e-7)
    assert unverified.passes == unverified.iterations


@pytest.mark.parametrize("solver", ["evr", "chebyshev", "subspace", "lanczos"])
def test_float16_kernel_is_solved_in_float32(solver):
    kernel = psd_matrix(50, seed=5).astype(np.float16)
    pairs = top_eigenpairs(kernel, 5, solver=solver)
    values, _ = reference(kernel, 5)
    np.testing.assert_allclose(pairs.values, values[:5], rtol=0, atol=1e-5 * values[0])
    assert pairs.max_residual < 1e-5


def test_subspace_iteration_cap_warns_and_reports_the_true_residual(caplog):
    kernel = psd_matrix(80, spectrum=clustered_spectrum(80))
    pairs = top_eigenpairs(kernel, 20, solver="subspace", num_iterations=2, oversampling=2)
    assert "subspace iteration stopped after num_iterations=2" in caplog.text
    assert pairs.max_residual > 1e-4
    assert pairs.max_residual == pytest.approx(
        max_relative_residual(kernel, pairs.values, pairs.vectors)
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_auto_matches_numpy_eigh(dtype):
    kernel = psd_matrix(60, dtype=dtype)
    k = 8
    pairs = top_eigenpairs(kernel, k)
    values, vectors = reference(kernel, k)
    tol = 1e-10 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(pairs.values, values[:k], rtol=tol * 10)
    overlaps = np.abs(np.sum(pairs.vectors * vectors[:, :k], axis=0))
    np.testing.assert_allclose(overlaps, 1.0, atol=tol * 100)
    assert pairs.max_residual < tol * 100
    assert pairs.solver == "evr"


def test_choose_solver_follows_size_memory_and_k():
    gib = 1 << 30
    assert choose_solver(4000, 1000, 4, ram_bytes=24 * gib) == "evr"
    assert choose_solver(6102, 1000, 4, ram_bytes=24 * gib) == "chebyshev"
    assert choose_solver(6102, 4000, 4, ram_bytes=24 * gib) == "evd"
    assert choose_solver(20000, 1000, 4, ram_bytes=24 * gib) == "chebyshev"
    assert choose_solver(60000, 1000, 4, ram_bytes=24 * gib) == "chebyshev"
    assert choose_solver(60000, 40000, 4, ram_bytes=24 * gib) == "chebyshev"  # LAPACK won't fit
    assert choose_solver(4000, 100, 8, ram_bytes=gib // 4) == "chebyshev"  # LAPACK won't fit
    assert choose_solver(5000, 4999, 8, ram_bytes=gib // 4) == "evd"  # iterative needs k < N-1


def test_auto_uses_chebyshev_beyond_dense_max_n(monkeypatch):
    monkeypatch.setattr(ntklab.eigen._stored, "DENSE_MAX_N", 50)
    kernel = psd_matrix(80)
    pairs = top_eigenpairs(kernel, 4, solver="auto")
    assert pairs.solver == "chebyshev"
    assert top_eigenpairs(kernel, 4, solver="dense").solver == "evr"
    assert top_eigenpairs(kernel, 79, solver="auto").solver == "evd"


def test_residuals_and_gaps_detect_wrong_pairs():
    kernel = psd_matrix(20)
    pairs = top_eigenpairs(kernel, 3)
    assert max_relative_residual(kernel, pairs.values * 1.1, pairs.vectors) > 0.05
    assert pairs.max_residual < 1e-12
    np.testing.assert_allclose(
        pair_residuals(kernel, pairs.values, pairs.vectors[:, ::-1])[[0, 2]] > 0.1, True
    )
    np.testing.assert_allclose(relative_gaps(np.array([10.0, 8.0, 7.5]), 7.0), [0.2, 0.05, 0.05])
    np.testing.assert_allclose(relative_gaps(np.array([10.0, 8.0, 7.5])), [0.2, 0.05, 0.05])
    assert relative_gaps(np.array([4.0])).tolist() == [np.inf]


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
    with pytest.raises(ValueError, match="unknown product_dtype 'half'; valid choices: auto"):
        top_eigenpairs(kernel, 2, product_dtype="half")
    with pytest.raises(ValueError, match="oversampling must be a non-negative integer, got -2"):
        top_eigenpairs(kernel, 2, oversampling=-2)
    with pytest.raises(ValueError, match="num_iterations must be a positive integer, got 0"):
        top_eigenpairs(kernel, 2, num_iterations=0)
    with pytest.raises(ValueError, match="tol must be positive"):
        top_eigenpairs(kernel, 2, tol=-1.0)


# Matrix-free and Nyström eigenpairs of a real network's eNTK, against numpy.linalg.eigh of the
# explicit kernel from ntklab.ntk.empirical_ntk (itself tested against brute-force jax.jacrev).

NETWORKS = {  # label -> (registered model, its options, example shape)
    "mlp": ("mlp", {"widths": (16, 8)}, (6, 6, 2)),
    "mlp3": ("mlp", {"widths": (16, 8), "num_outputs": 3}, (6, 6, 2)),  # trace kernel, 3 logits
    "lenet": ("lenet", {}, (8, 8, 3)),
}
NUM_EXAMPLES = 64
NUM_EIGVECS = 6
OVERSAMPLING = 4  # blocks of 10 vectors


@pytest.fixture(scope="module")
def networks():
    """name -> (apply_fn, float32 params, example shape); built once so that compiled operator
    blocks are shared between tests (the apply_fn is a static jit argument)."""
    built = {}
    for name, (model_name, kwargs, shape) in NETWORKS.items():
        model = build_model(model_name, activation="gelu", **kwargs)
        variables = init_variables(model, jax.random.PRNGKey(0), shape)
        built[name] = (inference_apply_fn(model, variables), variables["params"], shape)
    return built


@pytest.fixture(scope="module")
def problems(networks):
    """Returns ``problem(name, n, dtype, duplicates=0)`` -> (apply_fn, params, x, kernel, values,
    vectors): inputs [n, ...] (the last ``duplicates`` repeat earlier rows), the explicit kernel
    [n, n] and its full eigendecomposition by numpy, descending. Results are cached."""
    cache = {}

    def problem(name, n=NUM_EXAMPLES, dtype=np.float64, duplicates=0):
        # JAX's x64 switch is part of the key: without it float64 params silently compute in
        # float32, and a test without the float64 fixture would poison a later one's reference.
        key = (name, n, np.dtype(dtype).name, duplicates, bool(jax.config.jax_enable_x64))
        if key not in cache:
            apply_fn, params, shape = networks[name]
            params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
            x = np.random.default_rng(n).standard_normal((n, *shape)).astype(dtype)
            x[n - duplicates :] = x[:duplicates]
            kernel = empirical_ntk(apply_fn, params, x, batch_size=32).astype(np.float64)
            values, vectors = np.linalg.eigh(kernel)
            cache[key] = (apply_fn, params, x, kernel, values[::-1], vectors[:, ::-1])
        return cache[key]

    return problem


MATRIX_FREE_CASES = [
    ("mlp", "block_krylov", "auto", None),
    ("mlp", "lobpcg", "jacobian", None),
    ("mlp", "lanczos", "auto", None),
    ("mlp", "block_krylov", "ntk_vector_products", None),
    ("mlp", "block_krylov", "jacobian", 400_000),  # parameter chunks recomputed every pass
    ("mlp3", "block_krylov", "structured", None),
    ("lenet", "block_krylov", "auto", None),
]


@pytest.mark.parametrize("name, method, implementation, memory_bytes", MATRIX_FREE_CASES)
def test_matrix_free_matches_dense_eigh(
    name, method, implementation, memory_bytes, problems, float64, caplog
):
    caplog.set_level(logging.INFO, logger="ntklab")
    apply_fn, params, x, kernel, values, vectors = problems(name)
    k = NUM_EIGVECS
    pairs = matrix_free_eigenpairs(
        apply_fn, params, x, k, batch_size=24, method=method, oversampling=OVERSAMPLING,
        implementation=implementation, memory_bytes=memory_bytes,
    )  # fmt: skip
    assert pairs.solver == f"matrix_free:{method}"
    if implementation != "auto":
        assert f"matrix-free eigenpairs ({method}, {implementation})" in caplog.text
    if memory_bytes is not None:
        assert "features recomputed per pass" in caplog.text
    assert pairs.values.shape == (k,) and pairs.vectors.shape == (NUM_EXAMPLES, k)
    np.testing.assert_allclose(pairs.values, values[:k], rtol=1e-6)
    assert np.all(np.diff(pairs.values) <= 0)
    np.testing.assert_allclose(pairs.vectors.T @ pairs.vectors, np.eye(k), atol=1e-10)
    assert_projectors_match(pairs.vectors, values, vectors, atol=1e-6)
    peaks = pairs.vectors[np.argmax(np.abs(pairs.vectors), axis=0), np.arange(k)]
    assert np.all(peaks > 0)
    # Every reported residual is the true one (checked with the explicit kernel) and small.
    dense_residuals = pair_residuals(kernel, pairs.values, pairs.vectors)
    np.testing.assert_allclose(pairs.residuals, dense_residuals, rtol=1e-4, atol=1e-13)
    assert pairs.max_residual < 1e-9


def test_matrix_free_float32_reaches_default_tol(problems):
    apply_fn, params, x, _, _, _ = problems("mlp", dtype=np.float32)
    _, _, _, kernel, values, vectors = problems("mlp")  # float64 reference, same inputs
    pairs = matrix_free_eigenpairs(apply_fn, params, x, NUM_EIGVECS, oversampling=OVERSAMPLING)
    np.testing.assert_allclose(pairs.values, values[:NUM_EIGVECS], rtol=1e-4, atol=1e-5 * values[0])
    assert pairs.max_residual < 1.2e-5
    assert max_relative_residual(kernel, pairs.values, pairs.vectors) < 1e-4
    assert abs(pairs.vectors[:, 0] @ vectors[:, 0]) > 1 - 1e-6  # well separated top vector


@pytest.mark.parametrize(
    "method, message",
    [("block_krylov", "block Krylov stopped after num_iterations=1"), ("lobpcg", "LOBPCG stopped")],
)
def test_iteration_cap_reports_the_true_residual(method, message, problems, float64, caplog):
    apply_fn, params, x, kernel, _, _ = problems("mlp")
    pairs = matrix_free_eigenpairs(
        apply_fn, params, x, NUM_EIGVECS, method=method, oversampling=OVERSAMPLING, num_iterations=1
    )
    assert message in caplog.text
    dense_residual = max_relative_residual(kernel, pairs.values, pairs.vectors)
    np.testing.assert_allclose(pairs.max_residual, dense_residual, rtol=1e-6)
    assert pairs.max_residual > 1e-3


def test_matrix_free_rank_deficient_kernel(problems, float64):
    # 8 repeated examples: K has rank <= 12 < N = 20, so the Krylov basis runs out of new
    # directions before it spans all of R^N and must continue with random ones.
    apply_fn, params, x, _, values, vectors = problems("mlp", n=20, duplicates=8)
    pairs = matrix_free_eigenpairs(apply_fn, params, x, 5, oversampling=10, batch_size=8)
    np.testing.assert_allclose(pairs.values, values[:5], rtol=1e-8)
    assert_projectors_match(pairs.vectors, values, vectors, atol=1e-6)
    np.testing.assert_allclose(pairs.vectors.T @ pairs.vectors, np.eye(5), atol=1e-10)


@pytest.mark.parametrize("method", ["block_krylov", "lobpcg", "lanczos", "subspace"])
def test_solvers_on_an_exactly_degenerate_spectrum(method):
    # Top eigenvalue 5 with multiplicity 3, then a decaying tail: any orthonormal basis of the
    # cluster is correct, so compare the cluster's projector, and a k = 2 request must return
    # two vectors inside the cluster.
    n = 120
    basis, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((n, n)))
    spectrum = np.concatenate([[5.0, 5.0, 5.0], 2.0 * 0.9 ** np.arange(n - 3)])
    kernel = (basis * spectrum) @ basis.T
    cluster = basis[:, :3] @ basis[:, :3].T
    for k in (2, 3, 5):
        result = METHODS[method](
            lambda v: kernel @ v,
            n,
            k,
            block=k + 4,
            num_iterations=200,
            tol=1e-11,
            rng=np.random.default_rng(0),
            report=lambda residual, converged=None: None,
        )
        order = np.argsort(result.values)[::-1]
        values, vectors = result.values[order], result.vectors[:, order]
        np.testing.assert_allclose(values, spectrum[:k], rtol=1e-9)
        top = vectors[:, : min(k, 3)]
        np.testing.assert_allclose(cluster @ top, top, atol=1e-8)
        if k >= 3:
            assert np.linalg.norm(top @ top.T - cluster, 2) < 1e-8


@pytest.mark.parametrize(
    "memory_bytes, columns",
    [(None, "K·E from cached features"), (300_000, "by empirical_ntk")],
)
def test_nystrom_with_all_landmarks_is_exact(memory_bytes, columns, problems, float64, caplog):
    # Repeated examples make K_mm singular, exercising the pseudo-inverse cutoff. A small budget
    # keeps the operator from caching features, so the columns come from empirical_ntk instead.
    caplog.set_level(logging.INFO, logger="ntklab")
    apply_fn, params, x, kernel, values, vectors = problems("mlp", n=40, duplicates=5)
    pairs = nystrom_eigenpairs(
        apply_fn, params, x, NUM_EIGVECS, num_landmarks=40, batch_size=16,
        implementation="jacobian", memory_bytes=memory_bytes,
    )  # fmt: skip
    assert f"(columns {columns})" in caplog.text
    assert pairs.solver == "nystrom"
    dense_residuals = pair_residuals(kernel, pairs.values, pairs.vectors)
    np.testing.assert_allclose(pairs.residuals, dense_residuals, rtol=1e-4, atol=1e-13)
    np.testing.assert_allclose(pairs.values, values[:NUM_EIGVECS], rtol=1e-9)
    assert_projectors_match(pairs.vectors, values, vectors, atol=1e-7)
    np.testing.assert_allclose(pairs.vectors.T @ pairs.vectors, np.eye(NUM_EIGVECS), atol=1e-10)
    assert pairs.max_residual < 1e-9


def test_nystrom_error_shrinks_with_landmarks(problems, float64):
    apply_fn, params, x, kernel, values, _ = problems("mlp")
    errors, residuals = [], []
    for num_landmarks in (8, 32, 64):
        pairs = nystrom_eigenpairs(
            apply_fn, params, x, NUM_EIGVECS, num_landmarks=num_landmarks, seed=1
        )
        # Nyström never overestimates (K̃ <= K), and one seed's landmark sets are nested.
        assert np.all(pairs.values <= values[:NUM_EIGVECS] * (1 + 1e-10))
        errors.append(np.max(values[:NUM_EIGVECS] - pairs.values) / values[0])
        residuals.append(pairs.max_residual)
        # The residual is measured against the true kernel.
        dense_residual = max_relative_residual(kernel, pairs.values, pairs.vectors)
        np.testing.assert_allclose(pairs.max_residual, dense_residual, rtol=1e-6, atol=1e-13)
    assert errors[0] > 1e-2 and residuals[0] > 1e-2  # few landmarks: a visibly rough answer
    assert all(later < earlier for earlier, later in itertools.pairwise(errors))
    assert errors[-1] < 1e-12 and residuals[-1] < 1e-10


def test_matrix_free_bad_arguments(networks):
    apply_fn, params, shape = networks["mlp"]
    x = np.zeros((10, *shape), np.float32)
    with pytest.raises(
        ValueError, match="unknown matrix-free method 'qr'; valid choices: block_krylov, lobpcg"
    ):
        matrix_free_eigenpairs(apply_fn, params, x, 2, method="qr")
    with pytest.raises(ValueError, match="num_eigvecs=11 must be between 1 and N=10"):
        matrix_free_eigenpairs(apply_fn, params, x, 11)
    with pytest.raises(ValueError, match="num_eigvecs=0 must be between"):
        matrix_free_eigenpairs(apply_fn, params, x, 0)
    with pytest.raises(ValueError, match="'lanczos' needs num_eigvecs < N - 1; got num_eigvecs=9"):
        matrix_free_eigenpairs(apply_fn, params, x, 9, method="lanczos")
    for old_name in ("fast", "products"):  # "products" was the old operator's name
        with pytest.raises(
            ValueError,
            match=f"unknown implementation '{old_name}'; valid choices: auto, jacobian, "
            "structured, ntk_vector_products",
        ):
            matrix_free_eigenpairs(apply_fn, params, x, 2, implementation=old_name)
    with pytest.raises(ValueError, match="oversampling must be a non-negative integer, got -1"):
        matrix_free_eigenpairs(apply_fn, params, x, 2, oversampling=-1)
    with pytest.raises(ValueError, match="num_iterations must be a positive integer, got 0"):
        matrix_free_eigenpairs(apply_fn, params, x, 2, num_iterations=0)
    with pytest.raises(ValueError, match=r"tol must be positive, got 0\.0"):
        matrix_free_eigenpairs(apply_fn, params, x, 2, tol=0.0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        matrix_free_eigenpairs(apply_fn, params, x, 2, batch_size=0)


def test_non_finite_examples_are_named(problems, float64):
    apply_fn, params, x, _, _, _ = problems("mlp")
    x = x.copy()
    x[30, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite for examples 24:48"):
        matrix_free_eigenpairs(
            apply_fn, params, x, NUM_EIGVECS, oversampling=OVERSAMPLING, batch_size=24
        )


def test_nystrom_bad_arguments(networks):
    apply_fn, params, shape = networks["mlp"]
    x = np.zeros((10, *shape), np.float32)
    with pytest.raises(
        ValueError, match="num_landmarks=3 must be an integer between num_eigvecs=4"
    ):
        nystrom_eigenpairs(apply_fn, params, x, 4, num_landmarks=3)
    with pytest.raises(ValueError, match=r"num_landmarks=11 must be .* and N=10"):
        nystrom_eigenpairs(apply_fn, params, x, 4, num_landmarks=11)
    with pytest.raises(ValueError, match="num_eigvecs=12 must be between 1 and N=10"):
        nystrom_eigenpairs(apply_fn, params, x, 12, num_landmarks=10)
    # All examples equal: K_mm has rank 1, too low for 2 eigenpairs.
    with pytest.raises(ValueError, match="numerical rank 1 < num_eigvecs=2"):
        nystrom_eigenpairs(apply_fn, params, x + 1.0, 2, num_landmarks=5)
    with pytest.raises(ValueError, match="unknown implementation 'products'; valid choices"):
        nystrom_eigenpairs(apply_fn, params, x, 2, num_landmarks=5, implementation="products")


# The sharded matrix-free check on 4 devices is
# eigen_matrix_free_on_four_devices_equals_one_device in tests/multidevice_checks.py (one shared
# 4-device subprocess for the whole suite, run by tests/test_multidevice.py).
