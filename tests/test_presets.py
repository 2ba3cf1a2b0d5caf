"""Experiment presets: composition, the sweep's run count, prerequisites made once, results page.

The miniatures launch the real scripts (``python <script>.py -m experiment=<name> ...``) with
overrides that shrink each preset to two runs (tiny data, one epoch) writing into ``tmp_path``.
"""

from __future__ import annotations

import csv
import itertools
import json
import pickle
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import CONFIG_DIR, REPO_ROOT, compose_config
from hydra import compose, initialize_config_dir
from omegaconf import read_write

from ntklab.experiments import prerequisites, presets, train_ntk
from ntklab.experiments.schema import SCRIPT_SCHEMAS
from ntklab.experiments.validation import validate
from ntklab.locking import acquire_lock, release_lock

PRESETS = {
    "eigenfunctions": "train_ntk",
    "pretrained": "pretrained_ntk_comparison",
    "nads": "train_nads",
    "cifar2": "train_cifar",
}
TINY_MLP = ["model=mlp", "model.widths=[8]", "train.epochs=1", "train.batch_size=10"]
TINY = [*TINY_MLP, "progress=false", "seed=0"]
HAS_LR_NORMALIZATION = "lr_normalization" in SCRIPT_SCHEMAS["train_ntk"].__dataclass_fields__[
    "train"
].default_factory.__dataclass_fields__  # fmt: skip
NEEDS_LR_NORMALIZATION = pytest.mark.skipif(
    not HAS_LR_NORMALIZATION, reason="train.lr_normalization is not in the schema yet"
)


