"""Comparable step sizes: the top eNTK eigenvalue by matrix-free power iteration, and the lr scale.

Dimensions: N examples, P parameters, b vectors iterated together.

    top = ntk_top_eigenvalue(apply_fn, params, x)        # x [N, ...]; top.value ≈ λ_max(K), K [N, N]
    scale = ntk_lr_scale(init_apply_fn, theta0, model_apply_fn, theta_t, x_train, max_lr=0.05)
    scale.effective_max_lr                               # 0.05 · λ_max(K_init) / λ_max(K_model)

Gradient descent on the squared loss of a linearized model ``f(θ) = J(θ − θ*)`` moves the training
outputs by ``−lr/N · K (f − y)``, so its stable step sizes scale with 1/λ_max(K). A model whose
kernel is 10³ times larger than the initial one (the linearization at trained parameters) trained
with the same ``max_lr`` takes a 10³ times larger step. ``train.lr_normalization=ntk`` divides the
learning rate by that factor: ``max_lr · λ_max(K_init) / λ_max(K_model)``, both kernels on the
training set, the initial network's in the numerator and the trained model's in the denominator.

The eigenvalue comes from subspace ("block power") iteration on
:class:`ntklab.ntk.KernelOperator` (``ntklab.eigen``'s ``subspace_iteration`` with k = 1): ``b``
vectors multiplied by K per pass, re-orthonormalized, with a Rayleigh-Ritz step on the b × b
projection; it stops when the top Ritz pair's relative
residual ‖K u − θ u‖ / θ falls below ``tol`` (then |λ_max − θ| ≤ ‖K u − θ u‖, and in practice far
less: the error is about residual² / gap) or after ``max_iterations`` passes. K is never formed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ntklab.eigen._iterative import subspace_iteration
from ntklab.ntk import KernelOperator
from ntklab.train_steps import LR_NORMALIZATIONS
from ntklab.types import ApplyFn, PyTree

__all__ = [
    "LR_NORMALIZATIONS",
    "LrScale",
    "TopEigenvalue",
    "ntk_lr_scale",
    "ntk_top_eigenvalue",
    "unit_lr_scale",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TopEigenvalue:
    """The result of :func:`ntk_top_eigenvalue`.

    Attributes:
      value: the estimate of λ_max(K) (the top Ritz value).
      residual: ‖K u − value · u‖ / value of its unit Ritz vector u.
      iterations: passes over the data (products with b vectors each).
      converged: ``residual <= tol`` was reached within ``max_iterations``.
    """

    value: float
    residual: float
    iterations: int
    converged: bool


def ntk_top_eigenvalue(
    apply_fn: ApplyFn,
    params: PyTree,
    x: np.ndarray | jax.Array,
    *,
    block_size: int = 4,
    tol: float = 1e-4,
    max_iterations: int = 50,
    seed: int = 0,
    batch_size: int = 256,
    memory_bytes: int | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> TopEigenvalue:
    """The top eigenvalue of the eNTK of ``apply_fn`` at ``params`` on ``x``, matrix-free.

    Args:
      apply_fn: ``apply_fn(params, x[B, ...]) -> [B, C]``, BatchNorm in inference mode; the
        kernel is ``output="trace"`` (the sum over the C outputs).
      params: the parameters at which the kernel is taken.
      x: inputs [N, ...].
      block_size: vectors iterated together, b (clamped to N); more converge in fewer passes
        when λ_1 and λ_2 are close.
      tol: stop when the top Ritz pair's relative residual is at most this.
      max_iterations: at most this many passes (a warning is logged if ``tol`` is not reached).
      seed: seeds the random starting block.
      batch_size: examples per block of the engine.
      memory_bytes: the engine's per-device budget (None: its default).
      devices: devices to shard the blocks over (None: all).

    Returns:
      The estimate, its residual and the number of passes.

    Raises:
      ValueError: a bad option (non-positive ``block_size``, ``tol`` or ``max_iterations``),
        empty inputs, or a non-finite kernel product.
    """
    for name, value in (("block_size", block_size), ("max_iterations", max_iterations)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not (isinstance(tol, int | float) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    operator = KernelOperator(
        apply_fn,
        params,
        x,
        output="trace",
        batch_size=batch_size,
        memory_bytes=memory_bytes,
        devices=devices,
    )
    n = operator.shape[0]
    result = subspace_iteration(
        operator.matmat,
        n,
        1,
        block=min(block_size, n),
        num_iterations=max_iterations,
        tol=tol,
        rng=np.random.default_rng(seed),
        report=lambda *_: None,
    )
    value = float(result.values[0])
    residual = float(np.linalg.norm(result.products[:, 0] - value * result.vectors[:, 0]))
    residual = residual / abs(value) if value else math.inf
    if residual <= tol:
        return TopEigenvalue(value, residual, result.iterations, True)
    logger.warning(
        "λ_max not converged after %d iterations: %.6g with relative residual %.2g > tol %.2g",
        result.iterations,
        value,
        residual,
        tol,
    )
    return TopEigenvalue(value, residual, result.iterations, False)


@dataclasses.dataclass(frozen=True)
class LrScale:
    """The learning rate a run uses, and why.

    Attributes:
      mode: ``train.lr_normalization`` (one of ``LR_NORMALIZATIONS``).
      max_lr: the configured ``train.max_lr``.
      ratio: λ_max(K_init) / λ_max(K_model); 1 without normalization or when the two kernels are
        the same by definition.
      effective_max_lr: ``max_lr · ratio``, what the trainer uses as its peak learning rate.
      lambda_max_init: λ_max of the initial network's eNTK on the train set (None: not estimated).
      lambda_max_model: λ_max of the trained model's eNTK on the train set (None: not estimated).
      iterations: passes of the two estimates (init, model); None when not estimated.
      residuals: their relative residuals; None when not estimated.
      reason: why nothing was estimated (None when estimated).
    """

    mode: str
    max_lr: float
    ratio: float
    effective_max_lr: float
    lambda_max_init: float | None = None
    lambda_max_model: float | None = None
    iterations: tuple[int, int] | None = None
    residuals: tuple[float, float] | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serializable dict (for metrics.json and meta.json)."""
        record = dataclasses.asdict(self)
        for key in ("iterations", "residuals"):
            record[key] = None if record[key] is None else list(record[key])
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> LrScale:
        """The inverse of :meth:`as_dict`."""
        record = dict(record)
        for key in ("iterations", "residuals"):
            record[key] = None if record.get(key) is None else tuple(record[key])
        return cls(**record)


