"""Where the trainer's arrays go, and how a whole labelled set is evaluated.

Dimensions: B examples per batch.

    placement = Placement(devices=None, batch_norm=False)   # one device, or a one-axis mesh
    evaluate = SetEvaluator(eval_step, x_test, y_test, 1024, placement)
    loss, accuracy = evaluate(state)

With more than one device, the state is replicated over a one-axis mesh and every batch sharded
along its axis (``NamedSharding``); a train batch whose size does not divide is padded with masked
examples, or, for a network with BatchNorm (whose batch statistics padding would change),
replicated on every device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ntklab.train_steps import TrainState
from ntklab.types import PyTree

logger = logging.getLogger("ntklab.train")

__all__ = ["Placement", "SetEvaluator"]


class Placement:
    """Where arrays go: one device as JAX chooses, or a one-axis mesh with sharded batches.

    Args:
      devices: the devices to train on (None: ``jax.local_devices()``).
      batch_norm: the model updates BatchNorm statistics in training mode (so a train batch
        must not be padded: it is replicated instead when its size does not divide).
    """

    def __init__(self, devices: Sequence[jax.Device] | None, *, batch_norm: bool):
        devices = list(jax.local_devices() if devices is None else devices)
        if not devices:
            raise ValueError("devices is empty; give at least one device (or None for all local)")
        self.num_devices = len(devices)
        self.batch_norm = batch_norm
        self.mesh = None
        if self.num_devices > 1 or devices[0] != jax.devices()[0]:
            self.mesh = Mesh(np.array(devices), ("batch",))
            self._replicated = NamedSharding(self.mesh, PartitionSpec())
            self._sharded = NamedSharding(self.mesh, PartitionSpec("batch"))
        self._warned = False

    def state(self, tree: PyTree) -> PyTree:
        """Device arrays of ``tree``, replicated over the mesh."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        return jax.device_put(tree, self._replicated)

    def eval_batch_size(self, batch_size: int) -> int:
        """``batch_size`` rounded up to a multiple of the device count."""
        return -(-batch_size // self.num_devices) * self.num_devices

    def eval_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """An evaluation batch (size a multiple of the device count), sharded."""
        if self.mesh is None:
            return {name: jnp.asarray(value) for name, value in batch.items()}
        return jax.device_put(batch, self._sharded)

    def train_batch(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """A train batch ``{"x" [B, ...], "y" [B]}`` placed for the step (see the module docstring)."""
        if self.mesh is None:
            return {"x": x, "y": y}
        size = len(x)
        padding = -size % self.num_devices
        if not padding:
            return jax.device_put({"x": x, "y": y}, self._sharded)
        if self.batch_norm:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "a train batch of %d examples does not divide over %d devices; with "
                    "BatchNorm it runs replicated on every device (exact, not parallel): choose "
                    "train.batch_size (and N_train) a multiple of %d",
                    size,
                    self.num_devices,
                    self.num_devices,
                )
            return jax.device_put({"x": x, "y": y}, self._replicated)
        batch = {
            "x": np.concatenate([x, np.zeros((padding, *x.shape[1:]), x.dtype)]),
            "y": np.concatenate([y, np.zeros(padding, y.dtype)]),
            "mask": np.arange(size + padding) < size,
        }
        return jax.device_put(batch, self._sharded)


class SetEvaluator:
    """Loss and accuracy of one labelled set, in padded masked batches of one shape."""

    def __init__(
        self,
        eval_step: Callable,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int,
        placement: Placement,
    ):
        self.size = len(x)
        num_batches = max(1, math.ceil(self.size / batch_size))
        padding = num_batches * batch_size - self.size
        pad = lambda a: np.concatenate([a, np.zeros((padding, *a.shape[1:]), a.dtype)])  # noqa: E731
        self._batches = [
            placement.eval_batch({"x": xb, "y": yb, "mask": mb})
            for xb, yb, mb in zip(
                np.split(pad(x), num_batches),
                np.split(pad(y), num_batches),
                np.split(pad(np.ones(self.size, bool)), num_batches),
                strict=True,
            )
        ]
        self._eval_step = eval_step

    def __call__(self, state: TrainState) -> tuple[float, float]:
        """Returns (mean loss, accuracy); NaN for an empty set."""
        if not self.size:
            return math.nan, math.nan
        sums = jax.device_get(
            [self._eval_step(state.params, state.batch_stats, b) for b in self._batches]
        )
        total_loss = float(np.sum([s["loss"] for s in sums], dtype=np.float64))
        correct = int(np.sum([s["correct"] for s in sums]))
        return total_loss / self.size, correct / self.size
