"""The shared trainer: one epoch loop for networks and their linearizations.

Dimensions: N examples (N_train, N_test), B examples per batch, K = 1 output (one logit).

    trainee = Trainee(
        params=variables["params"], batch_stats=variables.get("batch_stats", {}),
        train_apply_fn=train_apply_fn(model),   # (params, batch_stats, x[B, ...]) -> ([B, 1], stats)
        eval_apply_fn=eval_apply_fn(model),     # BatchNorm models: inference with the state's stats
    )                                           # or Trainee(params, apply_fn=linearize(...)): below
    data = TrainData(x[:n], y[:n], x[n:], y[n:])  # x [N, H, W, C], y [N] in {0, 1}
    result = fit(trainee, data, TrainConfig(epochs=2), seed=0, run_dir=Path("run"))
    result.final["test/acc"], result.history[-1]["train/loss"], result.measurements

**What drives training.** Exactly one of two functions is given (fields of :class:`Trainee`):

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

**Measurements.** ``measures`` (name -> ``measure(state)``, e.g. the kernel alignment) are taken
every ``measure_every`` epochs and after the last; their JSON-able values are kept in
``FitResult.measurements`` and travel with the checkpoints.

**Checkpoints and resume.** With ``checkpoint_dir``, the state (params, batch_stats, optimizer
state, step), the epoch, the metric history and the measurements are checkpointed every ``checkpoint_every`` epochs
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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntklab import artifacts
from ntklab.progress import progress_bar
from ntklab.train_checkpoint import CheckpointStore, tree_digest
from ntklab.train_inputs import check_data, epoch_order
from ntklab.train_placement import Placement, SetEvaluator
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
    "Measure",
    "TrainApplyFn",
    "TrainConfig",
    "TrainData",
    "TrainState",
    "Trainee",
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
      measurements: ``{"epoch": e, <measure name>: values}`` per measured epoch, in order.
    """

    params: PyTree
    batch_stats: PyTree
    history: list[dict]
    final: dict
    state: TrainState
    measurements: list[dict] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trainee:
    """What is trained: one of two model functions (see the module docstring) and the start.

    Attributes:
      params: starting parameters (copied: the caller's arrays are never donated).
      batch_stats: starting BatchNorm running averages; ``{}`` without BatchNorm.
      apply_fn: stateless model ``(params, x[B, ...]) -> [B, 1]`` (e.g. a linearization).
      train_apply_fn: network in BatchNorm training mode
        ``(params, batch_stats, x[B, ...]) -> ([B, 1], new_batch_stats)``.
      eval_apply_fn: inference-mode network ``(params, batch_stats, x) -> [B, 1]``, needed with
        ``train_apply_fn`` when the model has BatchNorm.
    """

    params: PyTree
    batch_stats: PyTree = dataclasses.field(default_factory=dict)
    apply_fn: ApplyFn | None = None
    train_apply_fn: TrainApplyFn | None = None
    eval_apply_fn: EvalApplyFn | None = None


