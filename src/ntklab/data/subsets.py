"""Deterministic, seeded, class-stratified subsets of a split.

Dimensions: N examples in the split, n examples in the subset, K classes.

Usage:
    idx = subset_indices(labels, 1000, seed=0, split="train")  # [1000] int64, sorted
    quotas = largest_remainder_quotas(np.array([6, 3, 1]), 4)    # -> [2, 1, 1]
"""

import numpy as np

from ntklab.errors import ConfigError

SPLIT_IDS = {"train": 0, "test": 1}
"""Stream id per split: the subset of split s is drawn from default_rng((seed, SPLIT_IDS[s]))."""


def largest_remainder_quotas(counts: np.ndarray, num: int) -> np.ndarray:
    """Splits `num` among classes in proportion to `counts`, with an exact total.

    Each class gets floor(num * count / N); the remaining slots go to the classes with the largest
    fractional parts (ties: lower class position first). Exact integer arithmetic.

    Args:
        counts: class frequencies [K], int, summing to N >= num.
        num: subset size, 0 <= num <= N.

    Returns:
        quotas [K], int64, summing to `num`, each at most its count.
    """
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    quotas = counts * num // total
    remainders = counts * num % total
    short = num - int(quotas.sum())
    order = np.lexsort((np.arange(counts.size), -remainders))  # largest remainder first
    quotas[order[:short]] += 1
    return quotas


def subset_indices(strata: np.ndarray, num: int | None, *, seed: int, split: str) -> np.ndarray:
    """Chooses a stratified random subset of a split and returns its positions, sorted.

    Args:
        strata: class of each example [N], int (the original classes to stratify by).
        num: subset size, or None for the whole split.
        seed: non-negative integer seed; with `split` it fixes the subset.
        split: "train" or "test" (selects an independent random stream).

    Returns:
        positions [n], int64, sorted ascending (all N positions when `num` is None).

    Raises:
        ValueError: `num` is not an integer in [1, N], `seed` is negative, or `split` is unknown.
    """
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; valid choices: {', '.join(SPLIT_IDS)}")
    size = strata.shape[0]
    if num is None:
        return np.arange(size, dtype=np.int64)
    if isinstance(num, bool) or not isinstance(num, int | np.integer) or not 1 <= num <= size:
        raise ConfigError(
            f"data.num_{split}={num!r} is invalid: must be an integer between 1 and the {split} "
            f"split size {size} (or null for the whole split)"
        )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed={seed!r} is invalid: must be a non-negative integer")
    rng = np.random.default_rng((int(seed), SPLIT_IDS[split]))
    classes, counts = np.unique(strata, return_counts=True)
    quotas = largest_remainder_quotas(counts, int(num))
    chosen = [
        rng.choice(np.flatnonzero(strata == cls), size=quota, replace=False)
        for cls, quota in zip(classes, quotas, strict=True)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)
