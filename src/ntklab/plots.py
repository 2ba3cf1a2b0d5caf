"""Figures of the study, drawn with Matplotlib's non-interactive backend.

Dimensions: k eigenpairs.

    figure = spectrum_figure(eigvals, title="lenet on cifar10")   # eigvals [k]
    save_figure(figure, "spectrum.png")                          # ntklab.artifacts
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure


def spectrum_figure(eigvals: np.ndarray, *, title: str) -> Figure:
    """Eigenvalues [k] (descending) on a log scale against their index."""
    figure, axes = plt.subplots(figsize=(5.5, 4))
    index = np.arange(len(eigvals))
    positive = eigvals > 0
    axes.semilogy(index[positive], eigvals[positive], marker=".", linestyle="-", linewidth=1)
    axes.set_xlabel("eigenvalue index k")
    axes.set_ylabel("eigenvalue λ_k")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    return figure


def nads_figure(
    directions: np.ndarray,
    eigvals: np.ndarray,
    *,
    shape: tuple[int, int, int],
    title: str,
    columns: int = 6,
) -> Figure:
    """Neural anisotropy directions as images next to their 2-D Fourier magnitudes, plus spectrum.

    Each direction v [H, W, C] is drawn as an image (one channel: diverging colormap centred at 0;
    several channels: min-max scaled RGB of the first three) beside |FFT2(v)|, fftshifted so the
    zero frequency is in the centre and averaged over channels, as the NADs paper shows them.

    Args:
      directions: the directions to draw [k, D], one per row, D = H·W·C.
      eigvals: squared singular values of all directions [D'], descending (D' >= k).
      shape: image shape [H, W, C].
      title: figure title.
      columns: (image, spectrum) pairs per row.

    Returns:
      The figure: ceil(k / columns) rows of pairs, then the spectrum on a log scale.
    """
    count = len(directions)
    rows = max(1, -(-count // columns))
    figure = plt.figure(figsize=(2.0 * columns, 1.1 * rows + 2.6))
    grid = figure.add_gridspec(rows + 1, 2 * columns, height_ratios=[1.0] * rows + [2.2])
    for k, direction in enumerate(directions):
        image = np.asarray(direction, np.float64).reshape(shape)
        magnitude = np.fft.fftshift(np.abs(np.fft.fft2(image, axes=(0, 1))), axes=(0, 1))
        row, col = divmod(k, columns)
        image_axes = figure.add_subplot(grid[row, 2 * col])
        if shape[2] == 1:
            limit = max(np.abs(image).max(), np.finfo(np.float64).tiny)
            image_axes.imshow(image[..., 0], cmap="RdBu_r", vmin=-limit, vmax=limit)
        else:
            rgb = image[..., :3]
            span = max(rgb.max() - rgb.min(), np.finfo(np.float64).tiny)
            image_axes.imshow((rgb - rgb.min()) / span)
        image_axes.set_title(f"NAD {k}", fontsize=7, pad=2)
        fft_axes = figure.add_subplot(grid[row, 2 * col + 1])
        fft_axes.imshow(magnitude.mean(axis=2), cmap="magma")
        fft_axes.set_title("|FFT|", fontsize=7, pad=2)
        for axes in (image_axes, fft_axes):
            axes.set_xticks([])
            axes.set_yticks([])
    spectrum_axes = figure.add_subplot(grid[rows, :])
    index = np.arange(len(eigvals))
    positive = eigvals > 0
    spectrum_axes.semilogy(index[positive], eigvals[positive], linewidth=1)
    spectrum_axes.set_xlabel("NAD index")
    spectrum_axes.set_ylabel("squared singular value σ²")
    spectrum_axes.grid(True, which="both", alpha=0.3)
    figure.suptitle(title)
    return figure


AXIS_LABELS = {
    "label_idx": "eigenfunction index k",
    "nad_idx": "NAD index",
    "data.num_train": "training examples",
    "test/acc": "test accuracy",
    "train/acc": "train accuracy",
    "test/loss": "test loss",
    "train/loss": "train loss",
}
"""Human axis labels of swept keys and metrics; other keys are shown as they are."""


def axis_label(key: str) -> str:
    """The axis label of a config or metric key (e.g. ``label_idx`` -> eigenfunction index k)."""
    return AXIS_LABELS.get(key, key)


def normalized_ratio(final: np.ndarray, initial: np.ndarray) -> np.ndarray:
    """(φ_vᵀK_Tφ_v / φ_vᵀK_0φ_v) divided by its median over v [k'].

    The kernel grows in every direction during training (often ~10³×); dividing by the median
    growth shows which directions grew more than the typical one (1 = typical).
    """
    ratio = np.asarray(final, np.float64) / np.asarray(initial, np.float64)
    finite = ratio[np.isfinite(ratio) & (ratio > 0)]
    return ratio / np.median(finite) if finite.size else ratio


def alignment_figure(
    indices: np.ndarray,
    init_eigvals: np.ndarray,
    final_quotients: np.ndarray,
    *,
    init_quotients: np.ndarray | None = None,
    trained_idx: int | None = None,
    title: str,
) -> Figure:
    """How the kernel rotated during one run: the quotients, and their normalised growth.

    Top: the initial eigenvalues λ_v, the initial kernel's quotients φ_vᵀK_0φ_v/‖φ_v‖² on the
    same samples (when given) and the end-of-training quotients φ_vᵀK_Tφ_v/‖φ_v‖², log scale.
    Bottom: the growth φ_vᵀK_Tφ_v / φ_vᵀK_0φ_v divided by its median over v, so a direction
    the kernel aligned with during training stands out as a spike above 1.

    Args:
      indices: eigenvector indices [k'] (x axis).
      init_eigvals: the initial eNTK's eigenvalues λ_v [k'].
      final_quotients: φ_vᵀ K_T φ_v / ‖φ_v‖² of the end-of-training kernel [k'].
      init_quotients: the same quotients of the initial kernel on the same samples [k'] (train or
        test part of the kernel); λ_v when not given.
      trained_idx: the index whose eigenvector gave the labels, marked with a vertical line.
      title: figure title.

    Returns:
      The figure, two panels sharing the x axis.
    """
    indices = np.asarray(indices)
    initial = init_eigvals if init_quotients is None else init_quotients
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(6, 5.5), sharex=True, height_ratios=[1.3, 1.0]
    )
    series = [("initial eigenvalue λ_v", init_eigvals, "tab:blue", "-", "o")]
    if init_quotients is not None:
        series.append(("initial kernel φᵀK₀φ/‖φ‖²", init_quotients, "tab:green", "--", "s"))
    series.append(("end-of-training kernel φᵀK_Tφ/‖φ‖²", final_quotients, "tab:red", "-", "^"))
    for label, values, color, style, marker in series:
        values = np.asarray(values, np.float64)
        positive = values > 0
        top.semilogy(
            indices[positive], values[positive], marker=marker, markersize=3, linestyle=style,
            color=color, linewidth=1, label=label,
        )  # fmt: skip
    ratio = normalized_ratio(final_quotients, initial)
    positive = ratio > 0
    bottom.semilogy(
        indices[positive], ratio[positive], marker=".", color="tab:purple", linewidth=1,
        label="growth φᵀK_Tφ / φᵀK₀φ ÷ median",
    )  # fmt: skip
    bottom.axhline(1.0, color="0.5", linewidth=0.8)
    for axes in (top, bottom):
        if trained_idx is not None:
            axes.axvline(
                trained_idx, color="k", linestyle=":", linewidth=1,
                label=f"trained eigenvector v = {trained_idx}",
            )  # fmt: skip
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7)
    top.set_ylabel("Rayleigh quotient")
    bottom.set_ylabel("normalised growth")
    bottom.set_xlabel("eigenvector index v")
    top.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure


def alignment_sweep_figures(
    indices: np.ndarray, ratios: dict[int, np.ndarray], *, title: str
) -> tuple[Figure, Figure]:
    """The study's alignment figures over a sweep of trained eigenfunctions.

    Args:
      indices: eigenvector indices v [k'] shared by every run.
      ratios: ``trained index k -> normalised growth [k']`` (φ_vᵀK_Tφ_v / φ_vᵀK_0φ_v divided by
        its median over v, averaged over repeats).
      title: figure title.

    Returns:
      ``(lines, heatmap)``: one line per trained k against v with k marked, and a heatmap over
      (trained k, eigenvector v) on a log colour scale.
    """
    indices = np.asarray(indices)
    trained = sorted(ratios)
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, max(1, len(trained))))
    lines, axes = plt.subplots(figsize=(6.5, 4))
    for color, k in zip(colors, trained, strict=True):
        values = np.asarray(ratios[k], np.float64)
        positive = values > 0
        axes.semilogy(
            indices[positive], values[positive], color=color, linewidth=1, label=f"k = {k}"
        )
        if k in indices:
            position = int(np.searchsorted(indices, k))
            axes.plot([k], [values[position]], marker="*", markersize=9, color=color)
    axes.axhline(1.0, color="0.5", linewidth=0.8)
    _index_axis(axes, indices)
    axes.set_xlabel("eigenvector index v (★: the trained one, v = k)")
    axes.set_ylabel("growth φ_vᵀK_Tφ_v / φ_vᵀK_0φ_v ÷ median")
    axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, title="trained on", title_fontsize=7, ncol=2)
    lines.tight_layout()

    matrix = np.array([np.asarray(ratios[k], np.float64) for k in trained])
    heatmap, axes = plt.subplots(figsize=(6.5, 0.35 * len(trained) + 2.2))
    finite = matrix[np.isfinite(matrix) & (matrix > 0)]
    low, high = (finite.min(), finite.max()) if finite.size else (1.0, 10.0)
    image = axes.imshow(
        np.where(matrix > 0, matrix, np.nan), aspect="auto", interpolation="nearest",
        cmap="magma", norm=matplotlib.colors.LogNorm(vmin=low, vmax=max(high, low * 1.01)),
    )  # fmt: skip
    for row, k in enumerate(trained):
        if k in indices:
            axes.plot([int(np.searchsorted(indices, k))], [row], marker="s", fillstyle="none",
                      markersize=6, color="cyan")  # fmt: skip
    axes.set_yticks(np.arange(len(trained)), [str(k) for k in trained])
    ticks = np.unique(np.linspace(0, len(indices) - 1, min(len(indices), 8)).round().astype(int))
    axes.set_xticks(ticks, [str(indices[t]) for t in ticks])
    axes.set_xlabel("eigenvector index v")
    axes.set_ylabel("trained eigenfunction k")
    axes.set_title(f"{title}: normalised growth (□: v = k)", fontsize=9)
    heatmap.colorbar(image, ax=axes, label="growth ÷ median")
    heatmap.tight_layout()
    return lines, heatmap


def _index_axis(axes: Any, values: np.ndarray) -> None:
    """A log-like x axis for indices from 0 (symlog, linear below 1) with integer tick labels."""
    values = np.asarray(values, np.float64)
    if values.size and values.max() >= 10:
        axes.set_xscale("symlog", linthresh=1.0, linscale=0.5)
    candidates = [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
    top = values.max() if values.size else 1
    ticks = [t for t in candidates if t <= top * 1.05]
    if top > 1.3 * ticks[-1]:  # label the largest index too (e.g. 9 after 5)
        ticks.append(int(top))
    axes.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    axes.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%d"))
    axes.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def comparison_figure(accuracies: dict[str, dict[str, float]], *, title: str) -> Figure:
    """Bar plot of the accuracies of several runs.

    Args:
      accuracies: ``run name -> {"train/acc": ..., "test/acc": ...}`` (any ``split/metric`` keys).
      title: figure title.

    Returns:
      The figure: one group of bars per run, one bar per metric, values written on the bars.
    """
    names = list(accuracies)
    metrics = sorted({key for values in accuracies.values() for key in values})
    width = 0.8 / max(1, len(metrics))
    figure, axes = plt.subplots(figsize=(1.8 * len(names) + 2, 4))
    for m, metric in enumerate(metrics):
        heights = [accuracies[name].get(metric, np.nan) for name in names]
        bars = axes.bar(
            np.arange(len(names)) + (m - (len(metrics) - 1) / 2) * width,
            heights,
            width,
            label=metric,
        )
        axes.bar_label(bars, fmt="%.3f", fontsize=7)
    axes.set_xticks(np.arange(len(names)), names)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("accuracy")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7, loc="lower right")
    axes.grid(True, axis="y", alpha=0.3)
    return figure


def sweep_figure(
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    xscale: str = "linear",
    chance: tuple[np.ndarray, np.ndarray] | None = None,
    band: str = "±1 std over repeats",
) -> Figure:
    """A metric against a swept key, one line per series, mean ± spread over repeats (seeds).

    Args:
      curves: ``series name -> (x [m], mean [m], spread [m], count [m])``: the swept values, the
        mean over repeats, their standard deviation (drawn as a band, 0 for one repeat) and the
        number of repeats.
      xlabel: the swept key (shown through :func:`axis_label`).
      ylabel: the metric key, e.g. ``test/acc``.
      title: figure title.
      xscale: ``linear``, ``log`` (sample counts) or ``index`` (indices from 0 spanning decades:
        symlog with integer ticks); ``symlog`` is read as ``index``.
      chance: ``(x [m'], rate [m'])``, the majority-class rate of the evaluated labels (what a
        constant prediction scores), drawn as a dashed line.
      band: what the shaded band is, for the legend (e.g. ``±1 std over 3 initializations``).

    Returns:
      The figure; accuracy axes span from below chance to 1.
    """
    figure, axes = plt.subplots(figsize=(6, 4))
    lowest = np.inf
    for name, (x, mean, spread, count) in curves.items():
        x, mean, spread = (np.asarray(a, np.float64) for a in (x, mean, spread))
        repeats = int(np.max(count)) if len(count) else 0
        label = f"{name} (n={repeats})" if repeats > 1 else name
        (line,) = axes.plot(x, mean, marker="o", markersize=3, linewidth=1.2, label=label)
        axes.fill_between(x, mean - spread, mean + spread, color=line.get_color(), alpha=0.2)
        lowest = min(lowest, float(np.nanmin(mean - spread)) if mean.size else np.inf)
    if chance is not None and len(chance[0]):
        axes.plot(
            np.asarray(chance[0], np.float64), np.asarray(chance[1], np.float64), color="0.35",
            linestyle="--", linewidth=1, label="chance (majority class)",
        )  # fmt: skip
        lowest = min(lowest, float(np.nanmin(chance[1])))
    if any(int(np.max(c)) > 1 for *_, c in curves.values() if len(c)):
        axes.fill_between([], [], [], color="0.5", alpha=0.2, label=f"band: {band}")
    all_x = np.concatenate([np.asarray(c[0], np.float64) for c in curves.values()] or [[0.0]])
    if xscale in ("index", "symlog"):
        _index_axis(axes, all_x)
    else:
        axes.set_xscale(xscale)
    if ylabel.endswith("/acc") and np.isfinite(lowest):
        axes.set_ylim(max(0.0, min(lowest, 0.5) - 0.03), 1.01)
    axes.set_xlabel(axis_label(xlabel))
    axes.set_ylabel(axis_label(ylabel))
    axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure
