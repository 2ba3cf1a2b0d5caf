"""The problem: what is computed, independent of implementation and memory layout.

Dimensions: N examples (N1 rows, N2 columns), P parameters, C outputs, B examples per block,
D devices.

    problem = make_problem(apply_fn, params, x1, x2, symmetric=True, output="trace", ...)
    problem.kernel_shape(), problem.dense_layers(), problem.layerwise_plan()
    block = problem.put_block(x, rows, B)             # x[rows] padded to B on the mesh

Everything here is fixed at construction (a frozen dataclass); ``_schedule`` lays a problem out.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as Spec

from ntklab.ntk._features import AXIS
from ntklab.ntk._layer_names import leaf_layers
from ntklab.ntk._layerwise_plan import LayerwisePlan, layerwise_plan
from ntklab.ntk._structure import DenseLayer, find_dense_layers, log_structure
from ntklab.types import ApplyFn, PyTree

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """What is computed, independent of implementation and memory layout."""

    apply_fn: ApplyFn
    treedef: Any
    leaves: tuple[jax.Array, ...]  # replicated on the mesh
    x1: Any
    x2: Any
    symmetric: bool
    output: str
    precision: str
    projection_dim: int | None
    projection: str
    projection_seed: int
    devices: tuple[jax.Device, ...]
    mesh: Mesh
    num_outputs: int
    num_params: int
    param_dtype: np.dtype
    accumulate_dtype: np.dtype
    layer_names: tuple[str, ...] = ()  # ``_layer_names``: the layers of the parameter tree
    leaf_layers: tuple[int, ...] = ()  # per leaf its layer's index in ``layer_names``

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, Spec(AXIS))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, Spec())

    def kernel_shape(self) -> tuple[int, ...]:
        n1, n2, c = len(self.x1), len(self.x2), self.num_outputs
        return {"trace": (n1, n2), "diagonal": (n1, n2, c), "full": (n1, n2, c, c)}[self.output]

    def dense_layers(self) -> tuple[DenseLayer, ...]:
        """The Dense layers proven factorable (logged with the refused ones and why)."""
        layers, refused = find_dense_layers(
            self.apply_fn, self.treedef, list(self.leaves), tuple(self.x1.shape[1:])
        )
        log_structure(layers, refused)
        return layers

    def layerwise_plan(self) -> LayerwisePlan | None:
        """The model's layerwise plan (``_layerwise_plan``) on a CPU for a model with a
        convolution; None on other platforms, with ``NTKLAB_LAYERWISE=0``, without a convolution
        or when the model cannot be planned."""
        if self.devices[0].platform != "cpu" or os.environ.get("NTKLAB_LAYERWISE") == "0":
            return None
        example_shape = tuple(self.x1.shape[1:])
        if not _has_convolution(self.apply_fn, self.treedef, self.leaves, example_shape):
            return None
        try:
            return layerwise_plan(self.apply_fn, self.treedef, list(self.leaves), example_shape)
        except Exception as error:  # an optimization: any model it cannot plan uses vmap(jacrev)
            logger.info("eNTK layerwise: not used (%s: %s)", type(error).__name__, error)
            return None

    def forward_flops(self) -> float:
        """FLOPs of one example's forward pass (XLA's cost analysis; 2·P if unavailable)."""
        avals = tuple((leaf.shape, str(leaf.dtype)) for leaf in self.leaves)
        key = (self.apply_fn, self.treedef, avals, tuple(self.x1.shape[1:]))
        try:
            return _FORWARD_FLOPS[key]
        except TypeError:  # an unhashable apply_fn
            key = None
        except KeyError:
            pass
        params = jax.tree.unflatten(self.treedef, list(self.leaves))
        example = jax.ShapeDtypeStruct((1, *self.x1.shape[1:]), self.param_dtype)
        try:
            cost = jax.jit(self.apply_fn).lower(params, example).cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            flops = max(float(cost["flops"]), 2.0 * self.num_params)
        except Exception:  # cost analysis is best effort; every parameter is used at least once
            flops = 2.0 * self.num_params
        if key is not None:
            if len(_FORWARD_FLOPS) > 32:
                _FORWARD_FLOPS.clear()
            _FORWARD_FLOPS[key] = flops
        return flops

    def put_block(self, x: Any, rows: slice, block: int, *, sharded: bool = True) -> jax.Array:
        """Rows ``x[rows]`` padded to ``block`` examples (repeating the last) on the mesh."""
        part = np.asarray(x[rows], dtype=self.param_dtype)
        missing = block - part.shape[0]
        if missing:
            part = np.pad(part, [(0, missing)] + [(0, 0)] * (part.ndim - 1), mode="edge")
        sharding = self.batch_sharding if sharded else self.replicated
        return jax.make_array_from_callback(part.shape, sharding, lambda index: part[index])


_FORWARD_FLOPS: dict[tuple, float] = {}
_CONVOLUTIONS: dict[tuple, bool] = {}


def _has_convolution(apply_fn: ApplyFn, treedef: Any, leaves: tuple, example_shape: tuple) -> bool:
    """Whether ``apply_fn``'s jaxpr on one example has a ``conv_general_dilated`` (cached)."""
    avals = tuple((tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves)
    key = (apply_fn, treedef, avals, example_shape)
    try:
        return _CONVOLUTIONS[key]
    except TypeError:  # an unhashable apply_fn
        key = None
    except KeyError:
        pass
    params = jax.tree.unflatten(
        treedef, [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves]
    )
    dtype = jnp.result_type(*leaves)
    jaxpr = jax.make_jaxpr(apply_fn)(params, jax.ShapeDtypeStruct((1, *example_shape), dtype))
    found = _jaxpr_has(jaxpr.jaxpr, "conv_general_dilated")
    if key is not None:
        if len(_CONVOLUTIONS) > 32:
            _CONVOLUTIONS.clear()
        _CONVOLUTIONS[key] = found
    return found


def _jaxpr_has(jaxpr: Any, primitive: str) -> bool:
    """Whether ``jaxpr`` or any jaxpr nested in its equations' parameters uses ``primitive``."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            return True
        for value in eqn.params.values():
            for item in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns") and _jaxpr_has(inner, primitive):
                    return True
    return False


def default_memory_bytes(device: jax.Device) -> int:
    """The engine's default per-device budget for features kept at once.

    Args:
      device: a JAX device.

    Returns:
      half the device's memory limit, or a quarter of the host's RAM on a CPU (bytes).
    """
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def make_problem(
    apply_fn: ApplyFn,
    params: PyTree,
    x1: Any,
    x2: Any,
    *,
    symmetric: bool,
    output: str,
    precision: str,
    projection_dim: int | None,
    projection: str,
    projection_seed: int,
    devices: tuple[jax.Device, ...],
) -> Problem:
    """Validates the model's output shape and places the parameters on the mesh."""
    leaves, treedef = jax.tree.flatten(params)
    param_dtype = np.dtype(jnp.result_type(*leaves))
    example = jax.ShapeDtypeStruct((1, *x1.shape[1:]), param_dtype)
    out_shape = jax.eval_shape(apply_fn, params, example).shape
    if len(out_shape) != 2:
        raise ValueError(f"apply_fn must return [B, C] outputs, got shape {out_shape}")
    mesh = Mesh(np.asarray(devices), (AXIS,))
    replicated = NamedSharding(mesh, Spec())
    names, owners = leaf_layers(params)
    return Problem(
        apply_fn=apply_fn,
        treedef=treedef,
        leaves=tuple(jax.device_put(leaf, replicated) for leaf in leaves),
        x1=x1,
        x2=x2,
        symmetric=symmetric,
        output=output,
        precision=precision,
        projection_dim=projection_dim,
        projection=projection,
        projection_seed=projection_seed,
        devices=tuple(devices),
        mesh=mesh,
        num_outputs=int(out_shape[1]),
        num_params=sum(int(np.prod(leaf.shape)) for leaf in leaves),
        param_dtype=param_dtype,
        accumulate_dtype=np.dtype(np.float64 if param_dtype == np.float64 else np.float32),
        layer_names=names,
        leaf_layers=owners,
    )
