"""Pure-torch reference of every spar op, with the noise passed in explicitly.

These functions materialize everything (per-sample weights, noise) and let autograd do
the rest: they are the ground truth that the memory-lean torch backend and the Triton
kernels are tested against, not a path for training. Shapes use ``S`` samples, batch
``B``; ``x`` is folded sample-major ``(S*B, ...)`` or, where noted, shared ``(B, ...)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from spar.ops.library import VAR_FLOOR


def sigma(rho: Tensor) -> Tensor:
    """``softplus(rho)``, stable for any ``rho`` (torch switches to the identity above 20)."""
    return F.softplus(rho)


def inverse_sigma(s: Tensor | float) -> Tensor:
    """``rho`` with ``softplus(rho) == s`` for ``s > 0``: ``s + log(-expm1(-s))``, stable for
    tiny and large ``s``."""
    s = torch.as_tensor(s, dtype=torch.float64)
    return s + torch.log(-torch.expm1(-s))


def sample_weight(mu: Tensor, rho: Tensor, eps: Tensor) -> Tensor:
    """``W_s = mu + softplus(rho) * eps_s``: ``eps (S, *mu.shape) -> (S, *mu.shape)``."""
    return mu + sigma(rho) * eps


def _unfold(x: Tensor, num_samples: int) -> Tensor:
    """``(S*B, ...) -> (S, B, ...)``; a shared ``(B, ...)`` input is broadcast."""
    return x.unflatten(0, (num_samples, -1))


def linear_reparam(
    x: Tensor,
    mu: Tensor,
    rho: Tensor,
    bias_mu: Tensor | None,
    bias_rho: Tensor | None,
    eps_w: Tensor,
    eps_b: Tensor | None,
    *,
    shared_input: bool = False,
) -> Tensor:
    """One weight sample per Monte Carlo sample, shared by the batch.

    x: ``(S*B, K)`` or shared ``(B, K)``; mu, rho: ``(N, K)``; eps_w: ``(S, N, K)``;
    eps_b: ``(S, N)``. Returns ``(S*B, N)``.
    """
    S = eps_w.shape[0]
    w = sample_weight(mu, rho, eps_w).to(x.dtype)
    xs = x.unsqueeze(0) if shared_input else _unfold(x, S)
    y = torch.matmul(xs, w.transpose(1, 2))  # (S, B, N)
    if bias_mu is not None:
        y = y + sample_weight(bias_mu, bias_rho, eps_b).to(x.dtype).unsqueeze(1)
    return y.flatten(0, 1)


def linear_lrt(
    x: Tensor,
    mu: Tensor,
    rho: Tensor,
    bias_mu: Tensor | None,
    bias_rho: Tensor | None,
    eps_out: Tensor,
) -> Tensor:
    """Local reparameterization: sample pre-activations, not weights.

    ``y = x mu^T + b_mu + sqrt(x^2 sigma^2^T + sigma_b^2) * eps_out``; x ``(S*B, K)``,
    eps_out ``(S*B, N)`` (one normal per sample, example and output unit).
    """
    mean = F.linear(x, mu, bias_mu)
    var = F.linear(
        x * x, sigma(rho).square(), None if bias_rho is None else sigma(bias_rho).square()
    )
    return mean + torch.sqrt(var.clamp_min(VAR_FLOOR)) * eps_out


def linear_flipout(
    x: Tensor,
    mu: Tensor,
    rho: Tensor,
    bias_mu: Tensor | None,
    bias_rho: Tensor | None,
    eps_w: Tensor,
    eps_b: Tensor | None,
    sign_in: Tensor,
    sign_out: Tensor,
) -> Tensor:
    """Flipout: one weight perturbation per sample, decorrelated across examples by random
    signs. ``y_s = x_s mu^T + ((x_s * r_s) (sigma * eps_s)^T) * q_s + b_s``.

    x, sign_in: ``(S*B, K)``; sign_out: ``(S*B, N)``; eps_w ``(S, N, K)``; eps_b ``(S, N)``.
    """
    S = eps_w.shape[0]
    pert = (sigma(rho) * eps_w).to(x.dtype)
    y = (
        F.linear(x, mu)
        + torch.matmul(_unfold(x * sign_in, S), pert.transpose(1, 2)).flatten(0, 1) * sign_out
    )
    if bias_mu is not None:
        b = sample_weight(bias_mu, bias_rho, eps_b).to(x.dtype)
        y = y + b.repeat_interleave(x.shape[0] // S, dim=0)
    return y


ConvFn = Callable[..., Tensor]


def conv_reparam(
    conv: ConvFn,
    x: Tensor,
    mu: Tensor,
    rho: Tensor,
    bias_mu: Tensor | None,
    bias_rho: Tensor | None,
    eps_w: Tensor,
    eps_b: Tensor | None,
    **conv_kwargs,
) -> Tensor:
    """Per-sample convolution by a Python loop over samples (the obvious, slow truth).

    ``conv`` is ``F.conv1d/2d/3d``; x ``(S*B, C, ...)``; eps_w ``(S, *mu.shape)``.
    """
    S = eps_w.shape[0]
    xs = _unfold(x, S)
    w = sample_weight(mu, rho, eps_w).to(x.dtype)
    b = None if bias_mu is None else sample_weight(bias_mu, bias_rho, eps_b).to(x.dtype)
    outs = [conv(xs[s], w[s], None if b is None else b[s], **conv_kwargs) for s in range(S)]
    return torch.cat(outs, dim=0)


def conv_lrt(
    conv: ConvFn,
    x: Tensor,
    mu: Tensor,
    rho: Tensor,
    bias_mu: Tensor | None,
    bias_rho: Tensor | None,
    eps_out: Tensor,
    **conv_kwargs,
) -> Tensor:
    """Local reparameterization for convolutions; eps_out has the output's shape."""
    mean = conv(x, mu, bias_mu, **conv_kwargs)
    var_b = None if bias_rho is None else sigma(bias_rho).square()
    var = conv(x * x, sigma(rho).square(), var_b, **conv_kwargs)
    return mean + torch.sqrt(var.clamp_min(VAR_FLOOR)) * eps_out


def conv_flipout(
    conv: ConvFn,
    x: Tensor,
    mu: Tensor,
    rho: Tensor,
    bias_mu: Tensor | None,
    bias_rho: Tensor | None,
    eps_w: Tensor,
    eps_b: Tensor | None,
    sign_in: Tensor,
    sign_out: Tensor,
    **conv_kwargs,
) -> Tensor:
    """Flipout for convolutions; sign_in has x's shape, sign_out the output's."""
    S = eps_w.shape[0]
    zero = torch.zeros_like(rho)
    # perturbation part: a reparam conv with zero mean and no bias
    pert = conv_reparam(conv, x * sign_in, zero, rho, None, None, eps_w, None, **conv_kwargs)
    y = conv(x, mu, None, **conv_kwargs) + pert * sign_out
    if bias_mu is not None:
        b = sample_weight(bias_mu, bias_rho, eps_b).to(x.dtype)  # (S, O)
        b = b.repeat_interleave(x.shape[0] // S, dim=0)
        y = y + b.view(*b.shape, *([1] * (y.dim() - 2)))
    return y
