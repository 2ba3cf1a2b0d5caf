"""Which Dense layers may be factored, proven from the traced program of the whole ``apply_fn``.

Dimensions: d_in/d_out a layer's input/output width, C outputs.

    layers, report = find_dense_layers(apply_fn, treedef, leaves, example_shape)
    # layers: DenseLayer per factored layer; report: (layer name, reason) per refused one

A layer is factored (its per-example Jacobian is a ⊗ δ, its kernel (a_i·a_j + 1)(δ_i·δ_j)) only
when all of these hold, so ``implementation="structured"`` is exact for any model:

- its type is exactly ``flax.linen.Dense`` (a subclass may reimplement ``__call__``; ``remat``
  and ``scan`` wrappers are subclasses too);
- it is called exactly once per example, on an input of shape [1, d_in] (not on tokens);
- its kernel is a leaf of ``params`` and, in the jaxpr of the whole ``apply_fn``, reaches exactly
  one primitive, a ``dot_general`` contracting the input's last axis with the kernel's first
  (through dtype casts, reshapes and nested jit calls only): a tied or transposed use elsewhere
  (``h @ W.T``), a mask or any other use refuses it;
- its bias, if any, is a leaf reaching exactly one ``add``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any

import flax.linen as nn
import jax
from jax.extend import core as jex_core

from ntklab.types import ApplyFn

logger = logging.getLogger(__name__)

# Primitives through which a value passes unchanged (up to dtype and shape bookkeeping).
_TRANSPARENT = frozenset(
    {"convert_element_type", "reshape", "broadcast_in_dim", "copy", "copy_p", "squeeze",
     "expand_dims"}
)  # fmt: skip
# Call-like primitives whose sub-jaxpr receives the operands one to one.
_CALLS = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}


@dataclasses.dataclass(frozen=True)
class DenseLayer:
    """A ``flax.linen.Dense`` proven factorable: one call on [1, d_in], kernel used once."""

    path: tuple[str, ...]  # the module's path, as seen by method interceptors
    kernel: int  # leaf index of the kernel [d_in, d_out]
    bias: int | None  # leaf index of the bias [d_out]
    d_in: int
    d_out: int

    @property
    def leaf_indices(self) -> tuple[int, ...]:
        return (self.kernel,) if self.bias is None else (self.kernel, self.bias)

    @property
    def num_params(self) -> int:
        return self.d_in * self.d_out + (0 if self.bias is None else self.d_out)

    @property
    def name(self) -> str:
        return "/".join(self.path) or "<root>"


def _terminal_uses(jaxpr: Any, tracked: set) -> tuple[list, set]:
    """Eqns (primitive name, eqn, operand position) consuming the tracked vars of ``jaxpr``,
    following transparent primitives and call sub-jaxprs; plus tracked outvars' positions."""
    tracked = set(tracked)
    uses: list[tuple[str, Any, int]] = []
    for eqn in jaxpr.eqns:
        positions = [
            i
            for i, v in enumerate(eqn.invars)
            if not isinstance(v, jex_core.Literal) and v in tracked
        ]
        if not positions:
            continue
        name = eqn.primitive.name
        if name in _TRANSPARENT and len(eqn.invars) == 1:
            tracked.update(eqn.outvars)
            continue
        inner_key = _CALLS.get(name)
        inner = eqn.params.get(inner_key) if inner_key else None
        if inner is not None:
            inner_jaxpr = getattr(inner, "jaxpr", inner)
            if len(inner_jaxpr.invars) == len(eqn.invars):
                inner_uses, outs = _terminal_uses(
                    inner_jaxpr, {inner_jaxpr.invars[i] for i in positions}
                )
                uses += inner_uses
                tracked.update(eqn.outvars[i] for i in outs)
                continue
        uses += [(name, eqn, i) for i in positions]
    outs = {
        i
        for i, v in enumerate(jaxpr.outvars)
        if not isinstance(v, jex_core.Literal) and v in tracked
    }
    return uses, outs


def _kernel_use_problem(jaxpr: Any, var: Any, d_in: int) -> str | None:
    uses, outs = _terminal_uses(jaxpr, {var})
    if outs:
        uses += [("output", None, 0)] * len(outs)
    names = sorted(name for name, _, _ in uses)
    if len(uses) != 1 or names[0] != "dot_general":
        return f"kernel reaches {', '.join(names) or 'nothing'} (must be exactly one dot_general)"
    _, eqn, position = uses[0]
    (contract_lhs, contract_rhs), (batch_lhs, batch_rhs) = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval
    if (
        position != 1
        or tuple(contract_rhs) != (0,)
        or tuple(contract_lhs) != (lhs.ndim - 1,)
        or batch_lhs
        or batch_rhs
        or lhs.ndim != 2
        or lhs.shape[1] != d_in
    ):
        return "kernel's dot_general is not input [1, d_in] @ kernel [d_in, d_out]"
    return None


