"""Tests for ntklab.data: loaders on fixtures written in each dataset's real file format.

Expectations are computed independently of the loader: pixels are looked up in the raw file
layouts by explicit index arithmetic, statistics with plain numpy over the raw arrays, subset
quotas by hand.
"""

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from omegaconf import OmegaConf

from ntklab.data import Dataset, Split, dataset_names, load_dataset, mnist_family, svhn
from ntklab.data import cifar as cifar_module
from ntklab.data import download as download_module

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
ALL_NAMES = ["cifar10", "cifar2", "digits", "fashion_mnist", "kmnist", "mnist", "svhn"]
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
CIFAR_LABEL_NAMES = b"airplane automobile bird cat deer dog frog horse ship truck".split()
IDX_STEMS = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
# CIFAR fixture: 5 train batches of 8 images; original class counts over the 40 train images.
CIFAR_TRAIN_COUNTS = [8, 6, 5, 4, 4, 3, 3, 3, 2, 2]
CIFAR_PER_BATCH = 8
CIFAR_NUM_TEST = 10


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def listing(folder: Path) -> list[str]:
    """All paths under `folder`, relative, sorted (empty if the folder does not exist)."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------------------------
# Fixture writers (real formats)
# --------------------------------------------------------------------------------------------


def write_cifar_folder(folder: Path, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Writes CIFAR-10 python batches; returns the raw rows [n, 3072] and labels per split."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    train_labels = rng.permutation(np.repeat(np.arange(10), CIFAR_TRAIN_COUNTS))
    train_rows = rng.integers(0, 256, size=(train_labels.size, 3072), dtype=np.uint8)
    test_labels = np.arange(CIFAR_NUM_TEST) % 10
    test_rows = rng.integers(0, 256, size=(CIFAR_NUM_TEST, 3072), dtype=np.uint8)
    for b in range(5):
        part = slice(b * CIFAR_PER_BATCH, (b + 1) * CIFAR_PER_BATCH)
        batch = {
            b"batch_label": f"training batch {b + 1} of 5".encode(),
            b"labels": [int(v) for v in train_labels[part]],
            b"data": train_rows[part],
        }  # deliberately no b"filenames", like the shared subset
        (folder / f"data_batch_{b + 1}").write_bytes(pickle.dumps(batch))
    test = {b"batch_label": b"testing batch 1 of 1", b"labels": test_labels.tolist()}
    test[b"data"] = test_rows
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    meta = {b"num_cases_per_batch": 10000, b"label_names": CIFAR_LABEL_NAMES, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return {
        "train_rows": train_rows,
        "train_labels": train_labels,
        "test_rows": test_rows,
        "test_labels": test_labels,
    }


def rewrite_batch(folder: Path, name: str, **changes: object) -> None:
    with open(folder / name, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch.update({key.encode(): value for key, value in changes.items()})
    (folder / name).write_bytes(pickle.dumps(batch))


def make_tar(archive: Path, source: Path, arcname: str) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=arcname)


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding written from the format spec: 0, 0, type 0x08, ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_files(
    folder: Path, train_labels: np.ndarray, test_labels: np.ndarray, *, gz: bool, seed: int = 0
) -> dict[str, np.ndarray]:
    """Writes the four MNIST-style files; returns the images [N, 28, 28] and labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (len(train_labels), 28, 28), np.uint8),
        "train-labels-idx1-ubyte": np.asarray(train_labels, np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (len(test_labels), 28, 28), np.uint8),
        "t10k-labels-idx1-ubyte": np.asarray(test_labels, np.uint8),
    }
    for stem, array in arrays.items():
        payload = idx_bytes(array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(payload))
        else:
            (folder / stem).write_bytes(payload)
    return arrays


def write_svhn_mat(path: Path, images_hwcn: np.ndarray, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"X": images_hwcn, "y": labels.reshape(-1, 1).astype(np.uint8)})


