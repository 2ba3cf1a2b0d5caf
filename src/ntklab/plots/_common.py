"""Shared pieces of every figure: human labels, the index axis, dodged series, unresolved rugs.

Dimensions: m points, u unresolved indices.

    axis_label("test/acc")                      # "test accuracy"
    series_label("linear_init")                 # "linearization at θ0"
    index_axis(axes, indices)                   # indices [m]: symlog from a decade on, integer ticks
    unresolved_rug(axes, indices)               # indices [u]: ticks along the bottom edge
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import matplotlib.ticker
import matplotlib.transforms
import numpy as np

AXIS_LABELS = {
    "label_idx": "eigenfunction index k",
    "nad_idx": "NAD index",
    "data.num_train": "training examples",
    "test/acc": "test accuracy",
    "train/acc": "train accuracy",
    "test/loss": "test loss",
    "train/loss": "train loss",
    "param_distance_sq": "squared parameter distance ‖θ_T − θ0‖²",
    "train.lr_normalization": "learning-rate normalization",
    "train.max_lr": "peak learning rate",
    "epoch": "epoch",
}
"""Human axis labels of swept keys and metrics; see :func:`axis_label` for the others."""

SERIES_LABELS = {
    "network": "network",
    "linear": "linearization at θ0",
    "linear_nobias": "linearization at θ0 without f(θ0)",
    "linear_init": "linearization at θ0",
    "linear_pretrained": "linearization at θ_T",
}
"""Legend labels of the trained models (``mode``) and of the comparison's runs."""

SERIES_STYLES = {
    "network": ("tab:blue", "o"),
    "linear": ("tab:orange", "s"),
    "linear_init": ("tab:orange", "s"),
    "linear_nobias": ("tab:red", "D"),
    "linear_pretrained": ("tab:green", "^"),
}
"""Colour and marker of each known series, the same in every figure."""

FALLBACK_MARKERS = ("v", "P", "X", "<", ">", "h")

UNRESOLVED_LABEL = "unresolved eigenvector (gap ≤ residual)"
CHANCE_LABEL = "chance (majority class)"


def axis_label(key: str) -> str:
    """The human label of a config or metric key.

    Known keys come from ``AXIS_LABELS``; another ``split/metric`` key reads as words
    (``test/alignment_trained`` -> ``test alignment trained``); other keys are shown as they are.

    Args:
      key: e.g. ``label_idx``, ``test/acc``, ``train.max_lr``.

    Returns:
      The label, e.g. ``eigenfunction index k``, ``test accuracy``.
    """
    if key in AXIS_LABELS:
        return AXIS_LABELS[key]
    split, slash, metric = key.partition("/")
    if slash and split and metric and "." not in key:
        return f"{split} {metric.replace('_', ' ')}"
    return key


def series_label(name: str) -> str:
    """The legend label of a series (``linear_pretrained`` -> ``linearization at θ_T``)."""
    return SERIES_LABELS.get(name, name.replace("_", " "))


def series_style(name: str, position: int) -> tuple[Any, str]:
    """``(colour, marker)`` of a series: fixed for known names, by ``position`` otherwise."""
    if name in SERIES_STYLES:
        return SERIES_STYLES[name]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return colors[(position + 4) % len(colors)], FALLBACK_MARKERS[position % len(FALLBACK_MARKERS)]


def dodge(axes: Any, position: int, count: int, *, points: float = 5.0) -> Any:
    """A data transform shifted sideways by ``points`` per series, centred over ``count`` series.

    Series drawn at the same x (network and linearization at one index) stay side by side on any
    x scale, so no marker hides another.
    """
    shift = (position - (count - 1) / 2) * points / 72.0
    offset = matplotlib.transforms.ScaledTranslation(shift, 0.0, axes.figure.dpi_scale_trans)
    return axes.transData + offset


def index_axis(axes: Any, values: np.ndarray) -> None:
    """A log-like x axis for indices from 0 (symlog, linear below 1) with integer tick labels.

    Args:
      axes: the Matplotlib axes.
      values: the indices drawn [m].
    """
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


def unresolved_rug(
    axes: Any,
    positions: Sequence[float] | np.ndarray,
    *,
    top: bool = False,
    label: str | None = UNRESOLVED_LABEL,
) -> None:
    """Marks unresolved eigenvector indices with ticks along the bottom (or top) edge of the axes.

    The artist has the gid ``unresolved``; its x data are ``positions``.

    Args:
      axes: the Matplotlib axes.
      positions: x positions [u] of the unresolved indices (data coordinates).
      top: along the top edge instead (e.g. above a heatmap).
      label: its legend entry (None: none).
    """
    positions = np.asarray(positions, np.float64)
    if not positions.size:
        return
    (rug,) = axes.plot(
        positions, np.full(positions.shape, 1.0 if top else 0.0), linestyle="none",
        marker="v" if top else "|", markersize=6 if top else 9, color="0.35", clip_on=False,
        transform=axes.get_xaxis_transform(), zorder=6,
        label=label,
    )  # fmt: skip
    rug.set_gid("unresolved")


def legend_outside(axes: Any, *, below: bool = False, **kwargs: Any) -> None:
    """The legend outside the axes (to the right, or ``below`` in two columns), where it hides
    no data point."""
    if below:
        kwargs = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.16), "ncol": 2, **kwargs}
    else:
        kwargs = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), **kwargs}
    axes.legend(fontsize=7, borderaxespad=0.0, **kwargs)


class _PlainLogFormatter(matplotlib.ticker.Formatter):
    """Log-axis labels as plain numbers (``5``, ``200``, not ``5×10⁰``); minor ticks labelled
    when the axis spans less than a factor 30 (only 2 and 5 from a factor 3 on)."""

    def __init__(self, minor: bool) -> None:
        self.minor = minor

    def __call__(self, value: float, pos: int | None = None) -> str:
        if value <= 0:
            return ""
        if self.minor:
            low, high = self.axis.get_view_interval()
            mantissa = round(value / 10 ** np.floor(np.log10(value)), 6)
            if low <= 0 or high / low > 30:
                return ""
            if high / low > 3 and mantissa not in (2.0, 5.0):
                return ""
        return f"{value:g}"


def plain_log_labels(axis: Any) -> None:
    """Plain-number labels on a log-scaled axis (``axes.yaxis``)."""
    axis.set_major_formatter(_PlainLogFormatter(minor=False))
    axis.set_minor_formatter(_PlainLogFormatter(minor=True))
