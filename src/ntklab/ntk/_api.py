"""The public kernel function :func:`empirical_ntk` and the engine's option vocabulary.

Dimensions: N examples (N1 rows, N2 columns), P parameters, C outputs (logits), B examples per
block, F features per output (P, or the projection dimension), D devices.

    kernel = empirical_ntk(apply_fn, params, x)                     # x [N, H, W, C] -> [N, N]
    cross = empirical_ntk(apply_fn, params, x1, x2)                 # -> [N1, N2]
    full = empirical_ntk(apply_fn, params, x, output="full")        # C logits -> [N, N, C, C]
    big = empirical_ntk(apply_fn, params, x, out="kernel.npy")      # disk-backed, resumable
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import numpy as np

from ntklab import threads
from ntklab.ntk import _problem, _schedule, _units
from ntklab.ntk._store import KernelStore
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


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raises ValueError naming ``value`` and the valid ``choices``."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(choices)}")


def check_positive_int(name: str, value: Any) -> None:
    """Raises ValueError naming ``value`` unless it is a positive int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


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
    """Computes the empirical NTK Θ[i, j, c, d] = ∇θ f_c(θ, x_i) · ∇θ f_d(θ, x_j).

    The inputs are cut into blocks of B examples sharded over the devices (``shard_map``). The
    contraction implementations compute each block's per-example Jacobian features once per pass,
    keep as many row blocks as the memory budget allows (a panel) and fill the kernel with one
    matrix product per block pair (for ``x2=None`` only the upper triangle, mirrored); if one
    block's Jacobian does not fit, the parameters are split into chunks of whole leaves.
    ``"structured"`` factors every Dense layer proven exact (see ``ntklab.ntk._structure``): its
    kernel is (a_i·a_j + 1)(δ_i·δ_j). ``"ntk_vector_products"`` stores no Jacobians (VJP then
    JVP per block pair). With ``projection_dim`` the features are multiplied by a seeded random
    map [P, K] / √K generated in chunks (the projected NTK).

    Args:
      apply_fn: ``apply_fn(params, x[B, ...]) -> [B, C]``; evaluated on sharded blocks, so each
        output must depend only on its own input (BatchNorm in inference mode).
      params: the parameters θ to differentiate with respect to (a pytree, P scalars in all).
      x1: row inputs [N1, ...].
      x2: column inputs [N2, ...]; None means x2 is x1 and only the upper triangle is computed.
      output: ``"trace"`` [N1, N2] (sum over logits; the scalar kernel when C = 1), ``"full"``
        [N1, N2, C, C] or ``"diagonal"`` [N1, N2, C].
      implementation: ``"jacobian"`` (contract per-example Jacobians), ``"structured"`` (the
        same with provably exact Dense layers factored), ``"ntk_vector_products"`` or ``"auto"``
        (cheapest by the cost model of ``ntklab.ntk._schedule.choose_plan``).
      batch_size: examples per block B (rounded up to a multiple of the number of devices).
      precision: contraction inputs in ``"float32"``, ``"tf32"`` (tensor-core TF32 on GPU;
        emulated by rounding on CPU) or ``"bfloat16"``; accumulated in float32 (float64 when the
        parameters are float64).
      storage_dtype: ``"float16"``, ``"float32"`` or ``"float64"`` for the returned/stored kernel;
        None keeps the accumulation dtype.
      out: path of a ``.npy`` file to hold the kernel as a checked, resumable memmap (see
        ``ntklab.ntk._store``): a run stopped at any point and restarted with the same arguments
        (any batch size, memory budget or device count) continues after the last finished unit.
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
      The kernel [N1, N2] / [N1, N2, C] / [N1, N2, C, C] (a ``np.memmap`` when ``out`` is
      given; on a multi-host run with ``out``, None on every process but process 0).

    Raises:
      ValueError: an unknown option (the message lists the valid ones), inconsistent inputs, a
        resume record from different arguments, or a non-finite kernel block (named by its rows
        and columns).
      OSError: not enough disk space for ``out`` (the message names the bytes needed and free).
      KernelInUseError: another process is writing the same ``out``.
    """
    _check_options(
        output=output, implementation=implementation, precision=precision,
        projection=projection, storage_dtype=storage_dtype, batch_size=batch_size,
        projection_dim=projection_dim, memory_bytes=memory_bytes,
        param_chunk_size=param_chunk_size,
    )  # fmt: skip
    symmetric = x2 is None
    x2 = x1 if symmetric else x2
    if len(x1) == 0 or len(x2) == 0:
        raise ValueError(f"empty inputs: x1 has {len(x1)} examples, x2 has {len(x2)}")
    if tuple(x1.shape[1:]) != tuple(x2.shape[1:]):
        raise ValueError(f"x1 examples have shape {x1.shape[1:]} but x2 examples {x2.shape[1:]}")

    problem = _problem.make_problem(
        apply_fn, params, x1, x2, symmetric=symmetric, output=output, precision=precision,
        projection_dim=projection_dim, projection=projection, projection_seed=projection_seed,
        devices=tuple(devices) if devices is not None else tuple(jax.devices()),
    )  # fmt: skip
    plan = _schedule.choose_plan(
        problem, implementation, batch_size=batch_size, memory_bytes=memory_bytes,
        param_chunk_size=param_chunk_size,
    )  # fmt: skip
    dtype = np.dtype(storage_dtype) if storage_dtype else problem.accumulate_dtype
    return run_plan(plan, storage_dtype=dtype, out=out, progress=progress, after_unit=_after_unit)


