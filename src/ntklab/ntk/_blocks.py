"""Streaming kernel blocks: the symmetric trace kernel block pair by block pair, optionally by layer.

Dimensions: N examples, B examples per block (b1, b2 in a block pair), L layers
(``layer_names(params)``).

    names = layer_names(params)                                   # e.g. ["Conv_0", "Dense_0"]
    for part in kernel_blocks(apply_fn, params, x, by_layer=True):   # x [N, ...]
        kernel[part.rows, part.cols] = part.block                   # [b1, b2]
        kernel[part.cols, part.rows] = part.block.T                 # mirror off-diagonal pairs
        per_layer[:, part.rows, part.cols] = part.layers            # [L, b1, b2]

The blocks come from the same feature pass as :func:`ntklab.ntk.empirical_ntk` (the same
implementations, factoring, layerwise Jacobians, panels and parameter chunks); with
``by_layer`` every term of a block is added to the layer that owns its leaf instead of to one
sum: an unfactored leaf's Jacobian product, a factored Dense layer's (a_i·a_j + 1)(δ_i·δ_j), a
factored convolution's term, each parameter chunk's share.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import numpy as np

from ntklab import threads
from ntklab.ntk import _problem, _schedule, _units
from ntklab.ntk._api import IMPLEMENTATIONS, Implementation, check_choice, check_positive_int
from ntklab.ntk._layer_names import layer_names
from ntklab.ntk._store import _to_host, non_finite_block_message
from ntklab.progress import progress_bar
from ntklab.types import ApplyFn, PyTree

logger = logging.getLogger(__name__)

__all__ = ["KernelBlock", "kernel_blocks", "layer_names"]


class KernelBlock(NamedTuple):
    """One block pair of the symmetric trace kernel.

    Attributes:
      rows: the block's rows of the kernel (examples ``x[rows]``); ``rows.start <= cols.start``.
      cols: its columns; off-diagonal pairs (``rows != cols``) come once, the caller mirrors.
      block: the kernel block [b1, b2], float32 (float64 for float64 parameters).
      layers: with ``by_layer``, the block split by layer [L, b1, b2] in ``layer_names(params)``
        order (``layers.sum(0)`` is ``block``); else None.
    """

    rows: slice
    cols: slice
    block: np.ndarray
    layers: np.ndarray | None


def kernel_blocks(
    apply_fn: ApplyFn,
    params: PyTree,
    x: np.ndarray | jax.Array,
    *,
    by_layer: bool = False,
    batch_size: int = 256,
    implementation: Implementation = "auto",
    memory_bytes: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    progress: bool = False,
) -> Iterator[KernelBlock]:
    """Streams the symmetric trace kernel Θ[i, j] = Σ_c ∇θ f_c(x_i) · ∇θ f_c(x_j) of x by blocks.

    Each unordered pair of row and column blocks comes exactly once, with ``rows.start <=
    cols.start``; nothing is kept after a block is yielded, so N×N need not fit in memory. The
    options and the computation are those of :func:`ntklab.ntk.empirical_ntk` with
    ``output="trace"`` and ``x2=None``.

    Args:
      apply_fn: ``apply_fn(params, x[B, ...]) -> [B, C]`` (BatchNorm in inference mode).
      params: the parameters θ (a pytree).
      x: inputs [N, ...].
      by_layer: also split every block by layer (:func:`layer_names`): each contribution goes
        to the layer that owns its leaf. Needs an implementation that forms features:
        ``"ntk_vector_products"`` is refused, and ``"auto"`` chooses among the others.
      batch_size: examples per block B (rounded up to a multiple of the number of devices).
      implementation: ``"auto"``, ``"jacobian"``, ``"structured"`` or ``"ntk_vector_products"``.
      memory_bytes: per-device budget for the features kept at once; None as in
        ``empirical_ntk``.
      devices: devices to shard over; None uses all of ``jax.devices()``.
      progress: show a progress bar over work units.

    Returns:
      an iterator of :class:`KernelBlock`; the checks and the plan are made before it is
      returned, the blocks computed as it is consumed.

    Raises:
      ValueError: an unknown option (the message lists the valid ones), empty inputs,
        ``by_layer`` with ``"ntk_vector_products"``, or a non-finite block (named by its rows
        and columns, when it is reached).
    """
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    check_positive_int("batch_size", batch_size)
    if memory_bytes is not None:
        check_positive_int("memory_bytes", memory_bytes)
    if len(x) == 0:
        raise ValueError("x has no examples")
    if by_layer and implementation == "ntk_vector_products":
        raise ValueError(
            "by_layer=True needs an implementation that forms Jacobian features ('auto', "
            "'jacobian' or 'structured'); 'ntk_vector_products' never forms them"
        )
    problem = _problem.make_problem(
        apply_fn, params, x, x, symmetric=True, output="trace", precision="float32",
        projection_dim=None, projection="rademacher", projection_seed=0,
        devices=tuple(devices) if devices is not None else tuple(jax.devices()),
    )  # fmt: skip
    layout = {"batch_size": batch_size, "memory_bytes": memory_bytes, "param_chunk_size": None}
    plan = _schedule.choose_plan(problem, implementation, **layout)
    if by_layer and plan.implementation == "ntk_vector_products":
        name = "structured" if problem.dense_layers() else "jacobian"
        logger.info(
            "kernel blocks: by_layer needs Jacobian features: %s instead of the cost model's "
            "ntk_vector_products", name,
        )  # fmt: skip
        plan = _schedule.choose_plan(problem, name, **layout)
    return _stream(plan, by_layer, progress)


def _stream(plan: _schedule.Plan, by_layer: bool, progress: bool) -> Iterator[KernelBlock]:
    """The blocks of ``plan``'s units; NumPy's BLAS limited beside XLA while a unit runs (not
    while the caller holds a block)."""
    p = plan.problem
    units = plan.units()
    logger.info(
        "kernel blocks: N=%d P=%d C=%d, %s, %d device(s), %d-example blocks, %d layer(s)%s; "
        "BLAS threads %s",
        len(p.x1), p.num_params, p.num_outputs, plan.implementation, len(p.devices), plan.block,
        len(p.layer_names), " (by layer)" if by_layer else "", threads.describe(),
    )  # fmt: skip
    if plan.implementation == "ntk_vector_products":
        iterator = _units.products_units(plan, units, done=set())
    else:
        iterator = _units.jacobian_units(plan, units, done=set(), by_layer=by_layer)
    bar = progress_bar(total=len(units), desc="ntk blocks", unit="unit", enabled=progress)
    try:
        while True:
            with threads.beside_xla():
                item = next(iterator, None)
                if item is None:
                    return
                _, unit, blocks = item
                parts = [_block(plan, i, unit.column, value, by_layer) for i, value in
                         blocks.items()]  # fmt: skip
            bar.update(1)
            yield from parts
    finally:
        bar.close()


def _block(plan: _schedule.Plan, row: int, column: int, value, by_layer: bool) -> KernelBlock:
    """A unit's block as a checked :class:`KernelBlock` (padding cut off)."""
    rows, cols = plan.row_slices[row], plan.col_slices[column]
    values = _to_host(value)[..., : rows.stop - rows.start, : cols.stop - cols.start]
    if not np.all(np.isfinite(values)):
        raise ValueError(non_finite_block_message(values, rows, cols))
    if by_layer:
        return KernelBlock(rows, cols, values.sum(axis=0), values)
    return KernelBlock(rows, cols, values, None)
