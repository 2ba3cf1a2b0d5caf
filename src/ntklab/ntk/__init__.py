"""The eNTK engine: the public API of :mod:`ntklab.ntk`.

Callers import only from here; every other module in this package is private.

    kernel = empirical_ntk(apply_fn, params, x)             # x [N, ...] -> [N, N]
    op = KernelOperator(apply_fn, params, x, output="trace", implementation="auto",
                        batch_size=256, width=None, memory_bytes=None, devices=None)
    kv = op.matmat(v)                                       # v [N, b] -> K v [N, b], float64
    # output="full"/"diagonal": v [N·C, b] (row i·C + c); counters op.num_products,
    # op.num_passes, op.seconds; op.shape, op.num_params, op.dtype, op.implementation

Files: ``_api`` (empirical_ntk, options), ``_operator`` (KernelOperator, K·V), ``_features``
(the feature backend: per-example Jacobian features of a leaf group, structured Dense factors,
projection, block contraction), ``_structure`` (which Dense layers are provably factorable),
``_schedule`` (problem and plan: blocks, panels, parameter chunks, devices, cost model),
``_units`` (compiled sharded per-block pieces and the loops over work units), ``_store`` (in
memory or checked resumable memmap), ``_layerwise`` (per-example Jacobians of Dense/Conv/
BatchNorm layers from output sensitivities, used on CPU for convolution-dominated models),
``_conv_factors`` (convolutions factored as patches and sensitivities where that is cheaper).
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
from ntklab.ntk._operator import OPERATOR_IMPLEMENTATIONS, KernelOperator, kernel_operator
from ntklab.ntk._schedule import _block_slices as _block_slices  # private; NADs share it
from ntklab.ntk._store import KernelInUseError

__all__ = [
    "IMPLEMENTATIONS",
    "OPERATOR_IMPLEMENTATIONS",
    "OUTPUTS",
    "PRECISIONS",
    "PROJECTIONS",
    "STORAGE_DTYPES",
    "Implementation",
    "KernelInUseError",
    "KernelOperator",
    "Output",
    "Precision",
    "Projection",
    "empirical_ntk",
    "kernel_operator",
]
