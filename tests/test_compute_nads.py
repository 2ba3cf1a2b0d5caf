"""compute_nads end to end on a tiny MLP, checked against the SVD of the brute-force mixed Jacobian."""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compose_config
from jax.flatten_util import ravel_pytree

from ntklab.experiments import compute_nads
from ntklab.experiments.compute_nads import load_nads

SMALL = [
    "model=mlp",
    "model.widths=[8]",
    "nads.shape=[6,6,1]",
    "nads.batch_size=8",
    "nads.num_plot=4",
]
DIM = 36


def small_config(tmp_path, *extra: str):
    return compose_config("compute_nads", [*SMALL, f"paths.artifacts={tmp_path}", *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("compute_nads")
    return tmp_path, compute_nads.run(small_config(tmp_path))


def test_writes_the_documented_layout(finished_run):
    tmp_path, run_dir = finished_run
    assert run_dir == tmp_path / "nads" / "mlp" / "seed_0"
    names = {p.name for p in run_dir.iterdir()}
    expected = {"nads.npy", "eigvals.npy", "init_params.msgpack", "input.npy", "nads.png"}
    assert expected | {"meta.json", "config.json"} == names  # no temporary leftovers
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["config"]["model"]["activation"] == "gelu"  # the NADs default, not the model's
    assert meta["input_shape"] == [6, 6, 1] and meta["input_dim"] == DIM
    assert meta["num_params"] == DIM * 8 + 8 + 8 + 1
    assert meta["nads"]["max_residual"] < 1e-10
    assert set(meta["timings"]) == {"init_s", "nads_s", "save_s"}
    identity = json.loads((run_dir / "config.json").read_text())
    assert "batch_size" not in identity["nads"] and identity["nads"]["input_std"] == 0.0
    directions = np.load(run_dir / "nads.npy")
    eigvals = np.load(run_dir / "eigvals.npy")
    assert directions.shape == (DIM, DIM) and eigvals.shape == (DIM,)
    assert np.all(np.diff(eigvals) <= 0) and eigvals[-1] > 0
    np.testing.assert_allclose(directions @ directions.T, np.eye(DIM), atol=1e-12)
    np.testing.assert_array_equal(np.load(run_dir / "input.npy"), 0.0)
    assert (run_dir / "nads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_nads_are_the_singular_vectors_of_the_brute_force_mixed_jacobian(finished_run):
    _, run_dir = finished_run
    run = load_nads(run_dir)
    assert run.shape == (6, 6, 1) and run.config.model.widths == [8]
    flat, unravel = ravel_pytree(run.params)

    def scalar(p, y):
        return run.apply_fn(unravel(p), y[None])[0, 0]

    mixed = jax.jit(jax.jacfwd(jax.grad(scalar), argnums=1))(flat, jnp.zeros(run.shape))
    mixed = np.asarray(mixed, np.float64).reshape(flat.size, DIM)
    _, singular, vh = np.linalg.svd(mixed)
    np.testing.assert_allclose(run.eigvals, singular**2, rtol=1e-4, atol=1e-6 * singular[0] ** 2)
    # float32 AᵀA: compare the projectors of groups of directions separated by clear gaps.
    squared = singular**2
    cuts = [0, *(np.flatnonzero(-np.diff(squared) > 1e-3 * squared[0]) + 1), DIM]
    assert len(cuts) > 3
    for start, stop in itertools.pairwise(cuts):
        found = run.directions[start:stop].T @ run.directions[start:stop]
        np.testing.assert_allclose(found, vh[start:stop].T @ vh[start:stop], atol=1e-3)


def test_float64_option_agrees_with_float32(finished_run, tmp_path):
    _, run_dir = finished_run
    other = compute_nads.run(small_config(tmp_path, "nads.dtype=float64"))
    assert not jax.config.jax_enable_x64  # the x64 scope is restored
    eigvals = np.load(other / "eigvals.npy")
    np.testing.assert_allclose(eigvals, np.load(run_dir / "eigvals.npy"), rtol=1e-5)


def test_input_std_draws_a_seeded_point_off_the_origin(tmp_path):
    run_dir = compute_nads.run(small_config(tmp_path, "nads.input_std=0.5", "seed=2"))
    x0 = np.load(run_dir / "input.npy")
    assert x0.shape == (6, 6, 1) and 0.3 < x0.std() < 0.7
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["config"]["nads"]["input_std"] == 0.5 and meta["config"]["seed"] == 2


def test_rerun_with_other_config_is_refused_and_batch_size_is_not_identity(finished_run):
    tmp_path, run_dir = finished_run
    with pytest.raises(
        FileExistsError, match=r"different configuration \(model\.activation: 'gelu' -> 'tanh'\)"
    ):
        compute_nads.run(small_config(tmp_path, "model.activation=tanh"))
    assert (run_dir / "meta.json").exists()  # the refused run touched nothing
    before = np.load(run_dir / "eigvals.npy")
    assert compute_nads.run(small_config(tmp_path, "nads.batch_size=5")) == run_dir
    np.testing.assert_allclose(np.load(run_dir / "eigvals.npy"), before, rtol=1e-5)


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(
        ValueError, match=r"nads\.dtype='float16' is invalid: must be one of: float32"
    ):
        compute_nads.run(small_config(tmp_path, "nads.dtype=float16"))
    with pytest.raises(
        ValueError, match=r"model\.num_outputs=2 is invalid: NADs are defined for one scalar"
    ):
        compute_nads.run(small_config(tmp_path, "model.num_outputs=2"))
    with pytest.raises(
        ValueError, match=r"nads\.shape=\[6, 6\] is invalid: must be a list \[H, W, C\]"
    ):
        compute_nads.run(small_config(tmp_path, "nads.shape=[6,6]"))
    with pytest.raises(
        ValueError, match=r"model\.name='vgg' is invalid: must be one of: lenet, mlp"
    ):
        compute_nads.run(small_config(tmp_path, "model.name=vgg"))
    assert not (tmp_path / "nads").exists()


def test_load_nads_of_a_missing_run_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected nads\.npy.*run compute_nads\.py"):
        load_nads(tmp_path / "nothing")
