"""Validation and log-likelihood kernels shared by :mod:`spar.losses` and :mod:`spar.metrics`.

A private module (not part of the public API): the training loss and the reported
metrics validate their inputs with the same functions and compute log-likelihoods with
the same kernels, so the loss and the NLL that ``spar train`` reports cannot drift apart.
Both public modules import from here; neither imports the other's private names.

The ``check_*`` functions take the caller's argument name, so an error names what the user
actually passed. ``categorical_ll`` and ``gaussian_ll`` do no validation: callers check
their inputs first.

Layering: this module depends on ``torch`` only.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "categorical_ll",
    "check_class_target",
    "check_noise_std",
    "check_real_target",
    "check_sampled",
    "gaussian_ll",
    "tracing",
]

# Half-precision log-likelihoods lose the small differences between samples that the
# mixture's logsumexp (and the metrics) depend on, so the math runs in fp32 for them.
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# --------------------------------------------------------------------------- validation


def tracing() -> bool:
    """True while torch.compile traces: data-dependent checks would graph-break there."""
    return torch.compiler.is_compiling()


def check_sampled(outputs: Any, name: str, last: str) -> Tensor:
    """Validate a ``(S, B, last)`` floating tensor; returns it in fp32 or wider."""
    if not isinstance(outputs, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(outputs).__name__}")
    if outputs.dim() != 3:
        raise ValueError(
            f"{name} must have shape (S, B, {last}) with a leading Monte Carlo sample axis; "
            f"got shape {tuple(outputs.shape)}"
        )
    if not outputs.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {outputs.dtype}")
    if 0 in outputs.shape:
        raise ValueError(f"{name} must be non-empty (S, B, {last}); got {tuple(outputs.shape)}")
    if outputs.dtype in _LOW_PRECISION:
        outputs = outputs.float()
    return outputs


def check_class_target(target: Any, batch: int, num_classes: int, name: str = "target") -> Tensor:
    """Validate ``(B,)`` integer labels in ``[0, C)``; returns them as int64."""
    if not isinstance(target, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels (int64), got dtype {target.dtype}")
    if tuple(target.shape) != (batch,):
        raise ValueError(
            f"{name} must have shape (B,) = ({batch},) to match the outputs (S, B, C); "
            f"got {tuple(target.shape)}"
        )
    if not tracing():
        # One host sync for both bounds; an out-of-range label would otherwise be a silent
        # wrong gather or an opaque device-side assert on GPU.
        lo, hi = torch.stack([target.min(), target.max()]).tolist()
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{name} holds class labels in [{lo}, {hi}], outside the valid range "
                f"[0, {num_classes - 1}] for C={num_classes} classes"
            )
    return target.long()


def check_real_target(target: Any, batch: int, dim: int, dtype: torch.dtype) -> Tensor:
    """Validate ``(B, D)`` real targets; returns them in ``dtype``."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if not target.is_floating_point():
        raise TypeError(f"target must be a floating tensor for regression, got {target.dtype}")
    if tuple(target.shape) != (batch, dim):
        hint = " (use target.unsqueeze(-1) for D=1)" if tuple(target.shape) == (batch,) else ""
        raise ValueError(
            f"target must have shape (B, D) = ({batch}, {dim}) to match the means (S, B, D); "
            f"got {tuple(target.shape)}{hint}"
        )
    return target.to(dtype)


def check_noise_std(noise_std: Any, means: Tensor, *, allow_zero: bool = False) -> Tensor:
    """Validate the observation noise std: a float, or a tensor broadcastable to ``means``.

    Returns a tensor in ``means.dtype`` that keeps its autograd graph (the std may be a
    learnable parameter).
    """
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(noise_std, bool):
        raise TypeError(f"noise_std must be a float or a tensor, got {noise_std!r}")
    if isinstance(noise_std, Real):
        value = float(noise_std)
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise ValueError(f"noise_std must be finite and {bound}; got {value}")
        return torch.tensor(value, dtype=means.dtype, device=means.device)
    if not isinstance(noise_std, Tensor):
        raise TypeError(f"noise_std must be a float or a tensor, got {type(noise_std).__name__}")
    if not noise_std.is_floating_point():
        raise TypeError(f"noise_std must be a floating tensor, got dtype {noise_std.dtype}")
    try:
        ok = torch.broadcast_shapes(noise_std.shape, means.shape) == means.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"noise_std must be a scalar or broadcastable to the means {tuple(means.shape)} "
            f"(e.g. shape (D,)); got shape {tuple(noise_std.shape)}"
        )
    if not tracing():
        finite = bool(torch.isfinite(noise_std).all())
        positive = bool((noise_std >= 0).all() if allow_zero else (noise_std > 0).all())
        if not (finite and positive):
            raise ValueError(f"noise_std must be finite and {bound} everywhere")
    return noise_std.to(means.dtype)


# --------------------------------------------------------------------------- math


def categorical_ll(logits: Tensor, target: Tensor) -> Tensor:
    """``log softmax(logits)[target]``: logits ``(S, B, C)``, target ``(B,)`` -> ``(S, B)``."""
    s, b, _ = logits.shape
    index = target.view(1, b, 1).expand(s, b, 1)
    # gather - logsumexp keeps only (S, B) tensors for backward; log_softmax(...).gather (or
    # cross_entropy) would save a second (S, B, C) tensor, which matters for large C.
    return logits.gather(-1, index).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def gaussian_ll(means: Tensor, target: Tensor, sigma: Tensor) -> Tensor:
    """``sum_d log N(target_d | means_sd, sigma^2)``: means ``(S, B, D)`` -> ``(S, B)``.

    ``sigma`` is a tensor broadcastable to ``means``.
    """
    z = (target - means) / sigma
    # z already has the full (S, B, D) shape, so a scalar or (D,) sigma broadcasts here.
    return (-0.5 * z.square() - torch.log(sigma) - _HALF_LOG_2PI).sum(-1)
