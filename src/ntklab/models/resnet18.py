"""CIFAR-style ResNet-18 with BatchNorm.

Dimensions: B batch, H height, W width, C channels, K outputs.

Example:
    model = ResNet18(num_outputs=10)
    variables = model.init(key, x, train=False)  # x [B, 32, 32, 3]
    y = model.apply(variables, x, train=False)  # y [B, 10], BN uses running averages
    y, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])  # batch stats
"""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ntklab.models.activations import get_activation

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
PAD_3X3 = ((1, 1), (1, 1))
"""Padding of the 3x3 convs: "SAME" at stride 1; at stride 2 it matches PyTorch's ``padding=1``
and keeps the 3x3 windows centred on the pixels the 1x1 stride-2 shortcut samples."""


def _batch_norm(train: bool, *, name: str, zero_scale: bool = False) -> nn.BatchNorm:
    """BatchNorm in the mode set by ``train``: batch statistics if True, running averages if not."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
        name=name,
    )


class BasicBlock(nn.Module):
    """Residual block ``act(bn2(conv2(act(bn1(conv1(x))))) + shortcut(x))``.

    Both 3x3 convs have no bias and padding 1 (PyTorch's CIFAR ResNet; "SAME" at stride 1). The
    shortcut is the identity, or ``BN(Conv 1x1 stride s, no bias)`` when the stride or the
    channel count changes. ``bn2``'s scale starts at zero, so at init the residual branch adds
    nothing and the block computes ``act(shortcut(x))``.

    Attributes:
        filters: output channels C_out.
        strides: stride of ``conv1`` and of the projection shortcut.
        act: elementwise activation.
    """

    filters: int
    strides: int
    act: Callable[[jax.Array], jax.Array]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Applies the block.

        Args:
            x: features [B, H, W, C_in].
            train: BatchNorm mode; True uses batch statistics and updates ``batch_stats``.

        Returns:
            features [B, H / strides, W / strides, C_out].
        """
        conv = functools.partial(nn.Conv, use_bias=False)
        strides = (self.strides, self.strides)
        h = conv(self.filters, (3, 3), strides=strides, padding=PAD_3X3, name="conv1")(x)
        h = self.act(_batch_norm(train, name="bn1")(h))
        h = conv(self.filters, (3, 3), padding=PAD_3X3, name="conv2")(h)
        h = _batch_norm(train, name="bn2", zero_scale=True)(h)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.filters:
            shortcut = conv(self.filters, (1, 1), strides=strides, name="proj_conv")(x)
            shortcut = _batch_norm(train, name="proj_bn")(shortcut)
        return self.act(h + shortcut)


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (no max-pool, 3x3 stem), about 11.17M parameters with 1 output.

    ``Conv 3x3 stride 1 SAME (width, no bias) -> BN -> act``, then one stage per entry of
    ``stage_sizes`` of ``BasicBlock`` with ``width * 2**i`` filters, stride 2 at the first
    block of every stage after the first, then a global mean pool over H, W and
    ``Dense(num_outputs)``. BatchNorm uses momentum 0.9 and epsilon 1e-5 (Flax's biased batch
    variance for the running average); the last BN scale of each block starts at zero. Other
    initializers are Flax defaults. Submodules are named ``stem_conv``, ``stem_bn``,
    ``stage<i>_block<j>`` (1-based; inside: ``conv1``, ``bn1``, ``conv2``, ``bn2`` and, when the
    shape changes, ``proj_conv``, ``proj_bn``) and ``head``.

    BatchNorm mode is explicit: ``train=False`` normalizes with the running averages in
    ``batch_stats`` (mean 0, variance 1 at init), so each output depends only on its own input;
    ``train=True`` normalizes with batch statistics and needs ``mutable=["batch_stats"]``.

    Attributes:
        num_outputs: K, the size of the last layer.
        activation: name of the activation (see ``ntklab.models.activations``); ``gelu`` is the
            exact erf form, like PyTorch's default.
        stage_sizes: number of blocks in each stage; ``(2, 2, 2, 2)`` is ResNet-18.
        width: channels of the stem and the first stage; later stages double it.
    """

    num_outputs: int = 1
    activation: str = "relu"
    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
    width: int = 64

    def __post_init__(self) -> None:
        """Validates the architecture at construction.

        Raises:
            ValueError: a stage size or ``width`` that is not a positive integer.
        """
        sizes = self.stage_sizes
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(
                f"stage_sizes={list(sizes)} is invalid: every stage needs an integer >= 1 blocks"
            )
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"width={self.width!r} is invalid: must be an integer >= 1")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Applies the network.

        Args:
            x: images [B, H, W, C], float.
            train: BatchNorm mode; True uses batch statistics and updates ``batch_stats``.

        Returns:
            outputs [B, K].

        Raises:
            ValueError: if ``x`` is not 4-D or the activation name is unknown.
        """
        if x.ndim != 4:
            raise ValueError(f"expected NHWC images [B, H, W, C], got shape {x.shape}")
        act = get_activation(self.activation)
        h = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False, name="stem_conv")(x)
        h = act(_batch_norm(train, name="stem_bn")(h))
        for stage, num_blocks in enumerate(self.stage_sizes):
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                h = BasicBlock(
                    filters=self.width * 2**stage,
                    strides=strides,
                    act=act,
                    name=f"stage{stage + 1}_block{block + 1}",
                )(h, train)
        h = jnp.mean(h, axis=(1, 2))
        return nn.Dense(self.num_outputs, name="head")(h)
