"""``compute_ntk.py``: the empirical NTK of a network at initialization and its top eigenpairs.

Dimensions: N = num_train + num_test examples (train first), k eigenpairs.

    run(cfg)   # writes {paths.run_dir}/eigvals.npy [k], eigvecs.npy [k, N], ..., meta.json
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import jax
import numpy as np
from omegaconf import DictConfig, OmegaConf

from ntklab import artifacts, distributed
from ntklab.data import load_dataset_config
from ntklab.eigen import SOLVERS as EIGEN_SOLVERS
from ntklab.eigen import (
    Eigenpairs,
    matrix_free_eigenpairs,
    nystrom_eigenpairs,
    top_eigenpairs,
)
from ntklab.experiments.schema import ConfigError, validate
from ntklab.models import build_model, count_params, inference_apply_fn, init_variables
from ntklab.ntk import empirical_ntk
from ntklab.plots import spectrum_figure
from ntklab.types import ApplyFn, PyTree

logger = logging.getLogger(__name__)

NON_IDENTITY_KEYS = {
    "data": ("root", "download"),
    "ntk": (
        "batch_size",
        "save_kernel",
        "implementation",
        "out_of_core",
        "memory_bytes",
        "param_chunk_size",
    ),
}
"""Config keys that do not change the results, left out of a run folder's identity."""
MATRIX_FREE_SOLVERS = ("matrix_free", "nystrom")
SOLVERS = (*EIGEN_SOLVERS, *MATRIX_FREE_SOLVERS)
"""``ntk.solver``: the eigensolvers of a formed kernel, then the matrix-free ones."""


def run_identity(cfg: DictConfig) -> dict:
    """The config keys that determine a run's results (what ``config.json`` records)."""
    return artifacts.config_identity(cfg, ("model", "data", "ntk"), NON_IDENTITY_KEYS)


def check_options(cfg: DictConfig, num_samples: int) -> None:
    """The ``ntk:`` checks that need the data's size N or combine keys; run before any disk work.

    Raises:
      ValueError: ``nystrom`` without ``nystrom_dims`` (or out of
        range), ``save_kernel`` with a matrix-free solver, or ``output`` other than ``trace``.
    """
    ntk = cfg.ntk
    if not 1 <= ntk.num_eigvecs <= num_samples:
        raise ConfigError(
            f"ntk.num_eigvecs={ntk.num_eigvecs} must be between 1 and the number of samples "
            f"N={num_samples} (data.num_train + data.num_test)"
        )
    if ntk.output != "trace":
        raise ValueError(
            f"compute_ntk eigendecomposes an [N, N] kernel: ntk.output must be 'trace' (the sum "
            f"over logits; the scalar kernel for one logit), got {ntk.output!r}"
        )
    if ntk.solver in MATRIX_FREE_SOLVERS and ntk.save_kernel:
        raise ValueError(
            f"ntk.save_kernel=true needs the kernel, which ntk.solver={ntk.solver} never "
            "forms; use ntk.solver=auto|dense|lanczos to save it"
        )
    if ntk.solver == "nystrom" and not (
        ntk.nystrom_dims is not None and ntk.num_eigvecs <= ntk.nystrom_dims <= num_samples
    ):
        raise ValueError(
            f"ntk.solver=nystrom needs ntk.nystrom_dims (landmark count m) with "
            f"ntk.num_eigvecs={ntk.num_eigvecs} <= m <= N={num_samples}, got {ntk.nystrom_dims}"
        )


