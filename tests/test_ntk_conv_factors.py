"""Factored convolutions (``ntklab.ntk._conv_factors``) against brute-force ``jax.jacrev``.

The engine factors a convolution's kernel term as Σ_pq (patch_ip·patch_jq + bias)(δ_icp·δ_jdq)
where that is cheaper; these tests force factoring of every eligible convolution (so each
configuration is exercised, not only the ones the cost rule picks) and check every output mode,
both contraction paths (NumPy on one CPU device, XLA on two), parameter chunking and the rule.
"""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ntk_layerwise import ConvChain  # convolutions in sequence, then a Dense head

from ntklab.models import build_model, inference_apply_fn, init_variables
from ntklab.ntk import _conv_factors, _problem, _schedule, empirical_ntk

OUTPUTS = ("trace", "full", "diagonal")


@pytest.fixture
def factor_everything(monkeypatch):
    """Every eligible convolution is factored and layerwise Jacobians are used for any model."""
    monkeypatch.setattr(_conv_factors, "FACTOR_MAX_RATIO", float("inf"))
    monkeypatch.setattr(_schedule, "LAYERWISE_MIN_CONV_FRACTION", 0.0)


CHAINS = {
    "strided_dilated_padded": (
        {"features": 4, "kernel_size": (3, 3), "strides": 2},
        {"features": 4, "kernel_size": (3, 2), "kernel_dilation": (2, 1)},
        {"features": 4, "kernel_size": (3, 3), "padding": ((2, 0), (1, 2))},
        {"features": 3, "kernel_size": (2, 2), "use_bias": False, "strides": (2, 1)},
    ),
    "circular_reflect_valid_pointwise": (
        {"features": 4, "kernel_size": (3, 3), "padding": "CIRCULAR", "strides": 2},
        {"features": 4, "kernel_size": (2, 2), "padding": "REFLECT"},
        {"features": 5, "kernel_size": (2, 3), "padding": "VALID"},
        {"features": 3, "kernel_size": (1, 1), "use_bias": False},
    ),
}


class Conv1D(nn.Module):
    """1-D convolutions over tokens (one grouped, not factored), then a Dense head."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Conv(4, (3,), strides=2)(x))
        h = jnp.tanh(nn.Conv(4, (2,), feature_group_count=2)(h))
        return nn.Dense(2)(h.reshape(h.shape[0], -1))


class Grouped(nn.Module):
    """A grouped convolution (not factored: one Gram per group would be needed)."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Conv(4, (3, 3))(x))
        h = jnp.tanh(nn.Conv(4, (3, 3), feature_group_count=2)(h))
        return nn.Dense(2)(h.mean(axis=(1, 2)))


def brute_force(apply_fn, params, x) -> np.ndarray:
    """Θ [N, N, C, C] from the full Jacobian of all outputs by ``jax.jacrev`` (one jitted program:
    op-by-op it compiles every primitive on its own, several times slower)."""

    @jax.jit
    def kernel(params, x):
        out = apply_fn(params, x)
        jac = jax.jacrev(lambda p: apply_fn(p, x))(params)
        flat = jnp.concatenate(
            [leaf.reshape(x.shape[0], out.shape[1], -1) for leaf in jax.tree.leaves(jac)], axis=2
        )
        return jnp.einsum("icp,jdp->ijcd", flat, flat)

    return np.asarray(kernel(params, x))


def reduce(full: np.ndarray, output: str) -> np.ndarray:
    return {"full": full, "diagonal": np.einsum("ijcc->ijc", full),
            "trace": np.einsum("ijcc->ij", full)}[output]  # fmt: skip


def network(module: nn.Module, x: jax.Array):
    params = jax.jit(module.init)(jax.random.PRNGKey(0), x[:1])["params"]  # jitted: one compile
    params = jax.tree.map(lambda a: a.astype(x.dtype), params)
    return (lambda p, xs: module.apply({"params": p}, xs)), params


def factored_count(caplog) -> int:
    """Number of factored convolutions of the last plan, from the engine's log."""
    lines = [r.getMessage() for r in caplog.records if "convolution(s):" in r.getMessage()]
    if not lines:
        return 0
    return int(lines[-1].split("factored ")[1].split(" ")[0])


def assert_kernel(kernel, expected, rtol):
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(kernel), expected, rtol=rtol, atol=rtol * scale)


# Each chain in one output mode: the patch extraction is shared by all modes, and every mode's
# block formula is checked on its own below (and trace again on the ResNet).
CHAIN_OUTPUTS = {"strided_dilated_padded": "full", "circular_reflect_valid_pointwise": "diagonal"}


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_factored_convolutions_equal_jacrev(chain, factor_everything, float64, caplog):
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 9, 8, 3), jnp.float64)
    apply_fn, params = network(ConvChain(CHAINS[chain], num_outputs=3), x)
    output = CHAIN_OUTPUTS[chain]
    with caplog.at_level(logging.INFO, logger="ntklab"):
        kernel = empirical_ntk(
            apply_fn, params, x, output=output, implementation="structured", batch_size=2
        )
    assert factored_count(caplog) == len(CHAINS[chain])
    assert_kernel(kernel, reduce(brute_force(apply_fn, params, x), output), 1e-10)


