"""Empirical neural tangent kernel engine.

Dimensions: N examples (N1 rows, N2 columns), P parameters, C outputs (logits), B examples per
block, F features per output (P, or the projection dimension), D devices.

    kernel = empirical_ntk(apply_fn, params, x)                     # x [N, H, W, C] -> [N, N]
    cross = empirical_ntk(apply_fn, params, x1, x2)                 # -> [N1, N2]
    full = empirical_ntk(apply_fn, params, x, output="full")        # C logits -> [N, N, C, C]
    big = empirical_ntk(apply_fn, params, x, out="kernel.npy")      # disk-backed, resumable

For a network f(θ, x) ∈ R^C the kernel is Θ[i, j, c, d] = ∇θ f_c(θ, x_i) · ∇θ f_d(θ, x_j);
``output="trace"`` returns Σ_c Θ[i, j, c, c] (for C = 1 the scalar kernel), ``"diagonal"``
Θ[i, j, c, c] and ``"full"`` everything.

How it works. The inputs are cut into blocks of B examples, sharded over the devices along the
batch (``jax.shard_map`` over a one-axis mesh: one code path for one CPU, one GPU, many GPUs or
many hosts). ``implementation="jacobian"`` computes each block's per-example Jacobian features
[B, C, F] once per pass, keeps as many row blocks as the memory budget allows (a *panel*), and
fills the kernel with one matrix product per block pair: for ``x2=None`` only the upper triangle,
mirrored. If a single block's Jacobian does not fit, the parameters are split into chunks (groups
of whole leaves) and the kernel is accumulated over them. ``"structured"`` is the same contraction
with every ``flax.linen.Dense`` layer factored: its per-example Jacobian is the outer product of
its input a and output sensitivity δ, so its kernel is (a_i·a_j + 1)(δ_i·δ_j) and its
d_in·d_out Jacobian columns are never formed. ``"ntk_vector_products"`` never stores
Jacobians: per block pair it pulls back the output basis of one block (VJP) and pushes it forward
through the other (JVP); ``"auto"`` picks the cheapest by the cost model (contraction
N·C·[FP] + N²·C·P or N²·C²·P for ``full``, products N²·C·[FP], structured with each factored
layer's d_in·d_out replaced by d_in + C·d_out). With ``projection_dim`` the Jacobian features are
multiplied by a seeded random Rademacher/Gaussian map [P, K] / √K, generated on the fly in chunks
of parameters (never materialized), giving the projected NTK of Engel et al. (2023).

With ``out`` the kernel is a ``.npy`` memmap written unit by unit (a unit is a panel's column
block) next to a resume record ``<out>.progress.json``: a run killed at any point and restarted
with the same arguments continues after the last finished unit and gives the same kernel.

Callers see only :func:`empirical_ntk`; everything else here is private.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as Spec

from ntklab.progress import progress_bar
from ntklab.types import ApplyFn, PyTree

logger = logging.getLogger(__name__)

Output = Literal["trace", "full", "diagonal"]
Implementation = Literal["auto", "jacobian", "structured", "ntk_vector_products"]
Precision = Literal["float32", "tf32", "bfloat16"]
Projection = Literal["rademacher", "gaussian"]

OUTPUTS: tuple[str, ...] = ("trace", "full", "diagonal")
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "jacobian", "structured", "ntk_vector_products")
PRECISIONS: tuple[str, ...] = ("float32", "tf32", "bfloat16")
PROJECTIONS: tuple[str, ...] = ("rademacher", "gaussian")
STORAGE_DTYPES: tuple[str, ...] = ("float16", "float32", "float64")

_AXIS = "batch"
_PROJECTION_CHUNK = 4096  # parameters per generated slice of the random projection map


def empirical_ntk(
    apply_fn: ApplyFn,
    params: PyTree,
    x1: np.ndarray | jax.Array,
    x2: np.ndarray | jax.Array | None = None,
    *,
    output: Output = "trace",
    implementation: Implementation = "auto",
    batch_size: int = 256,
    precision: Precision = "float32",
    storage_dtype: str | None = None,
    out: str | os.PathLike | None = None,
    memory_bytes: int | None = None,
    param_chunk_size: int | None = None,
    projection_dim: int | None = None,
    projection: Projection = "rademacher",
    projection_seed: int = 0,
    devices: Sequence[jax.Device] | None = None,
    progress: bool = False,
    _after_unit: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Computes the empirical NTK of ``apply_fn`` at ``params``.

    Args:
      apply_fn: ``apply_fn(params, x[B, ...]) -> [B, C]``; evaluated on sharded blocks, so each
        output must depend only on its own input (BatchNorm in inference mode).
      params: the parameters θ to differentiate with respect to (a pytree, P scalars in all).
      x1: row inputs [N1, ...].
      x2: column inputs [N2, ...]; None means x2 is x1 and only the upper triangle is computed.
      output: ``"trace"`` [N1, N2] (sum over logits; the scalar kernel when C = 1), ``"full"``
        [N1, N2, C, C] or ``"diagonal"`` [N1, N2, C].
      implementation: ``"jacobian"`` (contract per-example Jacobians), ``"structured"`` (the
        same with Dense layers factored), ``"ntk_vector_products"`` (VJP then JVP per block pair,
        no Jacobian stored) or ``"auto"`` (cheapest by FLOP count).
      batch_size: examples per block B (rounded up to a multiple of the number of devices).
      precision: contraction inputs in ``"float32"``, ``"tf32"`` (tensor-core TF32 on GPU;
        emulated by rounding on CPU so its error can be measured) or ``"bfloat16"``; always
        accumulated in float32 (float64 when the parameters are float64).
      storage_dtype: ``"float16"``, ``"float32"`` or ``"float64"`` for the returned/stored kernel;
        None keeps the accumulation dtype.
      out: path of a ``.npy`` file to hold the kernel as a memmap, with resume (see module doc).
      memory_bytes: per-device budget for Jacobian features kept at once; None uses half the
        device memory (a quarter of host RAM on CPU).
      param_chunk_size: largest parameter chunk whose Jacobian is formed at once; None chooses
        from the budget (no chunking when a block fits).
      projection_dim: K; if set, the projected kernel of [B, C, K] random features.
      projection: ``"rademacher"`` or ``"gaussian"`` entries of the projection map.
      projection_seed: seeds the projection map.
      devices: devices to shard over; None uses all of ``jax.devices()``.
      progress: show a progress bar over work units with throughput and ETA.

    Returns:
      The kernel (a ``np.memmap`` when ``out`` is given; on a multi-host run with ``out``, None
      on every process but process 0, which owns the file).

    Raises:
      ValueError: an unknown option (the message lists the valid ones), inconsistent inputs, a
        resume record from different arguments, or a non-finite kernel block (named by its rows
        and columns).
    """
    _check_choice("output", output, OUTPUTS)
    _check_choice("implementation", implementation, IMPLEMENTATIONS)
    _check_choice("precision", precision, PRECISIONS)
    _check_choice("projection", projection, PROJECTIONS)
    if storage_dtype is not None:
        _check_choice("storage_dtype", str(storage_dtype), STORAGE_DTYPES)
    for name, value in (("batch_size", batch_size), ("projection_dim", projection_dim or 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    symmetric = x2 is None
    x2 = x1 if symmetric else x2
    if len(x1) == 0 or len(x2) == 0:
        raise ValueError(f"empty inputs: x1 has {len(x1)} examples, x2 has {len(x2)}")
    if tuple(x1.shape[1:]) != tuple(x2.shape[1:]):
        raise ValueError(f"x1 examples have shape {x1.shape[1:]} but x2 examples {x2.shape[1:]}")

    engine = _Engine(
        apply_fn,
        params,
        x1,
        x2,
        symmetric=symmetric,
        output=output,
        batch_size=batch_size,
        precision=precision,
        memory_bytes=memory_bytes,
        param_chunk_size=param_chunk_size,
        projection_dim=projection_dim,
        projection=projection,
        projection_seed=projection_seed,
        devices=list(devices) if devices is not None else jax.devices(),
    )
    if implementation == "auto":
        implementation = engine.cheaper_implementation()
    if implementation != "jacobian" and projection_dim is not None:
        raise ValueError("projection_dim needs implementation='jacobian' (or 'auto')")
    if implementation == "structured":
        engine.use_structure()
    return engine.run(
        implementation,
        storage_dtype=np.dtype(storage_dtype) if storage_dtype else engine.accumulate_dtype,
        out=out,
        progress=progress,
        after_unit=_after_unit,
    )


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(choices)}")


def _default_memory_bytes(device: jax.Device) -> int:
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def _to_host(array: jax.Array) -> np.ndarray:
    """A device array as a NumPy array on every process (gathered across hosts if needed)."""
    if array.is_fully_addressable:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _digest(*arrays: Any) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(np.asarray(array))
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class _Unit:
    """One unit of work: the kernel blocks of a panel's row blocks against one column block."""

    panel: int
    column: int


class _Engine:
    """Holds the compiled per-block functions and the work layout of one kernel computation."""

    def __init__(
        self,
        apply_fn: ApplyFn,
        params: PyTree,
        x1: Any,
        x2: Any,
        *,
        symmetric: bool,
        output: str,
        batch_size: int,
        precision: str,
        memory_bytes: int | None,
        param_chunk_size: int | None,
        projection_dim: int | None,
        projection: str,
        projection_seed: int,
        devices: list[jax.Device],
    ) -> None:
        self.apply_fn, self.x1, self.x2 = apply_fn, x1, x2
        self.symmetric, self.output, self.precision = symmetric, output, precision
        self.projection_dim, self.projection = projection_dim, projection
        self.projection_seed = projection_seed
        self.leaves, self.treedef = jax.tree.flatten(params)
        self.param_dtype = jnp.result_type(*self.leaves)
        self.accumulate_dtype = np.dtype(
            np.float64 if self.param_dtype == jnp.float64 else np.float32
        )
        self.num_params = sum(int(np.prod(leaf.shape)) for leaf in self.leaves)
        example = jax.ShapeDtypeStruct((1, *x1.shape[1:]), self.param_dtype)
        out_shape = jax.eval_shape(apply_fn, params, example).shape
        if len(out_shape) != 2:
            raise ValueError(f"apply_fn must return [B, C] outputs, got shape {out_shape}")
        self.num_outputs = int(out_shape[1])

        self.devices = devices
        self.mesh = Mesh(np.asarray(devices), (_AXIS,))
        self.batch_sharding = NamedSharding(self.mesh, Spec(_AXIS))
        self.replicated = NamedSharding(self.mesh, Spec())
        num_devices = len(devices)
        n_max = max(len(x1), len(x2))
        self.block = min(batch_size, n_max)
        self.block = math.ceil(self.block / num_devices) * num_devices
        self.row_slices = _block_slices(len(x1), self.block)
        self.col_slices = _block_slices(len(x2), self.block)

        itemsize = jnp.dtype(self.param_dtype).itemsize
        budget = memory_bytes if memory_bytes is not None else _default_memory_bytes(devices[0])
        per_device_block = self.block // num_devices
        self.param_groups = self._parameter_groups(
            param_chunk_size, budget // max(1, 3 * per_device_block * self.num_outputs * itemsize)
        )
        self.chunked = len(self.param_groups) > 1 and projection_dim is None
        feature_dim = projection_dim or self.num_params
        block_bytes = per_device_block * self.num_outputs * feature_dim * itemsize
        self.panel_blocks = 1 if self.chunked else max(1, budget // max(block_bytes, 1) - 1)
        self.panel_blocks = min(self.panel_blocks, len(self.row_slices))
        self.dense: tuple[_DenseLayer, ...] = ()  # factored layers (implementation="structured")
        self.leaves = [jax.device_put(leaf, self.replicated) for leaf in self.leaves]

    def dense_layers(self) -> tuple[_DenseLayer, ...]:
        """Dense layers whose kernel can be factored (empty when chunking or projecting)."""
        if self.chunked or self.projection_dim is not None:
            return ()
        return _find_dense_layers(self.apply_fn, self.treedef, self.leaves, self.x1.shape[1:])

    def use_structure(self) -> None:
        """Switches to factored Dense layers: their leaves leave the Jacobian features."""
        if self.chunked or self.projection_dim is not None:
            raise ValueError(
                "implementation='structured' cannot be combined with parameter chunking or "
                "projection_dim; use implementation='jacobian'"
            )
        self.dense = self.dense_layers()
        factored = {i for layer in self.dense for i in layer.leaf_indices}
        self.param_groups = [[i for i in range(len(self.leaves)) if i not in factored]]

    # ----------------------------------------------------------------------------------- layout

    def _parameter_groups(self, chunk_size: int | None, budget_params: int) -> list[list[int]]:
        """Consecutive leaves grouped so each group's Jacobian fits (a leaf is never split)."""
        limit = chunk_size if chunk_size is not None else max(budget_params, 1)
        if chunk_size is None and self.num_params <= limit:
            return [list(range(len(self.leaves)))]
        groups: list[list[int]] = [[]]
        size = 0
        for index, leaf in enumerate(self.leaves):
            leaf_size = int(np.prod(leaf.shape))
            if groups[-1] and size + leaf_size > limit:
                groups.append([])
                size = 0
            groups[-1].append(index)
            size += leaf_size
        return groups

    def units(self) -> list[_Unit]:
        """Work units in execution order (row panels, then column blocks left to right)."""
        units = []
        for panel_start in range(0, len(self.row_slices), self.panel_blocks):
            first = panel_start if self.symmetric else 0
            units += [_Unit(panel_start, j) for j in range(first, len(self.col_slices))]
        return units

    def panel_rows(self, unit: _Unit) -> list[int]:
        """Row blocks of the unit's panel that meet its column (upper triangle if symmetric)."""
        stop = min(unit.panel + self.panel_blocks, len(self.row_slices))
        if self.symmetric:
            stop = min(stop, unit.column + 1)
        return list(range(unit.panel, stop))

    def kernel_shape(self) -> tuple[int, ...]:
        n1, n2, c = len(self.x1), len(self.x2), self.num_outputs
        return {"trace": (n1, n2), "diagonal": (n1, n2, c), "full": (n1, n2, c, c)}[self.output]

    def cheaper_implementation(self) -> str:
        """The cost model in FLOPs: contraction N·C·[FP] + pairs·C·P (C²·P for ``full``),
        NTK-vector products pairs·C·[FP], structured as contraction with each factored Dense
        layer's d_in·d_out parameters replaced by d_in + C·d_out."""
        if self.projection_dim is not None:
            return "jacobian"
        forward = self._forward_flops()
        n1, n2, c, p = len(self.x1), len(self.x2), self.num_outputs, self.num_params
        pairs = n1 * n2 / (2 if self.symmetric else 1)
        per_param = c * c if self.output == "full" else c
        jacobians = (n1 + (0 if self.symmetric else n2)) * c * forward
        costs = {
            "jacobian": jacobians + pairs * p * per_param,
            "ntk_vector_products": pairs * c * forward,
        }
        dense = self.dense_layers()
        if dense:
            factored = sum(layer.num_params for layer in dense)
            factors = sum(layer.d_in + c * layer.d_out for layer in dense)
            costs["structured"] = jacobians + pairs * ((p - factored) * per_param + factors)
        choice = min(costs, key=costs.get)
        logger.info(
            "eNTK cost model (FLOPs): %s -> %s",
            ", ".join(f"{name} {cost:.3g}" for name, cost in costs.items()),
            choice,
        )
        return choice

    def _forward_flops(self) -> float:
        params = jax.tree.unflatten(self.treedef, self.leaves)
        example = jnp.zeros((1, *self.x1.shape[1:]), self.param_dtype)
        try:
            cost = jax.jit(self.apply_fn).lower(params, example).cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            return float(cost["flops"])
        except Exception:  # cost analysis is best effort; every parameter is used at least once
            return 2.0 * self.num_params

    # ------------------------------------------------------------------------ compiled pieces

    def _cache_key(self, *parts: Any) -> tuple:
        avals = tuple((leaf.shape, str(leaf.dtype)) for leaf in self.leaves)
        return (*parts, self.treedef, avals, self.num_outputs, tuple(self.devices))

    def features_fn(self, group: list[int]) -> Callable:
        """``fn(leaves, keys, x[B, ...])``: Jacobian features of one leaf group.

        Returns a tuple with one [B, C, P_leaf] array per leaf of the group (no concatenation
        copy), or a 1-tuple [B, C, K] with a projection; then, per factored Dense layer, its
        inputs [B, d_in] and output sensitivities [B, C, d_out].
        """
        key = self._cache_key(
            "features", self.apply_fn, tuple(group), self.projection_dim, self.projection,
            self.dense,
        )  # fmt: skip
        return _cached(key, lambda: _features_fn(
            self.apply_fn, self.treedef, tuple(group), self.num_outputs, self.projection_dim,
            self.projection, self.mesh, self.dense,
        ))  # fmt: skip

    def projection_keys(self) -> jax.Array:
        """One PRNG key per parameter leaf, so the map does not depend on the chunking."""
        keys = jax.random.split(jax.random.PRNGKey(self.projection_seed), len(self.leaves))
        return jax.device_put(keys, self.replicated)

    def contract_fn(self) -> Callable:
        """``fn(rows, cols)`` -> the kernel block in ``output`` layout, summed over leaves.

        ``rows`` are features sharded over the devices, ``cols`` replicated on each.
        """
        num_plain = len(self.param_groups[0]) if self.dense else None
        biases = tuple(layer.bias is not None for layer in self.dense)
        key = ("contract", self.output, self.precision, tuple(self.devices), num_plain, biases)
        return _cached(
            key, lambda: _contract_fn(self.output, self.precision, self.mesh, num_plain, biases)
        )

    def products_fn(self) -> Callable[[list[jax.Array], jax.Array, jax.Array], jax.Array]:
        """``fn(leaves, rows[B1, ...], cols[B2, ...])`` -> [B1, B2, C, C] by VJP then JVP."""
        key = self._cache_key("products", self.apply_fn)
        return _cached(key, lambda: _products_fn(
            self.apply_fn, self.treedef, self.num_outputs, self.mesh
        ))  # fmt: skip

    def put_block(self, x: Any, rows: slice, *, sharded: bool = True) -> jax.Array:
        """Rows ``x[rows]`` padded to B examples (repeating the last) on the mesh."""
        part = np.asarray(x[rows], dtype=self.param_dtype)
        missing = self.block - part.shape[0]
        if missing:
            part = np.pad(part, [(0, missing)] + [(0, 0)] * (part.ndim - 1), mode="edge")
        sharding = self.batch_sharding if sharded else self.replicated
        return jax.make_array_from_callback(part.shape, sharding, lambda index: part[index])

    # -------------------------------------------------------------------------------- running

    def run(
        self,
        implementation: str,
        *,
        storage_dtype: np.dtype,
        out: str | os.PathLike | None,
        progress: bool,
        after_unit: Callable[[int], None] | None,
    ) -> np.ndarray:
        if implementation == "ntk_vector_products":
            self.panel_blocks = 1  # no Jacobians are stored: one row block per unit
        units = self.units()
        store = _KernelStore(self, implementation, units, storage_dtype=storage_dtype, out=out)
        logger.info(
            "eNTK: N1=%d N2=%d P=%d C=%d output=%s, %s, %d device(s), %d-example blocks, "
            "panels of %d row blocks, %d parameter chunk(s), %d work units (%d already done)%s",
            len(self.x1),
            len(self.x2),
            self.num_params,
            self.num_outputs,
            self.output,
            implementation,
            len(self.devices),
            self.block,
            self.panel_blocks,
            len(self.param_groups),
            len(units),
            store.units_done,
            f", projected to K={self.projection_dim}" if self.projection_dim else "",
        )
        remaining = len(units) - store.units_done
        bar = progress_bar(total=remaining, desc="ntk units", unit="unit", enabled=progress)
        start = time.perf_counter()
        entries_done = 0
        runner = (
            self._products_units
            if implementation == "ntk_vector_products"
            else self._jacobian_units
        )
        try:
            for unit, blocks in runner(units, skip=store.units_done):
                entries = store.write(unit, blocks)
                entries_done += entries
                rate = entries_done / max(time.perf_counter() - start, 1e-9)
                bar.update(1, entries_per_s=f"{rate:.3g}")
                if after_unit is not None:
                    after_unit(store.units_done)
        finally:
            bar.close()
        elapsed = time.perf_counter() - start
        logger.info(
            "eNTK: %s kernel (%d entries) in %.2f s: %.3g entries/s",
            "x".join(map(str, self.kernel_shape())),
            int(np.prod(self.kernel_shape())),
            elapsed,
            entries_done / max(elapsed, 1e-9),
        )
        return store.finish()

    def _jacobian_units(self, units: list[_Unit], *, skip: int) -> Iterator[tuple[_Unit, dict]]:
        """Yields each unit's kernel blocks ``{row block: block}``; skips the first ``skip``."""
        contract = self.contract_fn()
        feature_fns = [self.features_fn(group) for group in self.param_groups]

        keys = self.projection_keys()

        def features(x: Any, rows: slice, group: int | None = None) -> tuple[jax.Array, ...]:
            block = self.put_block(x, rows)
            if group is not None or len(feature_fns) == 1:
                return feature_fns[group or 0](self.leaves, keys, block)
            (total,) = feature_fns[0](self.leaves, keys, block)
            for fn in feature_fns[1:]:  # projected features sum over parameter groups
                total = total + fn(self.leaves, keys, block)[0]
            return (total,)

        def replicated(features: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            # A column block is gathered onto every device once and then contracted with each
            # row block locally (a no-op on one device).
            return jax.device_put(features, self.replicated)

        last_position = {unit.panel: position for position, unit in enumerate(units)}
        panel_features: dict[int, jax.Array] = {}
        current_panel = None
        for position, unit in enumerate(units):
            if last_position[unit.panel] < skip:
                continue  # the whole panel was finished before a resume
            rows = self.panel_rows(unit)
            if self.chunked:
                if position >= skip:
                    yield unit, self._chunked_unit(unit, rows, features, replicated, contract)
                continue
            if unit.panel != current_panel:
                current_panel, panel_features = unit.panel, {}
            panel_end = min(unit.panel + self.panel_blocks, len(self.row_slices))
            in_panel = self.symmetric and unit.column < panel_end
            if in_panel:
                # Symmetric: the column block is one of the panel's own row blocks; columns run
                # left to right, so every row block of this unit is already in the panel. Done
                # even for units finished before a resume, as later units need the features.
                panel_features[unit.column] = features(self.x1, self.row_slices[unit.column])
            if position < skip:
                continue
            if not self.symmetric and not panel_features:
                for i in range(unit.panel, panel_end):
                    panel_features[i] = features(self.x1, self.row_slices[i])
            column = replicated(
                panel_features[unit.column]
                if in_panel
                else features(self.x2, self.col_slices[unit.column])
            )
            yield unit, {i: contract(panel_features[i], column) for i in rows}
            del column

    def _chunked_unit(
        self,
        unit: _Unit,
        rows: list[int],
        features: Callable,
        replicated: Callable,
        contract: Callable,
    ) -> dict[int, jax.Array]:
        """One unit accumulated over parameter chunks (a block's Jacobian does not fit)."""
        (row,) = rows
        total = None
        for group in range(len(self.param_groups)):
            row_features = features(self.x1, self.row_slices[row], group)
            if self.symmetric and unit.column == row:
                col_features = row_features
            else:
                col_features = features(self.x2, self.col_slices[unit.column], group)
            block = contract(row_features, replicated(col_features))
            total = block if total is None else total + block
            del row_features, col_features
        return {row: total}

    def _products_units(self, units: list[_Unit], *, skip: int) -> Iterator[tuple[_Unit, dict]]:
        products = self.products_fn()
        reduce = {
            "full": lambda k: k,
            "trace": lambda k: jnp.einsum("ijcc->ij", k),
            "diagonal": lambda k: jnp.einsum("ijcc->ijc", k),
        }[self.output]
        reduce = jax.jit(reduce)
        for position, unit in enumerate(units):
            if position < skip:
                continue
            (row,) = self.panel_rows(unit)
            rows = self.put_block(self.x1, self.row_slices[row], sharded=False)
            cols = self.put_block(self.x2, self.col_slices[unit.column])
            yield unit, {row: reduce(products(self.leaves, rows, cols))}


@dataclasses.dataclass(frozen=True)
class _DenseLayer:
    """A ``flax.linen.Dense`` applied once to a flat input: its per-example Jacobian is the
    outer product of its input a [d_in] and output sensitivity δ [C, d_out], so its kernel is
    (a_i·a_j + 1[bias]) (δ_i·δ_j): N²·(d_in + C·d_out) FLOPs instead of N²·C·d_in·d_out."""

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


def _find_dense_layers(
    apply_fn: ApplyFn, treedef: Any, leaves: list[jax.Array], example_shape: tuple
) -> tuple[_DenseLayer, ...]:
    """Dense layers of ``apply_fn`` that can be factored, matched to leaves by identity.

    A layer qualifies when it is a ``flax.linen.Dense`` called exactly once per example on a
    [1, d_in] input and its kernel (and bias) are leaves of ``params`` themselves.
    """
    calls: dict[tuple, list] = collections.defaultdict(list)

    def probe(traced: list[jax.Array], x: jax.Array) -> jax.Array:
        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if isinstance(module, nn.Dense) and context.method_name == "__call__":
                params = module.variables.get("params", {})
                kernel = params.get("kernel")
                index = next((i for i, leaf in enumerate(traced) if leaf is kernel), None)
                bias = params.get("bias")
                bias_index = next((i for i, leaf in enumerate(traced) if leaf is bias), None)
                calls[module.path].append((index, bias_index, args[0].shape, bias is None))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            return apply_fn(jax.tree.unflatten(treedef, traced), x)

    example = jax.ShapeDtypeStruct((1, *example_shape), leaves[0].dtype)
    try:
        jax.eval_shape(probe, leaves, example)
    except Exception:  # best effort: a model we cannot probe is contracted unfactored
        return ()
    layers = []
    for found in calls.values():
        if len(found) != 1:
            continue  # called more than once: shared weights, not factorable per call
        kernel, bias, input_shape, no_bias = found[0]
        if kernel is None or len(input_shape) != 2 or input_shape[0] != 1:
            continue
        if not no_bias and bias is None:
            continue
        d_in, d_out = leaves[kernel].shape
        layers.append(_DenseLayer(kernel=kernel, bias=bias, d_in=d_in, d_out=d_out))
    used = [i for layer in layers for i in layer.leaf_indices]
    return tuple(layers) if len(used) == len(set(used)) else ()


_COMPILED: collections.OrderedDict[tuple, Callable] = collections.OrderedDict()
_COMPILED_MAX = 32


def _cached(key: tuple, build: Callable[[], Callable]) -> Callable:
    """Compiled per-block functions shared across calls with the same model and layout."""
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key]
    _COMPILED[key] = fn = build()
    while len(_COMPILED) > _COMPILED_MAX:
        _COMPILED.popitem(last=False)
    return fn


def _features_fn(
    apply_fn: ApplyFn,
    treedef: Any,
    group: tuple[int, ...],
    num_outputs: int,
    projection_dim: int | None,
    projection: str,
    mesh: Mesh,
    dense: tuple[_DenseLayer, ...] = (),
) -> Callable:
    def per_device(leaves: list[jax.Array], keys: jax.Array, x: jax.Array) -> tuple:
        def outputs(group_leaves: list[jax.Array], example: jax.Array) -> jax.Array:
            merged = list(leaves)
            for position, index in enumerate(group):
                merged[index] = group_leaves[position]
            return apply_fn(jax.tree.unflatten(treedef, merged), example[None])[0]

        if dense:
            return _structured_features(apply_fn, treedef, group, dense, leaves, x, num_outputs)

        # Mark the replicated parameters as varying over devices: otherwise the derivative with
        # respect to them would be summed over the devices' examples.
        group_leaves = [jax.lax.pcast(leaves[i], _AXIS, to="varying") for i in group]
        jacobians = jax.vmap(jax.jacrev(outputs), in_axes=(None, 0))(group_leaves, x)
        pieces = [jac.reshape(x.shape[0], num_outputs, -1) for jac in jacobians]
        if projection_dim is None:
            return tuple(pieces)
        projected = [
            _project(piece, keys[index], projection_dim, projection)
            for piece, index in zip(pieces, group, strict=True)
        ]
        return (sum(projected[1:], projected[0]),)

    specs = (Spec(), Spec(), Spec(_AXIS))
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=Spec(_AXIS)))


