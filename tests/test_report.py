"""ntklab.report on hand-written metrics.json files: CSV, grouping, mean ± spread, figures."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from ntklab.report import collect, main, report, summarize


def write_run(folder, script, config, **metrics):
    folder.mkdir(parents=True)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "metrics.json").write_text("{}")  # hidden folders are not runs
    content = {"script": script, **metrics, "config": config}
    (folder / "metrics.json").write_text(json.dumps(content))
    (folder / "meta.json").write_text(json.dumps({"script": script}))  # written last: finished


def ntk_config(label_idx, seed, linearize, **extra):
    return {
        "seed": seed,
        "label_idx": label_idx,
        "linearize": linearize,
        "model": {"name": "lenet", "widths": [4]},
        "data": {"dataset": "digits", "num_train": 30},
        "train": {"max_lr": 0.05},
        "paths": {"run_dir": f"/somewhere/{label_idx}/{seed}/{linearize}"},
        **extra,
    }


def accuracy(label_idx, seed, linearize):
    return 0.9 - 0.1 * label_idx - 0.2 * linearize + 0.01 * seed


@pytest.fixture
def ntk_sweep(tmp_path):
    job = 0
    for label_idx in (0, 2, 1):
        for linearize in (False, True):
            for seed in (0, 1, 2):
                write_run(
                    tmp_path / "sweep" / str(job),
                    "train_ntk",
                    ntk_config(label_idx, seed, linearize),
                    **{
                        "test/acc": accuracy(label_idx, seed, linearize),
                        "train/acc": 1.0,
                        "mode": "linear" if linearize else "network",
                        "label_idx": label_idx,
                    },
                )
                job += 1
    return tmp_path / "sweep"


def test_csv_has_every_run_and_the_figure_mean_and_spread_over_seeds(ntk_sweep, capsys):
    written = report(ntk_sweep)
    with open(ntk_sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18
    assert {"label_idx", "seed", "mode", "test/acc", "data.num_train", "run_dir"} <= set(rows[0])
    assert list(rows[0])[:3] == ["script", "run_dir", "label_idx"]
    assert {r["run_dir"] for r in rows} == {str(j) for j in range(18)}
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


def test_other_varying_keys_split_the_figures(tmp_path):
    for job, lr in enumerate((0.05, 0.1)):
        for label_idx in (0, 1):
            config = ntk_config(label_idx, 0, False, train={"max_lr": lr})
            write_run(tmp_path / f"{job}{label_idx}", "train_ntk", config, **{"test/acc": lr})
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
        write_run(tmp_path / f"cifar{num_train}", "train_cifar", config,
                  **{"test/acc": num_train / 1000, "mode": "linear"})  # fmt: skip
    for nad_idx in (0, 5):
        config = {"seed": 0, "label_idx": nad_idx, "model": {"name": "lenet"},
                  "data": {"dataset": "nads", "num_train": 20}}  # fmt: skip
        write_run(tmp_path / f"nad{nad_idx}", "train_nads", config,
                  **{"test/acc": 0.5, "mode": "network", "nad_idx": nad_idx, "label_idx": nad_idx})  # fmt: skip
    for label_idx in (0, 3):
        config = {"seed": 0, "label_idx": label_idx, "model": {"name": "lenet"},
                  "data": {"dataset": "digits", "num_train": 20}}  # fmt: skip
        runs = {
            name: {"test/acc": value} for name, value in (("network", 0.9), ("linear_init", 0.6))
        }
        write_run(tmp_path / f"cmp{label_idx}", "pretrained_ntk_comparison", config, runs=runs)
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


def test_unfinished_runs_are_skipped_with_a_warning_naming_each(ntk_sweep, capsys, caplog):
    """Killed runs (no meta.json) are not rows, and the log and the printed output name them."""
    killed_in_training = ntk_sweep / "18"
    (killed_in_training / ".hydra").mkdir(parents=True)
    (killed_in_training / "metrics.jsonl").write_text('{"epoch": 0}\n')
    (killed_in_training / "checkpoints").mkdir()
    killed_before_meta = ntk_sweep / "19"  # metrics.json written, meta.json not yet
    write_run(killed_before_meta, "train_ntk", ntk_config(0, 9, False), **{"test/acc": 0.0})
    (killed_before_meta / "meta.json").unlink()
    (killed_before_meta / "runs" / "network").mkdir(parents=True)  # nested: part of run 19
    (killed_before_meta / "runs" / "network" / "metrics.jsonl").write_text("")
    (ntk_sweep / "0" / "runs" / "network").mkdir(parents=True)  # inside a finished run
    (ntk_sweep / "0" / "runs" / "network" / "metrics.jsonl").write_text("")

    with caplog.at_level("WARNING", logger="ntklab.report"):
        report(ntk_sweep)
    with open(ntk_sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 and {r["run_dir"] for r in rows} == {str(j) for j in range(18)}
    warned = [r.getMessage() for r in caplog.records if "unfinished" in r.getMessage()]
    assert warned == [
        f"skipping unfinished run {killed_in_training} (no meta.json)",
        f"skipping unfinished run {killed_before_meta} (no meta.json)",
    ]
    printed = capsys.readouterr().out.splitlines()
    start = printed.index("warning: skipped 2 unfinished run(s) (no meta.json):")
    assert printed[start + 1 : start + 3] == [f"  {killed_in_training}", f"  {killed_before_meta}"]


def test_only_unfinished_runs_is_an_error_that_counts_them(tmp_path):
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no finished run below .*; 1 unfinished run"):
        collect(tmp_path)
