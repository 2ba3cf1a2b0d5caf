"""Drawing and saving the results page's figures (PNG for the page, PDF for papers).

Dimensions: m swept values, k kept eigenvector indices, u unresolved indices.

    stem = draw_metric(figure, out)                  # MetricFigure -> out/<stem>.png, .pdf
    stems = draw_alignment(growth, out, unresolved)  # unresolved [u]: lines and heatmap
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ntklab import artifacts
from ntklab.plots import (
    alignment_history_sweep_figure,
    alignment_layers_sweep_figure,
    alignment_sweep_figures,
    sweep_figure,
)
from ntklab.report._aggregate import KERNEL_REGRESSION_LABEL, MetricFigure, figure_name
from ntklab.report._alignment import AlignmentGrowth, AlignmentHistory, AlignmentLayers


def save(figure: Any, out: Path, stem: str) -> list[Path]:
    """Saves ``figure`` as ``out/<stem>.png`` and ``out/<stem>.pdf`` and closes it.

    Returns:
      The two paths.
    """
    paths = [out / f"{stem}.{suffix}" for suffix in ("png", "pdf")]
    for path in paths:
        artifacts.save_figure(figure, path)
    return paths


def xscale(x_key: str) -> str:
    """``log`` for sample counts, ``index`` for indices (symlog from a decade on)."""
    return "log" if x_key == "data.num_train" else "index"


def draw_metric(figure: MetricFigure, out: Path) -> tuple[str, list[Path]]:
    """Draws one metric figure: the series, chance, band, kernel regression, unresolved marks.

    Args:
      figure: the aggregated figure.
      out: the output folder.

    Returns:
      ``(stem, written)``: the file stem (``<stem>.png`` is the page's image) and the files.
    """
    reference = None
    if figure.kernel_regression is not None:
        x, accuracy, count = figure.kernel_regression
        runs = int(np.max(count))
        label = KERNEL_REGRESSION_LABEL + (f", mean of {runs} seeds" if runs > 1 else "")
        reference = (x, accuracy, label)
    plotted = sweep_figure(
        figure.curves,
        xlabel=figure.x_key,
        ylabel=figure.metric,
        title=figure.title,
        xscale=xscale(figure.x_key),
        chance=figure.chance,
        band=figure.band,
        reference=reference,
        unresolved=figure.unresolved if len(figure.unresolved) else None,
    )
    stem = figure_name(figure.group, figure.metric, figure.x_key)
    return stem, save(plotted, out, stem)


def alignment_stem(group: dict[str, Any]) -> str:
    """``{script}-{dataset}-{model}[-{key}={value}...]``: the alignment figures' common stem."""
    return figure_name(group, "alignment", "v").removesuffix("-alignment-vs-v")


def draw_alignment(
    growth: AlignmentGrowth, out: Path, unresolved: np.ndarray
) -> tuple[list[str], list[Path]]:
    """Draws a group's normalised growth: lines over v per trained k, and the (k, v) heatmap.

    Args:
      growth: the aggregated growth.
      out: the output folder.
      unresolved: unresolved eigenvector indices [u], marked on both figures.

    Returns:
      ``(stems, written)``: ``<stem>-alignment`` and ``<stem>-alignment-heatmap``, and the files.
    """
    lines, heatmap = alignment_sweep_figures(
        growth.indices, growth.ratios, title=growth.title, unresolved=unresolved
    )
    stem = alignment_stem(growth.group)
    stems = [f"{stem}-alignment", f"{stem}-alignment-heatmap"]
    return stems, save(lines, out, stems[0]) + save(heatmap, out, stems[1])


def draw_history(history: AlignmentHistory, out: Path) -> tuple[str, list[Path]]:
    """Draws a group's d(t) and trained-index growth against epoch (``<stem>-alignment-history``).

    Returns:
      ``(stem, written)``.
    """
    figure = alignment_history_sweep_figure(history.curves, title=history.title, band=history.band)
    stem = f"{alignment_stem(history.group)}-alignment-history"
    return stem, save(figure, out, stem)


def draw_layers(layers: AlignmentLayers, out: Path) -> tuple[str, list[Path]]:
    """Draws a group's per-layer growth at each trained index (``<stem>-alignment-layers``).

    Returns:
      ``(stem, written)``.
    """
    figure = alignment_layers_sweep_figure(layers.layers, layers.growth, title=layers.title)
    stem = f"{alignment_stem(layers.group)}-alignment-layers"
    return stem, save(figure, out, stem)