def _bias_use_problem(jaxpr: Any, var: Any) -> str | None:
    uses, outs = _terminal_uses(jaxpr, {var})
    names = sorted(name for name, _, _ in uses) + ["output"] * len(outs)
    if names != ["add"]:
        return f"bias reaches {', '.join(names) or 'nothing'} (must be exactly one add)"
    return None


_CACHE: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()


def find_dense_layers(
    apply_fn: ApplyFn, treedef: Any, leaves: list[jax.Array], example_shape: tuple
) -> tuple[tuple[DenseLayer, ...], tuple[tuple[str, str], ...]]:
    """Dense layers of ``apply_fn`` proven factorable, and (name, reason) for refused ones.

    Args:
      apply_fn: ``apply_fn(params, x[B, ...]) -> [B, C]``.
      treedef: the parameters' tree structure; ``leaves`` its leaves (arrays or shapes).
      example_shape: the shape of one example, without the batch axis.

    Returns:
      ``(layers, refused)``: the factorable layers in call order, and per Dense-like module that
      was not factored its name and the reason.
    """
    avals = tuple((tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves)
    key = (apply_fn, treedef, avals, tuple(example_shape))
    try:
        if key in _CACHE:
            return _CACHE[key]
    except TypeError:  # an unhashable apply_fn: no caching
        key = None
    result = _find(apply_fn, treedef, leaves, example_shape)
    if key is not None:
        _CACHE[key] = result
        while len(_CACHE) > 16:
            _CACHE.popitem(last=False)
    return result


def _find(apply_fn, treedef, leaves, example_shape):
    calls: dict[tuple, list] = collections.defaultdict(list)
    refused: dict[str, str] = {}

    def probe(traced: list[jax.Array], x: jax.Array) -> jax.Array:
        def index_of(value: Any) -> int | None:
            return next((i for i, leaf in enumerate(traced) if leaf is value), None)

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name == "__call__":
                name = "/".join(module.path) or type(module).__name__
                if type(module) is nn.Dense:
                    params = module.variables.get("params", {})
                    calls[module.path].append(
                        (
                            index_of(params.get("kernel")),
                            index_of(params.get("bias")),
                            "bias" in params,
                            tuple(args[0].shape) if args else (),
                        )
                    )
                elif isinstance(module, nn.Dense):
                    refused[name] = f"{type(module).__name__} is a subclass of nn.Dense"
                elif isinstance(module, (nn.DenseGeneral, nn.Einsum)):
                    refused[name] = f"{type(module).__name__} is not nn.Dense"
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            return apply_fn(jax.tree.unflatten(treedef, traced), x)

    dtype = leaves[0].dtype if leaves else jax.numpy.float32
    shapes = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves]
    example = jax.ShapeDtypeStruct((1, *example_shape), dtype)
    try:
        closed = jax.make_jaxpr(probe)(shapes, example)
    except Exception as error:  # a model we cannot trace this way is contracted unfactored
        logger.info("eNTK structure: no layer factored (tracing failed: %s)", error)
        return (), ()
    jaxpr = closed.jaxpr
    invars = jaxpr.invars[: len(leaves)]
    layers: list[DenseLayer] = []
    for path, found in calls.items():
        name = "/".join(path) or "<root>"
        if len(found) != 1:
            refused[name] = f"called {len(found)} times"
            continue
        kernel, bias, has_bias, input_shape = found[0]
        if kernel is None or (has_bias and bias is None):
            refused[name] = "its kernel or bias is not a leaf of params"
            continue
        if len(input_shape) != 2 or input_shape[0] != 1:
            refused[name] = f"per-example input shape {input_shape[1:]} is not [d_in]"
            continue
        if len(leaves[kernel].shape) != 2:
            refused[name] = f"kernel shape {tuple(leaves[kernel].shape)} is not [d_in, d_out]"
            continue
        d_in, d_out = leaves[kernel].shape
        problem = _kernel_use_problem(jaxpr, invars[kernel], d_in)
        if problem is None and bias is not None:
            problem = _bias_use_problem(jaxpr, invars[bias])
        if problem is not None:
            refused[name] = problem
            continue
        layers.append(DenseLayer(path=path, kernel=kernel, bias=bias, d_in=d_in, d_out=d_out))
    used = [i for layer in layers for i in layer.leaf_indices]
    if len(used) != len(set(used)):  # two modules sharing one leaf: refuse them all
        for layer in layers:
            refused[layer.name] = "shares a parameter leaf with another layer"
        layers = []
    return tuple(layers), tuple(sorted(refused.items()))


def log_structure(layers: tuple[DenseLayer, ...], refused: tuple[tuple[str, str], ...]) -> None:
    """Logs which layers are factored and which are not, and why."""
    if layers:
        logger.info(
            "eNTK structure: factored %d Dense layer(s): %s",
            len(layers),
            ", ".join(f"{layer.name} ({layer.d_in}->{layer.d_out})" for layer in layers),
        )
    else:
        logger.info("eNTK structure: no layer qualifies for factoring")
    for name, reason in refused:
        logger.info("eNTK structure: not factored %s: %s", name, reason)
