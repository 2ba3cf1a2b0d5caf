"""Aggregating a sweep's rows: figure groups, mean ± std over repeats, chance, band labels, and
the eigenfunction study's extras (kernel regression, unresolved indices, alignment summaries).

Dimensions: m swept values, k' eigenvector indices, T epochs, L layers, u unresolved indices.

    figures = metric_figures(sweep, "test/acc")     # one MetricFigure per group
    figures[0].curves["network"]                    # (x [m], mean [m], std [m], count [m])
    figures[0].kernel_regression                    # (x [k], mean test acc [k], count [k])
    growth = alignment_growth(sweep.rows)           # per group: indices [k'], {k: ratio [k']}

Rows are grouped by script, dataset, model and every other config key that differs between runs,
except the swept x key, ``seed`` and the series key. The x key is the first of ``X_KEYS`` that
varies in the group (else the first present). The series is the model trained (``mode``) or, for
the comparison, each of its runs. With one run at a point its std is NaN (no band).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ntklab.plots import axis_label
from ntklab.report._runs import EigenRun, Sweep

X_KEYS = ("nad_idx", "label_idx", "data.num_train")
"""Swept keys that can be a figure's x axis, in order of preference."""

GROUP_KEYS = ("script", "data.dataset", "model.name")
"""Keys that always separate figures."""

IGNORED_KEYS = ("seed", "progress", "overwrite", "prerequisites", "linearize", "with_bias", "mode")
"""Config keys that never separate figures (repeats, or the series itself)."""

IGNORED_PREFIXES = ("paths.", "hydra.")

TITLE_KEYS = ("train.lr_normalization",)
"""Config keys a title always states when the group's runs share them (else they split it)."""

ONE_RUN = "one run per point (no band)"
"""The band label when every point is a single run."""

KERNEL_REGRESSION_LABEL = "kernel regression (linearization at θ0, trained to convergence)"

Curve = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""``(x [m], mean [m], std [m], count [m])`` of one series; std NaN where count is 1."""


@dataclasses.dataclass
class MetricFigure:
    """One figure of a metric against the swept key, with what its page section shows.

    Attributes:
      group: the values that define the group (``GROUP_KEYS`` and the keys that split it).
      x_key: the swept key.
      metric: the metric key.
      members: the group's rows.
      curves: ``series -> (x [m], mean [m], std [m], count [m])``.
      chance: ``(x [m], majority rate [m])`` or None.
      band: what the spread spans (:func:`band_label`).
      title: the figure title (:func:`title_of`).
      kernel_regression: ``(label_idx [k], mean test accuracy [k], count [k])`` over the group's
        sound ``compute_ntk`` runs, or None (not an eigenfunction sweep, or no run has it).
      unresolved: eigenvector indices [u] unresolved in at least one of those runs.
      eigen_runs: those ``compute_ntk`` runs (sound or not).
    """

    group: dict[str, Any]
    x_key: str
    metric: str
    members: list[dict[str, Any]]
    curves: dict[str, Curve]
    chance: tuple[np.ndarray, np.ndarray] | None
    band: str
    title: str
    kernel_regression: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    unresolved: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    eigen_runs: list[EigenRun] = dataclasses.field(default_factory=list)


def finite(value: Any) -> bool:
    """A real, finite number (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _num_distinct(rows: Sequence[dict[str, Any]], key: str) -> int:
    return len({json.dumps(row.get(key), sort_keys=True, default=str) for row in rows})


def groups(rows: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], str, list[dict]]]:
    """``(group, x_key, rows)`` per figure.

    Rows are split by ``GROUP_KEYS``; within each part the x key is the first of ``X_KEYS`` that
    varies (else the first present), and every other varying config key splits it further.

    Args:
      rows: rows from :func:`ntklab.report.collect`.

    Returns:
      One triple per figure; parts without any of ``X_KEYS`` are left out.
    """
    parts: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        parts[tuple(row.get(key) for key in GROUP_KEYS)].append(row)
    found = []
    for values, members in parts.items():
        present = [key for key in X_KEYS if any(key in row for row in members)]
        if not present:
            continue
        varying = [key for key in present if _num_distinct(members, key) > 1]
        x_key = (varying or present)[0]
        config_keys = set().union(*(row.get("_config_keys", set()) for row in members))
        split_keys = sorted(
            key
            for key in config_keys
            if any(row.get(key) != row.get(x_key) for row in members)  # not x under another name
            and key not in IGNORED_KEYS
            and key not in GROUP_KEYS
            and not key.startswith(IGNORED_PREFIXES)
            and _num_distinct(members, key) > 1
        )
        subgroups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for row in members:
            subgroups[tuple(row.get(key) for key in split_keys)].append(row)
        for split_values, subgroup in subgroups.items():
            group = dict(zip(GROUP_KEYS, values, strict=True))
            group.update(zip(split_keys, split_values, strict=True))
            found.append((group, x_key, subgroup))
    return found


