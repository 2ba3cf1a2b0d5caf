"""Planning layerwise Jacobians: which layer calls are covered, each proven exact before use.

Dimensions: B examples, C outputs, d_in/d_out a layer's input/output channels.

    plan = layerwise_plan(apply_fn, treedef, leaves, x.shape[1:])   # once per model, not traced
    plan.layers       # the covered calls (Layer), in call order
    plan.refused      # (module name, reason) per Dense/Conv/BatchNorm-like call not covered

A layer call is covered only when all of these hold (the proof the execution in ``_layerwise``
relies on):

- its type is exactly ``nn.Dense``, ``nn.Conv`` or ``nn.BatchNorm`` (a subclass may reimplement
  ``__call__``; ``remat``/``scan`` wrappers are subclasses), called once per example, with every
  parameter a leaf of ``params`` (matched by identity) and no other array argument; a BatchNorm
  only with running averages (``use_running_average=True``);
- its leaves reach the outputs only through that call: the JVP of ``apply_fn`` in which every
  covered call's parameters are replaced by ``stop_gradient`` copies (the same module, cloned) is
  traced, and no output tangent may depend on the tangent of a covered leaf (data flow through
  the traced program, conservative through control flow);
- a convolution's patch formula is used only for configurations it implements (shared weights,
  no mask, no input dilation, no custom conv function, any strides, kernel dilation, padding
  mode and feature groups) and after it matched the layer's own VJP on a random probe; otherwise
  that layer's own VJP is vmapped (exact, slower). The host formula of the kernel gradient
  (``_conv_geometry.host_conv_grads``) is checked on the same probe (``Layer.host``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from ntklab.ntk._conv_geometry import conv_config, host_conv_grads, host_conv_inputs
from ntklab.ntk._layer_grads import Layer, apply_layer, weight_grads
from ntklab.types import ApplyFn

logger = logging.getLogger(__name__)

_KINDS: dict[type, str] = {nn.Dense: "dense", nn.Conv: "conv", nn.BatchNorm: "batch_norm"}
_PROBE_RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


@dataclasses.dataclass(frozen=True, eq=False)
class LayerwisePlan:
    """Which layer calls of a model are covered, and why the others are not.

    Attributes:
      layers: the covered layer calls, in call order.
      refused: (module name, reason) per Dense/Conv/BatchNorm-like call not covered.
    """

    layers: tuple[Layer, ...]
    refused: tuple[tuple[str, str], ...]

    @property
    def covered(self) -> frozenset[int]:
        """Leaf indices whose Jacobians come from the layerwise formulas."""
        return frozenset(i for layer in self.layers for i in layer.leaf_indices)


_PLANS: collections.OrderedDict[tuple, LayerwisePlan] = collections.OrderedDict()
_PLANS_MAX = 16


def layerwise_plan(
    apply_fn: ApplyFn, treedef: Any, leaves: list[jax.Array], example_shape: tuple[int, ...]
) -> LayerwisePlan:
    """Finds the layer calls whose per-example Jacobians can be formed layerwise, exactly.

    Uses only the shapes of ``leaves`` (it traces ``apply_fn`` abstractly on one example and
    evaluates small concrete probes), so it may also run while a caller is being traced; cached
    per (apply_fn, tree structure, leaf shapes, example shape) and logged once.

    Args:
      apply_fn: ``apply_fn(params, x[B, ...]) -> [B, C]``.
      treedef: the parameters' tree structure.
      leaves: its leaves (arrays or ``jax.ShapeDtypeStruct``).
      example_shape: the shape of one example, without the batch axis.

    Returns:
      The plan; ``plan.layers`` is empty when nothing qualifies.
    """
    avals = tuple((tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves)
    key = (apply_fn, treedef, avals, tuple(example_shape))
    try:
        if key in _PLANS:
            _PLANS.move_to_end(key)
            return _PLANS[key]
    except TypeError:  # an unhashable apply_fn: no caching
        key = None
    plan = _plan(apply_fn, treedef, leaves, tuple(example_shape))
    log_plan(plan, len(leaves))
    if key is not None:
        _PLANS[key] = plan
        while len(_PLANS) > _PLANS_MAX:
            _PLANS.popitem(last=False)
    return plan


def log_plan(plan: LayerwisePlan, num_leaves: int) -> None:
    """Logs which layers are covered and which are not, and why."""
    logger.info(
        "eNTK layerwise: %d layer call(s) covered (%d of %d leaves), %d refused",
        len(plan.layers),
        len(plan.covered),
        num_leaves,
        len(plan.refused),
    )
    for name, reason in plan.refused:
        logger.info("eNTK layerwise: not covered %s: %s", name, reason)


def _static(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _plan(apply_fn, treedef, leaves, example_shape) -> LayerwisePlan:
    refused: dict[str, str] = {}
    dtype = leaves[0].dtype if leaves else jnp.float32
    shapes = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves]
    example = jax.ShapeDtypeStruct((1, *example_shape), dtype)
    try:
        calls = _record_calls(apply_fn, treedef, shapes, example, refused)
    except Exception as error:  # a model we cannot trace this way falls back to jacrev
        logger.info("eNTK layerwise: no layer covered (tracing failed: %s)", error)
        return LayerwisePlan((), ())
    layers = _single_calls(calls, refused)
    if layers:
        problems = _other_uses(apply_fn, treedef, shapes, example, layers)
        for layer in layers:
            if layer.path in problems:
                refused[layer.name] = problems[layer.path]
        layers = [layer for layer in layers if layer.path not in problems]
    layers = [_with_patches(layer, leaves, dtype) for layer in layers]
    return LayerwisePlan(tuple(layers), tuple(sorted(refused.items())))


def _record_calls(apply_fn, treedef, shapes, example, refused: dict) -> dict[tuple, list]:
    """Per module path the calls of exact Dense/Conv/BatchNorm modules (traced abstractly);
    subclasses are entered in ``refused``."""
    calls: dict[tuple, list] = collections.defaultdict(list)

    def probe(traced: list[jax.Array], x: jax.Array) -> jax.Array:
        def index_of(value: Any) -> int | None:
            return next((i for i, leaf in enumerate(traced) if leaf is value), None)

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            name = "/".join(module.path) or type(module).__name__
            kind = _KINDS.get(type(module))
            if kind is None:
                base = next((k for k in _KINDS if isinstance(module, k)), None)
                if base is not None:
                    refused[name] = f"{type(module).__name__} is a subclass of {base.__name__}"
                return next_fun(*args, **kwargs)
            out = next_fun(*args, **kwargs)
            params = dict(module.variables.get("params", {}))
            calls[module.path].append(
                {
                    "kind": kind,
                    "module": module,
                    "params": tuple((n, index_of(v)) for n, v in sorted(params.items())),
                    "args": args,
                    "kwargs": kwargs,
                    "out": _struct(out),
                    "in": _struct(args[0]) if args else None,
                }
            )
            return out

        with nn.intercept_methods(interceptor):
            return apply_fn(jax.tree.unflatten(treedef, traced), x)

    jax.eval_shape(probe, shapes, example)
    return calls


def _struct(value: Any) -> jax.ShapeDtypeStruct | None:
    return jax.ShapeDtypeStruct(value.shape, value.dtype) if isinstance(value, jax.Array) else None


def _single_calls(calls: dict[tuple, list], refused: dict) -> list[Layer]:
    """The recorded calls that may be covered: called once, a plain call, no shared leaf."""
    candidates: list[Layer] = []
    claimed: collections.Counter[int] = collections.Counter()
    for path, found in calls.items():
        name = "/".join(path) or "<root>"
        if len(found) != 1:
            refused[name] = f"called {len(found)} times"
            continue
        call = found[0]
        problem, kwargs = _call_problem(call)
        if problem is not None:
            refused[name] = problem
            continue
        layer = Layer(
            path=path,
            kind=call["kind"],
            params=call["params"],
            in_shape=tuple(call["in"].shape),
            out_shape=tuple(call["out"].shape),
            out_dtype=call["out"].dtype,
            module=call["module"].clone(parent=None),
            kwargs=kwargs,
        )
        candidates.append(layer)
        claimed.update(layer.leaf_indices)
    shared = {i for i, count in claimed.items() if count > 1}
    layers = []
    for layer in candidates:
        if shared & set(layer.leaf_indices):
            refused[layer.name] = "shares a parameter leaf with another layer"
        else:
            layers.append(layer)
    return layers


def _call_problem(call: dict) -> tuple[str | None, tuple]:
    """Why a single call of an exact Dense/Conv/BatchNorm cannot be covered (None if it can)."""
    args, kwargs = call["args"], call["kwargs"]
    if call["in"] is None or call["out"] is None:
        return "input or output is not an array", ()
    if not jnp.issubdtype(call["out"].dtype, jnp.floating):
        return "output is not floating point", ()
    if not call["params"]:
        return "has no parameters", ()
    if any(index is None for _, index in call["params"]):
        return "a parameter is not a leaf of params", ()
    extra = dict(kwargs)
    if call["kind"] == "batch_norm" and len(args) > 1:
        extra["use_running_average"] = args[1]
        args = args[:2]
    if len(args) > 1 or not all(_static(v) for v in extra.values()):
        return "called with extra array arguments", ()
    if call["kind"] == "batch_norm":
        module = call["module"]
        running = extra.get("use_running_average")
        running = module.use_running_average if running is None else running
        if running is not True:
            return "BatchNorm normalizes with batch statistics (use_running_average=False)", ()
    return None, tuple(sorted(extra.items()))


def _other_uses(apply_fn, treedef, shapes, example, layers) -> dict[tuple, str]:
    """Layers whose leaves influence the outputs other than through their own call."""
    by_path = {layer.path: layer for layer in layers}
    candidate = [i for layer in layers for i in layer.leaf_indices]
    position = {index: k for k, index in enumerate(candidate)}

    def cut(traced: list[jax.Array], x: jax.Array) -> jax.Array:
        inside = []

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            layer = by_path.get(module.path) if context.method_name == "__call__" else None
            if inside or layer is None or type(module) is not type(layer.module):
                return next_fun(*args, **kwargs)
            variables = dict(module.variables)
            params = jax.tree.map(jax.lax.stop_gradient, dict(variables.pop("params")))
            inside.append(True)
            try:
                return apply_layer(layer, params, variables, args[0])
            finally:
                inside.pop()

        with nn.intercept_methods(interceptor):
            return apply_fn(jax.tree.unflatten(treedef, traced), x)

    def tangent_outputs(primals: list, x: jax.Array, tangents: list) -> Any:
        full = [
            tangents[position[i]] if i in position else jnp.zeros(s.shape, s.dtype)
            for i, s in enumerate(primals)
        ]
        return jax.jvp(lambda p: cut(p, x), (primals,), (full,))[1]

    tangent_shapes = [shapes[i] for i in candidate]
    try:
        closed = jax.make_jaxpr(tangent_outputs)(shapes, example, tangent_shapes)
    except Exception as error:
        reason = f"cannot trace the model with the layer cut out ({type(error).__name__})"
        return {layer.path: reason for layer in layers}
    jaxpr = closed.jaxpr
    first = len(jaxpr.invars) - len(candidate)
    sources = {var: 1 << k for k, var in enumerate(jaxpr.invars[first:])}
    reached = 0
    for mask in _dependencies(jaxpr, sources):
        reached |= mask
    problems = {}
    for layer in layers:
        if any(reached >> position[i] & 1 for i in layer.leaf_indices):
            problems[layer.path] = "a parameter is also used outside the layer's own call"
    return problems


_CALL_JAXPRS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _dependencies(jaxpr: Any, sources: dict) -> list[int]:
    """Per outvar of ``jaxpr`` the bitmask of ``sources`` it depends on (data flow).

    Sub-jaxprs of call-like primitives with one-to-one operands are followed; any other
    primitive makes each output depend on all of its inputs (conservative).
    """
    env = dict(sources)

    def mask_of(var: Any) -> int:
        return 0 if isinstance(var, jex_core.Literal) else env.get(var, 0)

    for eqn in jaxpr.eqns:
        masks = [mask_of(v) for v in eqn.invars]
        union = 0
        for mask in masks:
            union |= mask
        if not union:
            continue
        inner = next((eqn.params[k] for k in _CALL_JAXPRS if k in eqn.params), None)
        inner = getattr(inner, "jaxpr", inner)
        if (
            inner is not None
            and hasattr(inner, "eqns")
            and len(inner.invars) == len(eqn.invars)
            and len(inner.outvars) == len(eqn.outvars)
        ):
            inner_sources = {v: m for v, m in zip(inner.invars, masks, strict=True) if m}
            for var, mask in zip(eqn.outvars, _dependencies(inner, inner_sources), strict=True):
                env[var] = mask
            continue
        for var in eqn.outvars:
            env[var] = union
    return [mask_of(v) for v in jaxpr.outvars]


def _with_patches(layer: Layer, leaves: list, dtype: Any) -> Layer:
    """The layer, marked to use the patch formula (and the host formula) where it applies and
    matches the layer's own VJP on a probe."""
    if layer.kind != "conv":
        return layer
    names = {name for name, _ in layer.params}
    if not names <= {"kernel", "bias"} or "kernel" not in names:
        return layer
    in_shape = layer.in_shape
    config = conv_config(layer.module, in_shape)
    if config is None:
        return layer
    patched = dataclasses.replace(layer, patches=True)
    patches, host = _probe_matches(patched, leaves, in_shape, dtype)
    if not patches:
        logger.warning(
            "eNTK layerwise: the patch formula of %s did not match its own VJP on a probe; "
            "using the layer's VJP",
            layer.name,
        )
        return layer
    return dataclasses.replace(patched, host=host)


