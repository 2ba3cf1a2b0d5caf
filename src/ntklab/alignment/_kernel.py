"""Quotients of a formed kernel: φᵀKφ/‖φ‖² of K in memory or memory-mapped, by row panels.

Dimensions: N examples (N_train first), k vectors.

    quotients, frobenius_sq = quotients_of_kernel(kernel, eigvecs, num_train=n)
    quotients["test"]       # [k] φ_teᵀ K_te,te φ_te / ‖φ_te‖²
"""

from __future__ import annotations

import numpy as np

from ntklab import threads

__all__ = ["quotients_of_kernel"]

PANEL_BYTES = 1 << 27
"""Rows of the kernel read at once (128 MiB as float64)."""


def quotients_of_kernel(
    kernel: np.ndarray, vectors: np.ndarray, *, num_train: int | None = None
) -> tuple[dict[str, np.ndarray], float]:
    """The Rayleigh quotients of ``kernel`` for ``vectors`` on train, test and all rows.

    Args:
      kernel: K [N, N], symmetric (an array or a ``np.memmap``; read in row panels).
      vectors: φ [k, N], one per row.
      num_train: rows ``[:num_train]`` are the train part; None: only ``"all"``.

    Returns:
      ``({"train", "test", "all"} -> [k] float64, ‖K‖_F²)``; NaN where φ is zero on a part.

    Raises:
      ValueError: shapes that do not match, or ``num_train`` outside [1, N − 1].
    """
    vectors = np.asarray(vectors, np.float64)
    n = kernel.shape[0]
    if kernel.shape != (n, n) or vectors.ndim != 2 or vectors.shape[1] != n:
        raise ValueError(f"need K [N, N] and vectors [k, N]: got {kernel.shape}, {vectors.shape}")
    if num_train is not None and not 1 <= num_train < n:
        raise ValueError(f"num_train={num_train} must be between 1 and N - 1 = {n - 1}")
    split = n if num_train is None else num_train
    phi_train, phi_test = vectors[:, :split].T, vectors[:, split:].T
    sums = {"train": 0.0, "test": 0.0, "cross": 0.0}
    frobenius_sq = 0.0
    rows_per_panel = max(1, PANEL_BYTES // (8 * n))
    with threads.host_only(flops=4.0 * n * n * len(vectors), what="kernel quotients"):
        for start in range(0, n, rows_per_panel):
            stop = min(start + rows_per_panel, n)
            panel = np.asarray(kernel[start:stop], np.float64)
            frobenius_sq += float(np.vdot(panel, panel))
            to_train = panel[:, :split] @ phi_train  # [b, k]: (K φ_train) on these rows
            to_test = panel[:, split:] @ phi_test
            cut = min(max(split - start, 0), stop - start)
            rows = vectors[:, start:stop].T
            sums["train"] += np.einsum("ik,ik->k", rows[:cut], to_train[:cut])
            sums["test"] += np.einsum("ik,ik->k", rows[cut:], to_test[cut:])
            sums["cross"] += np.einsum("ik,ik->k", rows[:cut], to_test[:cut]) + np.einsum(
                "ik,ik->k", rows[cut:], to_train[cut:]
            )
    numerators = {
        "train": sums["train"],
        "test": sums["test"],
        "all": sums["train"] + sums["test"] + sums["cross"],
    }
    norms = {
        "train": np.sum(phi_train**2, axis=0),
        "test": np.sum(phi_test**2, axis=0),
        "all": np.sum(vectors**2, axis=1),
    }
    kept = ("train", "test", "all") if num_train is not None else ("all",)
    with np.errstate(invalid="ignore", divide="ignore"):
        quotients = {
            name: np.where(norms[name] > 0, numerators[name] / norms[name], np.nan) for name in kept
        }
    return quotients, frobenius_sq
