"""CIFAR-10 and its binary task CIFAR-2, read from the python-pickle batches.

Dimensions: N examples; images are 32 x 32 x 3.

Files: `{root}/cifar-10-batches-py/` with `data_batch_1` .. `data_batch_5`, `test_batch` and
`batches.meta`. If that folder is absent but `{root}/cifar-10-python.tar.gz` exists, it is
extracted. Each batch is a pickled dict with `b'data'` uint8 [n, 3072] in channel-major order
(1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane) and `b'labels'` (n ints).
URL and md5s are those of torchvision's `torchvision/datasets/cifar.py`.

CIFAR-2: label 0 for CIFAR-10 classes 0-4, 1 for classes 5-9; subsets stay stratified by the
original 10 classes.

Usage:
    raw = load_cifar10(Path("data"), download=False)  # raw.train.pixels [50000, 32, 32, 3] uint8
"""

import io
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ntklab.data.archive import extract_folder
from ntklab.data.containers import RawDataset, RawSplit
from ntklab.data.download import (
    DownloadError,
    fetch_first,
    md5sum,
    missing_files_error,
    warn_if_unofficial,
)

logger = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
FOLDER_NAME = "cifar-10-batches-py"
TRAIN_BATCHES = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
}
TEST_BATCHES = {"test_batch": "40351d587109b95175f43aff81a1287e"}
META_FILE = "batches.meta"
META_MD5 = "5ff9c542aee3614f3951f8cda6e48888"
EXPECTED_FILES = (*TRAIN_BATCHES, *TEST_BATCHES, META_FILE)