def unit_lr_scale(mode: str, max_lr: float, *, reason: str) -> LrScale:
    """The scale of a run whose learning rate is not rescaled (ratio 1, nothing estimated).

    Args:
      mode: ``train.lr_normalization``.
      max_lr: ``train.max_lr``.
      reason: why (``"lr_normalization=none"``, or that the model's kernel is K_init itself).

    Raises:
      ValueError: ``mode`` is not one of ``LR_NORMALIZATIONS``.
    """
    _check_mode(mode)
    return LrScale(mode, float(max_lr), 1.0, float(max_lr), reason=reason)


def ntk_lr_scale(
    init_apply_fn: ApplyFn,
    init_params: PyTree,
    model_apply_fn: ApplyFn,
    model_params: PyTree,
    x_train: np.ndarray | jax.Array,
    *,
    max_lr: float,
    **options: Any,
) -> LrScale:
    """``max_lr · λ_max(K_init) / λ_max(K_model)``, both kernels on the train set, with a log line.

    Args:
      init_apply_fn: the initial network, BatchNorm in inference mode with θ0's statistics.
      init_params: θ0.
      model_apply_fn: the model being trained (e.g. the linearization at the trained parameters),
        BatchNorm in inference mode with the statistics the run uses.
      model_params: its starting parameters (a linearization's kernel is the same at any θ).
      x_train: train inputs [N_train, ...].
      max_lr: the configured peak learning rate.
      **options: passed to :func:`ntk_top_eigenvalue` (``tol``, ``max_iterations``, ...).

    Returns:
      The scale, mode ``"ntk"``, with both estimates.

    Raises:
      ValueError: a non-positive or non-finite eigenvalue estimate (the lr would be undefined), or
        a bad option.
    """
    init = ntk_top_eigenvalue(init_apply_fn, init_params, x_train, **options)
    model = ntk_top_eigenvalue(model_apply_fn, model_params, x_train, **options)
    for name, top in (("K_init", init), ("K_model", model)):
        if not (math.isfinite(top.value) and top.value > 0):
            raise ValueError(
                f"λ_max({name}) estimate is {top.value!r}; lr_normalization=ntk needs a positive "
                "top eigenvalue (is the model's output constant in its parameters?)"
            )
    ratio = init.value / model.value
    scale = LrScale(
        mode="ntk",
        max_lr=float(max_lr),
        ratio=ratio,
        effective_max_lr=float(max_lr) * ratio,
        lambda_max_init=init.value,
        lambda_max_model=model.value,
        iterations=(init.iterations, model.iterations),
        residuals=(init.residual, model.residual),
    )
    logger.info(
        "lr_normalization=ntk: λ_max(K_init)=%.6g (%d iterations, residual %.1e), "
        "λ_max(K_model)=%.6g (%d iterations, residual %.1e), ratio %.6g: max_lr %.6g -> %.6g",
        init.value,
        init.iterations,
        init.residual,
        model.value,
        model.iterations,
        model.residual,
        ratio,
        max_lr,
        scale.effective_max_lr,
    )
    return scale


def _check_mode(mode: str) -> None:
    if mode not in LR_NORMALIZATIONS:
        raise ValueError(
            f"unknown train.lr_normalization {mode!r}; valid choices: {', '.join(LR_NORMALIZATIONS)}"
        )