def compose_with_hydra(script: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(f"{script}", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_composes_into_a_valid_sweep_of_its_script(name):
    if name == "pretrained" and not HAS_LR_NORMALIZATION:
        pytest.skip("train.lr_normalization is not in the schema yet")
    script = PRESETS[name]
    cfg = compose_with_hydra(script, [f"experiment={name}"])
    assert cfg.hydra.sweep.dir.startswith(f"artifacts/sweeps/{name}/")
    assert cfg.hydra.callbacks.preset._target_ == "ntklab.experiments.presets.PresetCallback"
    assert cfg.hydra.callbacks.preset.script == script
    params = dict(cfg.hydra.sweeper.params)
    assert params["seed"] == "0,1,2" and len(params) >= 3
    if script != "train_cifar":
        assert cfg.prerequisites == "create"
    plain = compose_config(f"{script}", [f"experiment={name}"])
    validate(plain)  # the preset's values pass the schema's range and choice checks
    expected = np.prod([len(str(v).split(",")) for v in params.values()])
    assert len(presets.sweep_jobs(cfg)) == expected


@pytest.mark.parametrize(
    "task",
    [
        ["experiment=eigenfunctions"],
        ["experiment=eigenfunctions", "label_idx=3,5", "seed=1"],
        ["experiment=eigenfunctions", "seed=2,0", "+foo=1", "linearize=false"],
    ],
)
def test_sweep_jobs_are_hydras_basic_sweeper_jobs_in_its_order(task):
    """The plan's job list equals the one Hydra's own sweeper launches (its private API is the
    oracle here; the library itself expands the grid with the public override parser)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose_with_hydra("train_ntk", ["experiment=eigenfunctions"])
    with read_write(cfg.hydra):
        cfg.hydra.overrides.task = task
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    overrides = OverridesParser.create().parse_overrides([*params, *task])
    (expected,) = BasicSweeper.split_arguments(overrides, None)
    assert presets.sweep_jobs(cfg) == expected


def test_sweep_jobs_is_the_product_and_the_command_line_wins():
    cfg = compose_with_hydra("train_ntk", ["experiment=eigenfunctions"])
    with read_write(cfg.hydra):  # what the command line of a multirun puts there
        cfg.hydra.overrides.task = ["experiment=eigenfunctions", "label_idx=3,5", "seed=1"]
    jobs = presets.sweep_jobs(cfg)
    expected = [
        sorted([f"label_idx={k}", f"linearize={b}", "seed=1", "experiment=eigenfunctions"])
        for k, b in itertools.product((3, 5), ("true", "false"))
    ]
    # Hydra writes the YAML grid's booleans as True/False (parsed as the same bools)
    assert sorted(sorted(o.lower() for o in job) for job in jobs) == sorted(expected)


def test_the_default_requires_the_prerequisite_and_validate_refuses_other_values(tmp_path):
    cfg = compose_config("train_ntk", [f"paths.artifacts={tmp_path}"])
    assert cfg.prerequisites == "require"
    bad = compose_config("train_ntk", ["prerequisites=maybe"])
    with pytest.raises(ValueError, match=r"prerequisites='maybe' is invalid: .*require, create"):
        validate(bad)


def run_script(script: str, overrides: list[str], cwd: Path) -> str:
    """Runs ``python <script>.py -m ...`` from the repository and returns stdout + stderr."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / f"{script}.py"), "-m", *overrides],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


def check_page(sweep: Path, output: str, *, name: str, runs: int, column: str, values: set):
    assert f"preset {name}: {runs} runs of " in output
    estimate = re.search(
        rf"preset {name}: estimated wall time .*: training .*, alignment .*, prerequisite runs ",
        output,
    )
    assert estimate, output[-3000:]
    assert f"preset {name}: results page {sweep / 'report.md'}" in output
    with open(sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == runs and {row[column] for row in rows} == values
    page = (sweep / "report.md").read_text()
    assert f"{runs} finished runs." in page and "None" not in page
    for line in page.splitlines():
        if line.startswith("!["):
            assert (sweep / line.split("](")[1].rstrip(")")).is_file(), line
    return rows, page


def test_eigenfunctions_miniature_creates_the_seed_run_and_ends_in_a_page(tmp_path):
    sweep, art = tmp_path / "sweep", tmp_path / "artifacts"
    output = run_script(
        "train_ntk",
        ["experiment=eigenfunctions", *TINY, "label_idx=0,1", "linearize=false",
         "data.num_train=20", "data.num_test=10", "alignment.num_eigvecs=3",
         f"paths.artifacts={art}", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )  # fmt: skip
    prerequisite = art / "eigenfunctions/digits/mlp/seed_0"
    meta = json.loads((prerequisite / "meta.json").read_text())
    assert meta["config"]["seed"] == 0 and meta["config"]["model"]["widths"] == [8]
    assert len(np.load(prerequisite / "eigvals.npy")) == 30  # min(N, 200): every label fits
    assert output.count("computing it now (seed 0)") == 1  # the second run loads it
    _, page = check_page(sweep, output, name="eigenfunctions", runs=2, column="label_idx",
                            values={"0", "1"})  # fmt: skip
    assert "eigenfunction index k" in page and "alignment-heatmap.png" in page
    assert (sweep / "train_ntk-digits-mlp-alignment.png").is_file()


def test_nads_miniature_creates_the_seed_run_and_ends_in_a_page(tmp_path):
    sweep, art = tmp_path / "sweep", tmp_path / "artifacts"
    output = run_script(
        "train_nads",
        ["experiment=nads", *TINY, "label_idx=0,5", "linearize=false", "data.num_train=20",
         "data.num_test=10", f"paths.artifacts={art}", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )  # fmt: skip
    meta = json.loads((art / "nads/mlp/seed_0/meta.json").read_text())
    assert meta["config"]["seed"] == 0 and meta["config"]["model"]["activation"] == "gelu"
    assert output.count("no finished compute_nads.py run") == 1
    _, page = check_page(sweep, output, name="nads", runs=2, column="nad_idx",
                            values={"0", "5"})  # fmt: skip
    assert "| NAD index | series |" in page and "mlp on NAD tasks (train_nads)" in page


def write_cifar_fixture(root: Path, *, per_batch: int = 10, num_test: int = 10) -> None:
    """A tiny CIFAR-10 in the published python-pickle layout: every class in every batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]
    for name, count in [*((n, per_batch) for n in names), ("test_batch", num_test)]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [i % 10 for i in range(count)],
            b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    labels = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
              b"ship", b"truck"]  # fmt: skip
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": labels}))


def test_cifar2_miniature_ends_in_a_page(tmp_path):
    write_cifar_fixture(tmp_path / "data")
    sweep = tmp_path / "sweep"
    output = run_script(
        "train_cifar",
        ["experiment=cifar2", *TINY, "data.num_train=10,20", "linearize=false",
         f"data.root={tmp_path / 'data'}", f"paths.artifacts={tmp_path / 'artifacts'}",
         f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )  # fmt: skip
    _, page = check_page(sweep, output, name="cifar2", runs=2, column="data.num_train",
                            values={"10", "20"})  # fmt: skip
    assert "| training examples | series |" in page


@NEEDS_LR_NORMALIZATION
def test_pretrained_miniature_creates_the_seed_run_and_ends_in_a_page(tmp_path):
    sweep, art = tmp_path / "sweep", tmp_path / "artifacts"
    output = run_script(
        "pretrained_ntk_comparison",
        ["experiment=pretrained", *TINY, "label_idx=0,1", "train.lr_normalization=none",
         "data.num_train=20", "data.num_test=10", f"paths.artifacts={art}",
         f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )  # fmt: skip
    assert (art / "eigenfunctions/digits/mlp/seed_0/meta.json").is_file()
    assert output.count("computing it now (seed 0)") == 1
    _, page = check_page(sweep, output, name="pretrained", runs=2, column="label_idx",
                            values={"0", "1"})  # fmt: skip
    assert "linearization at θ_T" in page


def test_a_dry_run_prints_the_clipped_plan_and_launches_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    output = run_script(
        "train_ntk",
        ["experiment=eigenfunctions", *TINY, "linearize=false", "data.num_train=20",
         "data.num_test=10", f"paths.artifacts={tmp_path / 'artifacts'}",
         f"hydra.sweep.dir={sweep}", "hydra.callbacks.preset.dry_run=true"],
        tmp_path,
    )  # fmt: skip
    # N = 30 samples: a created run has 30 eigenvectors, so 49, 99 and 199 cannot be labels
    assert "label_idx=49,99,199 dropped from the grid" in output
    assert "preset eigenfunctions: 6 runs of train_ntk.py" in output
    assert "1 compute_ntk.py prerequisite run(s) missing" in output
    assert "dry run, nothing launched" in output
    assert not sweep.exists() and not (tmp_path / "artifacts").exists()


def test_a_preset_of_another_script_is_refused_with_the_right_command():
    cfg = compose_with_hydra("train_cifar", ["experiment=cifar2"])
    with read_write(cfg.hydra):
        cfg.hydra.job.name = "train_cifar"  # as @hydra.main names the job after the script
    callback = presets.PresetCallback(name="cifar2", script="train_ntk")
    with pytest.raises(ValueError, match=r"preset of train_ntk.py, not of train_cifar.py; run: "
                       r"python train_ntk.py -m experiment=cifar2"):  # fmt: skip
        callback.on_multirun_start(cfg)


def test_a_run_waits_for_the_job_computing_its_prerequisite_then_proceeds(
    tmp_path, monkeypatch, caplog
):
    """A folder locked by another job is not computed twice: the run waits for the lock."""
    monkeypatch.setattr(prerequisites, "POLL_S", 0.05)
    folder = tmp_path / "eigenfunctions/digits/mlp/seed_0"
    folder.mkdir(parents=True)
    lock = folder / ".lock"
    fd = acquire_lock(lock)  # "another job" holds the run folder
    released = threading.Event()

    def release_later() -> None:
        released.wait(30)
        release_lock(lock, fd)

    holder = threading.Thread(target=release_later)
    holder.start()
    original = prerequisites._create_once

    def create_once(path, create, **kwargs):
        def create_then_release():
            try:
                return create()
            finally:
                released.set()  # the first attempt met the lock; let the holder finish

        return original(path, create_then_release, **kwargs)

    monkeypatch.setattr(prerequisites, "_create_once", create_once)
    cfg = compose_config(
        "train_ntk",
        [*TINY, "label_idx=1", "prerequisites=create", "alignment.enabled=false",
         "data.num_train=20", "data.num_test=10", f"paths.artifacts={tmp_path}",
         f"paths.run_dir={tmp_path / 'train'}"],
    )  # fmt: skip
    with caplog.at_level("INFO", logger="ntklab.experiments.prerequisites"):
        run_dir = train_ntk.run(cfg)
    holder.join()
    assert "in use by PID" in caplog.text and "waiting for that job" in caplog.text
    assert (folder / "meta.json").is_file() and (run_dir / "meta.json").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["label_idx"] == 1
