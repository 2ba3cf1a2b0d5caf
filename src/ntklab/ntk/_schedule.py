"""The schedule: blocks, panels, parameter chunks, the cost model, the implementation choice and
the work units of a problem (``_problem``).

Dimensions: N examples (N1 rows, N2 columns), P parameters, C outputs, B examples per block,
F features per example and output, D devices, G parameter chunks.

    problem = make_problem(apply_fn, params, x1, x2, output="trace", ...)   # _problem
    plan = make_plan(problem, "structured", batch_size=256, memory_bytes=None, param_chunk_size=None)
    plan = choose_plan(problem, "auto", batch_size=256, memory_bytes=None, param_chunk_size=None)
    plan.units(), plan.region(unit), plan.cost(problem.forward_flops())

A *unit* is the kernel blocks of a panel's row blocks (as many as the memory budget holds)
against one column block; for ``x2=None`` only blocks on or above the diagonal. Everything here
is decided once, in frozen dataclasses: the engine is never reconfigured after construction.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from ntklab.ntk._contract import host_contraction
from ntklab.ntk._conv_factors import ConvFactor, conv_factors
from ntklab.ntk._host_convs import HostConv, host_conv_layers
from ntklab.ntk._layerwise_plan import LayerwisePlan
from ntklab.ntk._problem import Problem, default_memory_bytes
from ntklab.ntk._structure import DenseLayer

logger = logging.getLogger(__name__)


LAYERWISE_MIN_CONV_FRACTION = 0.5
"""Layerwise Jacobians only when covered convolutions hold at least this fraction of the
parameters (see :func:`layerwise_jacobians`)."""


def layerwise_jacobians(problem: Problem) -> LayerwisePlan | None:
    """The layerwise Jacobian plan (``_layerwise_plan``) where it is measured to pay: on a CPU, for a
    model whose covered convolutions hold most parameters (their per-example weight gradients
    ``vmap(jacrev)`` runs as slow grouped convolutions; ResNet-18: 1.44x faster Jacobians,
    BENCHMARKS.md). ``None`` elsewhere (GPUs are not measured yet).
    """
    plan = problem.layerwise_plan()
    if plan is None:
        return None
    conv_leaves = {i for layer in plan.layers if layer.kind == "conv" for i in layer.leaf_indices}
    conv_params = sum(int(np.prod(problem.leaves[i].shape)) for i in conv_leaves)
    # Only where convolutions hold most parameters: on LeNet (2 % in convolutions) layerwise
    # measured 0.89x of vmap(jacrev), on ResNet-18 (99.95 %) 1.44x (BENCHMARKS.md); LeNet's
    # convolutions are formed on the host instead (:func:`_with_host_convs`).
    return plan if conv_params >= LAYERWISE_MIN_CONV_FRACTION * problem.num_params else None


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
    host_convs: tuple[HostConv, ...] = ()  # convolutions whose Jacobians the host forms

    @property
    def num_factored(self) -> int:
        return len(self.dense) + len(self.convs)

    def term_layers(self, group: int) -> tuple[int, ...]:
        """The layer (index into ``problem.layer_names``) of each term of parameter group
        ``group``'s blocks: its leaves, then its factored Dense layers and convolutions."""
        owners = self.problem.leaf_layers
        leaves = [owners[i] for i in self.param_groups[group]]
        if group != 0:
            return tuple(leaves)
        factored = [owners[layer.kernel] for layer in (*self.dense, *self.convs)]
        return tuple(leaves + factored)

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
    row_slices = tuple(block_slices(len(p.x1), block))
    col_slices = tuple(block_slices(len(p.x2), block))
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
        # The budget holds the panel, the column block, the block ``_units`` computes ahead and
        # the previous unit's column while its contraction finishes.
        panel_blocks = max(1, budget // max(block_bytes, 1) - 3)
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
    layerwise = layerwise_jacobians(problem)
    if layerwise is None:
        return _with_host_convs(problem, plan)
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


def _with_host_convs(problem: Problem, plan: Plan) -> Plan:
    """``plan`` with the host forming its convolutions' Jacobians (``_host_convs``) where that
    applies: a structured plan without parameter chunks or projection, contracted on the host
    (one CPU device), every covered convolution's host formula verified, every factored Dense
    layer covered by the layerwise plan. On LeNet (2 % of the parameters in convolutions) the
    feature pass then costs about one batched forward + backward instead of 1.65x
    (BENCHMARKS.md); ``NTKLAB_LAYERWISE=0`` turns it off with the layerwise Jacobians."""
    if (
        plan.implementation != "structured"
        or plan.chunked
        or problem.projection_dim is not None
        or not host_contraction(problem.output, problem.precision, problem.mesh)
    ):
        return plan
    layerwise = problem.layerwise_plan()
    if layerwise is None:
        return plan
    covered = {layer.path for layer in layerwise.layers}
    convs = host_conv_layers(layerwise)
    all_convs = [layer for layer in layerwise.layers if layer.kind == "conv"]
    if (
        not convs
        or len(convs) < len(all_convs)
        or any(layer.path not in covered for layer in plan.dense)
    ):
        return plan
    logger.info(
        "eNTK: per-example Jacobians layerwise, %d convolution(s) formed on the host: %s",
        len(convs), ", ".join(conv.name for conv in convs),
    )  # fmt: skip
    return dataclasses.replace(plan, layerwise=layerwise, host_convs=convs)


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


def block_slices(n: int, block: int) -> list[slice]:
    """The engine's blocking of n examples: consecutive slices of ``block`` (the last shorter).

    Args:
      n: the number of examples N.
      block: examples per block B.

    Returns:
      ceil(N / B) slices covering 0..N in order.
    """
    return [slice(start, min(start + block, n)) for start in range(0, n, block)]


_block_slices = block_slices  # the old private name (ntklab.nads imports it until it switches)
