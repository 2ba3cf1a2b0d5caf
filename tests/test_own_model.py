"""A researcher's own Flax module, outside the repository, through the entry scripts.

The model lives in a module of its own folder (on ``PYTHONPATH``), its config in the researcher's
config folder (``hydra.searchpath``): ``model/<name>.yaml`` with ``_target_``, ``name`` and the
constructor fields. Its kernel equals brute-force jacrev; a bad field is one line, exit 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT

from ntklab.artifacts import load_run

MODULE = '''
import flax.linen as nn


class TinyNet(nn.Module):
    """Conv, then a shared Dense used twice (tied weights), then one logit."""

    features: int = 4
    hidden: int = 8

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(self.features, (3, 3))(x))
        x = x.reshape((x.shape[0], -1))
        shared = nn.Dense(self.hidden)
        x = nn.tanh(shared(x))
        x = nn.tanh(x + nn.Dense(self.hidden)(x))
        return nn.Dense(1)(x)
'''

CONFIG = """
_target_: my_models.TinyNet
name: tinynet
features: 3
hidden: 6
"""


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A folder with my_models.py and configs/model/tinynet.yaml."""
    folder = tmp_path_factory.mktemp("researcher")
    (folder / "my_models.py").write_text(textwrap.dedent(MODULE))
    (folder / "configs" / "model").mkdir(parents=True)
    (folder / "configs" / "model" / "tinynet.yaml").write_text(CONFIG)
    return folder


def run(own, script: str, *words: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, str(REPO_ROOT / script), "model=tinynet",
        f"hydra.searchpath=[file://{own / 'configs'}]", "data.num_train=30", "data.num_test=10",
        f"paths.artifacts={own / 'artifacts'}", *words,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{own}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(command, cwd=own, env=env, capture_output=True, text=True, timeout=300)


def test_an_outside_model_runs_through_compute_and_train(own, monkeypatch):
    made = run(own, "compute_ntk.py", "ntk.num_eigvecs=5")
    assert made.returncode == 0, made.stderr[-3000:]
    run_dir = own / "artifacts" / "eigenfunctions" / "digits" / "tinynet" / "seed_0"
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["config"]["model"] == {
        "_target_": "my_models.TinyNet", "name": "tinynet", "features": 3, "hidden": 6
    }  # fmt: skip
    monkeypatch.syspath_prepend(str(own))
    reference = load_run(run_dir)  # rebuilds the module from its _target_
    jacobian = jax.jacrev(lambda p: reference.apply_fn(p, reference.x)[:, 0])(reference.params)
    flat = np.concatenate(
        [np.asarray(leaf).reshape(len(reference.x), -1) for leaf in jax.tree.leaves(jacobian)],
        axis=1,
    )
    kernel = flat.astype(np.float64) @ flat.T.astype(np.float64)
    top = np.linalg.eigvalsh(kernel)[::-1][:5]
    np.testing.assert_allclose(reference.eigvals, top, rtol=1e-4)
    trained = run(own, "train_ntk.py", "label_idx=2", "train.epochs=2", "train.batch_size=10")
    assert trained.returncode == 0, trained.stderr[-3000:]
    runs = list((own / "artifacts" / "train_ntk" / "digits" / "tinynet").iterdir())
    assert len(runs) == 1 and (runs[0] / "meta.json").is_file()
    assert (runs[0] / "alignment_layers.npz").is_file()


def test_an_unknown_field_of_an_outside_model_is_one_line(own):
    result = run(own, "compute_ntk.py", "+model.depth=3")
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line == "error: unknown key model.depth; valid keys of model: name, features, hidden"
    missing = run(own, "compute_ntk.py", "model._target_=my_models.Nope")
    assert missing.returncode == 2
    assert "model._target_='my_models.Nope' cannot be imported" in missing.stderr