def run(cfg: DictConfig) -> Path:
    """Computes, eigendecomposes and saves the eNTK described by ``cfg``.

    Everything is checked (config, data, options) before the run folder is touched. With
    ``distributed.*`` set (or inside a multi-task ``srun``) the same command runs in every process
    of a JAX cluster: all compute the kernel together, process 0 alone claims, eigendecomposes
    (a formed kernel) and writes the run folder, and every process ends with the same outcome.

    Args:
      cfg: the composed ``config/compute_ntk`` config (``seed``, ``model``, ``data``, ``ntk``,
        ``paths``, ``overwrite``).

    Returns:
      The run folder.

    Raises:
      ConfigError: a config value of the wrong range or choice, or an unknown key.
      ValueError: ``ntk.num_eigvecs`` larger than N, inconsistent options, a non-finite kernel.
      FileNotFoundError: the dataset files are missing.
      FileExistsError: the run folder holds a run of another configuration.
      RunFolderInUse: another process is writing the run folder.
      DistributedError: the distributed runtime could not start.
      PeerFailed: another process of a multi-process run failed (its message is included).
    """
    validate(cfg)
    distributed.initialize(cfg.get("distributed"))  # before any JAX computation
    timings: dict[str, float] = {}
    logger.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    logger.info("JAX devices: %s", jax.devices())

    tic = time.perf_counter()
    model = build_model(**cfg.model)
    dataset = load_dataset_config(cfg.data, seed=cfg.seed)
    x = np.concatenate([dataset.train.images, dataset.test.images])
    num_samples = len(x)
    check_options(cfg, num_samples)
    timings["data_s"] = time.perf_counter() - tic

    with distributed.together() as processes:  # several processes: one outcome for all
        if distributed.is_writer():
            with artifacts.open_run(
                cfg.paths.run_dir, run_identity(cfg), overwrite=cfg.overwrite
            ) as run_folder:
                processes.step("claim")
                run_dir = run_folder.path
                logger.info("writing to %s", run_dir.resolve())
                _compute(cfg, model, dataset, x, run_folder, timings)
        else:  # process 0 claims and writes the run folder; this process computes its share
            processes.step("claim")
            run_dir = Path(cfg.paths.run_dir)
            _compute(cfg, model, dataset, x, None, timings)
    logger.info("done: %s (timings %s)", run_dir, {k: round(v, 2) for k, v in timings.items()})
    return run_dir


def _compute(cfg, model, dataset, x, run_folder: artifacts.RunFolder | None, timings) -> None:
    """Initializes the model, forms the kernel and its eigenpairs, and writes the run folder.

    ``run_folder`` is None on the processes other than 0: they stop after their share.
    """
    run_dir = Path(cfg.paths.run_dir) if run_folder is None else run_folder.path
    num_samples = len(x)
    tic = time.perf_counter()
    variables = init_variables(model, jax.random.PRNGKey(cfg.seed), tuple(x.shape[1:]))
    apply_fn = inference_apply_fn(model, variables)
    num_params = count_params(variables["params"])
    timings["init_s"] = time.perf_counter() - tic
    logger.info(
        "%s: %d parameters; N=%d inputs of shape %s",
        cfg.model.name,
        num_params,
        num_samples,
        x.shape[1:],
    )

    kernel, pairs = _kernel_and_eigenpairs(cfg, apply_fn, variables["params"], x, run_dir, timings)
    if run_folder is None:
        return
    logger.info(
        "top %d eigenpairs by the %s solver in %.2f s: λ_1=%.4g, max residual ‖Kv-λv‖/λ_1=%.2e",
        cfg.ntk.num_eigvecs,
        pairs.solver,
        timings["eigen_s"],
        pairs.values[0],
        pairs.max_residual,
    )

    tic = time.perf_counter()
    artifacts.save_array(run_dir / "eigvals.npy", pairs.values)
    artifacts.save_array(run_dir / "eigvecs.npy", np.ascontiguousarray(pairs.vectors.T))
    artifacts.save_array(run_dir / "eigen_residuals.npy", pairs.residuals)  # [k] ‖Kv−λv‖/λ_1
    artifacts.save_array(run_dir / "eigen_gaps.npy", pairs.gaps)  # [k] relative gaps
    artifacts.save_params(run_dir / "init_params.msgpack", variables)
    artifacts.save_arrays(
        run_dir / "samples.npz",
        train_indices=dataset.train.indices,
        test_indices=dataset.test.indices,
    )
    if isinstance(kernel, np.memmap):
        kernel.flush()
        run_folder.add_file("kernel.npy")
    elif cfg.ntk.save_kernel and kernel is not None:
        artifacts.save_array(run_dir / "kernel.npy", kernel)
    else:
        for name in ("kernel.npy", "kernel.npy.progress.json"):
            run_folder.discard(name)  # an earlier run's kernel (and its resume record)
    title = f"eNTK spectrum: {cfg.model.name} on {cfg.data.dataset} (N={num_samples})"
    artifacts.save_figure(spectrum_figure(pairs.values, title=title), run_dir / "spectrum.png")
    timings["save_s"] = time.perf_counter() - tic

    run_folder.finish(
        {
            "script": "compute_ntk",
            "config": artifacts.to_container(cfg),
            **artifacts.environment_info(),
            "num_samples": num_samples,
            "num_train": len(dataset.train.images),
            "num_test": len(dataset.test.images),
            "input_shape": list(x.shape[1:]),
            "num_params": num_params,
            "inputs": {"sha256": artifacts.array_digest(x), "dtype": str(x.dtype)},
            "kernel": _kernel_summary(kernel, num_samples, timings),
            "eigen": {
                "solver": pairs.solver,
                "num_eigvecs": len(pairs.values),
                "max_residual": pairs.max_residual,
                "iterations": pairs.iterations,
                "passes": pairs.passes,
                "min_gap": float(pairs.gaps.min()),
                "num_unresolved": int((pairs.gaps <= pairs.residuals).sum()),
                "sign_convention": "largest-magnitude entry of each eigenvector is positive",
            },
            "timings": timings,
        },
    )


