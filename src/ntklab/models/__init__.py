"""Model zoo: Flax linen image classifiers found by name, plus apply-function helpers.

Dimensions: B batch, H height, W width, C channels, K outputs, P parameters.

Every model maps NHWC images [B, H, W, C] to outputs [B, K] through
``__call__(x, train=False)`` and has the fields ``num_outputs`` and ``activation``.
BatchNorm statistics live in the ``batch_stats`` collection, apart from ``params``.

Adding a model to the zoo: write one module ``ntklab/models/<name>.py`` holding a
``flax.linen.Module`` whose ``__call__(self, x, train: bool = False)`` takes [B, H, W, C] and
returns [B, K] and whose fields include ``num_outputs: int = 1`` and ``activation: str = "relu"``;
add one entry ``"<name>": <Class>`` to ``_MODELS`` below; and add one
``config/model/<name>.yaml`` whose keys are ``name: <name>`` plus the constructor fields with
their defaults (lists for tuple fields). Nothing else changes.

Bringing your own model without editing the zoo: a config file ``<your folder>/model/<name>.yaml``
with ``_target_: package.module.Class`` (importable), ``name: <name>`` and the constructor fields,
selected with ``model=<name> hydra.searchpath=[file://<your folder>]``.

Example:
    model = build_model("resnet18", num_outputs=10)
    variables = init_variables(model, key, (32, 32, 3))
    apply_fn = inference_apply_fn(model, variables)
    y = apply_fn(variables["params"], x)  # x [B, 32, 32, 3] -> y [B, 10]
    step_fn = train_apply_fn(model)
    y, batch_stats = step_fn(variables["params"], variables["batch_stats"], x)
"""

import dataclasses
import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ntklab.models.activations import get_activation
from ntklab.models.lenet import LeNet
from ntklab.models.mlp import MLP
from ntklab.models.resnet18 import ResNet18
from ntklab.types import ApplyFn, PyTree

__all__ = [
    "TARGET_KEY",
    "build_model",
    "count_params",
    "inference_apply_fn",
    "init_variables",
    "model_class",
    "model_fields",
    "model_names",
    "train_apply_fn",
]

_MODELS: dict[str, type[nn.Module]] = {
    "lenet": LeNet,
    "mlp": MLP,
    "resnet18": ResNet18,
}

_NOT_CONSTRUCTOR_FIELDS = frozenset({"parent", "name"})
TARGET_KEY = "_target_"
"""A model config with this key names its own ``flax.linen.Module`` class (``package.module.Class``)."""


def model_names() -> list[str]:
    """Returns the registered model names, sorted."""
    return sorted(_MODELS)


def model_class(name: str | None = None, target: str | None = None) -> type[nn.Module]:
    """The Flax module class of a registered model or of a ``_target_`` (any importable class).

    Args:
        name: a registered name (``model_names()``), used when ``target`` is None.
        target: ``"package.module.Class"`` of a ``flax.linen.Module`` subclass outside the zoo.

    Raises:
        ValueError: an unknown name, a target that cannot be imported, or a class that is not a
            ``flax.linen.Module``.
    """
    if target is None:
        if name not in _MODELS:
            raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(model_names())}")
        return _MODELS[name]
    module_name, _, class_name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(
            f"model._target_={target!r} cannot be imported ({type(error).__name__}: {error}); "
            "the module must be on the Python path (e.g. PYTHONPATH=<its folder>)"
        ) from error
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"model._target_={target!r} is not a flax.linen.Module subclass")
    return cls


def model_fields(cls: type[nn.Module]) -> dict[str, dataclasses.Field]:
    """Constructor fields of a model class by name, without Flax's ``parent`` and ``name``."""
    return {
        f.name: f
        for f in dataclasses.fields(cls)
        if f.name not in _NOT_CONSTRUCTOR_FIELDS and f.init
    }


def build_model(name: str | None = None, **kwargs: Any) -> nn.Module:
    """Constructs a model from a config: a registered name, or ``_target_``, plus its fields.

    ``build_model(**cfg)`` works with a ``config/model/<name>.yaml`` config: list values
    (including OmegaConf ``ListConfig``) become tuples. A config with ``_target_`` (a
    ``flax.linen.Module`` of the user's, importable) is built the same way; its ``name`` only
    names the run folders.

    Args:
        name: registered model name, one of ``model_names()`` (any name with ``_target_``).
        **kwargs: constructor fields of that model, e.g. ``num_outputs``, ``activation``,
            ``widths`` (mlp), ``stage_sizes`` and ``width`` (resnet18); or ``_target_``.

    Returns:
        The unbound Flax module.

    Raises:
        ValueError: if the name, the target, a keyword or the activation is unknown, or a field
            is out of range (e.g. ``num_outputs`` not a positive integer).
    """
    target = kwargs.pop(TARGET_KEY, None)
    cls = model_class(name, target)
    fields = model_fields(cls)
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        owner = f"model {name!r}" if target is None else target
        raise ValueError(
            f"unknown argument(s) {', '.join(map(repr, unknown))} for {owner}; "
            f"valid fields: {', '.join(fields)}"
        )
    kwargs = {
        key: tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
        for key, value in kwargs.items()
    }
    if "activation" in kwargs:
        get_activation(kwargs["activation"])
    num_outputs = kwargs.get("num_outputs", 1)
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"num_outputs must be a positive integer, got {num_outputs!r}")
    return cls(**kwargs)