# The XLA-contraction (conv_block) check on 2 devices is
# conv_factors_two_devices_contract_factors_with_xla in tests/multidevice_checks.py (one shared
# 4-device subprocess for the whole suite, run by tests/test_multidevice.py).


def test_resnet_float32_matches_to_rounding(factor_everything, caplog):
    model = build_model("resnet18", stage_sizes=(1,), width=4)
    variables = init_variables(model, jax.random.PRNGKey(0), (8, 8, 3))
    apply_fn, params = inference_apply_fn(model, variables), variables["params"]
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 8, 8, 3))
    with caplog.at_level(logging.INFO, logger="ntklab"):
        kernel = empirical_ntk(apply_fn, params, x, implementation="structured", batch_size=3)
    assert factored_count(caplog) == 3  # the stem and the block's two convolutions
    assert_kernel(kernel, reduce(brute_force(apply_fn, params, x), "trace"), 2e-5)


def test_one_dimensional_and_chunked_parameters(factor_everything, float64, caplog):
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 9, 2), jnp.float64)
    apply_fn, params = network(Conv1D(), x)
    expected = brute_force(apply_fn, params, x)
    with caplog.at_level(logging.INFO, logger="ntklab"):
        kernel = empirical_ntk(apply_fn, params, x, output="full", implementation="structured",
                               batch_size=3, param_chunk_size=4)  # fmt: skip
    assert factored_count(caplog) == 1
    assert "1 parameter chunk(s)" not in caplog.text
    assert_kernel(kernel, expected, 1e-10)


def test_grouped_convolution_is_not_factored_and_exact(factor_everything, float64, caplog):
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 6, 2), jnp.float64)
    apply_fn, params = network(Grouped(), x)
    with caplog.at_level(logging.INFO, logger="ntklab"):
        kernel = empirical_ntk(apply_fn, params, x, implementation="structured", batch_size=2)
    assert factored_count(caplog) == 1  # the grouped one stays a Jacobian
    assert_kernel(kernel, reduce(brute_force(apply_fn, params, x), "trace"), 1e-10)


def test_cost_rule_factors_only_small_outputs(monkeypatch, float64):
    """The default rule: 3x3 convolutions with 64 channels on 2x2 outputs are cheaper factored
    (S² (F + d_out + 1) = 2,564 vs F·d_out = 36,864 multiply-adds per pair), on 16x16 not."""
    monkeypatch.setattr(_schedule, "LAYERWISE_MIN_CONV_FRACTION", 0.0)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = jnp.tanh(nn.Conv(64, (3, 3), name="wide")(x))  # 16x16 outputs
            h = jnp.tanh(nn.Conv(64, (3, 3), strides=8, name="small")(h))  # 2x2 outputs
            return nn.Dense(1)(h.reshape(h.shape[0], -1))

    x = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 16, 64), jnp.float64)
    apply_fn, params = network(Net(), x)
    problem = _problem.make_problem(
        apply_fn, params, x, x, symmetric=True, output="trace", precision="float32",
        projection_dim=None, projection="rademacher", projection_seed=0, devices=(jax.devices()[0],),
    )  # fmt: skip
    plan = _schedule.choose_plan(
        problem, "auto", batch_size=3, memory_bytes=None, param_chunk_size=None
    )
    assert [conv.name for conv in plan.convs] == ["small"]
    assert plan.implementation == "structured"
    kernel = empirical_ntk(apply_fn, params, x, batch_size=2)
    assert_kernel(kernel, reduce(brute_force(apply_fn, params, x), "trace"), 1e-10)
    jacobian = _schedule.choose_plan(
        problem, "jacobian", batch_size=3, memory_bytes=None, param_chunk_size=None
    )
    assert jacobian.convs == ()  # "jacobian" never factors


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("bias", [False, True])
def test_block_formulas_in_row_chunks(output, bias, monkeypatch, float64):
    """Both block functions against Σ_p patch_p ⊗ δ_p contracted directly, with the rows split
    into chunks (a tiny intermediate limit)."""
    monkeypatch.setattr(_conv_factors, "MAX_INTERMEDIATE_ELEMENTS", 50)
    rng = np.random.default_rng(0)
    b1, b2, c, s, f, e = 5, 3, 2, 4, 6, 3
    pr, pc = rng.standard_normal((b1, s, f)), rng.standard_normal((b2, s, f))
    sr, sc = rng.standard_normal((b1, c, s, e)), rng.standard_normal((b2, c, s, e))

    def jacobian(p, d):  # [B, C, F·E (+ E)]
        kernel = np.einsum("bpf,bcpe->bcfe", p, d).reshape(p.shape[0], c, -1)
        return np.concatenate([kernel, d.sum(axis=2)], axis=2) if bias else kernel

    full = np.einsum("icf,jdf->ijcd", jacobian(pr, sr), jacobian(pc, sc))
    expected = reduce(full, output)
    got = _conv_factors.conv_block(
        jnp.asarray(pr), jnp.asarray(pc), jnp.asarray(sr), jnp.asarray(sc), bias, output,
        lambda a, b, spec: jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST),
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12, atol=1e-12)
    if output != "diagonal":
        host = _conv_factors.host_conv_block(pr, pc, sr, sc, bias, output)
        np.testing.assert_allclose(host, expected, rtol=1e-12, atol=1e-12)
