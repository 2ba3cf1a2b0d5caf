"""``compute_ntk.py``: the empirical NTK of a network at initialization and its top eigenpairs.

Dimensions: N = num_train + num_test examples (train first), k eigenpairs.

    run(cfg)   # writes {paths.run_dir}/eigvals.npy [k], eigvecs.npy [k, N], ..., meta.json
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from omegaconf import DictConfig, OmegaConf

from ntklab import artifacts, distributed, threads
from ntklab.data import load_dataset_config
from ntklab.eigen import (
    MATRIX_FREE_SOLVERS,
    Eigenpairs,
)
from ntklab.errors import ConfigError
from ntklab.experiments.kernel_job import (
    eigen_precision,
    eigenpairs,
    form_kernel,
    kernel_summary,
)
from ntklab.experiments.kernel_readouts import save_readouts
from ntklab.experiments.pointers import point_to_run
from ntklab.experiments.validation import validate
from ntklab.models import build_model, count_params, inference_apply_fn, init_variables
from ntklab.plots import spectrum_figure

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


def run_identity(cfg: DictConfig) -> dict:
    """The config keys that determine a run's results (what ``config.json`` records)."""
    return artifacts.config_identity(cfg, ("model", "data", "ntk"), NON_IDENTITY_KEYS)


def check_options(cfg: DictConfig, num_samples: int) -> None:
    """The ``ntk:`` checks that need the data's size N or combine keys; run before any disk work.

    Raises:
      ConfigError: ``ntk.num_eigvecs`` outside [1, N], ``output`` other than ``trace``,
        ``nystrom`` without ``nystrom_dims`` (or out of range), ``save_kernel`` with a
        matrix-free solver.
    """
    ntk = cfg.ntk
    if not 1 <= ntk.num_eigvecs <= num_samples:
        raise ConfigError(
            f"ntk.num_eigvecs={ntk.num_eigvecs} must be between 1 and the number of samples "
            f"N={num_samples} (data.num_train + data.num_test)"
        )
    if ntk.output != "trace":
        raise ConfigError(
            f"ntk.output={ntk.output} is invalid here: compute_ntk eigendecomposes an [N, N] "
            "kernel, so it must be trace (the sum over logits; the scalar kernel for one logit)"
        )
    if ntk.solver in MATRIX_FREE_SOLVERS and ntk.save_kernel:
        raise ConfigError(
            f"ntk.save_kernel=true needs the kernel, which ntk.solver={ntk.solver} never "
            "forms; use ntk.solver=auto|dense|lanczos to save it"
        )
    if ntk.solver == "nystrom" and not (
        ntk.nystrom_dims is not None and ntk.num_eigvecs <= ntk.nystrom_dims <= num_samples
    ):
        raise ConfigError(
            f"ntk.solver=nystrom needs ntk.nystrom_dims (landmark count m) with "
            f"ntk.num_eigvecs={ntk.num_eigvecs} <= m <= N={num_samples}, got {ntk.nystrom_dims}"
        )


def check_finite_inputs(images: np.ndarray, what: str) -> None:
    """Refuses non-finite inputs before any computation, naming the first bad row.

    Raises:
      ValueError: ``images`` [n, ...] hold NaN or infinite values (the message gives how many,
        in how many rows, and the first row).
    """
    bad_rows = np.flatnonzero(~np.isfinite(images.reshape(len(images), -1)).all(axis=1))
    if len(bad_rows):
        first = int(bad_rows[0])
        count = int(np.sum(~np.isfinite(images[first])))
        raise ValueError(
            f"{what} hold non-finite values in {len(bad_rows)} row(s), the first in row {first} "
            f"({count} value(s)); check the dataset files and data.normalize"
        )


class Checked(NamedTuple):
    """What :func:`check` found: the model, the data and the run folder's state."""

    model: Any
    dataset: Any
    folder: str  # one of ntklab.artifacts.FOLDER_STATES, or "unchecked" with several processes


