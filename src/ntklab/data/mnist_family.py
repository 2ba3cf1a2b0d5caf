"""MNIST, Fashion-MNIST and KMNIST: four IDX files each in `{root}/{name}/`.

Dimensions: N examples; images are 28 x 28 x 1.

Files (each gzipped `.gz` as published, or decompressed): train-images-idx3-ubyte,
train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte. URLs and md5s of the
`.gz` files are those of torchvision's `torchvision/datasets/mnist.py`.

Usage:
    raw = load_mnist(Path("data"), download=False)  # raw.train.pixels [60000, 28, 28, 1] uint8
"""

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ntklab.data.containers import RawDataset, RawSplit
from ntklab.data.download import Resource, ensure_files
from ntklab.data.idx import read_idx

IMAGE_SIZE = 28
NUM_CLASSES = 10
FILE_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclasses.dataclass(frozen=True)
class IdxSource:
    """Where one MNIST-style dataset is published.

    Attributes:
        mirrors: base URLs, tried in order; a file's URL is mirror + "<stem>.gz".
        md5: official md5 of each "<stem>.gz" file.
        class_names: the 10 class names, indexed by label.
    """

    mirrors: tuple[str, ...]
    md5: Mapping[str, str]
    class_names: tuple[str, ...]


SOURCES = {
    "mnist": IdxSource(
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        class_names=tuple(str(digit) for digit in range(10)),
    ),
    "fashion_mnist": IdxSource(
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        class_names=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
    ),
    "kmnist": IdxSource(
        mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        md5={
            "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
            "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
            "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
            "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
        },
        class_names=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    ),
}


def _resources(source: IdxSource) -> list[Resource]:
    """The four published `.gz` files, each also accepted decompressed."""
    return [
        Resource(
            filename=f"{stem}.gz",
            md5=source.md5[f"{stem}.gz"],
            urls=tuple(f"{mirror}{stem}.gz" for mirror in source.mirrors),
            alternatives=(stem,),
        )
        for stem in FILE_STEMS
    ]


def _read_split(images_path: Path, labels_path: Path) -> RawSplit:
    """Reads and validates one split's image and label files.

    Returns:
        pixels [N, 28, 28, 1] uint8 and labels [N] int64.

    Raises:
        ValueError: wrong image size, image/label count mismatch or labels outside 0..9.
    """
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1).astype(np.int64)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"images in {images_path} are {images.shape[1]}x{images.shape[2]}; "
            f"expected {IMAGE_SIZE}x{IMAGE_SIZE}"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels in {labels_path} must lie in 0..{NUM_CLASSES - 1}")
    return RawSplit(pixels=images[..., None], labels=labels, strata=labels)


def load_idx_dataset(name: str, root: Path, *, download: bool) -> RawDataset:
    """Loads one of the MNIST-style datasets from `{root}/{name}/`.

    Args:
        name: "mnist", "fashion_mnist" or "kmnist".
        root: data root folder.
        download: fetch missing files from the official mirrors.

    Returns:
        raw train/test splits with pixels [N, 28, 28, 1] uint8 and max_value 255.

    Raises:
        ValueError: unknown name or invalid file contents.
        FileNotFoundError: files missing (and not downloadable).
    """
    if name not in SOURCES:
        raise ValueError(f"unknown IDX dataset {name!r}; valid choices: {', '.join(SOURCES)}")
    source = SOURCES[name]
    paths = ensure_files(root / name, _resources(source), download=download, dataset=name)
    train_images, train_labels, test_images, test_labels = paths
    return RawDataset(
        train=_read_split(train_images, train_labels),
        test=_read_split(test_images, test_labels),
        class_names=source.class_names,
        max_value=255.0,
    )


def load_mnist(root: Path, *, download: bool) -> RawDataset:
    """Loads MNIST from `{root}/mnist/` (see `load_idx_dataset`)."""
    return load_idx_dataset("mnist", root, download=download)


def load_fashion_mnist(root: Path, *, download: bool) -> RawDataset:
    """Loads Fashion-MNIST from `{root}/fashion_mnist/` (see `load_idx_dataset`)."""
    return load_idx_dataset("fashion_mnist", root, download=download)


def load_kmnist(root: Path, *, download: bool) -> RawDataset:
    """Loads Kuzushiji-MNIST from `{root}/kmnist/` (see `load_idx_dataset`)."""
    return load_idx_dataset("kmnist", root, download=download)
