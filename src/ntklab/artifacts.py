"""Run folders: atomic writes of safe formats, checked artifacts, locked folders, reading runs back.

Dimensions: N examples (train first, then test), k eigenpairs.

    with open_run("artifacts/eigenfunctions/digits/lenet", identity) as run:
        save_array(run.path / "eigvals.npy", eigvals)     # [k]; its sha256 is recorded
        run.finish({"script": "compute_ntk", ...})          # meta.json last, listing every file
    run = load_run("artifacts/eigenfunctions/digits/lenet")  # verifies every file's sha256
    run.x                     # [N, H, W, C] inputs in kernel order
    run.eigvecs               # [k, N]
    run.apply_fn(run.params, run.x[:8])   # [8, 1], BatchNorm in inference mode

Every file is written to a temporary name unique to the process (``.<stem>.<pid>-<token><suffix>``,
mode 0666 less the umask) in its folder and renamed into place, so a crash never leaves a
half-written file; temporaries of killed processes are swept when the folder is next opened.
``meta.json`` is written last: a run folder is complete once it exists, and it lists the size and
sha256 of every file the run wrote (hashed when written), which readers verify. A run folder is
locked (``fcntl.flock`` on ``.lock``) while a run writes it; ``overwrite`` moves the old run aside
(``.replaced/``) and deletes it only once the new run is complete. Arrays are ``.npy``/``.npz``
(loaded with ``allow_pickle=False``), parameters flax msgpack, metadata JSON; nothing is pickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
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

from ntklab.locking import LockHeld, acquire_lock, release_lock
from ntklab.types import ApplyFn, PyTree

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
REPLACED_DIR = ".replaced"
"""Where ``overwrite`` keeps the previous run until the new one is complete."""
_TEMP_NAME = re.compile(r"^\..+\.(\d+)-[0-9a-f]{12}(\.[^.]*)?$")
_VERSIONED_PACKAGES = ("ntklab", "jax", "jaxlib", "flax", "optax", "numpy", "scipy", "hydra-core")


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


class RunFolderInUse(RuntimeError):
    """Another process holds the run folder's lock."""


class DamagedArtifactError(ValueError):
    """A file of a finished run no longer has the size or sha256 recorded in ``meta.json``."""


_ACTIVE_RUNS: list[RunFolder] = []
"""Run folders open in this process; :func:`atomic_path` records the files written into them."""


