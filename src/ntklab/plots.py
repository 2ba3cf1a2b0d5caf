"""Figures of the study, drawn with Matplotlib's non-interactive backend.

Dimensions: k eigenpairs.

    figure = spectrum_figure(eigvals, title="lenet on cifar10")   # eigvals [k]
    save_figure(figure, "spectrum.png")                          # ntklab.artifacts
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def spectrum_figure(eigvals: np.ndarray, *, title: str) -> Figure:
    """Eigenvalues [k] (descending) on a log scale against their index."""
    figure, axes = plt.subplots(figsize=(5.5, 4))
    index = np.arange(len(eigvals))
    positive = eigvals > 0
    axes.semilogy(index[positive], eigvals[positive], marker=".", linestyle="-", linewidth=1)
    axes.set_xlabel("eigenvalue index k")
    axes.set_ylabel("eigenvalue λ_k")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    return figure
