"""Collect a sweep's results into one CSV and draw the study's figures.

    python -m ntklab.report multirun/train_ntk/2025-01-01/12-00-00
    python -m ntklab.report multirun/ --out figures --metric test/acc --metric train/acc

Every finished run below the folder (``metrics.json`` and ``meta.json``, as the training
scripts write them) becomes one row of ``report.csv``: the run's resolved config as dotted keys
(``label_idx``, ``data.num_train``, ``train.max_lr``, ...), its metrics (``test/acc``, ``train/acc``,
``param_distance_sq``, ...; the comparison's as ``runs.<run>.test/acc``) and ``run_dir``.
Unfinished runs (a run folder without ``meta.json``: killed, failed or still running) are skipped
with a warning that lists each folder, in the log and in the printed output.

Figures: rows are grouped by script, dataset, model and every other config key that differs
between runs, except the swept x key, ``seed`` and the series key. The x key is the first of
``X_KEYS`` that varies in the group (else the first present): ``nad_idx`` for NAD sweeps,
``label_idx`` for eigenfunction sweeps, ``data.num_train`` for CIFAR-2. One line per series: the model trained (``mode``: network,
linear, linear_nobias) or, for the comparison, each of its runs. Each point is the mean over the
runs at that x (seeds), with a band of ± one standard deviation. The figures are
``{script}-{dataset}-{model}[-{key}={value}...]-{metric}-vs-{x key}.png`` and ``.pdf``, next to
``report.csv`` and ``report_summary.csv`` (the plotted means, deviations, counts and chance).
The chance line is the mean majority-class rate of the evaluated labels (``test/majority_rate``,
recorded by every training run); the legend says what the band spans: initializations when the
repeats have distinct ``init_params_sha256``, otherwise that they share θ0. For eigenfunction
sweeps whose network runs saved ``alignment.npz`` the study's alignment figures are drawn too: the
normalised growth φ_vᵀK_Tφ_v / φ_vᵀK_0φ_v ÷ median against v, one line per trained index k, and
a heatmap over (k, v). ``report.md`` gathers every figure with its table (mean ± std, n, chance),
readable on GitHub.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ntklab import artifacts
from ntklab.plots import alignment_sweep_figures, axis_label, normalized_ratio, sweep_figure

logger = logging.getLogger(__name__)

X_KEYS = ("nad_idx", "label_idx", "data.num_train")
"""Swept keys that can be a figure's x axis, in order of preference."""

GROUP_KEYS = ("script", "data.dataset", "model.name")
"""Keys that always separate figures."""

IGNORED_KEYS = ("seed", "progress", "overwrite", "prerequisites", "linearize", "with_bias", "mode")
"""Config keys that never separate figures (repeats, or the series itself)."""

IGNORED_PREFIXES = ("paths.", "hydra.")

FIRST_COLUMNS = ("script", "run_dir", *X_KEYS, "mode", "seed", "test/acc", "train/acc")


RUN_MARKERS = (".hydra", "metrics.jsonl", "metrics.json", "config.json", "checkpoints")
"""Entries that make a folder a run folder; it is finished once ``meta.json`` exists."""