class RunFolder:
    """A run folder claimed by :func:`open_run`: locked, and recording the files written into it.

    Attributes:
      path: the folder.
      files: relative path -> ``{"bytes", "sha256"}`` of every file this run wrote so far.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: dict[str, dict[str, Any]] = {}
        self.finished = False

    def _relative(self, path: Path) -> str | None:
        try:
            return Path(os.path.abspath(path)).relative_to(os.path.abspath(self.path)).as_posix()
        except ValueError:
            return None

    def _before_write(self, path: Path) -> None:
        """The first write replacing a file makes the folder incomplete: ``meta.json`` goes."""
        name = self._relative(path)
        if name is not None and name != META_FILE and not self.finished:
            (self.path / META_FILE).unlink(missing_ok=True)

    def _record(self, path: Path, digest: dict[str, Any] | None) -> None:
        name = self._relative(path)
        if name is not None and name not in (META_FILE, CONFIG_FILE) and digest is not None:
            self.files[name] = digest

    def add_file(self, name: str) -> None:
        """Records a file written without :func:`atomic_path` (e.g. a memory-mapped kernel)."""
        self.files[name] = file_digest(self.path / name)

    def discard(self, name: str) -> None:
        """Deletes a file of an earlier run that this run does not produce (e.g. a stale kernel)."""
        self.files.pop(name, None)
        (self.path / name).unlink(missing_ok=True)

    def finish(self, meta: Mapping[str, Any]) -> None:
        """Writes ``meta.json`` last: ``meta`` plus the working directory and the file list.

        Args:
          meta: JSON-serializable run metadata (config, versions, shapes, timings).
        """
        kept = {  # files deleted during the run (e.g. old checkpoints) are not artifacts
            name: digest for name, digest in self.files.items() if (self.path / name).exists()
        }
        content = {**meta, "working_dir": os.getcwd(), "artifacts": dict(sorted(kept.items()))}
        save_json(self.path / META_FILE, content)
        self.finished = True


@contextlib.contextmanager
def open_run(
    path: str | os.PathLike,
    identity: Mapping[str, Any],
    *,
    overwrite: bool = False,
    foreign_files: bool = False,
) -> Iterator[RunFolder]:
    """Claims, locks and records a run folder for a run whose results ``identity`` determines.

    The identity (the config keys that change the results) is stored in ``config.json``. A folder
    holding a run of a different identity is refused unless ``overwrite`` is set, so results of two
    configurations are never mixed; a folder of the same identity is reused (a resumable run
    continues). A refused run changes nothing on disk. With ``overwrite``, the old run is moved to
    ``.replaced/`` and deleted only once the new run calls :meth:`RunFolder.finish`; if the new run
    fails with an error, the old run is put back (an interrupted one keeps both, and a rerun of
    either command completes or restores its run). A failed run leaves no ``config.json`` stub.

    Args:
      path: the run folder.
      identity: JSON-serializable mapping of the result-determining config.
      overwrite: replace a run of a different identity.
      foreign_files: the folder may hold other files (Hydra's log and ``.hydra/``) without a run.

    Yields:
      The :class:`RunFolder`; call ``finish(meta)`` at the end of a successful run.

    Raises:
      FileExistsError: the folder holds a different run (or other files) and ``overwrite`` is
        false.
      RunFolderInUse: another process is writing the folder ("run folder ... in use by PID ...").
      RuntimeError: called on a process other than 0 of a multi-process JAX run (process 0
        alone writes run folders).
    """
    if jax.distributed.is_initialized() and jax.process_index() != 0:
        raise RuntimeError(
            f"process {jax.process_index()} of a multi-process JAX run tried to claim {path}; "
            "only process 0 writes run folders (ntklab.distributed.is_writer())"
        )
    path = Path(path)
    identity = json.loads(json.dumps(identity, default=_json_default))
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(path):
            yield from _claimed(path, identity, overwrite=overwrite, foreign_files=foreign_files)
    finally:
        if created and path.exists() and not any(path.iterdir()):
            path.rmdir()


def _claimed(
    path: Path, identity: Any, *, overwrite: bool, foreign_files: bool
) -> Iterator[RunFolder]:
    """The body of :func:`open_run`, with the lock held."""
    _sweep_temporaries(path)
    replaced = path / REPLACED_DIR
    config_path = path / CONFIG_FILE
    if replaced.exists() and not (path / META_FILE).exists():
        if _read_identity(replaced) == identity:  # back to the run an overwrite interrupted
            _clear(path)
            _move_contents(replaced, path)
            replaced.rmdir()
    existing = _read_identity(path)
    moved_aside = False
    if existing is not None and existing != identity:
        if not overwrite and _holds_results(path):
            differences = ", ".join(_differences(existing, identity)) or "unknown keys"
            state = "a run" if (path / META_FILE).exists() else "an unfinished run"
            raise FileExistsError(
                f"{path} holds {state} with a different configuration ({differences}); "
                "refusing to mix them. Pass overwrite=true to replace it, or choose another "
                "folder with paths.run_dir=..."
            )
        moved_aside = _move_aside(path)
    elif existing is None and not overwrite and not foreign_files and _holds_results(path):
        raise FileExistsError(
            f"{path} is not empty and holds no {CONFIG_FILE}; refusing to write a run into it. "
            "Pass overwrite=true or choose another folder with paths.run_dir=..."
        )
    if existing != identity:
        save_json(config_path, identity)
    run = RunFolder(path)
    _ACTIVE_RUNS.append(run)
    try:
        yield run
    except Exception:
        if moved_aside:
            logger.warning("the new run failed; %s holds the previous run again", path)
            _clear(path)
            _move_contents(replaced, path)
            replaced.rmdir()
        elif not _holds_results(path) and existing != identity:
            config_path.unlink(missing_ok=True)  # no stub that would refuse a corrected run
        raise
    finally:
        _ACTIVE_RUNS.remove(run)
    if not run.finished:
        raise RuntimeError(f"the run in {path} ended without RunFolder.finish(meta)")
    if replaced.exists():
        shutil.rmtree(replaced)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Holds ``path/.lock`` (``fcntl.flock``) for the block; its content is the holder's PID."""
    lock_path = path / LOCK_FILE
    try:
        fd = acquire_lock(lock_path)
    except LockHeld as held:
        raise RunFolderInUse(
            f"run folder {path} in use by PID {held.pid}; wait for it to finish, or choose "
            "another folder with paths.run_dir=..."
        ) from None
    try:
        yield
    finally:
        release_lock(lock_path, fd)


def _sweep_temporaries(path: Path) -> None:
    """Deletes temporaries left by killed writers (the lock guarantees none is writing)."""
    for candidate in path.rglob(".*"):
        if candidate.is_file() and _TEMP_NAME.match(candidate.name):
            logger.info("removing %s, left by an interrupted process", candidate)
            candidate.unlink(missing_ok=True)


def _read_identity(path: Path) -> Any:
    config_path = path / CONFIG_FILE
    return load_json(config_path) if config_path.exists() else None


def _run_files(path: Path) -> list[Path]:
    """A folder's entries that belong to runs: all but the lock, ``.replaced/`` and Hydra's own
    files (``.hydra/``, the job's ``*.log``) when the folder is Hydra's output folder."""
    return [
        child
        for child in path.iterdir()
        if child.name not in (LOCK_FILE, REPLACED_DIR, ".hydra") and not child.name.endswith(".log")
    ]


def _holds_results(path: Path) -> bool:
    """Whether the folder holds run files other than ``config.json``."""
    return any(child.name != CONFIG_FILE for child in _run_files(path))


def _remove(child: Path) -> None:
    if child.is_dir() and not child.is_symlink():
        shutil.rmtree(child)
    else:
        child.unlink()


def _clear(path: Path) -> None:
    for child in _run_files(path):
        _remove(child)


def _move_contents(source: Path, target: Path) -> None:
    for child in _run_files(source):
        os.replace(child, target / child.name)


def _move_aside(path: Path) -> bool:
    """Moves a finished run's files into ``.replaced/``; deletes an unfinished one's.

    Returns:
      Whether ``.replaced/`` now holds a run to restore if the new run fails.
    """
    replaced = path / REPLACED_DIR
    if not (path / META_FILE).exists():  # an unfinished run of another identity: nothing to keep
        _clear(path)
        return replaced.exists()
    if replaced.exists():
        shutil.rmtree(replaced)
    replaced.mkdir()
    _move_contents(path, replaced)
    return True


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
            _verify_file(path / name, recorded)


def _verify_file(path: Path, recorded: Mapping[str, Any]) -> None:
    if not path.exists():
        raise DamagedArtifactError(f"{path} is missing; the run is damaged, recompute it")
    found = file_digest(path)
    if found != dict(recorded):
        what = "size" if found["bytes"] != recorded["bytes"] else "sha256"
        raise DamagedArtifactError(
            f"{path} is damaged: its {what} differs from the one recorded in {META_FILE} "
            f"({found[what]} != {recorded[what]}); recompute the run (overwrite=true)"
        )


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
            _verify_file(path, recorded)
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
