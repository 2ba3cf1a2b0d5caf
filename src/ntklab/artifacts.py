"""Run folders: atomic writes of safe formats, run metadata, and reading runs back.

Dimensions: N examples (train first, then test), k eigenpairs.

    run = load_run("artifacts/eigenfunctions/digits/lenet")
    run.x                     # [N, H, W, C] inputs in kernel order
    run.eigvecs               # [k, N]
    run.apply_fn(run.params, run.x[:8])   # [8, 1], BatchNorm in inference mode

Every file is written to a temporary name in its folder and renamed into place, so a crash never
leaves a half-written file. ``meta.json`` is written last: a run folder is complete once it exists.
Arrays are ``.npy``/``.npz`` (loaded with ``allow_pickle=False``), parameters flax msgpack, metadata
JSON; nothing is pickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization
from omegaconf import DictConfig, OmegaConf

from ntklab.types import ApplyFn, PyTree

META_FILE = "meta.json"
CONFIG_FILE = "config.json"
_VERSIONED_PACKAGES = ("ntklab", "jax", "jaxlib", "flax", "optax", "numpy", "scipy", "hydra-core")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; renames it onto ``path`` if the block succeeds.

    The temporary name keeps ``path``'s suffix, so writers that add suffixes behave.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(handle)
    try:
        yield Path(temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def save_array(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes one array as ``.npy``."""
    with atomic_path(path) as temp, open(temp, "wb") as f:
        np.save(f, np.asarray(array), allow_pickle=False)


def save_arrays(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Writes named arrays as an uncompressed ``.npz``."""
    with atomic_path(path) as temp, open(temp, "wb") as f:
        np.savez(f, **{name: np.asarray(a) for name, a in arrays.items()})


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads an ``.npz`` written by :func:`save_arrays` (no pickles allowed)."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes JSON (NumPy scalars and arrays converted to Python values)."""
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def load_json(path: str | os.PathLike) -> Any:
    """Reads a JSON file."""
    return json.loads(Path(path).read_text())


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray | jax.Array):
        return np.asarray(value).tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def save_params(path: str | os.PathLike, tree: PyTree) -> None:
    """Writes a pytree of arrays (params, batch statistics) as flax msgpack."""
    with atomic_path(path) as temp:
        temp.write_bytes(serialization.msgpack_serialize(serialization.to_state_dict(tree)))


def load_params(path: str | os.PathLike, target: PyTree | None = None) -> PyTree:
    """Reads a pytree written by :func:`save_params`, restored into ``target``'s structure if given."""
    state = serialization.msgpack_restore(Path(path).read_bytes())
    return state if target is None else serialization.from_state_dict(target, state)


