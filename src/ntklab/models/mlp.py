"""Fully connected network on flattened images.

Dimensions: B batch, H height, W width, C channels, K outputs.

Example:
    model = MLP(widths=(100, 100), num_outputs=1)
    variables = model.init(key, x)  # x [B, 32, 32, 3]
    y = model.apply(variables, x)  # y [B, 1]
"""

import flax.linen as nn
import jax

from ntklab.models.activations import get_activation


class MLP(nn.Module):
    """Flatten, then ``Dense(width) -> activation`` per hidden layer, then ``Dense(num_outputs)``.

    Standard parameterization with Flax's default ``nn.Dense`` initializers. On CIFAR-10
    shaped inputs [32, 32, 3] with the default widths and one output it has 317,501 parameters.

    Attributes:
        num_outputs: K, the size of the last layer.
        activation: name of the hidden activation (see ``ntklab.models.activations``);
            ``gelu`` is the exact erf form, like PyTorch's default.
        widths: hidden layer widths, one Dense layer each; empty means a linear model.
    """

    num_outputs: int = 1
    activation: str = "relu"
    widths: tuple[int, ...] = (100, 100)

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
        for width in self.widths:
            h = act(nn.Dense(width)(h))
        return nn.Dense(self.num_outputs)(h)