def check(cfg: DictConfig) -> Checked:
    """Everything ``run`` checks before it writes: config, data, options, the run folder.

    Raises:
      ConfigError: a config value of the wrong range or choice, an unknown key, or options that
        do not fit the data.
      FileNotFoundError: the dataset files are missing.
      FileExistsError: the run folder holds a run of another configuration.
      RunFolderInUse: another process is writing the run folder.
    """
    validate(cfg)
    distributed.check_settings(cfg.get("distributed"))
    model = build_model(**cfg.model)
    dataset = load_dataset_config(cfg.data, seed=cfg.seed)
    check_options(cfg, len(dataset.train.images) + len(dataset.test.images))
    for split in ("train", "test"):
        check_finite_inputs(getattr(dataset, split).images, f"the {split} images")
    folder = "unchecked"
    if not distributed.requested(cfg.get("distributed")):
        folder = artifacts.folder_state(
            cfg.paths.run_dir, run_identity(cfg), overwrite=cfg.overwrite
        )
    return Checked(model, dataset, folder)


def run(cfg: DictConfig) -> Path:
    """Computes, eigendecomposes and saves the eNTK described by ``cfg``.

    Everything is checked (config, data, options, the run folder) before the run folder is
    touched. A folder already holding this finished run is left as it is (the log says so). With
    ``distributed.*`` set (or inside a multi-task ``srun``) the same command runs in every process
    of a JAX cluster: all compute the kernel together, process 0 alone checks and claims the run
    folder (after the runtime started, so that its refusal reaches the others), eigendecomposes
    (a formed kernel) and writes it, and every process ends with the same outcome.

    Args:
      cfg: the composed ``config/compute_ntk`` config (``seed``, ``model``, ``data``, ``ntk``,
        ``paths``, ``overwrite``).

    Returns:
      The run folder.

    Raises:
      ConfigError: a config value of the wrong range or choice, or an unknown key.
      ValueError: a non-finite kernel.
      FileNotFoundError: the dataset files are missing.
      FileExistsError: the run folder holds a run of another configuration.
      RunFolderInUse: another process is writing the run folder.
      DistributedError: the distributed runtime could not start.
      PeerFailed: another process of a multi-process run failed (its message is included).
    """
    tic = time.perf_counter()
    checked = check(cfg)
    run_dir = Path(cfg.paths.run_dir)
    if checked.folder == "finished" and not cfg.overwrite:
        artifacts.restore_replaced(run_dir, run_identity(cfg))  # after an interrupted overwrite
        if _has_what_is_asked(cfg, run_dir):
            logger.info("%s already holds this finished run; nothing to do", run_dir)
            point_to_run(run_dir, "compute_ntk")
            return run_dir
    distributed.initialize(cfg.get("distributed"))  # before any JAX computation
    timings: dict[str, float] = {"data_s": time.perf_counter() - tic}
    logger.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    logger.info("JAX devices: %s; BLAS threads: %s", jax.devices(), threads.describe())
    dataset = checked.dataset
    x = np.concatenate([dataset.train.images, dataset.test.images])
    with distributed.together() as processes:  # several processes: one outcome for all
        if distributed.is_writer():
            with artifacts.open_run(run_dir, run_identity(cfg), overwrite=cfg.overwrite) as folder:
                processes.step("claim")
                point_to_run(run_dir, "compute_ntk")
                logger.info("writing to %s", run_dir.resolve())
                _compute(cfg, checked.model, dataset, x, folder, timings)
        else:  # process 0 claims and writes the run folder; this process computes its share
            processes.step("claim")
            _compute(cfg, checked.model, dataset, x, None, timings)
    logger.info("done: %s (timings %s)", run_dir, {k: round(v, 2) for k, v in timings.items()})
    return run_dir


def _has_what_is_asked(cfg: DictConfig, run_dir: Path) -> bool:
    """Whether a finished run of this identity holds what ``cfg`` asks for beyond its results:
    the kernel, with ``ntk.save_kernel=true``."""
    if not cfg.ntk.save_kernel:
        return True
    meta = artifacts.load_json(run_dir / artifacts.META_FILE)
    return "kernel.npy" in meta.get("artifacts", {})


