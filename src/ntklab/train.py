"""The shared trainer: one epoch loop for networks and their linearizations.

Dimensions: N examples (N_train, N_test), B examples per batch, K = 1 output (one logit).

    result = fit(
        apply_fn=None,                          # or linearize(apply_fn, params0): see below
        train_apply_fn=train_apply_fn(model),   # (params, batch_stats, x[B, ...]) -> ([B, 1], stats)
        eval_apply_fn=eval_apply_fn(model),     # BatchNorm models: inference with the state's stats
        params=variables["params"], batch_stats=variables.get("batch_stats", {}),
        x_train=x[:n], y_train=y[:n], x_test=x[n:], y_test=y[n:],   # x [N, H, W, C], y [N] in {0, 1}
        config=TrainConfig(epochs=2), seed=0, run_dir=Path("run"),
    )
    result.final["test/acc"], result.history[-1]["train/loss"]

**What drives training.** Exactly one of two functions is given:

- ``train_apply_fn(params, batch_stats, x) -> (outputs, new_batch_stats)``: the network with
  BatchNorm in training mode (batch statistics, running averages updated in the train state).
  Evaluation runs in inference mode with the state's running averages through
  ``eval_apply_fn(params, batch_stats, x)``; a model without BatchNorm (empty ``batch_stats``) may
  omit it, since both modes then coincide.
- ``apply_fn(params, x) -> outputs``: a model with no mutable state, e.g. ``linearize(...)`` of
  an inference-mode network; it trains and evaluates, and ``batch_stats`` pass through unchanged.

Internally both become one adapter with the same two methods, so there is one loop and one pair of
jitted steps. The adapter is a pytree (``jax.tree_util.Partial``) handed to the jitted steps as an
argument: arrays it holds (θ0 of a linearization) stay buffers, not compiled-in constants.

**Steps.** ``train_step(state, batch) -> (state, metrics)`` is pure and jitted with the state
donated (``ntklab.train_steps``, whose public names are re-exported here; compiled steps are cached
and reused by later fits with the same options and model functions). Each epoch reshuffles the train set with ``fold_in(PRNGKey(seed), epoch)``; the last batch
of an epoch may be smaller (no sample dropped; one extra compilation). Evaluation covers every
sample of both sets in padded, masked batches of one shape, in inference mode.

**Checkpoints and resume.** With ``checkpoint_dir``, the state (params, batch_stats, optimizer
state, step), the epoch and the metric history are checkpointed every ``checkpoint_every`` epochs
and after the last (``ntklab.train_checkpoint``: atomic, checksummed flax msgpack, the newest two
kept). A later fit with the same arguments resumes from the newest sound checkpoint (a damaged one
is logged and skipped) and ends with the same parameters, bit for bit, as an uninterrupted run:
the epoch order is a pure function of (seed, epoch). A checkpoint of another training identity
(config, seed, data, starting parameters, model program) is refused.

**Finiteness.** Non-finite inputs or labels are refused up front. Each step returns a flag, computed
inside the jitted step, that its loss and updated parameters and statistics are all finite; the
flags are read once per epoch (no extra synchronization) and a false one stops training with the
step named, before any checkpoint of the damaged state is written.

**Data parallel.** Training and evaluation run on ``devices`` (default ``jax.local_devices()``):
with more than one, on a one-axis mesh, the state replicated and every batch sharded along the
batch axis (``NamedSharding``). Under jit the batch mean that BatchNorm takes over a sharded batch
is the global one, so running statistics equal those of one device. A train batch whose size is
not a multiple of the device count is padded with masked examples (they add nothing to the loss);
for a network with BatchNorm, whose batch statistics the padding would change, such a batch is
instead replicated on every device (exact; choose ``batch_size`` a multiple of the device count).

**Losses.** ``bce``: sigmoid binary cross-entropy of the logit against labels in {0, 1}; a sample
is correct when ``(logit > 0) == label``. ``mse``: ``(output − label)² / 2`` (so full-batch gradient
descent is ``θ ← θ − lr/N · Jᵀ(f − y)``), correct when ``(output > 1/2) == label``. Batch losses
are means over the batch.

**Optimizers.** ``sgd`` (heavy-ball momentum ``momentum``, PyTorch convention) or ``adam``; a
non-zero ``weight_decay`` adds ``weight_decay · θ`` to the gradient first (coupled L2, as PyTorch's
``weight_decay``). Learning rate ``max_lr`` with schedule ``linear`` (from ``max_lr`` to 0 over
all steps), ``fixed``, or ``cyclic``: the one-cycle policy (cosine warm-up from ``max_lr/25`` to
``max_lr`` over the first 30% of steps, cosine decay to ``max_lr/25e4``; PyTorch's ``OneCycleLR``
defaults, without momentum cycling). ``lr_normalization`` (``none`` | ``ntk``) is recorded, not
applied here: with ``ntk`` the experiment scripts pass ``max_lr · λ_max(K_init) / λ_max(K_model)``
as ``max_lr`` (:mod:`ntklab.lr_normalization`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ntklab import artifacts
from ntklab.progress import progress_bar
from ntklab.train_checkpoint import CheckpointStore, tree_digest
from ntklab.train_steps import (
    LOSSES,
    LR_NORMALIZATIONS,
    LR_SCHEDULES,
    OPTIMIZERS,
    EvalApplyFn,
    TrainApplyFn,
    TrainConfig,
    TrainState,
    build_optimizer,
    compiled_steps,
    eval_apply_fn,
    init_train_state,
    learning_rate_fn,
    model_fns,
    train_step_fn,
)
from ntklab.types import ApplyFn, PyTree

__all__ = [
    "LOSSES",
    "LR_NORMALIZATIONS",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "EvalApplyFn",
    "Evaluator",
    "FitResult",
    "TrainApplyFn",
    "TrainConfig",
    "TrainState",
    "build_optimizer",
    "eval_apply_fn",
    "fit",
    "init_train_state",
    "learning_rate_fn",
    "train_step_fn",
]

logger = logging.getLogger(__name__)

Evaluator = Callable[[TrainState], Mapping[str, float]]
"""``evaluator(state) -> {"split/metric": value}``, called at the end of training."""

METRICS_LOG = "metrics.jsonl"
NON_IDENTITY_OPTIONS = ("checkpoint_every", "eval_batch_size", "lr_normalization")
"""Train options that do not change results (the evaluation batch only reorders float sums; the
trainer takes ``max_lr`` as given, already normalized by the caller under ``lr_normalization``)."""
PARAMS_FILE = "params.msgpack"


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
      params: trained parameters.
      batch_stats: final BatchNorm running averages (unchanged for ``apply_fn`` training).
      history: one record per epoch (epoch 0 = before training), the lines of ``metrics.jsonl``:
        ``epoch``, ``step``, ``train/lr`` (of the epoch's last step), ``train/batch_loss`` (mean
        of the epoch's batch losses; both None at epoch 0), ``train/loss``, ``train/acc``, ``test/loss``, ``test/acc`` (whole sets, inference
        mode), ``train/epoch_s``, plus evaluator metrics on evaluation epochs.
      final: the last record plus ``param_distance_sq`` = ‖θ − θ_start‖², ``wall_time_s`` and
        the evaluators' metrics.
      state: the final train state.
    """

    params: PyTree
    batch_stats: PyTree
    history: list[dict]
    final: dict
    state: TrainState