def _structured_features(
    apply_fn: ApplyFn,
    treedef: Any,
    group: tuple[int, ...],
    dense: tuple[_DenseLayer, ...],
    leaves: list[jax.Array],
    x: jax.Array,
    num_outputs: int,
) -> tuple[jax.Array, ...]:
    """Per-example Jacobians [B, C, P_leaf] of the unfactored leaves, then per Dense layer its
    inputs [B, d_in] and the output sensitivities ∂f/∂y [B, C, d_out] (a zero perturbation added
    to the layer's output and differentiated)."""

    def outputs(group_leaves: list[jax.Array], perturbations: list[jax.Array], example):
        merged = list(leaves)
        for position, index in enumerate(group):
            merged[index] = group_leaves[position]
        kernels = {id(merged[layer.kernel]): position for position, layer in enumerate(dense)}
        inputs: dict[int, jax.Array] = {}

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if isinstance(module, nn.Dense) and context.method_name == "__call__":
                position = kernels.get(id(module.variables["params"]["kernel"]))
                if position is not None:
                    inputs[position] = args[0][0]
                    return next_fun(*args, **kwargs) + perturbations[position][None]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            out = apply_fn(jax.tree.unflatten(treedef, merged), example[None])[0]
        return out, [inputs[position] for position in range(len(dense))]

    group_leaves = [jax.lax.pcast(leaves[i], _AXIS, to="varying") for i in group]
    perturbations = [
        jax.lax.pcast(jnp.zeros((layer.d_out,), x.dtype), _AXIS, to="varying") for layer in dense
    ]
    jacobian = jax.jacrev(outputs, argnums=(0, 1), has_aux=True)
    (leaf_jacobians, sensitivities), inputs = jax.vmap(jacobian, in_axes=(None, None, 0))(
        group_leaves, perturbations, x
    )
    b = x.shape[0]
    features = [jac.reshape(b, num_outputs, -1) for jac in leaf_jacobians]
    for layer_inputs, layer_sensitivities in zip(inputs, sensitivities, strict=True):
        features += [layer_inputs, layer_sensitivities]
    return tuple(features)