def series_values(row: dict[str, Any], metric: str) -> Iterable[tuple[str, float]]:
    """(series name, value) pairs of one row: its runs for the comparison, else its mode."""
    pattern = re.compile(rf"^runs\.([^.]+)\.{re.escape(metric)}$")
    runs = [(m.group(1), row[key]) for key in row if (m := pattern.match(key))]
    if runs:
        yield from ((name, float(value)) for name, value in runs if finite(value))
        return
    if not finite(row.get(metric)):
        return
    if "mode" in row:
        series = str(row["mode"])
    elif "linearize" in row:
        series = "linear" if row["linearize"] else "network"
    else:
        series = "runs"
    yield series, float(row[metric])


def _curves(members: Sequence[dict[str, Any]], metric: str, x_key: str) -> dict[str, Curve]:
    points: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in members:
        if row.get(x_key) is None:
            continue
        for series, value in series_values(row, metric):
            points[series][float(row[x_key])].append(value)
    curves = {}
    for series in sorted(points, key=_series_order):
        xs = np.array(sorted(points[series]))
        values = [points[series][x] for x in xs]
        curves[series] = (
            xs,
            np.array([np.mean(v) for v in values]),
            np.array([np.std(v, ddof=1) if len(v) > 1 else math.nan for v in values]),
            np.array([len(v) for v in values]),
        )
    return curves


def _series_order(name: str) -> tuple[int, str]:
    known = ("network", "linear", "linear_init", "linear_pretrained", "linear_nobias")
    return (known.index(name) if name in known else len(known), name)


def summarize(rows: Sequence[dict[str, Any]], metric: str) -> list[tuple[dict, str, dict]]:
    """Groups rows into figures and aggregates ``metric`` over repeats.

    Args:
      rows: rows from :func:`ntklab.report.collect`.
      metric: a metric key such as ``test/acc``.

    Returns:
      ``(group, x_key, curves)`` per figure: the values that define the group, the x key, and
      ``series -> (x [m], mean [m], std [m], count [m])`` (std NaN where count is 1). Groups
      without the metric or without any of ``X_KEYS`` are left out.
    """
    found = []
    for group, x_key, members in groups(rows):
        curves = _curves(members, metric, x_key)
        if curves:
            found.append((group, x_key, curves))
    return found


