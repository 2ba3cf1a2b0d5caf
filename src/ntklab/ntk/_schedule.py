"""The schedule: blocks, panels, parameter chunks, devices, the cost model and the work units.

Dimensions: N examples (N1 rows, N2 columns), P parameters, C outputs, B examples per block,
F features per example and output, D devices, G parameter chunks.

    problem = make_problem(apply_fn, params, x1, x2, output="trace", ...)
    plan = make_plan(problem, "structured", batch_size=256, memory_bytes=None, param_chunk_size=None)
    plan.units(), plan.region(unit), plan.cost(problem.forward_flops())

A *unit* is the kernel blocks of a panel's row blocks (as many as the memory budget holds)
against one column block; for ``x2=None`` only blocks on or above the diagonal. Everything here
is decided once, in frozen dataclasses: the engine is never reconfigured after construction.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as Spec

from ntklab.ntk._conv_factors import ConvFactor, conv_factors
from ntklab.ntk._features import AXIS
from ntklab.ntk._layerwise import LayerwisePlan, layerwise_plan
from ntklab.ntk._structure import DenseLayer, find_dense_layers, log_structure
from ntklab.types import ApplyFn, PyTree

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """What is computed, independent of implementation and memory layout."""

    apply_fn: ApplyFn
    treedef: Any
    leaves: tuple[jax.Array, ...]  # replicated on the mesh
    x1: Any
    x2: Any
    symmetric: bool
    output: str
    precision: str
    projection_dim: int | None
    projection: str
    projection_seed: int
    devices: tuple[jax.Device, ...]
    mesh: Mesh
    num_outputs: int
    num_params: int
    param_dtype: np.dtype
    accumulate_dtype: np.dtype

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, Spec(AXIS))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, Spec())

    def kernel_shape(self) -> tuple[int, ...]:
        n1, n2, c = len(self.x1), len(self.x2), self.num_outputs
        return {"trace": (n1, n2), "diagonal": (n1, n2, c), "full": (n1, n2, c, c)}[self.output]

    def dense_layers(self) -> tuple[DenseLayer, ...]:
        """The Dense layers proven factorable (logged with the refused ones and why)."""
        layers, refused = find_dense_layers(
            self.apply_fn, self.treedef, list(self.leaves), tuple(self.x1.shape[1:])
        )
        log_structure(layers, refused)
        return layers

    def layerwise_jacobians(self) -> LayerwisePlan | None:
        """The layerwise Jacobian plan (``_layerwise``) where it is measured to pay: on a CPU, for
        a model whose covered convolutions hold most parameters (their per-example weight
        gradients ``vmap(jacrev)`` runs as slow grouped convolutions; ResNet-18: 1.44x faster
        Jacobians, BENCHMARKS.md). ``None`` elsewhere (GPUs are not measured yet).
        """
        if self.devices[0].platform != "cpu" or os.environ.get("NTKLAB_LAYERWISE") == "0":
            return None
        example_shape = tuple(self.x1.shape[1:])
        if not _has_convolution(self.apply_fn, self.treedef, self.leaves, example_shape):
            return None
        try:
            plan = layerwise_plan(self.apply_fn, self.treedef, list(self.leaves), example_shape)
        except Exception as error:  # an optimization: any model it cannot plan uses vmap(jacrev)
            logger.info("eNTK layerwise: not used (%s: %s)", type(error).__name__, error)
            return None
        conv_leaves = {
            i for layer in plan.layers if layer.kind == "conv" for i in layer.leaf_indices
        }
        conv_params = sum(int(np.prod(self.leaves[i].shape)) for i in conv_leaves)
        # Only where convolutions hold most parameters: on LeNet (2 % in convolutions) layerwise
        # measured 0.89x of vmap(jacrev), on ResNet-18 (99.95 %) 1.44x (BENCHMARKS.md).
        return plan if conv_params >= LAYERWISE_MIN_CONV_FRACTION * self.num_params else None

    def forward_flops(self) -> float:
        """FLOPs of one example's forward pass (XLA's cost analysis; 2·P if unavailable)."""
        avals = tuple((leaf.shape, str(leaf.dtype)) for leaf in self.leaves)
        key = (self.apply_fn, self.treedef, avals, tuple(self.x1.shape[1:]))
        try:
            return _FORWARD_FLOPS[key]
        except TypeError:  # an unhashable apply_fn
            key = None
        except KeyError:
            pass
        params = jax.tree.unflatten(self.treedef, list(self.leaves))
        example = jax.ShapeDtypeStruct((1, *self.x1.shape[1:]), self.param_dtype)
        try:
            cost = jax.jit(self.apply_fn).lower(params, example).cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            flops = max(float(cost["flops"]), 2.0 * self.num_params)
        except Exception:  # cost analysis is best effort; every parameter is used at least once
            flops = 2.0 * self.num_params
        if key is not None:
            if len(_FORWARD_FLOPS) > 32:
                _FORWARD_FLOPS.clear()
            _FORWARD_FLOPS[key] = flops
        return flops

    def put_block(self, x: Any, rows: slice, block: int, *, sharded: bool = True) -> jax.Array:
        """Rows ``x[rows]`` padded to ``block`` examples (repeating the last) on the mesh."""
        part = np.asarray(x[rows], dtype=self.param_dtype)
        missing = block - part.shape[0]
        if missing:
            part = np.pad(part, [(0, missing)] + [(0, 0)] * (part.ndim - 1), mode="edge")
        sharding = self.batch_sharding if sharded else self.replicated
        return jax.make_array_from_callback(part.shape, sharding, lambda index: part[index])


_FORWARD_FLOPS: dict[tuple, float] = {}
LAYERWISE_MIN_CONV_FRACTION = 0.5
"""Layerwise Jacobians only when covered convolutions hold at least this fraction of the
parameters (see :meth:`Problem.layerwise_jacobians`)."""
_CONVOLUTIONS: dict[tuple, bool] = {}


def _has_convolution(apply_fn: ApplyFn, treedef: Any, leaves: tuple, example_shape: tuple) -> bool:
    """Whether ``apply_fn``'s jaxpr on one example has a ``conv_general_dilated`` (cached)."""
    avals = tuple((tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves)
    key = (apply_fn, treedef, avals, example_shape)
    try:
        return _CONVOLUTIONS[key]
    except TypeError:  # an unhashable apply_fn
        key = None
    except KeyError:
        pass
    params = jax.tree.unflatten(
        treedef, [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves]
    )
    dtype = jnp.result_type(*leaves)
    jaxpr = jax.make_jaxpr(apply_fn)(params, jax.ShapeDtypeStruct((1, *example_shape), dtype))
    found = _jaxpr_has(jaxpr.jaxpr, "conv_general_dilated")
    if key is not None:
        if len(_CONVOLUTIONS) > 32:
            _CONVOLUTIONS.clear()
        _CONVOLUTIONS[key] = found
    return found


def _jaxpr_has(jaxpr: Any, primitive: str) -> bool:
    """Whether ``jaxpr`` or any jaxpr nested in its equations' parameters uses ``primitive``."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            return True
        for value in eqn.params.values():
            for item in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns") and _jaxpr_has(inner, primitive):
                    return True
    return False


def default_memory_bytes(device: jax.Device) -> int:
    """Half the device memory, or a quarter of host RAM on CPU."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def make_problem(
    apply_fn: ApplyFn,
    params: PyTree,
    x1: Any,
    x2: Any,
    *,
    symmetric: bool,
    output: str,
    precision: str,
    projection_dim: int | None,
    projection: str,
    projection_seed: int,
    devices: tuple[jax.Device, ...],
) -> Problem:
    """Validates the model's output shape and places the parameters on the mesh."""
    leaves, treedef = jax.tree.flatten(params)
    param_dtype = np.dtype(jnp.result_type(*leaves))
    example = jax.ShapeDtypeStruct((1, *x1.shape[1:]), param_dtype)
    out_shape = jax.eval_shape(apply_fn, params, example).shape
    if len(out_shape) != 2:
        raise ValueError(f"apply_fn must return [B, C] outputs, got shape {out_shape}")
    mesh = Mesh(np.asarray(devices), (AXIS,))
    replicated = NamedSharding(mesh, Spec())
    return Problem(
        apply_fn=apply_fn,
        treedef=treedef,
        leaves=tuple(jax.device_put(leaf, replicated) for leaf in leaves),
        x1=x1,
        x2=x2,
        symmetric=symmetric,
        output=output,
        precision=precision,
        projection_dim=projection_dim,
        projection=projection,
        projection_seed=projection_seed,
        devices=tuple(devices),
        mesh=mesh,
        num_outputs=int(out_shape[1]),
        num_params=sum(int(np.prod(leaf.shape)) for leaf in leaves),
        param_dtype=param_dtype,
        accumulate_dtype=np.dtype(np.float64 if param_dtype == np.float64 else np.float32),
    )


