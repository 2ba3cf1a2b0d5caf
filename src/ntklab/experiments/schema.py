"""Typed configs: one Hydra structured-config schema per entry script, checked before any disk work.

Each primary YAML (``config/<script>.yaml``) starts from its schema (``defaults:
[<script>_schema, ...]``). Hydra then refuses a wrong type (naming key, value and type) and an
unknown key before the run starts; :func:`ntklab.experiments.validation.validate` adds what types
cannot say. The ``train:`` node is :class:`ntklab.train.TrainConfig` itself (one definition: the
trainer's argument and the schema node, its defaults the config's); the ``model:`` node is typed
by :func:`model_schema` of its Flax module when validated (registered or ``_target_``). The YAML
files keep the other defaults; the schemas hold the types (``MISSING`` where the YAML sets the
value). Also registered here: the resolvers ``${run_name:<script>}`` (a training run's folder
name) and the ``--help`` page's.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ntklab.train_steps import TrainConfig

__all__ = ["SCRIPT_SCHEMAS", "model_schema"]

# Hydra's structured configs read `Optional[X]` (PEP 604 unions are not supported in OmegaConf 2.3).
# ruff: noqa: UP045


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
class NtkSchema:
    """``compute_ntk.py``'s ``ntk:``."""

    batch_size: int = MISSING
    num_eigvecs: int = MISSING
    save_kernel: bool = MISSING
    solver: str = MISSING
    eigen_dtype: str = "auto"  # auto | float32 | float64: the precision of the eigensolve
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
    every: Optional[int] = None  # epochs between measurements (null: at the end only)
    num_eigvecs: Optional[int] = MISSING  # null: every eigenvector of the compute_ntk run
    batch_size: int = MISSING


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
class EigenfunctionTrainingPaths(ArtifactPaths):
    eigenfunctions: str = MISSING


@dataclass
class NadTrainingPaths(ArtifactPaths):
    nads: str = MISSING


# --- one schema per entry script ---------------------------------------------------------------


@dataclass
class ComputeNtkConfig:
    seed: int = MISSING
    overwrite: bool = MISSING
    model: Any = MISSING  # checked by validate(): the fields of the model's Flax module
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
    order_seed: Optional[int] = None
    overwrite: bool = MISSING
    progress: bool = MISSING
    model: Any = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    paths: ArtifactPaths = field(default_factory=ArtifactPaths)


@dataclass
class TrainNtkConfig(TrainingConfig):
    label_idx: int = MISSING
    prerequisites: str = MISSING  # require | create: a missing compute_ntk.py run
    linearize: bool = MISSING
    with_bias: bool = MISSING
    bn_statistics: str = MISSING  # initial | trained: BatchNorm statistics of the alignment kernel
    data: DataSchema = field(default_factory=DataSchema)
    alignment: AlignmentSchema = field(default_factory=AlignmentSchema)
    paths: EigenfunctionTrainingPaths = field(default_factory=EigenfunctionTrainingPaths)


@dataclass
class PretrainedNtkComparisonConfig(TrainingConfig):
    label_idx: int = MISSING
    prerequisites: str = MISSING  # require | create: a missing compute_ntk.py run
    bn_statistics: str = MISSING  # initial | trained: BatchNorm statistics of run (c)
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


SCRIPT_SCHEMAS: dict[str, type] = {
    "compute_ntk": ComputeNtkConfig,
    "compute_nads": ComputeNadsConfig,
    "train_ntk": TrainNtkConfig,
    "train_nads": TrainNadsConfig,
    "train_cifar": TrainCifarConfig,
    "pretrained_ntk_comparison": PretrainedNtkComparisonConfig,
}
"""Entry script -> its schema, stored in the ConfigStore as ``<script>_schema``."""


def model_schema(cls: type) -> type:
    """A dataclass schema of a Flax module's constructor fields (tuples become lists), plus
    ``name`` (the run folders' name) and ``_target_`` (the class of a model outside the zoo).

    Field types OmegaConf cannot hold (callables, modules, ...) are left untyped (``Any``).
    """
    from ntklab.models import model_fields

    hints = typing.get_type_hints(cls)
    fields: list[tuple[str, Any, Any]] = [
        ("name", str, field(default=MISSING)),
        ("_target_", Optional[str], field(default=None)),
    ]
    for name, model_field in model_fields(cls).items():
        kind, default = _config_type(hints.get(name, Any)), model_field.default
        if (
            default is dataclasses.MISSING
            and model_field.default_factory is not dataclasses.MISSING
        ):
            default = model_field.default_factory()
        if isinstance(default, tuple):
            default = field(default_factory=lambda value=default: list(value))
        elif default is dataclasses.MISSING or not _plain(default):
            default = field(default=MISSING)
        else:
            default = field(default=default)
        fields.append((name, kind, default))
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", fields)


_PLAIN_TYPES = (int, float, bool, str)


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, _PLAIN_TYPES)


def _config_type(hint: Any) -> Any:
    """``hint`` as a type OmegaConf can check: plain types, Optional of them, lists of them."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _PLAIN_TYPES:
        return hint
    if origin in (tuple, list, collections.abc.Sequence) and args and args[0] in _PLAIN_TYPES:
        return list[args[0]]
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = _config_type(next(a for a in args if a is not type(None)))
        return Any if inner is Any else Optional[inner]
    return Any


def _register() -> None:
    store = ConfigStore.instance()
    for script, schema in SCRIPT_SCHEMAS.items():
        store.store(name=f"{script}_schema", node=schema)
    # ${run_name:<script>}: a training run's folder name (readable keys + a digest of its identity)
    OmegaConf.register_new_resolver("run_name", _run_name, replace=True)
    OmegaConf.register_new_resolver("ntklab_config_groups", _config_groups, replace=True)
    OmegaConf.register_new_resolver("ntklab_script_summary", _script_summary, replace=True)


def _run_name(script: str, *, _root_: DictConfig) -> str:
    from ntklab.experiments.identity import run_name

    return run_name(_root_, script)


def _config_groups(script: str) -> str:
    """The user-facing config groups of ``script`` and their options, for ``--help``."""
    from hydra.core.global_hydra import GlobalHydra

    groups = ["model", "data", "experiment", "hydra/launcher"]
    if script in ("compute_nads", "train_nads"):
        groups.remove("data")
    if script.startswith("compute"):
        groups.remove("experiment")
    lines = []
    if GlobalHydra.instance().is_initialized():
        loader = GlobalHydra.instance().config_loader()
        for group in groups:
            options = loader.get_group_options(group)
            if options:
                lines.append(f"{group}: {', '.join(options)}")
    lines.append(
        "(your own model: model=<name> hydra.searchpath=[file://<folder with model/<name>.yaml>])"
    )
    return "\n".join(lines)


def _script_summary(script: str) -> str:
    """The first line of the script's module docstring."""
    import importlib

    try:
        module = importlib.import_module(f"ntklab.experiments.{script}")
    except ImportError:
        return ""
    return (module.__doc__ or "").strip().splitlines()[0].strip().replace("``", "")


_register()
