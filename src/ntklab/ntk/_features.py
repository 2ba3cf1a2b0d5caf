"""The feature backend: per-example Jacobian features of a leaf group, and NTK-vector products.

Dimensions: B examples per block (B1 rows, B2 columns), C outputs, P_leaf parameters of one leaf,
K projection dimension, d_in/d_out a factored Dense layer's input/output width, b vectors;
for a factored convolution S output positions and F its patch size.

    fn = features_fn(apply_fn, treedef, group, num_outputs, None, "rademacher", mesh, dense)
    feats = fn(leaves, keys, x)           # x [B, ...] -> Features(leaves=([B, C, P_leaf], ...), ...)
    block = _contract.contract_fn("trace", "float32", mesh, biases)(feats, cols)   # [B1, B2]

Every consumer (kernel blocks, the operator K·V, alignment) forms features here. The single
step that turns a leaf group into per-example Jacobians is :func:`leaf_jacobians`; with a
layerwise plan, :func:`block_features` takes them from ``_layerwise`` instead. Convolutions whose
gradients the host forms (``_host_convs``) leave here as their inputs and sensitivities
(``Features.host_factors``) and become Jacobian leaves on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as Spec

from ntklab.ntk import _conv_factors
from ntklab.ntk._conv_factors import ConvFactor
from ntklab.ntk._conv_geometry import conv_config
from ntklab.ntk._feature_block import Features
from ntklab.ntk._host_convs import HostConv
from ntklab.ntk._layerwise import layerwise_parts
from ntklab.ntk._layerwise_plan import LayerwisePlan
from ntklab.ntk._structure import DenseLayer
from ntklab.types import ApplyFn

AXIS = "batch"
_PROJECTION_CHUNK = 4096  # parameters per generated slice of the random projection map
PRODUCTS_COLUMNS = 8
"""NTK-vector products: column examples whose VJP/JVP pairs are vmapped together (memory)."""


def _merge(leaves: list[jax.Array], group: tuple[int, ...], values: list[jax.Array]) -> list:
    merged = list(leaves)
    for position, index in enumerate(group):
        merged[index] = values[position]
    return merged


def leaf_jacobians(
    apply_fn: ApplyFn,
    treedef: Any,
    leaves: list[jax.Array],
    group: tuple[int, ...],
    x: jax.Array,
    num_outputs: int,
) -> tuple[jax.Array, ...]:
    """Per-example Jacobians of the outputs wrt the leaves ``group``: one [B, C, P_leaf] each.

    The one place where a leaf group becomes per-example Jacobians (traced inside shard_map).
    """

    def outputs(group_leaves: list[jax.Array], example: jax.Array) -> jax.Array:
        params = jax.tree.unflatten(treedef, _merge(leaves, group, group_leaves))
        return apply_fn(params, example[None])[0]

    # Mark the replicated parameters as varying over devices: otherwise the derivative with
    # respect to them would be summed over the devices' examples.
    group_leaves = [jax.lax.pcast(leaves[i], AXIS, to="varying") for i in group]
    jacobians = jax.vmap(jax.jacrev(outputs), in_axes=(None, 0))(group_leaves, x)
    return tuple(jac.reshape(x.shape[0], num_outputs, -1) for jac in jacobians)


def structured_features(
    apply_fn: ApplyFn,
    treedef: Any,
    leaves: list[jax.Array],
    group: tuple[int, ...],
    dense: tuple[DenseLayer, ...],
    x: jax.Array,
    num_outputs: int,
) -> Features:
    """Jacobians [B, C, P_leaf] of the leaves ``group``, plus per factored Dense layer its inputs
    [B, d_in] and output sensitivities [B, C, d_out] (a zero perturbation added to the layer's
    output and differentiated). Only layers proven exact by ``_structure`` reach here."""
    by_path = {layer.path: position for position, layer in enumerate(dense)}

    def outputs(group_leaves: list[jax.Array], perturbations: list[jax.Array], example):
        inputs: dict[int, jax.Array] = {}

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if type(module) is nn.Dense and context.method_name == "__call__":
                position = by_path.get(module.path)
                if position is not None:
                    inputs[position] = args[0][0]
                    return next_fun(*args, **kwargs) + perturbations[position][None]
            return next_fun(*args, **kwargs)

        params = jax.tree.unflatten(treedef, _merge(leaves, group, group_leaves))
        with nn.intercept_methods(interceptor):
            out = apply_fn(params, example[None])[0]
        return out, [inputs[position] for position in range(len(dense))]

    group_leaves = [jax.lax.pcast(leaves[i], AXIS, to="varying") for i in group]
    perturbations = [
        jax.lax.pcast(jnp.zeros((layer.d_out,), x.dtype), AXIS, to="varying") for layer in dense
    ]
    jacobian = jax.jacrev(outputs, argnums=(0, 1), has_aux=True)
    (leaf_jacs, sensitivities), inputs = jax.vmap(jacobian, in_axes=(None, None, 0))(
        group_leaves, perturbations, x
    )
    b = x.shape[0]
    return Features(
        leaves=tuple(jac.reshape(b, num_outputs, -1) for jac in leaf_jacs),
        inputs=tuple(inputs),
        sensitivities=tuple(sensitivities),
    )


def block_features(
    apply_fn: ApplyFn,
    treedef: Any,
    leaves: list[jax.Array],
    keys: jax.Array,
    x: jax.Array,
    group: tuple[int, ...],
    num_outputs: int,
    projection_dim: int | None,
    projection: str,
    dense: tuple[DenseLayer, ...] = (),
    layerwise: LayerwisePlan | None = None,
    convs: tuple[ConvFactor, ...] = (),
    host_convs: tuple[HostConv, ...] = (),
) -> Features:
    """Features of one device's examples x [B, ...] (traced inside ``shard_map``).

    With a ``layerwise`` plan the per-example Jacobians (and the factored Dense layers' and
    convolutions' inputs and sensitivities) come from one backward pass to the layer outputs
    (``_layerwise``); without, from ``vmap(jacrev)``. Both are exact for any model. The leaves
    of ``host_convs`` (which need the layerwise plan) are left out of ``leaves``: their layers'
    inputs and sensitivities are returned in ``host_factors`` instead, and
    ``_host_convs.finish`` puts their Jacobians back in ``group`` order.
    """
    if layerwise is not None:
        paths = tuple(layer.path for layer in (*dense, *convs, *host_convs))
        on_host = {i for conv in host_convs for i in conv.leaf_indices}
        pieces, factors = layerwise_parts(
            apply_fn, treedef, leaves, tuple(i for i in group if i not in on_host), x,
            num_outputs, plan=layerwise, axis_name=AXIS, factored=paths,
        )  # fmt: skip
        if paths:
            feats = _factored_features(pieces, factors, len(dense), convs, layerwise, num_outputs)
            host = zip(host_convs, feats.host_factors, strict=True)
            return feats._replace(host_factors=tuple(conv.prepare(*ab) for conv, ab in host))
    elif convs or host_convs:
        raise ValueError("factored or host convolutions need a layerwise plan")
    elif dense:
        return structured_features(apply_fn, treedef, leaves, group, dense, x, num_outputs)
    else:
        pieces = leaf_jacobians(apply_fn, treedef, leaves, group, x, num_outputs)
    if projection_dim is None:
        return Features(leaves=pieces)
    projected = [
        _project(piece, keys[index], projection_dim, projection)
        for piece, index in zip(pieces, group, strict=True)
    ]
    return Features(leaves=(sum(projected[1:], projected[0]),))


def _factored_features(
    pieces: tuple, factors: tuple, num_dense: int, convs: tuple[ConvFactor, ...],
    layerwise: LayerwisePlan, num_outputs: int,
) -> Features:  # fmt: skip
    """Features from ``layerwise_parts``' output: Dense factors flattened per example, the
    convolutions' turned into patches (their patch formula was verified by the plan), the
    host convolutions' passed on as they are."""
    by_path = {layer.path: layer for layer in layerwise.layers}
    patches, patch_sens = [], []
    num_convs = len(convs)
    for conv, (a, delta) in zip(convs, factors[num_dense : num_dense + num_convs], strict=True):
        config = conv_config(by_path[conv.path].module, by_path[conv.path].in_shape)
        p, d = _conv_factors.patch_factors(config, a, delta)
        patches.append(p)
        patch_sens.append(d)
    dense_factors = factors[:num_dense]
    return Features(
        leaves=pieces,
        inputs=tuple(a.reshape(a.shape[0], -1) for a, _ in dense_factors),
        sensitivities=tuple(d.reshape(d.shape[0], num_outputs, -1) for _, d in dense_factors),
        patches=tuple(patches),
        patch_sensitivities=tuple(patch_sens),
        host_factors=tuple(factors[num_dense + num_convs :]),
    )


def features_fn(
    apply_fn: ApplyFn,
    treedef: Any,
    group: tuple[int, ...],
    num_outputs: int,
    projection_dim: int | None,
    projection: str,
    mesh: Mesh,
    dense: tuple[DenseLayer, ...] = (),
    layerwise: LayerwisePlan | None = None,
    convs: tuple[ConvFactor, ...] = (),
    host_convs: tuple[HostConv, ...] = (),
) -> Callable[[list[jax.Array], jax.Array, jax.Array], Features]:
    """``fn(leaves, keys, x[B, ...]) -> Features``, jitted and sharded over the batch (see
    :func:`block_features`)."""

    def per_device(leaves: list[jax.Array], keys: jax.Array, x: jax.Array) -> Features:
        return block_features(
            apply_fn, treedef, leaves, keys, x, group, num_outputs, projection_dim, projection,
            dense, layerwise, convs, host_convs,
        )  # fmt: skip

    specs = (Spec(), Spec(), Spec(AXIS))
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=Spec(AXIS)))


