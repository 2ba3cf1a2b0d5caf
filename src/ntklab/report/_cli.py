"""The results page of a folder of runs: ``report()`` and the command line ``main()``.

report("artifacts/sweeps/train_ntk/2026-01-01_12-00-00")   # -> the files written
python -m ntklab.report artifacts/sweeps/train_ntk/2026-01-01_12-00-00 --metric train/acc
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ntklab.report._aggregate import eigen_runs, metric_figures, unresolved_union
from ntklab.report._alignment import alignment_growth, alignment_history, alignment_layers
from ntklab.report._figures import draw_alignment, draw_history, draw_layers, draw_metric
from ntklab.report._page import (
    Section,
    alignment_sections,
    history_section,
    layers_section,
    metric_section,
    print_left_out,
    print_summary,
    write_csv,
    write_page,
)
from ntklab.report._runs import Sweep, read_sweep


def report(
    folder: str | Path, *, out: str | Path | None = None, metrics: Sequence[str] = ("test/acc",)
) -> list[Path]:
    """Writes ``report.csv``, ``report_summary.csv``, the figures and ``report.md`` of a sweep.

    Damaged runs are left out of every table and figure and named (printed and on the page), as
    are unfinished runs.

    Args:
      folder: a sweep folder (job folders with ``run.json``) or a folder holding run folders.
      out: where to write (default: ``folder``).
      metrics: metric keys to plot, one figure per group and metric.

    Returns:
      The files written.

    Raises:
      FileNotFoundError: ``folder`` is not a folder, or no sound finished run is below it.
    """
    folder = Path(folder)
    out = Path(folder if out is None else out)
    sweep = read_sweep(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.csv", out / "report_summary.csv"]
    write_csv(sweep.rows, written[0])
    sections: list[Section] = []
    summary = []
    for metric in metrics:
        for figure in metric_figures(sweep, metric):
            stem, files = draw_metric(figure, out)
            section, rows = metric_section(figure, stem)
            written += files
            sections.append(section)
            summary += rows
    sections += _alignment_sections(sweep, out, written)
    write_csv(summary, written[1])
    written.append(out / "report.md")
    write_page(written[-1], sweep, sections)
    print_summary(summary)
    print_left_out(sweep)
    return written


def _alignment_sections(sweep: Sweep, out: Path, written: list[Path]) -> list[Section]:
    """Draws the eigenfunction sweep's alignment figures; appends their files to ``written``."""
    sections = []
    for growth in alignment_growth(sweep.rows):
        unresolved = unresolved_union(eigen_runs(growth.members, sweep))
        stems, files = draw_alignment(growth, out, unresolved)
        written += files
        sections += alignment_sections(growth, stems, unresolved)
    for history in alignment_history(sweep.rows):
        stem, files = draw_history(history, out)
        written += files
        sections.append(history_section(history, stem))
    for layers in alignment_layers(sweep.rows):
        stem, files = draw_layers(layers, out)
        written += files
        sections.append(layers_section(layers, stem))
    return sections


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m ntklab.report FOLDER [--out DIR] [--metric KEY ...]``.

    Exits with status 0 when the page was written (damaged and unfinished runs are named and
    left out), and with status 1 and one line on stderr, without a traceback, when no sound run
    remains or the folder cannot be read or written.
    """
    parser = argparse.ArgumentParser(
        prog="python -m ntklab.report",
        description="Collect a sweep's results into CSV files, figures and report.md.",
    )
    parser.add_argument(
        "folder", type=Path, help="sweep folder (job folders with run.json) or folder of runs"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: FOLDER)")
    parser.add_argument(
        "--metric",
        action="append",
        dest="metrics",
        help="metric key to plot, repeatable (default: test/acc)",
    )
    args = parser.parse_args(argv)
    try:
        written = report(args.folder, out=args.out, metrics=args.metrics or ["test/acc"])
    except (OSError, ValueError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"ntklab.report: {message}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {len(written)} files to {written[0].parent}")
