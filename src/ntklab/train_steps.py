"""Jitted steps of the shared trainer: options, train state, model adapter, losses, compile cache.

Dimensions: B examples per batch, K = 1 output (one logit), P parameters.

    step = train_step_fn(train_apply_fn=train_apply_fn(model), config=TrainConfig(), total_steps=100)
    state = init_train_state(params, batch_stats, config=TrainConfig(), total_steps=100)
    state, metrics = step(state, {"x": x, "y": y})      # x [B, H, W, C], y [B] in {0, 1}

``ntklab.train`` documents the options and re-exports the public names; ``fit`` there is the only
loop. Here live the pieces it compiles: the two kinds of model behind one adapter of
``(params, batch_stats, x)`` (a pytree handed to the jitted steps as an argument, so arrays it holds
stay buffers), the losses, the pure ``(state, batch) -> (state, metrics)`` train step with the state
donated, the masked evaluation step, and a cache that reuses compiled steps across fits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.tree_util import Partial

from ntklab.errors import ConfigError
from ntklab.types import ApplyFn, PyTree

__all__ = [
    "LOSSES",
    "LR_NORMALIZATIONS",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "CompiledSteps",
    "EvalApplyFn",
    "TrainApplyFn",
    "TrainConfig",
    "TrainState",
    "build_optimizer",
    "compiled_steps",
    "eval_apply_fn",
    "init_train_state",
    "learning_rate_fn",
    "model_fns",
    "train_step_fn",
]

TrainApplyFn = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, PyTree]]
"""``train_apply_fn(params, batch_stats, x[B, ...]) -> (outputs [B, 1], new_batch_stats)``."""

EvalApplyFn = Callable[[PyTree, PyTree, jax.Array], jax.Array]
"""``eval_apply_fn(params, batch_stats, x[B, ...]) -> outputs [B, 1]``, inference mode."""
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("linear", "fixed", "cyclic")
LOSSES = ("bce", "mse")
LR_NORMALIZATIONS = ("none", "ntk")


@dataclasses.dataclass(unsafe_hash=True)  # hashable (a compile-cache key); treat as immutable
class TrainConfig:
    """Training hyperparameters: the ``train:`` config node of every training script and what
    :func:`ntklab.train.fit` takes (one definition, registered as the Hydra schema node; its
    checks are the only range rules of ``train.*``).

    Attributes:
      epochs: passes over the train set, >= 1.
      batch_size: examples per step; a value >= N_train is full-batch gradient descent.
      optimizer: one of ``OPTIMIZERS``.
      max_lr: peak learning rate of the schedule, > 0.
      momentum: SGD heavy-ball momentum in [0, 1) (ignored by Adam).
      lr_schedule: one of ``LR_SCHEDULES``.
      weight_decay: coupled L2 coefficient added to the gradient, >= 0.
      loss: one of ``LOSSES``.
      eval_batch_size: examples per evaluation batch (padded and masked, every sample counted).
      evaluate_every: also run the ``evaluators`` every this many epochs (0: only at the end).
      checkpoint_every: with a checkpoint folder, save a checkpoint every this many epochs and
        after the last; None: about every 10% of the run (``max(1, round(epochs / 10))``).
        Does not change results.
      lr_normalization: one of ``LR_NORMALIZATIONS``. The trainer itself uses ``max_lr`` as given:
        the experiment scripts compute the normalized rate (:mod:`ntklab.lr_normalization`) and
        pass it as ``max_lr``, keeping this field as the record of how it was chosen.

    Raises:
      ConfigError: (a ``ValueError``) a value out of range or not a valid choice, naming the
        ``train.<key>``, the value and what is allowed.
    """

    epochs: int = 100
    batch_size: int = 128
    optimizer: str = "sgd"
    max_lr: float = 0.05
    momentum: float = 0.9
    lr_schedule: str = "linear"
    weight_decay: float = 0.0
    loss: str = "bce"
    eval_batch_size: int = 1024
    evaluate_every: int = 0
    checkpoint_every: Optional[int] = None  # noqa: UP045 (OmegaConf 2.3 reads Optional, not |)
    lr_normalization: str = "none"

    def __post_init__(self) -> None:
        for name, choices in (
            ("optimizer", OPTIMIZERS),
            ("lr_schedule", LR_SCHEDULES),
            ("loss", LOSSES),
            ("lr_normalization", LR_NORMALIZATIONS),
        ):
            if getattr(self, name) not in choices:
                _refuse(name, getattr(self, name), "one of: " + ", ".join(choices))
        for name, minimum in (
            ("epochs", 1),
            ("batch_size", 1),
            ("eval_batch_size", 1),
            ("evaluate_every", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                _refuse(name, value, f"an integer >= {minimum}")
        every = self.checkpoint_every
        if every is not None and (
            isinstance(every, bool) or not isinstance(every, int) or every < 1
        ):
            _refuse(
                "checkpoint_every", every, "null (about every 10% of the run) or an integer >= 1"
            )
        for name, low, high, allowed in (
            ("max_lr", 0.0, math.inf, "a finite number > 0"),
            ("momentum", 0.0, 1.0, "a number in [0, 1)"),
            ("weight_decay", 0.0, math.inf, "a finite number >= 0"),
        ):
            value = getattr(self, name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            inside = number and math.isfinite(value) and low <= value < high
            if not inside or (name == "max_lr" and value == 0):
                _refuse(name, value, allowed)

    def checkpoint_interval(self) -> int:
        """Epochs between checkpoints: ``checkpoint_every``, or about 10% of ``epochs``."""
        if self.checkpoint_every is not None:
            return self.checkpoint_every
        return max(1, round(self.epochs / 10))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> TrainConfig:
        """Builds a config from a mapping such as ``cfg.train``.

        Raises:
          ConfigError: a key is not a field (the message lists the fields), or a value is invalid.
        """
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(mapping) - set(fields))
        if unknown:
            raise ConfigError(
                f"unknown key train.{unknown[0]}; valid keys of train: {', '.join(fields)}"
            )
        return cls(**dict(mapping))


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and writes.

    Attributes:
      step: number of steps taken, int32 scalar.
      params: trainable parameters θ.
      batch_stats: BatchNorm running averages (empty dict without BatchNorm).
      opt_state: the optimizer's state.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState


def _refuse(name: str, value: Any, allowed: str) -> None:
    shown = "null" if value is None else repr(value) if isinstance(value, str) else value
    raise ConfigError(f"train.{name}={shown} is invalid: must be {allowed}")


def learning_rate_fn(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule ``step -> lr`` over ``total_steps`` (see the module docstring)."""
    total_steps = max(total_steps, 1)
    if config.lr_schedule == "linear":
        return optax.linear_schedule(config.max_lr, 0.0, total_steps)
    if config.lr_schedule == "fixed":
        return optax.constant_schedule(config.max_lr)
    if config.lr_schedule == "cyclic":
        return optax.cosine_onecycle_schedule(total_steps, config.max_lr)
    raise ValueError(
        f"unknown train.lr_schedule {config.lr_schedule!r}; valid choices: "
        f"{', '.join(LR_SCHEDULES)}"
    )


