"""Block contraction: the kernel block of two blocks' features, by XLA or by the host's BLAS.

Dimensions: B examples per block (B1 rows, B2 columns), C outputs, F features per output of one
leaf, d_in/d_out a factored Dense layer's widths, S/F a factored convolution's positions and
patch size, L layers.

    block = contract_fn("trace", "float32", mesh, biases)(rows, cols)        # -> [B1, B2]
    layers = contract_fn("trace", "float32", mesh, biases, terms=(0, 0, 1), num_layers=2)(...)
    # -> [L, B1, B2]: each term added to its layer (terms: the layer of each leaf, factored
    #    Dense layer and factored convolution, in that order)

A block is a sum of *terms*: one per unfactored leaf (its Jacobians' product), one per factored
Dense layer ((a_i·a_j + 1)(δ_i·δ_j), without the 1 when it has no bias) and one per factored
convolution (``_conv_factors``). On one CPU device at full precision (``trace``/``full``) the
host's BLAS contracts the features in place (:func:`host_contraction`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as Spec

from ntklab.ntk import _conv_factors
from ntklab.ntk._features import AXIS, Features


def dot(a: jax.Array, b: jax.Array, spec: str, precision: str, platform: str) -> jax.Array:
    """``einsum(spec, a, b)`` at the given precision, accumulated in the inputs' dtype."""
    accumulate = a.dtype
    if precision == "bfloat16":
        a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
        return jnp.einsum(spec, a, b, preferred_element_type=accumulate)
    if precision == "tf32":
        if platform == "gpu":
            preset = jax.lax.DotAlgorithmPreset.TF32_TF32_F32
            return jnp.einsum(spec, a, b, precision=preset, preferred_element_type=accumulate)
        # CPUs have no TF32 unit: round the inputs to TF32 (10-bit mantissa) as tensor cores do.
        a = jax.lax.reduce_precision(a, exponent_bits=8, mantissa_bits=10)
        b = jax.lax.reduce_precision(b, exponent_bits=8, mantissa_bits=10)
    return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST)


def contract_block(
    rows: Features,
    cols: Features,
    output: str,
    precision: str,
    platform: str,
    biases: tuple,
    conv_biases: tuple = (),
    terms: tuple[int, ...] | None = None,
    num_layers: int = 0,
) -> jax.Array:
    """The kernel block of two feature sets, in ``output`` layout (traced).

    Args:
      rows, cols: the two blocks' features (B1 and B2 examples).
      output: ``"trace"`` -> [B1, B2], ``"diagonal"`` -> [B1, B2, C], ``"full"`` ->
        [B1, B2, C, C].
      precision: ``"float32"``, ``"tf32"`` or ``"bfloat16"`` products.
      platform: the devices' platform (TF32 is emulated off GPUs).
      biases: per factored Dense layer whether it has a bias (its kernel is (a_i·a_j + 1)
        (δ_i·δ_j)); conv_biases: the same per factored convolution (see ``_conv_factors``).
      terms: None sums every term; else the layer index of each term (leaves, Dense layers,
        convolutions), and the block is [num_layers, *layout] with each term in its layer.
      num_layers: L, with ``terms``.

    Returns:
      the block, [*layout] or [L, *layout].
    """

    def leaf(r: jax.Array, c: jax.Array) -> jax.Array:
        if output == "trace":
            return dot(r.reshape(r.shape[0], -1), c.reshape(c.shape[0], -1), "if,jf->ij",
                       precision, platform)  # fmt: skip
        if output == "diagonal":
            return dot(r, c, "icf,jcf->ijc", precision, platform)
        return dot(r, c, "icf,jdf->ijcd", precision, platform)

    blocks = [leaf(r, c) for r, c in zip(rows.leaves, cols.leaves, strict=True)]
    pairs = zip(
        rows.inputs, cols.inputs, rows.sensitivities, cols.sensitivities, biases, strict=True
    )
    for a_rows, a_cols, d_rows, d_cols, bias in pairs:
        inputs = dot(a_rows, a_cols, "if,jf->ij", precision, platform) + (1.0 if bias else 0.0)
        sens = leaf(d_rows, d_cols)
        blocks.append(inputs.reshape(inputs.shape + (1,) * (sens.ndim - 2)) * sens)
    convs = zip(rows.patches, cols.patches, rows.patch_sensitivities, cols.patch_sensitivities,
                conv_biases, strict=True)  # fmt: skip
    for pr, pc, sr, sc, bias in convs:
        blocks.append(_conv_factors.conv_block(
            pr, pc, sr, sc, bias, output, lambda a, b, spec: dot(a, b, spec, precision, platform)
        ))  # fmt: skip
    if terms is None:
        return sum(blocks[1:], blocks[0])
    by_layer = [None] * num_layers
    for layer, block in zip(terms, blocks, strict=True):
        by_layer[layer] = block if by_layer[layer] is None else by_layer[layer] + block
    zero = jnp.zeros_like(blocks[0])
    return jnp.stack([zero if block is None else block for block in by_layer])