@dataclasses.dataclass(frozen=True)
class Unit:
    """One unit of work: the kernel blocks of a panel's row blocks against one column block."""

    panel: int
    column: int


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """One implementation's memory layout of a :class:`Problem`, fixed at construction."""

    problem: Problem
    implementation: str
    block: int
    row_slices: tuple[slice, ...]
    col_slices: tuple[slice, ...]
    panel_blocks: int
    param_groups: tuple[tuple[int, ...], ...]  # unfactored leaves, chunked if needed
    dense: tuple[DenseLayer, ...]  # factored layers; their factors travel with group 0
    chunked: bool
    layerwise: LayerwisePlan | None = None  # per-example Jacobians from layer sensitivities
    convs: tuple[ConvFactor, ...] = ()  # factored convolutions (need ``layerwise``), group 0

    @property
    def num_factored(self) -> int:
        return len(self.dense) + len(self.convs)

    def units(self) -> list[Unit]:
        """Work units in execution order (row panels, then column blocks left to right)."""
        units = []
        for panel_start in range(0, len(self.row_slices), self.panel_blocks):
            first = panel_start if self.problem.symmetric else 0
            units += [Unit(panel_start, j) for j in range(first, len(self.col_slices))]
        return units

    def panel_rows(self, unit: Unit) -> list[int]:
        """Row blocks of the unit's panel that meet its column (upper triangle if symmetric)."""
        stop = min(unit.panel + self.panel_blocks, len(self.row_slices))
        if self.problem.symmetric:
            stop = min(stop, unit.column + 1)
        return list(range(unit.panel, stop))

    def region(self, unit: Unit) -> tuple[int, int, int, int]:
        """The unit's kernel rows and columns (r0, r1, c0, c1)."""
        rows = self.panel_rows(unit)
        cols = self.col_slices[unit.column]
        return (self.row_slices[rows[0]].start, self.row_slices[rows[-1]].stop, cols.start,
                cols.stop)  # fmt: skip

    def cost(self, forward: float) -> float:
        """FLOPs of the whole computation (see :func:`choose_implementation`)."""
        p = self.problem
        c, b = p.num_outputs, self.block
        units = self.units()
        pairs = sum(len(self.panel_rows(u)) for u in units) * b * b
        if self.implementation == "ntk_vector_products":
            return pairs * c * 2.0 * forward
        evaluations = 0  # block feature evaluations, each a forward and C backward passes
        if self.chunked:
            for u in units:
                rows = self.panel_rows(u)
                diagonal = p.symmetric and u.column in rows
                evaluations += len(self.param_groups) * (1 if diagonal else 2)
        else:
            for start in range(0, len(self.row_slices), self.panel_blocks):
                stop = min(start + self.panel_blocks, len(self.row_slices))
                columns = len(self.col_slices) - (start if p.symmetric else 0)
                inside = (stop - start) if p.symmetric else 0
                evaluations += (stop - start) + (columns - inside)
        per_output = c * c if p.output == "full" else c
        unfactored = sum(int(np.prod(p.leaves[i].shape)) for g in self.param_groups for i in g)
        if p.projection_dim is not None:
            unfactored = p.projection_dim
        factors = sum(layer.d_in + per_output * layer.d_out for layer in self.dense)
        factors += sum(conv.contraction_size(per_output) for conv in self.convs)
        return evaluations * b * (1 + 2 * c) * forward + 2.0 * pairs * (
            per_output * unfactored + factors
        )


