"""Pixel preprocessing: scale raw pixels to [0, 1] float32 and standardize each channel.

Dimensions: N examples, H height, W width, C channels.

Usage:
    mean, std = channel_stats(raw.train.pixels, max_value=255)     # [C], [C] float32
    images = to_float(raw.test.pixels[idx], max_value=255, mean=mean, std=std)  # [n, H, W, C]
"""

import numpy as np

_CHUNK_EXAMPLES = 2048


def channel_stats(pixels: np.ndarray, *, max_value: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of the [0, 1]-scaled pixels of a whole split.

    Sums are accumulated in float64 over chunks of examples, so memory stays small and, for
    integer pixels, the sums are exact.

    Args:
        pixels: raw images [N, H, W, C], integer.
        max_value: raw value that maps to 1.0.

    Returns:
        mean [C] and std [C] (population std, ddof=0), float32, over all N*H*W values per channel.

    Raises:
        ValueError: the split is empty or a channel is constant (std 0).
    """
    if pixels.ndim != 4 or pixels.shape[0] == 0:
        raise ValueError(f"need a non-empty [N, H, W, C] array, got shape {pixels.shape}")
    num_channels = pixels.shape[-1]
    total = np.zeros(num_channels, np.float64)
    total_sq = np.zeros(num_channels, np.float64)
    for start in range(0, pixels.shape[0], _CHUNK_EXAMPLES):
        chunk = pixels[start : start + _CHUNK_EXAMPLES].astype(np.float64)
        total += chunk.sum(axis=(0, 1, 2))
        total_sq += np.square(chunk).sum(axis=(0, 1, 2))
    count = pixels.shape[0] * pixels.shape[1] * pixels.shape[2]
    mean = total / count
    var = np.maximum(total_sq / count - np.square(mean), 0.0)
    std = np.sqrt(var)
    constant = np.flatnonzero(std == 0)
    if constant.size:
        raise ValueError(f"channels {constant.tolist()} are constant (std 0); cannot standardize")
    return (mean / max_value).astype(np.float32), (std / max_value).astype(np.float32)


def to_float(
    pixels: np.ndarray,
    *,
    max_value: float,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
) -> np.ndarray:
    """Scales raw pixels to [0, 1] float32, then standardizes if `mean` and `std` are given.

    Args:
        pixels: raw images [N, H, W, C], integer.
        max_value: raw value that maps to 1.0.
        mean: per-channel mean [C] of the scaled training pixels, or None.
        std: per-channel std [C] of the scaled training pixels, or None.

    Returns:
        images [N, H, W, C], float32: `pixels / max_value`, then `(x - mean) / std`.
    """
    images = pixels.astype(np.float32)
    images /= np.float32(max_value)
    if mean is not None and std is not None:
        images -= mean.astype(np.float32)
        images /= std.astype(np.float32)
    return images
