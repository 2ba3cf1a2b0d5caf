"""Shared test fixtures: strict NumPy rank promotion, float64 scopes, Hydra composition.

The suite compiles many small XLA programs, most of them more than once (in each pytest-xdist
worker, in subprocesses): for the session, XLA skips LLVM's expensive passes (compiling
dominates on tiny shapes; the backend optimization level stays, as some tests run real training)
and every compiled program goes to a persistent cache in a temporary folder shared by the
workers and the subprocesses they start (removed at the end).
"""

from __future__ import annotations

import os
import shutil
import tempfile
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

FAST_COMPILE_FLAGS = "--xla_llvm_disable_expensive_passes=true"
CACHE_VARIABLE = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config: pytest.Config) -> None:
    """The session's compile settings, set once by the controller and inherited by workers."""
    if "FAST_COMPILE_FLAGS" not in os.environ.get("NTKLAB_TEST_SESSION", ""):
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE_FLAGS}".strip()
        os.environ["NTKLAB_TEST_SESSION"] = "FAST_COMPILE_FLAGS"
    if CACHE_VARIABLE not in os.environ:
        os.environ[CACHE_VARIABLE] = tempfile.mkdtemp(prefix="ntklab-tests-jax-cache-")
        config.stash[_OWN_CACHE] = os.environ[CACHE_VARIABLE]
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_VARIABLE])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config: pytest.Config) -> None:
    """The controller removes the cache folder it made."""
    folder = config.stash.get(_OWN_CACHE, None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


_OWN_CACHE = pytest.StashKey[str]()

# The longest modules run first. pytest-xdist's worksteal scheduler hands each worker a contiguous
# share of the collection, and an idle worker steals from the end of the other's share: a module of
# minute-long tests at the end of a share would leave one core working alone at the end.
LONGEST_FIRST = ("test_multidevice.py", "test_multiprocess.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Moves the modules of LONGEST_FIRST to the front, in that order (the same order in every
    worker, as xdist requires; the order inside a module is kept)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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
