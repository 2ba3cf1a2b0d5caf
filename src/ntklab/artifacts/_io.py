"""File I/O of run folders: atomic writes of safe formats, digests, free space, metadata.

Every file is written to a temporary name unique to the process (``.<stem>.<pid>-<token><suffix>``,
mode 0666 less the umask) in its folder and renamed into place, so a crash never leaves a
half-written file. Arrays are ``.npy``/``.npz`` (loaded with ``allow_pickle=False``), parameters
flax msgpack, metadata JSON; nothing is pickled. Inside an open run folder
(:mod:`ntklab.artifacts._folders`) every file written here has its size and sha256 recorded.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization
from omegaconf import DictConfig, OmegaConf

from ntklab.errors import DamagedArtifactError
from ntklab.types import PyTree

META_FILE = "meta.json"
CONFIG_FILE = "config.json"
POINTER_FILE = "run.json"
"""In a Hydra job's folder (never a run folder): ``{"run_dir": <absolute path>, "script": ...}``,
the run folder the job claimed (``ntklab.experiments.pointers``)."""
_VERSIONED_PACKAGES = ("ntklab", "jax", "jaxlib", "flax", "optax", "numpy", "scipy", "hydra-core")
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")
"""NumPy's message for a short ``fwrite`` (``ndarray.tofile``), an OSError without errno: the
disk (or the quota) is full."""
_ACTIVE_RUNS: list[Any] = []
"""Run folders open in this process (``_folders.RunFolder``): :func:`atomic_path` tells them
about every file written into them."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; renames it onto ``path`` if the block succeeds.

    The temporary name is unique to the process and keeps ``path``'s suffix, so writers that add
    suffixes behave; it is created with mode 0666 less the umask, and removed on any failure. Inside
    an :func:`open_run` block, the file's size and sha256 are recorded for ``meta.json``.

    Raises:
      OSError: the disk is full (or the file too large); the error names ``path``, and the file
        already at ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(6)}{path.suffix}")
    os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        try:
            yield temp
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):  # name the file
                raise OSError(error.errno, os.strerror(error.errno), str(path)) from error
            if error.errno is None and _SHORT_WRITE.search(str(error)):  # ndarray.tofile
                raise OSError(
                    errno.ENOSPC,
                    f"{os.strerror(errno.ENOSPC)} (a short write: {error})",
                    str(path),
                ) from error
            raise
        digest = file_digest(temp) if _ACTIVE_RUNS else None
        for run in _ACTIVE_RUNS:
            run._before_write(path)
        os.replace(temp, path)
        for run in _ACTIVE_RUNS:
            run._record(path, digest)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex digest}`` of a file's contents."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": os.path.getsize(path), "sha256": digest}


LARGE_ARTIFACT_BYTES = 64 * 2**20
"""Arrays at least this large are written only after a free-space check."""


def check_free_space(path: str | os.PathLike, num_bytes: int) -> None:
    """Refuses to write ``num_bytes`` next to ``path`` when the disk has less free space.

    Raises:
      OSError: ENOSPC, naming ``path``, the bytes needed and the bytes available.
    """
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if num_bytes > free:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device: writing {path} needs {num_bytes:,} bytes, "
            f"{free:,} are available",
            str(path),
        )


def save_array(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes one array as ``.npy`` (after a free-space check when it is large)."""
    array = np.asarray(array)
    if array.nbytes >= LARGE_ARTIFACT_BYTES:
        check_free_space(path, array.nbytes + 4096)
    with atomic_path(path) as temp, open(temp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def save_arrays(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Writes named arrays as an uncompressed ``.npz`` (free space checked when large)."""
    total = sum(np.asarray(a).nbytes for a in arrays.values())
    if total >= LARGE_ARTIFACT_BYTES:
        check_free_space(path, total + 4096 * (len(arrays) + 1))
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
    """Reads a JSON file.

    Raises:
      ValueError: the file is not valid JSON (the message names it).
    """
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the file is damaged") from error


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
        "num_processes": jax.process_count(),
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


def verify_artifacts(path: str | os.PathLike, meta: Mapping[str, Any], *, skip=()) -> None:
    """Checks every file ``meta.json`` lists against its recorded size and sha256.

    Args:
      path: the run folder.
      meta: its ``meta.json``.
      skip: names not to check here (e.g. a large kernel checked when it is read).

    Raises:
      DamagedArtifactError: a file is missing, or its size or sha256 differs (names the file).
    """
    path = Path(path)
    for name, recorded in meta.get("artifacts", {}).items():
        if name not in skip:
            verify_file(path / name, recorded)


def verify_file(path: str | os.PathLike, recorded: Mapping[str, Any]) -> None:
    """Checks one file against its recorded ``{"bytes", "sha256"}`` (as ``meta.json`` lists them).

    Raises:
      DamagedArtifactError: the file is missing, truncated or extended, or its bytes changed (the
        message names the file and what differs).
    """
    path = Path(path)
    if not path.is_file():
        raise DamagedArtifactError(f"{path} is missing; the run is damaged, recompute it")
    found = file_digest(path)
    if found != dict(recorded):
        key = "bytes" if found["bytes"] != recorded.get("bytes") else "sha256"
        what = "size" if key == "bytes" else "sha256"
        raise DamagedArtifactError(
            f"{path} is damaged: its {what} differs from the one recorded in {META_FILE} "
            f"({found[key]} != {recorded.get(key)}); recompute the run (overwrite=true)"
        )