def _project(jacobian: jax.Array, key: jax.Array, dim: int, projection: str) -> jax.Array:
    """[B, C, P_leaf] -> [B, C, K] through a seeded random map generated P_leaf rows at a time."""
    b, c, size = jacobian.shape
    chunk = min(size, _PROJECTION_CHUNK)
    num_chunks = math.ceil(size / chunk)
    padded = jnp.pad(jacobian, ((0, 0), (0, 0), (0, num_chunks * chunk - size)))
    padded = padded.reshape(b * c, num_chunks, chunk).transpose(1, 0, 2)

    def step(total: jax.Array, inputs: tuple[jax.Array, jax.Array]) -> tuple:
        index, piece = inputs
        chunk_key = jax.random.fold_in(key, index)
        if projection == "rademacher":
            matrix = jax.random.rademacher(chunk_key, (chunk, dim), dtype=piece.dtype)
        else:
            matrix = jax.random.normal(chunk_key, (chunk, dim), dtype=piece.dtype)
        return total + piece @ matrix, None

    total = jax.lax.pcast(jnp.zeros((b * c, dim), jacobian.dtype), AXIS, to="varying")
    total, _ = jax.lax.scan(step, total, (jnp.arange(num_chunks), padded))
    return (total / jnp.sqrt(jnp.asarray(dim, jacobian.dtype))).reshape(b, c, dim)


