"""The solver table, float64 solves of float32 kernels, unresolved pairs and the thread scope."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from test_eigen import clustered_spectrum, psd_matrix, reference

import ntklab.eigen._solvers
from ntklab.eigen import (
    KERNEL_SOLVERS,
    MATRIX_FREE_SOLVERS,
    SOLVER_TABLE,
    SOLVERS,
    Eigenpairs,
    matrix_free_eigenpairs,
    nystrom_eigenpairs,
    resolution_summary,
    resolve_solver,
    top_eigenpairs,
    unresolved_pairs,
)


def test_the_table_names_every_solver_once():
    assert SOLVERS == (
        "auto", "dense", "evr", "evd", "chebyshev", "subspace", "lanczos", "matrix_free",
        "nystrom",
    )  # fmt: skip
    assert MATRIX_FREE_SOLVERS == ("matrix_free", "nystrom")
    assert KERNEL_SOLVERS == SOLVERS[:7]
    assert set(KERNEL_SOLVERS) | set(MATRIX_FREE_SOLVERS) == set(SOLVERS)
    for name, spec in SOLVER_TABLE.items():
        assert spec.name == name
        assert spec.needs_kernel == (name in KERNEL_SOLVERS)
        assert (spec.flops is not None) == (spec.kind in ("direct", "iterative"))
    assert SOLVER_TABLE["matrix_free"].function is matrix_free_eigenpairs
    assert SOLVER_TABLE["nystrom"].function is nystrom_eigenpairs


def test_resolve_solver_follows_the_choosers():
    assert resolve_solver("auto", 100, 10) == "evr"
    assert resolve_solver("auto", 100, 60) == "evd"
    assert resolve_solver("dense", 100, 60) == "evd"
    assert resolve_solver("dense", 6102, 1000) == "evr"
    assert resolve_solver("auto", 6102, 1000) == "chebyshev"
    for iterative in ("chebyshev", "subspace", "lanczos"):
        assert resolve_solver(iterative, 100, 10) == iterative
        assert resolve_solver(iterative, 100, 99) == "evd"  # they need k < N - 1
    with pytest.raises(ValueError, match="unknown eigensolver 'qr'; valid choices: auto, dense"):
        resolve_solver("qr", 10, 2)


@pytest.mark.parametrize("solver", MATRIX_FREE_SOLVERS)
def test_top_eigenpairs_refuses_a_matrix_free_solver(solver):
    with pytest.raises(
        ValueError,
        match=f"eigensolver '{solver}' never forms the kernel: call ntklab.eigen.{solver}"
        r"_eigenpairs\(apply_fn, params, x, num_eigvecs, \.\.\.\) instead; top_eigenpairs "
        "takes auto, dense, evr",
    ):
        top_eigenpairs(psd_matrix(10), 2, solver=solver)


@pytest.mark.parametrize("solver", ["evr", "evd", "chebyshev", "subspace", "lanczos"])
def test_float64_solve_of_a_float32_kernel(solver):
    # The float32 kernel's own eigenpairs, by numpy in float64: a float64 solve reaches them to
    # ~1e-12 (residual against the float32 kernel's exact values), a float32 one only to ~1e-6.
    kernel = psd_matrix(90, seed=3, dtype=np.float32, spectrum=clustered_spectrum(90))
    k = 12
    values, _ = reference(kernel, k)
    pairs = top_eigenpairs(kernel, k, solver=solver, dtype="float64", seed=1)
    assert pairs.solver == solver
    np.testing.assert_allclose(pairs.values, values[:k], rtol=0, atol=1e-10 * values[0])
    exact = kernel.astype(np.float64)
    independent = np.linalg.norm(exact @ pairs.vectors - pairs.vectors * pairs.values, axis=0)
    assert independent.max() / values[0] < 2e-10
    np.testing.assert_allclose(pairs.residuals, independent / values[0], rtol=1e-6, atol=1e-15)
    single = top_eigenpairs(kernel, k, solver=solver, seed=1)  # dtype="auto": float32
    assert single.max_residual > 1e-9
    np.testing.assert_allclose(single.values, values[:k], rtol=0, atol=1e-5 * values[0])


def test_float64_products_follow_dtype_unless_given(monkeypatch):
    seen = []
    solve = SOLVER_TABLE["chebyshev"].function

    def recording(problem):
        seen.append((problem.dtype.name, problem.product_dtype.name))
        return solve(problem)

    table = dict(SOLVER_TABLE)
    table["chebyshev"] = table["chebyshev"]._replace(function=recording)
    monkeypatch.setattr(ntklab.eigen._solvers, "SOLVER_TABLE", table)
    kernel = psd_matrix(60, dtype=np.float32)
    top_eigenpairs(kernel, 4, solver="chebyshev")
    top_eigenpairs(kernel, 4, solver="chebyshev", dtype="float64")
    top_eigenpairs(kernel, 4, solver="chebyshev", dtype="float64", product_dtype="float32")
    top_eigenpairs(kernel.astype(np.float16), 4, solver="chebyshev")
    assert seen == [
        ("float32", "float32"),
        ("float64", "float64"),
        ("float64", "float32"),
        ("float32", "float32"),
    ]
    with pytest.raises(ValueError, match="unknown dtype 'half'; valid choices: auto, float32"):
        top_eigenpairs(kernel, 2, dtype="half")


def test_unresolved_pairs_and_summary():
    residuals = np.array([1e-6, 1e-6, 1e-6, 0.0, 1e-6])
    gaps = np.array([0.5, 1e-6, 2e-6, 0.0, 1e-7])
    np.testing.assert_array_equal(unresolved_pairs(residuals, gaps), [0, 1, 0, 1, 1])
    assert resolution_summary(residuals, gaps) == {"num_unresolved": 3, "first_unresolved": 1}
    assert resolution_summary(residuals[:1], gaps[:1]) == {
        "num_unresolved": 0,
        "first_unresolved": None,
    }
    pairs = Eigenpairs(
        values=np.arange(5.0, 0.0, -1.0), vectors=np.eye(5), solver="evr",
        residuals=residuals, gaps=gaps,
    )  # fmt: skip
    np.testing.assert_array_equal(pairs.unresolved, [False, True, False, True, True])
    assert (pairs.num_unresolved, pairs.first_unresolved) == (3, 1)
    assert pairs.summary()["num_unresolved"] == 3 and pairs.summary()["first_unresolved"] == 1
    with pytest.raises(ValueError, match=r"got shapes \(5,\) and \(4,\)"):
        unresolved_pairs(residuals, gaps[:4])
    # margin: gaps up to margin x residual count as unresolved (pair 2: gap = 2 x residual).
    np.testing.assert_array_equal(unresolved_pairs(residuals, gaps, margin=2.0), [0, 1, 1, 1, 1])
    assert resolution_summary(residuals, gaps, margin=1e-3)["num_unresolved"] == 1  # the 0 = 0
    with pytest.raises(ValueError, match="margin=0 is invalid: must be positive"):
        unresolved_pairs(residuals, gaps, margin=0)


def test_an_exact_double_eigenvalue_is_unresolved():
    # Eigenvalues 10, 7, 5, 5, 2, 1, ... (a well separated head, one exact double): only the
    # double's two pairs are unresolved, whichever solver and precision.
    spectrum = np.concatenate([[10.0, 7.0, 5.0, 5.0, 2.0], 1.0 * 0.5 ** np.arange(35)])
    kernel = psd_matrix(40, seed=2, spectrum=spectrum)
    for solver in ("evr", "chebyshev"):
        pairs = top_eigenpairs(kernel, 5, solver=solver, product_dtype="float64")
        np.testing.assert_array_equal(pairs.unresolved, [False, False, True, True, False])
        assert pairs.first_unresolved == 2


def test_one_host_only_scope_per_solve(monkeypatch):
    scopes = []

    @contextlib.contextmanager
    def host_only(flops=None, *, what=""):
        scopes.append((flops, what))
        yield 1

    monkeypatch.setattr(ntklab.eigen._solvers.threads, "host_only", host_only)
    kernel = psd_matrix(50)
    for solver in KERNEL_SOLVERS:
        top_eigenpairs(kernel, 5, solver=solver)
    assert len(scopes) == len(KERNEL_SOLVERS)
    assert all(what == "eigensolver" and flops >= 2 * 50 * 50 * 5 for flops, what in scopes)
