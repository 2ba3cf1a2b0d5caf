"""How the kernel moved during training: the quotients' growth over epochs, and layer by layer.

Dimensions: T evaluated epochs (0 first), k' eigenvector indices v, L layers, K trained indices.

    figure = alignment_history_figure(epochs, indices, all_quotients, kernel_distance,
                                      trained_idx=9, title="lenet on digits")
    # epochs [T], indices [k'], all_quotients [T, k'], kernel_distance [T]
    figure = alignment_layers_figure(layers, indices, init_all, final_all, trained_idx=9,
                                     title="lenet on digits")
    # layers [L] module paths, indices [k'], init_all [L, k'], final_all [L, k']
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from ntklab.plots._common import legend_outside, plain_log_labels

DISTANCE_LABEL = "kernel distance d(t) = 1 − ⟨K₀,K_t⟩_F / (‖K₀‖_F ‖K_t‖_F)"

HistoryCurve = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]
"""``(epochs [T], distance mean [T], distance std [T], growth mean [T], growth std [T], n)``."""

LayerGrowth = tuple[np.ndarray, np.ndarray, float, int]
"""``(growth mean [L], growth std [L], whole kernel's growth, n)`` at one trained index."""


def _position(indices: np.ndarray, trained_idx: int) -> int:
    where = np.flatnonzero(np.asarray(indices) == trained_idx)
    if not where.size:
        raise ValueError(
            f"trained_idx={trained_idx} is not among the measured indices "
            f"{np.asarray(indices).tolist()}"
        )
    return int(where[0])


def _check_shapes(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(array.shape)}")


def alignment_history_figure(
    epochs: np.ndarray,
    indices: np.ndarray,
    all_quotients: np.ndarray,
    kernel_distance: np.ndarray,
    *,
    trained_idx: int,
    title: str,
    neighbours: int = 2,
) -> Figure:
    """One run's kernel during training: the quotients' growth since epoch 0, and d(t).

    Top: q_v(t) / q_v(0), the Rayleigh quotient φ_vᵀK_tφ_v/‖φ_v‖² (all samples) relative to
    epoch 0, for the trained index (bold), its ``neighbours`` nearest indices on each side and the
    median over every measured v (dashed), log scale. Bottom: the kernel distance
    d(t) = 1 − ⟨K_0, K_t⟩_F / (‖K_0‖_F ‖K_t‖_F) (0: K_t is a multiple of K_0).

    Args:
      epochs: evaluated epochs [T], 0 first.
      indices: eigenvector indices [k'].
      all_quotients: quotients of the kernel at each epoch [T, k'] (all samples).
      kernel_distance: d(t) [T].
      trained_idx: the index whose eigenvector gave the labels (one of ``indices``).
      title: figure title.
      neighbours: indices drawn on each side of the trained one.

    Returns:
      The figure, two panels sharing the epoch axis.

    Raises:
      ValueError: the shapes disagree, or ``trained_idx`` is not among ``indices``.
    """
    epochs, indices = np.asarray(epochs, np.float64), np.asarray(indices)
    quotients = np.asarray(all_quotients, np.float64)
    distance = np.asarray(kernel_distance, np.float64)
    _check_shapes("all_quotients", quotients, (len(epochs), len(indices)))
    _check_shapes("kernel_distance", distance, (len(epochs),))
    position = _position(indices, trained_idx)
    with np.errstate(divide="ignore", invalid="ignore"):
        growth = quotients / quotients[:1]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 5.5), sharex=True)
    order = np.argsort(np.abs(indices - trained_idx), kind="stable")
    nearby = sorted(int(p) for p in order[1:] if abs(indices[p] - trained_idx) <= neighbours)
    colors = plt.get_cmap("tab10")
    for n, p in enumerate(nearby):
        top.semilogy(epochs, growth[:, p], color=colors(n + 1), linewidth=1, alpha=0.8,
                     label=f"v = {indices[p]}")  # fmt: skip
    top.semilogy(epochs, np.nanmedian(growth, axis=1), color="0.4", linestyle="--",
                 linewidth=1, label=f"median over {len(indices)} indices")  # fmt: skip
    top.semilogy(epochs, growth[:, position], color="k", linewidth=2.2, marker="o",
                 markersize=3, label=f"v = {trained_idx} (trained)", zorder=4)  # fmt: skip
    top.set_ylabel("growth q_v(t) / q_v(0)")
    plain_log_labels(top.yaxis)
    bottom.plot(epochs, distance, color="tab:purple", marker="o", markersize=3, linewidth=1.2,
                label=DISTANCE_LABEL)  # fmt: skip
    bottom.set_ylabel("kernel distance d(t)")
    bottom.set_xlabel("epoch")
    for axes in (top, bottom):
        axes.grid(True, which="both", alpha=0.3)
        legend_outside(axes)
    top.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure


def short_layer_names(layers: Sequence[str]) -> list[str]:
    """Module paths without the leading components every layer shares (``params/``)."""
    parts = [str(layer).replace(".", "/").split("/") for layer in layers]
    common = 0
    while len(parts) > 1 and all(
        len(p) > common + 1 and p[common] == parts[0][common] for p in parts
    ):
        common += 1
    return ["/".join(p[common:]) for p in parts]


def alignment_layers_figure(
    layers: Sequence[str] | np.ndarray,
    indices: np.ndarray,
    init_all: np.ndarray,
    final_all: np.ndarray,
    *,
    trained_idx: int,
    title: str,
) -> Figure:
    """One run's kernel layer by layer at the trained index: growth and share of the quotient.

    The whole kernel's Rayleigh quotient is the sum of its layers' (K = Σ_l K_l), so each layer's
    share q_l / Σ q_l says which layers carry the kernel along the trained eigenvector.

    Args:
      layers: module paths [L].
      indices: eigenvector indices [k'].
      init_all: each layer's quotient of the initial kernel [L, k'] (all samples).
      final_all: each layer's quotient of the end-of-training kernel [L, k'].
      trained_idx: the index whose eigenvector gave the labels (one of ``indices``).
      title: figure title.

    Returns:
      The figure: left, each layer's growth q_l(T) / q_l(0) at the trained index (log scale) with
      the whole kernel's growth as a dashed line; right, each layer's share of the whole quotient
      at initialization and at the end of training.

    Raises:
      ValueError: the shapes disagree, or ``trained_idx`` is not among ``indices``.
    """
    names = short_layer_names(list(np.asarray(layers).tolist()))
    indices = np.asarray(indices)
    init, final = (np.asarray(a, np.float64) for a in (init_all, final_all))
    _check_shapes("init_all", init, (len(names), len(indices)))
    _check_shapes("final_all", final, (len(names), len(indices)))
    position = _position(indices, trained_idx)
    start, end = init[:, position], final[:, position]
    with np.errstate(divide="ignore", invalid="ignore"):
        growth, whole = end / start, end.sum() / start.sum()
    figure, (left, right) = plt.subplots(1, 2, figsize=(max(8.0, 0.9 * len(names) + 5), 4.2))
    places = np.arange(len(names))
    left.bar(places, np.where(growth > 0, growth, np.nan), color="tab:blue")
    left.axhline(whole, color="k", linestyle="--", linewidth=1,
                 label=f"whole kernel: {whole:.3g}×")  # fmt: skip
    left.set_yscale("log")
    plain_log_labels(left.yaxis)
    left.set_ylabel(f"growth q_l(T) / q_l(0) at v = {trained_idx}")
    width = 0.4
    right.bar(places - width / 2, start / start.sum(), width, color="tab:gray",
              label="at initialization")  # fmt: skip
    right.bar(places + width / 2, end / end.sum(), width, color="tab:red",
              label="at the end of training")  # fmt: skip
    right.set_ylabel(f"share of the whole quotient at v = {trained_idx}")
    for axes in (left, right):
        axes.set_xticks(places, names, rotation=45, ha="right", fontsize=7)
        axes.set_xlabel("layer")
        axes.grid(True, axis="y", which="both", alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure


def alignment_history_sweep_figure(
    histories: dict[int, HistoryCurve], *, title: str, band: str
) -> Figure:
    """A sweep's kernel during training: d(t), and the trained index's growth since epoch 0.

    Args:
      histories: ``trained index k -> (epochs [T], d mean [T], d std [T], growth mean [T],
        growth std [T], n)``, the mean ± std over the n seeds of d(t) and of q_k(t) / q_k(0)
        (the trained index's quotient on all samples relative to epoch 0).
      title: figure title.
      band: what the bands span, for the legend (no band where n = 1).

    Returns:
      The figure, two panels sharing the epoch axis, one line per trained index.
    """
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 5.5), sharex=True)
    trained = sorted(histories)
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, max(1, len(trained))))
    banded = False
    for color, k in zip(colors, trained, strict=True):
        epochs, d_mean, d_std, g_mean, g_std, count = histories[k]
        label = f"k = {k}" + (f" (n={count})" if count > 1 else "")
        for axes, mean, std in ((top, d_mean, d_std), (bottom, g_mean, g_std)):
            axes.plot(epochs, mean, color=color, linewidth=1.2, marker="o", markersize=2.5,
                      label=label)  # fmt: skip
            if count > 1 and np.all(np.isfinite(std)):
                axes.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2,
                                  linewidth=0)  # fmt: skip
                banded = True
    bottom.set_yscale("log")
    plain_log_labels(bottom.yaxis)
    top.set_ylabel("kernel distance d(t)")
    bottom.set_ylabel("growth q_k(t) / q_k(0), trained k")
    bottom.set_xlabel("epoch")
    for axes in (top, bottom):
        axes.grid(True, which="both", alpha=0.3)
    legend_outside(top, title="trained on" + (f"\nband: {band}" if banded else ""),
                   title_fontsize=7)  # fmt: skip
    top.set_title(f"{title}\n{DISTANCE_LABEL}", fontsize=9)
    figure.tight_layout()
    return figure


