"""The matrix-free kernel operator K·V = J (Jᵀ V), on the engine's feature backend.

Dimensions: N examples, C outputs, P parameters, B examples per block, b vectors, m = b (full) or
C·b (trace, diagonal) accumulators per pass, D devices.

    operator = KernelOperator(apply_fn, params, x)                 # x [N, ...], trace kernel
    product = operator.matmat(vectors)                             # [N, b] -> [N, b], float64
    full = KernelOperator(apply_fn, params, x, output="full")      # acts on [N·C, b], row i·C + c

One product takes two passes over the data in blocks of B examples sharded over the devices: the
first accumulates W = Jᵀ V (one [m, P_leaf] per leaf, [m, d_in, d_out] per factored Dense layer,
summed over devices), the second gives J W block by block. With ``"jacobian"``/``"structured"``
the blocks' features come from the same backend as :func:`ntklab.ntk.empirical_ntk` (factored
where proven exact) and are kept on the devices between products when they fit the memory
budget, so repeated products cost two matrix products each; ``"ntk_vector_products"`` uses
vmapped VJPs and JVPs instead and stores no Jacobian.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as Spec

from ntklab import threads
from ntklab.ntk import _problem, _schedule, _store, _units
from ntklab.ntk._api import OUTPUTS, check_choice, check_positive_int
from ntklab.ntk._features import AXIS, Features
from ntklab.types import ApplyFn, PyTree

logger = logging.getLogger(__name__)

OPERATOR_IMPLEMENTATIONS: tuple[str, ...] = (
    "auto", "jacobian", "structured", "ntk_vector_products",
)  # fmt: skip
PRODUCTS_MAX_WIDTH = 3
"""``"auto"`` without cached features uses VJP/JVP products up to this many accumulators."""


def _pull(feats: Features, cot: jax.Array, biases: tuple[bool, ...]) -> tuple:
    """Jᵀ cot: cot [m, B, C] -> (per leaf [m, P_leaf], per layer [m, d_in, d_out], [m, d_out])."""
    hi = jax.lax.Precision.HIGHEST
    leaves = tuple(jnp.einsum("mic,icf->mf", cot, j, precision=hi) for j in feats.leaves)
    kernels, bias_terms = [], []
    for a, d, bias in zip(feats.inputs, feats.sensitivities, biases, strict=True):
        weighted = jnp.einsum("mic,ice->mie", cot, d, precision=hi)
        kernels.append(jnp.einsum("id,mie->mde", a, weighted, precision=hi))
        bias_terms.append(weighted.sum(1) if bias else jnp.zeros(weighted.shape[::2], a.dtype))
    return leaves, tuple(kernels), tuple(bias_terms)


def _push(feats: Features, w: tuple, biases: tuple[bool, ...]) -> jax.Array:
    """J w -> [m, B, C] for w as returned by :func:`_pull`."""
    hi = jax.lax.Precision.HIGHEST
    leaves, kernels, bias_terms = w
    parts = [
        jnp.einsum("icf,mf->mic", j, v, precision=hi)
        for j, v in zip(feats.leaves, leaves, strict=False)
    ]
    for a, d, k, wb, bias in zip(
        feats.inputs, feats.sensitivities, kernels, bias_terms, biases, strict=False
    ):
        hidden = jnp.einsum("id,mde->mie", a, k, precision=hi)
        if bias:
            hidden = hidden + wb[:, None, :]
        parts.append(jnp.einsum("mie,ice->mic", hidden, d, precision=hi))
    return sum(parts[1:], parts[0])


class KernelOperator:
    """The eNTK of ``apply_fn`` at ``params`` on x as a matrix-free symmetric operator.

    ``output="trace"`` acts on [N, b]; ``"full"`` and ``"diagonal"`` on [N·C, b] with row
    i·C + c (``"diagonal"``: the C kernels Θ[:, :, c, c], block-diagonal in this ordering).

    Attributes:
      shape: (N, N) or (N·C, N·C).
      num_examples: N. num_outputs: C. num_params: P.
      dtype: the parameters' dtype, in which the passes run.
      implementation: ``"jacobian"``, ``"structured"`` or ``"ntk_vector_products"``.
      batch_size: examples per block B. width: vectors per pass (more are split into passes).
      cached: whether the blocks' features stay on the devices between products.
      num_products: columns multiplied so far. num_passes: passes over the data so far.
      seconds: time spent in products so far.
    """

    def __init__(
        self,
        apply_fn: ApplyFn,
        params: PyTree,
        x: np.ndarray | jax.Array,
        *,
        output: str = "trace",
        implementation: str = "auto",
        batch_size: int = 256,
        width: int | None = None,
        memory_bytes: int | None = None,
        devices: Sequence[jax.Device] | None = None,
    ) -> None:
        """Prepares the operator; compiles nothing until the first product.

        Args:
          apply_fn: ``apply_fn(params, x[B, ...]) -> [B, C]``, BatchNorm in inference mode.
          params: the parameters θ (a pytree, P scalars in all).
          x: inputs [N, ...] (NumPy, memmap or JAX array).
          output: ``"trace"``, ``"full"`` or ``"diagonal"`` (see the class docstring).
          implementation: ``"jacobian"``, ``"structured"`` (Dense layers proven exact factored),
            ``"ntk_vector_products"`` (VJP/JVP, no Jacobians), or ``"auto"``: structured (or
            jacobian when nothing is factorable) when the features fit the budget or the width
            exceeds ``PRODUCTS_MAX_WIDTH``, else products.
          batch_size: examples per block B (rounded up to a multiple of the device count).
          width: vectors per pass, capped by what half the budget holds for W [m, P]: the one
            compiled width (narrower requests are padded with zero columns, wider ones split
            into passes). None: that cap, with narrower requests padded to a power of two.
          memory_bytes: per-device budget; None as in :func:`ntklab.ntk.empirical_ntk`.
          devices: devices to shard the blocks over; None: all of ``jax.devices()``.

        Raises:
          ValueError: empty inputs or a bad option (the message lists the valid ones).
        """
        check_choice("output", output, OUTPUTS)
        check_choice("implementation", implementation, OPERATOR_IMPLEMENTATIONS)
        check_positive_int("batch_size", batch_size)
        if width is not None:
            check_positive_int("width", width)
        if len(x) == 0:
            raise ValueError("x has no examples")
        problem = _problem.make_problem(
            apply_fn, params, x, x, symmetric=True, output=output, precision="float32",
            projection_dim=None, projection="rademacher", projection_seed=0,
            devices=tuple(devices) if devices is not None else tuple(jax.devices()),
        )  # fmt: skip
        self._problem = problem
        self.num_examples, self.num_outputs = len(x), problem.num_outputs
        self.num_params = problem.num_params
        self.dtype = np.dtype(problem.param_dtype)
        self.output = output
        size = self.num_examples * (1 if output == "trace" else self.num_outputs)
        self.shape = (size, size)
        budget = memory_bytes or _schedule.default_memory_bytes(problem.devices[0])
        c, itemsize = self.num_outputs, self.dtype.itemsize
        per_vector = (1 if output == "full" else c) * self.num_params * itemsize
        fitting = max(1, (budget // 2) // max(per_vector, 1))
        self.width = min(width, fitting) if width is not None else fitting
        self._fixed_width = width is not None
        layout = {"batch_size": batch_size, "memory_bytes": budget // 2, "param_chunk_size": None}
        dense = ()
        if implementation in ("auto", "structured"):
            dense = problem.dense_layers()
        name = "structured" if dense else "jacobian"
        plan = _schedule.make_plan(problem, name, dense=dense, **layout)
        feature_bytes = (
            self.num_examples * itemsize
            * (c * sum(int(np.prod(problem.leaves[i].shape)) for g in plan.param_groups for i in g)
               + sum(layer.d_in + c * layer.d_out for layer in dense))
        )  # fmt: skip
        self.cached = feature_bytes <= budget // 2 and implementation != "ntk_vector_products"
        if implementation == "auto":
            m = self.width * (1 if output == "full" else c)
            implementation = (
                name if self.cached or m > PRODUCTS_MAX_WIDTH else "ntk_vector_products"
            )
        elif implementation == "structured":
            implementation = name  # nothing factorable: plain Jacobians, logged by the structure
        if implementation == "ntk_vector_products":
            plan = _schedule.make_plan(problem, "ntk_vector_products", **layout)
            self.cached = False
        elif implementation == "jacobian" and dense:
            plan = _schedule.make_plan(problem, "jacobian", **layout)
        self._plan = plan
        self.implementation = plan.implementation
        self.batch_size = plan.block
        self._feature_cache: dict[tuple[int, int], Features] = {}
        self.num_products = 0
        self.num_passes = 0
        self.seconds = 0.0
        logger.info(
            "kernel operator: N=%d P=%d C=%d output=%s, %s, %d device(s), %d-example blocks, "
            "%d parameter chunk(s), %d factored layer(s), features %s; BLAS threads %s",
            self.num_examples, self.num_params, c, output, self.implementation,
            len(problem.devices), plan.block, len(plan.param_groups), len(plan.dense),
            "cached on the devices" if self.cached else "recomputed per pass", threads.describe(),
        )  # fmt: skip

    # ------------------------------------------------------------------------------ products

    def matmat(self, vectors: np.ndarray) -> np.ndarray:
        """Returns K vectors.

        Args:
          vectors: [N, b] (trace) or [N·C, b] (full, diagonal), or 1-D for one vector.

        Returns:
          K vectors, same shape, float64 on the host.

        Raises:
          ValueError: a wrong shape, or a non-finite product (naming the examples).
        """
        vectors = np.asarray(vectors)
        if vectors.ndim == 1:
            return self.matmat(vectors[:, None])[:, 0]
        if vectors.ndim != 2 or vectors.shape[0] != self.shape[0]:
            raise ValueError(
                f"vectors must be [{self.shape[0]}, b] for output={self.output!r}, got shape "
                f"{vectors.shape}"
            )
        start = time.perf_counter()
        result = np.empty(vectors.shape, np.float64)
        with threads.beside_xla():  # host products interleave with XLA's passes
            self._matmat_passes(vectors, result)
        self.num_products += vectors.shape[1]
        self.seconds += time.perf_counter() - start
        return result

    def _matmat_passes(self, vectors: np.ndarray, result: np.ndarray) -> None:
        """Fills ``result`` [rows, b] with K ``vectors`` [rows, b], ``width`` columns a pass."""
        for first in range(0, vectors.shape[1], self.width):
            chunk = vectors[:, first : first + self.width]
            used = chunk.shape[1]
            # Zero columns pad a chunk to a compiled width: the requested pass width, or without
            # one the next power of two (at most the budget's width), so that solvers whose
            # blocks shrink (LOBPCG, locking) compile one or a few widths, not every one.
            target = min(self.width, 1 << (used - 1).bit_length())
            if self._fixed_width or vectors.shape[1] > self.width:
                target = self.width
            if used < target:
                chunk = np.pad(chunk, [(0, 0), (0, target - used)])
            result[:, first : first + used] = self._product(chunk)[:, :used]

    def _cotangents(self, v: np.ndarray, rows: slice, block: int) -> np.ndarray:
        """Rows of the vectors as cotangents [m, B, C] (zero-padded rows add nothing)."""
        n, c = self.num_examples, self.num_outputs
        b = v.shape[1]
        if self.output == "trace":
            part = v[rows]  # [B, b]
            cot = np.zeros((c, b, block, c), self.dtype)
            for k in range(c):
                cot[k, :, : part.shape[0], k] = part.T
            return cot.reshape(c * b, block, c)
        part = v.reshape(n, c, b)[rows]  # [B, C, b]
        if self.output == "full":
            cot = np.zeros((b, block, c), self.dtype)
            cot[:, : part.shape[0]] = part.transpose(2, 0, 1)
            return cot
        cot = np.zeros((c, b, block, c), self.dtype)
        for k in range(c):
            cot[k, :, : part.shape[0], k] = part[:, k, :].T
        return cot.reshape(c * b, block, c)

    def _collect(self, y: np.ndarray, b: int) -> np.ndarray:
        """[m, B, C] pushed-forward values -> rows of K V ([B, b] or [B·C, b])."""
        c = self.num_outputs
        if self.output == "full":
            return y.transpose(1, 2, 0).reshape(-1, b)
        y = y.reshape(c, b, -1, c)
        if self.output == "trace":
            return np.einsum("kbik->ib", y)
        return np.einsum("kbik->ikb", y).reshape(-1, b)

    def _product(self, vectors: np.ndarray) -> np.ndarray:
        plan, _p = self._plan, self._problem
        b = vectors.shape[1]
        v = vectors.astype(self.dtype, copy=False)
        slices = plan.row_slices
        products = plan.implementation == "ntk_vector_products"
        groups = range(1 if products else len(plan.param_groups))
        pull, push = _products_fns(plan) if products else _feature_fns(plan)
        totals: list[Any] = [None] * len(groups)
        for index, rows in enumerate(slices):
            cot = self._put_rows(self._cotangents(v, rows, plan.block))
            for g in groups:
                data = self._block_input(index, rows, g)
                totals[g] = (
                    pull[g](data, cot)
                    if totals[g] is None
                    else jax.tree.map(jnp.add, totals[g], pull[g](data, cot))
                )
        if not all(_finite(totals[g]) for g in groups):
            self._raise_non_finite(v, pull, groups)
        out = np.empty((self.shape[0], b), np.float64)
        c = 1 if self.output == "trace" else self.num_outputs
        for index, rows in enumerate(slices):
            y = None
            for g in groups:
                part = push[g](self._block_input(index, rows, g), totals[g])
                y = part if y is None else y + part
            values = self._collect(_store._to_host(y), b)[: (rows.stop - rows.start) * c]
            if not np.all(np.isfinite(values)):
                raise ValueError(
                    f"the kernel-vector product is non-finite in rows {rows.start}:{rows.stop}; "
                    "check the model parameters and those inputs"
                )
            out[rows.start * c : rows.stop * c] = values
        self.num_passes += 2
        return out

    def _raise_non_finite(self, v: np.ndarray, pull: list, groups: range) -> None:
        """Names the first block of examples whose Jᵀ V contribution is non-finite."""
        plan = self._plan
        for index, rows in enumerate(plan.row_slices):
            cot = self._put_rows(self._cotangents(v, rows, plan.block))
            for g in groups:
                if not _finite(pull[g](self._block_input(index, rows, g), cot)):
                    raise ValueError(
                        f"Jᵀ V is non-finite for examples {rows.start}:{rows.stop}; check the "
                        "model parameters, those inputs and the vectors"
                    )
        raise ValueError("Jᵀ V is non-finite; check the model parameters, inputs and vectors")

    def _put_rows(self, cot: np.ndarray) -> jax.Array:
        sharding = jax.sharding.NamedSharding(self._problem.mesh, Spec(None, AXIS))
        return jax.make_array_from_callback(cot.shape, sharding, lambda index: cot[index])

    def _block_input(self, index: int, rows: slice, group: int) -> Any:
        """The block's features (cached when they fit), or its inputs for products."""
        p, plan = self._problem, self._plan
        if plan.implementation == "ntk_vector_products":
            return p.put_block(p.x1, rows, plan.block)
        key = (index, group)
        if key in self._feature_cache:
            return self._feature_cache[key]
        fn = _units.features_fn(plan, group)
        feats = fn(list(p.leaves), _units.projection_keys(p), p.put_block(p.x1, rows, plan.block))
        if self.cached:
            self._feature_cache[key] = feats
        return feats