def _leaf_groups(
    sizes: list[tuple[int, int]], chunk_size: int | None, budget_params: int
) -> list[tuple[int, ...]]:
    """Consecutive (index, size) leaves grouped so each group's Jacobian fits (never split)."""
    limit = chunk_size if chunk_size is not None else max(budget_params, 1)
    if chunk_size is None and sum(size for _, size in sizes) <= limit:
        return [tuple(index for index, _ in sizes)]
    groups: list[list[int]] = [[]]
    total = 0
    for index, size in sizes:
        if groups[-1] and total + size > limit:
            groups.append([])
            total = 0
        groups[-1].append(index)
        total += size
    return [tuple(g) for g in groups]


def make_plan(
    problem: Problem,
    implementation: str,
    *,
    batch_size: int,
    memory_bytes: int | None,
    param_chunk_size: int | None,
    dense: tuple[DenseLayer, ...] = (),
    convs: tuple[ConvFactor, ...] = (),
    layerwise: LayerwisePlan | None = None,
) -> Plan:
    """Lays out ``implementation`` (``dense``/``convs``: the factored layers for
    ``"structured"``; convolutions are factored only with a ``layerwise`` plan).

    Chunking is decided after the structure: factored layers leave the Jacobian features, so the
    budget holds more rows (and fewer chunks are needed).
    """
    p = problem
    num_devices = len(p.devices)
    block = min(batch_size, max(len(p.x1), len(p.x2)))
    block = math.ceil(block / num_devices) * num_devices
    row_slices = tuple(_block_slices(len(p.x1), block))
    col_slices = tuple(_block_slices(len(p.x2), block))
    itemsize = p.param_dtype.itemsize
    budget = memory_bytes if memory_bytes is not None else default_memory_bytes(p.devices[0])
    per_device = block // num_devices
    c = p.num_outputs
    if convs and layerwise is None:
        raise ValueError("factored convolutions need a layerwise plan")
    factored = {i for layer in (*dense, *convs) for i in layer.leaf_indices}
    sizes = [(i, int(np.prod(leaf.shape))) for i, leaf in enumerate(p.leaves) if i not in factored]
    factor_size = sum(layer.d_in + c * layer.d_out for layer in dense)
    factor_size += sum(conv.factor_size(c) for conv in convs)
    factor_bytes = per_device * itemsize * factor_size
    budget_params = max(0, budget - 3 * factor_bytes) // max(1, 3 * per_device * c * itemsize)
    groups = _leaf_groups(sizes, param_chunk_size, budget_params) if sizes else [()]
    chunked = len(groups) > 1 and p.projection_dim is None
    feature_dim = p.projection_dim or sum(size for _, size in sizes)
    block_bytes = per_device * c * feature_dim * itemsize + factor_bytes
    if chunked or implementation == "ntk_vector_products":
        panel_blocks = 1  # products store no Jacobians: one row block per unit
    else:
        panel_blocks = max(1, budget // max(block_bytes, 1) - 1)
    return Plan(
        problem=p,
        implementation=implementation,
        block=block,
        row_slices=row_slices,
        col_slices=col_slices,
        panel_blocks=min(panel_blocks, len(row_slices)),
        param_groups=tuple(groups),
        dense=tuple(dense),
        chunked=chunked,
        layerwise=layerwise,
        convs=tuple(convs),
    )


def choose_plan(
    problem: Problem,
    implementation: str,
    *,
    batch_size: int,
    memory_bytes: int | None,
    param_chunk_size: int | None,
) -> Plan:
    """The plan of ``implementation``; for ``"auto"`` the cheapest by the cost model.

    The cost model in FLOPs (f: one example's forward pass, c = C, or C² for ``"full"``):
    contraction ``evaluations·B·(1 + 2C)·f + 2·pairs·c·P`` where evaluations counts every block
    feature evaluation of the schedule, including row Jacobians recomputed per column block under
    parameter chunking (once per chunk); structured the same with each factored layer's
    d_in·d_out parameters replaced by d_in + c·d_out; NTK-vector products ``2·pairs·C·f``.

    With layerwise Jacobians (CPU, convolution-dominated models), ``"structured"`` and ``"auto"``
    also factor every covered convolution that ``_conv_factors.conv_factors`` finds cheaper
    (its F·d_out parameters replaced by S²·(F + c·(d_out + 1)) per pair); ``"auto"`` keeps the
    plan without them if the model says that is cheaper.
    """
    plan = _choose_layout(problem, implementation, batch_size, memory_bytes, param_chunk_size)
    if plan.implementation == "ntk_vector_products":
        return plan
    layerwise = problem.layerwise_jacobians()
    if layerwise is None:
        return plan
    covered = {lw.path for lw in layerwise.layers}
    if any(layer.path not in covered for layer in plan.dense):
        return plan  # a factored Dense layer the layerwise plan does not cover
    logger.info("eNTK: per-example Jacobians layerwise (%d layers)", len(layerwise.layers))
    plan = dataclasses.replace(plan, layerwise=layerwise)
    if implementation not in ("auto", "structured") or problem.projection_dim is not None:
        return plan
    convs = conv_factors(layerwise, list(problem.leaves), problem.output, problem.num_outputs)
    if not convs:
        return plan
    dense = plan.dense or tuple(
        layer for layer in problem.dense_layers() if layer.path in covered
    )  # fmt: skip
    layout = {"batch_size": batch_size, "memory_bytes": memory_bytes,
              "param_chunk_size": param_chunk_size}  # fmt: skip
    factored = make_plan(
        problem, "structured", dense=dense, convs=convs, layerwise=layerwise, **layout
    )
    if implementation == "auto":
        forward = problem.forward_flops()
        costs = (plan.cost(forward), factored.cost(forward))
        logger.info(
            "eNTK cost model (FLOPs): %s with layerwise Jacobians %.3g, with %d factored "
            "convolution(s) %.3g",
            plan.implementation, costs[0], len(convs), costs[1],
        )  # fmt: skip
        if costs[1] >= costs[0]:
            return plan
    return factored


def _choose_layout(
    problem: Problem,
    implementation: str,
    batch_size: int,
    memory_bytes: int | None,
    param_chunk_size: int | None,
) -> Plan:
    layout = {"batch_size": batch_size, "memory_bytes": memory_bytes,
              "param_chunk_size": param_chunk_size}  # fmt: skip
    if implementation == "structured":
        dense = problem.dense_layers()
        return make_plan(problem, "structured", dense=dense, **layout)
    if implementation != "auto":
        return make_plan(problem, implementation, **layout)
    if problem.projection_dim is not None:
        return make_plan(problem, "jacobian", **layout)
    candidates = [
        make_plan(problem, name, **layout) for name in ("jacobian", "ntk_vector_products")
    ]
    dense = problem.dense_layers()
    if dense:
        candidates.append(make_plan(problem, "structured", dense=dense, **layout))
    forward = problem.forward_flops()
    costs = {plan.implementation: plan.cost(forward) for plan in candidates}
    best = min(candidates, key=lambda plan: costs[plan.implementation])
    logger.info(
        "eNTK cost model (FLOPs): %s -> %s",
        ", ".join(f"{name} {cost:.3g}" for name, cost in costs.items()),
        best.implementation,
    )
    return best


def _block_slices(n: int, block: int) -> list[slice]:
    return [slice(start, min(start + block, n)) for start in range(0, n, block)]
