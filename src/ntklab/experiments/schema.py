"""Typed configs: one Hydra structured-config schema per entry script, checked before any disk work.

Each primary YAML (``config/<script>/config.yaml``) starts from its schema (``defaults:
[/<script>_schema, ...]``), and each ``config/model/<name>.yaml`` from its model's schema
(``/schema/model@_here_: <name>``, built from the Flax module's fields, so adding a model needs no
edit here).
Hydra then refuses a wrong type (naming key, value and type) and an unknown key before the run
starts; :func:`validate` adds what types cannot say: keys added with ``+``, ranges
(``train.epochs >= 1``, ``label_idx >= 0``, ...) and choices (``ntk.solver``, ...). The YAML files
keep the defaults; the schemas hold only types (``MISSING`` where the YAML sets the value).

    validate(cfg)        # raises ConfigError naming the key, the value and what is allowed
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.nodes import BooleanNode

__all__ = ["ConfigError", "check_command_line", "validate"]

# Hydra's structured configs read `Optional[X]` (PEP 604 unions are not supported in OmegaConf 2.3).
# ruff: noqa: UP045


class ConfigError(ValueError):
    """A config value that is the wrong type, out of range, not a valid choice, or an unknown key."""


# --- groups ------------------------------------------------------------------------------------


@dataclass
class DataSchema:
    """``config/data/<dataset>.yaml``: the arguments of :func:`ntklab.data.load_dataset`."""

    dataset: str = MISSING
    root: str = MISSING
    download: bool = MISSING
    normalize: bool = MISSING
    num_train: Optional[int] = MISSING
    num_test: Optional[int] = MISSING


@dataclass
class NadDataSchema:
    """``train_nads.py``'s ``data:``: the arguments of :func:`ntklab.nads.nad_dataset`."""

    num_train: int = MISSING
    num_test: int = MISSING
    epsilon: float = MISSING
    sigma: float = MISSING


@dataclass
class TrainSchema:
    """``train:``: the fields of :class:`ntklab.train.TrainConfig`."""

    epochs: int = MISSING
    batch_size: int = MISSING
    optimizer: str = MISSING
    max_lr: float = MISSING
    momentum: float = MISSING
    lr_schedule: str = MISSING
    weight_decay: float = MISSING
    loss: str = MISSING
    eval_batch_size: int = MISSING
    evaluate_every: int = MISSING
    checkpoint_every: Optional[int] = None  # null: about every 10% of the run


@dataclass
class EigenfunctionTrainSchema(TrainSchema):
    """``train:`` of train_ntk.py and pretrained_ntk_comparison.py: also ``lr_normalization``."""

    lr_normalization: str = MISSING  # none | ntk: see ntklab.lr_normalization


@dataclass
class NtkSchema:
    """``compute_ntk.py``'s ``ntk:``."""

    batch_size: int = MISSING
    num_eigvecs: int = MISSING
    save_kernel: bool = MISSING
    solver: str = MISSING
    nystrom_dims: Optional[int] = MISSING
    output: str = MISSING
    implementation: str = MISSING
    precision: str = MISSING
    storage_dtype: Optional[str] = MISSING
    out_of_core: Any = MISSING  # true | false | auto, checked by validate()
    memory_bytes: Optional[int] = MISSING
    param_chunk_size: Optional[int] = MISSING
    projection_dim: Optional[int] = MISSING
    projection: str = MISSING


@dataclass
class DistributedSchema:
    """``compute_ntk.py``'s ``distributed:``: the arguments of :func:`ntklab.distributed.initialize`."""

    coordinator_address: Optional[str] = MISSING
    num_processes: Optional[int] = MISSING
    process_id: Optional[int] = MISSING
    timeout_s: int = MISSING


@dataclass
class AlignmentSchema:
    """``train_ntk.py``'s ``alignment:``."""

    enabled: bool = MISSING
    num_eigvecs: Optional[int] = MISSING  # null: every eigenvector of the compute_ntk run
    batch_size: int = MISSING
    vector_batch_size: int = MISSING


