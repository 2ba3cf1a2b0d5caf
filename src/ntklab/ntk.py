"""Empirical neural tangent kernel engine.

Dimensions: N examples (N1 rows, N2 columns), P parameters, B examples per block.

    kernel = empirical_ntk(apply_fn, params, x)           # x [N, H, W, C]  -> [N, N]
    cross = empirical_ntk(apply_fn, params, x1, x2)       # x1 [N1, ...], x2 [N2, ...] -> [N1, N2]

For a scalar-output network f(θ, x) the kernel is K[i, j] = ∇θ f(θ, x_i) · ∇θ f(θ, x_j). The engine
cuts the inputs into blocks of B examples, computes each block's per-example Jacobian [B, P] once,
keeps as many row blocks as the memory budget allows (a "panel"), and fills the kernel with one
matrix product per block pair. When ``x2`` is None only the upper triangle is computed and mirrored.
Callers see only :func:`empirical_ntk`; everything else here is private.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ntklab.progress import progress_bar
from ntklab.types import ApplyFn, PyTree

logger = logging.getLogger(__name__)

Implementation = Literal["jacobian"]
Precision = Literal["highest", "high", "default"]

_PRECISIONS: dict[str, jax.lax.Precision] = {
    "highest": jax.lax.Precision.HIGHEST,
    "high": jax.lax.Precision.HIGH,
    "default": jax.lax.Precision.DEFAULT,
}

JacobianFn = Callable[[jax.Array, jax.Array], jax.Array]


def empirical_ntk(
    apply_fn: ApplyFn,
    params: PyTree,
    x1: np.ndarray | jax.Array,
    x2: np.ndarray | jax.Array | None = None,
    *,
    batch_size: int = 256,
    implementation: Implementation = "jacobian",
    precision: Precision = "highest",
    memory_bytes: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Computes the empirical NTK of a scalar-output network.

    Args:
      apply_fn: ``apply_fn(params, x[B, ...]) -> [B, 1]``; evaluated per example, so any
        BatchNorm must be in inference mode.
      params: the parameters θ to differentiate with respect to (a pytree, P scalars in all).
      x1: row inputs [N1, ...].
      x2: column inputs [N2, ...]; None means x2 is x1 and only the upper triangle is computed.
      batch_size: examples per block B; each block's Jacobian [B, P] is one device array.
      implementation: how blocks are computed; ``"jacobian"`` contracts per-example Jacobians.
      precision: matmul precision of the contraction (``"highest"`` is full float32 on GPUs).
      memory_bytes: budget for the Jacobian blocks kept on the device; None picks half the
        device memory (a quarter of host RAM on CPU). When the row blocks do not all fit, rows are
        processed in panels and column Jacobians are recomputed once per panel.
      progress: show a progress bar over block pairs.

    Returns:
      kernel [N1, N2] as a NumPy array of the parameters' floating dtype.

    Raises:
      ValueError: bad option values, a non-scalar output, or a kernel block with non-finite values
        (the error names the block's rows and columns).
    """
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {implementation!r}; valid choices: {', '.join(_IMPLEMENTATIONS)}"
        )
    if precision not in _PRECISIONS:
        raise ValueError(
            f"unknown precision {precision!r}; valid choices: {', '.join(_PRECISIONS)}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    symmetric = x2 is None
    x2 = x1 if symmetric else x2
    if len(x1) == 0 or len(x2) == 0:
        raise ValueError(f"empty inputs: x1 has {len(x1)} examples, x2 has {len(x2)}")
    if tuple(x1.shape[1:]) != tuple(x2.shape[1:]):
        raise ValueError(f"x1 examples have shape {x1.shape[1:]} but x2 examples {x2.shape[1:]}")
    return _IMPLEMENTATIONS[implementation](
        apply_fn,
        params,
        x1,
        x2,
        symmetric=symmetric,
        batch_size=batch_size,
        precision=_PRECISIONS[precision],
        memory_bytes=memory_bytes,
        progress=progress,
    )


def _per_example_jacobian_fn(apply_fn: ApplyFn, params: PyTree, example_shape: tuple) -> tuple:
    """Returns ``(jac_fn, theta)``: ``jac_fn(theta, x[B, ...]) -> [B, P]`` and flat θ [P]."""
    theta, unravel = ravel_pytree(params)
    out = jax.eval_shape(apply_fn, params, jax.ShapeDtypeStruct((1, *example_shape), theta.dtype))
    if out.ndim != 2 or out.shape[1] != 1:
        raise ValueError(
            f"empirical_ntk needs a scalar-output apply_fn returning [B, 1]; got output shape "
            f"{out.shape} (build the model with num_outputs=1)"
        )

    def scalar_output(theta: jax.Array, x: jax.Array) -> jax.Array:
        return apply_fn(unravel(theta), x[None])[0, 0]

    jac_fn = jax.jit(jax.vmap(jax.grad(scalar_output), in_axes=(None, 0)))
    return jac_fn, theta


def _block_slices(n: int, block: int) -> list[slice]:
    return [slice(start, min(start + block, n)) for start in range(0, n, block)]


def _padded(x: np.ndarray | jax.Array, rows: slice, block: int) -> np.ndarray | jax.Array:
    """Rows ``x[rows]`` padded to ``block`` examples by repeating the last row (one jit shape)."""
    part = x[rows]
    missing = block - part.shape[0]
    if missing == 0:
        return part
    pad = [(0, missing)] + [(0, 0)] * (part.ndim - 1)
    return np.pad(np.asarray(part), pad, mode="edge")


def _default_memory_bytes() -> int:
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def _check_finite(block: np.ndarray, rows: slice, cols: slice) -> None:
    if not np.all(np.isfinite(block)):
        raise ValueError(
            f"kernel block rows {rows.start}:{rows.stop}, cols {cols.start}:{cols.stop} has "
            f"non-finite values ({np.sum(~np.isfinite(block))} of {block.size}); check the model "
            "parameters and inputs"
        )


def _jacobian_contraction(
    apply_fn: ApplyFn,
    params: PyTree,
    x1: np.ndarray | jax.Array,
    x2: np.ndarray | jax.Array,
    *,
    symmetric: bool,
    batch_size: int,
    precision: jax.lax.Precision,
    memory_bytes: int | None,
    progress: bool,
) -> np.ndarray:
    """Kernel by per-example Jacobian blocks contracted pairwise; see :func:`empirical_ntk`."""
    n1, n2 = len(x1), len(x2)
    jac_fn, theta = _per_example_jacobian_fn(apply_fn, params, tuple(x1.shape[1:]))
    num_params = theta.size
    block = min(batch_size, max(n1, n2))
    row_slices, col_slices = _block_slices(n1, block), _block_slices(n2, block)
    budget = _default_memory_bytes() if memory_bytes is None else memory_bytes
    block_bytes = block * num_params * theta.dtype.itemsize
    panel_blocks = max(1, min(len(row_slices), budget // block_bytes - 1))

    contract = jax.jit(lambda a, b: jnp.matmul(a, b.T, precision=precision))

    def jacobian(x: np.ndarray | jax.Array, rows: slice) -> jax.Array:
        return jac_fn(theta, jnp.asarray(_padded(x, rows, block), dtype=theta.dtype))

    if symmetric:
        num_pairs = len(row_slices) * (len(row_slices) + 1) // 2
    else:
        num_pairs = len(row_slices) * len(col_slices)
    num_panels = math.ceil(len(row_slices) / panel_blocks)
    logger.info(
        "eNTK: N1=%d N2=%d P=%d, %d-example blocks, %d block pairs, %d panel(s) of up to %d row "
        "blocks (%.2f GB each block)",
        n1,
        n2,
        num_params,
        block,
        num_pairs,
        num_panels,
        panel_blocks,
        block_bytes / 1e9,
    )
    kernel = np.empty((n1, n2), dtype=np.dtype(theta.dtype))
    bar = progress_bar(total=num_pairs, desc="ntk block pairs", unit="pair", enabled=progress)
    start_time = time.perf_counter()
    entries_done = 0
    jacobians_computed = 0

    def fill(rows: slice, cols: slice, jac_rows: jax.Array, jac_cols: jax.Array) -> None:
        nonlocal entries_done
        values = np.asarray(contract(jac_rows, jac_cols))[: rows.stop - rows.start]
        values = values[:, : cols.stop - cols.start]
        _check_finite(values, rows, cols)
        kernel[rows, cols] = values
        if symmetric and rows != cols:
            kernel[cols, rows] = values.T
        entries_done += values.size * (2 if symmetric and rows != cols else 1)
        elapsed = time.perf_counter() - start_time
        bar.update(1, entries_per_s=f"{entries_done / max(elapsed, 1e-9):.3g}")

    try:
        for panel_start in range(0, len(row_slices), panel_blocks):
            panel = list(range(panel_start, min(panel_start + panel_blocks, len(row_slices))))
            panel_jacobians: dict[int, jax.Array] = {}
            for i in panel:
                panel_jacobians[i] = jacobian(x1, row_slices[i])
                jacobians_computed += 1
                if symmetric:
                    for j in range(panel_start, i + 1):
                        fill(row_slices[j], row_slices[i], panel_jacobians[j], panel_jacobians[i])
            first_col = panel[-1] + 1 if symmetric else 0
            for j in range(first_col, len(col_slices)):
                jac_col = jacobian(x2, col_slices[j])
                jacobians_computed += 1
                for i in panel:
                    fill(row_slices[i], col_slices[j], panel_jacobians[i], jac_col)
            del panel_jacobians
    finally:
        bar.close()
    elapsed = time.perf_counter() - start_time
    logger.info(
        "eNTK: %d x %d kernel (%d entries) in %.2f s: %.3g entries/s, %d block Jacobians",
        n1,
        n2,
        n1 * n2,
        elapsed,
        n1 * n2 / max(elapsed, 1e-9),
        jacobians_computed,
    )
    return kernel


_IMPLEMENTATIONS: dict[str, Callable[..., np.ndarray]] = {"jacobian": _jacobian_contraction}