def contract_fn(
    output: str,
    precision: str,
    mesh: Mesh,
    biases: tuple[bool, ...] = (),
    conv_biases: tuple[bool, ...] = (),
    terms: tuple[int, ...] | None = None,
    num_layers: int = 0,
) -> Callable:
    """``fn(rows: Features sharded, cols: Features replicated)`` -> kernel block, jitted (or by
    the host's BLAS where :func:`host_contraction` applies); ``terms``/``num_layers`` as in
    :func:`contract_block` (then the block is [L, B1, B2, ...])."""
    platform = mesh.devices.flat[0].platform
    if host_contraction(output, precision, mesh):
        return functools.partial(
            _host_contract, output=output, biases=biases, conv_biases=conv_biases, terms=terms,
            num_layers=num_layers,
        )  # fmt: skip

    def per_device(rows: Features, cols: Features) -> jax.Array:
        return contract_block(
            rows, cols, output, precision, platform, biases, conv_biases, terms, num_layers
        )

    out_spec = Spec(AXIS) if terms is None else Spec(None, AXIS)
    specs = (Spec(AXIS), Spec())
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=out_spec))


def host_contraction(output: str, precision: str, mesh: Mesh) -> bool:
    """Whether blocks are contracted by NumPy's BLAS on the host instead of XLA: one CPU device,
    full-precision ``trace`` or ``full`` output. XLA:CPU's dot runs [B, P] x [P, B] at about half
    of OpenBLAS's rate (77 vs 149 GFLOP/s on 2 cores, BENCHMARKS.md), and a CPU device's arrays
    are host memory, so the features are read in place (no copy)."""
    single_cpu = mesh.devices.size == 1 and mesh.devices.flat[0].platform == "cpu"
    return single_cpu and precision == "float32" and output in ("trace", "full")


def _host_leaf(rows: np.ndarray, cols: np.ndarray, output: str) -> np.ndarray:
    """One leaf's block: [B1, C, F] x [B2, C, F] -> [B1, B2] (trace) or [B1, B2, C, C] (full)."""
    if output == "trace":
        return rows.reshape(rows.shape[0], -1) @ cols.reshape(cols.shape[0], -1).T
    (b1, c, f), b2 = rows.shape, cols.shape[0]
    block = rows.reshape(b1 * c, f) @ cols.reshape(b2 * c, f).T
    return block.reshape(b1, c, b2, c).transpose(0, 2, 1, 3)


def _host_terms(
    rows: Features, cols: Features, output: str, biases: tuple, conv_biases: tuple
) -> Iterator[np.ndarray]:
    """The block's terms in order (leaves, Dense layers, convolutions), by NumPy on the host."""
    for r, c in zip(rows.leaves, cols.leaves, strict=True):
        yield _host_leaf(np.asarray(r), np.asarray(c), output)
    pairs = zip(
        rows.inputs, cols.inputs, rows.sensitivities, cols.sensitivities, biases, strict=True
    )
    for a_rows, a_cols, d_rows, d_cols, bias in pairs:
        inputs = np.asarray(a_rows) @ np.asarray(a_cols).T
        if bias:
            inputs += 1.0
        sens = _host_leaf(np.asarray(d_rows), np.asarray(d_cols), output)
        sens *= inputs.reshape(inputs.shape + (1,) * (sens.ndim - 2))
        yield sens
    convs = zip(rows.patches, cols.patches, rows.patch_sensitivities, cols.patch_sensitivities,
                conv_biases, strict=True)  # fmt: skip
    for pr, pc, sr, sc, bias in convs:
        yield _conv_factors.host_conv_block(
            np.asarray(pr), np.asarray(pc), np.asarray(sr), np.asarray(sc), bias, output
        )


def _host_contract(
    rows: Features,
    cols: Features,
    *,
    output: str,
    biases: tuple[bool, ...],
    conv_biases: tuple[bool, ...] = (),
    terms: tuple[int, ...] | None = None,
    num_layers: int = 0,
) -> np.ndarray:
    """:func:`contract_block` with NumPy on one CPU device (same sums, float accumulation in the
    features' dtype); the features are zero-copy views of the device buffers."""
    total = None
    for position, block in enumerate(_host_terms(rows, cols, output, biases, conv_biases)):
        if terms is not None:
            if total is None:
                total = np.zeros((num_layers, *block.shape), block.dtype)
            total[terms[position]] += block
        elif total is None:
            total = block
        else:
            total += block
    return total