def save_figure(figure: Any, path: str | os.PathLike) -> None:
    """Saves a Matplotlib figure (format from the suffix) and closes it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as temp:
        figure.savefig(temp, dpi=150, bbox_inches="tight")
    plt.close(figure)


def array_digest(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes: identifies inputs exactly."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def environment_info() -> dict[str, Any]:
    """Library versions, Python, platform and JAX devices, for ``meta.json``."""
    versions = {}
    for package in _VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "devices": [str(device) for device in jax.devices()],
        "backend": jax.default_backend(),
    }


def to_container(config: DictConfig | Mapping) -> dict[str, Any]:
    """A resolved plain-dict copy of a config."""
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return json.loads(json.dumps(dict(config), default=_json_default))


def config_identity(
    config: DictConfig, groups: tuple[str, ...], exclude: Mapping[str, tuple[str, ...]]
) -> dict[str, Any]:
    """The result-determining part of a config: ``seed`` and ``groups``, less ``exclude``.

    Args:
      config: the composed config.
      groups: top-level config groups that determine the results (e.g. ``("model", "data")``).
      exclude: per group, keys that do not change the results (e.g. ``{"data": ("root",)}``).
    """
    identity: dict[str, Any] = {"seed": config.seed}
    for group in groups:
        identity[group] = to_container(config[group])
        for key in exclude.get(group, ()):
            identity[group].pop(key, None)
    return identity


def prepare_run_dir(
    path: str | os.PathLike, identity: Mapping[str, Any], *, overwrite: bool = False
) -> Path:
    """Claims a run folder for a run whose results are determined by ``identity``.

    The identity (the config keys that change the results) is stored in ``config.json``. A folder
    holding a run of a different identity is refused unless ``overwrite`` is set, so results of two
    configurations are never mixed; a folder of the same identity is reused and its files replaced.

    Args:
      path: the run folder.
      identity: JSON-serializable mapping of the result-determining config.
      overwrite: replace a run of a different identity (its files are deleted first).

    Returns:
      The folder, created if needed.

    Raises:
      FileExistsError: the folder holds a different run and ``overwrite`` is false.
    """
    path = Path(path)
    identity = json.loads(json.dumps(identity, default=_json_default))
    config_path = path / CONFIG_FILE
    if config_path.exists():
        existing = load_json(config_path)
        if existing != identity:
            if not overwrite:
                differences = ", ".join(_differences(existing, identity)) or "unknown keys"
                raise FileExistsError(
                    f"{path} holds a run with a different configuration ({differences}); refusing "
                    "to mix them. Pass overwrite=true to replace it, or choose another folder "
                    "with paths.run_dir=..."
                )
            for child in path.iterdir():
                if child.is_file():
                    child.unlink()
    elif path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{path} is not empty and holds no {CONFIG_FILE}; refusing to write a run into it. "
            "Pass overwrite=true or choose another folder with paths.run_dir=..."
        )
    path.mkdir(parents=True, exist_ok=True)
    (path / META_FILE).unlink(missing_ok=True)
    save_json(config_path, identity)
    return path


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


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

    def kernel(self) -> np.ndarray:
        """The saved kernel [N, N] (memory-mapped); needs ``ntk.save_kernel=true``."""
        path = self.path / "kernel.npy"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: the run was made without ntk.save_kernel=true; recompute it "
                "with ntklab.ntk.empirical_ntk(run.apply_fn, run.params, run.x)"
            )
        return np.load(path, mmap_mode="r", allow_pickle=False)


def load_run(path: str | os.PathLike, *, data_root: str | os.PathLike | None = None) -> NTKRun:
    """Reads a finished ``compute_ntk`` run and rebuilds its model and exact inputs.

    Args:
      path: the run folder (``artifacts/eigenfunctions/{dataset}/{model}``).
      data_root: where the dataset files are, if not at the run's ``data.root``.

    Returns:
      The run; ``x`` is verified byte-for-byte against the digest recorded at compute time.

    Raises:
      FileNotFoundError: no finished run in ``path``.
      ValueError: the dataset files now give different inputs than the run used.
    """
    from ntklab.data import load_dataset_config
    from ntklab.models import build_model, inference_apply_fn, init_variables

    path = Path(path)
    if not (path / META_FILE).exists():
        state = "an unfinished run" if (path / CONFIG_FILE).exists() else "no run"
        raise FileNotFoundError(
            f"{path} holds {state} ({META_FILE} is missing); run compute_ntk.py to create it"
        )
    meta = load_json(path / META_FILE)
    config = OmegaConf.create(meta["config"])
    root = {} if data_root is None else {"root": str(data_root)}
    dataset = load_dataset_config(config.data, seed=config.seed, download=False, **root)
    samples = load_arrays(path / "samples.npz")
    x = np.concatenate([dataset.train.images, dataset.test.images])
    if (
        not np.array_equal(samples["train_indices"], dataset.train.indices)
        or not np.array_equal(samples["test_indices"], dataset.test.indices)
        or array_digest(x) != meta["inputs"]["sha256"]
    ):
        raise ValueError(
            f"the dataset files under {root.get('root', config.data.root)} no longer give the inputs "
            "this run used "
            f"(sample indices or input digest differ); was the dataset replaced?"
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
