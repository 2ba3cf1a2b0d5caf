"""The eNTK engine: the public API of :mod:`ntklab.ntk`.

Callers import only from here; every other module in this package is private.

    kernel = empirical_ntk(apply_fn, params, x)             # x [N, ...] -> [N, N]
    for part in kernel_blocks(apply_fn, params, x, by_layer=True):
        part.rows, part.cols, part.block, part.layers       # slices, [b1, b2], [L, b1, b2]
    layer_names(params)                                     # the L layers, e.g. ["Conv_0", ...]
    op = KernelOperator(apply_fn, params, x, output="trace", implementation="auto",
                        batch_size=256, width=None, memory_bytes=None, devices=None)
    kv = op.matmat(v)                                       # v [N, b] -> K v [N, b], float64
    # output="full"/"diagonal": v [N·C, b] (row i·C + c); counters op.num_products,
    # op.num_passes, op.seconds; op.shape, op.num_params, op.dtype, op.implementation
    block_slices(n, batch_size)                             # the engine's blocking of n examples
    default_memory_bytes(device)                            # the default per-device budget

Files (one job each): ``_api`` (empirical_ntk, options), ``_blocks`` (kernel_blocks,
KernelBlock: the kernel streamed block pair by block pair, optionally by layer),
``_layer_names`` (the layers of a parameter tree), ``_operator`` (KernelOperator, K·V),
``_features`` (the feature backend: per-example Jacobian features of a leaf group, structured
Dense factors, projection, NTK-vector products), ``_contract`` (block contraction by XLA or the
host's BLAS, summed or by layer), ``_structure`` (which Dense layers are provably factorable),
``_problem`` (what is computed: inputs, outputs, parameters on the mesh, layers),
``_schedule`` (the plan: blocks, panels, parameter chunks, cost model, implementation choice),
``_units`` (compiled sharded per-block pieces and the loops over work units, one feature block
computed ahead), ``_store`` (in memory or checked resumable memmap),
``_layerwise_plan`` (which Dense/Conv/BatchNorm layer calls are covered, each proven exact),
``_layerwise`` (their per-example Jacobians or factors from one backward pass to the layer
outputs), ``_layer_grads`` (one covered layer's per-example weight gradients),
``_conv_geometry`` (a convolution's padding, patches and per-example weight gradients, in XLA
and on the host), ``_conv_factors`` (convolutions factored as patches and sensitivities where
that is cheaper), ``_host_convs`` (convolutions whose Jacobians the host forms while XLA
computes the next block).
"""

from ntklab.ntk._api import (
    IMPLEMENTATIONS,
    OUTPUTS,
    PRECISIONS,
    PROJECTIONS,
    STORAGE_DTYPES,
    Implementation,
    Output,
    Precision,
    Projection,
    empirical_ntk,
)
from ntklab.ntk._blocks import KernelBlock, kernel_blocks
from ntklab.ntk._layer_names import layer_names
from ntklab.ntk._operator import OPERATOR_IMPLEMENTATIONS, KernelOperator, kernel_operator
from ntklab.ntk._schedule import block_slices, default_memory_bytes
from ntklab.ntk._store import KernelInUseError

__all__ = [
    "IMPLEMENTATIONS",
    "OPERATOR_IMPLEMENTATIONS",
    "OUTPUTS",
    "PRECISIONS",
    "PROJECTIONS",
    "STORAGE_DTYPES",
    "Implementation",
    "KernelBlock",
    "KernelInUseError",
    "KernelOperator",
    "Output",
    "Precision",
    "Projection",
    "block_slices",
    "default_memory_bytes",
    "empirical_ntk",
    "kernel_blocks",
    "kernel_operator",
    "layer_names",
]
