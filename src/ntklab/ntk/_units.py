"""Work units: the compiled per-block pieces and the loops that yield a plan's kernel blocks.

Dimensions: B examples per block, C outputs, G parameter chunks, L layers.

    for position, unit, blocks in jacobian_units(plan, plan.units(), done=set()):
        ...                                  # blocks: {row block: kernel block [B, B]}
    jacobian_units(plan, units, done=set(), by_layer=True)   # blocks [L, B, B]
    feats = block_features(plan, x, rows)   # every group's finished features (benchmarks)

The loop computes each feature block once per pass, one block ahead of the one being
contracted: XLA's next block (dispatched asynchronously) overlaps the host's work on the
current one (host-formed convolutions, NumPy's contraction).
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from ntklab import threads
from ntklab.ntk import _contract, _features, _host_convs
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
    """``fn(leaves, keys, x[B, ...]) -> Features`` of parameter group ``group`` (XLA's part: the
    host convolutions' leaves still as ``host_factors``, see :func:`finish`)."""
    p = plan.problem
    dense = plan.dense if group == 0 else ()
    convs = plan.convs if group == 0 else ()
    host_convs = plan.host_convs if group == 0 else ()
    leaf_group = plan.param_groups[group]
    key = ("features", *_model_key(p), leaf_group, p.projection_dim, p.projection, dense,
           plan.layerwise, convs, host_convs)  # fmt: skip
    return cached(key, lambda: _features.features_fn(
        p.apply_fn, p.treedef, leaf_group, p.num_outputs, p.projection_dim, p.projection,
        p.mesh, dense, plan.layerwise, convs, host_convs,
    ))  # fmt: skip


def finish(plan: Plan, group: int, feats: Features) -> Features:
    """The block's features with the host convolutions' Jacobians formed (``_host_convs``)."""
    if group != 0 or not plan.host_convs:
        return feats
    return _host_convs.finish(feats, plan.param_groups[0], plan.host_convs)


def contract_fn(plan: Plan, group: int = 0, *, by_layer: bool = False) -> Callable:
    """``fn(rows: Features, cols: Features) -> block`` for parameter group ``group``; with
    ``by_layer`` the block is [L, ...], each term in its layer (``Plan.term_layers``)."""
    p = plan.problem
    biases = tuple(layer.bias is not None for layer in plan.dense) if group == 0 else ()
    conv_biases = tuple(conv.bias is not None for conv in plan.convs) if group == 0 else ()
    terms = plan.term_layers(group) if by_layer else None
    num_layers = len(p.layer_names) if by_layer else 0
    key = ("contract", p.output, p.precision, p.devices, biases, conv_biases, terms, num_layers)
    return cached(key, lambda: _contract.contract_fn(
        p.output, p.precision, p.mesh, biases, conv_biases, terms, num_layers
    ))  # fmt: skip


def projection_keys(problem: Problem) -> jax.Array:
    """One PRNG key per parameter leaf, so the map does not depend on the chunking."""
    keys = jax.random.split(jax.random.PRNGKey(problem.projection_seed), len(problem.leaves))
    return jax.device_put(keys, problem.replicated)


def block_features(plan: Plan, x: Any, rows: slice) -> list[Features]:
    """Every parameter group's finished features of the examples ``x[rows]`` (benchmarks)."""
    p = plan.problem
    block = p.put_block(x, rows, plan.block)
    keys, leaves = projection_keys(p), list(p.leaves)
    return [
        finish(plan, g, features_fn(plan, g)(leaves, keys, block))
        for g in range(len(plan.param_groups))
    ]


# ---------------------------------------------------------------------------------- work units


class _HostWorkers:
    """Contracts units' row blocks on the host on as many Python workers as there are CPUs.

    Each worker's NumPy product runs on one BLAS thread (the ``beside_xla`` limit holds for
    every calling thread) and takes the next row block when it is done: the blocks are shared
    out dynamically and nothing spins, so a core taken by another process delays one block
    instead of stalling a statically split product. The next unit's blocks are queued before
    the current unit's are collected, so no worker idles at a unit's end. Off the host (XLA
    contraction), with one CPU, or where the user set the BLAS threads (``ntklab.threads``
    policy ``user`` or ``fixed``) the blocks are contracted in order in the caller's thread.
    """

    def __init__(self, on_host: bool):
        count = threads.available_cpus() if on_host and threads.policy() == "auto" else 1
        self._pool = concurrent.futures.ThreadPoolExecutor(count) if count > 1 else None

    def __enter__(self) -> _HostWorkers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, contract: Callable, pairs: dict[int, tuple]) -> dict[int, Any]:
        """Starts ``contract(rows, cols)`` for ``pairs`` {row block: (rows, cols)}; returns a
        handle for :meth:`results` (the blocks themselves without workers)."""
        if self._pool is None:
            return {i: contract(*pair) for i, pair in pairs.items()}
        return {i: self._pool.submit(contract, *pair) for i, pair in pairs.items()}

    def results(self, handle: dict[int, Any]) -> dict[int, Any]:
        """``{row block: kernel block}`` of a :meth:`submit`, waiting for the workers."""
        if self._pool is None:
            return handle
        return {i: future.result() for i, future in handle.items()}


