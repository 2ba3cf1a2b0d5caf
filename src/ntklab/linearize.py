"""First-order Taylor expansion of a network in its parameters, computed with ``jax.jvp``.

Dimensions: B examples in a batch, K outputs, P parameters.

    f_lin = linearize(apply_fn, params0)              # f(θ0, x) + J(θ0, x)(θ − θ0)
    f_lin(params0, x)                                 # x [B, H, W, C] -> [B, K], equals apply_fn
    f_lin0 = linearize(apply_fn, params0, with_bias=False)   # J(θ0, x)(θ − θ0) only: 0 at θ0

The Jacobian J(θ0, x) [B·K, P] is never built: one forward-mode product (``jax.jvp`` with the
tangent θ − θ0) gives J(θ0, x)(θ − θ0) at about the cost of a forward pass, and differentiating it
in θ (a VJP through the JVP) costs about three. The linearized model is an ordinary ``ApplyFn``, so
the trainer, the eNTK engine and the alignment take it exactly like the network.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from ntklab.types import ApplyFn, PyTree


def linearize(apply_fn: ApplyFn, params0: PyTree, *, with_bias: bool = True) -> ApplyFn:
    """The network's first-order Taylor model around ``params0``.

    ``f_lin(θ, x) = f(θ0, x) + J(θ0, x)(θ − θ0)`` with ``with_bias``, else ``J(θ0, x)(θ − θ0)``.
    Its eNTK at any θ is the network's eNTK at θ0, and its gradient at θ0 equals the network's.

    The result is a ``jax.tree_util.Partial`` whose leaves are θ0 (and the leaves of ``apply_fn``
    if it is itself a ``Partial``, e.g. another linearization). Passed as an argument to a jitted
    function, θ0 therefore stays an input buffer instead of being baked into the compiled program
    as a constant (which would copy all P parameters into every executable, e.g. 45 MB for
    ResNet-18). Calling it is like calling any ``ApplyFn``.

    Args:
      apply_fn: ``apply_fn(params, x[B, ...]) -> outputs [B, K]``; BatchNorm networks must be in
        inference mode (``ntklab.models.inference_apply_fn``), so each output depends on its own
        input only.
      params0: the expansion point θ0, a pytree like ``params``; it is held, not copied.
      with_bias: keep the zeroth-order term ``f(θ0, x)``; without it the model outputs 0 at θ0.

    Returns:
      ``f_lin(params, x[B, ...]) -> outputs [B, K]``.
    """
    function = _linear_with_bias if with_bias else _linear_without_bias
    return Partial(function, _as_partial(apply_fn), params0)


def _as_partial(apply_fn: ApplyFn) -> Partial:
    """``apply_fn`` as a pytree: a ``Partial`` is kept (its arrays stay leaves), others wrapped."""
    return apply_fn if isinstance(apply_fn, Partial) else Partial(apply_fn)


def _taylor_terms(
    apply_fn: ApplyFn, params0: PyTree, params: PyTree, x: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(f(θ0, x), J(θ0, x)(θ − θ0))``, each [B, K], from one ``jax.jvp``."""
    delta = jax.tree.map(lambda p, p0: p - p0, params, params0)
    # θ0 takes θ's varying type (inside ``shard_map``, where the eNTK engine marks θ as varying
    # over the batch axis): jax.jvp needs primals as varying as their tangents. The added zeros
    # carry no derivative, so the value and every derivative are unchanged.
    primals = jax.tree.map(
        lambda p0, p: p0 + jax.lax.stop_gradient(jnp.zeros_like(p, dtype=p0.dtype)),
        params0,
        params,
    )
    return jax.jvp(lambda theta: apply_fn(theta, x), (primals,), (delta,))


def _linear_with_bias(
    apply_fn: ApplyFn, params0: PyTree, params: PyTree, x: jax.Array
) -> jax.Array:
    out0, tangent = _taylor_terms(apply_fn, params0, params, x)
    return out0 + tangent


def _linear_without_bias(
    apply_fn: ApplyFn, params0: PyTree, params: PyTree, x: jax.Array
) -> jax.Array:
    return _taylor_terms(apply_fn, params0, params, x)[1]
