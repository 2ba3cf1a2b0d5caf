"""How the kernel rotated: one run's Rayleigh quotients, and a sweep's normalised growth.

Dimensions: k' eigenvector indices v, K trained indices k, u unresolved indices.

    ratio = normalized_ratio(final_all, init_all)                # [k'] growth ÷ median over v
    figure = alignment_figure(indices, init_eigvals, final_all, init_quotients=init_all,
                              trained_idx=9, title="lenet on digits")        # each [k']
    lines, heatmap = alignment_sweep_figures(indices, {0: ratio0, 9: ratio9}, title="...")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib.colors
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from ntklab.plots._common import index_axis, legend_outside, plain_log_labels, unresolved_rug

MAX_HEATMAP_COLUMNS = 1050
"""Widest heatmap drawn column by column (14 inches at ≥ 1 pixel per column even at 100 dpi);
wider sweeps are aggregated explicitly: each column is the maximum over adjacent indices."""


def normalized_ratio(final: np.ndarray, initial: np.ndarray) -> np.ndarray:
    """(φ_vᵀK_Tφ_v / φ_vᵀK_0φ_v) divided by its median over v.

    The kernel grows in every direction during training (often ~10³×); dividing by the median
    growth shows which directions grew more than the typical one (1 = typical).

    Args:
      final: quotients of the end-of-training kernel [k'].
      initial: quotients of the initial kernel [k'].

    Returns:
      The normalised growth [k'], float64.
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
    unresolved: Sequence[int] | np.ndarray | None = None,
) -> Figure:
    """How the kernel rotated during one run: the quotients, and their normalised growth.

    Top: the initial eigenvalues λ_v (a wide pale line with hollow markers, drawn underneath so it
    stays visible where the initial quotients equal it, as on all samples), the initial kernel's
    quotients φ_vᵀK_0φ_v/‖φ_v‖² on the same samples (when given) and the end-of-training quotients
    φ_vᵀK_Tφ_v/‖φ_v‖², log scale. Bottom: the growth φ_vᵀK_Tφ_v / φ_vᵀK_0φ_v divided by its median
    over v, so a direction the kernel aligned with during training stands out as a spike above 1.

    Args:
      indices: eigenvector indices [k'] (x axis).
      init_eigvals: the initial eNTK's eigenvalues λ_v [k'].
      final_quotients: φ_vᵀ K_T φ_v / ‖φ_v‖² of the end-of-training kernel [k'].
      init_quotients: the same quotients of the initial kernel on the same samples [k'] (train or
        test part of the kernel); λ_v when not given.
      trained_idx: the index whose eigenvector gave the labels, marked with a vertical line.
      title: figure title.
      unresolved: unresolved eigenvector indices [u] (gap ≤ residual), ticked along the x axis.

    Returns:
      The figure, two panels sharing the x axis, legends to the right. The eigenvalue line has
      the gid ``eigenvalues``, the initial quotients ``initial-quotients``.
    """
    indices = np.asarray(indices)
    initial = init_eigvals if init_quotients is None else init_quotients
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(7.5, 5.5), sharex=True, height_ratios=[1.3, 1.0]
    )
    series = [("initial eigenvalue λ_v", init_eigvals, "eigenvalues",
               {"color": "tab:blue", "linewidth": 4, "alpha": 0.35, "marker": "o",
                "markersize": 7, "markerfacecolor": "none", "zorder": 1})]  # fmt: skip
    if init_quotients is not None:
        series.append(("initial kernel φᵀK₀φ/‖φ‖²", init_quotients, "initial-quotients",
                       {"color": "tab:green", "linewidth": 1, "linestyle": "--", "marker": "s",
                        "markersize": 2.5, "zorder": 2}))  # fmt: skip
    series.append(("end-of-training kernel φᵀK_Tφ/‖φ‖²", final_quotients, "final-quotients",
                   {"color": "tab:red", "linewidth": 1, "marker": "^", "markersize": 3,
                    "zorder": 3}))  # fmt: skip
    for label, values, gid, style in series:
        values = np.asarray(values, np.float64)
        positive = values > 0
        (line,) = top.semilogy(indices[positive], values[positive], label=label, **style)
        line.set_gid(gid)
    ratio = normalized_ratio(final_quotients, initial)
    positive = ratio > 0
    bottom.semilogy(
        indices[positive], ratio[positive], marker=".", color="tab:purple", linewidth=1,
        label="growth φᵀK_Tφ / φᵀK₀φ ÷ median",
    )  # fmt: skip
    bottom.axhline(1.0, color="0.5", linewidth=0.8)
    if unresolved is not None:
        unresolved_rug(bottom, np.asarray(unresolved))
    for axes in (top, bottom):
        if trained_idx is not None:
            axes.axvline(
                trained_idx, color="k", linestyle=":", linewidth=1,
                label=f"trained eigenvector v = {trained_idx}",
            )  # fmt: skip
        axes.grid(True, which="both", alpha=0.3)
        legend_outside(axes)
    plain_log_labels(bottom.yaxis)
    top.set_ylabel("Rayleigh quotient")
    bottom.set_ylabel("normalised growth")
    bottom.set_xlabel("eigenvector index v")
    top.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure


def alignment_sweep_figures(
    indices: np.ndarray,
    ratios: dict[int, np.ndarray],
    *,
    title: str,
    unresolved: Sequence[int] | np.ndarray | None = None,
) -> tuple[Figure, Figure]:
    """The study's alignment figures over a sweep of trained eigenfunctions.

    Args:
      indices: eigenvector indices v [k'], ascending (the union over the runs).
      ratios: ``trained index k -> normalised growth [k']`` (φ_vᵀK_Tφ_v / φ_vᵀK_0φ_v divided by
        its median over v, averaged over repeats; NaN where a run did not measure v).
      title: figure title.
      unresolved: unresolved eigenvector indices [u], ticked along the x axis (lines) and above
        the columns (heatmap).

    Returns:
      ``(lines, heatmap)``: one line per trained k against v with a star at v = k (legend outside
      the axes, so no star hides under it); and a heatmap over (trained k, eigenvector v) on a log
      colour scale with one image column per index (up to ``MAX_HEATMAP_COLUMNS``; beyond, each
      column is the maximum over adjacent indices and the title says so), ticked at indices.
    """
    indices = np.asarray(indices)
    trained = sorted(ratios)
    marked = np.asarray([] if unresolved is None else unresolved)
    return (
        _growth_lines(indices, ratios, trained, title, marked),
        _growth_heatmap(indices, ratios, trained, title, marked),
    )


def _growth_lines(
    indices: np.ndarray, ratios: dict[int, np.ndarray], trained: list[int], title: str,
    unresolved: np.ndarray,
) -> Figure:  # fmt: skip
    """Lines of the growth [k'] against v per trained k, a star at v = k, unresolved ticks [u]."""
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, max(1, len(trained))))
    figure, axes = plt.subplots(figsize=(7.5, 4))
    for color, k in zip(colors, trained, strict=True):
        values = np.asarray(ratios[k], np.float64)
        positive = values > 0
        axes.semilogy(
            indices[positive], values[positive], color=color, linewidth=1, label=f"k = {k}"
        )
        where = np.flatnonzero(indices == k)
        if where.size and values[where[0]] > 0:
            axes.plot([k], [values[where[0]]], marker="*", markersize=10, color=color,
                      markeredgecolor="k", markeredgewidth=0.5, zorder=5, clip_on=False)  # fmt: skip
    axes.axhline(1.0, color="0.5", linewidth=0.8)
    index_axis(axes, indices)
    plain_log_labels(axes.yaxis)
    if indices.size:
        unresolved_rug(
            axes, unresolved[(unresolved >= indices.min()) & (unresolved <= indices.max())]
        )
    axes.set_xlabel("eigenvector index v (★: the trained one, v = k)")
    axes.set_ylabel("growth φ_vᵀK_Tφ_v / φ_vᵀK_0φ_v ÷ median")
    axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    legend_outside(axes, title="trained on", title_fontsize=7, ncol=1 + len(trained) // 16)
    figure.tight_layout()
    return figure


def _growth_heatmap(
    indices: np.ndarray, ratios: dict[int, np.ndarray], trained: list[int], title: str,
    unresolved: np.ndarray,
) -> Figure:  # fmt: skip
    """The growth as an image [K, k'] (rows: trained k; columns: v, or blocks of adjacent v by
    their maximum beyond ``MAX_HEATMAP_COLUMNS``), ticked at round indices."""
    matrix = np.array([np.asarray(ratios[k], np.float64) for k in trained]).reshape(
        len(trained), len(indices)
    )
    block = max(1, math.ceil(len(indices) / MAX_HEATMAP_COLUMNS))
    starts = indices[::block]
    if block > 1:  # explicit aggregation: the maximum keeps every spike
        padded = np.full((len(trained), len(starts) * block), np.nan)
        padded[:, : len(indices)] = np.where(matrix > 0, matrix, np.nan)
        with np.errstate(all="ignore"):
            matrix = np.nanmax(padded.reshape(len(trained), len(starts), block), axis=2)
    width = float(np.clip(len(starts) / 75.0, 5.0, 14.0))  # ≥ 1.3 px per column at 100 dpi
    figure, axes = plt.subplots(figsize=(width + 2.5, 0.35 * len(trained) + 2.2))
    finite = matrix[np.isfinite(matrix) & (matrix > 0)]
    low, high = (finite.min(), finite.max()) if finite.size else (1.0, 10.0)
    image = axes.imshow(
        np.where(matrix > 0, matrix, np.nan), aspect="auto", interpolation="nearest",
        cmap="magma", norm=matplotlib.colors.LogNorm(vmin=low, vmax=max(high, low * 1.01)),
        zorder=3,  # above the spines, so they hide no edge column
    )  # fmt: skip
    column = _column_of(starts)
    for row, k in enumerate(trained):
        if np.any(indices == k):
            axes.plot([column(k)], [row], marker="s", fillstyle="none", markersize=6,
                      color="cyan", zorder=4)  # fmt: skip
    if unresolved.size:
        present = unresolved[np.isin(unresolved, indices)]
        unresolved_rug(axes, [column(v) for v in present], top=True, label=None)
    axes.set_yticks(np.arange(len(trained)), [str(k) for k in trained])
    ticks = _index_ticks(starts)
    axes.set_xticks([column(v) for v in ticks], [str(v) for v in ticks])
    axes.set_xlabel("eigenvector index v")
    axes.set_ylabel("trained eigenfunction k")
    notes = ["□: v = k"] + (["▼: unresolved"] if unresolved.size else [])
    if block > 1:
        notes.append(f"each column: the max over {block} adjacent indices")
    axes.set_title(f"{title}: normalised growth ({'; '.join(notes)})", fontsize=9)
    colorbar = figure.colorbar(image, ax=axes, label="growth ÷ median")
    plain_log_labels(colorbar.ax.yaxis)
    figure.tight_layout()
    return figure


def _column_of(starts: np.ndarray) -> Any:
    """``index -> image column``: the column whose block of indices holds it."""

    def column(index: float) -> int:
        return int(np.searchsorted(starts, index, side="right")) - 1

    return column


def _index_ticks(starts: np.ndarray, max_ticks: int = 10) -> list[int]:
    """Round eigenvector indices (0, 50, 100, ...) among the heatmap's columns, for tick labels."""
    if not len(starts):
        return []
    low, high = int(starts[0]), int(starts[-1])
    locator = matplotlib.ticker.MaxNLocator(nbins=max_ticks, integer=True, steps=[1, 2, 5, 10])
    candidates = [int(v) for v in locator.tick_values(low, high) if low <= v <= high]
    step = int(starts[1] - starts[0]) if len(starts) > 1 else 1
    present = [v for v in candidates if step > 1 or np.any(starts == v)]
    return present or [low]
