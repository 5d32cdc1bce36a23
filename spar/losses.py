"""Training objectives for mean-field Gaussian variational inference.

Model outputs carry a leading Monte Carlo sample axis: ``outputs`` has shape ``(S, B, C)``
(logits, ``likelihood="categorical"``) or ``(S, B, D)`` (means, ``likelihood="gaussian"``),
where sample ``s`` was computed with weights ``w_s ~ q(w)``. Targets are ``(B,)`` integer
class labels or ``(B, D)`` floats.

:func:`log_likelihood` gives the per-sample, per-example log-likelihoods ``(S, B)`` and
:func:`elbo` turns them into the scalar loss to minimize. :mod:`spar.metrics` reuses the
same log-likelihood code, so the training loss and the reported NLL cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor

__all__ = ["LIKELIHOODS", "REDUCTIONS", "elbo", "log_likelihood"]

LIKELIHOODS: tuple[str, ...] = ("categorical", "gaussian")
REDUCTIONS: tuple[str, ...] = ("mean_samples", "mixture")

# Half-precision log-likelihoods lose the small differences between samples that the
# mixture's logsumexp (and the metrics) depend on, so the math runs in fp32 for them.
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# --------------------------------------------------------------------------- validation
# These helpers are shared with spar.metrics; each takes the caller's argument name so the
# error names what the user actually passed.


def _tracing() -> bool:
    """True while torch.compile traces: data-dependent checks would graph-break there."""
    return torch.compiler.is_compiling()


def _check_choice(value: Any, name: str, valid: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}; got {value!r}")


def _check_sampled(outputs: Any, name: str, last: str) -> Tensor:
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


def _check_class_target(target: Any, batch: int, num_classes: int, name: str = "target") -> Tensor:
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
    if not _tracing():
        # One host sync for both bounds; an out-of-range label would otherwise be a silent
        # wrong gather or an opaque device-side assert on GPU.
        lo, hi = torch.stack([target.min(), target.max()]).tolist()
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{name} holds class labels in [{lo}, {hi}], outside the valid range "
                f"[0, {num_classes - 1}] for C={num_classes} classes"
            )
    return target.long()


def _check_real_target(target: Any, batch: int, dim: int, dtype: torch.dtype) -> Tensor:
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


def _check_noise_std(noise_std: Any, means: Tensor, *, allow_zero: bool = False) -> Tensor:
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
    if not _tracing():
        finite = bool(torch.isfinite(noise_std).all())
        positive = bool((noise_std >= 0).all() if allow_zero else (noise_std > 0).all())
        if not (finite and positive):
            raise ValueError(f"noise_std must be finite and {bound} everywhere")
    return noise_std.to(means.dtype)


def _check_scalar(value: Any, name: str) -> Tensor | float:
    """A python number or a one-element tensor (kept as a tensor so autograd flows)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a scalar tensor, got {value!r}")
    if isinstance(value, Real):
        return float(value)
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.reshape(())
    raise TypeError(f"{name} must be a float or a scalar tensor, got {type(value).__name__}")


# --------------------------------------------------------------------------- math
# Unvalidated kernels of the log-likelihoods; callers validate first.


def _categorical_ll(logits: Tensor, target: Tensor) -> Tensor:
    """``log softmax(logits)[target]``: logits ``(S, B, C)``, target ``(B,)`` -> ``(S, B)``."""
    s, b, _ = logits.shape
    index = target.view(1, b, 1).expand(s, b, 1)
    # gather - logsumexp keeps only (S, B) tensors for backward; log_softmax(...).gather (or
    # cross_entropy) would save a second (S, B, C) tensor, which matters for large C.
    return logits.gather(-1, index).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _gaussian_ll(means: Tensor, target: Tensor, sigma: Tensor) -> Tensor:
    """``sum_d log N(target_d | means_sd, sigma^2)``: means ``(S, B, D)`` -> ``(S, B)``.

    ``sigma`` is a tensor broadcastable to ``means``.
    """
    z = (target - means) / sigma
    # z already has the full (S, B, D) shape, so a scalar or (D,) sigma broadcasts here.
    return (-0.5 * z.square() - torch.log(sigma) - _HALF_LOG_2PI).sum(-1)


# --------------------------------------------------------------------------- public


def log_likelihood(
    outputs: Tensor,
    target: Tensor,
    likelihood: str = "categorical",
    noise_std: float | Tensor = 1.0,
) -> Tensor:
    """Per-sample, per-example log-likelihood ``log p(y_b | w_s)``.

    Args:
        outputs: ``(S, B, C)`` logits for ``"categorical"``; ``(S, B, D)`` means for
            ``"gaussian"``.
        target: ``(B,)`` integer labels in ``[0, C)`` for ``"categorical"``; ``(B, D)``
            floats for ``"gaussian"``.
        likelihood: ``"categorical"`` (``log_softmax(outputs)[target]``) or ``"gaussian"``
            (homoscedastic ``sum_d log N(target_d | outputs_d, noise_std^2)``).
        noise_std: Gaussian observation noise std, ``> 0``: a float or a tensor
            broadcastable to ``(S, B, D)`` (e.g. a learnable ``(D,)`` or scalar parameter;
            gradients flow into it). Ignored for ``"categorical"``.

    Returns:
        ``(S, B)`` log-likelihoods, in the outputs' dtype (fp32 for fp16/bf16 outputs).

    Raises:
        ValueError: unknown ``likelihood``, wrong ranks or mismatched shapes, labels out of
            range, ``noise_std <= 0``.
        TypeError: non-tensor inputs, integer outputs, floating class labels.
    """
    _check_choice(likelihood, "likelihood", LIKELIHOODS)
    if likelihood == "categorical":
        logits = _check_sampled(outputs, "outputs", "C")
        target = _check_class_target(target, logits.shape[1], logits.shape[2])
        return _categorical_ll(logits, target)
    means = _check_sampled(outputs, "outputs", "D")
    target = _check_real_target(target, means.shape[1], means.shape[2], means.dtype)
    sigma = _check_noise_std(noise_std, means)
    return _gaussian_ll(means, target, sigma)


