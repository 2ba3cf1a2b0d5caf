"""scikit-learn's bundled 8x8 handwritten digits: the offline default dataset (no files needed).

Dimensions: N examples; images are 8 x 8 x 1 with raw values 0..16.

Fixed split, no shuffling: the first 1,437 samples of `sklearn.datasets.load_digits()` are the
training split and the last 360 the test split; split positions follow load_digits order (test
position i is load_digits sample 1437 + i).

Usage:
    raw = load_digits(Path("data"), download=False)  # raw.train.pixels [1437, 8, 8, 1] uint8
"""

from pathlib import Path

import numpy as np

from ntklab.data.containers import RawDataset, RawSplit

NUM_TRAIN = 1437
NUM_TOTAL = 1797
MAX_VALUE = 16.0
CLASS_NAMES = tuple(str(digit) for digit in range(10))


def load_digits(root: Path, *, download: bool) -> RawDataset:
    """Loads the bundled digits; `root` and `download` are accepted for a uniform signature.

    Returns:
        raw splits with pixels [1437 | 360, 8, 8, 1] uint8 in 0..16 and max_value 16.

    Raises:
        ValueError: the bundled data are not the expected 1,797 integer images in 0..16.
    """
    del root, download  # bundled with scikit-learn
    from sklearn.datasets import load_digits as sklearn_load_digits  # slow import, only here

    bunch = sklearn_load_digits()
    images, labels = np.asarray(bunch.images), np.asarray(bunch.target, np.int64)
    if images.shape != (NUM_TOTAL, 8, 8) or labels.shape != (NUM_TOTAL,):
        raise ValueError(f"expected {NUM_TOTAL} digits of 8x8, got images {images.shape}")
    if images.min() < 0 or images.max() > MAX_VALUE or np.any(images != np.round(images)):
        raise ValueError(f"digit pixels must be integers in 0..{MAX_VALUE:g}")
    pixels = images.astype(np.uint8)[..., None]
    splits = [
        RawSplit(pixels=pixels[part], labels=labels[part], strata=labels[part])
        for part in (slice(0, NUM_TRAIN), slice(NUM_TRAIN, NUM_TOTAL))
    ]
    return RawDataset(train=splits[0], test=splits[1], class_names=CLASS_NAMES, max_value=MAX_VALUE)
