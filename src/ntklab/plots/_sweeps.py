"""A metric against a swept key (mean ± spread over repeats), and one comparison run's bars.

Dimensions: m swept values, m' reference points, u unresolved indices.

    curves = {"network": (x, mean, std, count), "linear": (x, mean, std, count)}   # each [m]
    figure = sweep_figure(curves, xlabel="label_idx", ylabel="test/acc", title="lenet on digits",
                          xscale="index", chance=(x, rate), band="±1 std over 3 initializations")
    figure = comparison_figure({"network": {"test/acc": 0.9}, "linear_init": {"test/acc": 0.7}},
                               title="lenet on digits", chance={"test/acc": 0.55})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.lines
import matplotlib.patches
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from ntklab.plots._common import (
    CHANCE_LABEL,
    UNRESOLVED_LABEL,
    axis_label,
    dodge,
    index_axis,
    legend_outside,
    series_label,
    series_style,
    unresolved_rug,
)

Curve = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""``(x [m], mean [m], spread [m], count [m])`` of one series."""


def sweep_figure(
    curves: dict[str, Curve],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    xscale: str = "linear",
    chance: tuple[np.ndarray, np.ndarray] | None = None,
    band: str = "±1 std over repeats",
    reference: tuple[np.ndarray, np.ndarray, str] | None = None,
    unresolved: Sequence[float] | np.ndarray | None = None,
) -> Figure:
    """A metric against a swept key, one line per series, mean ± spread over repeats (seeds).

    Series at the same x are drawn side by side (a few points apart) with distinct markers, so
    none hides another. The spread is a shaded band, or error bars when every series has a single
    x (e.g. a comparison at one eigenfunction index); points of one run have neither.

    Args:
      curves: ``series name -> (x [m], mean [m], spread [m], count [m])``: the swept values, the
        mean over repeats, their standard deviation (NaN or 0 for one repeat: no band) and the
        number of repeats. Known names (``network``, ``linear``, ``linear_init``, ...) get
        human legend labels (:func:`series_label`).
      xlabel: the swept key (shown through :func:`axis_label`).
      ylabel: the metric key, e.g. ``test/acc``.
      title: figure title.
      xscale: ``linear``, ``log`` (sample counts) or ``index`` (indices from 0 spanning decades:
        symlog with integer ticks); ``symlog`` is read as ``index``.
      chance: ``(x [m'], rate [m'])``, the majority-class rate of the evaluated labels (what a
        constant prediction scores), drawn dashed (a horizontal line at a single x).
      band: what the band or error bars span, for the legend (``±1 std over 3 initializations``).
      reference: ``(x [m'], value [m'], label)``, a curve drawn under the points (e.g. kernel
        regression at every kept eigenvector index).
      unresolved: x values [u] to mark as unresolved eigenvectors: ticks along the bottom edge,
        and hollow markers where a series has a point.

    Returns:
      The figure; accuracy axes span from below chance to 1. Artists carry gids for readers:
      ``chance``, ``reference``, ``unresolved`` (the ticks) and ``unresolved-<series>``.
    """
    single = _single_x(curves)
    figure, axes = plt.subplots(figsize=(7.0 if single is None else 5.0, 4.6))
    marked = np.asarray([] if unresolved is None else unresolved, np.float64)
    lowest = np.inf
    if reference is not None and len(reference[0]):
        lowest = min(lowest, _draw_reference(axes, reference))
    for position, (name, curve) in enumerate(curves.items()):
        low = _draw_series(axes, name, curve, (position, len(curves)), single, marked)
        lowest = min(lowest, low)
    if chance is not None and len(chance[0]):
        lowest = min(lowest, _draw_chance(axes, chance, single))
    all_x = [np.asarray(c[0], np.float64) for c in curves.values()]
    if reference is not None:
        all_x.append(np.asarray(reference[0], np.float64))
    all_x = np.concatenate(all_x or [np.zeros(1)])
    if single is not None:
        axes.set_xticks([single], [f"{single:g}"])
        axes.set_xlim(single - 1.0, single + 1.0)
    elif xscale in ("index", "symlog"):
        index_axis(axes, all_x)
    else:
        axes.set_xscale(xscale)
    marked = marked[(marked >= all_x.min()) & (marked <= all_x.max())]  # the drawn range only
    if marked.size:
        unresolved_rug(axes, marked, label=f"{UNRESOLVED_LABEL}: ticks, hollow markers")
    if ylabel.endswith("/acc") and np.isfinite(lowest):
        axes.set_ylim(max(0.0, min(lowest, 0.5) - 0.03), 1.01)
    axes.set_xlabel(axis_label(xlabel))
    axes.set_ylabel(axis_label(ylabel))
    axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    if _has_band(curves):
        handles.append(_band_proxy(single is not None))
        labels.append(f"{'error bars' if single is not None else 'band'}: {band}")
    legend_outside(axes, handles=handles, labels=labels, below=True)
    figure.tight_layout()
    return figure


def _single_x(curves: dict[str, Curve]) -> float | None:
    """The one x of every series when each has exactly that one point, else None."""
    values = {float(x) for c in curves.values() for x in np.asarray(c[0]).ravel()}
    if curves and len(values) == 1 and all(len(c[0]) == 1 for c in curves.values()):
        return values.pop()
    return None


def _has_band(curves: dict[str, Curve]) -> bool:
    return any(
        np.any((np.asarray(count) > 1) & np.isfinite(np.asarray(spread, np.float64)))
        for _, _, spread, count in curves.values()
    )


