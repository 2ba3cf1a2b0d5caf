"""Type aliases shared across ntklab.

Dimensions: N examples, P parameters, K outputs.
"""

from collections.abc import Callable
from typing import Any

import jax

PyTree = Any
"""A nested structure of arrays (params, batch statistics, gradients)."""

ApplyFn = Callable[[PyTree, jax.Array], jax.Array]
"""``apply_fn(params, x[B, ...]) -> outputs [B, K]``, differentiable in ``params``."""
