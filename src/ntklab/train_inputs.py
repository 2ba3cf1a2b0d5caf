"""The trainer's inputs: checked finite and well-shaped, and each epoch's example order.

Dimensions: N_train, N_test examples.

    x_train, y_train, x_test, y_test = check_data(x_train, y_train, x_test, y_test)
    order = epoch_order(jax.random.PRNGKey(seed), epoch, len(x_train))   # [N_train] permutation
"""

from __future__ import annotations

import jax
import numpy as np

__all__ = ["check_data", "check_finite", "epoch_order"]


def epoch_order(key: jax.Array, epoch: int, num_train: int) -> np.ndarray:
    """The order [N_train] of an epoch, drawn from ``fold_in(key, epoch)``.

    The permutation itself is drawn by NumPy seeded with the folded key's bits: the same
    (seed, epoch) give the same order, without compiling a sort for every N_train.
    """
    bits = np.asarray(jax.random.key_data(jax.random.fold_in(key, epoch)), np.uint32)
    return np.random.default_rng(bits.ravel()).permutation(num_train)


def check_data(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    arrays = [np.asarray(a) for a in (x_train, y_train, x_test, y_test)]
    x_train, y_train, x_test, y_test = arrays
    if not len(x_train):
        raise ValueError("x_train is empty; the trainer needs at least one train example")
    for name, array in zip(("x_train", "y_train", "x_test", "y_test"), arrays, strict=True):
        check_finite(name, array)
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"y_{name} must be [N_{name}] = [{len(x)}], got shape {y.shape}")
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"y_{name} must hold labels 0 and 1, got values {np.unique(y)[:5]}")
    if x_train.shape[1:] != x_test.shape[1:] and len(x_test):
        raise ValueError(f"x_train {x_train.shape} and x_test {x_test.shape} differ per example")
    dtype = x_train.dtype if np.issubdtype(x_train.dtype, np.floating) else np.float32
    return x_train, y_train.astype(dtype), x_test.astype(x_train.dtype), y_test.astype(dtype)


def check_finite(name: str, array: np.ndarray, rows: int = 4096) -> None:
    """Raises ValueError naming ``name`` and its first non-finite element (checked in row chunks)."""
    if not np.issubdtype(array.dtype, np.inexact):
        return
    bad_rows = []  # rows holding a NaN or an infinity, checked in chunks of ``rows``
    for start in range(0, len(array), rows):
        chunk = ~np.isfinite(array[start : start + rows]).reshape(min(rows, len(array) - start), -1)
        bad_rows += (np.flatnonzero(chunk.any(axis=1)) + start).tolist()
    if bad_rows:
        first = bad_rows[0]
        index = (first, *(int(i) for i in np.argwhere(~np.isfinite(array[first]))[0]))
        raise ValueError(
            f"{name} holds non-finite values in {len(bad_rows)} row(s), the first in row {first} "
            f"({array[index]} at index {index}); the trainer accepts only finite inputs and labels"
        )
