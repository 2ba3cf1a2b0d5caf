"""``compute_nads.py``: all neural anisotropy directions of a network at initialization.

Dimensions: D = H·W·C input dimension, P parameters.

    run(cfg)   # writes {paths.run_dir}/nads.npy [D, D], eigvals.npy [D], ..., meta.json
    nads = load_nads("artifacts/nads/lenet")
    nads.directions[10]                       # [D], the NAD of index 10
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig, OmegaConf

from ntklab import artifacts
from ntklab.errors import ConfigError
from ntklab.experiments.pointers import point_to_run
from ntklab.experiments.validation import validate
from ntklab.models import build_model, count_params, inference_apply_fn, init_variables
from ntklab.nads import nad_input, neural_anisotropy_directions
from ntklab.plots import nads_figure
from ntklab.types import ApplyFn, PyTree

logger = logging.getLogger(__name__)

NON_IDENTITY_KEYS = {"nads": ("batch_size", "num_plot")}
"""Config keys that do not change the results, left out of a run folder's identity."""


def run_identity(cfg: DictConfig) -> dict:
    """The config keys that determine a run's results (what ``config.json`` records)."""
    return artifacts.config_identity(cfg, ("model", "nads"), NON_IDENTITY_KEYS)


def check(cfg: DictConfig) -> str:
    """Everything ``run`` checks before it writes; returns the run folder's state.

    Raises:
      ConfigError: an invalid key or value, or a model with more than one output.
      FileExistsError: the run folder holds a run of another configuration.
      RunFolderInUse: another process is writing the run folder.
    """
    validate(cfg)
    if cfg.model.get("num_outputs", 1) != 1:
        raise ConfigError(
            f"model.num_outputs={cfg.model.num_outputs} is invalid: NADs are defined for one "
            "scalar output; set model.num_outputs=1"
        )
    return artifacts.folder_state(cfg.paths.run_dir, run_identity(cfg), overwrite=cfg.overwrite)


def run(cfg: DictConfig) -> Path:
    """Computes and saves all NADs of the model described by ``cfg``.

    Args:
      cfg: the composed ``config/compute_nads`` config (``seed``, ``model``, ``nads``, ``paths``,
        ``overwrite``).

    Returns:
      The run folder (left as it is when it already holds this finished run).

    Raises:
      ConfigError: an invalid key or value, or a model with more than one output.
      ValueError: non-finite values.
      FileExistsError: the run folder holds a run of another configuration.
      RunFolderInUse: another process is writing the run folder.
    """
    tic = time.perf_counter()
    run_dir = Path(cfg.paths.run_dir)
    if check(cfg) == "finished" and not cfg.overwrite:
        artifacts.restore_replaced(run_dir, run_identity(cfg))  # after an interrupted overwrite
        logger.info("%s already holds this finished run; nothing to do", run_dir)
        point_to_run(run_dir, "compute_nads")
        return run_dir
    timings: dict[str, float] = {}
    logger.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    logger.info("JAX devices: %s", jax.devices())
    model = build_model(**cfg.model)
    x0 = nad_input(tuple(cfg.nads.shape), input_std=cfg.nads.input_std, seed=cfg.seed)
    with artifacts.open_run(run_dir, run_identity(cfg), overwrite=cfg.overwrite) as run_folder:
        point_to_run(run_dir, "compute_nads")
        logger.info("writing to %s", run_folder.path.resolve())
        _compute(cfg, model, x0, run_folder, timings, tic)
    logger.info(
        "done: %s (timings %s)", run_folder.path, {k: round(v, 2) for k, v in timings.items()}
    )
    return run_folder.path


