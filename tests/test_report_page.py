"""ntklab.report's results page: chance line, band label, one-run points, the comparison sweep."""

from __future__ import annotations

import csv

import matplotlib.collections
import matplotlib.pyplot as plt
import numpy as np
import pytest
from test_report_fakes import ntk_config, write_training_run

from ntklab.report import ONE_RUN, band_label, chance_curve, collect, metric_figures, read_sweep
from ntklab.report import report as write_report
from ntklab.report._figures import draw_metric


@pytest.fixture(autouse=True)
def _close_figures():
    """Figures drawn without saving stay open in pyplot; close them after each test."""
    yield
    plt.close("all")


def sweep(folder, *, distinct_inits=True, seeds=(0, 1)):
    for label_idx in (0, 3, 10):
        for seed in seeds:
            for linearize in (False, True):
                write_training_run(
                    folder / f"k{label_idx}-s{seed}-{linearize}",
                    config=ntk_config(label_idx, seed, linearize),
                    metrics={
                        "test/acc": 0.9 - 0.01 * label_idx + 0.01 * seed,
                        "test/majority_rate": 0.5 + 0.02 * label_idx + 0.01 * seed,
                        "train/majority_rate": 0.6,
                        "mode": "linear" if linearize else "network",
                        "label_idx": label_idx,
                        "init_params_sha256": f"theta{seed}" if distinct_inits else "theta",
                    },
                )
    return folder


def test_chance_line_is_the_mean_majority_rate_per_index(tmp_path):
    rows = collect(sweep(tmp_path))
    xs, rate = chance_curve(rows, "test/acc", "label_idx")
    np.testing.assert_array_equal(xs, [0, 3, 10])
    # mean over seeds 0, 1 and both modes of 0.5 + 0.02 k + 0.01 seed
    np.testing.assert_allclose(rate, [0.5 + 0.02 * k + 0.005 for k in (0, 3, 10)])
    assert chance_curve(rows, "param_distance_sq", "label_idx") is None


def test_band_label_says_what_the_repeats_span(tmp_path):
    rows = collect(sweep(tmp_path / "a"))
    assert band_label(rows, "label_idx") == "±1 std over 2 initializations"
    shared = collect(sweep(tmp_path / "b", distinct_inits=False))
    assert "sharing an initialization" in band_label(shared, "label_idx")
    for row in shared:
        del row["init_params_sha256"]
    assert "initialization not recorded" in band_label(shared, "label_idx")
    single = collect(sweep(tmp_path / "c", seeds=(0,)))
    assert band_label(single, "label_idx") == ONE_RUN
    mixed = rows + [row for row in single if row["label_idx"] == 0]  # 3 runs at k = 0
    assert band_label(mixed, "label_idx") == "±1 std over 2–3 runs sharing an initialization (seeds vary the data order)"  # fmt: skip


def test_report_page_has_tables_chance_and_figures(tmp_path):
    folder = sweep(tmp_path)
    written = write_report(folder)
    page = (folder / "report.md").read_text()
    assert folder / "report.md" in written
    assert "| eigenfunction index k | series | mean ± std | n | chance |" in page
    assert "± is 1 std over 2 initializations" in page
    # k = 10, network: mean of 0.8 and 0.81; chance 0.5 + 0.2 + 0.005
    assert "| 10 | network | 0.805 ± 0.007 | 2 | 0.705 |" in page
    assert "| 10 | linearization at θ0 | 0.805 ± 0.007 | 2 | 0.705 |" in page
    assert "None" not in page and "nan" not in page
    for line in page.splitlines():
        if line.startswith("!["):
            image = line.split("](")[1].rstrip(")")
            assert (folder / image).is_file(), image


def test_one_run_per_point_shows_the_value_alone(tmp_path, capsys):
    folder = sweep(tmp_path, seeds=(0,))
    write_report(folder)
    page = (folder / "report.md").read_text()
    assert "± 0.000" not in page and "1 std over 1" not in page
    assert "One run per point" in page
    assert "| 10 | network | 0.800 | 1 | 0.700 |" in page
    table = [line for line in page.splitlines() if line.startswith("| ")]
    assert len(table) == 7 and not any("±" in line for line in table[1:])
    with open(folder / "report_summary.csv") as f:
        assert {row["std"] for row in csv.DictReader(f)} == {""}
    printed = [line for line in capsys.readouterr().out.splitlines() if "train_ntk/" in line]
    assert len(printed) == 6 and not any("0.0000" in line for line in printed)
    [figure] = metric_figures(read_sweep(folder), "test/acc")
    stem, _ = draw_metric(figure, tmp_path / "draw")
    assert figure.band == ONE_RUN and stem.endswith("test_acc-vs-label_idx")