def find_runs(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """The run folders below ``folder``: finished training runs and unfinished runs.

    A run folder holds one of ``RUN_MARKERS`` (folders inside a run folder belong to it); it is
    finished once the training script wrote ``meta.json`` (last, after ``metrics.json``). A
    finished folder without ``metrics.json`` (e.g. a ``compute_ntk`` run) is not a training run
    and is left out of both lists.

    Args:
      folder: a multirun folder (or any folder holding run folders).

    Returns:
      ``(metrics_paths, unfinished)``: the ``metrics.json`` of every finished training run, and
      every unfinished run folder, both sorted.
    """
    folder = Path(folder)
    finished, unfinished = [], []
    runs: list[Path] = []
    for path in sorted([folder, *folder.rglob("*")]):  # parents before their children
        relative = path.relative_to(folder).parts
        if any(part.startswith(".") for part in relative) or not path.is_dir():
            continue
        if any(run in path.parents for run in runs):  # e.g. the comparison's runs/<name>/
            continue
        if not any((path / marker).exists() for marker in RUN_MARKERS):
            continue
        runs.append(path)
        if not (path / artifacts.META_FILE).is_file():
            unfinished.append(path)
        elif (path / "metrics.json").is_file():
            finished.append(path / "metrics.json")
    return finished, unfinished


def collect(folder: str | Path) -> list[dict[str, Any]]:
    """Reads the ``metrics.json`` of every finished run below ``folder`` into flat rows.

    Unfinished runs (no ``meta.json``) are skipped with a warning naming each folder.

    Args:
      folder: a multirun folder (or any folder holding run folders).

    Returns:
      One dict per run: dotted config keys, metric keys, ``run_dir`` (relative to ``folder``)
      and the private ``_config_keys`` (the set of keys that came from the config).

    Raises:
      FileNotFoundError: no finished run below ``folder``.
    """
    folder = Path(folder)
    paths, unfinished = find_runs(folder)
    for path in unfinished:
        logger.warning("skipping unfinished run %s (no %s)", path, artifacts.META_FILE)
    if not paths:
        found = f"; {len(unfinished)} unfinished run(s) skipped" if unfinished else ""
        raise FileNotFoundError(
            f"no finished run below {folder}{found}: expected run folders with metrics.json and "
            f"{artifacts.META_FILE} written by train_ntk.py, train_nads.py, train_cifar.py or "
            "pretrained_ntk_comparison.py (e.g. a multirun folder)"
        )
    rows = []
    for path in paths:
        content = artifacts.load_json(path)
        config = _flatten(content.pop("config", {}))
        row = {**config, **_flatten(content)}
        row["run_dir"] = str(path.parent.relative_to(folder)) or "."
        row["_config_keys"] = set(config)
        rows.append(row)
    return rows


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    if isinstance(tree, list):
        return {prefix[:-1]: json.dumps(tree)}
    return {prefix[:-1]: tree}


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Writes the rows as CSV, the most useful columns first, the rest sorted."""
    columns = sorted({key for row in rows for key in row if not key.startswith("_")})
    columns = [c for c in FIRST_COLUMNS if c in columns] + [
        c for c in columns if c not in FIRST_COLUMNS
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    with artifacts.atomic_path(path) as temp:
        temp.write_text(buffer.getvalue())


def summarize(
    rows: Sequence[dict[str, Any]], metric: str
) -> list[tuple[dict[str, Any], str, dict[str, tuple[np.ndarray, ...]]]]:
    """Groups rows into figures and aggregates ``metric`` over repeats.

    Args:
      rows: rows from :func:`collect`.
      metric: a metric key such as ``test/acc``.

    Returns:
      ``(group, x_key, curves)`` per figure: the values that define the group, the x key, and
      ``series -> (x [m], mean [m], std [m], count [m])``. Groups without the metric or without
      any of ``X_KEYS`` are left out.
    """
    return [(group, x_key, curves) for group, x_key, _, curves in _figures(rows, metric)]


def _figures(
    rows: Sequence[dict[str, Any]], metric: str
) -> list[tuple[dict[str, Any], str, list[dict], dict[str, tuple[np.ndarray, ...]]]]:
    """:func:`summarize`, keeping each figure's rows."""
    figures = []
    for group, x_key, members in _groups(rows):
        points: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        for row in members:
            if row.get(x_key) is None:
                continue
            for series, value in _series_values(row, metric):
                points[series][float(row[x_key])].append(value)
        if not points:
            continue
        curves = {}
        for series in sorted(points):
            xs = np.array(sorted(points[series]))
            values = [points[series][x] for x in xs]
            curves[series] = (
                xs,
                np.array([np.mean(v) for v in values]),
                np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]),
                np.array([len(v) for v in values]),
            )
        figures.append((group, x_key, members, curves))
    return figures


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
        if row.get(x_key) is not None and _finite(row.get(key)):
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
    """
    repeats: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        series = row.get("mode", row.get("linearize"))
        repeats[(row.get(x_key), json.dumps(series, default=str))].append(row)
    if not repeats:
        return "±1 std over runs"
    count = max(len(members) for members in repeats.values())
    if not all("init_params_sha256" in row for row in rows):
        return f"±1 std over {count} runs (initialization not recorded)"
    distinct = min(
        len({row["init_params_sha256"] for row in members}) / len(members)
        for members in repeats.values()
    )
    if distinct == 1.0:
        return f"±1 std over {count} initialization{'s' if count != 1 else ''}"
    return f"±1 std over {count} runs sharing an initialization (seeds vary the data order)"


def _groups(rows: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], str, list[dict]]]:
    """``(group, x_key, rows)`` per figure.

    Rows are split by ``GROUP_KEYS``; within each part the x key is the first of ``X_KEYS`` that
    varies (else the first present), and every other varying config key splits it further.
    """
    parts: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        parts[tuple(row.get(key) for key in GROUP_KEYS)].append(row)
    groups = []
    for values, members in parts.items():
        present = [key for key in X_KEYS if any(key in row for row in members)]
        if not present:
            continue
        varying = [key for key in present if _num_distinct(members, key) > 1]
        x_key = (varying or present)[0]
        config_keys = set().union(*(row["_config_keys"] for row in members))
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
            groups.append((group, x_key, subgroup))
    return groups


def _num_distinct(rows: Sequence[dict[str, Any]], key: str) -> int:
    return len({json.dumps(row.get(key), sort_keys=True, default=str) for row in rows})


def _series_values(row: dict[str, Any], metric: str) -> Iterable[tuple[str, float]]:
    """(series name, value) pairs of one row: its runs for the comparison, else its mode."""
    pattern = re.compile(rf"^runs\.([^.]+)\.{re.escape(metric)}$")
    runs = [(m.group(1), row[key]) for key in row if (m := pattern.match(key))]
    if runs:
        yield from ((name, float(value)) for name, value in runs if _finite(value))
        return
    if not _finite(row.get(metric)):
        return
    if "mode" in row:
        series = str(row["mode"])
    elif "linearize" in row:
        series = "linear" if row["linearize"] else "network"
    else:
        series = "runs"
    yield series, float(row[metric])


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _xscale(x_key: str, curves: dict[str, tuple[np.ndarray, ...]]) -> str:
    """``log`` for sample counts, ``index`` for indices (symlog from a decade on, integer ticks)."""
    if x_key == "data.num_train":
        return "log"
    return "index"  # symlog once the indices span a decade; integer ticks always


def _figure_name(group: dict[str, Any], metric: str, x_key: str) -> str:
    parts = [str(group[key]) for key in GROUP_KEYS if group.get(key) is not None]
    parts += [f"{key}={value}" for key, value in group.items() if key not in GROUP_KEYS]
    name = "-".join([*parts, metric, "vs", x_key])
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


def report(
    folder: str | Path, *, out: str | Path | None = None, metrics: Sequence[str] = ("test/acc",)
) -> list[Path]:
    """Writes ``report.csv``, ``report_summary.csv``, the figures and ``report.md`` of a sweep.

    Args:
      folder: the multirun folder.
      out: where to write (default: ``folder``).
      metrics: metric keys to plot, one figure per group and metric.

    Returns:
      The files written.

    Raises:
      FileNotFoundError: no ``metrics.json`` below ``folder``.
    """
    folder = Path(folder)
    out = Path(folder if out is None else out)
    rows = collect(folder)
    unfinished = find_runs(folder)[1]
    written = [out / "report.csv", out / "report_summary.csv"]
    write_csv(rows, written[0])
    summary_rows, sections = [], []
    for metric in metrics:
        for group, x_key, members, curves in _figures(rows, metric):
            title = _title(group)
            chance = chance_curve(members, metric, x_key)
            band = band_label(members, x_key)
            figure = sweep_figure(
                curves,
                xlabel=x_key,
                ylabel=metric,
                title=title,
                xscale=_xscale(x_key, curves),
                chance=chance,
                band=band,
            )
            stem = _figure_name(group, metric, x_key)
            for suffix in ("png", "pdf"):
                artifacts.save_figure(figure, out / f"{stem}.{suffix}")
                written.append(out / f"{stem}.{suffix}")
            chance_at = dict(zip(*chance, strict=True)) if chance is not None else {}
            table = []
            for series, (xs, means, stds, counts) in curves.items():
                for x, mean, std, count in zip(xs, means, stds, counts, strict=True):
                    row = {
                        **{k: v for k, v in group.items()},
                        "metric": metric,
                        "series": series,
                        "x_key": x_key,
                        "x": x,
                        "mean": mean,
                        "std": std,
                        "count": count,
                        "chance": chance_at.get(float(x), math.nan),
                    }
                    summary_rows.append(row)
                    table.append(row)
            sections.append((f"{axis_label(metric)}: {title}", f"{stem}.png", band, table))
    for stem, group, lines, heatmap in _alignment_figures(folder, rows):
        for name, figure in ((f"{stem}-alignment", lines), (f"{stem}-alignment-heatmap", heatmap)):
            for suffix in ("png", "pdf"):
                artifacts.save_figure(figure, out / f"{name}.{suffix}")
                written.append(out / f"{name}.{suffix}")
        caption = f"kernel alignment: {_title(group)}"
        sections.append((caption, f"{stem}-alignment.png", None, []))
        sections.append((caption + " (heatmap)", f"{stem}-alignment-heatmap.png", None, []))
    for row in summary_rows:
        row["_config_keys"] = set()
    write_csv(summary_rows, written[1])
    written.append(out / "report.md")
    _write_page(written[-1], folder, len(rows), unfinished, sections)
    _print_table(summary_rows)
    if unfinished:
        print(f"warning: skipped {len(unfinished)} unfinished run(s) (no {artifacts.META_FILE}):")
        for path in unfinished:
            print(f"  {path}")
    return written


def _title(group: dict[str, Any]) -> str:
    """``lenet on cifar10 (train_ntk), train.max_lr=0.1``: no key whose value is missing."""
    model, dataset, script = (group.get(key) for key in ("model.name", "data.dataset", "script"))
    if dataset is None and script == "train_nads":
        dataset = "NAD tasks"
    head = " on ".join(str(part) for part in (model, dataset) if part is not None)
    if script is not None:
        head = f"{head} ({script})" if head else str(script)
    rest = [f"{k}={v}" for k, v in group.items() if k not in GROUP_KEYS and v is not None]
    return ", ".join([head, *rest])


def _alignment_figures(folder: Path, rows: Sequence[dict[str, Any]]) -> list[tuple]:
    """``(stem, group, lines, heatmap)`` per eigenfunction sweep whose network runs saved
    ``alignment.npz``: the normalised growth φ_vᵀK_Tφ_v / φ_vᵀK_0φ_v ÷ median over v (all
    samples), averaged over repeats, per trained index k."""
    runs = [
        row
        for row in rows
        if row.get("script") == "train_ntk"
        and row.get("label_idx") is not None
        and (folder / row["run_dir"] / "alignment.npz").is_file()
    ]
    figures = []
    for group, _, members in _groups(runs):
        per_index: dict[int, list[np.ndarray]] = defaultdict(list)
        common: np.ndarray | None = None
        loaded = []
        for row in members:
            arrays = artifacts.load_arrays(folder / row["run_dir"] / "alignment.npz")
            if "final_all" not in arrays or "init_all" not in arrays:
                continue
            loaded.append((int(row["label_idx"]), arrays))
            indices = arrays["indices"]
            common = indices if common is None else np.intersect1d(common, indices)
        if common is None or not len(common):
            continue
        for label_idx, arrays in loaded:
            keep = np.isin(arrays["indices"], common)
            ratio = normalized_ratio(arrays["final_all"][keep], arrays["init_all"][keep])
            per_index[label_idx].append(ratio)
        ratios = {k: np.mean(values, axis=0) for k, values in sorted(per_index.items())}
        lines, heatmap = alignment_sweep_figures(common, ratios, title=_title(group))
        stem = re.sub(r"[^A-Za-z0-9_.=-]+", "_", _figure_name(group, "alignment", "v"))
        figures.append((stem.removesuffix("-alignment-vs-v"), group, lines, heatmap))
    return figures


def _write_page(
    path: Path, folder: Path, num_runs: int, unfinished: Sequence[Path], sections: list[tuple]
) -> None:
    """``report.md``: per figure its table (mean ± std, n, chance) and the image."""
    lines = [f"# Results: `{folder}`", "", f"{num_runs} finished runs."]
    if unfinished:
        lines += ["", f"**{len(unfinished)} unfinished run(s) skipped** (no meta.json):"]
        lines += [f"- `{run}`" for run in unfinished]
    for caption, image, band, table in sections:
        lines += ["", f"## {caption}", "", f"![{caption}]({image})", ""]
        if band:
            lines += [f"Mean over repeats; ± is {band.removeprefix('±')}.", ""]
        if table:
            x_key = table[0]["x_key"]
            lines += [
                f"| {axis_label(x_key)} | series | mean ± std | n | chance |",
                "|--:|---|--:|--:|--:|",
            ]
            for row in table:
                chance = "" if not _finite(row["chance"]) else f"{row['chance']:.3f}"
                lines.append(
                    f"| {row['x']:g} | {row['series']} | {row['mean']:.3f} ± {row['std']:.3f} | "
                    f"{row['count']} | {chance} |"
                )
    with artifacts.atomic_path(path) as temp:
        temp.write_text("\n".join(lines) + "\n")


def _print_table(rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        print("no figure: no run has a swept key among " + ", ".join(X_KEYS))
        return
    print(f"{'figure':<40} {'series':<18} {'x':>10} {'mean':>8} {'std':>8} {'n':>4}")
    for row in rows:
        figure = f"{row.get('script')}/{row.get('model.name')}/{row['metric']}"
        print(
            f"{figure:<40} {row['series']:<18} {row['x']:>10g} {row['mean']:>8.4f} "
            f"{row['std']:>8.4f} {row['count']:>4d}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m ntklab.report FOLDER [--out DIR] [--metric KEY ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m ntklab.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("folder", type=Path, help="multirun folder holding run folders")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: FOLDER)")
    parser.add_argument(
        "--metric",
        action="append",
        dest="metrics",
        help="metric key to plot, repeatable (default: test/acc)",
    )
    args = parser.parse_args(argv)
    written = report(args.folder, out=args.out, metrics=args.metrics or ["test/acc"])
    print(f"wrote {len(written)} files to {written[0].parent}")


if __name__ == "__main__":
    main()
