"""Kernel alignment without the kernel: Rayleigh quotients φᵀKφ/‖φ‖² of the empirical NTK.

Dimensions: N examples (N_train first, then N_test), k vectors, m vectors per chunk, B examples
per batch, P parameters.

    quotients = rayleigh_quotients(apply_fn, params, x, eigvecs, num_train=n)
    # x [N, H, W, C], eigvecs [k, N] -> {"train": [k], "test": [k], "all": [k]}

For a scalar-output network with Jacobian J [N, P], K = J Jᵀ, so φᵀKφ = ‖Jᵀφ‖². One VJP of the
outputs with the cotangent φ gives Jᵀφ without forming J; summed over batches of B examples and
vmapped over a chunk of m vectors it gives Jᵀ[φ_1 … φ_m] [m, P]. K is never built: memory is
O(m·P) plus one batch's activations, whatever N (``vector_batch_size`` bounds m, e.g. 8 × 11 M
floats for ResNet-18). With ``num_train`` each vector is also restricted to the train and the test
rows, giving the quotients of the kernel's train and test blocks, K[train, train] and
K[test, test]; "all" uses the whole kernel (Jᵀφ = J_trainᵀφ_train + J_testᵀφ_test).

For the kernel at the end of training pass the trained parameters and, for BatchNorm networks,
an ``apply_fn`` in inference mode with the **trained** running statistics
(``ntklab.models.inference_apply_fn(model, {"batch_stats": trained_stats})``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from ntklab.progress import progress_bar
from ntklab.types import ApplyFn, PyTree

__all__ = ["rayleigh_quotients"]


def rayleigh_quotients(
    apply_fn: ApplyFn,
    params: PyTree,
    x: np.ndarray | jax.Array,
    vectors: np.ndarray,
    *,
    num_train: int | None = None,
    batch_size: int = 128,
    vector_batch_size: int = 8,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Rayleigh quotients ``φᵀKφ / ‖φ‖²`` of the eNTK K of a scalar-output model, matrix-free.

    Args:
      apply_fn: ``apply_fn(params, x[B, ...]) -> outputs [B, 1]``, BatchNorm in inference mode.
      params: parameters at which the kernel is taken.
      x: inputs [N, ...], in the order of the vectors' entries.
      vectors: vectors [k, N], one per row (e.g. the initial eigenvectors).
      num_train: if given, rows ``[:num_train]`` are the train part and the rest the test part,
        and the quotients of both diagonal blocks are returned too.
      batch_size: examples per VJP.
      vector_batch_size: vectors per VJP (m); memory grows as m·P.
      progress: show a progress bar.

    Returns:
      ``{"all": [k]}``, plus ``"train": [k]`` and ``"test": [k]`` with ``num_train``; float64.
      A vector that is zero on a part gives NaN there.

    Raises:
      ValueError: shapes that do not match, ``num_train`` outside [1, N − 1], a model with more
        than one output, or non-positive batch sizes.
    """
    vectors = np.asarray(vectors)
    num_samples = len(x)
    if vectors.ndim != 2 or vectors.shape[1] != num_samples:
        raise ValueError(
            f"vectors must be [k, N] with N = len(x) = {num_samples}, got {vectors.shape}"
        )
    if num_train is not None and not 1 <= num_train < num_samples:
        raise ValueError(f"num_train={num_train} must be between 1 and N - 1 = {num_samples - 1}")
    for name, value in (("batch_size", batch_size), ("vector_batch_size", vector_batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    segments = {"all": slice(0, num_samples)}
    if num_train is not None:
        segments = {"train": slice(0, num_train), "test": slice(num_train, num_samples)}
    dtype = jax.tree.leaves(params)[0].dtype
    fn = apply_fn if isinstance(apply_fn, Partial) else Partial(apply_fn)
    num_vectors = len(vectors)
    num_chunks = math.ceil(num_vectors / vector_batch_size)
    batches = {
        name: _padded_batches(np.asarray(x)[rows], batch_size) for name, rows in segments.items()
    }
    bar = progress_bar(
        total=num_chunks * sum(len(b) for b in batches.values()),
        desc="alignment",
        unit="batch",
        enabled=progress,
    )
    squares: dict[str, list[np.ndarray]] = {name: [] for name in (*segments, "all")}
    try:
        for start in range(0, num_vectors, vector_batch_size):
            chunk = np.zeros((vector_batch_size, num_samples), dtype)
            chunk[: min(vector_batch_size, num_vectors - start)] = vectors[
                start : start + vector_batch_size
            ]
            sums = {}
            for name, rows in segments.items():
                phi = _padded_rows(chunk[:, rows], batch_size)
                total = jax.tree.map(
                    lambda p: jnp.zeros((vector_batch_size, *p.shape), p.dtype), params
                )
                for index, x_batch in enumerate(batches[name]):
                    phi_batch = phi[:, index * batch_size : (index + 1) * batch_size]
                    total = _accumulate(fn, params, total, x_batch, phi_batch)
                    bar.update(1)
                sums[name] = total
                squares[name].append(np.asarray(_squared_norms(total)))
            if num_train is not None:
                squares["all"].append(
                    np.asarray(_squared_norms_of_sum(sums["train"], sums["test"]))
                )
    finally:
        bar.close()
    result = {}
    for name, rows in {**segments, "all": slice(0, num_samples)}.items():
        numerator = np.concatenate(squares[name])[:num_vectors].astype(np.float64)
        denominator = np.sum(vectors[:, rows].astype(np.float64) ** 2, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            result[name] = np.where(denominator > 0, numerator / denominator, np.nan)
    return result


def _padded_batches(x: np.ndarray, batch_size: int) -> list[jax.Array]:
    """``x`` [n, ...] as batches [B, ...], the last one padded with zeros."""
    padded = _padded_rows(x, batch_size, axis=0)
    return [jnp.asarray(b) for b in np.split(padded, len(padded) // batch_size)]


def _padded_rows(a: np.ndarray, batch_size: int, axis: int = 1) -> np.ndarray:
    """Pads ``a`` with zeros along ``axis`` to a positive multiple of ``batch_size``."""
    size = a.shape[axis]
    target = max(1, math.ceil(size / batch_size)) * batch_size
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, target - size)
    return np.pad(a, widths)


@functools.partial(jax.jit, donate_argnums=2)
def _accumulate(fn: Partial, params: PyTree, total: PyTree, x: jax.Array, phi: jax.Array) -> PyTree:
    """``total + J(x)ᵀ φ`` for a chunk: x [B, ...], φ [m, B] -> total [m, P] (as a pytree)."""
    outputs, vjp_fn = jax.vjp(lambda p: fn(p, x), params)
    if outputs.ndim != 2 or outputs.shape[1] != 1:
        raise ValueError(f"alignment needs a scalar-output model ([B, 1]), got {outputs.shape}")
    (products,) = jax.vmap(vjp_fn)(phi[:, :, None].astype(outputs.dtype))
    return jax.tree.map(jnp.add, total, products)


@jax.jit
def _squared_norms(tree: PyTree) -> jax.Array:
    """Row-wise ‖·‖² [m] of a pytree of [m, ...] arrays."""
    return sum(
        jnp.sum(leaf.reshape(leaf.shape[0], -1) ** 2, axis=1) for leaf in jax.tree.leaves(tree)
    )


@jax.jit
def _squared_norms_of_sum(a: PyTree, b: PyTree) -> jax.Array:
    return _squared_norms(jax.tree.map(jnp.add, a, b))