def init_variables(model: nn.Module, key: jax.Array, input_shape: Sequence[int]) -> dict:
    """Initializes a model's variables in inference mode on a batch of one zero image.

    Args:
        model: an unbound model from ``build_model``.
        key: PRNG key for the parameter initializers.
        input_shape: shape of one image [H, W, C].

    Returns:
        ``{"params": ..., "batch_stats": ...}``; the ``batch_stats`` key is present only if the
        model has BatchNorm (running mean 0, running variance 1).

    Raises:
        ValueError: if ``input_shape`` is not three positive integers.
    """
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise ValueError(f"input_shape must be [H, W, C] positive integers, got {input_shape}")
    try:
        variables = _compiled_init(model, input_shape)(key)
    except jax.errors.ConcretizationTypeError:  # Python control flow on values: run eagerly
        variables = model.init(key, jnp.zeros((1, *input_shape), jnp.float32), train=False)
    out = {"params": variables["params"]}
    if variables.get("batch_stats"):
        out["batch_stats"] = variables["batch_stats"]
    return out


_COMPILED_INITS: dict[tuple[type, str, tuple[int, ...]], Callable] = {}


def _compiled_init(model: nn.Module, input_shape: tuple[int, ...]) -> Callable:
    """``model.init`` on one zero image as one compiled program, cached per model and shape.

    Run eagerly, ``init`` dispatches (and on first use compiles) every operation on its own:
    seconds for LeNet or ResNet-18, against one compilation here; the values are identical.
    """
    cache_key = (type(model), repr(model), input_shape)
    if cache_key not in _COMPILED_INITS:
        zeros = jnp.zeros((1, *input_shape), jnp.float32)
        _COMPILED_INITS[cache_key] = jax.jit(lambda key: model.init(key, zeros, train=False))
    return _COMPILED_INITS[cache_key]


def inference_apply_fn(model: nn.Module, variables: dict) -> ApplyFn:
    """Returns ``apply_fn(params, x)`` with BatchNorm in inference mode.

    The ``batch_stats`` of ``variables`` (if any) are closed over as constants, so the result
    is a function of ``params`` alone: each output depends only on its own input, and it is
    what the eNTK, the linearization and evaluation differentiate.

    Args:
        model: an unbound model from ``build_model``.
        variables: ``{"params": ..., "batch_stats": ...}`` as from ``init_variables`` or a train
            state; ``params`` is not used (the returned function takes its own).

    Returns:
        ``apply_fn(params, x[B, H, W, C]) -> outputs [B, K]``.
    """
    batch_stats = variables.get("batch_stats")

    def apply_fn(params: PyTree, x: jax.Array) -> jax.Array:
        model_variables = {"params": params}
        if batch_stats:
            model_variables["batch_stats"] = batch_stats
        return model.apply(model_variables, x, train=False)

    return apply_fn


def train_apply_fn(
    model: nn.Module,
) -> Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, PyTree]]:
    """Returns ``apply_fn(params, batch_stats, x)`` with BatchNorm in training mode.

    BatchNorm normalizes with the statistics of the batch ``x`` and returns updated running
    averages. For a model without BatchNorm, pass an empty dict; it is returned unchanged. A
    BatchNorm model given an empty ``batch_stats`` raises Flax's error rather than silently
    re-initializing the statistics.

    Args:
        model: an unbound model from ``build_model``.

    Returns:
        ``apply_fn(params, batch_stats, x[B, H, W, C]) -> (outputs [B, K], new_batch_stats)``.
    """

    def apply_fn(params: PyTree, batch_stats: PyTree, x: jax.Array) -> tuple[jax.Array, PyTree]:
        if not batch_stats:
            return model.apply({"params": params}, x, train=True), batch_stats
        outputs, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return outputs, updates["batch_stats"]

    return apply_fn


def count_params(params: PyTree) -> int:
    """Counts the scalars in a parameter tree.

    Args:
        params: a tree of arrays or ``jax.ShapeDtypeStruct`` (as from ``jax.eval_shape``).

    Returns:
        P, the total number of parameters.
    """
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
