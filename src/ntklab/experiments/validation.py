"""What types cannot say: ranges, choices, keys added with ``+``, the model and train nodes.

    validate(cfg)        # raises ConfigError naming the key, the value and what is allowed

One table (``RULES``) holds every range and choice of every script's config, by key; the
``train:`` node is checked by :class:`ntklab.train.TrainConfig` itself (its own rules), the
``model:`` node against the fields of its Flax module (:func:`check_model`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException
from omegaconf.nodes import BooleanNode

from ntklab.errors import ConfigError
from ntklab.experiments.schema import model_schema
from ntklab.train_steps import TrainConfig

__all__ = [
    "RULES",
    "ConfigError",
    "check_command_line",
    "check_model",
    "to_plain",
    "train_config",
    "validate",
]


def check_model(node: DictConfig | dict) -> None:
    """Checks a ``model:`` config against its module: keys, types, then the constructor's checks.

    Raises:
      ConfigError: an unknown model or ``_target_``, an unknown key (listing the valid ones), a
        value of the wrong type, or one the module refuses (e.g. ``model.widths=[0]``).
    """
    from ntklab.models import TARGET_KEY, build_model, model_class

    config = to_plain(node)
    if not isinstance(config.get("name"), str):
        raise ConfigError(
            "model.name is missing: every model config names its run folders (name: <name>)"
        )
    if TARGET_KEY not in config:
        allowed = _one_of(_model_names)(config["name"])
        if allowed is not None:
            raise ConfigError(f"model.name={_show(config['name'])} is invalid: must be {allowed}")
    try:
        cls = model_class(config["name"], config.get(TARGET_KEY))
    except ValueError as error:
        raise ConfigError(f"model={config['name']}: {error}") from None
    if TARGET_KEY not in config and "activation" in config:  # the zoo's activations
        allowed = _one_of(_activation_names)(config["activation"])
        if allowed is not None:
            raise ConfigError(
                f"model.activation={_show(config['activation'])} is invalid: must be {allowed}"
            )
    schema = model_schema(cls)
    try:
        OmegaConf.merge(OmegaConf.structured(schema), config)
    except ConfigKeyError as error:
        fields = [f.name for f in dataclasses.fields(schema) if f.name != TARGET_KEY]
        raise ConfigError(
            f"unknown key model.{error.key}; valid keys of model: {', '.join(fields)}"
        ) from None
    except OmegaConfBaseException as error:
        first = str(error).strip().splitlines()[0]
        raise ConfigError(f"model.{error.full_key}: {first}") from None
    try:
        build_model(**config)
    except ValueError as error:
        raise ConfigError(f"model: {error}") from None


def to_plain(node: Any) -> Any:
    """A resolved plain Python copy of a config node (dicts and lists)."""
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


Check = Callable[[Any], str | None]
"""``check(value) -> None`` if valid, else what is allowed (``"an integer >= 1"``)."""


def _at_least(
    minimum: float, *, optional: bool = False, integer: bool = True, strict: bool = False
) -> Check:
    """``value >= minimum`` (``>`` with ``strict``), an integer unless ``integer=False``."""
    kind = "an integer" if integer else "a finite number"
    relation = ">" if strict else ">="

    def check(value: Any) -> str | None:
        if optional and value is None:
            return None
        number_ok = isinstance(value, int) if integer else isinstance(value, int | float)
        below = (
            number_ok and math.isfinite(value) and (value <= minimum if strict else value < minimum)
        )
        if isinstance(value, bool) or not number_ok or not math.isfinite(value) or below:
            return f"{'null or ' if optional else ''}{kind} {relation} {minimum:g}"
        return None

    return check


def _one_of(choices: Callable[[], Sequence[Any]], *, optional: bool = False) -> Check:
    def check(value: Any) -> str | None:
        valid = list(choices())
        if (optional and value is None) or any(
            type(value) is type(choice) and value == choice for choice in valid
        ):
            return None
        allowed = ", ".join(
            "true" if c is True else "false" if c is False else str(c) for c in valid
        )
        return f"one of: {'null, ' if optional else ''}{allowed}"

    return check


def _image_shape(value: Any) -> str | None:
    if isinstance(value, list | ListConfig | tuple) and len(value) == 3:
        if all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
            return None
    return "a list [H, W, C] of three integers >= 1"


def _host_port(value: Any) -> str | None:
    if value is None:
        return None
    host, _, port = str(value).rpartition(":") if isinstance(value, str) else ("", "", "")
    if host and port.isdigit() and 1 <= int(port) <= 65535:
        return None
    return "null or 'host:port' of process 0 (e.g. 127.0.0.1:12355)"


def _solvers() -> Sequence[str]:
    from ntklab.eigen import SOLVERS

    return SOLVERS


def _ntk_choices(name: str) -> Callable[[], Sequence[str]]:
    def choices() -> Sequence[str]:
        import ntklab.ntk

        return getattr(ntklab.ntk, name)

    return choices


def _model_names() -> Sequence[str]:
    from ntklab.models import model_names

    return model_names()


def _activation_names() -> Sequence[str]:
    from ntklab.models.activations import activation_names

    return activation_names()


def _dataset_names() -> Sequence[str]:
    from ntklab.data import dataset_names

    return dataset_names()


RULES: dict[str, Check] = {
    "seed": _at_least(0),
    "order_seed": _at_least(0, optional=True),
    "label_idx": _at_least(0),
    "prerequisites": _one_of(lambda: ("require", "create")),
    "data.dataset": _one_of(_dataset_names),
    "data.num_train": _at_least(1, optional=True),
    "data.num_test": _at_least(1, optional=True),
    "data.epsilon": _at_least(0, integer=False, strict=True),
    "data.sigma": _at_least(0, integer=False),
    "bn_statistics": _one_of(lambda: ("initial", "trained")),
    "ntk.batch_size": _at_least(1),
    "ntk.num_eigvecs": _at_least(1),
    "ntk.solver": _one_of(_solvers),
    "ntk.nystrom_dims": _at_least(1, optional=True),
    "ntk.eigen_dtype": _one_of(lambda: ("auto", "float32", "float64")),
    "ntk.output": _one_of(_ntk_choices("OUTPUTS")),
    "ntk.implementation": _one_of(_ntk_choices("IMPLEMENTATIONS")),
    "ntk.precision": _one_of(_ntk_choices("PRECISIONS")),
    "ntk.storage_dtype": _one_of(_ntk_choices("STORAGE_DTYPES"), optional=True),
    "ntk.out_of_core": _one_of(lambda: (True, False, "auto")),
    "ntk.memory_bytes": _at_least(1, optional=True),
    "ntk.param_chunk_size": _at_least(1, optional=True),
    "ntk.projection_dim": _at_least(1, optional=True),
    "ntk.projection": _one_of(_ntk_choices("PROJECTIONS")),
    "distributed.coordinator_address": _host_port,
    "distributed.num_processes": _at_least(1, optional=True),
    "distributed.process_id": _at_least(0, optional=True),
    "distributed.timeout_s": _at_least(1),
    "alignment.every": _at_least(1, optional=True),
    "alignment.num_eigvecs": _at_least(1, optional=True),
    "alignment.batch_size": _at_least(1),
    "nads.shape": _image_shape,
    "nads.input_std": _at_least(0, integer=False),
    "nads.dtype": _one_of(lambda: ("float32", "float64")),
    "nads.batch_size": _at_least(1),
    "nads.num_plot": _at_least(0),
}
"""Every range and choice check of every script's config, by key (checked where the key exists)."""