def products_fn(apply_fn: ApplyFn, treedef: Any, num_outputs: int, mesh: Mesh) -> Callable:
    """``fn(leaves, rows[B1, ...] replicated, cols[B2, ...] sharded)`` -> [B1, B2, C, C]."""

    def per_device(leaves: list[jax.Array], rows: jax.Array, cols: jax.Array) -> jax.Array:
        params = jax.tree.unflatten(treedef, leaves)

        def column(example: jax.Array, cotangent: jax.Array) -> jax.Array:
            _, pullback = jax.vjp(lambda p: apply_fn(p, example[None])[0], params)
            (tangent,) = pullback(cotangent)
            return jax.jvp(lambda p: apply_fn(p, rows), (params,), (tangent,))[1]

        basis = jnp.eye(num_outputs, dtype=rows.dtype)
        per_output = jax.vmap(column, in_axes=(None, 0))
        # Columns a few at a time: vmapped over all of them, XLA holds every column's JVP
        # activations over the B1 rows at once (45 GB for ResNet-18 at B = 128).
        values = jax.lax.map(
            lambda example: per_output(example, basis), cols, batch_size=PRODUCTS_COLUMNS
        )  # [B2 local, C (d), B1, C (c)]
        return values.transpose(2, 0, 3, 1)  # [B1, B2 local, C, C]

    return jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(Spec(), Spec(), Spec(AXIS)),
            out_specs=Spec(None, AXIS),
            check_vma=False,  # the cotangent basis is the same on every device
        )
    )
