"""Writing the results: ``report.csv``, ``report_summary.csv``, ``report.md`` and the printed table.

Dimensions: m swept values, k' eigenvector indices, L layers.

    write_csv(sweep.rows, out / "report.csv")
    sections = [metric_section(figure, stem), ...]
    write_page(out / "report.md", sweep, sections)

``report.md`` is readable on GitHub: what was left out first (unfinished, damaged, unverified
runs), then per figure its image, notes and table (mean ± std, n, chance).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ntklab import artifacts
from ntklab.plots import MAX_HEATMAP_COLUMNS, axis_label, series_label, short_layer_names
from ntklab.report._aggregate import (
    KERNEL_REGRESSION_LABEL,
    ONE_RUN,
    X_KEYS,
    MetricFigure,
    finite,
    summary_rows,
)
from ntklab.report._alignment import AlignmentGrowth, AlignmentHistory, AlignmentLayers
from ntklab.report._runs import EigenRun, Sweep

FIRST_COLUMNS = ("script", "run_dir", "job", *X_KEYS, "mode", "seed", "test/acc", "train/acc")


@dataclasses.dataclass
class Section:
    """One figure of the page: its caption, image file, notes (paragraphs) and table lines."""

    caption: str
    image: str
    notes: list[str] = dataclasses.field(default_factory=list)
    table: list[str] = dataclasses.field(default_factory=list)


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Writes the rows as CSV, the most useful columns first, the rest sorted; private keys
    (``_``-prefixed) are left out, NaN is an empty cell."""
    columns = sorted({key for row in rows for key in row if not key.startswith("_")})
    columns = [c for c in FIRST_COLUMNS if c in columns] + [
        c for c in columns if c not in FIRST_COLUMNS
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if _is_nan(v) else v for k, v in row.items()})
    with artifacts.atomic_path(path) as temp:
        temp.write_text(buffer.getvalue())


def _is_nan(value: Any) -> bool:
    return isinstance(value, float | np.floating) and bool(np.isnan(value))


def value_text(mean: float, std: float, count: int) -> str:
    """``0.805 ± 0.007``, or ``0.805`` alone for one run (no spread to show)."""
    if count > 1 and finite(float(std)):
        return f"{mean:.3f} ± {std:.3f}"
    return f"{mean:.3f}"


def band_note(band: str) -> str:
    """The sentence under a figure saying what its ± spans."""
    if band == ONE_RUN:
        return "One run per point: each value is a single run (no band, no ±)."
    return f"Mean over repeats; ± is {band.removeprefix('±')}."


def index_ranges(indices: Sequence[int] | np.ndarray) -> str:
    """``0, 3–5, 9``: sorted indices with runs of consecutive ones collapsed."""
    values = sorted({int(v) for v in np.asarray(indices).ravel()})
    parts, start = [], None
    for position, value in enumerate(values):
        start = value if start is None else start
        if position + 1 == len(values) or values[position + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}–{value}")
            start = None
    return ", ".join(parts)


def _eigen_notes(figure: MetricFigure) -> list[str]:
    """Notes on the kernel-regression curve and the unresolved indices of an eigenfunction sweep."""
    notes = []
    sound = [run for run in figure.eigen_runs if run.problem is None]
    for run in figure.eigen_runs:
        if run.problem is not None:
            notes.append(f"Left out of the curve and the marks: {run.problem}.")
    if figure.kernel_regression is not None:
        with_file = sum(run.kernel_regression is not None for run in sound)
        notes.append(
            f"Grey line: {KERNEL_REGRESSION_LABEL}: the test accuracy of kernel regression with "
            "the initial eNTK (ridge → 0) on the sign labels of every kept eigenvector, mean over "
            f"{with_file} compute_ntk run(s); the table's last column is its value at each index."
        )
    elif sound:
        notes.append(
            "No kernel-regression curve: the compute_ntk runs hold no kernel_regression.npz "
            "(older runs)."
        )
    if any(run.unresolved is not None for run in sound) and not len(figure.unresolved):
        notes.append(
            "Every kept eigenvector is resolved (gap > residual in each seed's compute_ntk run)."
        )
    elif any(run.unresolved is not None for run in sound):
        swept = {int(x) for curve in figure.curves.values() for x in curve[0]}
        among = [v for v in figure.unresolved if int(v) in swept]
        notes.append(
            "Unresolved eigenvectors (gap ≤ residual in the compute_ntk run of at least one "
            "seed: members of a near-degenerate eigenspace, whose eigenvalue is meaningful but "
            "whose vector, hence its labels, is not reproducible): among the swept indices: "
            f"{index_ranges(among) or 'none'}; among all kept indices: "
            f"{index_ranges(figure.unresolved) or 'none'}. Marked by ticks along the x axis and "
            "hollow markers."
        )
    return notes


