"""ntklab.report on an eigenfunction sweep: kernel regression, unresolved indices, alignment
figures (growth, heatmap, history, layers) aggregated over seeds."""

from __future__ import annotations

import csv

import matplotlib.pyplot as plt
import numpy as np
import pytest
from test_report_fakes import ntk_config, write_compute_run, write_training_run

from ntklab.plots import normalized_ratio
from ntklab.report import (
    KERNEL_REGRESSION_LABEL,
    alignment_growth,
    alignment_history,
    alignment_layers,
    metric_figures,
    read_sweep,
    report,
)
from ntklab.report._figures import draw_alignment, draw_metric

NUM_EIGVECS = 12
TRAINED = (0, 3, 10)
SEEDS = (0, 1)
LAYERS = np.array(["params/Conv_0", "params/Dense_0", "params/Dense_1"])
LAYER_GROWTH = np.array([2.0, 5.0, 10.0])


@pytest.fixture(autouse=True)
def _close_figures():
    """Figures drawn without saving stay open in pyplot; close them after each test."""
    yield
    plt.close("all")


def kernel_accuracy(seed):
    """Kernel regression's test accuracy per index [k] in seed's compute run."""
    return np.linspace(0.95, 0.6, NUM_EIGVECS) + 0.02 * seed


def alignment_arrays(label_idx, seed, rng):
    init = rng.uniform(1.0, 2.0, NUM_EIGVECS)
    final = 1000.0 * init
    final[label_idx] *= 7.0 + seed  # the spike at the trained index
    epochs = np.arange(5)
    growth = 1.0 + np.outer(epochs, np.ones(NUM_EIGVECS))  # q_v(t)/q_v(0) = 1 + t
    growth[:, label_idx] = (1.0 + epochs) ** (2 + seed)
    layer_init = np.outer([0.5, 0.3, 0.2], init)
    return {
        "alignment.npz": {"indices": np.arange(NUM_EIGVECS), "init_eigvals": init,
                          "init_all": init, "final_all": final},
        "alignment_history.npz": {
            "epochs": epochs, "indices": np.arange(NUM_EIGVECS), "all": growth * init,
            "train": growth * init, "test": growth * init,
            "kernel_distance": 0.1 * epochs * (1 + seed),
        },
        "alignment_layers.npz": {
            "layers": LAYERS, "indices": np.arange(NUM_EIGVECS), "init_all": layer_init,
            "final_all": layer_init * (LAYER_GROWTH * (1 + seed))[:, None],
        },
    }  # fmt: skip


def write_eigen_sweep(art, *, regression=True, unresolved=((3, 4), (4, 7)), alignment=True):
    rng = np.random.default_rng(0)
    job = 0
    for seed in SEEDS:
        compute = write_compute_run(
            art / f"eigenfunctions/digits/lenet/seed_{seed}",
            num_eigvecs=NUM_EIGVECS,
            test_acc=kernel_accuracy(seed) if regression else None,
            unresolved=unresolved[seed],
        )
        for label_idx in TRAINED:
            for linearize in (False, True):
                mode = "linear" if linearize else "network"
                write_training_run(
                    art / f"train_ntk/digits/lenet/label_{label_idx}-{mode}-seed_{seed}-0a1b2c3d",
                    config=ntk_config(label_idx, seed, linearize),
                    metrics={
                        "test/acc": 0.8 - 0.01 * label_idx,
                        "test/majority_rate": 0.5,
                        "mode": mode,
                        "label_idx": label_idx,
                        "init_params_sha256": f"theta{seed}",
                    },
                    arrays=alignment_arrays(label_idx, seed, rng)
                    if alignment and not linearize
                    else {},
                    eigenfunctions=compute,
                    job=art / f"sweeps/train_ntk/stamp/{job}",
                )
                job += 1
    return art / "sweeps/train_ntk/stamp"


@pytest.fixture(scope="module")
def eigen_sweep(tmp_path_factory):
    return write_eigen_sweep(tmp_path_factory.mktemp("eigen") / "artifacts")


@pytest.fixture(scope="module")
def eigen_page(eigen_sweep, tmp_path_factory):
    """``(folder, files written)`` of the sweep's results page (written once)."""
    out = tmp_path_factory.mktemp("page")
    return out, report(eigen_sweep, out=out)