def _compute(cfg, model, dataset, x, run_folder: artifacts.RunFolder | None, timings) -> None:
    """Initializes the model, forms the kernel and its eigenpairs, and writes the run folder.

    ``run_folder`` is None on the processes other than 0: they stop after their share.
    """
    run_dir = Path(cfg.paths.run_dir) if run_folder is None else run_folder.path
    tic = time.perf_counter()
    variables = init_variables(model, jax.random.PRNGKey(cfg.seed), tuple(x.shape[1:]))
    apply_fn = inference_apply_fn(model, variables)
    params = variables["params"]
    timings["init_s"] = time.perf_counter() - tic
    logger.info(
        "%s: %d parameters; N=%d inputs of shape %s",
        cfg.model.name, count_params(params), len(x), x.shape[1:],
    )  # fmt: skip
    formed = form_kernel(cfg, apply_fn, params, x, run_dir, timings)
    if run_folder is None:
        if cfg.ntk.solver in MATRIX_FREE_SOLVERS:  # the matrix-free solvers run in every process
            eigenpairs(cfg, formed, apply_fn, params, x, timings)
        return
    pairs = eigenpairs(cfg, formed, apply_fn, params, x, timings)
    logger.info(
        "top %d eigenpairs by the %s solver in %.2f s: λ_1=%.4g, max residual ‖Kv-λv‖/λ_1=%.2e",
        cfg.ntk.num_eigvecs, pairs.solver, timings["eigen_s"], pairs.values[0], pairs.max_residual,
    )  # fmt: skip
    readouts = save_readouts(
        run_dir, formed, pairs, num_train=len(dataset.train.images), timings=timings
    )
    _save(cfg, run_folder, dataset, variables, formed.kernel, pairs, timings)
    run_folder.finish(_meta(cfg, dataset, x, params, formed.kernel, pairs, readouts, timings))


def _save(cfg, run_folder, dataset, variables, kernel, pairs: Eigenpairs, timings) -> None:
    """The eigenpairs, θ0, the samples, the kernel when kept, and the spectrum figure."""
    run_dir = run_folder.path
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
    num_samples = len(dataset.train.images) + len(dataset.test.images)
    title = f"eNTK spectrum: {cfg.model.name} on {cfg.data.dataset} (N={num_samples})"
    artifacts.save_figure(spectrum_figure(pairs.values, title=title), run_dir / "spectrum.png")
    timings["save_s"] = time.perf_counter() - tic


def _meta(cfg, dataset, x, params, kernel, pairs: Eigenpairs, readouts, timings) -> dict:
    """``meta.json``'s fields (the file list is added by ``RunFolder.finish``)."""
    return {
        "script": "compute_ntk",
        "config": artifacts.to_container(cfg),
        **artifacts.environment_info(),
        "blas_threads": threads.describe(),
        "num_samples": len(x),
        "num_train": len(dataset.train.images),
        "num_test": len(dataset.test.images),
        "input_shape": list(x.shape[1:]),
        "num_params": count_params(params),
        "inputs": {"sha256": artifacts.array_digest(x), "dtype": str(x.dtype)},
        "kernel": kernel_summary(kernel, len(x), timings),
        "eigen": {
            "solver": pairs.solver,
            "dtype": eigen_precision(cfg.ntk.eigen_dtype, cfg.ntk.solver, len(x))[0]
            if kernel is not None
            else "float32",
            "num_eigvecs": len(pairs.values),
            "max_residual": pairs.max_residual,
            "iterations": pairs.iterations,
            "passes": pairs.passes,
            "min_gap": float(pairs.gaps.min()),
            **readouts["resolution"],
            "sign_convention": "largest-magnitude entry of each eigenvector is positive",
        },
        "init_quotients": readouts["init_quotients"],
        "kernel_regression": readouts["kernel_regression"],
        "timings": timings,
    }
