"""The eNTK engine: the public API of :mod:`ntklab.ntk`.

Callers import only from here; every other module in this package is private.
"""

from ntklab.ntk._engine import (
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

__all__ = [
    "IMPLEMENTATIONS",
    "OUTPUTS",
    "PRECISIONS",
    "PROJECTIONS",
    "STORAGE_DTYPES",
    "Implementation",
    "Output",
    "Precision",
    "Projection",
    "empirical_ntk",
]
