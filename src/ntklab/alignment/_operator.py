"""Rayleigh quotients φᵀKφ/‖φ‖² of the empirical NTK by either method, and which vectors to align.

Dimensions: N examples (N_train first, then N_test), k vectors, m vectors per product, B examples
per block, P parameters.

    indices = aligned_indices(None, num_available=200, label_idx=3)   # all 200, clamped if more
    quotients = rayleigh_quotients(apply_fn, params, x, eigvecs, num_train=n)
    # x [N, H, W, C], eigvecs [k, N] -> {"train": [k], "test": [k], "all": [k]}

Two methods, both on the engine's shared feature backend (sharded over all devices, Dense layers
factored where proven exact):

- ``"kernel"`` (``"auto"``): one streamed pass over the kernel's blocks
  (:func:`ntklab.alignment.measure_kernel`): every quotient is accumulated block by block and
  the N×N kernel is never held; its cost is one kernel.
- ``"operator"``: the matrix-free :class:`ntklab.ntk.KernelOperator` applied to blocks of m
  vectors, each split into its train and test rows: K[φ_tr; 0] and K[0; φ_te] give the
  quotients of K[train, train], K[test, test] and, with the cross term, of the whole K. Memory
  O(m·P) plus one block's features, whatever N.

For the kernel at the end of training pass the trained parameters and, for BatchNorm networks,
an ``apply_fn`` in inference mode with the **trained** running statistics
(``ntklab.models.inference_apply_fn(model, {"batch_stats": trained_stats})``). For C > 1
outputs the quotients are those of the trace kernel Σ_c Θ[:, :, c, c].
"""

from __future__ import annotations

import logging
import math
import time
from typing import Literal

import jax
import numpy as np

from ntklab.alignment._stream import measure_kernel
from ntklab.ntk import KernelOperator
from ntklab.progress import progress_bar
from ntklab.types import ApplyFn, PyTree

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "aligned_indices", "rayleigh_quotients"]

METHODS: tuple[str, ...] = ("auto", "kernel", "operator")


def aligned_indices(num_eigvecs: int | None, *, num_available: int, label_idx: int) -> np.ndarray:
    """Indices of the eigenvectors to align: the first ``num_eigvecs`` and ``label_idx``.

    Args:
      num_eigvecs: how many leading eigenvectors; None means all ``num_available``. A larger
        request is clamped to ``num_available`` with a log line.
      num_available: eigenvectors the run has.
      label_idx: the trained eigenvector, always included.

    Returns:
      Sorted indices [k], int.

    Raises:
      ValueError: ``num_eigvecs`` < 1 or ``label_idx`` outside [0, num_available).
    """
    if not 0 <= label_idx < num_available:
        raise ValueError(f"label_idx={label_idx} must be in 0..{num_available - 1}")
    if num_eigvecs is None:
        num_eigvecs = num_available
    if isinstance(num_eigvecs, bool) or not isinstance(num_eigvecs, int) or num_eigvecs < 1:
        raise ValueError(
            f"alignment num_eigvecs must be a positive integer or None, got {num_eigvecs!r}"
        )
    if num_eigvecs > num_available:
        logger.info(
            "alignment: %d eigenvectors requested, the run has %d: aligning all %d",
            num_eigvecs, num_available, num_available,
        )  # fmt: skip
        num_eigvecs = num_available
    return np.array(sorted(set(range(num_eigvecs)) | {label_idx}))


