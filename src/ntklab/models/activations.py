"""Activation functions looked up by name.

Dimensions: none; every activation is elementwise and keeps the input shape.

Example:
    act = get_activation("gelu")
    y = act(x)  # x [B, D] -> y [B, D]
"""

from collections.abc import Callable

import jax

ActivationFn = Callable[[jax.Array], jax.Array]


def _gelu_exact(x: jax.Array) -> jax.Array:
    """Exact (erf-based) GELU, matching PyTorch's default ``nn.GELU()``."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, ActivationFn] = {
    "gelu": _gelu_exact,
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "tanh": jax.numpy.tanh,
}
"""Name -> elementwise activation. ``gelu`` is the exact erf form, not the tanh approximation."""


def activation_names() -> list[str]:
    """Returns the registered activation names, sorted."""
    return sorted(ACTIVATIONS)


def get_activation(name: str) -> ActivationFn:
    """Looks up an elementwise activation by name.

    Args:
        name: one of ``gelu`` (exact, erf-based, like PyTorch's default), ``relu``,
            ``sigmoid``, ``softplus``, ``tanh``.

    Returns:
        The activation, mapping an array of any shape to an array of the same shape.

    Raises:
        ValueError: if ``name`` is not a registered activation.
    """
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        valid = ", ".join(activation_names())
        raise ValueError(f"unknown activation {name!r}; valid choices: {valid}") from None