def build_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """The optimizer of ``config`` with its learning-rate schedule over ``total_steps``."""
    schedule = learning_rate_fn(config, total_steps)
    if config.optimizer == "sgd":
        optimizer = optax.sgd(schedule, momentum=config.momentum or None)
    elif config.optimizer == "adam":
        optimizer = optax.adam(schedule)
    else:
        raise ValueError(
            f"unknown train.optimizer {config.optimizer!r}; valid choices: {', '.join(OPTIMIZERS)}"
        )
    if config.weight_decay:
        optimizer = optax.chain(optax.add_decayed_weights(config.weight_decay), optimizer)
    return optimizer


def eval_apply_fn(model: flax.linen.Module) -> EvalApplyFn:
    """``eval_apply_fn(params, batch_stats, x[B, H, W, C]) -> [B, K]`` in inference mode.

    Unlike ``ntklab.models.inference_apply_fn`` the running averages are an argument, so the
    trainer evaluates with the statistics of its current state.
    """

    def apply_fn(params: PyTree, batch_stats: PyTree, x: jax.Array) -> jax.Array:
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        return model.apply(variables, x, train=False)

    return apply_fn


# ------------------------------------------------------------------------------------------------
# The model adapter: both kinds of model as (train, infer) functions of (params, batch_stats, x)
# ------------------------------------------------------------------------------------------------


def _as_partial(function: Callable) -> Partial:
    return function if isinstance(function, Partial) else Partial(function)


def _stateless_train(apply_fn, params, batch_stats, x):
    return apply_fn(params, x), batch_stats


def _stateless_infer(apply_fn, params, batch_stats, x):
    del batch_stats
    return apply_fn(params, x)


