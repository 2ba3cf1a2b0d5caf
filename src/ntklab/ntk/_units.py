"""Work units: the compiled per-block pieces and the loops that yield a plan's kernel blocks.

Dimensions: B examples per block, C outputs, G parameter chunks.

    for position, unit, blocks in jacobian_units(plan, plan.units(), done=set()):
        ...                                  # blocks: {row block: kernel block [B, B]}
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from ntklab.ntk import _features
from ntklab.ntk._features import Features
from ntklab.ntk._schedule import Plan, Problem, Unit

# ------------------------------------------------------------------------------ compiled pieces

_COMPILED: collections.OrderedDict[tuple, Callable] = collections.OrderedDict()
_COMPILED_MAX = 32


def cached(key: tuple, build: Callable[[], Callable]) -> Callable:
    """Compiled per-block functions shared across calls with the same model and layout."""
    try:
        if key in _COMPILED:
            _COMPILED.move_to_end(key)
            return _COMPILED[key]
    except TypeError:  # an unhashable part (e.g. an apply_fn closure object): no caching
        return build()
    _COMPILED[key] = fn = build()
    while len(_COMPILED) > _COMPILED_MAX:
        _COMPILED.popitem(last=False)
    return fn


def _model_key(problem: Problem) -> tuple:
    avals = tuple((leaf.shape, str(leaf.dtype)) for leaf in problem.leaves)
    return (problem.apply_fn, problem.treedef, avals, problem.num_outputs, problem.devices)


def features_fn(plan: Plan, group: int) -> Callable:
    """``fn(leaves, keys, x[B, ...]) -> Features`` of parameter group ``group``."""
    p = plan.problem
    dense = plan.dense if group == 0 else ()
    convs = plan.convs if group == 0 else ()
    leaf_group = plan.param_groups[group]
    key = ("features", *_model_key(p), leaf_group, p.projection_dim, p.projection, dense,
           plan.layerwise, convs)  # fmt: skip
    return cached(key, lambda: _features.features_fn(
        p.apply_fn, p.treedef, leaf_group, p.num_outputs, p.projection_dim, p.projection,
        p.mesh, dense, plan.layerwise, convs,
    ))  # fmt: skip


def contract_fn(plan: Plan, group: int = 0) -> Callable:
    """``fn(rows: Features, cols: Features) -> block`` for parameter group ``group``."""
    p = plan.problem
    biases = tuple(layer.bias is not None for layer in plan.dense) if group == 0 else ()
    conv_biases = tuple(conv.bias is not None for conv in plan.convs) if group == 0 else ()
    key = ("contract", p.output, p.precision, p.devices, biases, conv_biases)
    return cached(key, lambda: _features.contract_fn(
        p.output, p.precision, p.mesh, biases, conv_biases
    ))  # fmt: skip


def projection_keys(problem: Problem) -> jax.Array:
    """One PRNG key per parameter leaf, so the map does not depend on the chunking."""
    keys = jax.random.split(jax.random.PRNGKey(problem.projection_seed), len(problem.leaves))
    return jax.device_put(keys, problem.replicated)


# ---------------------------------------------------------------------------------- work units


def jacobian_units(plan: Plan, units: list[Unit], *, done: set[int]) -> Iterator[tuple]:
    """Yields ``(position, unit, {row block: kernel block})`` for every unit not in ``done``."""
    p = plan.problem
    leaves = list(p.leaves)
    keys = projection_keys(p)
    groups = range(len(plan.param_groups))
    feature_fns = [features_fn(plan, g) for g in groups]
    contracts = [contract_fn(plan, g) for g in groups]

    def features(x: Any, rows: slice, group: int | None = None) -> Features:
        block = p.put_block(x, rows, plan.block)
        if group is not None or len(feature_fns) == 1:
            return feature_fns[group or 0](leaves, keys, block)
        (total,) = feature_fns[0](leaves, keys, block).leaves
        for fn in feature_fns[1:]:  # projected features sum over parameter groups
            total = total + fn(leaves, keys, block).leaves[0]
        return Features(leaves=(total,))

    def replicated(feats: Features) -> Features:
        # A column block is gathered onto every device once and then contracted with each row
        # block locally (a no-op on one device).
        return jax.device_put(feats, p.replicated)

    panel_positions = collections.defaultdict(list)
    for position, unit in enumerate(units):
        panel_positions[unit.panel].append(position)
    panel_features: dict[int, Features] = {}
    current_panel = None
    for position, unit in enumerate(units):
        if all(q in done for q in panel_positions[unit.panel]):
            continue  # the whole panel was finished before a resume
        rows = plan.panel_rows(unit)
        if plan.chunked:
            if position not in done:
                yield (
                    position,
                    unit,
                    _chunked_unit(plan, unit, rows, features, replicated, contracts),
                )
            continue
        if unit.panel != current_panel:
            current_panel, panel_features = unit.panel, {}
        panel_end = min(unit.panel + plan.panel_blocks, len(plan.row_slices))
        in_panel = p.symmetric and unit.column < panel_end
        if in_panel:
            # Symmetric: the column block is one of the panel's own row blocks; columns run
            # left to right, so every row block of this unit is already in the panel. Done
            # even for finished units, as later units need the features.
            panel_features[unit.column] = features(p.x1, plan.row_slices[unit.column])
        if position in done:
            continue
        if not p.symmetric and not panel_features:
            for i in range(unit.panel, panel_end):
                panel_features[i] = features(p.x1, plan.row_slices[i])
        column = replicated(
            panel_features[unit.column]
            if in_panel
            else features(p.x2, plan.col_slices[unit.column])
        )
        yield position, unit, {i: contracts[0](panel_features[i], column) for i in rows}
        del column


def _chunked_unit(plan, unit, rows, features, replicated, contracts) -> dict[int, jax.Array]:
    """One unit accumulated over parameter chunks (a block's Jacobian does not fit)."""
    p = plan.problem
    (row,) = rows
    total = None
    for group in range(len(plan.param_groups)):
        row_features = features(p.x1, plan.row_slices[row], group)
        if p.symmetric and unit.column == row:
            col_features = row_features
        else:
            col_features = features(p.x2, plan.col_slices[unit.column], group)
        block = contracts[group](row_features, replicated(col_features))
        total = block if total is None else total + block
        del row_features, col_features
    return {row: total}


def products_units(plan: Plan, units: list[Unit], *, done: set[int]) -> Iterator[tuple]:
    """Like :func:`jacobian_units` by NTK-vector products (VJP then JVP per block pair)."""
    p = plan.problem
    key = ("products", *_model_key(p))
    products = cached(
        key, lambda: _features.products_fn(p.apply_fn, p.treedef, p.num_outputs, p.mesh)
    )
    reduce = jax.jit({
        "full": lambda k: k,
        "trace": lambda k: jnp.einsum("ijcc->ij", k),
        "diagonal": lambda k: jnp.einsum("ijcc->ijc", k),
    }[p.output])  # fmt: skip
    leaves = list(p.leaves)
    for position, unit in enumerate(units):
        if position in done:
            continue
        (row,) = plan.panel_rows(unit)
        rows = p.put_block(p.x1, plan.row_slices[row], plan.block, sharded=False)
        cols = p.put_block(p.x2, plan.col_slices[unit.column], plan.block)
        yield position, unit, {row: reduce(products(leaves, rows, cols))}
