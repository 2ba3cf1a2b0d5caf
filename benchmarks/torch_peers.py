"""PyTorch mirrors of ntklab's models and the two torch.func eNTK recipes of PyTorch's NTK tutorial.

Dimensions: N examples, B examples per block, H height, W width, C channels, K outputs,
P parameters.

The mirrors copy the Flax weights (conv kernels HWIO -> OIHW, dense kernels [in, out] -> [out, in],
the first dense layer after a flatten permuted from Flax's NHWC flatten order to PyTorch's NCHW
order, BatchNorm scale/bias as weight/bias and the running statistics as buffers, in eval mode), so
the same images give the same outputs and kernels up to float32 rounding.

    model = mirror_model("lenet", variables, (32, 32, 3))   # torch.nn.Module, NCHW input
    x_t = to_torch_images(x)                                  # x [N, H, W, C] -> [N, C, H, W]
    kernel = jacobian_contraction_ntk(model, x_t, batch_size=256)   # [N, N] numpy
    kernel = ntk_vector_products_ntk(model, x_t, batch_size=32)     # [N, N] numpy

Importing this module needs torch (the optional ``bench`` extra).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

BN_EPSILON = 1e-5  # ntklab.models.resnet18.BN_EPSILON

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu": nn.functional.gelu,  # exact erf form, like ntklab's "gelu"
    "sigmoid": torch.sigmoid,
    "softplus": nn.functional.softplus,
    "tanh": torch.tanh,
}


def _t(array: object) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))


def _conv(kernel: object, bias: object | None, *, stride: int, padding: int) -> nn.Conv2d:
    """Conv2d holding a Flax HWIO kernel as OIHW."""
    kh, kw, cin, cout = np.shape(kernel)
    conv = nn.Conv2d(cin, cout, (kh, kw), stride=stride, padding=padding, bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(_t(kernel).permute(3, 2, 0, 1))
        if bias is not None:
            conv.bias.copy_(_t(bias))
    return conv


def _dense(kernel: object, bias: object, *, nhwc_shape: tuple[int, int, int] | None = None):
    """Linear holding a Flax [in, out] kernel; ``nhwc_shape`` = (H, W, C) of a flattened input.

    Flax flattens NHWC features (index h·W·C + w·C + c); PyTorch flattens NCHW (c·H·W + h·W + w),
    so the rows are permuted to the NCHW order.
    """
    kernel = np.asarray(kernel, dtype=np.float32)
    if nhwc_shape is not None:
        h, w, c = nhwc_shape
        kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
    dense = nn.Linear(kernel.shape[0], kernel.shape[1])
    with torch.no_grad():
        dense.weight.copy_(_t(kernel.T))
        dense.bias.copy_(_t(bias))
    return dense


def _batch_norm(params: dict, stats: dict) -> nn.BatchNorm2d:
    """Eval-mode BatchNorm2d with Flax's scale/bias and running mean/var."""
    bn = nn.BatchNorm2d(len(params["scale"]), eps=BN_EPSILON)
    with torch.no_grad():
        bn.weight.copy_(_t(params["scale"]))
        bn.bias.copy_(_t(params["bias"]))
        bn.running_mean.copy_(_t(stats["mean"]))
        bn.running_var.copy_(_t(stats["var"]))
    return bn


class TorchMLP(nn.Module):
    """Mirror of ``ntklab.models.mlp.MLP``: flatten, Dense -> act per hidden layer, Dense."""

    def __init__(self, params: dict, input_shape: tuple[int, int, int], activation: str):
        super().__init__()
        names = sorted(params, key=lambda name: int(name.split("_")[1]))
        layers = [
            _dense(
                params[name]["kernel"],
                params[name]["bias"],
                nhwc_shape=input_shape if i == 0 else None,
            )
            for i, name in enumerate(names)
        ]
        self.layers = nn.ModuleList(layers)
        self.act = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, C, H, W] -> [B, K]
        h = x.flatten(1)
        for layer in self.layers[:-1]:
            h = self.act(layer(h))
        return self.layers[-1](h)