def _compute(cfg, model, x0, run_folder: artifacts.RunFolder, timings, tic) -> None:
    """Computes the NADs and writes the run folder."""
    run_dir, shape = run_folder.path, x0.shape
    variables = init_variables(model, jax.random.PRNGKey(cfg.seed), shape)
    num_params = count_params(variables["params"])
    timings["init_s"] = time.perf_counter() - tic
    dim = math.prod(shape)
    logger.info(
        "%s (%s): %d parameters; D=%d directions at x0 = %g·N(0, I) of shape %s",
        cfg.model.name,
        cfg.model.get("activation"),
        num_params,
        dim,
        cfg.nads.input_std,
        list(shape),
    )

    tic = time.perf_counter()
    x64 = cfg.nads.dtype == "float64"
    with jax.enable_x64(True) if x64 else contextlib.nullcontext():
        dtype = jnp.float64 if x64 else jnp.float32
        cast = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)
        nads = neural_anisotropy_directions(
            inference_apply_fn(model, cast),
            cast["params"],
            jnp.asarray(x0, dtype),
            batch_size=cfg.nads.batch_size,
            progress=True,
        )
    timings["nads_s"] = time.perf_counter() - tic
    logger.info(
        "all %d NADs in %.2f s: σ²_1=%.4g, σ²_D=%.4g, max residual ‖Gv-λv‖/λ_1=%.2e",
        dim,
        timings["nads_s"],
        nads.eigvals[0],
        nads.eigvals[-1],
        nads.max_residual,
    )

    tic = time.perf_counter()
    artifacts.save_array(run_dir / "nads.npy", nads.directions)
    artifacts.save_array(run_dir / "eigvals.npy", nads.eigvals)
    artifacts.save_array(run_dir / "input.npy", x0)
    artifacts.save_params(run_dir / "init_params.msgpack", variables)
    num_plot = min(cfg.nads.num_plot, dim)
    title = f"NADs of {cfg.model.name} ({cfg.model.get('activation')}) at " + (
        "the origin" if cfg.nads.input_std == 0 else f"x0 = {cfg.nads.input_std}·N(0, I)"
    )
    figure = nads_figure(nads.directions[:num_plot], nads.eigvals, shape=shape, title=title)
    artifacts.save_figure(figure, run_dir / "nads.png")
    timings["save_s"] = time.perf_counter() - tic

    run_folder.finish(
        {
            "script": "compute_nads",
            "config": artifacts.to_container(cfg),
            **artifacts.environment_info(),
            "input_shape": list(shape),
            "input_dim": dim,
            "num_params": num_params,
            "input": {"sha256": artifacts.array_digest(x0), "std": cfg.nads.input_std},
            "nads": {
                "dtype": cfg.nads.dtype,
                "formulation": "AᵀA by blocks of (A E, AᵀU) forward-then-reverse products",
                "eigensolver": "dense symmetric (LAPACK evd), float64",
                "max_residual": nads.max_residual,
                "eigval_max": float(nads.eigvals[0]),
                "eigval_min": float(nads.eigvals[-1]),
                "directions_per_s": dim / max(timings["nads_s"], 1e-9),
                "sign_convention": "largest-magnitude entry of each direction is positive",
            },
            "timings": timings,
        },
    )


@dataclasses.dataclass(frozen=True)
class NADRun:
    """A finished ``compute_nads`` run, read back.

    Attributes:
      path: the run folder.
      config: the resolved config the run used.
      meta: the contents of ``meta.json``.
      model: the Flax module.
      variables: initial variables θ0 (``params`` and, with BatchNorm, ``batch_stats``).
      apply_fn: ``apply_fn(params, x[B, H, W, C]) -> [B, 1]``, BatchNorm in inference mode.
      directions: NADs [D, D], one unit direction per row, by descending singular value.
      eigvals: squared singular values [D], descending.
      shape: image shape [H, W, C].
    """

    path: Path
    config: DictConfig
    meta: dict[str, Any]
    model: Any
    variables: PyTree
    apply_fn: ApplyFn
    directions: np.ndarray
    eigvals: np.ndarray
    shape: tuple[int, int, int]

    @property
    def params(self) -> PyTree:
        """The initial trainable parameters θ0."""
        return self.variables["params"]


def load_nads(path: str | Path) -> NADRun:
    """Reads a finished ``compute_nads`` run.

    Args:
      path: the run folder (``artifacts/nads/{model}``).

    Returns:
      The run with its model rebuilt and θ0 restored.

    Raises:
      FileNotFoundError: no finished run in ``path`` (the message says what to run).
      DamagedArtifactError: a file differs from the one the run wrote (the message names it).
    """
    path = Path(path)
    meta = artifacts.read_finished_meta(
        path, script="compute_nads.py", expected=("nads.npy", "eigvals.npy", "init_params.msgpack")
    )
    artifacts.verify_artifacts(path, meta)
    config = OmegaConf.create(meta["config"])
    shape = tuple(meta["input_shape"])
    model = build_model(**config.model)
    template = init_variables(model, jax.random.PRNGKey(0), shape)
    variables = artifacts.load_params(path / "init_params.msgpack", template)
    return NADRun(
        path=path,
        config=config,
        meta=meta,
        model=model,
        variables=variables,
        apply_fn=inference_apply_fn(model, variables),
        directions=np.load(path / "nads.npy", allow_pickle=False),
        eigvals=np.load(path / "eigvals.npy", allow_pickle=False),
        shape=shape,
    )
