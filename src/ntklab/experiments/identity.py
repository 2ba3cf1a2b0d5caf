"""A run's identity: the config keys that determine its results, and the run folder named after it.

    run_identity(cfg)                  # {"seed": 0, "label_idx": 9, "model": {...}, ...}
    run_name(cfg, "train_ntk")         # "label_9-network-seed_0-3f2a9c1b"

A training run's folder is ``<paths.artifacts>/<script>/.../<run name>``: a few readable keys and
the first 8 hex digits of the sha256 of its identity, so the same command always lands in the
same folder (and resumes it), and two configurations never share one. ``config.json`` in the
folder holds the identity itself.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["NON_IDENTITY_KEYS", "RUN_NAMES", "mode_name", "run_identity", "run_name"]

NON_IDENTITY_KEYS: dict[str, tuple[str, ...]] = {
    "": ("paths", "progress", "overwrite", "prerequisites", "hydra"),
    "data": ("root", "download"),
    "train": ("eval_batch_size", "checkpoint_every"),
    "alignment": ("batch_size",),
}
"""Config keys that do not change a training run's results, left out of its identity."""

RUN_NAMES: dict[str, str] = {
    "train_ntk": "label_{label_idx}-{mode}-seed_{seed}",
    "train_nads": "nad_{label_idx}-{mode}-seed_{seed}",
    "train_cifar": "n_{num_train}-{mode}-seed_{seed}",
    "pretrained_ntk_comparison": "label_{label_idx}-lr_{lr_normalization}-seed_{seed}",
}
"""The readable part of each training script's run folder name."""


def mode_name(*, linearize: bool, with_bias: bool = True) -> str:
    """``network``, ``linear`` or ``linear_nobias``: the model a run trains."""
    if not linearize:
        return "network"
    return "linear" if with_bias else "linear_nobias"


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """The config keys that determine a training run's results (what ``config.json`` records).

    ``with_bias`` only affects linearized models: a network run's identity leaves it out.
    """
    identity = {key: _plain(cfg[key]) for key in cfg if key not in NON_IDENTITY_KEYS[""]}
    for group, keys in NON_IDENTITY_KEYS.items():
        for key in keys if group and isinstance(identity.get(group), dict) else ():
            identity[group].pop(key, None)
    if identity.get("linearize") is False:
        identity.pop("with_bias", None)
    return identity


def run_name(cfg: DictConfig, script: str) -> str:
    """The folder name of a training run of ``script``: readable keys, then the identity digest.

    Raises:
      KeyError: ``script`` is not a training script (``RUN_NAMES``).
    """
    identity = run_identity(cfg)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    train = identity.get("train") or {}
    num_train = (identity.get("data") or {}).get("num_train")
    readable = RUN_NAMES[script].format(
        label_idx=identity.get("label_idx"),
        mode=mode_name(
            linearize=bool(identity.get("linearize", False)),
            with_bias=bool(identity.get("with_bias", True)),
        ),
        seed=identity.get("seed"),
        num_train="all" if num_train is None else num_train,
        lr_normalization=train.get("lr_normalization", "none"),
    )
    return f"{readable}-{digest}"


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=True)
    if OmegaConf.is_list(value):
        return OmegaConf.to_container(value, resolve=True)
    return value