class TrainData(NamedTuple):
    """Train and test sets: inputs [N, ...] (finite) and labels [N] in {0, 1}."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


Measure = Callable[[TrainState], Mapping[str, Any]]
"""``measure(state) -> {name: JSON-able value}`` (floats, lists), taken along training."""


def fit(
    trainee: Trainee,
    data: TrainData,
    config: TrainConfig,
    *,
    seed: int,
    run_dir: Path | None = None,
    checkpoint_dir: Path | None = None,
    evaluators: Mapping[str, Evaluator] | None = None,
    measures: Mapping[str, Measure] | None = None,
    measure_every: int | None = None,
    progress: bool = True,
    desc: str = "train",
    devices: Sequence[jax.Device] | None = None,
) -> FitResult:
    """Trains a network or a stateless model (e.g. a linearization) on binary labels.

    Args:
      trainee: the model functions and the starting parameters and statistics.
      data: train and test sets.
      config: hyperparameters (``config.checkpoint_every`` sets the checkpoint interval).
      seed: seeds the per-epoch shuffles (``fold_in(PRNGKey(seed), epoch)``).
      run_dir: folder for ``metrics.jsonl`` (rewritten after every epoch) and the final
        ``params.msgpack`` (``{"params", "batch_stats"}``); None writes nothing.
      checkpoint_dir: folder for checkpoints; a fit with the same arguments resumes from the
        newest sound one there. None: no checkpoints.
      evaluators: ``name -> evaluator(state) -> {"split/metric": float}``, run at the end (and
        every ``config.evaluate_every`` epochs); their metrics join ``final`` / the history.
      measures: ``name -> measure(state) -> JSON-able values``, taken every ``measure_every``
        epochs and after the last; kept in ``FitResult.measurements`` and in the checkpoints, so
        a resumed run has the same measurements as an uninterrupted one.
      measure_every: epochs between measurements (None: after the last epoch only).
      progress: show a progress bar over epochs.
      desc: progress-bar label.
      devices: devices to shard each batch over (None: ``jax.local_devices()``).

    Returns:
      The trained parameters, statistics, per-epoch history, measurements and final metrics.

    Raises:
      ValueError: not exactly one model function, inconsistent shapes, non-finite inputs, labels
        not in {0, 1}, a BatchNorm network without ``eval_apply_fn``, or outputs that are not one
        logit.
      FileExistsError: ``checkpoint_dir`` holds a checkpoint of another training run.
      FloatingPointError: the training loss or a parameter became non-finite (the message names
        the step and the epoch).
    """
    loop = _Loop(trainee, data, config, seed=seed, devices=devices)
    session = loop.start(checkpoint_dir, run_dir, desc)
    plan = _Schedule(config, measure_every)
    bar = progress_bar(
        total=config.epochs - session.epoch, desc=desc, unit="epoch", enabled=progress
    )
    tic = time.perf_counter()
    try:
        for epoch in range(session.epoch + 1, config.epochs + 1):
            record = loop.epoch(session, epoch)
            if plan.evaluates(epoch):
                record.update(_run_evaluators(dict(evaluators or {}), session.state))
            session.history.append(record)
            if measures and plan.measures(epoch):
                session.measurements.append(_measure(measures, session.state, epoch))
            loop.after_epoch(session, epoch, elapsed=time.perf_counter() - tic)
            bar.update(
                1,
                loss=f"{record['train/loss']:.3g}",
                train_acc=f"{record['train/acc']:.3f}",
                test_acc=f"{record['test/acc']:.3f}",
            )
    except KeyboardInterrupt:
        loop.log_interruption(session, desc)
        raise
    finally:
        bar.close()
    final = dict(session.history[-1])
    if not plan.evaluates(config.epochs):
        final.update(_run_evaluators(dict(evaluators or {}), session.state))
    return loop.finish(session, final, elapsed=time.perf_counter() - tic, desc=desc)


class _Schedule:
    """Which epochs evaluate (``config.evaluate_every``) and measure (``measure_every``)."""

    def __init__(self, config: TrainConfig, measure_every: int | None) -> None:
        self.config = config
        if measure_every is not None and (
            isinstance(measure_every, bool)
            or not isinstance(measure_every, int)
            or measure_every < 1
        ):
            raise ValueError(
                f"measure_every must be None or an integer >= 1, got {measure_every!r}"
            )
        self.measure_every = measure_every

    def evaluates(self, epoch: int) -> bool:
        every = self.config.evaluate_every
        return bool(every) and epoch % every == 0

    def measures(self, epoch: int) -> bool:
        every = self.measure_every
        return epoch == self.config.epochs or (every is not None and epoch % every == 0)


@dataclasses.dataclass
class _Session:
    """The state of one fit: where it stands, what it recorded, where it checkpoints."""

    state: TrainState
    start_params: PyTree
    history: list[dict]
    measurements: list[dict]
    epoch: int
    elapsed_before: float
    store: CheckpointStore | None
    run_dir: Path | None
    saved_epoch: int | None
    checkpoint_dir: Path | None


class _Loop:
    """The compiled steps, placement and evaluators of one fit, and its three phases: start
    (fresh or resumed), one epoch, finish."""

    def __init__(
        self,
        trainee: Trainee,
        data: TrainData,
        config: TrainConfig,
        *,
        seed: int,
        devices: Sequence[jax.Device] | None,
    ) -> None:
        batch_stats = {} if trainee.batch_stats is None else trainee.batch_stats
        self.trainee = dataclasses.replace(trainee, batch_stats=batch_stats)
        self.train, self.infer = model_fns(
            trainee.apply_fn, trainee.train_apply_fn, trainee.eval_apply_fn, batch_stats
        )
        self.data = TrainData(*check_data(*data))
        self.config, self.seed = config, seed
        self.placement = Placement(
            devices,
            batch_norm=trainee.train_apply_fn is not None and bool(jax.tree.leaves(batch_stats)),
        )
        self.num_train = len(self.data.x_train)
        self.steps_per_epoch = math.ceil(self.num_train / config.batch_size)
        self.compiled = compiled_steps(
            config, config.epochs * self.steps_per_epoch, self.placement.mesh
        )
        self.train_step = functools.partial(self.compiled.train_step, self.train)
        eval_step = functools.partial(self.compiled.eval_step, self.infer)
        eval_batch = self.placement.eval_batch_size(
            min(config.eval_batch_size, max(self.num_train, len(self.data.x_test)))
        )
        x_train, y_train, x_test, y_test = self.data
        self.evaluate_train = SetEvaluator(eval_step, x_train, y_train, eval_batch, self.placement)
        self.evaluate_test = SetEvaluator(eval_step, x_test, y_test, eval_batch, self.placement)
        self.key = jax.random.PRNGKey(seed)

    def start(self, checkpoint_dir: Path | None, run_dir: Path | None, desc: str) -> _Session:
        """A fresh session, or the newest sound checkpoint's."""
        state, start_params = self.compiled.initial_state(
            self.trainee.params, self.trainee.batch_stats
        )
        if run_dir is not None:
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
        store = restored = None
        if checkpoint_dir is not None:
            identity = _identity(
                self.config, self.seed, self.train, self.infer, self.trainee.params,
                self.trainee.batch_stats, tuple(self.data),
            )  # fmt: skip
            store = CheckpointStore(checkpoint_dir, identity)
            restored = store.restore(state)
        session = _Session(
            state=state, start_params=start_params, history=[], measurements=[], epoch=0,
            elapsed_before=0.0, store=store, run_dir=run_dir, saved_epoch=None,
            checkpoint_dir=checkpoint_dir,
        )  # fmt: skip
        if restored is None:
            session.history = [self._record(0, 0, None, None, state, 0.0)]
            return session
        session.state = self.placement.state(restored.state)
        session.history, session.measurements = restored.history, restored.measurements
        session.epoch = session.saved_epoch = restored.epoch
        session.elapsed_before = restored.elapsed_s
        logger.info(
            "%s: resumed from epoch %d of %d (%s)",
            desc, restored.epoch, self.config.epochs, restored.path,
        )  # fmt: skip
        return session

    def epoch(self, session: _Session, epoch: int) -> dict[str, Any]:
        """Trains one epoch (the steps' finiteness checked once at its end) and evaluates."""
        tic = time.perf_counter()
        order = epoch_order(self.key, epoch, self.num_train)
        batch_size = self.config.batch_size
        batch_losses, finite = [], []
        for start in range(0, self.num_train, batch_size):
            index = order[start : start + batch_size]
            batch = self.placement.train_batch(self.data.x_train[index], self.data.y_train[index])
            session.state, metrics = self.train_step(session.state, batch)
            batch_losses.append(metrics["train/batch_loss"])
            finite.append(metrics["train/finite"])
            lr = metrics["train/lr"]
        losses, finite = jax.device_get((batch_losses, finite))
        if not all(finite):
            self._non_finite(epoch, losses, finite, session.saved_epoch)
        sizes = np.diff([*range(0, self.num_train, batch_size), self.num_train])
        batch_loss = float(np.dot(losses, sizes)) / self.num_train
        return self._record(
            epoch, epoch * self.steps_per_epoch, float(lr), batch_loss, session.state,
            time.perf_counter() - tic,
        )  # fmt: skip

    def _non_finite(self, epoch: int, losses, finite, saved_epoch: int | None) -> None:
        first = (epoch - 1) * self.steps_per_epoch + 1
        bad = int(np.argmin(finite))
        raise FloatingPointError(
            f"non-finite training loss or parameters in epoch {epoch}: first after step "
            f"{first + bad} (the epoch's steps are {first}-{epoch * self.steps_per_epoch}), batch "
            f"loss {float(losses[bad])}; lower train.max_lr={self.config.max_lr} or check the "
            "model" + (f"; the checkpoint of epoch {saved_epoch} is intact" if saved_epoch else "")
        )

    def after_epoch(self, session: _Session, epoch: int, *, elapsed: float) -> None:
        """Writes the history and, when due, a checkpoint."""
        if session.run_dir is not None:
            _write_history(session.run_dir / METRICS_LOG, session.history)
        every = self.config.checkpoint_interval()
        if session.store is not None and (epoch % every == 0 or epoch == self.config.epochs):
            session.store.save(
                epoch, session.state, session.history,
                elapsed_s=session.elapsed_before + elapsed, measurements=session.measurements,
            )  # fmt: skip
            session.saved_epoch = epoch
        session.epoch = epoch
        logger.info("epoch %d/%d: %s", epoch, self.config.epochs, _short(session.history[-1]))

    def log_interruption(self, session: _Session, desc: str) -> None:
        epochs = self.config.epochs
        if session.store is None:
            logger.warning("%s interrupted in epoch %d/%d", desc, session.epoch + 1, epochs)
            return
        every = self.config.checkpoint_interval()
        logger.warning(
            "%s interrupted in epoch %d/%d; %s: rerunning the same command resumes",
            desc, session.epoch + 1, epochs,
            f"the checkpoint of epoch {session.saved_epoch} is in {session.checkpoint_dir}"
            if session.saved_epoch else f"no checkpoint written yet (every {every} epochs)",
        )  # fmt: skip

    def finish(self, session: _Session, final: dict, *, elapsed: float, desc: str) -> FitResult:
        """The final metrics and files (``metrics.jsonl``, ``params.msgpack``)."""
        state = session.state
        final["param_distance_sq"] = _distance_sq(state.params, session.start_params)
        final["wall_time_s"] = session.elapsed_before + elapsed
        if session.run_dir is not None:
            _write_history(session.run_dir / METRICS_LOG, session.history)
            artifacts.save_params(
                session.run_dir / PARAMS_FILE,
                {"params": state.params, "batch_stats": state.batch_stats},
            )
        logger.info("%s done: %s", desc, _short(final))
        return FitResult(
            params=state.params,
            batch_stats=state.batch_stats,
            history=session.history,
            final=final,
            state=state,
            measurements=session.measurements,
        )

    def _record(self, epoch, step, lr, batch_loss, state, seconds) -> dict[str, Any]:
        return _record(
            epoch, step, lr, batch_loss, state, self.evaluate_train, self.evaluate_test, seconds
        )


def _measure(measures: Mapping[str, Measure], state: TrainState, epoch: int) -> dict[str, Any]:
    """One measurement of every ``measures`` entry, as JSON-able values (checked here)."""
    taken: dict[str, Any] = {"epoch": epoch}
    for name, measure in measures.items():
        tic = time.perf_counter()
        taken[name] = json.loads(json.dumps(dict(measure(state)), default=_json_value))
        logger.info("measure %s at epoch %d in %.2f s", name, epoch, time.perf_counter() - tic)
    return taken


def _json_value(value: Any) -> Any:
    if isinstance(value, np.ndarray | jax.Array | np.generic):
        return np.asarray(value).tolist()
    raise TypeError(f"a measurement value must be JSON-able or an array, got {type(value)}")


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


def _record(
    epoch: int,
    step: int,
    lr: float | None,
    batch_loss: float | None,
    state: TrainState,
    evaluate_train: SetEvaluator,
    evaluate_test: SetEvaluator,
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