class TorchLeNet(nn.Module):
    """Mirror of ``ntklab.models.lenet.LeNet``: two conv 5x5 SAME + avg-pool 2, three Dense."""

    def __init__(self, params: dict, input_shape: tuple[int, int, int], activation: str):
        super().__init__()
        height, width, _ = input_shape
        self.conv0 = _conv(
            params["Conv_0"]["kernel"], params["Conv_0"]["bias"], stride=1, padding=2
        )
        self.conv1 = _conv(
            params["Conv_1"]["kernel"], params["Conv_1"]["bias"], stride=1, padding=2
        )
        channels = np.shape(params["Conv_1"]["kernel"])[-1]
        flat_shape = (height // 4, width // 4, channels)
        self.dense0 = _dense(
            params["Dense_0"]["kernel"], params["Dense_0"]["bias"], nhwc_shape=flat_shape
        )
        self.dense1 = _dense(params["Dense_1"]["kernel"], params["Dense_1"]["bias"])
        self.dense2 = _dense(params["Dense_2"]["kernel"], params["Dense_2"]["bias"])
        self.act = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, C, H, W] -> [B, K]
        pool = nn.functional.avg_pool2d
        h = pool(self.act(self.conv0(x)), 2)
        h = pool(self.act(self.conv1(h)), 2)
        h = h.flatten(1)
        h = self.act(self.dense0(h))
        h = self.act(self.dense1(h))
        return self.dense2(h)


class _TorchBasicBlock(nn.Module):
    def __init__(self, params: dict, stats: dict, stride: int, act: Callable):
        super().__init__()
        self.conv1 = _conv(params["conv1"]["kernel"], None, stride=stride, padding=1)
        self.bn1 = _batch_norm(params["bn1"], stats["bn1"])
        self.conv2 = _conv(params["conv2"]["kernel"], None, stride=1, padding=1)
        self.bn2 = _batch_norm(params["bn2"], stats["bn2"])
        self.proj_conv = self.proj_bn = None
        if "proj_conv" in params:
            # Flax's default "SAME" padding of a 1x1 conv is no padding at any stride.
            self.proj_conv = _conv(params["proj_conv"]["kernel"], None, stride=stride, padding=0)
            self.proj_bn = _batch_norm(params["proj_bn"], stats["proj_bn"])
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        shortcut = x if self.proj_conv is None else self.proj_bn(self.proj_conv(x))
        return self.act(h + shortcut)


class TorchResNet18(nn.Module):
    """Mirror of ``ntklab.models.resnet18.ResNet18`` (CIFAR stem, BN in eval mode)."""

    def __init__(self, params: dict, stats: dict, activation: str):
        super().__init__()
        act = _ACTIVATIONS[activation]
        self.stem_conv = _conv(params["stem_conv"]["kernel"], None, stride=1, padding=1)
        self.stem_bn = _batch_norm(params["stem_bn"], stats["stem_bn"])
        blocks = []
        for name in sorted(k for k in params if k.startswith("stage")):
            stage, block = map(int, re.fullmatch(r"stage(\d+)_block(\d+)", name).groups())
            stride = 2 if stage > 1 and block == 1 else 1
            blocks.append(_TorchBasicBlock(params[name], stats[name], stride, act))
        self.blocks = nn.Sequential(*blocks)
        self.head = _dense(params["head"]["kernel"], params["head"]["bias"])
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, C, H, W] -> [B, K]
        h = self.act(self.stem_bn(self.stem_conv(x)))
        h = self.blocks(h)
        return self.head(h.mean(dim=(2, 3)))


def mirror_model(
    name: str, variables: dict, input_shape: tuple[int, int, int], *, activation: str = "relu"
) -> nn.Module:
    """Builds the eval-mode torch mirror of a registered ntklab model holding its Flax weights.

    Args:
      name: ``mlp``, ``lenet`` or ``resnet18`` (default architecture fields).
      variables: ``{"params": ..., "batch_stats": ...}`` from ``ntklab.models.init_variables``.
      input_shape: one image [H, W, C].
      activation: the models' activation name.

    Returns:
      the module in eval mode, float32 on the CPU, mapping [B, C, H, W] to [B, K].

    Raises:
      ValueError: an unknown model name.
    """
    params = jax_tree_to_numpy(variables["params"])
    stats = jax_tree_to_numpy(variables.get("batch_stats", {}))
    if name == "mlp":
        model = TorchMLP(params, input_shape, activation)
    elif name == "lenet":
        model = TorchLeNet(params, input_shape, activation)
    elif name == "resnet18":
        model = TorchResNet18(params, stats, activation)
    else:
        raise ValueError(f"no torch mirror for model {name!r}; valid choices: mlp, lenet, resnet18")
    return model.eval()


def jax_tree_to_numpy(tree: dict) -> dict:
    """Nested dict of arrays -> nested dict of float32 numpy arrays."""
    return {
        k: jax_tree_to_numpy(v) if isinstance(v, dict) else np.asarray(v, np.float32)
        for k, v in dict(tree).items()
    }