def alignment_layers_sweep_figure(
    layers: Sequence[str], growth: dict[int, LayerGrowth], *, title: str
) -> Figure:
    """A sweep's per-layer growth at each trained index: one bar chart per trained index k.

    Args:
      layers: module paths [L].
      growth: ``trained index k -> (growth mean [L], growth std [L], whole kernel's growth, n)``:
        each layer's q_l(T) / q_l(0) at v = k (mean ± std over n seeds; error bars where n > 1)
        and the whole kernel's, drawn as a dashed line.
      title: figure title.

    Returns:
      The figure: one panel per trained index (four to a row), log scale, shared y axis.
    """
    names = short_layer_names(layers)
    trained = sorted(growth)
    columns = min(4, max(1, len(trained)))
    rows = math.ceil(len(trained) / columns) if trained else 1
    figure, grid = plt.subplots(
        rows, columns, figsize=(max(3.0, 0.45 * len(names) + 1.2) * columns + 0.5, 3.0 * rows + 0.8),
        sharey=True, squeeze=False,
    )  # fmt: skip
    places = np.arange(len(names))
    for axes, k in zip(grid.ravel(), trained, strict=False):
        mean, std, whole, count = growth[k]
        errors = std if count > 1 and np.all(np.isfinite(std)) else None
        axes.bar(places, np.where(mean > 0, mean, np.nan), yerr=errors, capsize=2,
                 color="tab:blue")  # fmt: skip
        axes.axhline(whole, color="k", linestyle="--", linewidth=1, label=f"whole: {whole:.3g}×")
        axes.set_yscale("log")
        plain_log_labels(axes.yaxis)
        axes.set_title(f"trained k = {k}" + (f" (n={count})" if count > 1 else " (one run)"),
                       fontsize=8)  # fmt: skip
        axes.set_xticks(places, names, rotation=45, ha="right", fontsize=7)
        axes.grid(True, axis="y", which="both", alpha=0.3)
        axes.legend(fontsize=7)
    for axes in grid.ravel()[len(trained) :]:
        axes.set_visible(False)
    for axes in grid[:, 0]:
        axes.set_ylabel("growth q_l(T) / q_l(0) at v = k")
    figure.suptitle(f"{title}: each layer's kernel growth at the trained index", fontsize=9)
    figure.tight_layout()
    return figure