def metric_section(figure: MetricFigure, stem: str) -> tuple[Section, list[dict[str, Any]]]:
    """The page section of a metric figure, and its rows of ``report_summary.csv``.

    Args:
      figure: the aggregated figure.
      stem: its image's file stem.

    Returns:
      ``(section, summary rows)``; the table shows the value alone for one run.
    """
    rows = summary_rows(figure)
    regression = "kernel_regression" in (rows[0] if rows else {})
    header = f"| {axis_label(figure.x_key)} | series | mean ± std | n | chance |"
    table = [
        header + (" kernel regression |" if regression else ""),
        "|--:|---|--:|--:|--:|" + ("--:|" if regression else ""),
    ]
    for row in rows:
        x = f"{row['x']:g}" + (" (unresolved)" if row.get("unresolved") else "")
        chance = f"{row['chance']:.3f}" if finite(row["chance"]) else ""
        line = (
            f"| {x} | {series_label(row['series'])} | "
            f"{value_text(row['mean'], row['std'], row['count'])} | {row['count']} | {chance} |"
        )
        if regression:
            value = row["kernel_regression"]
            line += f" {value:.3f} |" if finite(value) else "  |"
        table.append(line)
    notes = [band_note(figure.band), *_eigen_notes(figure)]
    caption = f"{axis_label(figure.metric)}: {figure.title}"
    return Section(caption, f"{stem}.png", notes, table), rows


def alignment_sections(
    growth: AlignmentGrowth, stems: list[str], unresolved: np.ndarray
) -> list[Section]:
    """The page sections of a group's normalised-growth lines and heatmap.

    Args:
      growth: the aggregated growth.
      stems: the lines' and the heatmap's file stems.
      unresolved: unresolved eigenvector indices [u] (marked on the figures).
    """
    table = ["| trained k | growth at v = k (÷ median over v) | n |", "|--:|--:|--:|"]
    for k, ratio in growth.ratios.items():
        where = np.flatnonzero(growth.indices == k)
        value = f"{ratio[where[0]]:.3g}" if where.size and finite(float(ratio[where[0]])) else ""
        table.append(f"| {k} | {value} | {growth.counts[k]} |")
    notes = [
        "Growth φ_vᵀK_Tφ_v / φ_vᵀK_0φ_v of the initial eigenvectors' Rayleigh quotients (all "
        "samples), divided by its median over v and averaged over seeds; ★ marks v = k."
    ]
    if len(unresolved):
        notes.append(f"Ticks: unresolved eigenvectors ({index_ranges(unresolved)}).")
    heatmap_notes = ["One column per eigenvector index; □ marks v = k."]
    if len(growth.indices) > MAX_HEATMAP_COLUMNS:
        heatmap_notes = [
            f"{len(growth.indices)} indices: each column is the maximum over adjacent indices "
            "(the title says how many), so no spike is lost; □ marks v = k."
        ]
    caption = f"kernel alignment: {growth.title}"
    return [
        Section(caption, f"{stems[0]}.png", notes, table),
        Section(caption + " (heatmap)", f"{stems[1]}.png", heatmap_notes),
    ]


def history_section(history: AlignmentHistory, stem: str) -> Section:
    """The page section of a group's d(t) and trained-index growth against epoch."""
    table = [
        "| trained k | last epoch | kernel distance d(T) | growth q_k(T) / q_k(0) | n |",
        "|--:|--:|--:|--:|--:|",
    ]
    for k, (epochs, d_mean, d_std, g_mean, g_std, count) in history.curves.items():
        table.append(
            f"| {k} | {epochs[-1]:g} | {value_text(d_mean[-1], d_std[-1], count)} | "
            f"{_growth_text(g_mean[-1], g_std[-1], count)} | {count} |"
        )
    notes = [
        "Top: the kernel distance d(t) = 1 − ⟨K_0,K_t⟩_F / (‖K_0‖_F ‖K_t‖_F); bottom: the "
        "trained index's Rayleigh quotient (all samples) relative to epoch 0. "
        + band_note(history.band)
    ]
    caption = f"kernel during training: {history.title}"
    return Section(caption, f"{stem}.png", notes, table)


def _growth_text(mean: float, std: float, count: int) -> str:
    """``20.0 ± 0.3``: three significant digits of the mean, the std to the same decimals."""
    mean, std = float(mean), float(std)
    if not finite(mean):
        return ""
    decimals = max(0, 2 - math.floor(math.log10(abs(mean)))) if mean else 3
    if count > 1 and finite(std):
        return f"{mean:.{decimals}f} ± {std:.{decimals}f}"
    return f"{mean:.{decimals}f}"


