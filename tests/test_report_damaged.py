"""ntklab.report never uses a damaged run: verified against meta.json, left out, named, no crash."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT
from test_report_fakes import finish, ntk_config, write_compute_run, write_training_run

from ntklab import artifacts
from ntklab.report import main, read_sweep, report


def write_sweep(art, *, seeds=(0, 1), alignment=False, eigen=False):
    """Network runs at k = 0, 1; seed 1 at k = 0 scores 0.98 (the one the tests damage)."""
    job, runs = 0, {}
    for seed in seeds:
        compute = None
        if eigen:
            compute = write_compute_run(
                art / f"eigenfunctions/digits/lenet/seed_{seed}", test_acc=np.full(12, 0.7)
            )
        for label_idx in (0, 1):
            value = 0.98 if (seed, label_idx) == (1, 0) else 0.80 + 0.01 * seed
            arrays = {}
            if alignment:
                init = np.linspace(2.0, 1.0, 12)
                final = 1000 * init
                final[label_idx] *= 5.0
                arrays["alignment.npz"] = {"indices": np.arange(12), "init_all": init,
                                           "final_all": final}  # fmt: skip
            runs[(seed, label_idx)] = write_training_run(
                art / f"train_ntk/digits/lenet/label_{label_idx}-network-seed_{seed}-0a1b2c3d",
                config=ntk_config(label_idx, seed, False),
                metrics={"test/acc": value, "mode": "network", "label_idx": label_idx},
                arrays=arrays,
                eigenfunctions=compute,
                job=art / f"sweeps/train_ntk/stamp/{job}",
            )
            job += 1
    return art / "sweeps/train_ntk/stamp", runs


def edit_accuracy(run):
    """The fault of the issue: test/acc 0.98 -> 0.18, same length, meta.json left as it was."""
    path = run / "metrics.json"
    text = path.read_text()
    assert '"test/acc": 0.98' in text
    path.write_text(text.replace('"test/acc": 0.98', '"test/acc": 0.18'))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def invalid_but_recorded(run):
    """A run that wrote invalid JSON itself: the digest matches, the content does not parse."""
    (run / "metrics.json").write_text('{"test/acc": 0.98, ')
    finish(run, {"script": "train_ntk"})


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (edit_accuracy, "metrics.json is damaged: its sha256 differs"),
        (lambda run: truncate(run / "metrics.json"), "metrics.json is damaged: its size differs"),
        (invalid_but_recorded, "metrics.json is not valid JSON"),
        (lambda run: truncate(run / "meta.json"), "meta.json is not valid JSON"),
        (lambda run: (run / "metrics.json").unlink(), "metrics.json is missing"),
    ],
    ids=["edited", "truncated", "invalid-json", "invalid-meta", "missing"],
)
def test_a_damaged_run_is_left_out_of_every_table_and_named(tmp_path, capsys, fault, reason):
    sweep, runs = write_sweep(tmp_path / "artifacts")
    damaged = runs[(1, 0)]
    fault(damaged)
    report(sweep)
    with open(sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and str(damaged.resolve()) not in {r["run_dir"] for r in rows}
    with open(sweep / "report_summary.csv") as f:
        summary = {row["x"]: row for row in csv.DictReader(f)}
    assert float(summary["0.0"]["mean"]) == pytest.approx(0.80)  # seed 0 alone, never 0.18
    assert summary["0.0"]["count"] == "1" and summary["1.0"]["count"] == "2"
    printed = capsys.readouterr().out
    assert "warning: left out 1 damaged run(s):" in printed
    [line] = [line for line in printed.splitlines() if str(damaged) in line]
    assert reason in line
    page = (sweep / "report.md").read_text()
    assert "**1 damaged run(s) left out**" in page and "3 finished runs." in page
    [entry] = [line for line in page.splitlines() if line.startswith(f"- `{damaged}`")]
    assert reason in entry


def test_a_damaged_alignment_file_leaves_the_whole_run_out(tmp_path):
    sweep, runs = write_sweep(tmp_path / "artifacts", alignment=True)
    path = runs[(0, 1)] / "alignment.npz"
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF  # one byte of the arrays
    path.write_bytes(bytes(data))
    read = read_sweep(sweep)
    assert [path for path, _ in read.damaged] == [runs[(0, 1)]]
    assert "alignment.npz is damaged: its sha256 differs" in read.damaged[0][1]
    assert runs[(0, 1)] not in {row["_path"] for row in read.rows}
    report(sweep)
    page = (sweep / "report.md").read_text()
    table = page[page.index("## kernel alignment") :]
    assert "| 1 | 5 | 1 |" in table  # k = 1 from seed 1 only
    assert "| 0 | 5 | 2 |" in table


def test_a_damaged_eigenfunction_run_only_loses_the_curve_and_is_named(tmp_path):
    sweep, _ = write_sweep(tmp_path / "artifacts", eigen=True)
    compute = tmp_path / "artifacts/eigenfunctions/digits/lenet/seed_1"
    truncate(compute / "kernel_regression.npz")
    read = read_sweep(sweep)
    assert len(read.rows) == 4 and not read.damaged  # the training runs are sound
    problem = read.eigenfunctions[str(compute.resolve())].problem
    assert "kernel_regression.npz is damaged" in problem
    report(sweep)
    page = (sweep / "report.md").read_text()
    assert "**eigenfunction runs left out**" in page and "mean over 1 compute_ntk run(s)" in page


def run_report(folder):
    return subprocess.run(
        [sys.executable, "-m", "ntklab.report", str(folder)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_exit_status_is_0_while_a_sound_run_remains_and_1_with_one_line_when_none_does(tmp_path):
    sweep, runs = write_sweep(tmp_path / "artifacts", seeds=(0,))
    edit = runs[(0, 0)] / "metrics.json"
    edit.write_text(edit.read_text().replace('"test/acc": 0.8', '"test/acc": 0.1'))
    result = run_report(sweep)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"  {runs[(0, 0)]}: metrics.json is damaged" in result.stdout
    assert (sweep / "report.md").is_file()

    truncate(runs[(0, 1)] / "meta.json")  # the last sound run goes too
    result = run_report(sweep)
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"ntklab.report: no finished run below {sweep}; 2 damaged run(s)")
    assert "meta.json is not valid JSON" in line and "metrics.json is damaged" in line


def test_a_missing_folder_exits_1_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "no-such-folder")])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert captured.err.startswith("ntklab.report: ") and "is not a folder" in captured.err


def test_verification_uses_the_recorded_digests(tmp_path):
    """The fakes record real digests: an untouched sweep has nothing damaged."""
    sweep, runs = write_sweep(tmp_path / "artifacts", alignment=True, eigen=True)
    read = read_sweep(sweep)
    assert not read.damaged and not read.unverified and len(read.rows) == 4
    meta = artifacts.load_json(runs[(0, 0)] / "meta.json")
    assert set(meta["artifacts"]) >= {"metrics.json", "alignment.npz"}
