"""Analytic infinite-width kernels of ReLU MLPs in NTK parameterization.

Dimensions: N examples (N1 rows, N2 columns), D input dimension (an example of any shape is
flattened to D numbers).

    nngp = relu_mlp_nngp(x, depth=2, weight_std=1.0, bias_std=0.0)      # x [N, 4, 4, 1] -> [N, N]
    ntk = relu_mlp_ntk(x1, x2, depth=2, weight_std=1.0, bias_std=0.0)   # -> [N1, N2]

The network is ``MLP(widths=(n,) * depth, num_outputs=1, parameterization="ntk")`` of
``ntklab.models``: layer ``l`` computes ``h_l = σ_w/√n_{l-1} · W_l relu(h_{l-1}) + σ_b · b_l``
with all W, b ~ N(0, 1), and the output is ``h_{depth+1}``. As every width n → ∞ its output is a
Gaussian process with covariance Σ^(depth) (the NNGP kernel) and its empirical NTK tends to the
deterministic Θ^(depth) (Jacot et al. 2018). Both follow from the arc-cosine recursion
(Cho & Saul 2009; Arora et al. 2019, "On Exact Computation with an Infinitely Wide Neural Net"):

    Σ^(0)(x, x') = σ_w² xᵀx'/D + σ_b²,                    Θ^(0) = Σ^(0),
    Σ^(h)(x, x') = σ_w² E[relu(u) relu(v)] + σ_b²,         Σ̇^(h)(x, x') = σ_w² E[relu'(u) relu'(v)],
    Θ^(h) = Θ^(h-1) · Σ̇^(h) + Σ^(h),                       h = 1 … depth,

with (u, v) ~ N(0, [[Σ^(h-1)(x, x), Σ^(h-1)(x, x')], [Σ^(h-1)(x, x'), Σ^(h-1)(x', x')]]). With
ρ = Σ^(h-1)(x, x') / √(Σ^(h-1)(x, x) Σ^(h-1)(x', x')) and θ = arccos ρ the expectations are

    E[relu(u) relu(v)] = √(Σ^(h-1)(x, x) Σ^(h-1)(x', x')) · (sin θ + (π - θ) cos θ) / (2π),
    E[relu'(u) relu'(v)] = (π - θ) / (2π).

Everything is computed in NumPy float64, whatever the input dtype. Near θ = 0 the arccos loses
half the digits (about 1e-8 relative error for nearly parallel x, x'); the diagonal of a
symmetric kernel (``x2=None``) uses θ = 0 exactly.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["relu_mlp_nngp", "relu_mlp_ntk"]


def relu_mlp_nngp(
    x1: np.ndarray,
    x2: np.ndarray | None = None,
    *,
    depth: int,
    weight_std: float,
    bias_std: float,
) -> np.ndarray:
    """Infinite-width NNGP kernel Σ^(depth) of a ReLU MLP in NTK parameterization.

    The covariance of the scalar output of ``MLP(widths=(n,) * depth, parameterization="ntk",
    weight_std=weight_std, bias_std=bias_std)`` over random initializations as n → ∞.

    Args:
        x1: row inputs [N1, ...], flattened to [N1, D].
        x2: column inputs [N2, ...] with the same example shape; None means x2 is x1 (the
            result is then exactly symmetric).
        depth: number of hidden layers L ≥ 0 (0 is the linear model).
        weight_std: σ_w > 0.
        bias_std: σ_b ≥ 0.

    Returns:
        kernel [N1, N2], float64.

    Raises:
        ValueError: if ``depth`` is not a non-negative integer, ``weight_std`` or ``bias_std`` is
            out of range, or the inputs are empty, non-finite or of different example shapes.
    """
    return _relu_mlp_kernels(x1, x2, depth=depth, weight_std=weight_std, bias_std=bias_std)[0]


def relu_mlp_ntk(
    x1: np.ndarray,
    x2: np.ndarray | None = None,
    *,
    depth: int,
    weight_std: float,
    bias_std: float,
) -> np.ndarray:
    """Infinite-width neural tangent kernel Θ^(depth) of a ReLU MLP in NTK parameterization.

    The limit of the empirical NTK (gradients with respect to every weight and bias, the output
    layer included) of ``MLP(widths=(n,) * depth, num_outputs=1, parameterization="ntk",
    weight_std=weight_std, bias_std=bias_std)`` as n → ∞.

    Args:
        x1: row inputs [N1, ...], flattened to [N1, D].
        x2: column inputs [N2, ...] with the same example shape; None means x2 is x1 (the
            result is then exactly symmetric).
        depth: number of hidden layers L ≥ 0 (0 is the linear model).
        weight_std: σ_w > 0.
        bias_std: σ_b ≥ 0.

    Returns:
        kernel [N1, N2], float64.

    Raises:
        ValueError: if ``depth`` is not a non-negative integer, ``weight_std`` or ``bias_std`` is
            out of range, or the inputs are empty, non-finite or of different example shapes.
    """
    return _relu_mlp_kernels(x1, x2, depth=depth, weight_std=weight_std, bias_std=bias_std)[1]


def _relu_mlp_kernels(
    x1: np.ndarray,
    x2: np.ndarray | None,
    *,
    depth: int,
    weight_std: float,
    bias_std: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (Σ^(depth) [N1, N2], Θ^(depth) [N1, N2]), float64; see the module docstring."""
    _check_options(depth, weight_std, bias_std)
    symmetric = x2 is None
    a = _flat_inputs(x1, "x1")
    b = a if symmetric else _flat_inputs(x2, "x2")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"x1 examples have shape {np.shape(x1)[1:]} but x2 examples {np.shape(x2)[1:]}"
        )
    dim = a.shape[1]
    w2, b2 = float(weight_std) ** 2, float(bias_std) ** 2
    # Σ^(0): the cross covariance [N1, N2] and the two diagonals [N1], [N2].
    cov = w2 * (a @ b.T) / dim + b2
    var1 = w2 * np.einsum("nd,nd->n", a, a) / dim + b2
    var2 = var1 if symmetric else w2 * np.einsum("nd,nd->n", b, b) / dim + b2
    ntk = cov.copy()
    for _ in range(depth):
        norm = np.sqrt(np.multiply.outer(var1, var2))
        # A zero variance (x = 0 with σ_b = 0) makes the whole row zero; ρ is then irrelevant.
        rho = np.divide(cov, norm, out=np.zeros_like(cov), where=norm > 0)
        if symmetric:
            # θ = 0 exactly on the diagonal; arccos(1 - ε) ≈ √(2ε) would cost 8 digits there.
            np.fill_diagonal(rho, np.where(np.diag(norm) > 0, 1.0, 0.0))
        theta = np.arccos(np.clip(rho, -1.0, 1.0))
        cov = w2 * norm * (np.sin(theta) + (math.pi - theta) * np.cos(theta)) / (2 * math.pi) + b2
        cov_dot = w2 * (math.pi - theta) / (2 * math.pi)
        ntk = ntk * cov_dot + cov
        # On the diagonal θ = 0: E[relu(u)²] = Σ(x, x) / 2.
        var1 = w2 * var1 / 2 + b2
        var2 = var1 if symmetric else w2 * var2 / 2 + b2
    if symmetric:
        cov = (cov + cov.T) / 2
        ntk = (ntk + ntk.T) / 2
    return cov, ntk


