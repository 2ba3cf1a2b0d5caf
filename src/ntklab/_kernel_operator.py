"""Matrix-free eNTK products: the operator K·V = J (Jᵀ V) (its solvers are in ``ntklab.eigen``).

Dimensions: N examples, P parameters, B examples per block, b vectors in a block, m basis vectors.

    operator = NtkOperator(apply_fn, params, x, batch_size=256, width=8)   # x [N, H, W, C]
    product = operator.matmat(vectors)                        # [N, b] -> [N, b], float64

For a scalar-output network f(θ, x) with per-example Jacobian J [N, P], one product takes two passes
over the data in blocks of B examples: the first accumulates Jᵀ V = Σ_blocks J_blockᵀ V_block as b
flat parameter vectors [b, P], the second gives J W block by block [N, b]. A pass computes each block
either by NTK-vector products (``"products"``: a VJP, then a JVP, each vmapped over the b columns so
the block's forward pass is shared) or through the block's per-example Jacobian [B, P] and a matrix
product (``"jacobian"``), which is cheaper once b exceeds a few vectors. Memory is O(b·P) for the
accumulator plus one block's working set (about b·B activations, or the [B, P] Jacobian), never
N·P. The solvers (:mod:`ntklab.eigen`) see K only through ``matmat``, in float64 on the host.
Private to ntklab: :mod:`ntklab.eigen` is the caller.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ntklab.types import ApplyFn, PyTree

logger = logging.getLogger(__name__)


def default_workspace_bytes() -> int:
    """Memory for one pass's parameter-space arrays: a quarter of the device's memory (GPU) or a
    sixteenth of host RAM (CPU). Half goes to the [b, P] accumulators, half to a [B, P] Jacobian."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) // 4
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 16


MatmatFn = Callable[[np.ndarray], np.ndarray]
"""``matmat(vectors [N, b]) -> K vectors [N, b]`` (float64), the solvers' only access to K."""


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _accumulate_vjp(
    apply_fn: ApplyFn, total: jax.Array, params: PyTree, x: jax.Array, vectors: jax.Array
) -> jax.Array:
    """Returns ``total + (J_block^T vectors)^T``: total [b, P], x [B, ...], vectors [B, b]."""
    theta, unravel = ravel_pytree(params)
    _, vjp_fn = jax.vjp(lambda t: apply_fn(unravel(t), x)[:, 0], theta)
    (rows,) = jax.vmap(vjp_fn, in_axes=1)(vectors)
    return total + rows


@functools.partial(jax.jit, static_argnums=0)
def _jvp_block(apply_fn: ApplyFn, params: PyTree, x: jax.Array, tangents: jax.Array) -> jax.Array:
    """Returns J_block tangents^T [B, b] for x [B, ...] and tangents [b, P]."""
    theta, unravel = ravel_pytree(params)
    _, linear = jax.linearize(lambda t: apply_fn(unravel(t), x)[:, 0], theta)
    return jax.vmap(linear, out_axes=1)(tangents)


def _per_example_jacobian(apply_fn: ApplyFn, params: PyTree, x: jax.Array) -> jax.Array:
    """Per-example Jacobian [B, P] of the scalar outputs for x [B, ...] (traced helper)."""
    theta, unravel = ravel_pytree(params)

    def scalar_output(t: jax.Array, example: jax.Array) -> jax.Array:
        return apply_fn(unravel(t), example[None])[0, 0]

    return jax.vmap(jax.grad(scalar_output), in_axes=(None, 0))(theta, x)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _accumulate_jacobian(
    apply_fn: ApplyFn, total: jax.Array, params: PyTree, x: jax.Array, vectors: jax.Array
) -> jax.Array:
    """Like ``_accumulate_vjp`` but through the block's Jacobian [B, P]: vectorsᵀ J_block."""
    jacobian = _per_example_jacobian(apply_fn, params, x)
    return total + jnp.matmul(vectors.T, jacobian, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnums=0)
def _jacobian_block(
    apply_fn: ApplyFn, params: PyTree, x: jax.Array, tangents: jax.Array
) -> jax.Array:
    """Like ``_jvp_block`` but through the block's Jacobian [B, P]: J_block tangentsᵀ [B, b]."""
    jacobian = _per_example_jacobian(apply_fn, params, x)
    return jnp.matmul(jacobian, tangents.T, precision=jax.lax.Precision.HIGHEST)


