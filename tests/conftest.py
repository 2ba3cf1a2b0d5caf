"""Shared test fixtures: strict NumPy rank promotion, float64 scopes, Hydra composition."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import jax
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import ntklab.experiments.schema  # noqa: F401  (registers the config schemas with Hydra)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "config"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

jax.config.update("jax_numpy_rank_promotion", "raise")
# The default threefry generator compiles anew for every parameter shape (~0.5 s each on CPU);
# rbg compiles once. No test depends on which generator draws the initial weights.
jax.config.update("jax_default_prng_impl", "rbg")


@pytest.fixture
def float64() -> Iterator[None]:
    """Enables float64 in JAX for one test and restores the previous setting."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """Composes ``config/<config_name>`` with command-line style overrides, as the scripts do."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)
