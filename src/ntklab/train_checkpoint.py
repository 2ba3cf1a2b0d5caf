"""Checkpoints of the shared trainer: self-checking files, written atomically, restored newest first.

Dimensions: none of its own (pytrees of the train state, whatever their shapes).

    store = CheckpointStore(run_dir / "checkpoints", identity)
    restored = store.restore(state)         # None, or Restored(epoch, state, history, ...)
    store.save(10, state, history, elapsed_s=12.5, measurements=[])  # epoch_000010.msgpack

One checkpoint is one flax-msgpack file ``epoch_<E>.msgpack`` (no pickle): an envelope
``{"format", "version", "sha256", "payload"}`` whose payload (msgpack bytes) holds the training
identity (JSON), the epoch, the metric history so far (JSON), the measurements taken so far
(JSON, e.g. the alignment along training), the elapsed training time and the whole train state
(step, params, batch_stats, optimizer state). The newest ``max_to_keep`` (2) files are kept: older
ones are deleted after each save and when a run resumes (a kill between a save and its clean-up
leaves one more, which the next start removes). Files are written to a unique
temporary name, fsynced and renamed into place, so a kill at any point leaves either the old set of
checkpoints or the new one. On restore the newest file whose envelope, checksum and contents are
sound is used; a damaged one is logged by name and skipped. A sound checkpoint of another identity
(another config, data, starting parameters or model) is refused: the results would be mixed.

The data order needs no state of its own: epoch ``e`` is shuffled with ``fold_in(PRNGKey(seed), e)``
(``ntklab.train_inputs.epoch_order``), so resuming after epoch ``E`` replays epochs ``E+1, ...`` exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from ntklab import artifacts
from ntklab.types import PyTree

__all__ = ["CheckpointStore", "Restored", "tree_digest"]

logger = logging.getLogger(__name__)

FORMAT = "ntklab-train-checkpoint"
VERSION = 1
_NAME = re.compile(r"^epoch_(\d+)\.msgpack$")


def tree_digest(tree: PyTree) -> str:
    """sha256 over a pytree's key paths, dtypes, shapes and bytes: identifies it exactly."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(artifacts.array_digest(np.asarray(leaf)).encode())
    return digest.hexdigest()


@dataclasses.dataclass
class Restored:
    """A checkpoint read back.

    Attributes:
      epoch: epochs finished when it was written.
      state: the train state (host arrays in the target's structure).
      history: the metric records of epochs 0..epoch.
      elapsed_s: training wall time spent before it was written.
      path: the file.
      measurements: the measurements taken up to ``epoch`` (``fit``'s ``measures``).
    """

    epoch: int
    state: Any
    history: list[dict]
    elapsed_s: float
    path: Path
    measurements: list[dict] = dataclasses.field(default_factory=list)


