"""LeNet-5 style convolutional network.

Dimensions: B batch, H height, W width, C channels, K outputs.

Example:
    model = LeNet(num_outputs=10)
    variables = model.init(key, x)  # x [B, 32, 32, 3]
    y = model.apply(variables, x)  # y [B, 10]
"""

import flax.linen as nn
import jax

from ntklab.models.activations import get_activation


class LeNet(nn.Module):
    """LeNet-5: two conv + average-pool stages, then three Dense layers.

    ``Conv 5x5 SAME 6 -> act -> avg_pool 2 -> Conv 5x5 SAME 16 -> act -> avg_pool 2 -> flatten
    -> Dense 120 -> act -> Dense 84 -> act -> Dense(num_outputs)``. Standard parameterization with
    Flax's default initializers. On [32, 32, 3] inputs with one output it has 136,121 parameters.

    Attributes:
        num_outputs: K, the size of the last layer.
        activation: name of the activation (see ``ntklab.models.activations``); ``gelu`` is the
            exact erf form, like PyTorch's default.
    """

    num_outputs: int = 1
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Applies the network.

        Args:
            x: images [B, H, W, C], float; H and W at least 4.
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
        h = act(nn.Conv(6, (5, 5), padding="SAME")(x))
        h = nn.avg_pool(h, (2, 2), strides=(2, 2))
        h = act(nn.Conv(16, (5, 5), padding="SAME")(h))
        h = nn.avg_pool(h, (2, 2), strides=(2, 2))
        h = h.reshape((h.shape[0], -1))
        h = act(nn.Dense(120)(h))
        h = act(nn.Dense(84)(h))
        return nn.Dense(self.num_outputs)(h)
