"""Uncertainty metrics of the Monte Carlo predictive.

Every function takes model outputs with a leading Monte Carlo sample axis, ``(S, B, C)``
logits for classification or ``(S, B, D)`` means for regression, and scores the Bayesian
model average (the predictive): ``p(y | x) = (1/S) sum_s p(y | x, w_s)``. Mixtures are
formed in log space (``logsumexp_s - log S``) so confident, disagreeing samples neither
underflow nor overflow.

The functions are pure torch: no side effects, no host transfers except where the result
is a python ``float`` (:func:`ood_auroc`) or a label-range check needs one, any device.
fp16/bf16 inputs are scored in fp32. They keep the autograd graph; wrap calls in
``torch.no_grad()`` when evaluating.

Classification: :func:`predictive_probs`, :func:`predictive_entropy`,
:func:`expected_entropy`, :func:`mutual_information`, :func:`nll`, :func:`brier`,
:func:`accuracy`, :func:`ece`, :func:`reliability`. Out-of-distribution detection:
:func:`ood_auroc`. Regression: :func:`gaussian_nll`, :func:`crps`.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from spar._prob import (
    categorical_ll,
    check_class_target,
    check_noise_std,
    check_real_target,
    check_sampled,
    gaussian_ll,
    tracing,
)

__all__ = [
    "ECEResult",
    "accuracy",
    "brier",
    "crps",
    "ece",
    "expected_entropy",
    "gaussian_nll",
    "mutual_information",
    "nll",
    "ood_auroc",
    "predictive_entropy",
    "predictive_probs",
    "reliability",
]

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Pairwise CRPS terms are evaluated in chunks of rows so that at most about this many
# elements are alive at once; S^2 * B * D can be far larger than memory.
_CRPS_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- helpers


def _logits(logits: Any) -> Tensor:
    return check_sampled(logits, "logits", "C")


def _labels(logits: Tensor, target: Any) -> Tensor:
    return check_class_target(target, logits.shape[1], logits.shape[2])


def _log_predictive(logits: Tensor) -> Tensor:
    """``log((1/S) sum_s softmax(logits_s))``: ``(S, B, C)`` -> ``(B, C)``."""
    return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=0) - math.log(logits.shape[0])


def _entropy(log_p: Tensor) -> Tensor:
    """``-sum_c p_c log p_c`` over the last dim, with ``0 log 0 = 0``."""
    # exp(-inf) * -inf is NaN; clamping log p to the most negative finite value makes the
    # zero-probability terms exactly 0 (and keeps their gradient finite).
    return -(log_p.exp() * log_p.clamp(min=torch.finfo(log_p.dtype).min)).sum(-1)


def _pos_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


# --------------------------------------------------------------------------- classification


def predictive_probs(logits: Tensor) -> Tensor:
    """Predictive class probabilities ``(1/S) sum_s softmax(logits[s])``.

    Args:
        logits: ``(S, B, C)``.

    Returns:
        ``(B, C)``; each row sums to 1.
    """
    return _log_predictive(_logits(logits)).exp()


def predictive_entropy(logits: Tensor) -> Tensor:
    """Entropy of the predictive, ``H[(1/S) sum_s p_s]`` in nats (total uncertainty).

    Args:
        logits: ``(S, B, C)``.

    Returns:
        ``(B,)``, in ``[0, log C]``.
    """
    return _entropy(_log_predictive(_logits(logits)))


def expected_entropy(logits: Tensor) -> Tensor:
    """Mean per-sample entropy ``(1/S) sum_s H[p_s]`` in nats (aleatoric uncertainty).

    Args:
        logits: ``(S, B, C)``.

    Returns:
        ``(B,)``.
    """
    return _entropy(F.log_softmax(_logits(logits), dim=-1)).mean(0)


def mutual_information(logits: Tensor) -> Tensor:
    """Mutual information between label and weights (BALD; epistemic uncertainty).

    ``MI = predictive_entropy - expected_entropy >= 0`` (Jensen), 0 exactly when every
    sample predicts the same distribution. Rounding can push it a few ulp below 0 when
    the samples agree; those values are clamped to 0.

    Args:
        logits: ``(S, B, C)``.

    Returns:
        ``(B,)``, in nats.
    """
    logits = _logits(logits)
    total = _entropy(_log_predictive(logits))
    aleatoric = _entropy(F.log_softmax(logits, dim=-1)).mean(0)
    return (total - aleatoric).clamp(min=0)


def nll(logits: Tensor, target: Tensor) -> Tensor:
    """Negative log-likelihood of the predictive, averaged over the batch.

    ``-(1/B) sum_b log((1/S) sum_s p(y_b | w_s))``, computed as
    ``logsumexp_s(log p) - log S``. This is the loss of ``spar.losses.elbo`` with
    ``reduction="mixture"`` and no KL.

    Args:
        logits: ``(S, B, C)``.
        target: ``(B,)`` integer labels in ``[0, C)``.

    Returns:
        0-dim tensor, in nats.
    """
    logits = _logits(logits)
    ll = categorical_ll(logits, _labels(logits, target))  # (S, B)
    return -(torch.logsumexp(ll, dim=0) - math.log(ll.shape[0])).mean()


def brier(logits: Tensor, target: Tensor) -> Tensor:
    """Brier score of the predictive: ``(1/B) sum_b sum_c (p_bc - onehot(y_b)_c)^2``.

    Args:
        logits: ``(S, B, C)``.
        target: ``(B,)`` integer labels in ``[0, C)``.

    Returns:
        0-dim tensor, in ``[0, 2]``.
    """
    logits = _logits(logits)
    target = _labels(logits, target)
    probs = _log_predictive(logits).exp()
    onehot = F.one_hot(target, logits.shape[-1]).to(probs.dtype)
    return (probs - onehot).square().sum(-1).mean()


def accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """Accuracy of the argmax of the predictive probabilities (not of the mean logits).

    Args:
        logits: ``(S, B, C)``.
        target: ``(B,)`` integer labels in ``[0, C)``.

    Returns:
        0-dim floating tensor in ``[0, 1]``.
    """
    logits = _logits(logits)
    target = _labels(logits, target)
    # argmax of log p equals argmax of p; no need to exponentiate.
    pred = _log_predictive(logits).argmax(-1)
    return (pred == target).to(logits.dtype).mean()


class ECEResult(NamedTuple):
    """Expected calibration error and the bins of its reliability diagram.

    Attributes:
        ece: 0-dim tensor, ``sum_b (n_b / N) |acc_b - conf_b|``.
        bin_edges: ``(n_bins + 1,)`` equal-width edges over ``[0, 1]``; bin ``i`` is
            ``(edges[i], edges[i+1]]`` (the first bin also holds 0).
        bin_confidence: ``(n_bins,)`` mean confidence per bin; NaN for empty bins (so
            plots skip them).
        bin_accuracy: ``(n_bins,)`` accuracy per bin; NaN for empty bins.
        bin_count: ``(n_bins,)`` int64 number of examples per bin.
    """

    ece: Tensor
    bin_edges: Tensor
    bin_confidence: Tensor
    bin_accuracy: Tensor
    bin_count: Tensor


def reliability(logits: Tensor, target: Tensor, n_bins: int = 15) -> ECEResult:
    """Reliability-diagram bins and ECE of the predictive.

    Confidence is the largest predictive probability, the prediction its argmax. Examples
    are put in ``n_bins`` equal-width confidence bins over ``[0, 1]``, right-closed
    (``(edges[i], edges[i+1]]``), and ``ECE = sum_b (n_b / N) |acc_b - conf_b|``.

    Args:
        logits: ``(S, B, C)``.
        target: ``(B,)`` integer labels in ``[0, C)``.
        n_bins: number of bins, ``>= 1``.

    Returns:
        :class:`ECEResult`; plot ``bin_accuracy`` against ``bin_confidence`` (or the bin
        centers) with ``bin_count`` as support.
    """
    n_bins = _pos_int(n_bins, "n_bins")
    logits = _logits(logits)
    target = _labels(logits, target)
    confidence, pred = _log_predictive(logits).exp().max(-1)  # (B,), (B,)
    correct = (pred == target).to(confidence.dtype)
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=confidence.dtype, device=logits.device)
    # right=False gives edges[i-1] < x <= edges[i] over the inner edges: right-closed bins.
    index = torch.bucketize(confidence, edges[1:-1], right=False)
    zeros = torch.zeros(n_bins, dtype=confidence.dtype, device=logits.device)
    conf_sum = zeros.index_add(0, index, confidence)
    acc_sum = zeros.index_add(0, index, correct)
    count = torch.zeros(n_bins, dtype=torch.int64, device=logits.device).index_add(
        0, index, torch.ones_like(index)
    )
    # (n_b / N) |acc_b - conf_b| = |sum acc - sum conf| / N: no division by empty bins.
    ece_value = (acc_sum - conf_sum).abs().sum() / confidence.shape[0]
    denom = count.to(confidence.dtype)
    return ECEResult(ece_value, edges, conf_sum / denom, acc_sum / denom, count)


def ece(logits: Tensor, target: Tensor, n_bins: int = 15) -> Tensor:
    """Expected calibration error of the predictive, with ``n_bins`` equal-width bins.

    ``ECE = sum_b (n_b / N) |acc_b - conf_b|``; see :func:`reliability` for the binning
    and for the per-bin values behind a reliability diagram.

    Args:
        logits: ``(S, B, C)``.
        target: ``(B,)`` integer labels in ``[0, C)``.
        n_bins: number of bins, ``>= 1``.

    Returns:
        0-dim tensor in ``[0, 1]``.
    """
    return reliability(logits, target, n_bins=n_bins).ece


# --------------------------------------------------------------------------- OOD detection


def _scores(scores: Any, name: str) -> Tensor:
    scores = torch.as_tensor(scores)
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D array of scores (B,); got shape {tuple(scores.shape)}"
        )
    if scores.is_complex():
        raise TypeError(f"{name} must be real, got dtype {scores.dtype}")
    scores = scores.to(torch.float64)
    if bool(torch.isnan(scores).any()):
        raise ValueError(f"{name} contains NaN")
    return scores


def ood_auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    """Area under the ROC curve for telling out-of-distribution from in-distribution inputs.

    Higher score = more likely OOD (e.g. :func:`predictive_entropy` or
    :func:`mutual_information`). Computed exactly from ranks (Mann-Whitney U):
    ``AUROC = (R_out - n_out (n_out + 1) / 2) / (n_in n_out)``, where ``R_out`` is the
    sum of the 1-based ranks of the OOD scores in the pooled sample and tied scores share
    their average rank. Equivalently ``P(s_out > s_in) + P(s_out = s_in) / 2``.

    Args:
        scores_in: ``(N_in,)`` scores of in-distribution inputs (tensor or array-like).
        scores_out: ``(N_out,)`` scores of OOD inputs.

    Returns:
        python float in ``[0, 1]``; 0.5 is chance.
    """
    a = _scores(scores_in, "scores_in")
    b = _scores(scores_out, "scores_out").to(a.device)
    n_in, n_out = a.numel(), b.numel()
    _, inverse, counts = torch.unique(
        torch.cat([a, b]), sorted=True, return_inverse=True, return_counts=True
    )
    # A run of c tied values ending at 1-based position e spans ranks e-c+1..e; fp64 holds
    # these half-integers and their sums exactly far beyond any realistic N.
    ends = counts.cumsum(0).to(torch.float64)
    mean_rank = ends - (counts.to(torch.float64) - 1.0) / 2.0
    rank_sum_out = mean_rank[inverse[n_in:]].sum()
    u = rank_sum_out - n_out * (n_out + 1) / 2.0
    return float(u / (n_in * n_out))


# --------------------------------------------------------------------------- regression


def _means(means: Any, target: Any) -> tuple[Tensor, Tensor]:
    means = check_sampled(means, "means", "D")
    target = check_real_target(target, means.shape[1], means.shape[2], means.dtype)
    return means, target


def gaussian_nll(means: Tensor, target: Tensor, noise_std: float | Tensor) -> Tensor:
    """NLL of the Gaussian-mixture predictive, in nats per target dimension.

    The predictive of a ``D``-dim target is the equally weighted mixture of the ``S``
    samples' Gaussians, ``p(y_b) = (1/S) sum_s prod_d N(y_bd | means_sbd, sigma_sbd^2)``
    (a sample predicts all ``D`` dims jointly). The result is
    ``-(1/(B D)) sum_b log p(y_b)``: the mean over the batch of the joint NLL, divided
    by ``D``. For ``S = 1`` (or ``D = 1``) this is the mean over all ``B * D`` elements
    of the elementwise Gaussian (mixture) NLL. It matches ``spar.losses.elbo`` with
    ``likelihood="gaussian", reduction="mixture"`` and no KL, divided by ``D``.

    Args:
        means: ``(S, B, D)`` predictive means of each sample.
        target: ``(B, D)``.
        noise_std: observation noise std ``sigma > 0``: a float or a tensor broadcastable
            to ``(S, B, D)`` (e.g. ``(D,)``).

    Returns:
        0-dim tensor.
    """
    means, target = _means(means, target)
    sigma = check_noise_std(noise_std, means)
    ll = gaussian_ll(means, target, sigma)  # (S, B)
    per_example = torch.logsumexp(ll, dim=0) - math.log(ll.shape[0])
    return -per_example.mean() / means.shape[2]


def _abs_moment(mu: Tensor, var: Tensor) -> Tensor:
    """``A(mu, var) = E|Z|`` for ``Z ~ N(mu, var)``: ``2 s phi(mu/s) + mu erf(mu/(s sqrt 2))``.

    (``erf(x / sqrt 2) = 2 Phi(x) - 1``.) Tends to ``|mu|`` as ``var -> 0``, which is used
    where ``var == 0``.
    """
    degenerate = var == 0
    # where() evaluates (and differentiates) both branches: taking sqrt of a safe variance
    # keeps the unused branch, and sqrt's infinite slope at 0, out of the gradient.
    safe = torch.where(degenerate, torch.ones_like(var), var).sqrt()
    z = mu / safe
    value = 2.0 * safe * _INV_SQRT_2PI * torch.exp(-0.5 * z.square()) + mu * torch.erf(
        z / math.sqrt(2.0)
    )
    return torch.where(degenerate, mu.abs(), value)


def _crps_ensemble(x: Tensor, y: Tensor) -> Tensor:
    """CRPS of the empirical distribution of ``x`` ``(S, B, D)`` at ``y`` ``(B, D)``."""
    s = x.shape[0]
    term_obs = (x - y).abs().mean(0)
    # With x sorted ascending, sum_{i,j} |x_i - x_j| = 2 sum_k (2k - S + 1) x_(k), k from 0:
    # O(S log S) instead of the O(S^2) pairwise sum.
    ordered = x.sort(dim=0).values
    k = torch.arange(s, dtype=x.dtype, device=x.device)
    weight = ((2.0 * k - (s - 1)) / (s * s)).view(s, 1, 1)
    half_spread = (weight * ordered).sum(0)  # = (1/2) E|X - X'|
    return term_obs - half_spread


def _crps_mixture(mu: Tensor, var: Tensor, y: Tensor) -> Tensor:
    """CRPS of the mixture ``(1/S) sum_s N(mu_s, var_s)`` at ``y``; ``mu, var: (S, B, D)``."""
    s = mu.shape[0]
    term_obs = _abs_moment(y - mu, var).mean(0)
    chunk = max(1, _CRPS_CHUNK_ELEMENTS // mu.numel())
    pair_sum = torch.zeros_like(term_obs)
    for start in range(0, s, chunk):
        rows = slice(start, start + chunk)
        diff = mu[rows].unsqueeze(1) - mu.unsqueeze(0)  # (c, S, B, D)
        pair_var = var[rows].unsqueeze(1) + var.unsqueeze(0)
        pair_sum = pair_sum + _abs_moment(diff, pair_var).sum(dim=(0, 1))
    return term_obs - pair_sum / (2.0 * s * s)


def crps(means: Tensor, target: Tensor, noise_std: float | Tensor = 0.0) -> Tensor:
    """Continuous ranked probability score of the predictive, averaged over batch and dims.

    ``CRPS(F, y) = E|X - y| - (1/2) E|X - X'|`` with ``X, X' ~ F`` independent, per scalar
    target element; lower is better, and it has the units of ``y``.

    - ``noise_std == 0``: ``F`` is the empirical distribution of the ``S`` sample means
      (the ensemble CRPS), ``(1/S) sum_s |x_s - y| - (1/(2 S^2)) sum_{s,t} |x_s - x_t|``,
      evaluated in ``O(S log S)`` by sorting. This is the plug-in form (``1/S^2``), not the
      "fair" one (``1/(S(S-1))``).
    - ``noise_std > 0``: ``F = (1/S) sum_s N(mu_s, sigma_s^2)``, in closed form (Grimit et
      al., 2006)::

          CRPS = (1/S) sum_s A(y - mu_s, sigma_s^2)
                 - (1/(2 S^2)) sum_{s,t} A(mu_s - mu_t, sigma_s^2 + sigma_t^2)
          A(mu, v) = E|N(mu, v)| = 2 sqrt(v) phi(mu/sqrt(v)) + mu (2 Phi(mu/sqrt(v)) - 1)

      which costs ``O(S^2 B D)`` time, evaluated in chunks to bound memory.

    Args:
        means: ``(S, B, D)`` sample means.
        target: ``(B, D)``.
        noise_std: ``sigma >= 0``: a float or a tensor broadcastable to ``(S, B, D)``.
            Elements equal to 0 make the matching components point masses.

    Returns:
        0-dim tensor: the mean over the ``B * D`` elements.
    """
    means, target = _means(means, target)
    if isinstance(noise_std, Real) and not isinstance(noise_std, bool) and noise_std == 0:
        return _crps_ensemble(means, target).mean()
    sigma = check_noise_std(noise_std, means, allow_zero=True)
    if not tracing() and not bool((sigma != 0).any()):
        return _crps_ensemble(means, target).mean()
    var = sigma.square().expand_as(means)
    return _crps_mixture(means, var, target).mean()
