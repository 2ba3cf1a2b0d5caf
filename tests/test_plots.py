"""ntklab.plots: what each figure draws (data, labels, visibility), checked on the artists and
on rendered pixels."""

from __future__ import annotations

import matplotlib.collections
import matplotlib.pyplot as plt
import numpy as np
import pytest

from ntklab.plots import (
    CHANCE_LABEL,
    alignment_figure,
    alignment_history_figure,
    alignment_layers_figure,
    alignment_sweep_figures,
    axis_label,
    comparison_figure,
    series_label,
    short_layer_names,
    sweep_figure,
)


@pytest.fixture(autouse=True)
def _close_figures():
    """Figures drawn without saving stay open in pyplot; close them after each test."""
    yield
    plt.close("all")


def test_axis_and_series_labels_are_human_words():
    assert axis_label("test/acc") == "test accuracy"
    assert axis_label("label_idx") == "eigenfunction index k"
    assert axis_label("test/alignment_trained") == "test alignment trained"
    assert axis_label("train.lr_normalization") == "learning-rate normalization"
    assert series_label("linear_init") == "linearization at θ0"
    assert series_label("linear_pretrained") == "linearization at θ_T"
    assert series_label("some_run") == "some run"


def test_comparison_figure_has_chance_and_human_legend_labels():
    accuracies = {
        "network": {"train/acc": 1.0, "test/acc": 0.81},
        "linear_init": {"train/acc": 0.97, "test/acc": 0.7},
        "linear_pretrained": {"train/acc": 1.0, "test/acc": 0.8},
    }
    figure = comparison_figure(accuracies, title="t", chance={"test/acc": 0.52, "train/acc": 0.6})
    axes = figure.axes[0]
    ticks = [label.get_text() for label in axes.get_xticklabels()]
    assert ticks == ["network", "linearization at θ0", "linearization at θ_T"]
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert "test accuracy" in legend and "train accuracy" in legend
    assert not any("/" in text for text in legend)
    chance = sorted(line.get_ydata()[0] for line in axes.get_lines() if line.get_gid() == "chance")
    assert chance == pytest.approx([0.52, 0.6])
    heights = sorted(round(p.get_height(), 3) for p in axes.patches)
    assert heights == [0.7, 0.8, 0.81, 0.97, 1.0, 1.0]


def test_the_initial_eigenvalues_stay_visible_under_equal_initial_quotients():
    """On all samples φᵀK₀φ/‖φ‖² equals λ_v: the eigenvalue line is drawn wider, beneath, with
    hollow markers larger than the quotients' filled ones, so both show."""
    indices = np.arange(20)
    eigvals = np.linspace(3.0, 1.0, 20)
    figure = alignment_figure(indices, eigvals, 1000 * eigvals, init_quotients=eigvals.copy(),
                              trained_idx=4, title="t", unresolved=[2])  # fmt: skip
    top, bottom = figure.axes[:2]
    [eigen] = [line for line in top.get_lines() if line.get_gid() == "eigenvalues"]
    [initial] = [line for line in top.get_lines() if line.get_gid() == "initial-quotients"]
    np.testing.assert_allclose(eigen.get_ydata(), initial.get_ydata())
    assert eigen.get_zorder() < initial.get_zorder()
    assert eigen.get_linewidth() >= 3 * initial.get_linewidth()
    assert eigen.get_markerfacecolor() == "none"
    assert eigen.get_markersize() > 2 * initial.get_markersize()
    [rug] = [line for line in bottom.get_lines() if line.get_gid() == "unresolved"]
    np.testing.assert_array_equal(rug.get_xdata(), [2])


def heatmap_of(num_indices, trained=(0, 7)):
    """A heatmap whose columns alternate 1 and 100 in every row."""
    values = np.where(np.arange(num_indices) % 2 == 0, 1.0, 100.0)
    _, heatmap = alignment_sweep_figures(np.arange(num_indices), {k: values for k in trained},
                                         title="t")  # fmt: skip
    return heatmap


def bright_runs(figure, axes, row_fraction):
    """Bright stretches along one pixel row of the rendered axes (each column of 100 is one)."""
    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(float)
    box = axes.get_window_extent()
    row = round(pixels.shape[0] - (box.y1 - row_fraction * box.height))
    line = pixels[row, int(np.ceil(box.x0)) : int(np.floor(box.x1))].mean(axis=1)
    bright = line > 128
    return int(np.sum(bright[1:] & ~bright[:-1]) + bright[0])


@pytest.mark.parametrize("num_indices", [40, 500])
def test_the_heatmap_draws_every_column(num_indices):
    """A 500-eigenvector sweep once lost columns (the largest spike among them) to resampling."""
    heatmap = heatmap_of(num_indices)
    axes = heatmap.axes[0]
    assert axes.images[0].get_array().shape == (2, num_indices)
    assert axes.images[0].get_interpolation() == "nearest"
    # quarter of the way down the first row, away from the □ marks at the row centres
    assert bright_runs(heatmap, axes, 0.125) == num_indices // 2


def test_the_heatmap_is_ticked_at_round_eigenvector_indices():
    heatmap = heatmap_of(500)
    axes = heatmap.axes[0]
    heatmap.canvas.draw()
    labels = [int(label.get_text()) for label in axes.get_xticklabels()]
    positions = axes.get_xticks()
    assert len(labels) >= 4 and all(label % 50 == 0 for label in labels)
    np.testing.assert_array_equal(np.arange(500)[positions.astype(int)], labels)