_PASSES = {
    "products": (_accumulate_vjp, _jvp_block),
    "jacobian": (_accumulate_jacobian, _jacobian_block),
}
IMPLEMENTATIONS: tuple[str, ...] = ("auto", *_PASSES)

PRODUCTS_MAX_WIDTH = 3
"""``implementation="auto"`` uses VJP/JVP products up to this many vectors per pass, Jacobians
beyond: a block's Jacobian costs about one backward pass per example whatever b is, while
products cost about b of them (LeNet on 32×32×3, 2 CPU cores: equal at b = 4, products 3× faster
at b = 1, Jacobians 6× faster at b = 30)."""


class NtkOperator:
    """The eNTK K [N, N] of a scalar-output network as a matrix-free symmetric operator.

    Attributes:
      num_examples: N.
      num_params: P.
      dtype: the parameters' floating dtype, in which the passes run.
      width: vectors per pass b (the requested width, capped by the workspace bound).
      implementation: ``"products"`` or ``"jacobian"``, how the passes are computed.
      batch_size: examples per data block B (the requested one, capped by N and, for Jacobians,
        by the workspace bound).
      num_products: how many columns (vectors) have been multiplied so far.
      num_passes: how many passes over the data (VJP or JVP sweeps over all blocks) so far.
      seconds: time spent in products so far.
    """

    def __init__(
        self,
        apply_fn: ApplyFn,
        params: PyTree,
        x: np.ndarray | jax.Array,
        *,
        batch_size: int = 256,
        width: int = 1,
        implementation: str = "auto",
        workspace_bytes: int | None = None,
    ) -> None:
        """Prepares the operator; compiles nothing until the first product.

        Args:
          apply_fn: ``apply_fn(params, x[B, ...]) -> [B, 1]`` with any BatchNorm in inference
            mode; it is a static jit argument, so reusing the same function object reuses the
            compiled blocks.
          params: the parameters θ (a pytree, P scalars in all).
          x: inputs [N, ...] (NumPy, memmap or JAX array); blocks are copied to the device on use.
          batch_size: examples per block B (the last block is padded, so one shape compiles).
          width: vectors per pass b, the one compiled width: narrower requests are padded with
            zero columns and wider ones split into several passes.
          implementation: ``"products"`` (vmapped VJP and JVP of each block: about b backward
            and b forward-mode passes per example and product), ``"jacobian"`` (each block's
            per-example Jacobian [B, P], then two matrix products: about two backward passes per
            example plus 4·b·P multiply-adds; B is capped so that B·P fits half the workspace), or
            ``"auto"`` (products for b <= ``PRODUCTS_MAX_WIDTH``, Jacobians beyond).
          workspace_bytes: memory for the parameter-space arrays of a pass; half bounds the
            [b, P] accumulators (wider blocks of vectors are split into several passes), half a
            block's Jacobian [B, P]. None means ``default_workspace_bytes()``.

        Raises:
          ValueError: empty inputs, a bad batch size, width or implementation, or a non-scalar
            output.
        """
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"unknown implementation {implementation!r}; valid choices: "
                f"{', '.join(IMPLEMENTATIONS)}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if len(x) == 0:
            raise ValueError("x has no examples")
        self._apply_fn = apply_fn
        self._params = params
        self._x = x
        theta, _ = ravel_pytree(params)
        self.dtype = np.dtype(theta.dtype)
        self.num_params = int(theta.size)
        self.num_examples = len(x)
        out = jax.eval_shape(apply_fn, params, jax.ShapeDtypeStruct((1, *x.shape[1:]), self.dtype))
        if out.ndim != 2 or out.shape[1] != 1:
            raise ValueError(
                f"the matrix-free eNTK needs a scalar-output apply_fn returning [B, 1]; got output "
                f"shape {out.shape} (build the model with num_outputs=1)"
            )
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive integer, got {width!r}")
        if workspace_bytes is None:
            workspace_bytes = default_workspace_bytes()
        vector_bytes = self.num_params * self.dtype.itemsize
        # The accumulator [b, P] and one block's contribution [b, P] in the first half.
        self.width = min(width, max(1, workspace_bytes // (4 * vector_bytes)))
        if implementation == "auto":
            implementation = "products" if self.width <= PRODUCTS_MAX_WIDTH else "jacobian"
        self.implementation = implementation
        self.batch_size = min(batch_size, self.num_examples)
        if implementation == "jacobian":
            self.batch_size = min(self.batch_size, max(1, workspace_bytes // (2 * vector_bytes)))
        self._accumulate, self._apply = _PASSES[implementation]
        self.num_products = 0
        self.num_passes = 0
        self.seconds = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        """(N, N)."""
        return (self.num_examples, self.num_examples)

    def matmat(self, vectors: np.ndarray) -> np.ndarray:
        """Returns K vectors.

        Args:
          vectors: [N, b] (or [N] for one vector), any float dtype; cast to the parameters' dtype.

        Returns:
          K vectors [N, b] (or [N]), float64 on the host.
        """
        vectors = np.asarray(vectors)
        if vectors.ndim == 1:
            return self.matmat(vectors[:, None])[:, 0]
        if vectors.ndim != 2 or vectors.shape[0] != self.num_examples:
            raise ValueError(
                f"vectors must be [N, b] with N={self.num_examples}, got shape {vectors.shape}"
            )
        start_time = time.perf_counter()
        width, chunk = vectors.shape[1], self.width
        product = np.empty((self.num_examples, width), dtype=np.float64)
        for first in range(0, width, chunk):
            columns = vectors[:, first : first + chunk]
            used = columns.shape[1]
            if used < chunk:
                columns = np.pad(columns, [(0, 0), (0, chunk - used)])
            product[:, first : first + used] = self._product(columns)[:, :used]
        self.num_products += width
        self.seconds += time.perf_counter() - start_time
        return product

    def _blocks(self) -> list[tuple[slice, int]]:
        """(rows, padding) of each block of examples."""
        n, block = self.num_examples, self.batch_size
        return [
            (slice(start, min(start + block, n)), max(0, start + block - n))
            for start in range(0, n, block)
        ]

    def _inputs(self, rows: slice, missing: int) -> jax.Array:
        part = np.asarray(self._x[rows])
        if missing:  # repeat the last example: padded rows carry zero weight or are discarded
            part = np.pad(part, [(0, missing)] + [(0, 0)] * (part.ndim - 1), mode="edge")
        return jnp.asarray(part, dtype=self.dtype)

    def _product(self, vectors: np.ndarray) -> np.ndarray:
        """K vectors [N, b] -> [N, b] float64 for b = ``self.width``."""
        width = vectors.shape[1]
        vectors = vectors.astype(self.dtype, copy=False)
        total = jnp.zeros((width, self.num_params), self.dtype)
        for rows, missing in self._blocks():
            total = self._accumulate(
                self._apply_fn,
                total,
                self._params,
                self._inputs(rows, missing),
                self._rows(vectors, rows, missing),
            )
        if not bool(jnp.all(jnp.isfinite(total))):
            self._raise_non_finite(vectors)
        product = np.empty((self.num_examples, width), dtype=np.float64)
        for rows, missing in self._blocks():
            values = self._apply(self._apply_fn, self._params, self._inputs(rows, missing), total)
            values = np.asarray(values)[: rows.stop - rows.start]
            if not np.all(np.isfinite(values)):
                raise ValueError(
                    f"the kernel-vector product is non-finite in rows {rows.start}:{rows.stop}; "
                    "check the model parameters and those inputs"
                )
            product[rows] = values
        self.num_passes += 2
        return product

    @staticmethod
    def _rows(vectors: np.ndarray, rows: slice, missing: int) -> np.ndarray:
        """Rows [B, b] of the vectors for one data block, zero-padded (padding adds nothing)."""
        part = vectors[rows]
        return np.pad(part, [(0, missing), (0, 0)]) if missing else part

    def _raise_non_finite(self, vectors: np.ndarray) -> None:
        """Finds the first data block whose Jᵀ V contribution is non-finite and names it."""
        for rows, missing in self._blocks():
            zero = jnp.zeros((vectors.shape[1], self.num_params), self.dtype)
            part = self._accumulate(
                self._apply_fn,
                zero,
                self._params,
                self._inputs(rows, missing),
                self._rows(vectors, rows, missing),
            )
            if not bool(jnp.all(jnp.isfinite(part))):
                raise ValueError(
                    f"Jᵀ V is non-finite for examples {rows.start}:{rows.stop}; check the model "
                    "parameters, those inputs and the vectors"
                )
        raise ValueError("Jᵀ V is non-finite; check the model parameters, inputs and vectors")
