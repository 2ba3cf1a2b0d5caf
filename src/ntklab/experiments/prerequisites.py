"""Prerequisite compute runs made on demand: ``prerequisites=create``.

A training run needs the ``compute_ntk.py`` run (``paths.eigenfunctions``) or the
``compute_nads.py`` run (``paths.nads``) of its seed and model. With ``prerequisites: create``
(the presets set it) a missing one is computed first, in-process, with the same seed, model and
data (:func:`ensure_eigenfunctions`, :func:`ensure_nads`); a run folder locked by another job is
waited for, then loaded. With ``require`` (the default) a missing run is an error that prints the
command making it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from ntklab import artifacts
from ntklab.errors import RunFolderInUse

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_NUM_EIGVECS",
    "PREREQUISITES",
    "compose",
    "eigenfunction_config",
    "ensure_eigenfunctions",
    "ensure_nads",
    "nads_config",
]

PREREQUISITES = ("require", "create")
"""``prerequisites``: ``require`` a finished compute run (error with its command), or ``create`` it."""

DEFAULT_NUM_EIGVECS = 200
"""Eigenpairs a created compute_ntk.py run keeps (its config's default), at least the run's need."""

POLL_S = 2.0
"""Seconds between looks at a prerequisite another job is computing."""

CONFIG_DIR = Path(__file__).resolve().parents[3] / "config"
"""The repository's ``config/``, used when no Hydra app is running (a notebook or a test)."""


# --- prerequisites -----------------------------------------------------------------------------


def ensure_eigenfunctions(cfg: DictConfig, *, num_eigvecs: int) -> None:
    """With ``prerequisites=create``, makes the missing ``compute_ntk.py`` run ``cfg`` trains on.

    The run (``paths.eigenfunctions``) gets ``cfg``'s seed, model and data and
    ``min(N, max(200, num_eigvecs))`` eigenpairs. With ``prerequisites=require`` (or when the run
    exists) nothing happens and loading reports what is missing.

    Args:
      cfg: a validated ``train_ntk`` or ``pretrained_ntk_comparison`` config.
      num_eigvecs: eigenvectors the run needs (``label_idx + 1``).
    """
    if cfg.get("prerequisites", "require") != "create":
        return
    path = Path(cfg.paths.eigenfunctions)

    def create() -> None:
        from ntklab.experiments import compute_ntk

        compute_ntk.run(eigenfunction_config(cfg, num_eigvecs=num_eigvecs))

    _create_once(path, create, what="compute_ntk.py", seed=int(cfg.seed))


def ensure_nads(cfg: DictConfig) -> None:
    """With ``prerequisites=create``, makes the missing ``compute_nads.py`` run (``paths.nads``)
    for ``cfg``'s seed and model; see :func:`ensure_eigenfunctions`."""
    if cfg.get("prerequisites", "require") != "create":
        return
    path = Path(cfg.paths.nads)

    def create() -> None:
        from ntklab.experiments import compute_nads

        compute_nads.run(nads_config(cfg))

    _create_once(path, create, what="compute_nads.py", seed=int(cfg.seed))


def eigenfunction_config(cfg: DictConfig, *, num_eigvecs: int) -> DictConfig:
    """The ``compute_ntk.py`` config of the eigenfunction run a training config needs.

    Args:
      cfg: a ``train_ntk`` or ``pretrained_ntk_comparison`` config.
      num_eigvecs: eigenvectors needed; the run keeps ``min(N, max(200, num_eigvecs))``.
    """
    from ntklab.data import load_dataset_config

    dataset = load_dataset_config(cfg.data, seed=cfg.seed)
    num_samples = len(dataset.train.images) + len(dataset.test.images)
    count = min(num_samples, max(DEFAULT_NUM_EIGVECS, num_eigvecs))
    return _compute_config(
        "compute_ntk",
        cfg,
        groups=[f"data={cfg.data.dataset}"],
        values={
            "data": artifacts.to_container(cfg.data),
            "ntk": {"num_eigvecs": count},
            "paths": {"run_dir": str(cfg.paths.eigenfunctions)},
        },
    )


def nads_config(cfg: DictConfig) -> DictConfig:
    """The ``compute_nads.py`` config of the NAD run a ``train_nads`` config needs."""
    return _compute_config(
        "compute_nads", cfg, groups=[], values={"paths": {"run_dir": str(cfg.paths.nads)}}
    )


def _compute_config(
    config_name: str, cfg: DictConfig, *, groups: list[str], values: dict[str, Any]
) -> DictConfig:
    """``config_name`` composed for ``cfg``'s seed and model, then ``values`` merged in."""
    composed = compose(config_name, [f"seed={cfg.seed}", f"model={cfg.model.name}", *groups])
    update = {
        "seed": int(cfg.seed),
        "overwrite": False,
        "model": artifacts.to_container(cfg.model),
        **values,
    }
    update["paths"] = {"artifacts": str(cfg.paths.artifacts), **values.get("paths", {})}
    return OmegaConf.merge(composed, update)


def compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """Hydra's ``compose`` in the running app, or on the repository's ``config/`` outside one."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import ntklab.experiments.schema  # noqa: F401  (registers the schemas)

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=config_name, overrides=list(overrides))
    if not (CONFIG_DIR / config_name).with_suffix(".yaml").is_file():
        raise FileNotFoundError(
            f"no {config_name}.yaml in {CONFIG_DIR}: prerequisites=create composes the compute "
            "script's config from the repository's config/ folder"
        )
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def _create_once(path: Path, create: Callable[[], object], *, what: str, seed: int) -> None:
    """Runs ``create`` unless ``path`` holds a finished run; waits while another job holds it."""
    waited = False
    while not (path / artifacts.META_FILE).exists():
        try:
            if not waited:
                logger.info(
                    "prerequisites=create: no finished %s run in %s; computing it now (seed %d)",
                    what,
                    path,
                    seed,
                )
            create()
            return
        except RunFolderInUse as busy:
            if not waited:
                logger.info("%s; waiting for that job, then loading its run", busy)
                waited = True
            time.sleep(POLL_S)
    if waited:
        logger.info("the %s run in %s is finished; loading it", what, path)