def test_a_very_wide_heatmap_is_aggregated_by_the_maximum_and_says_so():
    values = np.ones(3000)
    values[1234] = 50.0  # one spike
    _, heatmap = alignment_sweep_figures(np.arange(3000), {0: values}, title="t")
    axes = heatmap.axes[0]
    image = np.ma.getdata(axes.images[0].get_array())
    assert image.shape == (1, 1000) and np.nanmax(image) == 50.0
    assert image[0, 1234 // 3] == 50.0
    assert "max over 3 adjacent indices" in axes.get_title()


def test_the_trained_stars_are_not_under_the_legend():
    values = {k: np.where(np.arange(60) == k, 20.0, 1.0) for k in (0, 30, 59)}
    lines, _ = alignment_sweep_figures(np.arange(60), values, title="t")
    axes = lines.axes[0]
    lines.canvas.draw()
    legend = axes.get_legend().get_window_extent()
    stars = [line for line in axes.get_lines() if line.get_marker() == "*"]
    assert len(stars) == 3
    for star in stars:
        x, y = star.get_transform().transform(np.c_[star.get_xdata(), star.get_ydata()])[0]
        assert not legend.contains(x, y)
        assert axes.get_window_extent().x0 <= x <= axes.get_window_extent().x1 + 1


def test_alignment_history_figure_draws_growth_since_epoch_0_and_the_distance():
    epochs, indices = np.arange(6), np.arange(10)
    quotients = np.outer(1.0 + epochs, np.linspace(2.0, 1.0, 10))  # [T, k']
    quotients[:, 4] *= (1.0 + epochs) ** 2
    distance = 0.05 * epochs
    figure = alignment_history_figure(epochs, indices, quotients, distance, trained_idx=4,
                                      title="t")  # fmt: skip
    top, bottom = figure.axes[:2]
    [trained] = [line for line in top.get_lines() if line.get_label() == "v = 4 (trained)"]
    np.testing.assert_allclose(trained.get_ydata(), (1.0 + epochs) ** 3)
    neighbours = {line.get_label() for line in top.get_lines()}
    assert {"v = 2", "v = 3", "v = 5", "v = 6"} <= neighbours and "v = 7" not in neighbours
    [d] = bottom.get_lines()
    np.testing.assert_allclose(d.get_ydata(), distance)
    with pytest.raises(ValueError, match=r"trained_idx=12 is not among"):
        alignment_history_figure(epochs, indices, quotients, distance, trained_idx=12, title="t")
    with pytest.raises(ValueError, match=r"all_quotients must have shape \[6, 10\]"):
        alignment_history_figure(epochs, indices, quotients[:, :5], distance, trained_idx=4,
                                 title="t")  # fmt: skip


def test_alignment_layers_figure_draws_each_layers_growth_and_share():
    layers = ["params/Conv_0", "params/Dense_0", "params/Dense_1"]
    indices = np.arange(5)
    init = np.outer([0.5, 0.3, 0.2], np.linspace(2.0, 1.0, 5))  # [L, k']
    final = init * np.array([[2.0], [5.0], [10.0]])
    figure = alignment_layers_figure(layers, indices, init, final, trained_idx=3, title="t")
    left, right = figure.axes[:2]
    np.testing.assert_allclose([p.get_height() for p in left.patches], [2.0, 5.0, 10.0])
    [whole] = [line for line in left.get_lines() if line.get_label().startswith("whole")]
    np.testing.assert_allclose(whole.get_ydata()[0], 0.5 * 2 + 0.3 * 5 + 0.2 * 10)
    shares = np.array([p.get_height() for p in right.patches]).reshape(2, 3)
    np.testing.assert_allclose(shares[0], [0.5, 0.3, 0.2])
    np.testing.assert_allclose(shares[1], np.array([1.0, 1.5, 2.0]) / 4.5)
    assert [label.get_text() for label in left.get_xticklabels()] == ["Conv_0", "Dense_0", "Dense_1"]  # fmt: skip
    with pytest.raises(ValueError, match=r"init_all must have shape \[3, 5\]"):
        alignment_layers_figure(layers, indices, init[:2], final, trained_idx=3, title="t")


def test_short_layer_names_drop_the_shared_prefix():
    assert short_layer_names(["params/a/kernel", "params/b/kernel"]) == ["a/kernel", "b/kernel"]
    assert short_layer_names(["Dense_0"]) == ["Dense_0"]


def test_sweep_figure_draws_chance_reference_and_band_where_repeated():
    curves = {
        "network": (np.array([0, 1, 2]), np.array([0.9, 0.8, 0.7]), np.array([0.01, 0.02, np.nan]),
                    np.array([3, 3, 1])),
        "linear": (np.array([0, 1, 2]), np.array([0.8, 0.7, 0.6]), np.full(3, np.nan),
                   np.array([1, 1, 1])),
    }  # fmt: skip
    figure = sweep_figure(curves, xlabel="label_idx", ylabel="test/acc", title="t",
                          xscale="index", chance=(np.array([0, 1, 2]), np.full(3, 0.5)),
                          band="±1 std over 3 initializations",
                          reference=(np.arange(10), np.linspace(0.95, 0.6, 10), "kernel"))  # fmt: skip
    axes = figure.axes[0]
    assert axes.get_xlabel() == "eigenfunction index k" and axes.get_ylabel() == "test accuracy"
    bands = [c for c in axes.collections if isinstance(c, matplotlib.collections.PolyCollection)]
    assert len(bands) == 1  # network only: the linearization has one run per point
    texts = [text.get_text() for text in axes.get_legend().get_texts()]
    assert "band: ±1 std over 3 initializations" in texts and CHANCE_LABEL in texts
    assert "network (n=3)" in texts and "linearization at θ0" in texts
    [reference] = [line for line in axes.get_lines() if line.get_gid() == "reference"]
    assert len(reference.get_xdata()) == 10