def _band_proxy(bars: bool) -> Any:
    if bars:
        return matplotlib.lines.Line2D([], [], color="0.4", marker="|", markersize=10,
                                       linestyle="none")  # fmt: skip
    return matplotlib.patches.Patch(color="0.5", alpha=0.2)


def _draw_series(
    axes: Any,
    name: str,
    curve: Curve,
    place: tuple[int, int],
    single: float | None,
    unresolved: np.ndarray,
) -> float:
    """One series: its line and markers, band or error bars, hollow markers where unresolved.

    Returns:
      The lowest value drawn (for the accuracy axis' lower limit).
    """
    x, mean, spread = (np.asarray(a, np.float64) for a in curve[:3])
    count = np.asarray(curve[3])
    color, marker = series_style(name, place[0])
    shifted = dodge(axes, *place)
    repeats = int(np.max(count)) if len(count) else 0
    label = f"{series_label(name)} (n={repeats})" if repeats > 1 else series_label(name)
    artists = axes.plot(x, mean, marker=marker, markersize=4, linewidth=1.2, color=color,
                        label=label, zorder=3)  # fmt: skip
    banded = (count > 1) & np.isfinite(spread)
    half = np.where(banded, spread, 0.0)
    if single is not None and banded.any():
        container = axes.errorbar(x[banded], mean[banded], yerr=half[banded], fmt="none",
                                  ecolor=color, capsize=3, elinewidth=1, zorder=2)  # fmt: skip
        artists += [*container.lines[1], *container.lines[2]]
    elif banded.any():
        artists.append(axes.fill_between(x, mean - half, mean + half, color=color, alpha=0.2,
                                         linewidth=0))  # fmt: skip
    hollow = np.isin(x, unresolved)
    if hollow.any():
        (empty,) = axes.plot(x[hollow], mean[hollow], marker=marker, markersize=6,
                             markerfacecolor="white", markeredgecolor=color, linestyle="none",
                             zorder=4)  # fmt: skip
        empty.set_gid(f"unresolved-{name}")
        artists.append(empty)
    for artist in artists:  # after drawing, so the data limits stay in data units
        artist.set_transform(shifted)
    return float(np.nanmin(mean - half)) if mean.size else np.inf


def _draw_reference(axes: Any, reference: tuple[np.ndarray, np.ndarray, str]) -> float:
    """The reference curve (x [m'], value [m'], label) under everything; returns its minimum."""
    x, values, label = reference
    values = np.asarray(values, np.float64)
    (line,) = axes.plot(np.asarray(x, np.float64), values, color="0.25", linewidth=1.0,
                        alpha=0.75, zorder=1, label=label)  # fmt: skip
    line.set_gid("reference")
    return float(np.nanmin(values))


def _draw_chance(axes: Any, chance: tuple[np.ndarray, np.ndarray], single: float | None) -> float:
    """The chance line (x [m'], rate [m']), horizontal at a single x; returns its minimum."""
    x, rate = (np.asarray(a, np.float64) for a in chance)
    style = {"color": "0.35", "linestyle": "--", "linewidth": 1, "label": CHANCE_LABEL}
    if single is not None or len(x) == 1:
        line = axes.axhline(float(np.mean(rate)), **style)
    else:
        (line,) = axes.plot(x, rate, **style)
    line.set_gid("chance")
    return float(np.nanmin(rate))


def comparison_figure(
    accuracies: dict[str, dict[str, float]],
    *,
    title: str,
    chance: Mapping[str, float] | None = None,
) -> Figure:
    """Bar plot of the accuracies of several runs (one comparison run: network, linearizations).

    Args:
      accuracies: ``run name -> {"train/acc": ..., "test/acc": ...}`` (any ``split/metric`` keys).
        Known run names get human labels (``linear_init`` -> ``linearization at θ0``).
      title: figure title.
      chance: ``metric key -> majority-class rate`` of the labels it is evaluated on (e.g.
        ``{"test/acc": test/majority_rate}``), drawn as a dashed line in the metric's colour.

    Returns:
      The figure: one group of bars per run, one bar per metric, values written on the bars,
      the legend outside the axes. The chance lines carry the gid ``chance``.
    """
    names = list(accuracies)
    metrics = sorted({key for values in accuracies.values() for key in values})
    width = 0.8 / max(1, len(metrics))
    figure, axes = plt.subplots(figsize=(1.8 * len(names) + 3.5, 4))
    for m, metric in enumerate(metrics):
        heights = [accuracies[name].get(metric, np.nan) for name in names]
        bars = axes.bar(
            np.arange(len(names)) + (m - (len(metrics) - 1) / 2) * width,
            heights,
            width,
            label=axis_label(metric),
        )
        axes.bar_label(bars, fmt="%.3f", fontsize=7)
        if chance is not None and chance.get(metric) is not None:
            line = axes.axhline(
                float(chance[metric]), color=bars.patches[0].get_facecolor(), linestyle="--",
                linewidth=1.2, label=f"chance, {axis_label(metric)} (majority class)",
            )  # fmt: skip
            line.set_gid("chance")
    axes.set_xticks(np.arange(len(names)), [series_label(name) for name in names], fontsize=8)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("accuracy")
    axes.set_title(title, fontsize=9)
    axes.grid(True, axis="y", alpha=0.3)
    legend_outside(axes)
    figure.tight_layout()
    return figure