def layers_section(layers: AlignmentLayers, stem: str) -> Section:
    """The page section of a group's per-layer growth at each trained index."""
    names = short_layer_names(layers.layers)
    table = [
        "| trained k | " + " | ".join(f"`{name}`" for name in names) + " | whole kernel | n |",
        "|--:|" + "--:|" * (len(names) + 2),
    ]
    for k, (mean, std, whole, count) in layers.growth.items():
        cells = " | ".join(_growth_text(m, s, count) for m, s in zip(mean, std, strict=True))
        table.append(f"| {k} | {cells} | {whole:.3g} | {count} |")
    notes = [
        "Each layer's kernel growth q_l(T) / q_l(0) at the trained eigenvector v = k (the layers' "
        "quotients sum to the whole kernel's), mean over seeds; dashed: the whole kernel's."
    ]
    caption = f"kernel growth per layer: {layers.title}"
    return Section(caption, f"{stem}.png", notes, table)


def _left_out(sweep: Sweep, eigen: Sequence[EigenRun]) -> list[str]:
    lines = []
    if sweep.unfinished:
        lines += ["", f"**{len(sweep.unfinished)} unfinished run(s) skipped** (no meta.json):"]
        lines += [f"- `{run}`" for run in sweep.unfinished]
    if sweep.damaged:
        lines += [
            "",
            f"**{len(sweep.damaged)} damaged run(s) left out** of every table and figure (a file "
            "differs from the size and sha256 its meta.json records, is missing or is not valid "
            "JSON; recompute them):",
        ]
        lines += [f"- `{run}`: {reason}" for run, reason in sweep.damaged]
    if sweep.unverified:
        lines += [
            "",
            f"**{len(sweep.unverified)} run(s) not verified** (their meta.json records no "
            "file digests: older runs):",
        ]
        lines += [f"- `{run}`" for run in sweep.unverified]
    damaged_eigen = [run for run in eigen if run.problem is not None]
    if damaged_eigen:
        lines += ["", "**eigenfunction runs left out** (no kernel-regression curve or marks):"]
        lines += [f"- {run.problem}" for run in damaged_eigen]
    return lines


def write_page(path: Path, sweep: Sweep, sections: Sequence[Section]) -> None:
    """``report.md``: what was left out, then per figure its image, notes and table."""
    lines = [f"# Results: `{sweep.folder}`", "", f"{len(sweep.rows)} finished runs."]
    lines += _left_out(sweep, list(sweep.eigenfunctions.values()))
    for section in sections:
        lines += ["", f"## {section.caption}", "", f"![{section.caption}]({section.image})"]
        for note in section.notes:
            lines += ["", note]
        if section.table:
            lines += ["", *section.table]
    with artifacts.atomic_path(path) as temp:
        temp.write_text("\n".join(lines) + "\n")


def print_summary(rows: Sequence[dict[str, Any]]) -> None:
    """Prints the summary table (std blank for one run)."""
    if not rows:
        print("no figure: no run has a swept key among " + ", ".join(X_KEYS))
        return
    print(f"{'figure':<40} {'series':<18} {'x':>10} {'mean':>8} {'std':>8} {'n':>4}")
    for row in rows:
        figure = f"{row.get('script')}/{row.get('model.name')}/{row['metric']}"
        std = f"{row['std']:>8.4f}" if row["count"] > 1 and finite(row["std"]) else " " * 8
        print(
            f"{figure:<40} {row['series']:<18} {row['x']:>10g} {row['mean']:>8.4f} "
            f"{std} {row['count']:>4d}"
        )


def print_left_out(sweep: Sweep) -> None:
    """Prints the unfinished, damaged and unverified runs, one per line."""
    if sweep.unfinished:
        print(f"warning: skipped {len(sweep.unfinished)} unfinished run(s) (no meta.json):")
        for path in sweep.unfinished:
            print(f"  {path}")
    if sweep.damaged:
        print(f"warning: left out {len(sweep.damaged)} damaged run(s):")
        for path, reason in sweep.damaged:
            print(f"  {path}: {reason}")
    if sweep.unverified:
        print(
            f"warning: {len(sweep.unverified)} run(s) read without verification "
            "(meta.json records no file digests):"
        )
        for path in sweep.unverified:
            print(f"  {path}")
    for run in sweep.eigenfunctions.values():
        if run.problem is not None:
            print(f"warning: {run.problem}; left out of the kernel-regression curve and marks")