def _kernel_and_eigenpairs(
    cfg: DictConfig,
    apply_fn: ApplyFn,
    params: PyTree,
    x: np.ndarray,
    run_dir: Path,
    timings: dict[str, float],
) -> tuple[np.ndarray | None, Eigenpairs | None]:
    """The kernel [N, N] (None for matrix-free solvers) and its top eigenpairs, timed.

    On processes other than 0, a formed kernel's (None, None): process 0 eigendecomposes it.
    """
    ntk = cfg.ntk
    options = {"batch_size": ntk.batch_size, "seed": cfg.seed,
               "implementation": ntk.implementation, "memory_bytes": ntk.memory_bytes}  # fmt: skip
    if ntk.solver in MATRIX_FREE_SOLVERS:
        timings["kernel_s"] = 0.0
        tic = time.perf_counter()
        if ntk.solver == "matrix_free":
            pairs = matrix_free_eigenpairs(
                apply_fn, params, x, ntk.num_eigvecs, progress=True, **options
            )
        else:
            pairs = nystrom_eigenpairs(
                apply_fn, params, x, ntk.num_eigvecs, num_landmarks=ntk.nystrom_dims, **options
            )
        timings["eigen_s"] = time.perf_counter() - tic
        return None, pairs

    out = None
    if _use_out_of_core(ntk.out_of_core, len(x)):
        out = run_dir / "kernel.npy"
        logger.info("kernel kept on disk at %s (resumable: rerun the same command)", out)
    tic = time.perf_counter()
    kernel = empirical_ntk(
        apply_fn,
        params,
        x,
        output=ntk.output,
        implementation=ntk.implementation,
        batch_size=ntk.batch_size,
        precision=ntk.precision,
        storage_dtype=ntk.storage_dtype,
        memory_bytes=ntk.memory_bytes,
        param_chunk_size=ntk.param_chunk_size,
        projection_dim=ntk.projection_dim,
        projection=ntk.projection,
        projection_seed=cfg.seed,
        out=out,
        progress=True,
    )
    timings["kernel_s"] = time.perf_counter() - tic
    if not distributed.is_writer():  # process 0 eigendecomposes the formed kernel alone
        return None, None
    check_finite(kernel)
    tic = time.perf_counter()
    pairs = top_eigenpairs(kernel, ntk.num_eigvecs, solver=ntk.solver, seed=cfg.seed, progress=True)
    timings["eigen_s"] = time.perf_counter() - tic
    return kernel, pairs


def check_finite(kernel: np.ndarray, *, rows_per_block: int = 4096) -> None:
    """Raises ValueError naming the first non-finite entry of a kernel [N, N] (read by row blocks).

    Raises:
      ValueError: an entry is NaN or infinite (the message gives its row and column).
    """
    for start in range(0, len(kernel), rows_per_block):
        block = np.asarray(kernel[start : start + rows_per_block])
        bad = np.argwhere(~np.isfinite(block))
        if len(bad):
            row, column = int(bad[0, 0]) + start, int(bad[0, 1])
            raise ValueError(
                f"the kernel has {len(bad)} non-finite entries in rows {start}.."
                f"{start + len(block) - 1} (first at [{row}, {column}] = {block[bad[0, 0], column]}); "
                "check the inputs and parameters for NaN/Inf"
            )


def _use_out_of_core(setting: bool | str, num_samples: int) -> bool:
    """``ntk.out_of_core``: true, false, or auto (the kernel would take > 1/4 of host RAM)."""
    if setting == "auto":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return num_samples * num_samples * 4 > ram // 4
    return bool(setting)


def _kernel_summary(
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
