"""Figures of the study, drawn with Matplotlib's non-interactive backend.

Dimensions: k eigenpairs, m swept values, T epochs, L layers.

    figure = spectrum_figure(eigvals, title="lenet on cifar10")   # eigvals [k]
    save_figure(figure, "spectrum.png")                          # ntklab.artifacts

One module per kind of figure: ``_spectra`` (eigenvalues, NADs), ``_sweeps`` (a metric against a
swept key, one comparison run's bars), ``_alignment`` (how the kernel rotated: one run, a sweep),
``_dynamics`` (the kernel during training and layer by layer); ``_common`` holds the human labels
(:func:`axis_label`, :func:`series_label`) and the shared axis helpers.
"""

from ntklab.plots._alignment import (
    MAX_HEATMAP_COLUMNS,
    alignment_figure,
    alignment_sweep_figures,
    normalized_ratio,
)
from ntklab.plots._common import (
    AXIS_LABELS,
    CHANCE_LABEL,
    SERIES_LABELS,
    UNRESOLVED_LABEL,
    axis_label,
    series_label,
)
from ntklab.plots._dynamics import (
    alignment_history_figure,
    alignment_history_sweep_figure,
    alignment_layers_figure,
    alignment_layers_sweep_figure,
    short_layer_names,
)
from ntklab.plots._spectra import nads_figure, spectrum_figure
from ntklab.plots._sweeps import comparison_figure, sweep_figure

__all__ = [
    "AXIS_LABELS",
    "CHANCE_LABEL",
    "MAX_HEATMAP_COLUMNS",
    "SERIES_LABELS",
    "UNRESOLVED_LABEL",
    "alignment_figure",
    "alignment_history_figure",
    "alignment_history_sweep_figure",
    "alignment_layers_figure",
    "alignment_layers_sweep_figure",
    "alignment_sweep_figures",
    "axis_label",
    "comparison_figure",
    "nads_figure",
    "normalized_ratio",
    "series_label",
    "short_layer_names",
    "spectrum_figure",
    "sweep_figure",
]
