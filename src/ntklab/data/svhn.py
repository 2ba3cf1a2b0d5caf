"""SVHN (cropped digits): MATLAB v5 files `train_32x32.mat` and `test_32x32.mat` in `{root}/svhn/`.

Dimensions: N examples; images are 32 x 32 x 3.

Each file holds `X` uint8 [32, 32, 3, N] (height, width, channel, example) and `y` [N, 1] with
labels 1..10, where 10 means the digit 0 (mapped to label 0 here). URLs and md5s are those of
torchvision's `torchvision/datasets/svhn.py`.

Usage:
    raw = load_svhn(Path("data"), download=False)  # raw.train.pixels [73257, 32, 32, 3] uint8
"""

from pathlib import Path

import numpy as np
import scipy.io

from ntklab.data.containers import RawDataset, RawSplit
from ntklab.data.download import Resource, ensure_files

BASE_URL = "http://ufldl.stanford.edu/housenumbers/"
MD5 = {
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
}
IMAGE_SHAPE = (32, 32, 3)
CLASS_NAMES = tuple(str(digit) for digit in range(10))


def _read_mat(path: Path) -> RawSplit:
    """Reads and validates one SVHN .mat file.

    Returns:
        pixels [N, 32, 32, 3] uint8 and labels [N] int64 in 0..9 (10 -> 0).

    Raises:
        ValueError: unreadable file, missing `X`/`y`, wrong shapes or dtype, labels outside 1..10.
    """
    try:
        mat = scipy.io.loadmat(path)
    except (ValueError, TypeError, OSError, NotImplementedError) as err:
        raise ValueError(f"cannot read SVHN file {path} as MATLAB v5: {err}") from err
    missing = [key for key in ("X", "y") if key not in mat]
    if missing:
        raise ValueError(f"SVHN file {path} lacks variables {missing}")
    images, labels = mat["X"], np.asarray(mat["y"])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[:3] != IMAGE_SHAPE:
        raise ValueError(
            f"X in {path} must be uint8 [32, 32, 3, N]; got {images.dtype} {list(images.shape)}"
        )
    num = images.shape[3]
    if labels.size != num or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"y in {path} must hold {num} integer labels; got {labels.dtype} {list(labels.shape)}"
        )
    labels = labels.reshape(num).astype(np.int64)
    if num and (labels.min() < 1 or labels.max() > 10):
        raise ValueError(f"y in {path} must lie in 1..10 (10 is the digit 0)")
    labels = labels % 10
    pixels = np.ascontiguousarray(images.transpose(3, 0, 1, 2))  # [N, H, W, C]
    return RawSplit(pixels=pixels, labels=labels, strata=labels)


def load_svhn(root: Path, *, download: bool) -> RawDataset:
    """Loads SVHN train and test from `{root}/svhn/`.

    Args:
        root: data root folder.
        download: fetch missing files from the official site.

    Returns:
        raw splits with pixels [N, 32, 32, 3] uint8, labels 0..9 and max_value 255.

    Raises:
        FileNotFoundError: files missing (and not downloadable).
        ValueError: a file has invalid contents.
    """
    resources = [Resource(name, md5=md5, urls=(BASE_URL + name,)) for name, md5 in MD5.items()]
    train_path, test_path = ensure_files(
        root / "svhn", resources, download=download, dataset="svhn"
    )
    return RawDataset(
        train=_read_mat(train_path),
        test=_read_mat(test_path),
        class_names=CLASS_NAMES,
        max_value=255.0,
    )
