"""Spectra: the eNTK's eigenvalues and the neural anisotropy directions.

Dimensions: k eigenpairs or directions, D = H·W·C input dimension.

    figure = spectrum_figure(eigvals, title="lenet on cifar10")   # eigvals [k]
    save_figure(figure, "spectrum.png")                          # ntklab.artifacts
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def spectrum_figure(eigvals: np.ndarray, *, title: str) -> Figure:
    """Eigenvalues on a log scale against their index.

    Args:
      eigvals: eigenvalues [k], descending (non-positive ones are left out of the log plot).
      title: figure title.

    Returns:
      The figure.
    """
    figure, axes = plt.subplots(figsize=(5.5, 4))
    index = np.arange(len(eigvals))
    positive = eigvals > 0
    axes.semilogy(index[positive], eigvals[positive], marker=".", linestyle="-", linewidth=1)
    axes.set_xlabel("eigenvalue index k")
    axes.set_ylabel("eigenvalue λ_k")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    return figure


def nads_figure(
    directions: np.ndarray,
    eigvals: np.ndarray,
    *,
    shape: tuple[int, int, int],
    title: str,
    columns: int = 6,
) -> Figure:
    """Neural anisotropy directions as images next to their 2-D Fourier magnitudes, plus spectrum.

    Each direction v [H, W, C] is drawn as an image (one channel: diverging colormap centred at 0;
    several channels: min-max scaled RGB of the first three) beside |FFT2(v)|, fftshifted so the
    zero frequency is in the centre and averaged over channels, as the NADs paper shows them.

    Args:
      directions: the directions to draw [k, D], one per row, D = H·W·C.
      eigvals: squared singular values of all directions [D'], descending (D' >= k).
      shape: image shape [H, W, C].
      title: figure title.
      columns: (image, spectrum) pairs per row.

    Returns:
      The figure: ceil(k / columns) rows of pairs, then the spectrum on a log scale.
    """
    count = len(directions)
    rows = max(1, -(-count // columns))
    figure = plt.figure(figsize=(2.0 * columns, 1.1 * rows + 2.6))
    grid = figure.add_gridspec(rows + 1, 2 * columns, height_ratios=[1.0] * rows + [2.2])
    for k, direction in enumerate(directions):
        image = np.asarray(direction, np.float64).reshape(shape)
        magnitude = np.fft.fftshift(np.abs(np.fft.fft2(image, axes=(0, 1))), axes=(0, 1))
        row, col = divmod(k, columns)
        image_axes = figure.add_subplot(grid[row, 2 * col])
        if shape[2] == 1:
            limit = max(np.abs(image).max(), np.finfo(np.float64).tiny)
            image_axes.imshow(image[..., 0], cmap="RdBu_r", vmin=-limit, vmax=limit)
        else:
            rgb = image[..., :3]
            span = max(rgb.max() - rgb.min(), np.finfo(np.float64).tiny)
            image_axes.imshow((rgb - rgb.min()) / span)
        image_axes.set_title(f"NAD {k}", fontsize=7, pad=2)
        fft_axes = figure.add_subplot(grid[row, 2 * col + 1])
        fft_axes.imshow(magnitude.mean(axis=2), cmap="magma")
        fft_axes.set_title("|FFT|", fontsize=7, pad=2)
        for axes in (image_axes, fft_axes):
            axes.set_xticks([])
            axes.set_yticks([])
    spectrum_axes = figure.add_subplot(grid[rows, :])
    index = np.arange(len(eigvals))
    positive = eigvals > 0
    spectrum_axes.semilogy(index[positive], eigvals[positive], linewidth=1)
    spectrum_axes.set_xlabel("NAD index")
    spectrum_axes.set_ylabel("squared singular value σ²")
    spectrum_axes.grid(True, which="both", alpha=0.3)
    figure.suptitle(title)
    return figure
