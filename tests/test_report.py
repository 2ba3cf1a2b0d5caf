"""ntklab.report on fake run folders: following run.json, CSV, grouping, mean ± spread, figures."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from test_report_fakes import ntk_config, write_compute_run, write_job, write_training_run

from ntklab import artifacts
from ntklab.report import collect, find_runs, main, read_sweep, report, summarize


def accuracy(label_idx, seed, linearize):
    return 0.9 - 0.1 * label_idx - 0.2 * linearize + 0.01 * seed


def write_ntk_sweep(art, *, seeds=(0, 1, 2), label_indices=(0, 2, 1), stamp="stamp"):
    """An eigenfunction sweep in the new layout: runs under art/train_ntk, jobs under art/sweeps."""
    job = 0
    for label_idx in label_indices:
        for linearize in (False, True):
            for seed in seeds:
                mode = "linear" if linearize else "network"
                write_training_run(
                    art / f"train_ntk/digits/lenet/label_{label_idx}-{mode}-seed_{seed}-0a1b2c3d",
                    config=ntk_config(label_idx, seed, linearize),
                    metrics={
                        "test/acc": accuracy(label_idx, seed, linearize),
                        "train/acc": 1.0,
                        "mode": mode,
                        "label_idx": label_idx,
                    },
                    job=art / "sweeps" / "train_ntk" / stamp / str(job),
                )
                job += 1
    return art / "sweeps" / "train_ntk" / stamp


@pytest.fixture
def ntk_sweep(tmp_path):
    return write_ntk_sweep(tmp_path / "artifacts")


def test_the_sweep_folder_leads_to_every_run_and_the_figure_means_over_seeds(ntk_sweep, capsys):
    """The sweep folder holds only job folders; the rows come from the run folders they name."""
    written = report(ntk_sweep)
    with open(ntk_sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18
    assert list(rows[0])[:4] == ["script", "run_dir", "job", "label_idx"]
    assert {r["job"] for r in rows} == {str(j) for j in range(18)}
    runs = sorted((ntk_sweep.parents[2] / "train_ntk/digits/lenet").iterdir())
    assert sorted(r["run_dir"] for r in rows) == sorted(str(p.resolve()) for p in runs)
    for suffix in ("png", "pdf"):
        figure = ntk_sweep / f"train_ntk-digits-lenet-test_acc-vs-label_idx.{suffix}"
        assert figure in written and figure.stat().st_size > 0

    [(group, x_key, curves)] = summarize(collect(ntk_sweep), "test/acc")
    assert group == {"script": "train_ntk", "data.dataset": "digits", "model.name": "lenet"}
    assert x_key == "label_idx" and set(curves) == {"network", "linear"}
    for mode, linearize in (("network", False), ("linear", True)):
        xs, mean, spread, count = curves[mode]
        np.testing.assert_array_equal(xs, [0, 1, 2])
        values = np.array([[accuracy(i, s, linearize) for s in range(3)] for i in range(3)])
        np.testing.assert_allclose(mean, values.mean(axis=1))
        np.testing.assert_allclose(spread, values.std(axis=1, ddof=1))
        np.testing.assert_array_equal(count, [3, 3, 3])
    with open(ntk_sweep / "report_summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert "network" in capsys.readouterr().out


def test_jobs_come_in_job_order_and_a_run_is_read_once(tmp_path):
    art = tmp_path / "artifacts"
    sweep = write_ntk_sweep(art, seeds=(0,), label_indices=range(6))  # jobs 0..11
    found = find_runs(sweep)
    assert [found.jobs[run].name for run in found.finished] == [str(j) for j in range(12)]
    # a rerun job pointing to a finished run (same configuration) adds no row
    write_job(sweep / "12", found.finished[0], "train_ntk")
    assert len(collect(sweep)) == 12
    # the artifacts folder reaches each run twice (its job's pointer, and directly); the
    # compute_ntk run (no metrics.json) is neither a row nor unfinished
    write_compute_run(art / "eigenfunctions/digits/lenet/seed_0")
    sweep_rows = read_sweep(art)
    assert len(sweep_rows.rows) == 12 and not sweep_rows.unfinished and not sweep_rows.damaged


def test_a_folder_holding_run_folders_directly_works_too(ntk_sweep):
    runs = ntk_sweep.parents[2] / "train_ntk"
    report(runs, out=runs.parent / "page")
    with open(runs.parent / "page" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 and all(r["run_dir"].startswith("digits/lenet/label_") for r in rows)
    assert "job" not in rows[0]  # no run was reached through a job folder


def test_pointers_are_followed_after_the_artifacts_folder_moved(ntk_sweep, tmp_path):
    moved = tmp_path / "copied" / "artifacts"
    shutil.move(ntk_sweep.parents[2], moved)  # run.json still names the old absolute paths
    rows = collect(moved / "sweeps" / "train_ntk" / "stamp")
    assert len(rows) == 18
    assert all(str(row["_path"]).startswith(str(moved)) for row in rows)


def test_a_pointer_to_a_missing_run_is_named_and_left_out(ntk_sweep, capsys):
    shutil.rmtree(find_runs(ntk_sweep).finished[0])
    report(ntk_sweep)
    with open(ntk_sweep / "report.csv") as f:
        assert len(list(csv.DictReader(f))) == 17
    out = capsys.readouterr().out
    assert "left out 1 damaged run(s)" in out and "which does not exist" in out
    page = (ntk_sweep / "report.md").read_text()
    assert f"- `{ntk_sweep / '0'}`: " in page and "which does not exist" in page


def test_other_varying_keys_split_the_figures(tmp_path):
    for lr in (0.05, 0.1):
        for label_idx in (0, 1):
            config = ntk_config(label_idx, 0, False, train={"max_lr": lr})
            write_training_run(tmp_path / f"{lr}-{label_idx}", config=config,
                               metrics={"test/acc": lr})  # fmt: skip
    figures = summarize(collect(tmp_path), "test/acc")
    assert sorted(group["train.max_lr"] for group, _, _ in figures) == [0.05, 0.1]
    for group, _, curves in figures:  # no mode key: the series comes from `linearize`
        np.testing.assert_allclose(curves["network"][1], [group["train.max_lr"]] * 2)
    report(tmp_path, out=tmp_path / "figures")
    assert (tmp_path / "figures" / "train_ntk-digits-lenet-train.max_lr=0.1-test_acc-vs-label_idx.png").exists()  # fmt: skip


def test_num_train_nad_and_comparison_sweeps_pick_their_x_key_and_series(tmp_path):
    for num_train in (10, 100, 1000):
        config = {"seed": 0, "linearize": True, "model": {"name": "mlp"},
                  "data": {"dataset": "cifar2", "num_train": num_train}}  # fmt: skip
        write_training_run(tmp_path / f"cifar{num_train}", script="train_cifar", config=config,
                           metrics={"test/acc": num_train / 1000, "mode": "linear"})  # fmt: skip
    for nad_idx in (0, 5):
        config = {"seed": 0, "label_idx": nad_idx, "model": {"name": "lenet"},
                  "data": {"dataset": "nads", "num_train": 20}}  # fmt: skip
        metrics = {"test/acc": 0.5, "mode": "network", "nad_idx": nad_idx, "label_idx": nad_idx}
        write_training_run(tmp_path / f"nad{nad_idx}", script="train_nads", config=config,
                           metrics=metrics)  # fmt: skip
    for label_idx in (0, 3):
        config = {"seed": 0, "label_idx": label_idx, "model": {"name": "lenet"},
                  "data": {"dataset": "digits", "num_train": 20}}  # fmt: skip
        runs = {
            name: {"test/acc": value} for name, value in (("network", 0.9), ("linear_init", 0.6))
        }
        write_training_run(tmp_path / f"cmp{label_idx}", script="pretrained_ntk_comparison",
                           config=config, metrics={"runs": runs})  # fmt: skip
    figures = {group["script"]: (x_key, curves) for group, x_key, curves in summarize(collect(tmp_path), "test/acc")}  # fmt: skip
    assert len(figures) == 3
    x_key, curves = figures["train_cifar"]
    assert x_key == "data.num_train"
    np.testing.assert_allclose(curves["linear"][1], [0.01, 0.1, 1.0])
    x_key, curves = figures["train_nads"]
    assert x_key == "nad_idx" and list(curves["network"][0]) == [0, 5]  # one figure, not split
    x_key, curves = figures["pretrained_ntk_comparison"]
    assert x_key == "label_idx" and set(curves) == {"network", "linear_init"}
    np.testing.assert_allclose(curves["linear_init"][1], [0.6, 0.6])
    main([str(tmp_path)])
    assert (tmp_path / "train_cifar-cifar2-mlp-test_acc-vs-data.num_train.png").exists()
    assert (tmp_path / "train_nads-nads-lenet-test_acc-vs-nad_idx.png").exists()


def test_a_folder_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no finished run below"):
        report(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"is not a folder"):
        report(tmp_path / "missing")


def test_unfinished_runs_are_skipped_with_a_warning_naming_each(ntk_sweep, capsys, caplog):
    """A job that never claimed its run folder (no run.json) and a run killed before meta.json
    are not rows; the log and the printed output name them."""
    never_claimed = ntk_sweep / "18"
    (never_claimed / ".hydra").mkdir(parents=True)
    art = ntk_sweep.parents[2]
    killed = write_training_run(
        art / "train_ntk/digits/lenet/label_0-network-seed_9-ffffffff",
        config=ntk_config(0, 9, False),
        metrics={"test/acc": 0.0},
        job=ntk_sweep / "19",
        finished=False,
    )
    (killed / "runs" / "network").mkdir(parents=True)  # nested: part of the killed run
    (killed / "runs" / "network" / "metrics.jsonl").write_text("")

    with caplog.at_level("WARNING", logger="ntklab.report"):
        report(ntk_sweep)
    with open(ntk_sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 and {r["job"] for r in rows} == {str(j) for j in range(18)}
    warned = [r.getMessage() for r in caplog.records if "unfinished" in r.getMessage()]
    assert warned == [
        f"skipping unfinished run {never_claimed} (no meta.json)",
        f"skipping unfinished run {killed} (no meta.json)",
    ]
    printed = capsys.readouterr().out.splitlines()
    start = printed.index("warning: skipped 2 unfinished run(s) (no meta.json):")
    assert printed[start + 1 : start + 3] == [f"  {never_claimed}", f"  {killed}"]
    page = (ntk_sweep / "report.md").read_text()
    assert "18 finished runs." in page and f"- `{killed}`" in page


def test_only_unfinished_runs_is_an_error_that_counts_them(tmp_path):
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no finished run below .*; 1 unfinished run"):
        collect(tmp_path)


def test_runs_without_file_digests_are_read_and_said_unverified(tmp_path, capsys):
    """Runs written before meta.json recorded digests are read, and the page says so."""
    for seed in (0, 1):
        run = write_training_run(tmp_path / f"old{seed}", config=ntk_config(0, seed, False),
                                 metrics={"test/acc": 0.5 + seed / 10})  # fmt: skip
        meta = artifacts.load_json(run / "meta.json")
        del meta["artifacts"]
        (run / "meta.json").write_text(json.dumps(meta))
    sweep = read_sweep(tmp_path)
    assert len(sweep.rows) == 2 and sweep.unverified == [tmp_path / "old0", tmp_path / "old1"]
    report(tmp_path)
    assert "**2 run(s) not verified**" in (tmp_path / "report.md").read_text()
    assert "2 run(s) read without verification" in capsys.readouterr().out