def _finite(tree: Any) -> bool:
    """Whether every entry of every array in ``tree`` is finite."""
    return all(bool(jnp.all(jnp.isfinite(t))) for t in jax.tree.leaves(tree))


def _feature_fns(plan: _schedule.Plan) -> tuple[list, list]:
    """Per parameter group: pull(feats, cot) -> W (summed over devices), push(feats, W) -> Y."""
    p = plan.problem
    pulls, pushes = [], []
    for g in range(len(plan.param_groups)):
        biases = tuple(layer.bias is not None for layer in plan.dense) if g == 0 else ()

        def build(biases=biases):
            def pull(feats, cot):
                return jax.tree.map(lambda t: jax.lax.psum(t, AXIS), _pull(feats, cot, biases))

            def push(feats, w):
                return _push(feats, w, biases)

            row, vec = Spec(AXIS), Spec(None, AXIS)
            return (
                jax.jit(jax.shard_map(pull, mesh=p.mesh, in_specs=(row, vec), out_specs=Spec())),
                jax.jit(jax.shard_map(push, mesh=p.mesh, in_specs=(row, Spec()), out_specs=vec)),
            )

        pull_fn, push_fn = _units.cached(("operator", p.devices, biases), build)
        pulls.append(pull_fn)
        pushes.append(push_fn)
    return pulls, pushes