class _Ahead:
    """Feature blocks in a known order, the next one dispatched to XLA before the current one is
    finished and contracted on the host: XLA computes block k+1 while NumPy works on block k.

    ``get(key)`` must be called with the keys of ``order`` in that order.
    """

    def __init__(self, order: list[tuple[str, int]], compute: Callable, complete: Callable):
        self._order, self._compute, self._complete = order, compute, complete
        self._position = 0
        self._pending: Any = None

    def get(self, key: tuple[str, int]) -> Features:
        if self._order[self._position] != key:
            raise RuntimeError(f"feature block {key} requested out of order")
        raw = self._pending if self._pending is not None else self._compute(key)
        self._position += 1
        self._pending = None
        if self._position < len(self._order):
            self._pending = self._compute(self._order[self._position])
        return self._complete(raw)


def _steps(plan: Plan, units: list[Unit], done: set[int]) -> list[tuple]:
    """The unchunked schedule: per unit not skipped (position or None if done, unit, feature
    blocks to compute first, the column's key), in order.

    A key is ("x1", row block) or ("x2", column block). Symmetric: a column block inside the
    panel is one of the panel's own row blocks; columns run left to right, so every row block
    of a unit is already in the panel, and it is computed even for finished units, as later
    units need it.
    """
    p = plan.problem
    panel_positions = collections.defaultdict(list)
    for position, unit in enumerate(units):
        panel_positions[unit.panel].append(position)
    steps, loaded, current_panel = [], set(), None
    for position, unit in enumerate(units):
        if all(q in done for q in panel_positions[unit.panel]):
            continue  # the whole panel was finished before a resume
        if unit.panel != current_panel:
            current_panel, loaded = unit.panel, set()
        panel_end = min(unit.panel + plan.panel_blocks, len(plan.row_slices))
        loads = []
        in_panel = p.symmetric and unit.column < panel_end
        if in_panel:
            loads.append(("x1", unit.column))
        if position in done:
            steps.append((None, unit, loads, None))
            loaded.update(loads)
            continue
        if not p.symmetric and not loaded:
            loads += [("x1", i) for i in range(unit.panel, panel_end)]
        column = ("x1", unit.column) if in_panel else ("x2", unit.column)
        if not in_panel:
            loads.append(column)
        loaded.update(loads)
        steps.append((position, unit, loads, column))
    return steps


def jacobian_units(
    plan: Plan, units: list[Unit], *, done: set[int], by_layer: bool = False
) -> Iterator[tuple]:
    """Yields ``(position, unit, {row block: kernel block})`` for every unit not in ``done``.

    With ``by_layer`` each kernel block is [L, ...] (``contract_fn``). Feature blocks are
    computed one ahead (:class:`_Ahead`), so XLA's next block overlaps the host's work.
    """
    p = plan.problem
    leaves = list(p.leaves)
    keys = projection_keys(p)
    groups = range(len(plan.param_groups))
    feature_fns = [features_fn(plan, g) for g in groups]
    contracts = [contract_fn(plan, g, by_layer=by_layer) for g in groups]

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
        # block locally. On one device it stays the very same object: a diagonal block then
        # multiplies one buffer by itself (NumPy: always syrk), whether its leaves came from
        # XLA or from the host (a put could copy NumPy leaves or alias them, by alignment).
        return feats if len(p.devices) == 1 else jax.device_put(feats, p.replicated)

    if plan.chunked:
        for position, unit in enumerate(units):
            if position not in done:
                rows = plan.panel_rows(unit)
                yield position, unit, _chunked_unit(plan, unit, rows, features, replicated,
                                                    contracts)  # fmt: skip
        return
    steps = _steps(plan, units, done)
    host = _HostWorkers(_contract.host_contraction(p.output, p.precision, p.mesh))
    sources = {"x1": (p.x1, plan.row_slices), "x2": (p.x2, plan.col_slices)}
    ahead = _Ahead(
        [key for step in steps for key in step[2]],
        lambda key: features(sources[key[0]][0], sources[key[0]][1][key[1]]),
        lambda feats: finish(plan, 0, feats),
    )
    with host:
        yield from _unchunked_units(plan, steps, ahead, replicated, contracts[0], host)


def _unchunked_units(
    plan: Plan,
    steps: list[tuple],
    ahead: _Ahead,
    replicated: Callable,
    contract: Callable,
    host: _HostWorkers,
) -> Iterator[tuple]:
    """The loop of :func:`jacobian_units` over ``_steps``' schedule (no parameter chunks); a
    unit is yielded once the next one's blocks are queued."""
    panel_features: dict[tuple[str, int], Features] = {}
    current_panel, queued = None, None
    for position, unit, loads, column_key in steps:
        if unit.panel != current_panel:
            current_panel, panel_features = unit.panel, {}
        for key in loads:
            panel_features[key] = ahead.get(key)
        if position is None:
            continue
        column = replicated(panel_features[column_key])
        if column_key[0] == "x2":
            del panel_features[column_key]  # column blocks outside the panel are used once
        pairs = {i: (panel_features[("x1", i)], column) for i in plan.panel_rows(unit)}
        handle = host.submit(contract, pairs)
        del column, pairs
        if queued is not None:
            yield queued[0], queued[1], host.results(queued[2])
        queued = (position, unit, handle)
    if queued is not None:
        yield queued[0], queued[1], host.results(queued[2])


def _chunked_unit(plan, unit, rows, features, replicated, contracts) -> dict[int, jax.Array]:
    """One unit accumulated over parameter chunks (a block's Jacobian does not fit)."""
    p = plan.problem
    (row,) = rows
    total = None
    for group in range(len(plan.param_groups)):
        row_features = finish(plan, group, features(p.x1, plan.row_slices[row], group))
        if p.symmetric and unit.column == row:
            col_features = row_features
        else:
            col_features = finish(plan, group, features(p.x2, plan.col_slices[unit.column], group))
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