def test_kernel_regression_is_averaged_over_the_seeds_compute_runs(eigen_sweep, eigen_page):
    [figure] = metric_figures(read_sweep(eigen_sweep), "test/acc")
    x, mean, count = figure.kernel_regression
    np.testing.assert_array_equal(x, np.arange(NUM_EIGVECS))  # every kept index
    np.testing.assert_allclose(mean, (kernel_accuracy(0) + kernel_accuracy(1)) / 2)
    np.testing.assert_array_equal(count, [2] * NUM_EIGVECS)

    out, _ = eigen_page
    with open(out / "report_summary.csv") as f:
        rows = list(csv.DictReader(f))
    expected = (kernel_accuracy(0) + kernel_accuracy(1)) / 2
    for row in rows:
        assert float(row["kernel_regression"]) == pytest.approx(expected[int(float(row["x"]))])
    page = (out / "report.md").read_text()
    assert "| chance | kernel regression |" in page
    assert f"| 10 | network | 0.700 ± 0.000 | 2 | 0.500 | {expected[10]:.3f} |" in page
    assert KERNEL_REGRESSION_LABEL in page and "mean over 2 compute_ntk run(s)" in page


def test_the_kernel_regression_curve_is_drawn_under_the_points(eigen_sweep, tmp_path):
    from ntklab.plots import sweep_figure

    [figure] = metric_figures(read_sweep(eigen_sweep), "test/acc")
    x, mean, _ = figure.kernel_regression
    drawn = sweep_figure(figure.curves, xlabel="label_idx", ylabel="test/acc", title="t",
                         reference=(x, mean, KERNEL_REGRESSION_LABEL),
                         unresolved=figure.unresolved)  # fmt: skip
    axes = drawn.axes[0]
    [curve] = [line for line in axes.get_lines() if line.get_gid() == "reference"]
    np.testing.assert_allclose(curve.get_ydata(), mean)
    assert curve.get_label() == KERNEL_REGRESSION_LABEL
    points = [line for line in axes.get_lines() if line.get_label().startswith("network")]
    assert points and all(curve.get_zorder() < line.get_zorder() for line in points)
    _, written = draw_metric(figure, tmp_path)
    assert all(path.stat().st_size > 0 for path in written)


def test_without_kernel_regression_files_the_page_says_so(tmp_path):
    sweep = write_eigen_sweep(tmp_path / "artifacts", regression=False, alignment=False)
    [figure] = metric_figures(read_sweep(sweep), "test/acc")
    assert figure.kernel_regression is None
    report(sweep)
    page = (sweep / "report.md").read_text()
    assert "hold no kernel_regression.npz" in page and "| kernel regression |" not in page


def test_unresolved_indices_are_marked_and_listed(eigen_sweep, eigen_page):
    [figure] = metric_figures(read_sweep(eigen_sweep), "test/acc")
    np.testing.assert_array_equal(figure.unresolved, [3, 4, 7])  # union over the two seeds
    from ntklab.plots import sweep_figure

    drawn = sweep_figure(figure.curves, xlabel="label_idx", ylabel="test/acc", title="t",
                         unresolved=figure.unresolved)  # fmt: skip
    axes = drawn.axes[0]
    [rug] = [line for line in axes.get_lines() if line.get_gid() == "unresolved"]
    np.testing.assert_array_equal(rug.get_xdata(), [3, 4, 7])
    for series in ("network", "linear"):
        [hollow] = [line for line in axes.get_lines() if line.get_gid() == f"unresolved-{series}"]
        np.testing.assert_array_equal(hollow.get_xdata(), [3])  # the swept unresolved index
        assert hollow.get_markerfacecolor() == "white"

    out, _ = eigen_page
    page = (out / "report.md").read_text()
    assert "among the swept indices: 3; among all kept indices: 3–4, 7." in page
    assert "| 3 (unresolved) | network |" in page
    with open(out / "report_summary.csv") as f:
        marked = {float(row["x"]) for row in csv.DictReader(f) if row["unresolved"] == "True"}
    assert marked == {3.0}


def test_alignment_growth_is_the_mean_normalised_growth_per_trained_index(eigen_sweep):
    [growth] = alignment_growth(read_sweep(eigen_sweep).rows)
    np.testing.assert_array_equal(growth.indices, np.arange(NUM_EIGVECS))
    assert sorted(growth.ratios) == list(TRAINED) and set(growth.counts.values()) == {2}
    for k in TRAINED:
        assert int(np.argmax(growth.ratios[k])) == k
        assert growth.ratios[k][k] == pytest.approx(7.5)  # mean of 7 and 8: spike ÷ median
    ratio = normalized_ratio(np.array([2.0, 20.0, 2.0]), np.array([1.0, 1.0, 1.0]))
    np.testing.assert_allclose(ratio, [1.0, 10.0, 1.0])