def _products_fns(plan: _schedule.Plan) -> tuple[list, list]:
    """pull(x, cot) -> Jᵀ cot as a params-shaped tree [m, ...]; push(x, W) -> J W [m, B, C]."""
    p = plan.problem

    def build():
        def pull(leaves, x, cot):
            params = jax.tree.unflatten(p.treedef, leaves)
            _, vjp = jax.vjp(lambda q: p.apply_fn(q, x), params)
            (w,) = jax.vmap(vjp)(cot.astype(x.dtype))
            return jax.tree.map(lambda t: jax.lax.psum(t, AXIS), w)

        def push(leaves, x, w):
            params = jax.tree.unflatten(p.treedef, leaves)
            return jax.vmap(lambda t: jax.jvp(lambda q: p.apply_fn(q, x), (params,), (t,))[1])(w)

        row, vec = Spec(AXIS), Spec(None, AXIS)
        return (
            jax.jit(jax.shard_map(pull, mesh=p.mesh, in_specs=(Spec(), row, vec),
                                  out_specs=Spec(), check_vma=False)),
            jax.jit(jax.shard_map(push, mesh=p.mesh, in_specs=(Spec(), row, Spec()),
                                  out_specs=vec, check_vma=False)),
        )  # fmt: skip

    key = ("operator-products", p.apply_fn, p.treedef, p.devices,
           tuple((leaf.shape, str(leaf.dtype)) for leaf in p.leaves))  # fmt: skip
    pull_fn, push_fn = _units.cached(key, build)
    leaves = list(p.leaves)
    return [lambda x, cot: pull_fn(leaves, x, cot)], [lambda x, w: push_fn(leaves, x, w)]


def kernel_operator(
    apply_fn: ApplyFn, params: PyTree, x: np.ndarray | jax.Array, **options: Any
) -> KernelOperator:
    """``KernelOperator(apply_fn, params, x, **options)``."""
    return KernelOperator(apply_fn, params, x, **options)


__all__ = ["OPERATOR_IMPLEMENTATIONS", "KernelOperator", "kernel_operator"]