_PROBES: dict[tuple, tuple[bool, bool]] = {}


def _probe_matches(layer: Layer, leaves: list, in_shape: tuple, dtype: Any) -> tuple[bool, bool]:
    """Whether the patch formula, and the host formula, equal the layer's own VJP on random
    inputs and sensitivities.

    The probe is the layer's own module (kernel size, strides, dilation, padding, feature groups,
    bias and spatial input shape as called) narrowed to two input and two output channels per
    feature group, so it compiles quickly; cached per configuration.

    Returns:
      (patch formula matches, host formula matches).
    """
    groups = layer.module.feature_group_count
    module = layer.module.clone(features=2 * groups)
    names = dict(layer.params)
    kernel_dtype = leaves[names["kernel"]].dtype
    probe_in = (*in_shape[:-1], 2 * groups)
    probe = dataclasses.replace(
        layer, module=module, in_shape=probe_in, out_shape=(*layer.out_shape[:-1], 2 * groups)
    )
    key = (repr(module), probe_in, str(layer.out_dtype), str(dtype), str(kernel_dtype))
    key += (tuple(sorted(names)),)
    if key in _PROBES:
        return _PROBES[key]
    kernel_size = leaves[names["kernel"]].shape[:-2]
    shapes = {"kernel": (*kernel_size, 2, 2 * groups), "bias": (2 * groups,)}
    rng = np.random.default_rng(0)  # numpy draws: no compilation per shape

    def draw(shape: tuple, array_dtype: Any) -> np.ndarray:  # numpy: concrete even when traced
        return np.asarray(rng.standard_normal(shape), np.dtype(array_dtype))

    params = {name: draw(shapes[name], leaves[i].dtype) for name, i in layer.params}
    a = draw((2, *probe_in), dtype)
    delta = draw((2, 2, *probe.out_shape), layer.out_dtype)

    config = conv_config(module, probe_in)

    @jax.jit
    def both(params: dict, a: jax.Array, delta: jax.Array) -> tuple[dict, dict, jax.Array]:
        reference = weight_grads(dataclasses.replace(probe, patches=False), params, {}, a, delta)
        return weight_grads(probe, params, {}, a, delta), reference, host_conv_inputs(config, a)

    try:
        # A compiled executable runs now even while a caller is being traced.
        mine, reference, padded = both.lower(params, a, delta).compile()(params, a, delta)
        host = {"kernel": host_conv_grads(config, np.asarray(padded), delta)}
    except Exception as error:  # e.g. the narrowed probe is not a valid configuration
        logger.info("eNTK layerwise: probe of %s failed (%s)", layer.name, error)
        _PROBES[key] = (False, False)
        return _PROBES[key]
    rtol = _PROBE_RTOL.get(np.dtype(dtype), 1e-3)
    _PROBES[key] = (_close(mine, reference, rtol), _close(host, reference, rtol))
    return _PROBES[key]


def _close(got: dict, want: dict, rtol: float) -> bool:
    """Whether every array of ``got`` matches ``want``'s to ``rtol`` of its largest entry."""
    for name in got:
        mine, reference = np.asarray(got[name]), np.asarray(want[name])
        scale = max(float(np.max(np.abs(reference))), 1e-30)
        if mine.shape != reference.shape or np.max(np.abs(mine - reference)) > rtol * scale:
            return False
    return True
