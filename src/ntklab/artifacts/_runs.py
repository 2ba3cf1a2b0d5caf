"""Reading finished runs back: the ``compute_ntk`` run with its model and exact inputs.

Dimensions: N examples (train first, then test), k eigenpairs.

    run = load_run("artifacts/eigenfunctions/digits/lenet/seed_0")  # verifies every file's sha256
    run.x                     # [N, H, W, C] inputs in kernel order
    run.eigvecs               # [k, N]
    run.apply_fn(run.params, run.x[:8])   # [8, 1], BatchNorm in inference mode
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from omegaconf import DictConfig, OmegaConf

from ntklab.artifacts._folders import REPLACED_DIR
from ntklab.artifacts._io import (
    CONFIG_FILE,
    META_FILE,
    array_digest,
    load_arrays,
    load_json,
    load_params,
    verify_artifacts,
    verify_file,
)
from ntklab.types import ApplyFn, PyTree


@dataclasses.dataclass(frozen=True)
class NTKRun:
    """A finished ``compute_ntk`` run, read back.

    Attributes:
      path: the run folder.
      config: the resolved config the run used.
      meta: the contents of ``meta.json``.
      model: the Flax module.
      variables: initial variables (``params`` and, with BatchNorm, ``batch_stats``).
      apply_fn: ``apply_fn(params, x[B, ...]) -> [B, K]`` with BatchNorm in inference mode.
      x: inputs [N, H, W, C], train samples first, then test, exactly as in the kernel.
      labels: dataset class labels [N] of the same samples.
      num_train: number of train samples (the first ``num_train`` rows of ``x``).
      train_indices: positions [num_train] of the train samples in the dataset's train split.
      test_indices: positions [N - num_train] in the dataset's test split.
      eigvals: eigenvalues [k], descending.
      eigvecs: eigenvectors [k, N], one per row.
    """

    path: Path
    config: DictConfig
    meta: dict[str, Any]
    model: Any
    variables: PyTree
    apply_fn: ApplyFn
    x: np.ndarray
    labels: np.ndarray
    num_train: int
    train_indices: np.ndarray
    test_indices: np.ndarray
    eigvals: np.ndarray
    eigvecs: np.ndarray

    @property
    def params(self) -> PyTree:
        """The initial trainable parameters θ0."""
        return self.variables["params"]

    @property
    def num_samples(self) -> int:
        """N, the kernel's size."""
        return len(self.x)

    def kernel(self, *, verify: bool = True) -> np.ndarray:
        """The saved kernel [N, N] (memory-mapped); needs ``ntk.save_kernel=true``.

        Args:
          verify: check the file's sha256 against ``meta.json`` first (one read of the file).

        Raises:
          FileNotFoundError: this run saved no kernel (a ``kernel.npy`` of an earlier run does
            not count).
          DamagedArtifactError: the file differs from the one the run wrote.
        """
        path = self.path / "kernel.npy"
        listed = self.meta.get("artifacts")
        recorded = None if listed is None else listed.get("kernel.npy")
        if listed is None and path.exists():  # a run made before meta.json listed its files
            return np.load(path, mmap_mode="r", allow_pickle=False)
        if recorded is None:
            raise FileNotFoundError(
                f"{path}: the run was made without ntk.save_kernel=true; recompute it "
                "with ntklab.ntk.empirical_ntk(run.apply_fn, run.params, run.x)"
            )
        if verify:
            verify_file(path, recorded)
        return np.load(path, mmap_mode="r", allow_pickle=False)


def load_run(path: str | os.PathLike, *, data_root: str | os.PathLike | None = None) -> NTKRun:
    """Reads a finished ``compute_ntk`` run and rebuilds its model and exact inputs.

    Args:
      path: the run folder (``artifacts/eigenfunctions/{dataset}/{model}``).
      data_root: where the dataset files are, if not at the run's ``data.root``.

    Returns:
      The run; ``x`` is verified byte-for-byte against the digest recorded at compute time.

    Raises:
      FileNotFoundError: no finished run in ``path``, or its dataset files are missing.
      DamagedArtifactError: a file differs from the one the run wrote (the message names it).
      ValueError: the dataset files now give different inputs than the run used.
    """
    from ntklab.data import load_dataset_config
    from ntklab.models import build_model, inference_apply_fn, init_variables

    path = Path(path)
    meta = read_finished_meta(
        path,
        script="compute_ntk.py",
        expected=("eigvals.npy", "eigvecs.npy", "init_params.msgpack", "samples.npz"),
    )
    verify_artifacts(path, meta, skip=("kernel.npy",))
    config = OmegaConf.create(meta["config"])
    root = Path(config.data.root if data_root is None else data_root)
    if data_root is None and not root.is_absolute():  # relative to where the run was made
        root = Path(meta.get("working_dir", ".")) / root
    try:
        dataset = load_dataset_config(config.data, seed=config.seed, download=False, root=root)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{error}\nthe run {path} read its data from {root}; if the files are elsewhere now, "
            "pass load_run(..., data_root=<folder>)"
        ) from error
    samples = load_arrays(path / "samples.npz")
    x = np.concatenate([dataset.train.images, dataset.test.images])
    if (
        not np.array_equal(samples["train_indices"], dataset.train.indices)
        or not np.array_equal(samples["test_indices"], dataset.test.indices)
        or array_digest(x) != meta["inputs"]["sha256"]
    ):
        raise ValueError(
            f"the dataset files under {root} no longer give the inputs this run used (sample "
            "indices or input digest differ); was the dataset replaced? Pass "
            "load_run(..., data_root=<folder>) to read the original files from elsewhere"
        )
    model = build_model(**config.model)
    template = init_variables(model, jax.random.PRNGKey(0), tuple(x.shape[1:]))
    variables = load_params(path / "init_params.msgpack", template)
    return NTKRun(
        path=path,
        config=config,
        meta=meta,
        model=model,
        variables=variables,
        apply_fn=inference_apply_fn(model, variables),
        x=x,
        labels=np.concatenate([dataset.train.labels, dataset.test.labels]),
        num_train=len(dataset.train.images),
        train_indices=samples["train_indices"],
        test_indices=samples["test_indices"],
        eigvals=np.load(path / "eigvals.npy", allow_pickle=False),
        eigvecs=np.load(path / "eigvecs.npy", allow_pickle=False),
    )


def read_finished_meta(
    path: str | os.PathLike, *, script: str, expected: tuple[str, ...]
) -> dict[str, Any]:
    """The ``meta.json`` of a finished run, or an error saying what the folder holds.

    Args:
      path: the run folder.
      script: the entry script that makes such runs (for the message).
      expected: the files such a run holds (for the message).

    Raises:
      FileNotFoundError: the run is missing or unfinished.
      ValueError: ``meta.json`` is not valid JSON.
    """
    path = Path(path)
    if not (path / META_FILE).exists():
        state = "an unfinished run" if (path / CONFIG_FILE).exists() else "no run"
        if (path / REPLACED_DIR / META_FILE).exists():
            state += f" (the run it replaces is kept in {path / REPLACED_DIR} until it completes)"
        raise FileNotFoundError(
            f"{path} holds {state} ({META_FILE} is missing; expected {', '.join(expected)}, "
            f"{META_FILE}); run {script} to create it"
        )
    return load_json(path / META_FILE)
