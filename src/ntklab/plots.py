"""Figures of the study, drawn with Matplotlib's non-interactive backend.

Dimensions: k eigenpairs.

    figure = spectrum_figure(eigvals, title="lenet on cifar10")   # eigvals [k]
    save_figure(figure, "spectrum.png")                          # ntklab.artifacts
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
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


def alignment_figure(
    indices: np.ndarray,
    init_eigvals: np.ndarray,
    final_quotients: np.ndarray,
    *,
    init_quotients: np.ndarray | None = None,
    trained_idx: int | None = None,
    title: str,
) -> Figure:
    """How the kernel rotated: end-of-training Rayleigh quotients against the init eigenvalues.

    Args:
      indices: eigenvector indices [k'] (x axis).
      init_eigvals: the initial eNTK's eigenvalues λ_v [k'].
      final_quotients: φ_vᵀ K_T φ_v / ‖φ_v‖² of the end-of-training kernel [k'].
      init_quotients: the same quotients of the initial kernel on the same samples [k'], if they
        differ from λ_v (train or test part of the kernel).
      trained_idx: the index whose eigenvector gave the labels, marked with a vertical line.
      title: figure title.

    Returns:
      The figure, log-scale y axis.
    """
    figure, axes = plt.subplots(figsize=(6, 4))
    series = [("init eigenvalue λ_v", init_eigvals, "C0", "-")]
    if init_quotients is not None:
        series.append(("init φᵀK₀φ/‖φ‖² (this part)", init_quotients, "C0", ":"))
    series.append(("end of training φᵀK_Tφ/‖φ‖²", final_quotients, "C3", "-"))
    for label, values, color, style in series:
        values = np.asarray(values, np.float64)
        positive = values > 0
        axes.semilogy(
            np.asarray(indices)[positive],
            values[positive],
            marker=".",
            linestyle=style,
            color=color,
            linewidth=1,
            label=label,
        )
    if trained_idx is not None:
        axes.axvline(
            trained_idx, color="k", linestyle="--", linewidth=1, label=f"trained v_{trained_idx}"
        )
    axes.set_xlabel("eigenvector index v")
    axes.set_ylabel("Rayleigh quotient")
    axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    return figure


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
) -> Figure:
    """A metric against a swept key, one line per series, mean ± spread over repeats (seeds).

    Args:
      curves: ``series name -> (x [m], mean [m], spread [m], count [m])``: the swept values, the
        mean over repeats, their standard deviation (drawn as a band, 0 for one repeat) and the
        number of repeats.
      xlabel: the swept key.
      ylabel: the metric key, e.g. ``test/acc``.
      title: figure title.
      xscale: Matplotlib x scale: ``linear``, ``log`` (e.g. ``data.num_train``) or ``symlog``
        (indices from 0 spanning decades: linear up to 1, logarithmic beyond).

    Returns:
      The figure.
    """
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, (x, mean, spread, count) in curves.items():
        x, mean, spread = (np.asarray(a, np.float64) for a in (x, mean, spread))
        repeats = int(np.max(count)) if len(count) else 0
        label = f"{name} (n={repeats})" if repeats > 1 else name
        (line,) = axes.plot(x, mean, marker="o", markersize=3, linewidth=1.2, label=label)
        axes.fill_between(x, mean - spread, mean + spread, color=line.get_color(), alpha=0.2)
    if xscale == "symlog":
        axes.set_xscale("symlog", linthresh=1.0)
    else:
        axes.set_xscale(xscale)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    return figure