def _project(jacobian: jax.Array, key: jax.Array, dim: int, projection: str) -> jax.Array:
    """[B, C, P_leaf] -> [B, C, K] through a seeded random map generated P_leaf rows at a time."""
    b, c, size = jacobian.shape
    chunk = min(size, _PROJECTION_CHUNK)
    num_chunks = math.ceil(size / chunk)
    padded = jnp.pad(jacobian, ((0, 0), (0, 0), (0, num_chunks * chunk - size)))
    padded = padded.reshape(b * c, num_chunks, chunk).transpose(1, 0, 2)

    def step(total: jax.Array, inputs: tuple[jax.Array, jax.Array]) -> tuple:
        index, piece = inputs
        chunk_key = jax.random.fold_in(key, index)
        if projection == "rademacher":
            matrix = jax.random.rademacher(chunk_key, (chunk, dim), dtype=piece.dtype)
        else:
            matrix = jax.random.normal(chunk_key, (chunk, dim), dtype=piece.dtype)
        return total + piece @ matrix, None

    total = jax.lax.pcast(jnp.zeros((b * c, dim), jacobian.dtype), _AXIS, to="varying")
    total, _ = jax.lax.scan(step, total, (jnp.arange(num_chunks), padded))
    return (total / jnp.sqrt(jnp.asarray(dim, jacobian.dtype))).reshape(b, c, dim)


def _dot(a: jax.Array, b: jax.Array, spec: str, precision: str, platform: str) -> jax.Array:
    """``einsum(spec, a, b)`` at the given precision, accumulated in the inputs' dtype."""
    accumulate = a.dtype
    if precision == "bfloat16":
        a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
        return jnp.einsum(spec, a, b, preferred_element_type=accumulate)
    if precision == "tf32":
        if platform == "gpu":
            preset = jax.lax.DotAlgorithmPreset.TF32_TF32_F32
            return jnp.einsum(spec, a, b, precision=preset, preferred_element_type=accumulate)
        # CPUs have no TF32 unit: round the inputs to TF32 (10-bit mantissa) as tensor cores do.
        a = jax.lax.reduce_precision(a, exponent_bits=8, mantissa_bits=10)
        b = jax.lax.reduce_precision(b, exponent_bits=8, mantissa_bits=10)
    return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST)


def _contract_fn(
    output: str,
    precision: str,
    mesh: Mesh,
    num_plain: int | None = None,
    biases: tuple[bool, ...] = (),
) -> Callable:
    """Contraction of feature tuples; with ``num_plain`` the entries after the first
    ``num_plain`` are (inputs, sensitivities) pairs of factored Dense layers."""
    platform = mesh.devices.flat[0].platform

    def factored(rows: tuple, cols: tuple, bias: bool) -> jax.Array:
        (a_rows, d_rows), (a_cols, d_cols) = rows, cols
        inputs = _dot(a_rows, a_cols, "if,jf->ij", precision, platform) + (1.0 if bias else 0.0)
        if output == "trace":
            b1, b2 = d_rows.shape[0], d_cols.shape[0]
            flat = (d_rows.reshape(b1, -1), d_cols.reshape(b2, -1))
            return inputs * _dot(*flat, "if,jf->ij", precision, platform)
        if output == "diagonal":
            return inputs[:, :, None] * _dot(d_rows, d_cols, "icf,jcf->ijc", precision, platform)
        return inputs[:, :, None, None] * _dot(d_rows, d_cols, "icf,jdf->ijcd", precision, platform)

    def leaf(rows: jax.Array, cols: jax.Array) -> jax.Array:
        if output == "trace":
            b1, b2 = rows.shape[0], cols.shape[0]
            return _dot(
                rows.reshape(b1, -1), cols.reshape(b2, -1), "if,jf->ij", precision, platform
            )
        if output == "diagonal":
            return _dot(rows, cols, "icf,jcf->ijc", precision, platform)
        return _dot(rows, cols, "icf,jdf->ijcd", precision, platform)

    def per_device(rows: tuple[jax.Array, ...], cols: tuple[jax.Array, ...]) -> jax.Array:
        plain = len(rows) if num_plain is None else num_plain
        blocks = [leaf(r, c) for r, c in zip(rows[:plain], cols[:plain], strict=True)]
        for position, bias in enumerate(biases):
            pair = slice(plain + 2 * position, plain + 2 * position + 2)
            blocks.append(factored(rows[pair], cols[pair], bias))
        return sum(blocks[1:], blocks[0])

    specs = (Spec(_AXIS), Spec())
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=Spec(_AXIS)))