def test_the_heatmap_has_one_column_per_index(eigen_sweep, tmp_path):
    sweep = read_sweep(eigen_sweep)
    [growth] = alignment_growth(sweep.rows)
    stems, written = draw_alignment(growth, tmp_path, np.array([3, 4, 7]))
    assert stems[1].endswith("-alignment-heatmap") and all(p.is_file() for p in written)
    from ntklab.plots import alignment_sweep_figures

    _, heatmap = alignment_sweep_figures(growth.indices, growth.ratios, title="t")
    image = heatmap.axes[0].images[0].get_array()
    assert image.shape == (3, NUM_EIGVECS)  # trained k = 0, 3, 10 by v = 0..11
    for row, k in enumerate(TRAINED):
        assert int(np.argmax(image[row])) == k  # the spike sits at the trained eigenvector


def test_history_and_layer_figures_average_over_seeds(eigen_sweep, eigen_page):
    rows = read_sweep(eigen_sweep).rows
    [history] = alignment_history(rows)
    assert sorted(history.curves) == list(TRAINED)
    epochs, d_mean, d_std, g_mean, _, count = history.curves[3]
    np.testing.assert_array_equal(epochs, np.arange(5))
    np.testing.assert_allclose(d_mean, 0.15 * np.arange(5))  # 0.1 t (1 + seed), seeds 0, 1
    np.testing.assert_allclose(d_std, np.std([0.1 * np.arange(5), 0.2 * np.arange(5)], axis=0, ddof=1))  # fmt: skip
    np.testing.assert_allclose(g_mean, ((1 + epochs) ** 2 + (1 + epochs) ** 3) / 2)
    assert count == 2

    [layers] = alignment_layers(rows)
    assert layers.layers == list(LAYERS)
    mean, _, whole, count = layers.growth[10]
    np.testing.assert_allclose(mean, LAYER_GROWTH * 1.5)  # growth × (1 + seed), seeds 0, 1
    np.testing.assert_allclose(whole, (0.5 * 2 + 0.3 * 5 + 0.2 * 10) * 1.5)
    assert count == 2

    out, written = eigen_page
    names = {path.name for path in written}
    for suffix in ("alignment", "alignment-heatmap", "alignment-history", "alignment-layers"):
        assert f"train_ntk-digits-lenet-{suffix}.png" in names
    page = (out / "report.md").read_text()
    assert "## kernel during training:" in page and "## kernel growth per layer:" in page
    assert "| 3 | 4 | 0.600 ± 0.283 | 75.0 ± 70.7 | 2 |" in page  # d(4); (25 + 125) / 2
    assert "| trained k | `Conv_0` | `Dense_0` | `Dense_1` | whole kernel | n |" in page
    for line in page.splitlines():
        if line.startswith("!["):
            assert (out / line.split("](")[1].rstrip(")")).is_file(), line


def test_an_alignment_file_of_another_format_is_ignored_and_the_run_kept(tmp_path, caplog):
    """A sound (verified) history file without kernel_distance, e.g. from an older version."""
    rng = np.random.default_rng(0)
    arrays = alignment_arrays(3, 0, rng)
    del arrays["alignment_history.npz"]["kernel_distance"]
    arrays["alignment_layers.npz"]["final_all"] = arrays["alignment_layers.npz"]["final_all"][:2]
    run = write_training_run(tmp_path / "run", config=ntk_config(3, 0, False),
                             metrics={"test/acc": 0.8, "mode": "network", "label_idx": 3},
                             arrays=arrays)  # fmt: skip
    with caplog.at_level("WARNING", logger="ntklab.report"):
        sweep = read_sweep(tmp_path)
    [row] = sweep.rows
    assert not sweep.damaged and set(row["_arrays"]) == {"alignment"}
    warned = " ".join(record.getMessage() for record in caplog.records)
    assert f"{run}: alignment_history.npz lacks kernel_distance" in warned
    assert "alignment_layers.npz has final_all of shape [2, 12], expected [3, 12]" in warned
    assert not alignment_history(sweep.rows) and not alignment_layers(sweep.rows)
    assert len(alignment_growth(sweep.rows)) == 1