def test_one_run_figures_have_no_band_and_no_band_legend(tmp_path):
    from ntklab.plots import sweep_figure

    [figure] = metric_figures(read_sweep(sweep(tmp_path, seeds=(0,))), "test/acc")
    drawn = sweep_figure(figure.curves, xlabel="label_idx", ylabel="test/acc", title="t",
                         band=figure.band, chance=figure.chance)  # fmt: skip
    axes = drawn.axes[0]
    assert not [c for c in axes.collections if isinstance(c, matplotlib.collections.PolyCollection)]
    assert not any("band" in text.get_text() for text in axes.get_legend().get_texts())


def write_comparison(folder, normalizations=("ntk",)):
    for normalization in normalizations:
        for seed in (0, 1, 2):
            config = ntk_config(9, seed, False, train={"max_lr": 0.1, "lr_normalization": normalization})  # fmt: skip
            runs = {name: {"test/acc": value + 0.01 * seed, "train/acc": 1.0}
                    for name, value in (("network", 0.8), ("linear_init", 0.7),
                                        ("linear_pretrained", 0.8))}  # fmt: skip
            write_training_run(
                folder / f"{normalization}-{seed}",
                script="pretrained_ntk_comparison",
                config=config,
                metrics={"label_idx": 9, "test/majority_rate": 0.52,
                         "init_params_sha256": f"theta{seed}", "runs": runs},
            )  # fmt: skip
    return folder


def draw_comparison(folder):
    figures = metric_figures(read_sweep(folder), "test/acc")
    return figures, [draw_metric_keep(figure) for figure in figures]


def draw_metric_keep(figure):
    from ntklab.plots import sweep_figure

    return sweep_figure(figure.curves, xlabel=figure.x_key, ylabel=figure.metric,
                        title=figure.title, xscale="index", chance=figure.chance,
                        band=figure.band)  # fmt: skip


def test_comparison_at_one_index_draws_chance_bars_and_every_marker(tmp_path):
    _, [drawn] = draw_comparison(write_comparison(tmp_path))
    axes = drawn.axes[0]
    assert "learning-rate normalization: ntk" in axes.get_title()
    [chance] = [line for line in axes.get_lines() if line.get_gid() == "chance"]
    assert chance.get_ydata()[0] == pytest.approx(0.52)
    texts = [text.get_text() for text in axes.get_legend().get_texts()]
    assert "error bars: ±1 std over 3 initializations" in texts
    assert {"network (n=3)", "linearization at θ0 (n=3)", "linearization at θ_T (n=3)"} <= set(
        texts
    )
    series = [line for line in axes.get_lines() if line.get_label().endswith("(n=3)")]
    assert len({line.get_marker() for line in series}) == 3
    drawn.canvas.draw()
    centres = [line.get_transform().transform(np.c_[line.get_xdata(), line.get_ydata()])[0]
               for line in series]  # fmt: skip
    # network and θ_T have the same mean: side by side, never on top of each other
    gaps = [abs(a[0] - b[0]) for i, a in enumerate(centres) for b in centres[i + 1 :]]
    assert min(gaps) >= 3.0
    bars = [c for c in axes.collections if isinstance(c, matplotlib.collections.LineCollection)]
    spans = sorted(float(np.ptp(np.asarray(c.get_segments())[0][:, 1])) for c in bars)
    np.testing.assert_allclose(spans, [0.02] * 3)  # ±1 std of (x, x + 0.01, x + 0.02)


def test_mixed_normalizations_give_one_titled_figure_each(tmp_path):
    figures, drawn = draw_comparison(write_comparison(tmp_path, ("none", "ntk")))
    titles = sorted(figure.axes[0].get_title() for figure in drawn)
    assert len(titles) == 2
    assert "learning-rate normalization: none" in titles[0]
    assert "learning-rate normalization: ntk" in titles[1]
    assert sorted(f.group["train.lr_normalization"] for f in figures) == ["none", "ntk"]