def _stateful_infer_without_stats(train_apply_fn, params, batch_stats, x):
    return train_apply_fn(params, batch_stats, x)[0]


def model_fns(
    apply_fn: ApplyFn | None,
    train_apply_fn: TrainApplyFn | None,
    eval_apply: EvalApplyFn | None,
    batch_stats: PyTree,
) -> tuple[Partial, Partial]:
    """The adapter: either kind of model as ``(train, infer)`` functions of ``(params, batch_stats, x)``.

    Args:
      apply_fn: a stateless model ``(params, x[B, ...]) -> [B, 1]``; trains and evaluates, and
        ``batch_stats`` pass through unchanged.
      train_apply_fn: a network in BatchNorm training mode
        ``(params, batch_stats, x) -> ([B, 1], new_batch_stats)``; exactly one of the two.
      eval_apply: with ``train_apply_fn``, its inference mode ``(params, batch_stats, x) -> [B, 1]``;
        may be None when ``batch_stats`` is empty (no BatchNorm: both modes coincide).
      batch_stats: the starting statistics (only their presence is used).

    Returns:
      ``train(params, batch_stats, x) -> ([B, 1], batch_stats)`` and
      ``infer(params, batch_stats, x) -> [B, 1]``, both ``jax.tree_util.Partial`` pytrees.

    Raises:
      ValueError: not exactly one model function, or a BatchNorm network without ``eval_apply``.
    """
    if (apply_fn is None) == (train_apply_fn is None):
        raise ValueError(
            "give exactly one of apply_fn (a stateless model, e.g. a linearization) and "
            f"train_apply_fn (a network with BatchNorm in training mode); got apply_fn={apply_fn!r}"
            f", train_apply_fn={train_apply_fn!r}"
        )
    if apply_fn is not None:
        if eval_apply is not None:
            raise ValueError("eval_apply_fn is only used with train_apply_fn; apply_fn evaluates")
        apply_fn = _as_partial(apply_fn)
        return Partial(_stateless_train, apply_fn), Partial(_stateless_infer, apply_fn)
    train = _as_partial(train_apply_fn)
    if eval_apply is not None:
        return train, _as_partial(eval_apply)
    if jax.tree.leaves(batch_stats):
        raise ValueError(
            "a model with BatchNorm statistics needs eval_apply_fn(params, batch_stats, x) for "
            "inference-mode evaluation, e.g. ntklab.train.eval_apply_fn(model)"
        )
    return train, Partial(_stateful_infer_without_stats, train)


# ------------------------------------------------------------------------------------------------
# Losses and jitted steps
# ------------------------------------------------------------------------------------------------