@dataclass
class NadsSchema:
    """``compute_nads.py``'s ``nads:``."""

    shape: list[int] = MISSING
    input_std: float = MISSING
    dtype: str = MISSING
    batch_size: int = MISSING
    num_plot: int = MISSING


@dataclass
class ArtifactPaths:
    artifacts: str = MISSING
    run_dir: str = MISSING


@dataclass
class TrainingPaths(ArtifactPaths):
    summary_dir: str = MISSING


@dataclass
class EigenfunctionTrainingPaths(TrainingPaths):
    eigenfunctions: str = MISSING


@dataclass
class NadTrainingPaths(TrainingPaths):
    nads: str = MISSING


# --- one schema per entry script ---------------------------------------------------------------


@dataclass
class ComputeNtkConfig:
    seed: int = MISSING
    overwrite: bool = MISSING
    model: Any = MISSING  # typed by config/model/<name>.yaml's schema/model/<name>
    data: DataSchema = field(default_factory=DataSchema)
    ntk: NtkSchema = field(default_factory=NtkSchema)
    distributed: DistributedSchema = field(default_factory=DistributedSchema)
    paths: ArtifactPaths = field(default_factory=ArtifactPaths)


@dataclass
class ComputeNadsConfig:
    seed: int = MISSING
    overwrite: bool = MISSING
    model: Any = MISSING
    nads: NadsSchema = field(default_factory=NadsSchema)
    paths: ArtifactPaths = field(default_factory=ArtifactPaths)


@dataclass
class TrainingConfig:
    seed: int = MISSING
    order_seed: int | None = None
    overwrite: bool = MISSING
    progress: bool = MISSING
    model: Any = MISSING
    train: TrainSchema = field(default_factory=TrainSchema)


@dataclass
class TrainNtkConfig(TrainingConfig):
    label_idx: int = MISSING
    prerequisites: str = MISSING  # require | create: a missing compute_ntk.py run
    linearize: bool = MISSING
    with_bias: bool = MISSING
    bn_statistics: str = MISSING  # initial | trained: BatchNorm statistics of the alignment kernel
    train: EigenfunctionTrainSchema = field(default_factory=EigenfunctionTrainSchema)
    data: DataSchema = field(default_factory=DataSchema)
    alignment: AlignmentSchema = field(default_factory=AlignmentSchema)
    paths: EigenfunctionTrainingPaths = field(default_factory=EigenfunctionTrainingPaths)


@dataclass
class PretrainedNtkComparisonConfig(TrainingConfig):
    label_idx: int = MISSING
    prerequisites: str = MISSING  # require | create: a missing compute_ntk.py run
    bn_statistics: str = MISSING  # initial | trained: BatchNorm statistics of run (c)
    train: EigenfunctionTrainSchema = field(default_factory=EigenfunctionTrainSchema)
    data: DataSchema = field(default_factory=DataSchema)
    paths: EigenfunctionTrainingPaths = field(default_factory=EigenfunctionTrainingPaths)


@dataclass
class TrainNadsConfig(TrainingConfig):
    label_idx: int = MISSING
    prerequisites: str = MISSING  # require | create: a missing compute_nads.py run
    linearize: bool = MISSING
    with_bias: bool = MISSING
    data: NadDataSchema = field(default_factory=NadDataSchema)
    paths: NadTrainingPaths = field(default_factory=NadTrainingPaths)


@dataclass
class TrainCifarConfig(TrainingConfig):
    linearize: bool = MISSING
    with_bias: bool = MISSING
    data: DataSchema = field(default_factory=DataSchema)
    paths: TrainingPaths = field(default_factory=TrainingPaths)


SCRIPT_SCHEMAS: dict[str, type] = {
    "compute_ntk": ComputeNtkConfig,
    "compute_nads": ComputeNadsConfig,
    "train_ntk": TrainNtkConfig,
    "train_nads": TrainNadsConfig,
    "train_cifar": TrainCifarConfig,
    "pretrained_ntk_comparison": PretrainedNtkComparisonConfig,
}
"""Entry script -> its schema, stored in the ConfigStore as ``<script>_schema``."""