IMAGE_SIZE = 32
NUM_CHANNELS = 3
NUM_CLASSES = 10
CIFAR2_CLASS_NAMES = ("classes 0-4", "classes 5-9")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays: CIFAR batches need nothing else, and refusing
    other globals keeps a tampered file from running code."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR file")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """Loads one pickled CIFAR dict (keys are bytes, as `pickle.load(f, encoding="bytes")`).

    Raises:
        ValueError: not a readable pickle of a dict.
    """
    try:
        entry = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"cannot read CIFAR file {path}: {err}") from err
    if not isinstance(entry, dict):
        raise ValueError(f"CIFAR file {path} holds a {type(entry).__name__}, expected a dict")
    return entry


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads and validates one batch.

    Returns:
        pixels [n, 32, 32, 3] uint8 (NHWC) and labels [n] int64.

    Raises:
        ValueError: missing keys, wrong dtype or shape, or labels outside 0..9.
    """
    entry = _unpickle(path)
    missing = [key for key in (b"data", b"labels") if key not in entry]
    if missing:
        raise ValueError(f"CIFAR batch {path} lacks keys {missing}; found {sorted(entry)}")
    data, labels = entry[b"data"], np.asarray(entry[b"labels"])
    row = IMAGE_SIZE * IMAGE_SIZE * NUM_CHANNELS
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"b'data' in {path} must be a 2-D uint8 array [n, {row}]")
    if data.shape[1] != row:
        raise ValueError(f"b'data' in {path} has shape {data.shape}; expected [n, {row}]")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"b'labels' in {path} must hold {data.shape[0]} integers (one per image); "
            f"got shape {labels.shape}, dtype {labels.dtype}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"b'labels' in {path} must lie in 0..{NUM_CLASSES - 1}")
    planes = data.reshape(-1, NUM_CHANNELS, IMAGE_SIZE, IMAGE_SIZE)  # [n, C, H, W]
    return planes.transpose(0, 2, 3, 1), labels.astype(np.int64)


def _read_class_names(path: Path) -> tuple[str, ...]:
    """Reads the 10 class names from `batches.meta`.

    Raises:
        ValueError: no `b'label_names'` list of 10 names.
    """
    names = _unpickle(path).get(b"label_names")
    if not isinstance(names, list) or len(names) != NUM_CLASSES:
        raise ValueError(f"{path} must hold b'label_names', a list of {NUM_CLASSES} names")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _ensure_folder(root: Path, *, download: bool) -> Path:
    """Returns the batches folder, extracting (and, if allowed, downloading) the archive.

    Raises:
        FileNotFoundError: neither the folder nor the archive is there (and download is off or
            failed), or the folder lacks some files.
    """
    folder = root / FOLDER_NAME
    archive = root / ARCHIVE_NAME
    if not folder.is_dir():
        note = f"Also accepted: the archive {ARCHIVE_NAME} in {root}, extracted on first use."
        if archive.is_file():
            if md5sum(archive) != CIFAR10_MD5:
                logger.warning("cifar10: %s is not the official archive (md5 differs)", archive)
        elif not download:
            raise missing_files_error(
                "cifar10", folder, EXPECTED_FILES, [CIFAR10_URL], download=False, note=note
            )
        else:
            root.mkdir(parents=True, exist_ok=True)
            try:
                fetch_first([CIFAR10_URL], archive, md5=CIFAR10_MD5)
            except DownloadError as err:
                raise missing_files_error(
                    "cifar10",
                    folder,
                    EXPECTED_FILES,
                    [CIFAR10_URL],
                    download=True,
                    reason=str(err),
                    note=note,
                ) from err
        extract_folder(archive, root, FOLDER_NAME)
    missing = [name for name in EXPECTED_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"cifar10 folder {folder} is incomplete: missing {', '.join(missing)} "
            f"(expected {', '.join(EXPECTED_FILES)}). Remove the folder to re-extract "
            f"{ARCHIVE_NAME}, or restore the files from {CIFAR10_URL}."
        )
    return folder


OFFICIAL_SIZES = (50_000, 10_000)
"""Train and test images of the official CIFAR-10."""


def load_cifar10(root: Path, *, download: bool) -> RawDataset:
    """Loads CIFAR-10 from `{root}/cifar-10-batches-py/` (or its archive in `root`).

    Batches whose md5 differs from the official one (e.g. a subset) are read anyway, with a
    warning, as long as their structure is valid.

    Args:
        root: data root folder.
        download: fetch the official archive when neither folder nor archive is present.

    Returns:
        raw splits with pixels [N, 32, 32, 3] uint8, labels 0..9 and max_value 255.

    Raises:
        FileNotFoundError: files missing (and not downloadable).
        ValueError: a file has an invalid structure or the archive is unsafe.
    """
    folder = _ensure_folder(root, download=download)
    splits = []
    for batches in (TRAIN_BATCHES, TEST_BATCHES):
        parts = [_read_batch(folder / name) for name in batches]
        pixels = np.concatenate([p for p, _ in parts])
        labels = np.concatenate([lab for _, lab in parts])
        splits.append(RawSplit(pixels=pixels, labels=labels, strata=labels))
    counts = (len(splits[0].labels), len(splits[1].labels))
    warn_if_unofficial(
        "cifar10",
        {folder / name: md5 for name, md5 in {**TRAIN_BATCHES, **TEST_BATCHES}.items()}
        | {folder / META_FILE: META_MD5},
        holds=f"{counts[0]:,} train and {counts[1]:,} test images"
        + (
            ""
            if counts == OFFICIAL_SIZES
            else f", not {OFFICIAL_SIZES[0]:,} and {OFFICIAL_SIZES[1]:,}"
        ),
    )
    return RawDataset(
        train=splits[0],
        test=splits[1],
        class_names=_read_class_names(folder / META_FILE),
        max_value=255.0,
    )


def _to_binary(split: RawSplit) -> RawSplit:
    """Maps classes 0-4 to 0 and 5-9 to 1, keeping the original classes as strata."""
    binary = (split.labels >= NUM_CLASSES // 2).astype(np.int64)
    return RawSplit(pixels=split.pixels, labels=binary, strata=split.labels)


def load_cifar2(root: Path, *, download: bool) -> RawDataset:
    """Loads CIFAR-2 (binary: classes 0-4 vs 5-9) from the CIFAR-10 files (see `load_cifar10`).

    Returns:
        raw splits with binary labels and the original 10 classes as strata.
    """
    raw = load_cifar10(root, download=download)
    return RawDataset(
        train=_to_binary(raw.train),
        test=_to_binary(raw.test),
        class_names=CIFAR2_CLASS_NAMES,
        max_value=raw.max_value,
    )