def _products_fn(apply_fn: ApplyFn, treedef: Any, num_outputs: int, mesh: Mesh) -> Callable:
    def per_device(leaves: list[jax.Array], rows: jax.Array, cols: jax.Array) -> jax.Array:
        params = jax.tree.unflatten(treedef, leaves)

        def column(example: jax.Array, cotangent: jax.Array) -> jax.Array:
            _, pullback = jax.vjp(lambda p: apply_fn(p, example[None])[0], params)
            (tangent,) = pullback(cotangent)
            return jax.jvp(lambda p: apply_fn(p, rows), (params,), (tangent,))[1]

        basis = jnp.eye(num_outputs, dtype=rows.dtype)
        per_column = jax.vmap(jax.vmap(column, in_axes=(None, 0)), in_axes=(0, None))
        values = per_column(cols, basis)  # [B2 local, C (d), B1, C (c)]
        return values.transpose(2, 0, 3, 1)  # [B1, B2 local, C, C]

    return jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(Spec(), Spec(), Spec(_AXIS)),
            out_specs=Spec(None, _AXIS),
            check_vma=False,  # the cotangent basis is the same on every device
        )
    )


def _block_slices(n: int, block: int) -> list[slice]:
    return [slice(start, min(start + block, n)) for start in range(0, n, block)]