def rayleigh_quotients(
    apply_fn: ApplyFn,
    params: PyTree,
    x: np.ndarray | jax.Array,
    vectors: np.ndarray,
    *,
    num_train: int | None = None,
    batch_size: int = 128,
    vector_batch_size: int = 8,
    method: Literal["auto", "kernel", "operator"] = "auto",
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Rayleigh quotients ``φᵀKφ / ‖φ‖²`` of the eNTK K (see the module docstring).

    Args:
      apply_fn: ``apply_fn(params, x[B, ...]) -> outputs [B, C]``, BatchNorm in inference mode.
      params: parameters at which the kernel is taken.
      x: inputs [N, ...], in the order of the vectors' entries.
      vectors: vectors [k, N], one per row (e.g. the initial eigenvectors).
      num_train: if given, rows ``[:num_train]`` are the train part and the rest the test part,
        and the quotients of both diagonal blocks are returned too.
      batch_size: examples per block of the engine.
      vector_batch_size: vectors per operator product (m); memory grows as m·P.
      method: ``"kernel"`` (a streamed pass; ``"auto"``) or ``"operator"``.
      progress: show progress bars.

    Returns:
      ``{"all": [k]}``, plus ``"train": [k]`` and ``"test": [k]`` with ``num_train``; float64.
      A vector that is zero on a part gives NaN there.

    Raises:
      ValueError: shapes that do not match, ``num_train`` outside [1, N − 1], an unknown method
        or non-positive batch sizes.
    """
    vectors = np.asarray(vectors)
    n = len(x)
    if vectors.ndim != 2 or vectors.shape[1] != n:
        raise ValueError(f"vectors must be [k, N] with N = len(x) = {n}, got {vectors.shape}")
    if num_train is not None and not 1 <= num_train < n:
        raise ValueError(f"num_train={num_train} must be between 1 and N - 1 = {n - 1}")
    for name, value in (("batch_size", batch_size), ("vector_batch_size", vector_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if method not in METHODS:
        raise ValueError(
            f"unknown alignment method {method!r}; valid choices: {', '.join(METHODS)}"
        )
    method = "kernel" if method == "auto" else method
    split = num_train if num_train is not None else n
    logger.info("alignment: %d vectors, N=%d (%d train), method %s", len(vectors), n, split, method)
    start = time.perf_counter()
    phi = vectors.astype(np.float64)
    if method == "kernel":
        measured = measure_kernel(
            apply_fn, params, x, phi, num_train=num_train, batch_size=batch_size,
            progress=progress,
        )  # fmt: skip
        logger.info("alignment: %d quotients by the kernel's blocks in %.2f s", len(vectors),
                    time.perf_counter() - start)  # fmt: skip
        return measured.quotients
    numerators = _from_operator(
        KernelOperator(apply_fn, params, x, batch_size=batch_size), phi, split,
        vector_batch_size, progress,
    )  # fmt: skip
    parts = {"all": slice(0, n)}
    if num_train is not None:
        parts = {"train": slice(0, split), "test": slice(split, n), "all": slice(0, n)}
    result = {}
    for name, rows in parts.items():
        denominator = np.sum(phi[:, rows] ** 2, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            result[name] = np.where(denominator > 0, numerators[name] / denominator, np.nan)
    logger.info("alignment: %d quotients by the operator in %.2f s", len(vectors),
                time.perf_counter() - start)  # fmt: skip
    return result


def _from_operator(
    operator: KernelOperator, phi: np.ndarray, split: int, width: int, progress: bool
) -> dict[str, np.ndarray]:
    """The same from products K[φ_tr; 0] and K[0; φ_te] in blocks of ``width`` vectors."""
    k, n = phi.shape
    parts: dict[str, list[np.ndarray]] = {"train": [], "test": [], "all": []}
    bar = progress_bar(total=math.ceil(k / width), desc="alignment", unit="block",
                       enabled=progress)  # fmt: skip
    try:
        for first in range(0, k, width):
            block = phi[first : first + width]
            if split == n:
                parts["all"].append(np.einsum("ki,ik->k", block, operator.matmat(block.T)))
                bar.update(1)
                continue
            masked = np.zeros((n, 2 * len(block)))
            masked[:split, : len(block)] = block[:, :split].T
            masked[split:, len(block) :] = block[:, split:].T
            product = operator.matmat(masked)
            k_tr, k_te = product[:, : len(block)], product[:, len(block) :]
            train = np.einsum("ik,ik->k", masked[:, : len(block)], k_tr)
            test = np.einsum("ik,ik->k", masked[:, len(block) :], k_te)
            cross = np.einsum("ik,ik->k", masked[:, : len(block)], k_te)
            parts["train"].append(train)
            parts["test"].append(test)
            parts["all"].append(train + test + 2 * cross)
            bar.update(1)
    finally:
        bar.close()
    return {name: np.concatenate(values) for name, values in parts.items() if values}