def to_torch_images(x: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """NHWC numpy images [N, H, W, C] -> contiguous NCHW float32 tensor [N, C, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))).to(device)


def count_params(model: nn.Module) -> int:
    """P, the number of trainable scalars."""
    return sum(p.numel() for p in model.parameters())


def _functional(model: nn.Module) -> tuple[dict, dict, Callable]:
    """(params, buffers, fnet_single) with ``fnet_single(params, x[C, H, W]) -> [K]``."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def fnet_single(params: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (params, buffers), (x.unsqueeze(0),)).squeeze(0)

    return params, buffers, fnet_single


def _blocks(n: int, block: int) -> list[slice]:
    return [slice(start, min(start + block, n)) for start in range(0, n, block)]


@torch.no_grad()
def jacobian_contraction_ntk(
    model: nn.Module,
    x: torch.Tensor,
    *,
    batch_size: int,
    cache_bytes: int,
) -> tuple[np.ndarray, dict]:
    """The tutorial's method 1: per-example Jacobians ``vmap(jacrev(fnet_single))``, einsum per leaf.

    Both triangles are computed, block pair by block pair. Each block's Jacobian (a list of
    [B, K, P_leaf] leaves) is computed once and kept if all N of them fit in ``cache_bytes``;
    otherwise column blocks are recomputed for every row block.

    Args:
      model: eval-mode module with scalar output (K = 1).
      x: images [N, C, H, W] on the model's device.
      batch_size: B.
      cache_bytes: memory allowed for the cached Jacobians of all N examples.

    Returns:
      (kernel [N, N] float32 numpy, info {"jacobians": "cached" | "recomputed"}).
    """
    params, _, fnet_single = _functional(model)
    jac_fn = vmap(jacrev(fnet_single), (None, 0))
    num_params = sum(p.numel() for p in params.values())
    n = x.shape[0]
    slices = _blocks(n, batch_size)

    def jacobian(rows: slice) -> list[torch.Tensor]:
        return [j.flatten(2) for j in jac_fn(params, x[rows]).values()]  # [B, K, P_leaf] each

    def contract(j1: list[torch.Tensor], j2: list[torch.Tensor]) -> torch.Tensor:
        # compute='trace' of the tutorial; with K = 1 it is the full kernel.
        blocks = [torch.einsum("Naf,Maf->NM", a, b) for a, b in zip(j1, j2, strict=True)]
        return torch.stack(blocks).sum(0)

    kernel = np.empty((n, n), np.float32)
    cached = n * num_params * 4 <= cache_bytes
    if cached:
        jacobians = [jacobian(s) for s in slices]
        for i, rows in enumerate(slices):
            for j, cols in enumerate(slices):
                kernel[rows, cols] = contract(jacobians[i], jacobians[j]).cpu().numpy()
        del jacobians
    else:
        for rows in slices:
            jac_rows = jacobian(rows)
            for cols in slices:
                jac_cols = jac_rows if cols == rows else jacobian(cols)
                kernel[rows, cols] = contract(jac_rows, jac_cols).cpu().numpy()
                del jac_cols
    return kernel, {"jacobians": "cached" if cached else "recomputed"}


@torch.no_grad()
def ntk_vector_products_ntk(
    model: nn.Module, x: torch.Tensor, *, batch_size: int
) -> tuple[np.ndarray, dict]:
    """The tutorial's method 2 (``empirical_ntk_ntk_vps``): vjp then jvp, vmapped over the basis.

    As in the tutorial, ``get_ntk`` works on one pair of examples and is vmapped over both
    examples of a block pair (B x B pairs per call, so memory grows with B²); all block pairs
    (both triangles) are computed.

    Args:
      model: eval-mode module with scalar output (K = 1).
      x: images [N, C, H, W] on the model's device.
      batch_size: B, examples per side of a block pair.

    Returns:
      (kernel [N, N] float32 numpy, info {}).
    """
    params, _, fnet_single = _functional(model)

    def get_ntk(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        def func_x1(params: dict) -> torch.Tensor:
            return fnet_single(params, x1)

        def func_x2(params: dict) -> torch.Tensor:
            return fnet_single(params, x2)

        output, vjp_fn = vjp(func_x1, params)

        def get_ntk_slice(vec: torch.Tensor) -> torch.Tensor:
            vjps = vjp_fn(vec)  # vec @ J(x1)
            _, jvps = jvp(func_x2, (params,), vjps)  # J(x2) @ vjps
            return jvps

        basis = torch.eye(output.numel(), dtype=output.dtype, device=output.device)
        return vmap(get_ntk_slice)(basis.view(output.numel(), -1))  # [K, K]

    pair_ntk = vmap(vmap(get_ntk, (None, 0)), (0, None))
    n = x.shape[0]
    slices = _blocks(n, batch_size)
    kernel = np.empty((n, n), np.float32)
    for rows in slices:
        for cols in slices:
            block = pair_ntk(x[rows], x[cols])  # [B1, B2, K, K]
            kernel[rows, cols] = torch.einsum("NMKK->NM", block).cpu().numpy()
    return kernel, {}
