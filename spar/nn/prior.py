"""Gaussian priors and the closed-form KL divergence of mean-field Gaussian posteriors."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


class GaussianPrior:
    """Independent ``N(mean, std^2)`` over every element of a parameter.

    ``mean`` and ``std`` may be floats or tensors that broadcast to the parameter (e.g. a
    pretrained weight as the prior mean). Layers copy them into buffers, so the prior moves
    with ``.to(device)`` and lives in ``state_dict``.
    """

    def __init__(self, mean: float | Tensor = 0.0, std: float | Tensor = 1.0) -> None:
        if not isinstance(mean, (int, float, Tensor)) or isinstance(mean, bool):
            raise TypeError(f"mean must be a float or a Tensor, got {type(mean).__name__}")
        if not isinstance(std, (int, float, Tensor)) or isinstance(std, bool):
            raise TypeError(f"std must be a float or a Tensor, got {type(std).__name__}")
        std_t = torch.as_tensor(std, dtype=torch.float32)
        if not bool(torch.all(std_t > 0)) or not bool(torch.all(torch.isfinite(std_t))):
            raise ValueError(f"std must be finite and > 0, got {std}")
        mean_t = torch.as_tensor(mean, dtype=torch.float32)
        if not bool(torch.all(torch.isfinite(mean_t))):
            raise ValueError("mean must be finite")
        self.mean = mean_t.detach().clone()
        self.std = std_t.detach().clone()

    def __repr__(self) -> str:
        def show(t: Tensor) -> str:
            return f"{t.item():g}" if t.numel() == 1 else f"Tensor{tuple(t.shape)}"

        return f"GaussianPrior(mean={show(self.mean)}, std={show(self.std)})"


# A prior spec for a whole model: one prior for everything, or a function of the layer's
# qualified name and the original module (see :func:`pretrained_prior`).
PriorSpec = GaussianPrior | Callable[[str, torch.nn.Module], "GaussianPrior | dict"] | None


def pretrained_prior(std: float = 1.0) -> Callable[[str, torch.nn.Module], dict]:
    """A :func:`spar.nn.bayesianize` prior centred on each layer's existing weights."""

    def make(name: str, module: torch.nn.Module) -> dict:
        priors = {"weight": GaussianPrior(module.weight.detach(), std)}
        if getattr(module, "bias", None) is not None:
            priors["bias"] = GaussianPrior(module.bias.detach(), std)
        return priors

    return make


def gaussian_kl(mu: Tensor, sigma: Tensor, prior_mean: Tensor, prior_std: Tensor) -> Tensor:
    """``sum KL(N(mu, sigma^2) || N(prior_mean, prior_std^2))`` over all elements:

    ``log(sp/sq) + (sq^2 + (mq - mp)^2) / (2 sp^2) - 1/2`` per element.
    """
    var_ratio = (sigma / prior_std).square()
    mean_term = ((mu - prior_mean) / prior_std).square()
    kl = 0.5 * (var_ratio + mean_term - 1.0) - torch.log(sigma / prior_std)
    return kl.sum()


class _KLFromRho(torch.autograd.Function):
    """:func:`gaussian_kl` of ``(mu, softplus(rho))`` with its closed-form gradients
    (``dKL/dmu = (mu - mp) / sp^2``, ``dKL/drho = (sq / sp^2 - 1 / sq) * sigmoid(rho)``): a
    handful of tensor ops forward and backward instead of autograd through a dozen. The KL
    runs every step for every parameter: on a 64-128-128-8 MLP (S=8, batch 64, 2 threads)
    the step went from 6.5 to 5.5 ms."""

    @staticmethod
    def forward(ctx, mu, rho, prior_mean, prior_std):
        sq = F.softplus(rho)
        d = mu - prior_mean
        inv_var = prior_std.reciprocal().square()
        if prior_std.numel() == 1:  # scalar prior std: whole-tensor dot products
            s, dd = sq.flatten(), d.flatten()
            quad = 0.5 * inv_var.reshape(()) * (torch.dot(s, s) + torch.dot(dd, dd))
            const = sq.numel() * (torch.log(prior_std.reshape(())) - 0.5)
            kl = quad - torch.log(sq).sum() + const
        else:
            kl = gaussian_kl(mu, sq, prior_mean, prior_std)
        ctx.save_for_backward(rho, sq, d, inv_var)
        ctx.shape = mu.shape
        return kl

    @staticmethod
    def backward(ctx, g):
        rho, sq, d, inv_var = ctx.saved_tensors
        g_mu = g_rho = None
        if ctx.needs_input_grad[0]:
            g_mu = (g * d * inv_var).sum_to_size(ctx.shape)
        if ctx.needs_input_grad[1]:
            g_sq = g * (sq * inv_var - sq.reciprocal())
            g_rho = (g_sq * torch.sigmoid(rho)).sum_to_size(ctx.shape)
        return g_mu, g_rho, None, None


def kl_from_rho(mu: Tensor, rho: Tensor, prior_mean: Tensor, prior_std: Tensor) -> Tensor:
    """``KL(N(mu, softplus(rho)^2) || N(prior_mean, prior_std^2))`` summed over all elements,
    differentiable w.r.t. ``mu`` and ``rho`` (the prior is a constant: buffers)."""
    if prior_mean.requires_grad or prior_std.requires_grad:  # a learned prior: plain autograd
        return gaussian_kl(mu, F.softplus(rho), prior_mean, prior_std)
    return _KLFromRho.apply(mu, rho, prior_mean, prior_std)


def inverse_sigma(sigma: float | Tensor) -> float | Tensor:
    """The ``rho`` with ``softplus(rho) == sigma`` (``sigma > 0``): the layers' posterior std
    is ``softplus(rho)``, so this is how ``init_sigma`` becomes the initial ``rho``.

    ``rho = sigma + log(1 - exp(-sigma))``, written with ``expm1`` so that it is accurate
    for tiny ``sigma`` (``rho ~ log(sigma)``) and large ``sigma`` (``rho ~ sigma``). A float
    gives a float; a tensor gives a float64 tensor.
    """
    if isinstance(sigma, Tensor):
        s = sigma.detach().to(torch.float64)
        if not bool(torch.all(s > 0)):
            raise ValueError("sigma must be > 0")
        return s + torch.log(-torch.expm1(-s))
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"sigma must be a float or a Tensor, got {type(sigma).__name__}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    s = float(sigma)
    return s + math.log(-math.expm1(-s))