def _bce(outputs: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    return optax.sigmoid_binary_cross_entropy(outputs, labels), (outputs > 0) == (labels > 0.5)


def _mse(outputs: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    return 0.5 * (outputs - labels) ** 2, (outputs > 0.5) == (labels > 0.5)


_LOSSES: dict[str, Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]] = {
    "bce": _bce,
    "mse": _mse,
}


def _single_logit(outputs: jax.Array) -> jax.Array:
    if outputs.ndim != 2 or outputs.shape[1] != 1:
        raise ValueError(
            f"the trainer fits one logit per example: outputs must be [B, 1], got {outputs.shape}"
            " (build the model with num_outputs=1)"
        )
    return outputs[:, 0]


def _all_finite(*trees: PyTree) -> jax.Array:
    """One bool scalar: every floating-point element of ``trees`` is finite."""
    flags = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree.leaves(trees)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def _train_step(train, state, batch, *, optimizer, schedule, loss):
    def objective(params):
        outputs, batch_stats = train(params, state.batch_stats, batch["x"])
        losses, _ = loss(_single_logit(outputs), batch["y"])
        if "mask" in batch:  # padded to a multiple of the device count: padding does not count
            mask = batch["mask"]
            return jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.sum(mask), batch_stats
        return jnp.mean(losses), batch_stats

    (value, batch_stats), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    metrics = {
        "train/batch_loss": value,
        "train/lr": schedule(state.step),
        "train/finite": _all_finite(value, new_state.params, new_state.batch_stats),
    }
    return new_state, metrics


def train_step_fn(
    *,
    apply_fn: ApplyFn | None = None,
    train_apply_fn: TrainApplyFn | None = None,
    config: TrainConfig,
    total_steps: int,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The jitted train step that :func:`fit` runs, ``(state, batch) -> (state, metrics)``.

    The state is donated: its buffers are reused for the new state, so do not read the old one.
    Exposed for benchmarks; start from :func:`init_train_state` with the same arguments.

    Args:
      apply_fn: a stateless model ``(params, x[B, ...]) -> [B, 1]`` (exclusive with the next).
      train_apply_fn: a network ``(params, batch_stats, x) -> ([B, 1], batch_stats)``.
      config: optimizer, schedule and loss.
      total_steps: the schedule's length.

    Returns:
      ``step(state, {"x": [B, ...], "y": [B]}) -> (state, metrics)``: ``train/batch_loss``,
      ``train/lr`` and ``train/finite`` (loss and updated parameters and statistics all finite).
    """
    train, _ = model_fns(apply_fn, train_apply_fn, None, {})
    return functools.partial(compiled_steps(config, total_steps).train_step, train)


def init_train_state(
    params: PyTree, batch_stats: PyTree, *, config: TrainConfig, total_steps: int
) -> TrainState:
    """A fresh train state (copies of ``params`` and ``batch_stats``) for :func:`train_step_fn`."""
    return compiled_steps(config, total_steps).initial_state(params, batch_stats or {})[0]


class CompiledSteps(NamedTuple):
    """The jitted functions of one optimizer configuration; the model is their first argument."""

    train_step: Callable
    eval_step: Callable
    initial_state: Callable


def compiled_steps(
    config: TrainConfig, total_steps: int, mesh: Mesh | None = None
) -> CompiledSteps:
    """The jitted functions for ``config`` (cached; see :func:`_compiled_steps`).

    Args:
      config: optimizer, schedule and loss (the other fields do not change the compiled code).
      total_steps: the schedule's length.
      mesh: a one-axis device mesh (axis ``"batch"``) for data-parallel training: the state and
        every output are replicated over it, batches come sharded along its axis. None: one
        device, placements left to JAX.
    """
    key = dataclasses.replace(
        config,
        epochs=1,
        eval_batch_size=1,
        evaluate_every=0,
        checkpoint_every=None,
        lr_normalization="none",
    )
    return _compiled_steps(key, total_steps, mesh)


@functools.lru_cache(maxsize=16)
def _compiled_steps(config: TrainConfig, total_steps: int, mesh: Mesh | None) -> CompiledSteps:
    """The jitted functions for ``config``, cached across fits.

    Fits with the same options and the same model functions (seeds of a sweep in one process)
    reuse the compiled code; the model is an argument, so no arrays are held here.
    """
    optimizer = build_optimizer(config, total_steps)
    schedule = learning_rate_fn(config, total_steps)
    loss = _LOSSES[config.loss]
    placement = {} if mesh is None else {"out_shardings": NamedSharding(mesh, PartitionSpec())}
    return CompiledSteps(
        train_step=jax.jit(
            functools.partial(_train_step, optimizer=optimizer, schedule=schedule, loss=loss),
            donate_argnums=1,
            **placement,
        ),
        eval_step=jax.jit(functools.partial(_eval_step, loss=loss), **placement),
        initial_state=_initial_state_fn(optimizer, placement),
    )


def _eval_step(infer, params, batch_stats, batch, *, loss):
    losses, correct = loss(_single_logit(infer(params, batch_stats, batch["x"])), batch["y"])
    mask = batch["mask"]
    return {
        "loss": jnp.sum(jnp.where(mask, losses, 0.0)),
        "correct": jnp.sum(jnp.where(mask, correct, False).astype(jnp.int32)),
    }


def _initial_state_fn(
    optimizer: optax.GradientTransformation, placement: dict[str, Any]
) -> Callable[[PyTree, PyTree], tuple[TrainState, PyTree]]:
    """Jitted ``(params, batch_stats) -> (state, start_params)``, fresh copies of the inputs.

    The copies let the state be donated without invalidating the caller's arrays (e.g. the θ0
    that a linearization holds); one compilation instead of one per parameter shape.
    """

    def initial_state(params: PyTree, batch_stats: PyTree) -> tuple[TrainState, PyTree]:
        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=jax.tree.map(jnp.copy, params),
            batch_stats=jax.tree.map(jnp.copy, batch_stats),
            opt_state=optimizer.init(params),
        )
        return state, jax.tree.map(jnp.copy, params)

    return jax.jit(initial_state, **placement)