def model_schema(name: str) -> type:
    """A dataclass schema of a registered model's constructor fields (tuples become lists)."""
    from ntklab.models import build_model

    cls = type(build_model(name))
    hints = typing.get_type_hints(cls)
    fields: list[tuple[str, Any, Any]] = [("name", str, field(default=name))]
    for model_field in dataclasses.fields(cls):
        if model_field.name in ("parent", "name"):
            continue
        kind, default = hints[model_field.name], model_field.default
        if typing.get_origin(kind) is tuple:
            kind = list[typing.get_args(kind)[0]]
            default = field(default_factory=lambda value=default: list(value))
        elif default is dataclasses.MISSING:
            default = field(default=MISSING)
        else:
            default = field(default=default)
        fields.append((model_field.name, kind, default))
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", fields)


def _register() -> None:
    from ntklab.models import model_names

    store = ConfigStore.instance()
    for script, schema in SCRIPT_SCHEMAS.items():
        store.store(name=f"{script}_schema", node=schema)
    for name in model_names():
        store.store(group="schema/model", name=name, node=model_schema(name))
    # ${path_safe:...}: a command's overrides as one folder name (``/`` in values would nest)
    OmegaConf.register_new_resolver("path_safe", _path_safe, replace=True)


def _path_safe(text: str) -> str:
    return str(text).replace("/", "_")


_register()


# --- what types cannot say: ranges, choices, keys added with `+` -------------------------------

Check = Callable[[Any], str | None]
"""``check(value) -> None`` if valid, else what is allowed (``"an integer >= 1"``)."""


def _at_least(minimum: float, *, optional: bool = False, integer: bool = True) -> Check:
    kind = "an integer" if integer else "a finite number"

    def check(value: Any) -> str | None:
        if optional and value is None:
            return None
        number_ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not number_ok or not math.isfinite(value) or value < minimum:
            return f"{'null or ' if optional else ''}{kind} >= {minimum:g}"
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
    from ntklab.experiments.compute_ntk import SOLVERS

    return SOLVERS


def _ntk_choices(name: str) -> Callable[[], Sequence[str]]:
    def choices() -> Sequence[str]:
        import ntklab.ntk

        return getattr(ntklab.ntk, name)

    return choices


def _train_choices(name: str) -> Callable[[], Sequence[str]]:
    def choices() -> Sequence[str]:
        import ntklab.train_steps

        return getattr(ntklab.train_steps, name)

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
    "label_idx": _at_least(0),
    "prerequisites": _one_of(lambda: ("require", "create")),
    "model.name": _one_of(_model_names),
    "model.activation": _one_of(_activation_names),
    "model.num_outputs": _at_least(1),
    "data.dataset": _one_of(_dataset_names),
    "data.num_train": _at_least(1, optional=True),
    "data.num_test": _at_least(0, optional=True),
    "data.epsilon": _at_least(0, integer=False),
    "data.sigma": _at_least(0, integer=False),
    "train.epochs": _at_least(1),
    "train.batch_size": _at_least(1),
    "train.eval_batch_size": _at_least(1),
    "train.evaluate_every": _at_least(0),
    "train.checkpoint_every": _at_least(1, optional=True),
    "train.max_lr": _at_least(0, integer=False),
    "train.momentum": _at_least(0, integer=False),
    "train.weight_decay": _at_least(0, integer=False),
    "train.optimizer": _one_of(_train_choices("OPTIMIZERS")),
    "train.lr_schedule": _one_of(_train_choices("LR_SCHEDULES")),
    "train.loss": _one_of(_train_choices("LOSSES")),
    "train.lr_normalization": _one_of(_train_choices("LR_NORMALIZATIONS")),
    "bn_statistics": _one_of(lambda: ("initial", "trained")),
    "ntk.batch_size": _at_least(1),
    "ntk.num_eigvecs": _at_least(1),
    "ntk.solver": _one_of(_solvers),
    "ntk.nystrom_dims": _at_least(1, optional=True),
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
    "alignment.num_eigvecs": _at_least(1, optional=True),
    "alignment.batch_size": _at_least(1),
    "alignment.vector_batch_size": _at_least(1),
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
        value = override.value()
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
