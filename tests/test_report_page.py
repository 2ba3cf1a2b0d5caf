"""ntklab.report's results page: chance line, band label, alignment figures, report.md."""

from __future__ import annotations

import json

import numpy as np

from ntklab.plots import normalized_ratio
from ntklab.report import _alignment_figures, band_label, chance_curve, collect, report


def write_run(folder, config, **metrics):
    folder.mkdir(parents=True)
    content = {"script": "train_ntk", **metrics, "config": config}
    (folder / "metrics.json").write_text(json.dumps(content))
    (folder / "meta.json").write_text(json.dumps({"script": "train_ntk"}))


def sweep(tmp_path, *, distinct_inits: bool, alignment: bool = False):
    rng = np.random.default_rng(0)
    for label_idx in (0, 3, 10):
        for seed in (0, 1):
            for linearize in (False, True):
                folder = tmp_path / f"k{label_idx}-s{seed}-{linearize}"
                config = {"seed": seed, "label_idx": label_idx, "linearize": linearize,
                          "model": {"name": "lenet"}, "data": {"dataset": "digits"}}  # fmt: skip
                write_run(
                    folder,
                    config,
                    **{
                        "test/acc": 0.9 - 0.01 * label_idx + 0.01 * seed,
                        "test/majority_rate": 0.5 + 0.02 * label_idx + 0.01 * seed,
                        "train/majority_rate": 0.6,
                        "mode": "linear" if linearize else "network",
                        "label_idx": label_idx,
                        "init_params_sha256": f"theta{seed}" if distinct_inits else "theta",
                    },
                )
                if alignment and not linearize:
                    indices = np.arange(12)
                    init = rng.uniform(1.0, 2.0, 12)
                    final = 1000.0 * init
                    final[label_idx] *= 7.0 + seed  # the spike at the trained index
                    np.savez(folder / "alignment.npz", indices=indices, init_all=init,
                             final_all=final)  # fmt: skip
    return tmp_path


def test_chance_line_is_the_mean_majority_rate_per_index(tmp_path):
    rows = collect(sweep(tmp_path, distinct_inits=True))
    xs, rate = chance_curve(rows, "test/acc", "label_idx")
    np.testing.assert_array_equal(xs, [0, 3, 10])
    # mean over seeds 0, 1 and both modes of 0.5 + 0.02 k + 0.01 seed
    np.testing.assert_allclose(rate, [0.5 + 0.02 * k + 0.005 for k in (0, 3, 10)])
    assert chance_curve(rows, "param_distance_sq", "label_idx") is None


def test_band_label_says_whether_repeats_span_initializations(tmp_path):
    rows = collect(sweep(tmp_path / "a", distinct_inits=True))
    assert band_label(rows, "label_idx") == "±1 std over 2 initializations"
    shared = collect(sweep(tmp_path / "b", distinct_inits=False))
    assert "sharing an initialization" in band_label(shared, "label_idx")
    for row in shared:
        del row["init_params_sha256"]
    assert "initialization not recorded" in band_label(shared, "label_idx")


def test_report_page_has_tables_chance_and_figures(tmp_path):
    folder = sweep(tmp_path, distinct_inits=True, alignment=True)
    written = report(folder)
    page = (folder / "report.md").read_text()
    assert folder / "report.md" in written
    assert "| eigenfunction index k | series | mean ± std | n | chance |" in page
    assert "± is 1 std over 2 initializations" in page
    # k = 10, network: mean of 0.8 and 0.81; chance 0.5 + 0.2 + 0.005
    assert "| 10 | network | 0.805 ± 0.007 | 2 | 0.705 |" in page
    assert "None" not in page
    for line in page.splitlines():
        if line.startswith("!["):
            image = line.split("](")[1].rstrip(")")
            assert (folder / image).is_file(), image
    assert any(path.name.endswith("-alignment-heatmap.png") for path in written)


def test_alignment_figures_average_the_normalised_growth_per_trained_index(tmp_path):
    folder = sweep(tmp_path, distinct_inits=True, alignment=True)
    [(stem, group, lines, heatmap)] = _alignment_figures(folder, collect(folder))
    assert group["model.name"] == "lenet" and "alignment" not in stem
    assert len(lines.axes[0].get_legend().get_texts()) == 3  # one line per trained k
    image = heatmap.axes[0].images[0].get_array()
    assert image.shape == (3, 12)  # trained k = 0, 3, 10 by v = 0..11
    for row, k in enumerate((0, 3, 10)):
        assert int(np.argmax(image[row])) == k  # the spike sits at the trained eigenvector
    ratio = normalized_ratio(np.array([2.0, 20.0, 2.0]), np.array([1.0, 1.0, 1.0]))
    np.testing.assert_allclose(ratio, [1.0, 10.0, 1.0])