class _Placement:
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


class _Evaluator:
    """Loss and accuracy of one labelled set, in padded masked batches of one shape."""

    def __init__(
        self,
        eval_step: Callable,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int,
        placement: _Placement,
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


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


def fit(
    *,
    apply_fn: ApplyFn | None = None,
    train_apply_fn: TrainApplyFn | None = None,
    params: PyTree,
    batch_stats: PyTree,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    config: TrainConfig,
    seed: int,
    run_dir: Path | None,
    progress: bool = True,
    evaluators: dict[str, Evaluator] | None = None,
    eval_apply_fn: EvalApplyFn | None = None,
    desc: str = "train",
    checkpoint_dir: Path | None = None,
    checkpoint_every: int | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> FitResult:
    """Trains a network or a stateless model (e.g. a linearization) on binary labels.

    Args:
      apply_fn: stateless model ``(params, x[B, ...]) -> [B, 1]``; give this or
        ``train_apply_fn`` (see the module docstring).
      train_apply_fn: network in BatchNorm training mode
        ``(params, batch_stats, x[B, ...]) -> ([B, 1], new_batch_stats)``.
      params: starting parameters (copied: the caller's arrays are never donated).
      batch_stats: starting BatchNorm running averages; ``{}`` (or None) without BatchNorm.
      x_train: train inputs [N_train, ...], finite.
      y_train: train labels [N_train], 0/1 floats.
      x_test: test inputs [N_test, ...] (may be empty), finite.
      y_test: test labels [N_test].
      config: hyperparameters.
      seed: seeds the per-epoch shuffles (``fold_in(PRNGKey(seed), epoch)``).
      run_dir: folder for ``metrics.jsonl`` (rewritten after every epoch) and the final
        ``params.msgpack`` (``{"params", "batch_stats"}``); None writes nothing.
      progress: show a progress bar over epochs.
      evaluators: ``name -> evaluator(state) -> {"split/metric": float}``, run at the end (and
        every ``config.evaluate_every`` epochs); their metrics join ``final`` / the history.
      eval_apply_fn: inference-mode network ``(params, batch_stats, x) -> [B, 1]``, needed with
        ``train_apply_fn`` when the model has BatchNorm.
      desc: progress-bar label.
      checkpoint_dir: folder for checkpoints; a fit with the same arguments resumes from the
        newest sound one there. None: no checkpoints.
      checkpoint_every: epochs between checkpoints; None: ``config.checkpoint_every`` (whose
        None means about every 10% of the run).
      devices: devices to shard each batch over (None: ``jax.local_devices()``).

    Returns:
      The trained parameters, statistics, per-epoch history and final metrics.

    Raises:
      ValueError: not exactly one model function, inconsistent shapes, non-finite inputs, labels
        not in {0, 1}, a BatchNorm network without ``eval_apply_fn``, or outputs that are not one
        logit.
      FileExistsError: ``checkpoint_dir`` holds a checkpoint of another training run.
      FloatingPointError: the training loss or a parameter became non-finite (the message names
        the step and the epoch).
    """
    batch_stats = {} if batch_stats is None else batch_stats
    if checkpoint_every is not None:
        config = dataclasses.replace(config, checkpoint_every=checkpoint_every)
    train, infer = model_fns(apply_fn, train_apply_fn, eval_apply_fn, batch_stats)
    x_train, y_train, x_test, y_test = _check_data(x_train, y_train, x_test, y_test)
    placement = _Placement(
        devices, batch_norm=train_apply_fn is not None and bool(jax.tree.leaves(batch_stats))
    )
    num_train = len(x_train)
    steps_per_epoch = math.ceil(num_train / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    compiled = compiled_steps(config, total_steps, placement.mesh)
    train_step = functools.partial(compiled.train_step, train)
    eval_step = functools.partial(compiled.eval_step, infer)
    eval_batch = placement.eval_batch_size(min(config.eval_batch_size, max(num_train, len(x_test))))
    evaluate_train = _Evaluator(eval_step, x_train, y_train, eval_batch, placement)
    evaluate_test = _Evaluator(eval_step, x_test, y_test, eval_batch, placement)
    evaluators = dict(evaluators or {})

    state, start_params = compiled.initial_state(params, batch_stats)
    key = jax.random.PRNGKey(seed)
    if run_dir is not None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    store = None
    start_epoch, elapsed_before = 0, 0.0
    restored = None
    if checkpoint_dir is not None and config.epochs:
        identity = _identity(
            config, seed, train, infer, params, batch_stats, (x_train, y_train, x_test, y_test)
        )
        store = CheckpointStore(checkpoint_dir, identity)
        restored = store.restore(state)
    if restored is not None:
        state = placement.state(restored.state)
        history, start_epoch, elapsed_before = restored.history, restored.epoch, restored.elapsed_s
        logger.info(
            "%s: resumed from epoch %d of %d (%s)", desc, start_epoch, config.epochs, restored.path
        )
    else:
        history = [_record(0, 0, None, None, state, evaluate_train, evaluate_test, 0.0)]
    every = config.checkpoint_interval()
    saved_epoch = start_epoch if restored is not None else None

    tic = time.perf_counter()
    bar = progress_bar(total=config.epochs - start_epoch, desc=desc, unit="epoch", enabled=progress)
    epoch = start_epoch
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            epoch_tic = time.perf_counter()
            order = _epoch_order(key, epoch, num_train)
            batch_losses, finite = [], []
            for start in range(0, num_train, config.batch_size):
                index = order[start : start + config.batch_size]
                batch = placement.train_batch(x_train[index], y_train[index])
                state, metrics = train_step(state, batch)
                batch_losses.append(metrics["train/batch_loss"])
                finite.append(metrics["train/finite"])
                lr = metrics["train/lr"]
            losses, finite = jax.device_get((batch_losses, finite))
            first = (epoch - 1) * steps_per_epoch + 1
            if not all(finite):
                bad = int(np.argmin(finite))
                raise FloatingPointError(
                    f"non-finite training loss or parameters in epoch {epoch}: first after step "
                    f"{first + bad} (the epoch's steps are {first}-{epoch * steps_per_epoch}), "
                    f"batch loss {float(losses[bad])}; lower train.max_lr={config.max_lr} or check "
                    "the model"
                    + (f"; the checkpoint of epoch {saved_epoch} is intact" if saved_epoch else "")
                )
            sizes = np.diff([*range(0, num_train, config.batch_size), num_train])
            batch_loss = float(np.dot(losses, sizes)) / num_train
            step = epoch * steps_per_epoch
            record = _record(
                epoch,
                step,
                float(lr),
                batch_loss,
                state,
                evaluate_train,
                evaluate_test,
                time.perf_counter() - epoch_tic,
            )
            if config.evaluate_every and epoch % config.evaluate_every == 0:
                record.update(_run_evaluators(evaluators, state))
            history.append(record)
            if run_dir is not None:
                _write_history(run_dir / METRICS_LOG, history)
            if store is not None and (epoch % every == 0 or epoch == config.epochs):
                elapsed = elapsed_before + time.perf_counter() - tic
                store.save(epoch, state, history, elapsed_s=elapsed)
                saved_epoch = epoch
            logger.info("epoch %d/%d: %s", epoch, config.epochs, _short(record))
            bar.update(
                1,
                loss=f"{record['train/loss']:.3g}",
                train_acc=f"{record['train/acc']:.3f}",
                test_acc=f"{record['test/acc']:.3f}",
            )
    except KeyboardInterrupt:
        if store is None:
            logger.warning("%s interrupted in epoch %d/%d", desc, epoch, config.epochs)
        else:
            logger.warning(
                "%s interrupted in epoch %d/%d; %s: rerunning the same command resumes",
                desc,
                epoch,
                config.epochs,
                f"the checkpoint of epoch {saved_epoch} is in {checkpoint_dir}"
                if saved_epoch
                else f"no checkpoint written yet (every {every} epochs)",
            )
        raise
    finally:
        bar.close()

    final = dict(history[-1])
    if not (config.evaluate_every and config.epochs and config.epochs % config.evaluate_every == 0):
        final.update(_run_evaluators(evaluators, state))
    final["param_distance_sq"] = _distance_sq(state.params, start_params)
    final["wall_time_s"] = elapsed_before + time.perf_counter() - tic
    if run_dir is not None:
        _write_history(run_dir / METRICS_LOG, history)
        artifacts.save_params(
            run_dir / PARAMS_FILE, {"params": state.params, "batch_stats": state.batch_stats}
        )
    logger.info("%s done: %s", desc, _short(final))
    return FitResult(
        params=state.params,
        batch_stats=state.batch_stats,
        history=history,
        final=final,
        state=state,
    )


def _identity(
    config: TrainConfig,
    seed: int,
    train: Callable,
    infer: Callable,
    params: PyTree,
    batch_stats: PyTree,
    data: tuple[np.ndarray, ...],
) -> dict[str, Any]:
    """Everything that determines a run's results, for its checkpoints.

    The model enters as a digest of its lowered train and inference programs on one example (so
    another activation, or other closed-over statistics, is another run); ``NON_IDENTITY_OPTIONS``,
    the devices and the progress options do not enter.
    """
    x_one = jnp.asarray(data[0][:1])
    lower = jax.jit(lambda function, *args: function(*args)).lower
    programs = hashlib.sha256()
    for function in (train, infer):
        programs.update(lower(function, params, batch_stats, x_one).as_text().encode())
    options = dataclasses.asdict(config)
    for key in NON_IDENTITY_OPTIONS:
        options.pop(key)
    return {
        "train": options,
        "seed": seed,
        "prng_impl": str(jax.config.jax_default_prng_impl),
        "data": {
            name: artifacts.array_digest(array)
            for name, array in zip(("x_train", "y_train", "x_test", "y_test"), data, strict=True)
        },
        "params": tree_digest(params),
        "batch_stats": tree_digest(batch_stats),
        "model": programs.hexdigest(),
    }


def _epoch_order(key: jax.Array, epoch: int, num_train: int) -> np.ndarray:
    """The order [N_train] of an epoch, drawn from ``fold_in(key, epoch)``.

    The permutation itself is drawn by NumPy seeded with the folded key's bits: the same
    (seed, epoch) give the same order, without compiling a sort for every N_train.
    """
    bits = np.asarray(jax.random.key_data(jax.random.fold_in(key, epoch)), np.uint32)
    return np.random.default_rng(bits.ravel()).permutation(num_train)


def _check_data(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    arrays = [np.asarray(a) for a in (x_train, y_train, x_test, y_test)]
    x_train, y_train, x_test, y_test = arrays
    if not len(x_train):
        raise ValueError("x_train is empty; the trainer needs at least one train example")
    for name, array in zip(("x_train", "y_train", "x_test", "y_test"), arrays, strict=True):
        _check_finite(name, array)
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"y_{name} must be [N_{name}] = [{len(x)}], got shape {y.shape}")
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"y_{name} must hold labels 0 and 1, got values {np.unique(y)[:5]}")
    if x_train.shape[1:] != x_test.shape[1:] and len(x_test):
        raise ValueError(f"x_train {x_train.shape} and x_test {x_test.shape} differ per example")
    dtype = x_train.dtype if np.issubdtype(x_train.dtype, np.floating) else np.float32
    return x_train, y_train.astype(dtype), x_test.astype(x_train.dtype), y_test.astype(dtype)


def _check_finite(name: str, array: np.ndarray, rows: int = 4096) -> None:
    """Raises ValueError naming ``name`` and its first non-finite element (checked in row chunks)."""
    if not np.issubdtype(array.dtype, np.inexact):
        return
    for start in range(0, len(array), rows):
        bad = ~np.isfinite(array[start : start + rows])
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            index = (index[0] + start, *index[1:])
            raise ValueError(
                f"{name} holds non-finite values ({int(bad.sum())} in rows {start}-"
                f"{start + len(bad) - 1}), the first {array[index]} at index {index}; the trainer "
                "accepts only finite inputs and labels"
            )


def _record(
    epoch: int,
    step: int,
    lr: float | None,
    batch_loss: float | None,
    state: TrainState,
    evaluate_train: _Evaluator,
    evaluate_test: _Evaluator,
    seconds: float,
) -> dict[str, Any]:
    train_loss, train_acc = evaluate_train(state)
    test_loss, test_acc = evaluate_test(state)
    return {
        "epoch": epoch,
        "step": step,
        "train/lr": lr,
        "train/batch_loss": batch_loss,
        "train/loss": train_loss,
        "train/acc": train_acc,
        "test/loss": test_loss,
        "test/acc": test_acc,
        "train/epoch_s": seconds,
    }


def _run_evaluators(evaluators: dict[str, Evaluator], state: TrainState) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, evaluator in evaluators.items():
        tic = time.perf_counter()
        values = dict(evaluator(state))
        metrics.update({key: float(value) for key, value in values.items()})
        logger.info("evaluator %s: %s in %.2f s", name, _short(values), time.perf_counter() - tic)
    return metrics


def _distance_sq(params: PyTree, start: PyTree) -> float:
    """‖params − start‖² in float64, on the host (no compilation)."""
    leaves = zip(
        jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(jax.device_get(start)), strict=True
    )
    return float(sum(np.sum((np.float64(p) - q) ** 2) for p, q in leaves))


def _write_history(path: Path, history: list[dict]) -> None:
    with artifacts.atomic_path(path) as temp:
        temp.write_text("".join(json.dumps(record) + "\n" for record in history))


def _short(record: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
        for key, value in record.items()
    )
