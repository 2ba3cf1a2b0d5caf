"""Kernel regression on eigenfunction labels against an independent dense solve (numpy)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntklab.kernel_regression
from ntklab.kernel_regression import DEFAULT_RIDGE_RELATIVE, eigenfunction_regression
from ntklab.models import build_model, inference_apply_fn, init_variables
from ntklab.ntk import empirical_ntk


def reference_accuracy(kernel, eigvecs, num_train, ridge):
    """Test accuracy [k] of sign(K_te,tr (K_tr,tr + ridge I)^-1 y_tr), by np.linalg.solve."""
    kernel = np.asarray(kernel, dtype=np.float64)
    labels = np.where(np.asarray(eigvecs, np.float64) >= 0, 1.0, -1.0).T  # [N, k]
    train = kernel[:num_train, :num_train] + ridge * np.eye(num_train)
    coefficients = np.linalg.solve(train, labels[:num_train])
    predictions = kernel[num_train:, :num_train] @ coefficients
    predicted = np.where(predictions >= 0, 1.0, -1.0)
    return np.mean(predicted == labels[num_train:], axis=0)


def random_psd(n, *, seed=0, rank=None):
    """A PSD kernel F Fᵀ of a random feature matrix F [n, rank] (full rank by default)."""
    features = np.random.default_rng(seed).standard_normal((n, rank or 2 * n))
    return features @ features.T / features.shape[1]


def label_sources(kernel, seed=0):
    """Rows [k, N] to label from: the kernel's eigenvectors (descending) and random directions,
    so that the accuracies spread over [0, 1]."""
    _, vectors = np.linalg.eigh(kernel)
    random = np.random.default_rng(seed + 1).standard_normal((10, len(kernel)))
    return np.concatenate([vectors[:, ::-1].T, random])


@pytest.mark.parametrize("ridge", [1e-6, 0.3, 30.0])
def test_matches_a_dense_solve_on_a_random_psd_kernel(ridge, monkeypatch):
    monkeypatch.setattr(ntklab.kernel_regression, "PANEL_BYTES", 7 * 60 * 8)  # 7-row panels
    kernel = random_psd(60, seed=1)
    eigvecs = label_sources(kernel)
    result = eigenfunction_regression(kernel, eigvecs, 45, ridge=ridge)
    expected = reference_accuracy(kernel, eigvecs, 45, ridge)
    np.testing.assert_array_equal(result.test_acc, expected)
    assert result.test_acc.dtype == np.float64 and result.test_acc.shape == (len(eigvecs),)
    np.testing.assert_array_equal(result.label_idx, np.arange(len(eigvecs)))
    assert (result.num_train, result.num_test, result.dtype) == (45, 15, "float64")
    assert result.ridge == ridge
    scale = np.trace(kernel[:45, :45]) / 45
    assert result.ridge_relative == pytest.approx(ridge / scale, rel=1e-12)
    assert len(np.unique(result.test_acc)) > 3  # accuracies spread: the comparison can fail


def test_ridge_matters_and_the_reference_notices():
    # The same labels at a tiny and at a large ridge give different accuracies, so a ridge that
    # the code dropped or misscaled would fail the comparisons above.
    kernel = random_psd(60, seed=1)
    eigvecs = label_sources(kernel)
    small = eigenfunction_regression(kernel, eigvecs, 45, ridge=1e-6).test_acc
    large = eigenfunction_regression(kernel, eigvecs, 45, ridge=30.0).test_acc
    assert np.any(small != large)


def test_default_and_relative_ridge_are_relative_to_the_mean_train_diagonal():
    kernel = random_psd(50, seed=2) * 7.0
    eigvecs = label_sources(kernel)
    scale = np.trace(kernel[:40, :40]) / 40
    default = eigenfunction_regression(kernel, eigvecs, 40)
    assert default.ridge == pytest.approx(DEFAULT_RIDGE_RELATIVE * scale, rel=1e-12)
    assert default.ridge_relative == pytest.approx(DEFAULT_RIDGE_RELATIVE, rel=1e-12)
    relative = eigenfunction_regression(kernel, eigvecs, 40, ridge_relative=0.5)
    assert relative.ridge == pytest.approx(0.5 * scale, rel=1e-12)
    np.testing.assert_array_equal(
        relative.test_acc, reference_accuracy(kernel, eigvecs, 40, 0.5 * scale)
    )


def test_matches_a_dense_solve_on_an_mlp_ntk(float64):
    model = build_model("mlp", widths=(16, 8), activation="gelu")
    variables = init_variables(model, jax.random.PRNGKey(0), (4, 4, 2))
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables["params"])
    x = np.random.default_rng(3).standard_normal((48, 4, 4, 2))
    kernel = np.asarray(empirical_ntk(inference_apply_fn(model, variables), params, x))
    _, vectors = np.linalg.eigh(kernel)
    eigvecs = vectors[:, ::-1].T[:20]  # the top 20 eigenfunctions, as eigvecs.npy holds them
    ridge = 1e-8 * np.trace(kernel[:36, :36]) / 36
    result = eigenfunction_regression(kernel, eigvecs, 36, ridge=ridge, label_idx=range(0, 20, 2))
    expected = reference_accuracy(kernel, eigvecs[::2], 36, ridge)
    np.testing.assert_array_equal(result.test_acc, expected)
    np.testing.assert_array_equal(result.label_idx, np.arange(0, 20, 2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_memmap_equals_in_memory(dtype, tmp_path, monkeypatch):
    monkeypatch.setattr(ntklab.kernel_regression, "PANEL_BYTES", 5 * 70 * 8)  # 5-row panels
    kernel = random_psd(70, seed=4).astype(dtype)
    eigvecs = label_sources(kernel.astype(np.float64))
    path = tmp_path / "kernel.npy"
    np.save(path, kernel)
    mapped = np.load(path, mmap_mode="r")
    assert isinstance(mapped, np.memmap)
    from_disk = eigenfunction_regression(mapped, eigvecs, 52, ridge_relative=1e-4)
    in_memory = eigenfunction_regression(kernel, eigvecs, 52, ridge_relative=1e-4)
    np.testing.assert_array_equal(from_disk.test_acc, in_memory.test_acc)
    assert from_disk.ridge == in_memory.ridge
    expected = reference_accuracy(kernel, eigvecs, 52, in_memory.ridge)
    np.testing.assert_array_equal(from_disk.test_acc, expected)


def test_sign_zero_counts_as_plus_one():
    # K = [[I, Sᵀ], [S, I]] with S selecting train rows 0, 1, 2 for test rows 0, 1, 2 and nothing
    # for test row 3 (PSD since S Sᵀ <= I): a test row's prediction is y_tr[s] / (1 + ridge), or
    # exactly 0 for row 3.
    num_train, num_test = 4, 4
    selector = np.zeros((num_test, num_train))
    selector[[0, 1, 2], [0, 1, 2]] = 1.0
    kernel = np.block([[np.eye(num_train), selector.T], [selector, np.eye(num_test)]])
    phi = np.array(
        [
            # train: 0 (-> +1), -1, +1, 0 | test: 0 (+1, predicted +1: right), -2 (-1, predicted
            # -1: right), -3 (-1, predicted +1: wrong), 0 (+1, prediction 0 -> +1: right)
            [0.0, -1.0, 1.0, 0.0, 0.0, -2.0, -3.0, 0.0],
            # test row 3 labelled -1 while its prediction is 0 (-> +1): wrong; test row 0's
            # train neighbour is 0.0 (+1) while it is -1: wrong
            [0.0, 1.0, 1.0, 1.0, -1.0, 1.0, 1.0, -1.0],
        ]
    )
    result = eigenfunction_regression(kernel, phi, num_train, ridge=0.0)
    np.testing.assert_array_equal(result.test_acc, [0.75, 0.5])
    np.testing.assert_array_equal(result.test_acc, reference_accuracy(kernel, phi, num_train, 0.0))


def test_float32_factor_when_float64_does_not_fit(caplog):
    caplog.set_level(logging.INFO, logger="ntklab.kernel_regression")
    kernel = random_psd(60, seed=5)
    eigvecs = label_sources(kernel)
    result = eigenfunction_regression(kernel, eigvecs, 48, ridge=0.1, memory_bytes=8 * 48**2 - 1)
    assert result.dtype == "float32"
    assert "factoring it in float32" in caplog.text
    np.testing.assert_array_equal(result.test_acc, reference_accuracy(kernel, eigvecs, 48, 0.1))
    assert "kernel regression on 70 eigenfunction labels: N_tr=48, N_te=12" in caplog.text


def test_singular_kernel_without_ridge_is_refused():
    kernel = random_psd(30, seed=6, rank=10)  # rank 10 < N_tr = 20
    eigvecs = label_sources(kernel)
    with pytest.raises(ValueError, match=r"not positive definite .* ridge=0 .*pass a larger ridge"):
        eigenfunction_regression(kernel, eigvecs, 20, ridge=0.0)
    result = eigenfunction_regression(kernel, eigvecs, 20, ridge_relative=1e-3)
    np.testing.assert_array_equal(
        result.test_acc, reference_accuracy(kernel, eigvecs, 20, result.ridge)
    )


def test_bad_inputs_name_the_value():
    kernel = random_psd(20)
    eigvecs = label_sources(kernel)
    with pytest.raises(ValueError, match=r"kernel must be square \[N, N\], got shape \(20, 19\)"):
        eigenfunction_regression(kernel[:, :19], eigvecs, 10)
    with pytest.raises(
        ValueError, match=r"eigvecs must be \[k, N\] .* N=20 .*got shape \(30, 19\)"
    ):
        eigenfunction_regression(kernel, eigvecs[:, :19], 10)
    with pytest.raises(ValueError, match=r"got shape \(20,\)"):
        eigenfunction_regression(kernel, eigvecs[0], 10)
    for bad in (0, 20, -1):
        with pytest.raises(ValueError, match=f"num_train={bad} must be between 1 and N - 1=19"):
            eigenfunction_regression(kernel, eigvecs, bad)
    with pytest.raises(ValueError, match=r"num_train must be an integer, got 10\.5"):
        eigenfunction_regression(kernel, eigvecs, 10.5)
    with pytest.raises(ValueError, match=r"ridge=-0\.1 is invalid: must be a finite number >= 0"):
        eigenfunction_regression(kernel, eigvecs, 10, ridge=-0.1)
    with pytest.raises(ValueError, match="ridge_relative=-1e-05 is invalid"):
        eigenfunction_regression(kernel, eigvecs, 10, ridge_relative=-1e-5)
    with pytest.raises(ValueError, match="ridge=nan is invalid"):
        eigenfunction_regression(kernel, eigvecs, 10, ridge=float("nan"))
    with pytest.raises(ValueError, match=r"give ridge=1\.0 or ridge_relative=0\.1, not both"):
        eigenfunction_regression(kernel, eigvecs, 10, ridge=1.0, ridge_relative=0.1)
    with pytest.raises(ValueError, match="label_idx=30 is out of range: eigvecs has k=30 rows"):
        eigenfunction_regression(kernel, eigvecs, 10, label_idx=[0, 30])
    broken = kernel.copy()
    broken[15, 3] = np.nan
    with pytest.raises(ValueError, match=r"non-finite entries in rows .*first at \[15, 3\]"):
        eigenfunction_regression(broken, eigvecs, 10)
    with pytest.raises(ValueError, match=r"trace\(K_tr,tr\) / N_tr = 0\.0 must be positive"):
        eigenfunction_regression(np.zeros((20, 20)), eigvecs, 10)