def chance_curve(
    rows: Sequence[dict[str, Any]], metric: str, x_key: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """The chance line of ``metric``: the mean majority-class rate of the evaluated labels per x.

    A training run records ``{split}/majority_rate``, the fraction of its ``split`` labels in the
    most common class (what a constant prediction scores); for ``test/acc`` the chance line is
    the mean of ``test/majority_rate`` over the runs at each x.

    Returns:
      ``(x [m], rate [m])``, or None when no run records the rate (or the metric has no split).
    """
    split = metric.split("/")[0]
    key = f"{split}/majority_rate"
    points: dict[float, list[float]] = defaultdict(list)
    for row in rows:
        if row.get(x_key) is not None and finite(row.get(key)):
            points[float(row[x_key])].append(float(row[key]))
    if not points or "/" not in metric:
        return None
    xs = np.array(sorted(points))
    return xs, np.array([np.mean(points[x]) for x in xs])


def band_label(rows: Sequence[dict[str, Any]], x_key: str) -> str:
    """What the ±1 std band of a figure spans: initializations, or only data orders.

    Runs record ``init_params_sha256``, the digest of their initial parameters θ0. When every
    repeat at an x has its own θ0 the band spans initializations; when they share θ0 (``seed``
    changed only the minibatch order) the label says so; without the digest it says "runs".
    With a single run at every point there is no band (``ONE_RUN``).
    """
    repeats: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        series = row.get("mode", row.get("linearize"))
        repeats[(row.get(x_key), json.dumps(series, default=str))].append(row)
    if not repeats:
        return "±1 std over runs"
    counts = [len(members) for members in repeats.values()]
    low, high = min(counts), max(counts)
    if high == 1:
        return ONE_RUN
    count = str(high) if low == high else (f"up to {high}" if low == 1 else f"{low}–{high}")
    if not all("init_params_sha256" in row for row in rows):
        return f"±1 std over {count} runs (initialization not recorded)"
    distinct = min(
        len({row["init_params_sha256"] for row in members}) / len(members)
        for members in repeats.values()
    )
    if distinct == 1.0:
        return f"±1 std over {count} initializations"
    return f"±1 std over {count} runs sharing an initialization (seeds vary the data order)"


def title_of(group: dict[str, Any], members: Sequence[dict[str, Any]] = ()) -> str:
    """``lenet on digits (train_ntk), peak learning rate: 0.1``: no key whose value is missing.

    Keys of ``TITLE_KEYS`` shared by every member are stated too (the learning-rate
    normalization of a comparison), keys are shown through :func:`axis_label`.
    """
    model, dataset, script = (group.get(key) for key in ("model.name", "data.dataset", "script"))
    if dataset is None and script == "train_nads":
        dataset = "NAD tasks"
    head = " on ".join(str(part) for part in (model, dataset) if part is not None)
    if script is not None:
        head = f"{head} ({script})" if head else str(script)
    shown = {k: v for k, v in group.items() if k not in GROUP_KEYS and v is not None}
    for key in TITLE_KEYS:
        if key not in shown and members and _num_distinct(members, key) == 1:
            if members[0].get(key) is not None:
                shown[key] = members[0][key]
    return ", ".join([head, *(f"{axis_label(k)}: {v}" for k, v in shown.items())])


def figure_name(group: dict[str, Any], metric: str, x_key: str) -> str:
    """``{script}-{dataset}-{model}[-{key}={value}...]-{metric}-vs-{x key}``, file-name safe."""
    parts = [str(group[key]) for key in GROUP_KEYS if group.get(key) is not None]
    parts += [f"{key}={value}" for key, value in group.items() if key not in GROUP_KEYS]
    name = "-".join([*parts, metric, "vs", x_key])
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


def eigen_runs(members: Sequence[dict[str, Any]], sweep: Sweep) -> list[EigenRun]:
    """The ``compute_ntk`` runs the group's rows trained on (their ``meta.json``'s
    ``eigenfunctions``), each once, in row order."""
    recorded = dict.fromkeys(
        row["_eigenfunctions"] for row in members if isinstance(row.get("_eigenfunctions"), str)
    )
    return [sweep.eigenfunctions[path] for path in recorded if path in sweep.eigenfunctions]


def kernel_regression_curve(
    runs: Sequence[EigenRun],
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Kernel regression's test accuracy per eigenvector index, averaged over sound runs.

    Args:
      runs: ``compute_ntk`` runs (one per seed); damaged ones and those without
        ``kernel_regression.npz`` are skipped.

    Returns:
      ``(label_idx [k], mean test accuracy [k], count [k])`` over every index some run kept, or
      None when no run has the file.
    """
    points: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        if run.problem is not None or run.kernel_regression is None:
            continue
        indices = np.asarray(run.kernel_regression["label_idx"]).ravel()
        accuracies = np.asarray(run.kernel_regression["test_acc"], np.float64).ravel()
        for index, accuracy in zip(indices, accuracies, strict=True):
            if math.isfinite(accuracy):
                points[int(index)].append(float(accuracy))
    if not points:
        return None
    xs = np.array(sorted(points))
    return (
        xs,
        np.array([np.mean(points[x]) for x in xs]),
        np.array([len(points[x]) for x in xs]),
    )


def unresolved_union(runs: Sequence[EigenRun]) -> np.ndarray:
    """Eigenvector indices [u] unresolved (gap ≤ residual) in at least one sound run."""
    found = [run.unresolved for run in runs if run.problem is None and run.unresolved is not None]
    return np.unique(np.concatenate(found)).astype(np.int64) if found else np.zeros(0, np.int64)


def metric_figures(sweep: Sweep, metric: str) -> list[MetricFigure]:
    """Every figure of ``metric`` in the sweep, aggregated (:func:`summarize`, with extras).

    Eigenfunction sweeps of ``train_ntk`` (x key ``label_idx``) also get the kernel-regression
    curve and the unresolved indices of the ``compute_ntk`` runs their rows trained on.

    Args:
      sweep: the sweep, from :func:`ntklab.report.read_sweep`.
      metric: a metric key such as ``test/acc``.

    Returns:
      One :class:`MetricFigure` per group that has the metric.
    """
    figures = []
    for group, x_key, members in groups(sweep.rows):
        curves = _curves(members, metric, x_key)
        if not curves:
            continue
        figure = MetricFigure(
            group=group,
            x_key=x_key,
            metric=metric,
            members=members,
            curves=curves,
            chance=chance_curve(members, metric, x_key),
            band=band_label(members, x_key),
            title=title_of(group, members),
        )
        if group.get("script") == "train_ntk" and x_key == "label_idx":
            figure.eigen_runs = eigen_runs(members, sweep)
            figure.kernel_regression = kernel_regression_curve(figure.eigen_runs)
            figure.unresolved = unresolved_union(figure.eigen_runs)
        figures.append(figure)
    return figures


def summary_rows(figure: MetricFigure) -> list[dict[str, Any]]:
    """The rows of ``report_summary.csv`` (and of the page's table) for one figure.

    Returns:
      One dict per (series, x): the group's values, ``metric``, ``series``, ``x_key``, ``x``,
      ``mean``, ``std`` (NaN for one run), ``count``, ``chance``; eigenfunction sweeps add
      ``kernel_regression`` (the curve at x, NaN where absent) and ``unresolved`` (bool) when
      their ``compute_ntk`` runs record them.
    """
    chance_at = dict(zip(*figure.chance, strict=True)) if figure.chance is not None else {}
    regression = figure.kernel_regression
    regression_at = dict(zip(regression[0], regression[1], strict=True)) if regression else {}
    knows_unresolved = any(
        run.problem is None and run.unresolved is not None for run in figure.eigen_runs
    )
    rows = []
    for series, (xs, means, stds, counts) in figure.curves.items():
        for x, mean, std, count in zip(xs, means, stds, counts, strict=True):
            row = {
                **figure.group,
                "metric": figure.metric,
                "series": series,
                "x_key": figure.x_key,
                "x": x,
                "mean": mean,
                "std": std,
                "count": int(count),
                "chance": chance_at.get(float(x), math.nan),
            }
            if regression is not None:
                row["kernel_regression"] = regression_at.get(int(x), math.nan)
            if knows_unresolved:
                row["unresolved"] = bool(np.isin(int(x), figure.unresolved))
            rows.append(row)
    return rows


def mean_std(values: Sequence[np.ndarray] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std (ddof 1) over the first axis; std NaN for a single value.

    Args:
      values: n arrays of one shape [...], stacked.

    Returns:
      ``(mean [...], std [...])``.
    """
    stack = np.asarray(values, np.float64)
    with np.errstate(all="ignore"):
        mean = np.mean(stack, axis=0)
        std = np.std(stack, axis=0, ddof=1) if len(stack) > 1 else np.full(mean.shape, np.nan)
    return mean, std
