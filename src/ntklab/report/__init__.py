"""Collect a sweep's results into one CSV and draw the study's figures.

    python -m ntklab.report artifacts/sweeps/train_ntk/2026-01-01_12-00-00
    python -m ntklab.report artifacts/train_ntk --out figures --metric test/acc --metric train/acc

**Finding runs** (``_runs``). A sweep folder holds Hydra's job folders; each job's ``run.json``
names its run folder under ``paths.artifacts`` (``artifacts/train_ntk/<dataset>/<model>/<run>``),
and the report follows it (or finds it again below an ancestor when the artifacts folder moved).
A folder that holds run folders directly (``artifacts/train_ntk``, an old multirun folder) works
too. A run is finished once ``meta.json`` exists; unfinished runs are skipped with a warning
naming each folder. Before any file is read it is checked against the size and sha256
``meta.json`` records (``metrics.json``, ``alignment*.npz``, and the ``compute_ntk`` run's
``kernel_regression.npz`` and gaps/residuals): a run with a damaged file or an invalid JSON is
left out of every table and figure and named with the reason, printed and on the page.

**Aggregating** (``_aggregate``, ``_alignment``). Every sound run becomes one row of
``report.csv``: its resolved config as dotted keys (``label_idx``, ``data.num_train``,
``train.max_lr``, ...), its metrics (``test/acc``, ...; the comparison's as
``runs.<run>.test/acc``), ``run_dir`` and ``job``. Rows are grouped by script, dataset, model and
every other config key that differs between runs, except the swept x key, ``seed`` and the
series key; the x key is the first of ``X_KEYS`` that varies (``nad_idx``, ``label_idx``,
``data.num_train``). One line per series (``mode``, or each run of the comparison); each point
is the mean over the runs at that x (seeds), ± one standard deviation, or the value alone for
one run. The chance line is the mean majority-class rate of the evaluated labels; the legend says
what the band spans (initializations, or repeats sharing θ0). Eigenfunction sweeps also draw the
kernel-regression curve of their ``compute_ntk`` runs under the points and mark unresolved
eigenvectors (gap ≤ residual), and, from the network runs' arrays, the normalised growth of the
quotients (lines and heatmap), the kernel during training (``alignment_history.npz``) and per
layer (``alignment_layers.npz``).

**Rendering** (``_figures``, ``_page``). The figures are
``{script}-{dataset}-{model}[-{key}={value}...]-{metric}-vs-{x key}.png`` and ``.pdf`` (and
``...-alignment[-heatmap|-history|-layers]``), next to ``report.csv``, ``report_summary.csv``
(the plotted means, deviations, counts, chance and kernel regression) and ``report.md``, which
gathers every figure with its table, readable on GitHub. ``python -m ntklab.report`` exits with
status 0 when a page was written and 1, with one line, when no sound run remains.
"""

from ntklab.report._aggregate import (
    GROUP_KEYS,
    KERNEL_REGRESSION_LABEL,
    ONE_RUN,
    X_KEYS,
    MetricFigure,
    band_label,
    chance_curve,
    kernel_regression_curve,
    metric_figures,
    summarize,
    unresolved_union,
)
from ntklab.report._alignment import alignment_growth, alignment_history, alignment_layers
from ntklab.report._cli import main, report
from ntklab.report._page import write_csv
from ntklab.report._runs import (
    POINTER_FILE,
    EigenRun,
    FoundRuns,
    Sweep,
    collect,
    find_runs,
    read_sweep,
)

__all__ = [
    "GROUP_KEYS",
    "KERNEL_REGRESSION_LABEL",
    "ONE_RUN",
    "POINTER_FILE",
    "X_KEYS",
    "EigenRun",
    "FoundRuns",
    "MetricFigure",
    "Sweep",
    "alignment_growth",
    "alignment_history",
    "alignment_layers",
    "band_label",
    "chance_curve",
    "collect",
    "find_runs",
    "kernel_regression_curve",
    "main",
    "metric_figures",
    "read_sweep",
    "report",
    "summarize",
    "unresolved_union",
    "write_csv",
]
