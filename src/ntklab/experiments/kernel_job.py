"""compute_ntk's numerical part: the kernel (whole, and per layer when it fits), its eigenpairs.

Dimensions: N examples (train first), L layers, k eigenpairs.

    formed = form_kernel(cfg, apply_fn, params, x, run_dir, timings)  # formed.kernel [N, N]
    pairs = eigenpairs(cfg, formed, apply_fn, params, x, timings)      # top-k of the kernel

The kernel is formed in memory by the engine, or as a resumable memmap ``kernel.npy`` (large N,
``ntk.out_of_core``), or not at all (matrix-free solvers). In memory, with the engine's default
options, it is streamed block by block split by layer (``ntklab.ntk.kernel_blocks``) when the L
layer kernels [L, N, N] fit a quarter of the RAM beside it: each layer's Rayleigh quotients of
the initial eigenvectors then come from the same pass (``init_quotients.npz``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from omegaconf import DictConfig

from ntklab import distributed
from ntklab.eigen import (
    MATRIX_FREE_SOLVERS,
    Eigenpairs,
    matrix_free_eigenpairs,
    nystrom_eigenpairs,
    top_eigenpairs,
)
from ntklab.ntk import empirical_ntk, kernel_blocks, layer_names
from ntklab.types import ApplyFn, PyTree

logger = logging.getLogger(__name__)

__all__ = ["FormedKernel", "check_finite", "eigenpairs", "form_kernel", "kernel_summary"]

LAYER_KERNELS_RAM_FRACTION = 0.25
"""The layer kernels [L, N, N] float32 are kept only when they and K fit this fraction of RAM."""


class FormedKernel(NamedTuple):
    """The kernel as compute_ntk formed it.

    Attributes:
      kernel: K [N, N] (array or memmap ``kernel.npy``); None for matrix-free solvers and on
        processes other than 0.
      layers: layer names [L] (``ntklab.ntk.layer_names``) when the layer kernels were kept.
      layer_kernels: [L, N, N] float32, each layer's kernel (they sum to K), or None.
    """

    kernel: np.ndarray | None
    layers: list[str] | None = None
    layer_kernels: np.ndarray | None = None


def form_kernel(
    cfg: DictConfig,
    apply_fn: ApplyFn,
    params: PyTree,
    x: np.ndarray,
    run_dir: Path,
    timings: dict[str, float],
) -> FormedKernel:
    """Forms the kernel ``cfg.ntk`` asks for (see the module docstring), timed as ``kernel_s``."""
    ntk = cfg.ntk
    if ntk.solver in MATRIX_FREE_SOLVERS:
        timings["kernel_s"] = 0.0
        return FormedKernel(None)
    tic = time.perf_counter()
    names = layer_names(params)
    if _by_layer(cfg, len(x), len(names)):
        formed = _form_by_layer(cfg, apply_fn, params, x, names)
    else:
        formed = FormedKernel(_form_with_engine(cfg, apply_fn, params, x, run_dir))
    timings["kernel_s"] = time.perf_counter() - tic
    if not distributed.is_writer():
        return FormedKernel(None)
    check_finite(formed.kernel)
    return formed


def _by_layer(cfg: DictConfig, n: int, num_layers: int) -> bool:
    """Whether the layer kernels are kept: one process, in memory, the engine's default options."""
    ntk = cfg.ntk
    plain = (
        ntk.precision == "float32"
        and ntk.storage_dtype in (None, "float32")
        and ntk.projection_dim is None
        and ntk.param_chunk_size is None
        and ntk.implementation != "ntk_vector_products"
        and not use_out_of_core(ntk.out_of_core, n)
        and not distributed.requested(cfg.get("distributed"))
    )
    if not plain:
        logger.info("layer kernels not kept (options beyond the default in-memory kernel)")
        return False
    needed = 4 * n * n * (num_layers + 1)
    allowed = LAYER_KERNELS_RAM_FRACTION * _ram_bytes()
    if needed > allowed:
        logger.info(
            "layer kernels not kept: %d layers x N^2 floats = %.3g GB over %.3g GB (a quarter "
            "of RAM); the per-layer alignment at θ0 is then measured by the training runs",
            num_layers, needed / 1e9, allowed / 1e9,
        )  # fmt: skip
        return False
    return True


def _form_by_layer(cfg, apply_fn, params, x, names: list[str]) -> FormedKernel:
    """K [N, N] and the layer kernels [L, N, N] from one streamed pass of the engine."""
    n = len(x)
    tic = time.perf_counter()
    kernel = np.empty((n, n), np.float32)
    layer_kernels = np.empty((len(names), n, n), np.float32)
    blocks = kernel_blocks(
        apply_fn, params, x, by_layer=True, batch_size=cfg.ntk.batch_size,
        implementation=cfg.ntk.implementation, memory_bytes=cfg.ntk.memory_bytes, progress=True,
    )  # fmt: skip
    for rows, cols, block, layers in blocks:
        kernel[rows, cols] = block
        layer_kernels[:, rows, cols] = layers
        if rows != cols:  # the lower triangle mirrors the upper; a diagonal block is whole
            kernel[cols, rows] = block.T
            layer_kernels[:, cols, rows] = layers.transpose(0, 2, 1)
    seconds = time.perf_counter() - tic
    logger.info(
        "eNTK: %dx%d kernel (%d entries) with its %d layer kernels in %.2f s: %.3g entries/s",
        n, n, n * n, len(names), seconds, n * n / max(seconds, 1e-9),
    )  # fmt: skip
    return FormedKernel(kernel, names, layer_kernels)


