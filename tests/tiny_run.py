"""The tiny compute_ntk run the fault tests share: an MLP on 36 digits images (N = 36)."""

from __future__ import annotations

from conftest import compose_config

TINY = [
    "model=mlp",
    "model.widths=[16]",
    "data.num_train=24",
    "data.num_test=12",
    "ntk.batch_size=12",
    "ntk.num_eigvecs=4",
]


def tiny_config(artifacts_dir, *extra: str):
    """The tiny run's compute_ntk config writing under ``artifacts_dir``."""
    return compose_config("compute_ntk", [*TINY, f"paths.artifacts={artifacts_dir}", *extra])
