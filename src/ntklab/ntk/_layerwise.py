"""Per-example Jacobians of Dense/Conv/BatchNorm networks from one batched backward pass.

Dimensions: B examples per block, C outputs, P_leaf parameters of one leaf, H/W spatial sizes,
d_in/d_out a layer's input/output channels, K kernel offsets (kh·kw).

    plan = layerwise_plan(apply_fn, treedef, leaves, x.shape[1:])   # once per model, not traced
    feats = layerwise_features(apply_fn, treedef, leaves, group, x, C, plan=plan)
    # x [B, ...] -> one per-example Jacobian [B, C, P_leaf] per leaf of ``group``

``jax.vmap(jax.jacrev(f))`` over all parameters makes XLA run every layer's weight gradient once
per example (a convolution's becomes a grouped convolution over the examples, slow on CPUs).
Here, as in ``vmap(jacrev)``, every example is its own batch of one (so the result is the
Jacobian of ``apply_fn(params, x_i[None])[0]`` whatever the model does across a batch), but the
backward pass is taken only with respect to a zero perturbation added to the output of every
covered layer: it yields each layer's per-example output sensitivities δ [B, C, ...] and needs
only input gradients. Each covered layer's per-example weight gradient is then formed from its
recorded input and δ: a convolution's as one batched matrix product of its input patches with δ
(Σ_p patch_p ⊗ δ_p), a Dense or BatchNorm layer's by the layer's own VJP vmapped over examples
and outputs (a_i ⊗ δ_i; Σ_p x̂_p δ_p and Σ_p δ_p).

Exactness is proven per layer before a layer is covered (:func:`layerwise_plan`):

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
  that layer's own VJP is vmapped (exact, slower).

Leaves not covered are differentiated by ``jax.jacrev`` in the same pass (exact for any model).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding
from jax.extend import core as jex_core

from ntklab.types import ApplyFn

logger = logging.getLogger(__name__)

_KINDS: dict[type, str] = {nn.Dense: "dense", nn.Conv: "conv", nn.BatchNorm: "batch_norm"}
_PROBE_RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


@dataclasses.dataclass(frozen=True, eq=False)
class Layer:
    """One covered layer call.

    Attributes:
      path: the module's path (as seen by method interceptors).
      kind: ``"dense"``, ``"conv"`` or ``"batch_norm"``.
      params: (parameter name, leaf index) per parameter of the module.
      in_shape: per-example input shape, with the leading batch axis of one.
      out_shape: per-example output shape, with the leading batch axis of one.
      out_dtype: the output's dtype.
      module: an unbound clone of the module (same attributes), for its own VJP.
      kwargs: the call's static keyword arguments (and extra positional ones, by name).
      patches: whether the convolution's weight gradient uses the verified patch formula.
    """

    path: tuple[str, ...]
    kind: str
    params: tuple[tuple[str, int], ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    out_dtype: Any
    module: nn.Module
    kwargs: tuple[tuple[str, Any], ...]
    patches: bool = False

    @property
    def name(self) -> str:
        return "/".join(self.path) or "<root>"

    @property
    def leaf_indices(self) -> tuple[int, ...]:
        return tuple(index for _, index in self.params)


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


# ---------------------------------------------------------------------------------- planning


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
    calls: dict[tuple, list] = collections.defaultdict(list)
    refused: dict[str, str] = {}

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
                    "out": jax.ShapeDtypeStruct(out.shape, out.dtype)
                    if isinstance(out, jax.Array)
                    else None,
                    "in": jax.ShapeDtypeStruct(args[0].shape, args[0].dtype)
                    if args and isinstance(args[0], jax.Array)
                    else None,
                }
            )
            return out

        with nn.intercept_methods(interceptor):
            return apply_fn(jax.tree.unflatten(treedef, traced), x)

    dtype = leaves[0].dtype if leaves else jnp.float32
    shapes = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves]
    example = jax.ShapeDtypeStruct((1, *example_shape), dtype)
    try:
        jax.eval_shape(probe, shapes, example)
    except Exception as error:  # a model we cannot trace this way falls back to jacrev
        logger.info("eNTK layerwise: no layer covered (tracing failed: %s)", error)
        return LayerwisePlan((), ())

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
        module = call["module"]
        layer = Layer(
            path=path,
            kind=call["kind"],
            params=call["params"],
            in_shape=tuple(call["in"].shape),
            out_shape=tuple(call["out"].shape),
            out_dtype=call["out"].dtype,
            module=module.clone(parent=None),
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

    if layers:
        problems = _other_uses(apply_fn, treedef, shapes, example, layers)
        for layer in layers:
            if layer.path in problems:
                refused[layer.name] = problems[layer.path]
        layers = [layer for layer in layers if layer.path not in problems]
    layers = [_with_patches(layer, leaves, dtype) for layer in layers]
    plan = LayerwisePlan(tuple(layers), tuple(sorted(refused.items())))
    return plan


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


def _apply_layer(layer: Layer, params: dict, others: dict, x: jax.Array) -> jax.Array:
    """The layer's own computation on ``x`` with the given parameters (a clone of the module)."""
    return layer.module.apply({"params": params, **others}, x, **dict(layer.kwargs))


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
                return _apply_layer(layer, params, variables, args[0])
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


