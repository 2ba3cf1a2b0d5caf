"""Aggregating the alignment arrays of an eigenfunction sweep's network runs over seeds.

Dimensions: k' eigenvector indices v, K trained indices k, T epochs, L layers.

    for growth in alignment_growth(rows):      # alignment.npz
        growth.indices, growth.ratios[9]         # [k'], normalised growth [k'] at trained k = 9
    for history in alignment_history(rows):    # alignment_history.npz
        epochs, d_mean, d_std, g_mean, g_std, n = history.curves[9]      # each [T]
    for layers in alignment_layers(rows):      # alignment_layers.npz
        mean, std, whole, n = layers.growth[9]   # [L], [L], float, int
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from ntklab.plots import normalized_ratio
from ntklab.report._aggregate import band_label, groups, mean_std, title_of


@dataclasses.dataclass
class AlignmentGrowth:
    """The normalised growth φ_vᵀK_Tφ_v / φ_vᵀK_0φ_v ÷ median over v, per trained index.

    Attributes:
      group: the values that define the group.
      members: the group's network runs with ``alignment.npz``.
      title: the figure title.
      indices: eigenvector indices v [k'], the union over the runs, ascending.
      ratios: ``trained k -> mean over seeds [k']`` (NaN where no run measured v).
      counts: ``trained k -> number of runs``.
    """

    group: dict[str, Any]
    members: list[dict[str, Any]]
    title: str
    indices: np.ndarray
    ratios: dict[int, np.ndarray]
    counts: dict[int, int]


@dataclasses.dataclass
class AlignmentHistory:
    """d(t) and the trained index's growth q_k(t) / q_k(0) over epochs, per trained index.

    Attributes:
      group, members, title: as in :class:`AlignmentGrowth` (runs with the history).
      curves: ``trained k -> (epochs [T], d mean [T], d std [T], growth mean [T], growth std [T],
        n)`` over the n seeds, on the epochs every seed evaluated (std NaN for one run).
      band: what the bands span (:func:`ntklab.report.band_label`).
    """

    group: dict[str, Any]
    members: list[dict[str, Any]]
    title: str
    curves: dict[int, tuple]
    band: str


@dataclasses.dataclass
class AlignmentLayers:
    """Each layer's growth q_l(T) / q_l(0) at the trained index, per trained index.

    Attributes:
      group, members, title: as in :class:`AlignmentGrowth` (runs with the layer arrays).
      layers: module paths [L].
      growth: ``trained k -> (mean [L], std [L], whole kernel's mean growth, n)`` over seeds.
    """

    group: dict[str, Any]
    members: list[dict[str, Any]]
    title: str
    layers: list[str]
    growth: dict[int, tuple]


def _network_runs(rows: Sequence[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The eigenfunction sweep's network runs that hold ``name`` (``alignment``, ...)."""
    return [
        row
        for row in rows
        if row.get("script") == "train_ntk"
        and row.get("label_idx") is not None
        and row.get("mode", "network") == "network"
        and not row.get("linearize", False)
        and name in row.get("_arrays", {})
    ]


def _position(indices: np.ndarray, k: int) -> int | None:
    where = np.flatnonzero(np.asarray(indices) == k)
    return int(where[0]) if where.size else None


def alignment_growth(rows: Sequence[dict[str, Any]]) -> list[AlignmentGrowth]:
    """The normalised growth of every group of network runs that saved ``alignment.npz``.

    Args:
      rows: rows from :func:`ntklab.report.read_sweep`.

    Returns:
      One :class:`AlignmentGrowth` per group (the growth of all samples' quotients).
    """
    found = []
    for group, _, members in groups(_network_runs(rows, "alignment")):
        loaded = [
            (int(row["label_idx"]), row["_arrays"]["alignment"])
            for row in members
            if {"indices", "init_all", "final_all"} <= set(row["_arrays"]["alignment"])
        ]
        if not loaded:
            continue
        indices = functools.reduce(np.union1d, [np.asarray(a["indices"]) for _, a in loaded])
        per_index: dict[int, list[np.ndarray]] = defaultdict(list)
        for k, arrays in loaded:
            full = np.full(len(indices), np.nan)
            ratio = normalized_ratio(arrays["final_all"], arrays["init_all"])
            full[np.searchsorted(indices, arrays["indices"])] = ratio
            per_index[k].append(full)
        ratios = {k: _finite_mean(v) for k, v in sorted(per_index.items())}
        counts = {k: len(v) for k, v in per_index.items()}
        found.append(
            AlignmentGrowth(group, members, title_of(group, members), indices, ratios, counts)
        )
    return found


def _finite_mean(values: list[np.ndarray]) -> np.ndarray:
    """Mean over runs [n, k'] -> [k'] of the finite values; NaN where no run measured v."""
    stack = np.stack(values)
    measured = np.isfinite(stack)
    total = np.where(measured, stack, 0.0).sum(axis=0)
    count = measured.sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _on_common_epochs(entries: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, list]:
    """The epochs every run evaluated, and each run's arrays [T] restricted to them."""
    common = functools.reduce(np.intersect1d, [entry[0] for entry in entries])
    restricted = []
    for epochs, *arrays in entries:
        keep = np.searchsorted(epochs, common)
        restricted.append([np.asarray(a, np.float64)[keep] for a in arrays])
    return common, restricted


def alignment_history(rows: Sequence[dict[str, Any]]) -> list[AlignmentHistory]:
    """d(t) and the trained index's growth of every group of runs with ``alignment_history.npz``.

    Args:
      rows: rows from :func:`ntklab.report.read_sweep`.

    Returns:
      One :class:`AlignmentHistory` per group; runs whose history lacks their trained index
      are skipped.
    """
    found = []
    for group, _, members in groups(_network_runs(rows, "alignment_history")):
        by_index: dict[int, list] = defaultdict(list)
        for row in members:
            arrays, k = row["_arrays"]["alignment_history"], int(row["label_idx"])
            position = _position(arrays["indices"], k)
            if position is None:
                continue
            epochs = np.asarray(arrays["epochs"])
            order = np.argsort(epochs, kind="stable")
            quotient = np.asarray(arrays["all"], np.float64)[:, position]
            with np.errstate(all="ignore"):
                growth = quotient / quotient[np.argmin(epochs)]
            by_index[k].append(
                (epochs[order], np.asarray(arrays["kernel_distance"])[order], growth[order])
            )
        curves = {}
        for k, entries in sorted(by_index.items()):
            epochs, restricted = _on_common_epochs(entries)
            distance = mean_std([r[0] for r in restricted])
            growth = mean_std([r[1] for r in restricted])
            curves[k] = (epochs, *distance, *growth, len(entries))
        if curves:
            title = title_of(group, members)
            found.append(
                AlignmentHistory(group, members, title, curves, band_label(members, "label_idx"))
            )
    return found


def alignment_layers(rows: Sequence[dict[str, Any]]) -> list[AlignmentLayers]:
    """Each layer's growth at the trained index, per group of runs with ``alignment_layers.npz``.

    Args:
      rows: rows from :func:`ntklab.report.read_sweep`.

    Returns:
      One :class:`AlignmentLayers` per group; runs whose layers differ from the group's first
      run's, or that lack their trained index, are skipped.
    """
    found = []
    for group, _, members in groups(_network_runs(rows, "alignment_layers")):
        layers: list[str] | None = None
        by_index: dict[int, list] = defaultdict(list)
        for row in members:
            arrays, k = row["_arrays"]["alignment_layers"], int(row["label_idx"])
            names = [str(name) for name in np.asarray(arrays["layers"]).tolist()]
            layers = names if layers is None else layers
            position = _position(arrays["indices"], k)
            if names != layers or position is None:
                continue
            start = np.asarray(arrays["init_all"], np.float64)[:, position]
            end = np.asarray(arrays["final_all"], np.float64)[:, position]
            with np.errstate(all="ignore"):
                by_index[k].append((end / start, end.sum() / start.sum()))
        growth = {}
        for k, entries in sorted(by_index.items()):
            mean, std = mean_std([entry[0] for entry in entries])
            whole = float(np.mean([entry[1] for entry in entries]))
            growth[k] = (mean, std, whole, len(entries))
        if growth and layers is not None:
            found.append(AlignmentLayers(group, members, title_of(group, members), layers, growth))
    return found