def validate(cfg: DictConfig) -> None:
    """Checks a composed config: no unknown keys, every value in range and a valid choice.

    Args:
      cfg: a config composed from one of the primary YAMLs (``@hydra.main`` or ``hydra.compose``).

    Raises:
      ConfigError: the first problem, naming the key, the value and what is allowed.
    """
    _check_known_keys(cfg, "")
    for key, check in RULES.items():
        if OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False) is _ABSENT:
            continue
        value = OmegaConf.select(cfg, key)
        if isinstance(value, ListConfig):
            value = OmegaConf.to_container(value)
        allowed = check(value)
        if allowed is not None:
            raise ConfigError(f"{key}={_show(value)} is invalid: must be {allowed}")
    if "model" in cfg:
        check_model(cfg.model)
    if "train" in cfg:
        train_config(cfg)


def train_config(cfg: DictConfig) -> TrainConfig:
    """The ``train:`` node as the trainer's :class:`~ntklab.train.TrainConfig` (its checks run).

    Raises:
      ConfigError: a ``train.*`` value out of range or not a valid choice.
    """
    return TrainConfig.from_mapping(to_plain(cfg.train))


_ABSENT = object()


def _check_known_keys(node: DictConfig, prefix: str) -> None:
    """Refuses keys that are not fields of their node's schema (Hydra accepts them with ``+``)."""
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        fields = [f.name for f in dataclasses.fields(schema)]
        for key in node:
            if key not in fields and not (prefix == "" and key == "hydra"):
                group = prefix[:-1] or "the top level"
                raise ConfigError(
                    f"unknown key {prefix}{key}; valid keys of {group}: {', '.join(fields)}"
                )
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not (prefix == "" and key == "hydra"):
            _check_known_keys(child, f"{prefix}{key}.")


def check_command_line(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Refuses command-line booleans other than ``true``/``false`` (OmegaConf reads ``no`` as false).

    Args:
      cfg: the config composed from ``overrides``.
      overrides: Hydra's task overrides (``HydraConfig.get().overrides.task``).

    Raises:
      ConfigError: e.g. ``with_bias=no``.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if override.is_delete() or override.package or "/" in key or key.startswith("hydra."):
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig) or leaf not in node:
            continue
        values = (
            list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        )
        for value in values:  # each value of a sweep (linearize=true,false)
            if isinstance(node._get_node(leaf), BooleanNode) and not isinstance(value, bool):
                raise ConfigError(f"{key}={_show(value)} is invalid: must be true or false")


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    return str(value)