@pytest.fixture
def cifar_root(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "root"
    raw = write_cifar_folder(root / "cifar-10-batches-py")
    return root, raw


# --------------------------------------------------------------------------------------------
# Registry and configs
# --------------------------------------------------------------------------------------------


def test_dataset_names_are_the_registered_sorted_names():
    assert dataset_names() == ALL_NAMES


def test_unknown_dataset_raises_listing_valid_names(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'foo'") as info:
        load_dataset("foo", root=tmp_path)
    message = str(info.value)
    assert "valid choices: " + ", ".join(ALL_NAMES) in message


@pytest.mark.parametrize("name", ALL_NAMES)
def test_config_file_matches_registry(name):
    cfg = OmegaConf.load(REPO_ROOT / "config" / "data" / f"{name}.yaml")
    assert OmegaConf.to_container(cfg) == {
        "dataset": name,
        "root": "data",
        "download": False,
        "normalize": True,
        "num_train": None,
        "num_test": None,
    }


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-2
# --------------------------------------------------------------------------------------------


def test_cifar10_layout_pixels_and_labels(cifar_root):
    root, raw = cifar_root
    ds = load_dataset("cifar10", root=root, normalize=False)
    assert isinstance(ds, Dataset) and isinstance(ds.train, Split)
    num_train = sum(CIFAR_TRAIN_COUNTS)
    assert ds.train.images.shape == (num_train, 32, 32, 3)
    assert ds.test.images.shape == (CIFAR_NUM_TEST, 32, 32, 3)
    assert ds.train.images.dtype == np.float32 and ds.test.images.dtype == np.float32
    assert ds.train.labels.dtype == np.int64 and ds.train.indices.dtype == np.int64
    np.testing.assert_array_equal(ds.train.labels, raw["train_labels"])
    np.testing.assert_array_equal(ds.test.labels, raw["test_labels"])
    np.testing.assert_array_equal(ds.train.indices, np.arange(num_train))
    assert ds.num_classes == 10
    assert ds.class_names[0] == "airplane" and ds.class_names[9] == "truck"
    # Pixel (h, w) of channel c sits at c * 1024 + h * 32 + w in the raw row.
    for image, h, w, c in [(0, 0, 0, 0), (11, 7, 20, 1), (39, 31, 0, 2), (17, 3, 30, 0)]:
        value = raw["train_rows"][image, c * 1024 + h * 32 + w]
        assert ds.train.images[image, h, w, c] == np.float32(value) / np.float32(255)
    expected = np.empty((32, 32, 3), np.float64)
    row = raw["test_rows"][4]
    for h in range(32):
        for w in range(32):
            for c in range(3):
                expected[h, w, c] = row[c * 1024 + h * 32 + w] / 255.0
    np.testing.assert_allclose(ds.test.images[4], expected, rtol=0, atol=1e-7)


def test_cifar10_warns_about_unofficial_checksums_once_with_the_image_counts(cifar_root, caplog):
    root, raw = cifar_root
    with caplog.at_level("WARNING"):
        for _ in range(3):  # a run loads the data more than once (its checks, then the run)
            load_dataset("cifar10", root=root, num_train=10, num_test=5)
            load_dataset("cifar2", root=root, num_train=10, num_test=5)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    (message,) = warnings
    assert "not the official dataset" in message and "data_batch_1" in message
    train, test = len(raw["train_labels"]), len(raw["test_labels"])
    assert f"they hold {train:,} train and {test:,} test images, not 50,000 and 10,000" in message


def test_cifar10_extracts_tar_gz_when_folder_absent(tmp_path):
    staging = tmp_path / "staging"
    raw = write_cifar_folder(staging / "cifar-10-batches-py", seed=3)
    root = tmp_path / "root"
    root.mkdir()
    make_tar(
        root / "cifar-10-python.tar.gz", staging / "cifar-10-batches-py", "cifar-10-batches-py"
    )
    ds = load_dataset("cifar10", root=root, normalize=False)
    assert sorted(os.listdir(root / "cifar-10-batches-py")) == sorted(CIFAR_FILES)
    assert sorted(os.listdir(root)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    np.testing.assert_array_equal(ds.test.labels, raw["test_labels"])
    value = raw["train_rows"][5, 2 * 1024 + 9 * 32 + 4]
    assert ds.train.images[5, 9, 4, 2] == np.float32(value) / np.float32(255)


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_cifar10_rejects_unsafe_archive(tmp_path, kind):
    staging = tmp_path / "staging"
    write_cifar_folder(staging / "cifar-10-batches-py")
    root = tmp_path / "root"
    root.mkdir()
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        payload = b"evil"
        if kind == "symlink":
            info = tarfile.TarInfo("cifar-10-batches-py/link")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            name = "../evil.txt" if kind == "parent" else str(tmp_path / "evil.txt")
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ValueError, match="unsafe member"):
        load_dataset("cifar10", root=root)
    assert not (tmp_path / "evil.txt").exists() and not (root / "evil.txt").exists()
    assert os.listdir(root) == ["cifar-10-python.tar.gz"]  # no folder, no temp dir left


def test_cifar10_invalid_batches_raise(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_folder(folder)
    rewrite_batch(folder, "data_batch_2", labels=[10] * CIFAR_PER_BATCH)
    with pytest.raises(ValueError, match=r"0\.\.9"):
        load_dataset("cifar10", root=tmp_path)
    rewrite_batch(folder, "data_batch_2", labels=[0] * CIFAR_PER_BATCH)
    rewrite_batch(folder, "data_batch_3", data=np.zeros((CIFAR_PER_BATCH, 3000), np.uint8))
    with pytest.raises(ValueError, match="3072"):
        load_dataset("cifar10", root=tmp_path)


class _MakeDirOnLoad:
    """Pickles as a call to os.mkdir: a safe loader must refuse it instead of running it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def test_cifar10_refuses_pickled_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_folder(folder)
    marker = tmp_path / "marker"
    rewrite_batch(folder, "data_batch_1", labels=_MakeDirOnLoad(marker))
    with pytest.raises(ValueError, match="refusing"):
        load_dataset("cifar10", root=tmp_path)
    assert not marker.exists()


def test_cifar2_binary_labels_and_stratified_by_original_classes(cifar_root):
    root, raw = cifar_root
    full = load_dataset("cifar2", root=root, normalize=False)
    assert full.num_classes == 2 and len(full.class_names) == 2
    np.testing.assert_array_equal(full.train.labels, (raw["train_labels"] >= 5).astype(int))
    np.testing.assert_array_equal(full.test.labels, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    sub = load_dataset("cifar2", root=root, num_train=12, normalize=False, seed=1)
    # Hand-computed largest-remainder quotas: 12 * counts / 40 = [2.4, 1.8, 1.5, 1.2, 1.2, 0.9,
    # 0.9, 0.9, 0.6, 0.6] -> floors sum to 6; the 6 largest remainders are classes 5, 6, 7, 1, 8, 9.
    original = raw["train_labels"][sub.train.indices]
    np.testing.assert_array_equal(
        np.bincount(original, minlength=10), [2, 2, 1, 1, 1, 1, 1, 1, 1, 1]
    )
    np.testing.assert_array_equal(sub.train.labels, (original >= 5).astype(int))


# --------------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------------


def test_normalization_uses_full_train_statistics(cifar_root):
    root, raw = cifar_root
    train_rows = raw["train_rows"].astype(np.float64) / 255.0
    test_rows = raw["test_rows"].astype(np.float64) / 255.0
    mean = np.array([train_rows[:, c * 1024 : (c + 1) * 1024].mean() for c in range(3)])
    std = np.array([train_rows[:, c * 1024 : (c + 1) * 1024].std() for c in range(3)])

    ds = load_dataset("cifar10", root=root)
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(ds.std, std, rtol=1e-6)
    assert ds.mean.shape == (3,) and ds.std.shape == (3,)
    np.testing.assert_allclose(ds.train.images.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.train.images.std(axis=(0, 1, 2)), 1.0, atol=1e-5)
    for c in range(3):
        plane = test_rows[:, c * 1024 : (c + 1) * 1024].reshape(-1, 32, 32)
        np.testing.assert_allclose(ds.test.images[..., c], (plane - mean[c]) / std[c], atol=1e-5)

    # Statistics come from the full training split even when a subset is requested.
    sub = load_dataset("cifar10", root=root, num_train=10, num_test=3)
    np.testing.assert_allclose(sub.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(sub.std, std, rtol=1e-6)


def test_normalize_false_gives_unit_interval(cifar_root):
    root, raw = cifar_root
    ds = load_dataset("cifar10", root=root, normalize=False)
    np.testing.assert_array_equal(ds.mean, np.zeros(3))
    np.testing.assert_array_equal(ds.std, np.ones(3))
    assert ds.train.images.min() >= 0.0 and ds.train.images.max() <= 1.0
    np.testing.assert_allclose(
        ds.train.images[..., 1].reshape(len(ds.train.labels), -1),
        raw["train_rows"][:, 1024:2048] / 255.0,
        atol=1e-7,
    )


# --------------------------------------------------------------------------------------------
# MNIST family (IDX)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "kmnist"])
def test_idx_datasets_layout_pixels_and_labels(tmp_path, name, gz):
    train_labels = np.arange(12) % 10
    test_labels = np.array([9, 8, 7, 1, 0])
    arrays = write_idx_files(tmp_path / name, train_labels, test_labels, gz=gz)
    arrays["train-images-idx3-ubyte"][3, 5, 17] = 251
    (tmp_path / name / IDX_STEMS[0]).unlink(missing_ok=True)
    (tmp_path / name / f"{IDX_STEMS[0]}.gz").unlink(missing_ok=True)
    payload = idx_bytes(arrays["train-images-idx3-ubyte"])
    if gz:
        (tmp_path / name / f"{IDX_STEMS[0]}.gz").write_bytes(gzip.compress(payload))
    else:
        (tmp_path / name / IDX_STEMS[0]).write_bytes(payload)

    ds = load_dataset(name, root=tmp_path, normalize=False)
    assert ds.train.images.shape == (12, 28, 28, 1) and ds.test.images.shape == (5, 28, 28, 1)
    assert ds.train.images.dtype == np.float32 and ds.test.labels.dtype == np.int64
    assert ds.train.images[3, 5, 17, 0] == np.float32(251) / np.float32(255)
    np.testing.assert_allclose(
        ds.test.images[..., 0], arrays["t10k-images-idx3-ubyte"] / 255.0, atol=1e-7
    )
    np.testing.assert_array_equal(ds.train.labels, train_labels)
    np.testing.assert_array_equal(ds.test.labels, test_labels)
    assert ds.num_classes == 10 and len(ds.class_names) == 10


def test_idx_normalization_single_channel(tmp_path):
    arrays = write_idx_files(tmp_path / "mnist", np.arange(20) % 10, np.arange(10), gz=True)
    ds = load_dataset("mnist", root=tmp_path)
    pixels = arrays["train-images-idx3-ubyte"] / 255.0
    np.testing.assert_allclose(ds.mean, [pixels.mean()], rtol=1e-6)
    np.testing.assert_allclose(ds.std, [pixels.std()], rtol=1e-6)
    expected_test = (arrays["t10k-images-idx3-ubyte"] / 255.0 - pixels.mean()) / pixels.std()
    np.testing.assert_allclose(ds.test.images[..., 0], expected_test, atol=1e-5)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_idx_corrupt_magic_raises(tmp_path, gz):
    write_idx_files(tmp_path / "mnist", np.arange(10), np.arange(10), gz=gz)
    labels = np.arange(10, dtype=np.uint8)
    bad = bytes([0, 0, 0x08, 0x03]) + struct.pack(">III", 10, 1, 1) + labels.tobytes()
    name = "train-labels-idx1-ubyte" + (".gz" if gz else "")
    (tmp_path / "mnist" / name).write_bytes(gzip.compress(bad) if gz else bad)
    with pytest.raises(ValueError, match="magic number 0x00000803"):
        load_dataset("mnist", root=tmp_path)


@pytest.mark.parametrize("change", ["truncated", "extra bytes"])
def test_idx_payload_size_must_match_header(tmp_path, change):
    arrays = write_idx_files(tmp_path / "mnist", np.arange(10), np.arange(10), gz=False)
    path = tmp_path / "mnist" / "t10k-images-idx3-ubyte"
    payload = idx_bytes(arrays["t10k-images-idx3-ubyte"])
    path.write_bytes(payload[:-5] if change == "truncated" else payload + b"\x00" * 3)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_dataset("mnist", root=tmp_path)


def test_idx_local_files_checked_against_official_md5(tmp_path, caplog):
    write_idx_files(tmp_path / "kmnist", np.arange(10), np.arange(10), gz=True)
    write_idx_files(tmp_path / "mnist", np.arange(10), np.arange(10), gz=False)
    with caplog.at_level("WARNING"):
        load_dataset("kmnist", root=tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "not the official" in warnings[0]
    assert all(f"{stem}.gz" in warnings[0] for stem in IDX_STEMS)
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_dataset("mnist", root=tmp_path)  # decompressed files have no official md5
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_idx_count_mismatch_raises(tmp_path):
    write_idx_files(tmp_path / "mnist", np.arange(10), np.arange(10), gz=False)
    path = tmp_path / "mnist" / "t10k-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.arange(9, dtype=np.uint8)))
    with pytest.raises(ValueError, match="10 images but"):
        load_dataset("mnist", root=tmp_path)


# --------------------------------------------------------------------------------------------
# SVHN
# --------------------------------------------------------------------------------------------


def test_svhn_layout_pixels_and_label_ten_is_zero(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(32, 32, 3, 6), dtype=np.uint8)  # [H, W, C, N]
    train[4, 9, 2, 1] = 77
    test = rng.integers(0, 256, size=(32, 32, 3, 4), dtype=np.uint8)
    write_svhn_mat(tmp_path / "svhn" / "train_32x32.mat", train, np.array([10, 1, 5, 10, 9, 3]))
    write_svhn_mat(tmp_path / "svhn" / "test_32x32.mat", test, np.array([2, 10, 10, 7]))
    ds = load_dataset("svhn", root=tmp_path, normalize=False)
    assert ds.train.images.shape == (6, 32, 32, 3) and ds.test.images.shape == (4, 32, 32, 3)
    assert ds.train.images[1, 4, 9, 2] == np.float32(77) / np.float32(255)
    assert ds.test.images[3, 31, 0, 1] == np.float32(test[31, 0, 1, 3]) / np.float32(255)
    np.testing.assert_array_equal(ds.train.labels, [0, 1, 5, 0, 9, 3])
    np.testing.assert_array_equal(ds.test.labels, [2, 0, 0, 7])
    assert ds.num_classes == 10


def test_svhn_rejects_wrong_image_shape(tmp_path):
    images = np.zeros((28, 28, 3, 2), np.uint8)
    write_svhn_mat(tmp_path / "svhn" / "train_32x32.mat", images, np.array([1, 2]))
    write_svhn_mat(tmp_path / "svhn" / "test_32x32.mat", images, np.array([1, 2]))
    with pytest.raises(ValueError, match=r"\[32, 32, 3, N\]"):
        load_dataset("svhn", root=tmp_path)


# --------------------------------------------------------------------------------------------
# digits (offline default)
# --------------------------------------------------------------------------------------------


def test_digits_loads_offline_with_fixed_split(tmp_path):
    from sklearn.datasets import load_digits

    reference = load_digits()
    ds = load_dataset("digits", root=tmp_path / "nowhere", normalize=False)
    assert ds.train.images.shape == (1437, 8, 8, 1) and ds.test.images.shape == (360, 8, 8, 1)
    np.testing.assert_allclose(ds.train.images[..., 0], reference.images[:1437] / 16.0, atol=1e-7)
    np.testing.assert_allclose(ds.test.images[..., 0], reference.images[1437:] / 16.0, atol=1e-7)
    np.testing.assert_array_equal(ds.test.labels, reference.target[1437:])
    np.testing.assert_array_equal(ds.test.indices, np.arange(360))
    assert ds.num_classes == 10
    assert not (tmp_path / "nowhere").exists()


# --------------------------------------------------------------------------------------------
# Stratified subsets
# --------------------------------------------------------------------------------------------


def test_subset_quotas_use_largest_remainder(tmp_path):
    # Counts [7, 4, 2] (N=13), 5 samples: exact shares 2.69, 1.54, 0.77 -> floors 2, 1, 0; the two
    # remaining slots go to the largest remainders (classes 2 and 0) -> [3, 1, 1]. Plain rounding
    # would give 6 samples, and topping up the largest classes would give [3, 2, 0].
    train_labels = np.array([0, 1, 0, 2, 0, 1, 0, 0, 2, 1, 0, 1, 0])
    write_idx_files(tmp_path / "mnist", train_labels, np.arange(10), gz=False)
    ds = load_dataset("mnist", root=tmp_path, num_train=5, num_test=10)
    np.testing.assert_array_equal(np.bincount(ds.train.labels, minlength=3), [3, 1, 1])
    np.testing.assert_array_equal(train_labels[ds.train.indices], ds.train.labels)
    np.testing.assert_array_equal(ds.test.indices, np.arange(10))


def test_subsets_are_stratified_sorted_and_consistent():
    full = load_dataset("digits", normalize=False)
    ds = load_dataset("digits", normalize=False, num_train=100, num_test=37, seed=3)
    assert ds.train.images.shape == (100, 8, 8, 1) and ds.test.images.shape == (37, 8, 8, 1)
    for split, whole, num in [(ds.train, full.train, 100), (ds.test, full.test, 37)]:
        assert split.indices.dtype == np.int64
        assert np.all(np.diff(split.indices) > 0)  # sorted, no repeats
        np.testing.assert_array_equal(split.images, whole.images[split.indices])
        np.testing.assert_array_equal(split.labels, whole.labels[split.indices])
        share = num * np.bincount(whole.labels, minlength=10) / len(whole.labels)
        counts = np.bincount(split.labels, minlength=10)
        assert np.all(counts >= np.floor(share)) and np.all(counts <= np.ceil(share))


def test_subsets_deterministic_and_seeded():
    first = load_dataset("digits", num_train=50, num_test=20, seed=0)
    again = load_dataset("digits", num_train=50, num_test=20, seed=0)
    other = load_dataset("digits", num_train=50, num_test=20, seed=1)
    np.testing.assert_array_equal(first.train.indices, again.train.indices)
    np.testing.assert_array_equal(first.test.indices, again.test.indices)
    np.testing.assert_array_equal(first.train.images, again.train.images)
    assert not np.array_equal(first.train.indices, other.train.indices)
    assert not np.array_equal(first.test.indices, other.test.indices)


@pytest.mark.parametrize(
    ("option", "value", "size"),
    [
        ("num_train", 0, 1437),
        ("num_train", -5, 1437),
        ("num_train", 1438, 1437),
        ("num_test", 361, 360),
        ("num_test", 0, 360),
    ],
)
def test_bad_subset_sizes_raise(option, value, size):
    with pytest.raises(ValueError, match=rf"{option}={value}\b.*{size}"):
        load_dataset("digits", **{option: value})


def test_negative_seed_raises():
    with pytest.raises(ValueError, match="seed=-1"):
        load_dataset("digits", num_train=10, seed=-1)


# --------------------------------------------------------------------------------------------
# Missing files and downloads
# --------------------------------------------------------------------------------------------

MISSING_CASES = {
    "cifar10": ("cifar-10-batches-py", CIFAR_FILES, "https://www.cs.toronto.edu/~kriz/"),
    "cifar2": ("cifar-10-batches-py", CIFAR_FILES, "https://www.cs.toronto.edu/~kriz/"),
    "mnist": ("mnist", IDX_STEMS, "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    "fashion_mnist": (
        "fashion_mnist",
        IDX_STEMS,
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ),
    "kmnist": ("kmnist", IDX_STEMS, "http://codh.rois.ac.jp/kmnist/dataset/kmnist/"),
    "svhn": ("svhn", ["train_32x32.mat", "test_32x32.mat"], "http://ufldl.stanford.edu/"),
}


@pytest.mark.parametrize("name", sorted(MISSING_CASES))
def test_missing_files_error_names_folder_files_url_and_hint(tmp_path, name):
    folder, files, url = MISSING_CASES[name]
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(name, root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / folder) in message
    for file in files:
        assert file in message
    assert url in message
    assert "set data.download=true" in message.lower()
    assert listing(tmp_path) == []  # nothing created


def test_incomplete_cifar_folder_names_missing_file(cifar_root):
    root, _ = cifar_root
    (root / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete: missing data_batch_4"):
        load_dataset("cifar10", root=root)


class _FailingResponse:
    """A response that delivers some bytes, then drops the connection."""

    def __init__(self):
        self.calls = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, size=-1):
        self.calls += 1
        if self.calls == 1:
            return b"partial payload"
        raise ConnectionResetError("connection reset by peer")


def test_failed_download_leaves_no_partial_file(tmp_path, monkeypatch):
    opened = []

    def fake_open(url):
        opened.append(url)
        return _FailingResponse()

    monkeypatch.setattr(download_module, "_open_url", fake_open)
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", root=tmp_path, download=True)
    message = str(info.value)
    assert "connection reset" in message and "train-images-idx3-ubyte" in message
    assert "set data.download=true" not in message.lower()
    # Primary mirror first, then the fallback.
    assert opened[:2] == [
        "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz",
        "http://yann.lecun.com/exdb/mnist/train-images-idx3-ubyte.gz",
    ]
    assert listing(tmp_path) == ["mnist"]  # the folder, but no .part and no target file


def test_download_with_wrong_checksum_is_rejected(tmp_path, monkeypatch):
    server = tmp_path / "server"
    images = np.zeros((32, 32, 3, 2), np.uint8)
    write_svhn_mat(server / "train_32x32.mat", images, np.array([1, 2]))
    write_svhn_mat(server / "test_32x32.mat", images, np.array([1, 2]))
    monkeypatch.setattr(svhn, "BASE_URL", server.as_uri() + "/")
    root = tmp_path / "root"
    with pytest.raises(FileNotFoundError, match="checksum mismatch"):
        load_dataset("svhn", root=root, download=True)
    assert listing(root) == ["svhn"]


def test_download_falls_back_to_mirror_and_verifies(tmp_path, monkeypatch):
    server = tmp_path / "server"
    arrays = write_idx_files(server, np.arange(10), np.arange(5), gz=True)
    md5 = {f"{stem}.gz": md5_of(server / f"{stem}.gz") for stem in IDX_STEMS}
    source = mnist_family.IdxSource(
        mirrors=((tmp_path / "dead").as_uri() + "/", server.as_uri() + "/"),
        md5=md5,
        class_names=tuple("0123456789"),
    )
    monkeypatch.setitem(mnist_family.SOURCES, "mnist", source)
    root = tmp_path / "root"
    ds = load_dataset("mnist", root=root, download=True, normalize=False)
    assert listing(root) == ["mnist"] + [f"mnist/{stem}.gz" for stem in sorted(IDX_STEMS)]
    for stem in IDX_STEMS:
        assert md5_of(root / "mnist" / f"{stem}.gz") == md5[f"{stem}.gz"]
    np.testing.assert_allclose(
        ds.train.images[..., 0], arrays["train-images-idx3-ubyte"] / 255.0, atol=1e-7
    )


def test_cifar_download_checks_archive_checksum(tmp_path, monkeypatch):
    staging = tmp_path / "staging"
    raw = write_cifar_folder(staging / "cifar-10-batches-py")
    served = tmp_path / "server" / "cifar-10-python.tar.gz"
    served.parent.mkdir()
    make_tar(served, staging / "cifar-10-batches-py", "cifar-10-batches-py")
    monkeypatch.setattr(cifar_module, "CIFAR10_URL", served.as_uri())
    root = tmp_path / "root"
    with pytest.raises(FileNotFoundError, match="checksum mismatch"):
        load_dataset("cifar10", root=root, download=True)
    assert listing(root) == []  # no archive, no .part, no folder

    monkeypatch.setattr(cifar_module, "CIFAR10_MD5", md5_of(served))
    ds = load_dataset("cifar10", root=root, download=True)
    assert sorted(os.listdir(root)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    np.testing.assert_array_equal(ds.train.labels, raw["train_labels"])


# --------------------------------------------------------------------------------------------
# Real CIFAR-10 subset (shared data)
# --------------------------------------------------------------------------------------------


def test_real_cifar10_subset():
    folder = SHARED_DATA / "cifar-10-batches-py"
    if not folder.is_dir():
        pytest.skip(f"real CIFAR-10 subset not found at {folder}")
    ds = load_dataset("cifar10", root=SHARED_DATA, normalize=False)
    assert ds.train.images.shape == (5085, 32, 32, 3)
    assert ds.test.images.shape == (1017, 32, 32, 3)
    assert ds.train.labels.min() == 0 and ds.train.labels.max() == 9
    assert set(np.unique(ds.test.labels)) == set(range(10))
    with open(folder / "data_batch_3", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    np.testing.assert_array_equal(ds.train.labels[2 * 1017 : 3 * 1017], batch[b"labels"])
    row = batch[b"data"][100]
    for h, w, c in [(0, 0, 0), (5, 17, 1), (31, 30, 2)]:
        value = np.float32(row[c * 1024 + h * 32 + w]) / np.float32(255)
        assert ds.train.images[2 * 1017 + 100, h, w, c] == value
    assert ds.class_names[3] == "cat"
    normalized = load_dataset("cifar10", root=SHARED_DATA, num_train=500, num_test=100)
    assert normalized.train.images.shape == (500, 32, 32, 3)
    assert np.all(normalized.std > 0.2) and np.all(normalized.std < 0.3)