def _check_options(depth: int, weight_std: float, bias_std: float) -> None:
    """Raises ValueError unless depth ≥ 0 is an integer, σ_w > 0 and σ_b ≥ 0 are finite."""
    if isinstance(depth, bool) or not isinstance(depth, int | np.integer) or depth < 0:
        raise ValueError(f"depth must be a non-negative integer, got {depth!r}")
    for name, value, positive in (("weight_std", weight_std, True), ("bias_std", bias_std, False)):
        ok = isinstance(value, int | float | np.floating | np.integer) and not isinstance(
            value, bool
        )
        ok = ok and math.isfinite(value) and (value > 0 if positive else value >= 0)
        if not ok:
            bound = "positive" if positive else "non-negative"
            raise ValueError(f"{name} must be a {bound} finite number, got {value!r}")


def _flat_inputs(x: np.ndarray, name: str) -> np.ndarray:
    """Inputs [N, ...] as float64 [N, D]; raises ValueError if empty, scalar or non-finite."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2 or x.shape[0] == 0 or math.prod(x.shape[1:]) == 0:
        raise ValueError(f"{name} must be a non-empty batch of examples [N, ...], got {x.shape}")
    x = x.reshape(x.shape[0], -1)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has {np.sum(~np.isfinite(x))} non-finite values")
    return x