class _KernelStore:
    """The kernel in memory or as a resumable ``.npy`` memmap; writes and mirrors unit blocks."""

    def __init__(
        self,
        engine: _Engine,
        implementation: str,
        units: list[_Unit],
        *,
        storage_dtype: np.dtype,
        out: str | os.PathLike | None,
    ) -> None:
        self.engine, self.units = engine, units
        self.storage_dtype = storage_dtype
        self.units_done = 0
        shape = engine.kernel_shape()
        self.is_writer = jax.process_index() == 0
        if out is None:
            self.kernel = np.empty(shape, dtype=storage_dtype)
            self.record_path = None
            return
        self.path = Path(out)
        self.record_path = self.path.with_name(self.path.name + ".progress.json")
        self.identity = {
            "shape": list(shape),
            "storage_dtype": storage_dtype.name,
            "implementation": implementation,
            "output": engine.output,
            "precision": engine.precision,
            "block": engine.block,
            "panel_blocks": engine.panel_blocks,
            "param_groups": len(engine.param_groups),
            "projection_dim": engine.projection_dim,
            "projection": engine.projection,
            "projection_seed": engine.projection_seed,
            "symmetric": engine.symmetric,
            "inputs_sha256": _digest(engine.x1, *(() if engine.symmetric else (engine.x2,))),
            "params_sha256": _digest(*[np.asarray(leaf) for leaf in engine.leaves]),
        }
        if not self.is_writer:  # multi-host: process 0 owns the file; the others only compute
            self.kernel = None
        elif self.record_path.exists() and self.path.exists():
            record = json.loads(self.record_path.read_text())
            if record["identity"] != self.identity:
                changed = sorted(
                    key
                    for key in self.identity
                    if record["identity"].get(key) != self.identity[key]
                )
                raise ValueError(
                    f"{self.path} has a resume record from different arguments (changed: "
                    f"{', '.join(changed)}); delete {self.path} and {self.record_path} to start over"
                )
            self.units_done = int(record["units_done"])
            self.kernel = np.load(self.path, mmap_mode="r+", allow_pickle=False)
            logger.info(
                "eNTK: resuming %s after %d of %d units", self.path, self.units_done, len(units)
            )
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.kernel = np.lib.format.open_memmap(
                self.path, mode="w+", dtype=storage_dtype, shape=shape
            )
            self._save_record()
        if jax.process_count() > 1:  # every process must skip the same units
            done = multihost_utils.broadcast_one_to_all(np.int64(self.units_done))
            self.units_done = int(done)

    def _save_record(self) -> None:
        if self.record_path is None or not self.is_writer:
            return
        record = {
            "identity": self.identity,
            "units_done": self.units_done,
            "units_total": len(self.units),
            "complete": self.units_done == len(self.units),
        }
        temp = self.record_path.with_name(f".{self.record_path.name}.tmp")
        temp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(temp, self.record_path)

    def write(self, unit: _Unit, blocks: dict[int, jax.Array]) -> int:
        """Stores a unit's blocks (and their mirror images); returns the entries written."""
        engine = self.engine
        cols = engine.col_slices[unit.column]
        entries = 0
        for i, block in blocks.items():
            rows = engine.row_slices[i]
            values = _to_host(block)[: rows.stop - rows.start, : cols.stop - cols.start]
            if not np.all(np.isfinite(values)):
                raise ValueError(
                    f"kernel block rows {rows.start}:{rows.stop}, cols {cols.start}:{cols.stop} "
                    f"has non-finite values ({np.sum(~np.isfinite(values))} of {values.size}); "
                    "check the model parameters and inputs"
                )
            stored = values.astype(self.storage_dtype)
            if not np.all(np.isfinite(stored)):
                raise ValueError(
                    f"kernel block rows {rows.start}:{rows.stop}, cols {cols.start}:{cols.stop} "
                    f"overflows storage dtype {self.storage_dtype.name}; use a wider storage_dtype"
                )
            mirrored = engine.symmetric and rows != cols
            entries += values.shape[0] * values.shape[1] * (2 if mirrored else 1)
            if self.kernel is None:
                continue
            self.kernel[rows, cols] = stored
            if mirrored:  # K[j, i] = K[i, j]ᵀ, with the logit axes swapped for "full"
                axes = (1, 0, 3, 2) if engine.output == "full" else (1, 0, *range(2, stored.ndim))
                self.kernel[cols, rows] = stored.transpose(axes)
        self.units_done += 1
        if self.record_path is not None and self.kernel is not None:
            self.kernel.flush()  # the blocks reach the file before the record counts them
            self._save_record()
        return entries

    def finish(self) -> np.ndarray | None:
        if self.record_path is not None and self.kernel is not None:
            self.kernel.flush()
        return self.kernel
