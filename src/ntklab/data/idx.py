"""Reader for the IDX format of MNIST-style files (big-endian header, raw uint8 payload).

Dimensions: N examples, H height, W width.

An IDX file starts with a 4-byte magic number: two zero bytes, a type code (0x08 = uint8) and the
number of dimensions; then one big-endian uint32 per dimension; then the values, row-major.

Usage:
    images = read_idx(Path("data/mnist/train-images-idx3-ubyte.gz"), ndim=3)  # [N, H, W] uint8
    labels = read_idx(Path("data/mnist/train-labels-idx1-ubyte"), ndim=1)     # [N] uint8
"""

import gzip
import zlib
from pathlib import Path

import numpy as np

_UINT8_CODE = 0x08


def read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Reads a uint8 IDX file with `ndim` dimensions, gzipped (name ends in .gz) or plain.

    Args:
        path: the file.
        ndim: expected number of dimensions (3 for images, 1 for labels).

    Returns:
        the values, uint8, with the shape stored in the header.

    Raises:
        ValueError: bad magic number (wrong type code or dimension count), a truncated header,
            a payload size that disagrees with the header, or a corrupt gzip stream.
    """
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"corrupt gzip file {path}: {err}") from err
    expected_magic = (_UINT8_CODE << 8) | ndim
    if len(data) < 4:
        raise ValueError(f"IDX file {path} is too short ({len(data)} bytes) for a header")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"bad magic number 0x{magic:08x} in IDX file {path}; expected 0x{expected_magic:08x} "
            f"(uint8 data with {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"IDX file {path} is truncated inside its {header}-byte header")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected_bytes = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected_bytes:
        raise ValueError(
            f"IDX file {path} has {len(data)} bytes but its header {shape} implies "
            f"{expected_bytes}; the file is truncated or corrupt"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape).copy()