class CheckpointStore:
    """The checkpoints of one training run in one folder.

    Args:
      folder: where the checkpoints live (created on the first save).
      identity: JSON-serializable description of everything that determines the results.
      max_to_keep: how many of the newest checkpoints to keep (>= 2, so a damaged newest one
        still leaves one to resume from).
    """

    def __init__(
        self, folder: str | os.PathLike, identity: dict[str, Any], *, max_to_keep: int = 2
    ):
        if max_to_keep < 2:
            raise ValueError(f"max_to_keep must be >= 2, got {max_to_keep}")
        self.folder = Path(folder)
        self.identity = json.loads(json.dumps(identity))
        self.max_to_keep = max_to_keep

    def paths(self) -> list[tuple[int, Path]]:
        """``(epoch, path)`` of every checkpoint file, newest first."""
        if not self.folder.is_dir():
            return []
        found = [
            (int(match.group(1)), path)
            for path in self.folder.iterdir()
            if (match := _NAME.match(path.name)) and path.is_file()
        ]
        return sorted(found, reverse=True)

    def restore(self, target: Any) -> Restored | None:
        """The newest sound checkpoint of this identity, restored into ``target``'s structure.

        Args:
          target: a train state of the run's structure (e.g. the fresh initial state).

        Returns:
          The checkpoint, or None when there is none (or none is sound: each is logged).

        Raises:
          FileExistsError: a sound checkpoint belongs to another training identity.
        """
        self._remove_temporaries()
        for epoch, path in self.paths():
            try:
                payload = _read(path)
            except Exception as error:  # any failure to read or decode it means damage
                logger.warning(
                    "checkpoint %s is damaged (%s: %s); skipping it and trying the previous one",
                    path,
                    type(error).__name__,
                    error,
                )
                continue
            identity = json.loads(payload["identity"])
            if identity != self.identity:
                differences = (
                    "; ".join(artifacts.differences_of(identity, self.identity)) or "unknown keys"
                )
                raise FileExistsError(
                    f"{path} is a checkpoint of another training run ({differences}); refusing to "
                    f"resume from it. Delete {self.folder} to start afresh, or choose another run "
                    "folder"
                )
            if int(payload["epoch"]) != epoch:
                logger.warning(
                    "checkpoint %s holds epoch %s, not %d; skipping it",
                    path,
                    payload["epoch"],
                    epoch,
                )
                continue
            state = serialization.from_state_dict(target, payload["state"])
            self._prune(epoch)
            return Restored(
                epoch=epoch,
                state=state,
                history=json.loads(payload["history"]),
                elapsed_s=float(payload["elapsed_s"]),
                path=path,
                measurements=json.loads(payload.get("measurements", "[]")),
            )
        return None

    def save(
        self,
        epoch: int,
        state: Any,
        history: list[dict],
        *,
        elapsed_s: float,
        measurements: list[dict] | None = None,
    ) -> Path:
        """Writes the checkpoint of ``epoch`` atomically and drops the older ones beyond the limit.

        Checkpoints of later epochs (left over from a run that was resumed from an earlier one,
        i.e. damaged) are removed too.

        Returns:
          The file written.
        """
        payload = serialization.msgpack_serialize(
            {
                "identity": json.dumps(self.identity, sort_keys=True),
                "epoch": epoch,
                "history": json.dumps(history),
                "measurements": json.dumps(measurements or []),
                "elapsed_s": float(elapsed_s),
                "state": serialization.to_state_dict(jax.device_get(state)),
            }
        )
        envelope = serialization.msgpack_serialize(
            {
                "format": FORMAT,
                "version": VERSION,
                "sha256": hashlib.sha256(payload).hexdigest(),
                "payload": payload,
            }
        )
        path = self.folder / f"epoch_{epoch:06d}.msgpack"
        with artifacts.atomic_path(path) as temp, open(temp, "wb") as handle:
            handle.write(envelope)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_folder(self.folder)
        self._prune(epoch)
        logger.debug("checkpoint of epoch %d written to %s (%d bytes)", epoch, path, len(envelope))
        return path

    def _prune(self, epoch: int) -> None:
        """Keeps ``epoch``'s checkpoint and the newest older ones up to ``max_to_keep`` in all;
        later epochs (left by a run resumed from an earlier one) go too."""
        kept = 0
        for other_epoch, other in self.paths():
            if other_epoch > epoch or (other_epoch < epoch and kept >= self.max_to_keep):
                other.unlink(missing_ok=True)
            elif other_epoch <= epoch:
                kept += 1

    def _remove_temporaries(self) -> None:
        """Deletes temporary files of writes that a kill interrupted (``.epoch_*.msgpack``)."""
        if not self.folder.is_dir():
            return
        for path in self.folder.glob(".epoch_*.msgpack"):
            logger.info("removing %s, an interrupted checkpoint write", path)
            path.unlink(missing_ok=True)


def _read(path: Path) -> dict[str, Any]:
    """The verified payload of a checkpoint file.

    Raises:
      ValueError: not a checkpoint, an unknown version, or a checksum mismatch.
    """
    envelope = serialization.msgpack_restore(path.read_bytes())
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        raise ValueError(f"not an {FORMAT} file")
    if envelope.get("version") != VERSION:
        raise ValueError(f"format version {envelope.get('version')!r}, expected {VERSION}")
    payload = envelope["payload"]
    if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != envelope["sha256"]:
        raise ValueError("checksum mismatch")
    content = serialization.msgpack_restore(payload)
    missing = {"identity", "epoch", "history", "elapsed_s", "state"} - set(content)
    if missing:
        raise ValueError(f"missing fields {sorted(missing)}")
    return content


def _fsync_folder(folder: Path) -> None:
    """Makes a rename in ``folder`` durable (where the platform allows opening folders)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