def _check_options(
    *,
    output: str,
    implementation: str,
    precision: str,
    projection: str,
    storage_dtype: str | None,
    batch_size: int,
    projection_dim: int | None,
    memory_bytes: int | None,
    param_chunk_size: int | None,
) -> None:
    """Raises ValueError naming a bad option of :func:`empirical_ntk` and the valid choices."""
    check_choice("output", output, OUTPUTS)
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    check_choice("precision", precision, PRECISIONS)
    check_choice("projection", projection, PROJECTIONS)
    if storage_dtype is not None:
        check_choice("storage_dtype", str(storage_dtype), STORAGE_DTYPES)
    check_positive_int("batch_size", batch_size)
    if projection_dim is not None:
        check_positive_int("projection_dim", projection_dim)
    for name, value in (("memory_bytes", memory_bytes), ("param_chunk_size", param_chunk_size)):
        if value is not None:
            check_positive_int(name, value)
    if projection_dim is not None and implementation not in ("auto", "jacobian"):
        raise ValueError("projection_dim needs implementation='jacobian' (or 'auto')")


def run_plan(
    plan: _schedule.Plan,
    *,
    storage_dtype: np.dtype,
    out: str | os.PathLike | None,
    progress: bool,
    after_unit: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Computes every unit of ``plan`` not yet in the store; returns the kernel."""
    p = plan.problem
    units = plan.units()
    store = KernelStore(plan, units, storage_dtype=storage_dtype, out=out)
    try:
        logger.info(
            "eNTK: N1=%d N2=%d P=%d C=%d output=%s, %s, %d device(s), %d-example blocks, "
            "panels of %d row blocks, %d parameter chunk(s), %d factored layer(s), %d work units "
            "(%d already done)%s",
            len(p.x1), len(p.x2), p.num_params, p.num_outputs, p.output, plan.implementation,
            len(p.devices), plan.block, plan.panel_blocks, len(plan.param_groups),
            plan.num_factored, len(units), len(store.done),
            f", projected to K={p.projection_dim}" if p.projection_dim else "",
        )  # fmt: skip
        runner = (
            _units.products_units
            if plan.implementation == "ntk_vector_products"
            else _units.jacobian_units
        )
        remaining = len(units) - len(store.done)
        logger.info("eNTK: BLAS threads %s", threads.describe())
        bar = progress_bar(total=remaining, desc="ntk units", unit="unit", enabled=progress)
        start = time.perf_counter()
        entries_done = 0
        try:
            # The host contraction (NumPy's BLAS) interleaves with XLA's feature blocks: one
            # BLAS thread per call, so no BLAS worker spins on a core that XLA needs
            # (ntklab.threads); ``_units`` shares row blocks out to one worker per CPU.
            with threads.beside_xla():
                for position, unit, blocks in runner(plan, units, done=set(store.done)):
                    entries_done += store.write(position, unit, blocks)
                    rate = entries_done / max(time.perf_counter() - start, 1e-9)
                    bar.update(1, entries_per_s=f"{rate:.3g}")
                    if after_unit is not None:
                        after_unit(len(store.done))
        finally:
            bar.close()
        elapsed = time.perf_counter() - start
        shape = p.kernel_shape()
        logger.info(
            "eNTK: %s kernel (%d entries) in %.2f s: %.3g entries/s",
            "x".join(map(str, shape)), int(np.prod(shape)), elapsed,
            entries_done / max(elapsed, 1e-9),
        )  # fmt: skip
        return store.finish()
    finally:
        store.close()