# ------------------------------------------------------------------------- convolution patches


def conv_config(module: nn.Conv, in_shape: tuple[int, ...]) -> dict | None:
    """The patch formula's view of an ``nn.Conv``, or None for configurations it does not do."""
    if (
        not module.shared_weights
        or module.mask is not None
        or module.conv_general_dilated is not None
        or module.conv_general_dilated_cls is not None
        or (module.dtype is not None and module.dtype != module.param_dtype)
    ):
        return None
    kernel_size = (
        (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
    )
    spatial = len(kernel_size)

    def broadcast(value: Any) -> tuple[int, ...]:
        value = 1 if value is None else value
        return (value,) * spatial if isinstance(value, int) else tuple(value)

    strides, input_dilation, dilation = map(
        broadcast, (module.strides, module.input_dilation, module.kernel_dilation)
    )
    if any(d != 1 for d in input_dilation) or len(in_shape) != spatial + 2:
        return None
    padding = canonicalize_padding(module.padding, spatial)
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation, strict=True)]
    mode = "constant"
    if padding in ("CIRCULAR", "REFLECT"):
        mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
        pads = [((k - 1) // 2, k // 2) for k in dilated]
    elif isinstance(padding, str):
        if padding not in ("SAME", "VALID", "SAME_LOWER"):
            return None  # e.g. CAUSAL
        pads = jax.lax.padtype_to_pads(in_shape[1:-1], dilated, strides, padding)
    else:
        pads = [tuple(p) for p in padding]
    return {
        "kernel_size": kernel_size,
        "strides": strides,
        "dilation": dilation,
        "pads": [tuple(int(v) for v in p) for p in pads],
        "mode": mode,
        "groups": module.feature_group_count,
    }


def conv_patches(config: dict, a: jax.Array) -> jax.Array:
    """Channel-major input patches of a convolution.

    Args:
      config: from :func:`conv_config`.
      a: layer inputs [B, 1, *spatial_in, d_in].

    Returns:
      [B, K, groups, d_in / groups, positions] (K kernel offsets, positions = prod(spatial_out)):
      patch_p of example b is ``patches[b, :, :, :, p]``, ordered like the kernel's
      [*kernel_size, d_in / groups] axes.
    """
    b, d_in, groups = a.shape[0], a.shape[-1], config["groups"]
    spatial_in = a.shape[2:-1]
    a = jnp.moveaxis(a[:, 0], -1, 1)  # [B, d_in, *spatial_in]
    pads = [(0, 0), (0, 0), *config["pads"]]
    if any(p != (0, 0) for p in pads):
        if config["mode"] == "constant":
            a = jax.lax.pad(a, jnp.zeros((), a.dtype), [(lo, hi, 0) for lo, hi in pads])
        else:
            a = jnp.pad(a, pads, mode=config["mode"])
    spatial_out = conv_output_spatial(config, spatial_in)
    slices = []
    for offset in itertools.product(*(range(k) for k in config["kernel_size"])):
        start = [0, 0] + [o * d for o, d in zip(offset, config["dilation"], strict=True)]
        limit = [b, d_in] + [
            s + (n - 1) * st + 1
            for s, n, st in zip(start[2:], spatial_out, config["strides"], strict=True)
        ]  # fmt: skip
        slices.append(jax.lax.slice(a, start, limit, [1, 1, *config["strides"]]))
    positions = math.prod(spatial_out)
    return jnp.stack(slices, axis=1).reshape(b, len(slices), groups, -1, positions)


def conv_output_spatial(config: dict, spatial_in: tuple[int, ...]) -> tuple[int, ...]:
    """The convolution's output spatial shape for inputs of spatial shape ``spatial_in``."""
    out = []
    for size, (lo, hi), k, d, st in zip(
        spatial_in, config["pads"], config["kernel_size"], config["dilation"], config["strides"],
        strict=True,
    ):  # fmt: skip
        out.append((size + lo + hi - ((k - 1) * d + 1)) // st + 1)
    return tuple(out)


def _conv_patch_grads(
    config: dict, a: jax.Array, delta: jax.Array, use_bias: bool
) -> dict[str, jax.Array]:
    """Per-example conv weight gradients Σ_p patch_p ⊗ δ_p.

    Args:
      config: from :func:`conv_config`.
      a: layer inputs [B, 1, *spatial_in, d_in].
      delta: output sensitivities [B, C, 1, *spatial_out, d_out].
      use_bias: also return the bias gradient Σ_p δ_p.

    Returns:
      ``{"kernel": [B, C, *kernel_size, d_in / groups, d_out], "bias": [B, C, d_out]}``.
    """
    b, c = delta.shape[:2]
    d_in, d_out, groups = a.shape[-1], delta.shape[-1], config["groups"]
    # Channel-major patches [B, K, g, d_in / g, positions], so each example's product is a plain
    # [K·d_in, positions] x [positions, d_out] GEMM writing the kernel layout directly.
    patches = conv_patches(config, a)
    positions = patches.shape[-1]
    delta = delta.reshape(b, c, positions, groups, d_out // groups)
    kernel = jnp.einsum(
        "bkgip,bcpgo->bckigo", patches, delta, precision=jax.lax.Precision.HIGHEST
    ).reshape(b, c, *config["kernel_size"], d_in // groups, d_out)
    grads = {"kernel": kernel}
    if use_bias:
        grads["bias"] = delta.sum(axis=2).reshape(b, c, d_out)
    return grads


def _with_patches(layer: Layer, leaves: list, dtype: Any) -> Layer:
    """The layer, marked to use the patch formula if it applies and matches on a probe."""
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
    if not _probe_matches(patched, leaves, in_shape, dtype):
        logger.warning(
            "eNTK layerwise: the patch formula of %s did not match its own VJP on a probe; "
            "using the layer's VJP",
            layer.name,
        )
        return layer
    return patched


_PROBES: dict[tuple, bool] = {}


def _probe_matches(layer: Layer, leaves: list, in_shape: tuple, dtype: Any) -> bool:
    """Whether the patch formula equals the layer's own VJP on random inputs and sensitivities.

    The probe is the layer's own module (kernel size, strides, dilation, padding, feature groups,
    bias and spatial input shape as called) narrowed to two input and two output channels per
    feature group, so it compiles quickly; cached per configuration.
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

    @jax.jit
    def both(params: dict, a: jax.Array, delta: jax.Array) -> tuple[dict, dict]:
        reference = _weight_grads(dataclasses.replace(probe, patches=False), params, {}, a, delta)
        return _weight_grads(probe, params, {}, a, delta), reference

    matches = True
    try:
        # A compiled executable runs now even while a caller is being traced.
        mine, reference = both.lower(params, a, delta).compile()(params, a, delta)
    except Exception as error:  # e.g. the narrowed probe is not a valid configuration
        logger.info("eNTK layerwise: probe of %s failed (%s)", layer.name, error)
        mine, reference, matches = {}, {}, False
    rtol = _PROBE_RTOL.get(np.dtype(dtype), 1e-3)
    for name in mine:
        got, want = np.asarray(mine[name]), np.asarray(reference[name])
        scale = max(float(np.max(np.abs(want))), 1e-30)
        if got.shape != want.shape or float(np.max(np.abs(got - want))) > rtol * scale:
            matches = False
    _PROBES[key] = matches
    return matches


# ------------------------------------------------------------------------------------ features


def _own_vjp_grads(
    layer: Layer, params: dict, others: dict, a: jax.Array, delta: jax.Array
) -> dict[str, jax.Array]:
    """Per-example parameter gradients by the layer's own VJP, vmapped over examples and outputs.

    Args:
      a: layer inputs [B, 1, ...]; delta: sensitivities [B, C, 1, ...].

    Returns:
      per parameter name its gradients [B, C, *param_shape].
    """

    def one(example: jax.Array, cotangent: jax.Array) -> dict:
        _, pullback = jax.vjp(lambda p: _apply_layer(layer, p, others, example), params)
        return pullback(cotangent)[0]

    return jax.vmap(jax.vmap(one, in_axes=(None, 0)))(a, delta)


def _weight_grads(
    layer: Layer, params: dict, others: dict, a: jax.Array, delta: jax.Array
) -> dict[str, jax.Array]:
    if layer.patches:
        config = conv_config(layer.module, tuple(a.shape[1:]))
        grads = _conv_patch_grads(config, a, delta, "bias" in params)
        return {name: grads[name].astype(params[name].dtype) for name in params}
    return _own_vjp_grads(layer, params, others, a, delta)


def layerwise_features(
    apply_fn: ApplyFn,
    treedef: Any,
    leaves: list[jax.Array],
    group: tuple[int, ...],
    x: jax.Array,
    num_outputs: int,
    *,
    plan: LayerwisePlan,
    axis_name: str | None = None,
) -> tuple[jax.Array, ...]:
    """Per-example Jacobians of the outputs wrt the leaves ``group``: one [B, C, P_leaf] each
    (see :func:`layerwise_parts`, of which this is the part without factored layers)."""
    jacobians, _ = layerwise_parts(
        apply_fn, treedef, leaves, group, x, num_outputs, plan=plan, axis_name=axis_name
    )
    return jacobians


def layerwise_parts(
    apply_fn: ApplyFn,
    treedef: Any,
    leaves: list[jax.Array],
    group: tuple[int, ...],
    x: jax.Array,
    num_outputs: int,
    *,
    plan: LayerwisePlan,
    axis_name: str | None = None,
    factored: tuple[tuple[str, ...], ...] = (),
) -> tuple[tuple[jax.Array, ...], tuple[tuple[jax.Array, jax.Array], ...]]:
    """Per-example Jacobians of the outputs wrt the leaves ``group``: one [B, C, P_leaf] each,
    and per covered layer path in ``factored`` its inputs and sensitivities instead of a Jacobian.

    Same contract as ``vmap(jacrev)`` per leaf (jit- and ``shard_map``-compatible): leaves of
    covered layers come from one backward pass to the layer outputs plus per-layer formulas,
    the others from ``jax.jacrev`` in the same pass.

    Args:
      apply_fn: ``apply_fn(params, x[B, ...]) -> [B, C]``.
      treedef: the parameters' tree structure; ``leaves`` its leaves.
      group: indices of the leaves whose Jacobians are returned, in that order.
      x: a block of examples [B, ...].
      num_outputs: C.
      plan: from :func:`layerwise_plan` for the same model and example shape.
      axis_name: inside ``shard_map``, the batch axis: the replicated leaves are marked
        varying (``jax.lax.pcast``) so derivatives are not summed over devices.
      factored: paths of covered layers (e.g. Dense layers proven factorable elsewhere) whose
        per-example inputs and output sensitivities are returned instead of their Jacobians;
        their leaves must not be in ``group``.

    Returns:
      ``(jacobians, factors)``: one [B, C, P_leaf] array per leaf of ``group``, and per path of
      ``factored`` the pair (inputs [B, *in_shape], sensitivities [B, C, *out_shape]) with the
      layer's per-example shapes (leading axis of one) as recorded in the plan.

    Raises:
      RuntimeError: if a planned layer is not met while tracing (the plan is for another model),
        or a path of ``factored`` is not a covered layer.
    """
    group = tuple(group)
    members = set(group)
    by_factored = {path: k for k, path in enumerate(factored)}
    if set(by_factored) - {layer.path for layer in plan.layers}:
        raise RuntimeError("layerwise plan: a factored layer is not a covered layer")
    active = [
        layer
        for layer in plan.layers
        if members & set(layer.leaf_indices) or layer.path in by_factored
    ]
    covered = {i for layer in active for i in layer.leaf_indices}
    rest = [i for i in group if i not in covered]
    by_path = {layer.path: k for k, layer in enumerate(active)}

    def vary(value: jax.Array) -> jax.Array:
        return value if axis_name is None else jax.lax.pcast(value, axis_name, to="varying")

    def outputs(rest_leaves: list, perturbations: list, example: jax.Array):
        merged = list(leaves)
        for position, index in enumerate(rest):
            merged[index] = rest_leaves[position]
        inputs: dict[int, jax.Array] = {}

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            k = by_path.get(module.path) if context.method_name == "__call__" else None
            if k is None or type(module) is not type(active[k].module):
                return next_fun(*args, **kwargs)
            params = module.variables.get("params", {})
            if any(params.get(name) is not merged[i] for name, i in active[k].params):
                raise RuntimeError(f"layerwise plan does not match layer {active[k].name}")
            others.setdefault(k, {c: v for c, v in module.variables.items() if c != "params"})
            inputs[k] = args[0]
            return next_fun(*args, **kwargs) + perturbations[k]

        with nn.intercept_methods(interceptor):
            out = apply_fn(jax.tree.unflatten(treedef, merged), example[None])[0]
        if len(inputs) != len(active):
            missing = [layer.name for k, layer in enumerate(active) if k not in inputs]
            raise RuntimeError(f"layerwise plan: layer(s) {', '.join(missing)} not called")
        return out, [inputs[k] for k in range(len(active))]

    others: dict[int, dict] = {}
    rest_leaves = [vary(leaves[i]) for i in rest]
    perturbations = [vary(jnp.zeros(layer.out_shape, layer.out_dtype)) for layer in active]
    jacobian = jax.jacrev(outputs, argnums=(0, 1), has_aux=True)
    (rest_jacobians, deltas), inputs = jax.vmap(jacobian, in_axes=(None, None, 0))(
        rest_leaves, perturbations, x
    )
    b = x.shape[0]
    features = {
        i: jac.reshape(b, num_outputs, -1) for i, jac in zip(rest, rest_jacobians, strict=True)
    }
    factors: list = [None] * len(factored)
    for k, layer in enumerate(active):
        if layer.path in by_factored:
            factors[by_factored[layer.path]] = (inputs[k], deltas[k])
            continue
        params = {name: vary(leaves[i]) for name, i in layer.params}
        grads = _weight_grads(layer, params, others.get(k, {}), inputs[k], deltas[k])
        for name, i in layer.params:
            if i in members:
                features[i] = grads[name].reshape(b, num_outputs, -1)
    return tuple(features[i] for i in group), tuple(factors)
