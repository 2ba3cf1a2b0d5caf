"""The trainer called with flat keywords, as most tests build their problems.

    fit(train_apply_fn=..., params=..., batch_stats=..., x_train=..., y_train=..., x_test=...,
        y_test=..., config=TrainConfig(epochs=2), seed=0, run_dir=None)

maps the keywords onto :func:`ntklab.train.fit`'s groups (:class:`~ntklab.train.Trainee`,
:class:`~ntklab.train.TrainData`); ``checkpoint_every`` goes into the config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ntklab import train
from ntklab.train import TrainConfig, TrainData, Trainee


def fit(
    *,
    params: Any,
    batch_stats: Any,
    x_train: Any,
    y_train: Any,
    x_test: Any,
    y_test: Any,
    config: TrainConfig,
    apply_fn: Any = None,
    train_apply_fn: Any = None,
    eval_apply_fn: Any = None,
    checkpoint_every: int | None = None,
    **options: Any,
) -> train.FitResult:
    """:func:`ntklab.train.fit` from flat keywords."""
    if checkpoint_every is not None:
        config = dataclasses.replace(config, checkpoint_every=checkpoint_every)
    trainee = Trainee(
        params=params,
        batch_stats=batch_stats,
        apply_fn=apply_fn,
        train_apply_fn=train_apply_fn,
        eval_apply_fn=eval_apply_fn,
    )
    return train.fit(trainee, TrainData(x_train, y_train, x_test, y_test), config, **options)
