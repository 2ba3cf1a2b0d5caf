"""Data-parallel training on 4 forced CPU devices equals training on one device.

The check runs in the suite's one shared 4-device subprocess (the device count is fixed when JAX
starts): ``train_parallel_four_devices_train_the_single_device_params`` in
tests/multidevice_checks.py, run by tests/test_multidevice.py. For an MLP and a tiny BatchNorm
ResNet, with batch sizes that divide over 4 devices and batches that do not (padded and masked for
the MLP, replicated for BatchNorm), the final params, BatchNorm statistics and per-epoch metrics of
``fit(devices=4)`` equal those of ``fit(devices=1)`` to float32 rounding, and the trained state is
replicated. Here: the refusal of an empty device list."""

from __future__ import annotations

import pytest
from fitting import fit

from ntklab.train import TrainConfig


def test_an_empty_device_list_is_refused():
    with pytest.raises(ValueError, match="devices is empty"):
        fit(
            apply_fn=lambda params, x: x[:, :1] * params,
            params=1.0,
            batch_stats={},
            x_train=[[0.0]],
            y_train=[1.0],
            x_test=[[0.0]],
            y_test=[0.0],
            config=TrainConfig(epochs=1),
            seed=0,
            run_dir=None,
            devices=[],
        )
