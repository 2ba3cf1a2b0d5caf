"""Datasets by name: read each dataset's published files, preprocess, and take seeded subsets.

Dimensions: N examples, H height, W width, C channels.

Every dataset comes back as NHWC float32 images scaled to [0, 1] and, with `normalize=True`,
standardized per channel with the mean and std of its full training split (the test split uses
the training statistics). `num_train` / `num_test` pick deterministic class-stratified subsets.

Usage:
    ds = load_dataset("cifar10", root="data", num_train=1000, num_test=500, seed=0)
    ds.train.images  # [1000, 32, 32, 3] float32
    ds.train.labels  # [1000] int64
    ds.test.indices  # [500] int64, sorted positions in the official test split
    dataset_names()  # ['cifar10', 'cifar2', 'digits', 'fashion_mnist', 'kmnist', 'mnist', 'svhn']
"""

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ntklab.data.cifar import load_cifar2, load_cifar10
from ntklab.data.containers import Dataset, RawDataset, RawSplit, Split
from ntklab.data.digits import load_digits
from ntklab.data.mnist_family import load_fashion_mnist, load_kmnist, load_mnist
from ntklab.data.preprocess import channel_stats, to_float
from ntklab.data.subsets import subset_indices
from ntklab.data.svhn import load_svhn

__all__ = ["Dataset", "Split", "dataset_names", "load_dataset", "load_dataset_config"]

logger = logging.getLogger(__name__)

Loader = Callable[..., RawDataset]
"""`loader(root: Path, *, download: bool) -> RawDataset`."""

_LOADERS: dict[str, Loader] = {
    "cifar10": load_cifar10,
    "cifar2": load_cifar2,
    "digits": load_digits,
    "fashion_mnist": load_fashion_mnist,
    "kmnist": load_kmnist,
    "mnist": load_mnist,
    "svhn": load_svhn,
}


def dataset_names() -> list[str]:
    """Returns the registered dataset names, sorted."""
    return sorted(_LOADERS)


def _make_split(
    raw: RawSplit,
    indices: np.ndarray,
    *,
    max_value: float,
    mean: np.ndarray,
    std: np.ndarray,
) -> Split:
    """Preprocesses the chosen examples [n] of a raw split into a `Split`."""
    return Split(
        images=to_float(raw.pixels[indices], max_value=max_value, mean=mean, std=std),
        labels=raw.labels[indices].astype(np.int64),
        indices=indices,
    )


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike = "data",
    download: bool = False,
    normalize: bool = True,
    num_train: int | None = None,
    num_test: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Loads a registered dataset, preprocessed, optionally as stratified subsets.

    Args:
        name: registered dataset name (see `dataset_names()`).
        root: folder holding each dataset's published files (not used by "digits").
        download: fetch missing files from the official URLs (md5-checked).
        normalize: standardize each channel with the full training split's mean and std
            (computed before subsetting); otherwise images are only scaled to [0, 1].
        num_train: size of the training subset, or None for the whole split.
        num_test: size of the test subset, or None for the whole split.
        seed: non-negative seed of the subsets; the same (seed, sizes) give the same indices.

    Returns:
        the dataset: train/test images [N, H, W, C] float32, labels [N] int64, indices [N]
        int64 (sorted positions in the published split), and mean/std [C] float32.

    Raises:
        ValueError: unknown name, invalid subset size or seed, or invalid file contents.
        FileNotFoundError: the dataset's files are missing and cannot be downloaded; the message
            names the folder, the expected files and the official URL.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(dataset_names())}")
    raw = _LOADERS[name](Path(root), download=download)
    train_indices = subset_indices(raw.train.strata, num_train, seed=seed, split="train")
    test_indices = subset_indices(raw.test.strata, num_test, seed=seed, split="test")
    num_channels = raw.train.pixels.shape[-1]
    if normalize:
        mean, std = channel_stats(raw.train.pixels, max_value=raw.max_value)
    else:
        mean, std = np.zeros(num_channels, np.float32), np.ones(num_channels, np.float32)
    # With normalize=False, mean 0 and std 1 leave the [0, 1] images unchanged (exactly).
    dataset = Dataset(
        name=name,
        train=_make_split(raw.train, train_indices, max_value=raw.max_value, mean=mean, std=std),
        test=_make_split(raw.test, test_indices, max_value=raw.max_value, mean=mean, std=std),
        num_classes=len(raw.class_names),
        class_names=raw.class_names,
        mean=mean,
        std=std,
    )
    logger.info(
        "loaded %s: %d of %d train and %d of %d test images of shape %s (normalize=%s)",
        name,
        len(train_indices),
        raw.train.labels.shape[0],
        len(test_indices),
        raw.test.labels.shape[0],
        raw.train.pixels.shape[1:],
        normalize,
    )
    return dataset


def load_dataset_config(data: Mapping[str, Any], *, seed: int, **overrides: Any) -> Dataset:
    """:func:`load_dataset` from a ``config/data`` group (keys ``dataset``, ``root``,
    ``download``, ``normalize``, ``num_train``, ``num_test``), ``overrides`` taking precedence.

    Example:
        load_dataset_config(cfg.data, seed=cfg.seed)                  # as compute_ntk.py does
        load_dataset_config(run.config.data, seed=0, download=False)  # reading a run back
    """
    options = {**dict(data), **overrides}
    return load_dataset(options.pop("dataset"), seed=seed, **options)
