"""Data-parallel training on 4 forced CPU devices equals training on one device.

The check runs in a subprocess started with ``--xla_force_host_platform_device_count=4`` (the
device count is fixed when JAX starts). For an MLP and a tiny BatchNorm ResNet, with batch sizes
that divide over 4 devices and batches that do not (padded and masked for the MLP, replicated for
BatchNorm), the final params, BatchNorm statistics and per-epoch metrics of ``fit(devices=4)``
equal those of ``fit(devices=1)`` to float32 rounding, and the trained state is replicated.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fitting import fit

from ntklab.train import TrainConfig

SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, numpy as np
jax.config.update("jax_default_prng_impl", "rbg")
jax.config.update("jax_numpy_rank_promotion", "raise")
from jax.flatten_util import ravel_pytree
from ntklab.data import load_dataset
from ntklab.models import build_model, init_variables, train_apply_fn
from fitting import fit
from ntklab.train import TrainConfig, eval_apply_fn

devices = jax.devices()
assert len(devices) == 4, devices
data = load_dataset("digits", num_train=24, num_test=11, seed=0)
arrays = {{
    "x_train": data.train.images, "y_train": (data.train.labels >= 5).astype(np.float32),
    "x_test": data.test.images, "y_test": (data.test.labels >= 5).astype(np.float32),
}}
models = {{
    "mlp": build_model("mlp", widths=(16,)),
    "bn": build_model("resnet18", stage_sizes=(1,), width=4),
}}
# batch 12: every batch divides; 10: batches 10, 10, 4 (10 padded to 12, or replicated with BN)
for name, batch_size in (("mlp", 10), ("bn", 12), ("bn", 10)):
    model = models[name]
    variables = init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))
    kwargs = dict(
        train_apply_fn=train_apply_fn(model), eval_apply_fn=eval_apply_fn(model),
        params=variables["params"], batch_stats=variables.get("batch_stats", {{}}), **arrays,
        config=TrainConfig(epochs=2, batch_size=batch_size, eval_batch_size=5, max_lr=0.1),
        seed=0, run_dir=None, progress=False,
    )
    one = fit(**kwargs, devices=devices[:1])
    four = fit(**kwargs, devices=devices)
    for tree in ("params", "batch_stats"):
        a = ravel_pytree(getattr(one, tree))[0]
        b = ravel_pytree(getattr(four, tree))[0]
        scale = float(np.abs(a).max()) if a.size else 1.0
        np.testing.assert_allclose(b, a, rtol={rtol}, atol={rtol} * scale, err_msg=f"{{name}} {{batch_size}} {{tree}}")
        moved = ravel_pytree(variables.get(tree, {{}}))[0]
        assert a.size == 0 or np.abs(a - moved).max() > 1e-3, "training moved nothing"
        print(name, batch_size, tree, "max abs diff", float(np.abs(a - b).max()) if a.size else 0.0, "scale", scale)
    for key in ("train/loss", "train/acc", "test/loss", "test/acc", "train/batch_loss"):
        np.testing.assert_allclose(four.history[-1][key], one.history[-1][key], rtol=1e-5)
    leaf = jax.tree.leaves(four.params)[0]
    assert leaf.sharding.device_set == set(devices) and leaf.sharding.is_fully_replicated
print("PARALLEL-OK")
"""


def test_four_devices_train_the_single_device_params(tmp_path):
    script = tmp_path / "parallel.py"
    script.write_text(SCRIPT.format(rtol=2e-5, tests=str(Path(__file__).parent)))
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and "PARALLEL-OK" in result.stdout, (
        result.stdout[-2000:] + result.stderr[-4000:]
    )


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
