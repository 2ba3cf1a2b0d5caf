"""Containers for loaded datasets: the public `Split` / `Dataset` and the loaders' raw arrays.

Dimensions: N examples, H height, W width, C channels.

Usage:
    raw = RawDataset(train=RawSplit(pixels, labels), test=..., class_names=names, max_value=255)
    # raw.train.pixels [N, H, W, C] uint8 as read from the files; load_dataset turns it into a
    # Dataset whose train.images [n, H, W, C] are float32.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
    """One preprocessed split (train or test) of a dataset.

    Attributes:
        images: preprocessed images [N, H, W, C], float32.
        labels: task labels [N], int64 (for cifar2 the binary label).
        indices: positions of these samples in the dataset's own published split [N], int64, in
            the order returned (sorted ascending).
    """

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A loaded dataset: train and test splits plus the statistics used to standardize them.

    Attributes:
        name: registered dataset name, e.g. "cifar10".
        train: training split.
        test: test split.
        num_classes: number of task classes K; labels lie in [0, K).
        class_names: K human-readable class names, indexed by label.
        mean: per-channel mean [C], float32, subtracted from the [0, 1]-scaled images (zeros when
            normalize=False).
        std: per-channel standard deviation [C], float32, dividing the centred images (ones when
            normalize=False).
    """

    name: str
    train: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray


@dataclasses.dataclass(frozen=True)
class RawSplit:
    """One split as read from the dataset's files, before scaling and subsetting.

    Attributes:
        pixels: raw images [N, H, W, C], uint8, in the published order.
        labels: task labels [N], int64.
        strata: classes used to stratify subsets [N], int64 (the original classes; equal to
            labels except for derived tasks such as cifar2).
    """

    pixels: np.ndarray
    labels: np.ndarray
    strata: np.ndarray


@dataclasses.dataclass(frozen=True)
class RawDataset:
    """What a registered loader returns: both raw splits and their metadata.

    Attributes:
        train: raw training split.
        test: raw test split.
        class_names: K class names, indexed by task label.
        max_value: raw pixel value that maps to 1.0 (255 for 8-bit images, 16 for sklearn digits).
    """

    train: RawSplit
    test: RawSplit
    class_names: tuple[str, ...]
    max_value: float
