"""The shared operator: K·V equals the brute-force kernel times V, every output mode and
implementation, on 1 and on 4 forced CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntklab.models import build_model, inference_apply_fn, init_variables
from ntklab.ntk import KernelOperator

SHAPE = (4, 4, 1)
NUM_OUTPUTS = 3


def model(name: str = "mlp"):
    kwargs = {"mlp": {"widths": (6, 5)}, "lenet": {}}[name]
    shape = SHAPE if name == "mlp" else (8, 8, 1)
    net = build_model(name, num_outputs=NUM_OUTPUTS, **kwargs)
    variables = init_variables(net, jax.random.PRNGKey(0), shape)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables["params"])
    return inference_apply_fn(net, variables), params, shape


def dense_operators(apply_fn, params, x) -> dict[str, np.ndarray]:
    """The kernel as a matrix in each output mode's vector layout (row i·C + c)."""

    @jax.jit
    def kernel(params, x):
        tree = jax.jacrev(lambda p: apply_fn(p, x))(params)
        leaves = jax.tree.leaves(tree)
        jac = jnp.concatenate([leaf.reshape(*leaf.shape[:2], -1) for leaf in leaves], 2)
        return jnp.einsum("icp,jdp->ijcd", jac, jac)

    full = np.asarray(kernel(params, x))
    n, c = full.shape[0], full.shape[2]
    diagonal = np.zeros((n * c, n * c))
    for k in range(c):
        diagonal[k::c, k::c] = full[:, :, k, k]
    return {
        "trace": np.einsum("ijcc->ij", full),
        "full": full.transpose(0, 2, 1, 3).reshape(n * c, n * c),
        "diagonal": diagonal,
    }


@pytest.mark.parametrize("implementation", ["jacobian", "structured", "ntk_vector_products"])
@pytest.mark.parametrize("output", ["trace", "full", "diagonal"])
def test_products_equal_the_dense_kernel(output, implementation, float64):
    apply_fn, params, shape = model()
    x = np.random.default_rng(0).standard_normal((7, *shape))
    expected = dense_operators(apply_fn, params, x)[output]
    operator = KernelOperator(
        apply_fn, params, x, output=output, implementation=implementation, batch_size=3, width=2
    )
    assert operator.implementation == implementation
    vectors = np.random.default_rng(1).standard_normal((operator.shape[0], 3))  # 2 passes
    product = operator.matmat(vectors)
    np.testing.assert_allclose(product, expected @ vectors, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(operator.matmat(vectors[:, 0]), expected @ vectors[:, 0], rtol=1e-10)
    assert operator.num_products == 4 and operator.num_passes == 6 and operator.seconds > 0


def test_width_is_capped_by_the_budget(float64):
    apply_fn, params, shape = model()
    x = np.random.default_rng(6).standard_normal((5, *shape))
    expected = dense_operators(apply_fn, params, x)["trace"]
    num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    per_vector = NUM_OUTPUTS * num_params * 8  # W [C·b, P] in float64
    operator = KernelOperator(
        apply_fn, params, x, implementation="jacobian", width=10, memory_bytes=8 * per_vector
    )
    assert operator.width == 4  # half the budget holds 4 vectors' accumulators
    vectors = np.random.default_rng(7).standard_normal((5, 5))
    np.testing.assert_allclose(operator.matmat(vectors), expected @ vectors, rtol=1e-10)
    assert operator.num_passes == 4  # 4 vectors, then 1 padded to 4


@pytest.mark.slow
def test_structured_operator_on_a_cnn_under_a_tiny_budget(float64):
    apply_fn, params, shape = model("lenet")
    x = np.random.default_rng(2).standard_normal((5, *shape))
    expected = dense_operators(apply_fn, params, x)["trace"]
    operator = KernelOperator(
        apply_fn, params, x, implementation="structured", batch_size=2, memory_bytes=200_000
    )
    assert operator.implementation == "structured"
    assert not operator.cached  # features recomputed in every pass
    assert len(operator._plan.param_groups) > 1  # and the unfactored leaves chunked
    vectors = np.random.default_rng(3).standard_normal((5, 4))
    np.testing.assert_allclose(operator.matmat(vectors), expected @ vectors, rtol=1e-10)


def test_bad_arguments_are_rejected():
    apply_fn, params, shape = model()
    x = np.zeros((3, *shape), np.float32)
    with pytest.raises(ValueError, match="unknown output 'sum'; valid choices: trace"):
        KernelOperator(apply_fn, params, x, output="sum")
    with pytest.raises(ValueError, match="unknown implementation 'magic'"):
        KernelOperator(apply_fn, params, x, implementation="magic")
    operator = KernelOperator(apply_fn, params, x)
    with pytest.raises(ValueError, match=r"vectors must be \[3, b\]"):
        operator.matmat(np.zeros((4, 2)))


# The sharded-operator check on 4 devices is operator_four_devices_give_the_dense_product in
# tests/multidevice_checks.py (one shared 4-device subprocess for the whole suite, run by
# tests/test_multidevice.py).
