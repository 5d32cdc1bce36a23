"""Training objectives for mean-field Gaussian variational inference.

Model outputs carry a leading Monte Carlo sample axis: ``outputs`` has shape ``(S, B, C)``
(logits, ``likelihood="categorical"``) or ``(S, B, D)`` (means, ``likelihood="gaussian"``),
where sample ``s`` was computed with weights ``w_s ~ q(w)``. Targets are ``(B,)`` integer
class labels or ``(B, D)`` floats.

:func:`log_likelihood` gives the per-sample, per-example log-likelihoods ``(S, B)`` and
:func:`elbo` turns them into the scalar loss to minimize.

Dependencies (a lower layer never imports a higher one): this module imports no part of
:mod:`spar.distributed`. Input validation and the log-likelihood kernels live in the
private module :mod:`spar._prob`, which :mod:`spar.metrics` uses too, so the training loss
and the reported NLL cannot drift apart. The one collective the loss needs, the
differentiable all-gather of per-sample log-likelihoods for ``reduction="mixture"`` under
sampling parallelism, lives in the private leaf module :mod:`spar._collectives` (it needs
only ``torch.distributed``); :mod:`spar.distributed` imports and re-exports the same
function. Passing ``group`` is therefore all it takes; no import of the distributed
package happens here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor

from spar._collectives import all_gather_samples
from spar._prob import (
    categorical_ll,
    check_class_target,
    check_noise_std,
    check_real_target,
    check_sampled,
    gaussian_ll,
    tracing,
)

__all__ = ["LIKELIHOODS", "REDUCTIONS", "elbo", "log_likelihood"]

LIKELIHOODS: tuple[str, ...] = ("categorical", "gaussian")
REDUCTIONS: tuple[str, ...] = ("mean_samples", "mixture")


# --------------------------------------------------------------------------- validation


def _check_choice(value: Any, name: str, valid: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}; got {value!r}")


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
        logits = check_sampled(outputs, "outputs", "C")
        target = check_class_target(target, logits.shape[1], logits.shape[2])
        return categorical_ll(logits, target)
    means = check_sampled(outputs, "outputs", "D")
    target = check_real_target(target, means.shape[1], means.shape[2], means.dtype)
    sigma = check_noise_std(noise_std, means)
    return gaussian_ll(means, target, sigma)


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
    elif not tracing() and not bool(torch.isfinite(kl_weight) & (kl_weight >= 0)):
        raise ValueError(f"kl_weight must be finite and >= 0, got {kl_weight.item()}")

    ll = log_likelihood(outputs, target, likelihood, noise_std)  # (S_local, B)
    if reduction == "mixture":
        ll = all_gather_samples(ll, group)  # (S, B) in group-rank order; no-op for None
        per_example = torch.logsumexp(ll, dim=0) - math.log(ll.shape[0])
    else:
        per_example = ll.mean(dim=0)
    return -per_example.mean() + kl_weight * kl / dataset_size