def _form_with_engine(cfg, apply_fn, params, x, run_dir: Path) -> np.ndarray | None:
    """K [N, N] by :func:`ntklab.ntk.empirical_ntk` with every ``ntk.*`` option."""
    ntk = cfg.ntk
    out = None
    if use_out_of_core(ntk.out_of_core, len(x)):
        out = run_dir / "kernel.npy"
        logger.info("kernel kept on disk at %s (resumable: rerun the same command)", out)
    return empirical_ntk(
        apply_fn, params, x, output=ntk.output, implementation=ntk.implementation,
        batch_size=ntk.batch_size, precision=ntk.precision, storage_dtype=ntk.storage_dtype,
        memory_bytes=ntk.memory_bytes, param_chunk_size=ntk.param_chunk_size,
        projection_dim=ntk.projection_dim, projection=ntk.projection, projection_seed=cfg.seed,
        out=out, progress=True,
    )  # fmt: skip


def eigenpairs(
    cfg: DictConfig,
    formed: FormedKernel,
    apply_fn: ApplyFn,
    params: PyTree,
    x: np.ndarray,
    timings: dict[str, float],
) -> Eigenpairs:
    """The top ``ntk.num_eigvecs`` eigenpairs of the formed kernel, or matrix-free; timed."""
    ntk = cfg.ntk
    tic = time.perf_counter()
    if formed.kernel is not None:
        dtype, solver = eigen_precision(ntk.eigen_dtype, ntk.solver, len(formed.kernel))
        logger.info("eigensolve in %s by %s", dtype, solver)
        pairs = top_eigenpairs(
            formed.kernel, ntk.num_eigvecs, solver=solver, dtype=dtype, seed=cfg.seed,
            progress=True,
        )  # fmt: skip
    else:
        options = {"batch_size": ntk.batch_size, "seed": cfg.seed,
                   "implementation": ntk.implementation, "memory_bytes": ntk.memory_bytes}  # fmt: skip
        if ntk.solver == "matrix_free":
            pairs = matrix_free_eigenpairs(
                apply_fn, params, x, ntk.num_eigvecs, progress=True, **options
            )
        else:
            pairs = nystrom_eigenpairs(
                apply_fn, params, x, ntk.num_eigvecs, num_landmarks=ntk.nystrom_dims, **options
            )
    timings["eigen_s"] = time.perf_counter() - tic
    return pairs


FLOAT64_MAX_N = 10_000
"""``ntk.eigen_dtype=auto`` solves in float64 up to this N (LAPACK's ``evr`` on a float64 copy)."""


def eigen_precision(eigen_dtype: str, solver: str, n: int) -> tuple[str, str]:
    """The eigensolve's precision and solver for ``ntk.eigen_dtype`` and ``ntk.solver``.

    A float32 solve's eigenvectors change with the BLAS thread count where the spectrum is dense
    (measured on the LeNet CIFAR kernel, docs/eigensolvers.md): labels sign(φ_k) must not depend
    on the machine's load, so ``auto`` solves in float64 while N ≤ ``FLOAT64_MAX_N``, with
    LAPACK's ``evr`` when the solver is ``auto`` (faster than a float64 Chebyshev there).
    Beyond, float32, where unresolved pairs are flagged (``eigen_gaps.npy``).
    """
    dtype = eigen_dtype
    if dtype == "auto":
        dtype = "float64" if n <= FLOAT64_MAX_N else "float32"
    if solver == "auto" and dtype == "float64" and n <= FLOAT64_MAX_N:
        solver = "evr"
    return dtype, solver


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_finite(kernel: np.ndarray, *, rows_per_block: int = 4096) -> None:
    """Raises ValueError naming the first non-finite entry of a kernel [N, N] (read by row blocks).

    Raises:
      ValueError: an entry is NaN or infinite (the message gives how many, in how many rows,
        and the first one's row, column and value).
    """
    first, count, rows = None, 0, 0
    for start in range(0, len(kernel), rows_per_block):
        block = np.asarray(kernel[start : start + rows_per_block])
        bad = ~np.isfinite(block)
        if first is None and bad.any():
            row, column = (int(i) for i in np.argwhere(bad)[0])
            first = (row + start, column, block[row, column])
        count += int(bad.sum())
        rows += int(bad.any(axis=1).sum())
    if first is not None:
        row, column, value = first
        raise ValueError(
            f"the kernel has {count} non-finite entries in {rows} row(s), the first at "
            f"[{row}, {column}] = {value}; check the inputs and parameters for NaN/Inf"
        )


def use_out_of_core(setting: bool | str, num_samples: int) -> bool:
    """``ntk.out_of_core``: true, false, or auto (the kernel would take > 1/4 of host RAM)."""
    if setting == "auto":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return num_samples * num_samples * 4 > ram // 4
    return bool(setting)


def kernel_summary(
    kernel: np.ndarray | None, num_samples: int, timings: dict[str, float]
) -> dict[str, object]:
    if kernel is None:
        return {"formed": False}
    trace = sum(float(np.trace(kernel[i : i + 4096, i : i + 4096], dtype=np.float64))
                for i in range(0, num_samples, 4096))  # fmt: skip
    return {
        "formed": True,
        "dtype": str(kernel.dtype),
        "on_disk": isinstance(kernel, np.memmap),
        "entries": int(kernel.size),
        "entries_per_s": kernel.size / max(timings["kernel_s"], 1e-9),
        "trace": trace,
    }