def elbo(
    outputs: Tensor,
    target: Tensor,
    *,
    kl: Tensor | float,
    dataset_size: int,
    kl_weight: float | Tensor = 1.0,
    likelihood: str = "categorical",
    reduction: str = "mean_samples",
    group: Any = None,
    noise_std: float | Tensor = 1.0,
) -> Tensor:
    """Negative ELBO per training example: the scalar loss to minimize.

    ::

        loss = -(1/B) * sum_b LL_b + kl_weight * KL / dataset_size

        LL_b = (1/S) * sum_s log p(y_b | w_s)                       reduction="mean_samples"
        LL_b = log((1/S) * sum_s p(y_b | w_s))
             = logsumexp_s(log p(y_b | w_s)) - log S                reduction="mixture"

    with ``log p(y_b | w_s)`` from :func:`log_likelihood` (``outputs[s, b]`` computed with
    weights ``w_s ~ q``). ``"mean_samples"`` is the standard Monte Carlo ELBO (Bayes by
    Backprop). ``"mixture"`` scores the Bayesian model average (the predictive NLL that
    :func:`spar.metrics.nll` reports); by Jensen its ``LL_b`` is ``>=`` the mean-samples
    one, so its loss is never larger. Because the mixture is taken per example it is no
    longer a bound on the evidence: it is a PAC^m-style objective that targets the
    predictive directly, and its value depends on ``S``.

    Args:
        outputs: ``(S, B, C)`` logits or ``(S, B, D)`` means (see :func:`log_likelihood`).
            With ``group``, ``S`` is this rank's number of local samples.
        target: ``(B,)`` integer labels or ``(B, D)`` floats.
        kl: ``KL(q || p)`` summed over all Bayesian parameters: a scalar tensor or float
            (e.g. :func:`spar.nn.kl_divergence`).
        dataset_size: number of training examples ``N >= 1``; spreads the KL over the
            examples so that the loss is per example, like the likelihood term.
        kl_weight: ``>= 0`` multiplier of the KL term (KL annealing / cold posteriors).
        likelihood: ``"categorical"`` or ``"gaussian"``.
        reduction: ``"mean_samples"`` or ``"mixture"`` (see the formula).
        group: the sample-axis process group of sampling parallelism, or ``None``.
            ``"mixture"`` needs all ``S`` samples of every example, so the ``(S_local, B)``
            log-likelihoods are all-gathered over the group (differentiably; the backward
            is a reduce-scatter SUM, which the reducer's averaging over the sample axis
            turns back into the single-process gradient). ``"mean_samples"`` needs no
            collective: the mean over all samples is the average over ranks of the local
            means (every rank holds the same number of samples), and the reducer already
            averages gradients over the sample axis. The returned *value* is then this
            rank's local estimate; all-reduce it if you log it.
        noise_std: Gaussian observation noise std (float or tensor, ``> 0``).

    Returns:
        0-dim tensor.

    Raises:
        ValueError: unknown ``likelihood``/``reduction``, ``dataset_size < 1``,
            ``kl_weight < 0``, non-scalar ``kl``, shape mismatches (see
            :func:`log_likelihood`).
    """
    _check_choice(reduction, "reduction", REDUCTIONS)
    _check_choice(likelihood, "likelihood", LIKELIHOODS)
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, Integral):
        raise TypeError(f"dataset_size must be an int, got {type(dataset_size).__name__}")
    if dataset_size < 1:
        raise ValueError(f"dataset_size must be >= 1, got {dataset_size}")
    kl = _check_scalar(kl, "kl")
    kl_weight = _check_scalar(kl_weight, "kl_weight")
    if isinstance(kl_weight, float):
        if not (math.isfinite(kl_weight) and kl_weight >= 0):
            raise ValueError(f"kl_weight must be finite and >= 0, got {kl_weight}")
    elif not _tracing() and not bool(torch.isfinite(kl_weight) & (kl_weight >= 0)):
        raise ValueError(f"kl_weight must be finite and >= 0, got {kl_weight.item()}")

    ll = log_likelihood(outputs, target, likelihood, noise_std)  # (S_local, B)
    if reduction == "mixture":
        if group is not None:
            # Imported lazily: spar.distributed sits above this module in the layering and
            # is only needed on the sample-parallel mixture path.
            from spar.distributed.collectives import all_gather_samples

            ll = all_gather_samples(ll, group)  # (S, B), group-rank order
        per_example = torch.logsumexp(ll, dim=0) - math.log(ll.shape[0])
    else:
        per_example = ll.mean(dim=0)
    return -per_example.mean() + kl_weight * kl / dataset_size
