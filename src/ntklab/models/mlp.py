"""Fully connected network on flattened images.

Dimensions: B batch, H height, W width, C channels, D = H·W·C inputs, K outputs.

Example:
    model = MLP(widths=(100, 100), num_outputs=1)
    variables = model.init(key, x)  # x [B, 32, 32, 3]
    y = model.apply(variables, x)  # y [B, 1]
    wide = MLP(widths=(4096, 4096), parameterization="ntk", weight_std=1.0, bias_std=0.0)
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ntklab.models.activations import get_activation

PARAMETERIZATIONS = ("standard", "ntk")
"""Valid values of ``MLP.parameterization``."""


class _NTKDense(nn.Module):
    """Dense layer in NTK parameterization: ``σ_w/√fan_in · x W + σ_b · b``, W and b ~ N(0, 1).

    The parameters are called ``kernel`` [fan_in, features] and ``bias`` [features], like
    ``nn.Dense``, so both parameterizations share one parameter tree.
    """

    features: int
    weight_std: float
    bias_std: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.normal(stddev=1.0), (fan_in, self.features))
        bias = self.param("bias", nn.initializers.normal(stddev=1.0), (self.features,))
        dtype = jnp.result_type(x, kernel, bias)
        x, kernel, bias = (jnp.asarray(a, dtype) for a in (x, kernel, bias))
        return (self.weight_std / math.sqrt(fan_in)) * (x @ kernel) + self.bias_std * bias[None, :]


class MLP(nn.Module):
    """Flatten, then ``Dense(width) -> activation`` per hidden layer, then ``Dense(num_outputs)``.

    ``parameterization="standard"`` uses Flax's default ``nn.Dense`` initializers. On CIFAR-10
    shaped inputs [32, 32, 3] with the default widths and one output it has 317,501 parameters.

    ``parameterization="ntk"`` is the NTK parameterization of Jacot et al. (2018): every layer,
    the output layer included, computes ``σ_w/√fan_in · x W + σ_b · b`` with all weights and
    biases drawn from N(0, 1), where σ_w is ``weight_std`` and σ_b is ``bias_std``. Its kernel
    tends to ``ntklab.analytic.relu_mlp_ntk`` as the widths grow (ReLU). The parameter tree
    (``Dense_0`` ... ``Dense_L``, each ``kernel`` and ``bias``) and count are the same in both
    parameterizations. With ``bias_std=0`` the biases are still parameters but have no effect.

    Attributes:
        num_outputs: K, the size of the last layer.
        activation: name of the hidden activation (see ``ntklab.models.activations``);
            ``gelu`` is the exact erf form, like PyTorch's default.
        widths: hidden layer widths, one Dense layer each; empty means a linear model.
        parameterization: ``"standard"`` or ``"ntk"``.
        weight_std: σ_w of the NTK parameterization, positive (√2 keeps ReLU activations at
            unit scale; 1.0 is the default). Must stay 1.0 for ``"standard"``.
        bias_std: σ_b of the NTK parameterization, non-negative. Must stay 0.0 for ``"standard"``.
    """

    num_outputs: int = 1
    activation: str = "relu"
    widths: tuple[int, ...] = (100, 100)
    parameterization: str = "standard"
    weight_std: float = 1.0
    bias_std: float = 0.0

    def __post_init__(self) -> None:
        """Validates the parameterization options at construction.

        Raises:
            ValueError: if a width is not a positive integer, ``parameterization`` is unknown, ``weight_std`` is not positive and
                finite, ``bias_std`` is not non-negative and finite, or either is changed from
                its default under ``parameterization="standard"``.
        """
        _check_parameterization(self.parameterization, self.weight_std, self.bias_std)
        if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in self.widths):
            raise ValueError(
                f"widths={list(self.widths)} is invalid: every width must be an integer >= 1"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Applies the network.

        Args:
            x: images [B, H, W, C], float.
            train: unused (no BatchNorm or dropout); accepted for a uniform model interface.

        Returns:
            outputs [B, K].

        Raises:
            ValueError: if ``x`` is not 4-D or the activation name is unknown.
        """
        del train
        if x.ndim != 4:
            raise ValueError(f"expected NHWC images [B, H, W, C], got shape {x.shape}")
        act = get_activation(self.activation)
        h = x.reshape((x.shape[0], -1))
        for layer, width in enumerate(self.widths):
            h = act(self._dense(width, layer)(h))
        return self._dense(self.num_outputs, len(self.widths))(h)

    def _dense(self, features: int, layer: int) -> nn.Module:
        """The layer-th Dense layer, named ``Dense_<layer>`` in both parameterizations."""
        name = f"Dense_{layer}"
        if self.parameterization == "ntk":
            return _NTKDense(features, self.weight_std, self.bias_std, name=name)
        return nn.Dense(features, name=name)


def _check_parameterization(parameterization: str, weight_std: float, bias_std: float) -> None:
    """Raises ValueError for an unknown parameterization or bad σ_w, σ_b; see ``MLP``."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"unknown parameterization {parameterization!r}; valid choices: "
            f"{', '.join(PARAMETERIZATIONS)}"
        )
    if isinstance(weight_std, bool) or not isinstance(weight_std, int | float):
        raise ValueError(f"weight_std must be a positive number, got {weight_std!r}")
    if isinstance(bias_std, bool) or not isinstance(bias_std, int | float):
        raise ValueError(f"bias_std must be a non-negative number, got {bias_std!r}")
    if not (math.isfinite(weight_std) and weight_std > 0):
        raise ValueError(f"weight_std must be positive and finite, got {weight_std!r}")
    if not (math.isfinite(bias_std) and bias_std >= 0):
        raise ValueError(f"bias_std must be non-negative and finite, got {bias_std!r}")
    if parameterization == "standard" and (weight_std != 1.0 or bias_std != 0.0):
        raise ValueError(
            f"weight_std={weight_std!r} and bias_std={bias_std!r} apply only to "
            "parameterization='ntk'; with 'standard' leave them at 1.0 and 0.0"
        )
