"""Bayesian linear op, torch backend: S weight samples without storing noise or weights.

Forward and backward walk the samples in chunks; for each chunk the noise is regenerated
from the noise key (:mod:`spar.rng`), the chunk's weights ``W_s = mu + sigma * eps_s``
are formed, used and dropped. Autograd saves ``x`` and the parameters, never ``eps`` or
``W_s``, so extra memory is one chunk of weights (``SPAR_CHUNK_NUMEL`` elements, default
2 M, 8 MB in fp32) whatever ``S`` is. ``lrt`` and ``flipout`` are composed from the same pieces.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from spar.rng import NoiseKey

_DEFAULT_CHUNK_NUMEL = 1 << 21


def chunk_samples(num_samples: int, numel_per_sample: int) -> int:
    """How many samples' weights fit in the chunk budget (at least one)."""
    budget = int(os.environ.get("SPAR_CHUNK_NUMEL", _DEFAULT_CHUNK_NUMEL))
    return max(1, min(num_samples, budget // max(1, numel_per_sample)))


def _chunks(num_samples: int, numel_per_sample: int):
    step = chunk_samples(num_samples, numel_per_sample)
    for lo in range(0, num_samples, step):
        yield lo, min(num_samples, lo + step)


def _weights(key: NoiseKey, pid: int, mu, sig, lo: int, hi: int, dtype) -> Tensor:
    """Weights of local samples ``[lo, hi)`` in ``dtype`` (``mu=None``: ``sigma * eps``);
    the generator forms them in the loop that draws the noise."""
    if mu is None:
        eps = key.normal(pid, sig.shape, samples=(lo, hi), device=sig.device, dtype=sig.dtype)
        return (sig * eps).to(dtype)
    return key.sample(pid, mu, sig, samples=(lo, hi), dtype=dtype)


class SampledLinearFn(torch.autograd.Function):
    """``y_s = x_s @ W_s^T`` with ``W_s = mu + softplus(rho) * eps_s`` (``mu=None``: zero
    mean, the flipout perturbation). x: ``(S*B, K)`` or shared ``(B, K)``; returns
    ``(S*B, N)``. No bias: biases are small and go through plain autograd."""

    @staticmethod
    def forward(ctx, x, mu, rho, key: NoiseKey, pid: int, shared_input: bool):
        S = key.num_samples
        N, K = rho.shape
        sig = F.softplus(rho)
        xs = x.unsqueeze(0) if shared_input else x.view(S, -1, K)
        B = xs.shape[1]
        y = x.new_empty(S, B, N)
        for lo, hi in _chunks(S, rho.numel()):
            w = _weights(key, pid, mu, sig, lo, hi, x.dtype)
            x_c = xs if shared_input else xs[lo:hi]
            torch.matmul(x_c, w.transpose(1, 2), out=y[lo:hi])
            del w  # before the next chunk's weights are drawn
        ctx.save_for_backward(x, mu, rho)
        ctx.key, ctx.pid, ctx.shared_input = key, pid, shared_input
        return y.view(S * B, N)

    @staticmethod
    def backward(ctx, dy):
        x, mu, rho = ctx.saved_tensors
        key, pid, shared = ctx.key, ctx.pid, ctx.shared_input
        need_x, need_mu, need_rho = ctx.needs_input_grad[:3]
        S = key.num_samples
        N, K = rho.shape
        sig = F.softplus(rho)
        xs = x.unsqueeze(0) if shared else x.view(S, -1, K)
        dys = dy.view(S, -1, N)
        dx = torch.zeros_like(x) if (need_x and shared) else None
        dx_all = x.new_empty(S, xs.shape[1], K) if (need_x and not shared) else None
        g_mu = torch.zeros_like(rho) if need_mu else None
        g_rho = torch.zeros_like(rho) if need_rho else None
        for lo, hi in _chunks(S, rho.numel()):
            eps = key.normal(pid, rho.shape, samples=(lo, hi), device=rho.device, dtype=rho.dtype)
            dy_c = dys[lo:hi]
            if need_x:
                w = sig * eps if mu is None else torch.addcmul(mu, sig, eps)
                dx_c = torch.matmul(dy_c, w.to(dy.dtype))  # (c, B, K)
                del w  # free the chunk's weights before the weight gradients are formed
                if shared:
                    dx += dx_c.sum(0)
                else:
                    dx_all[lo:hi] = dx_c
            if need_mu or need_rho:
                x_c = xs if shared else xs[lo:hi]
                g_w = torch.matmul(dy_c.transpose(1, 2), x_c).to(rho.dtype)  # (c, N, K)
                if need_mu:
                    g_mu += g_w.sum(0)
                if need_rho:
                    g_rho += g_w.mul_(eps).sum(0)  # in place: g_w is not needed any more
                del g_w
            del eps  # before the next chunk's noise is drawn
        if need_rho:
            g_rho *= torch.sigmoid(rho)
        if dx_all is not None:
            dx = dx_all.view_as(x)
        return dx, g_mu, g_rho, None, None, None


def _sampled_bias(bias_mu, bias_rho, key: NoiseKey, pid: int) -> Tensor:
    """Per-sample biases ``(S, N)``; small, so plain autograd."""
    eps = key.normal(pid, bias_mu.shape, device=bias_mu.device, dtype=bias_mu.dtype)
    return torch.addcmul(bias_mu, F.softplus(bias_rho), eps)


def _add_bias(y: Tensor, b: Tensor) -> Tensor:
    """y: ``(S*B, N, ...)``, b: ``(S, N)``."""
    S = b.shape[0]
    y = y.unflatten(0, (S, -1))
    b = b.to(y.dtype).view(S, 1, b.shape[1], *([1] * (y.dim() - 3)))
    return (y + b).flatten(0, 1)


def sign(noise: Tensor) -> Tensor:
    """Random signs (+1/-1) from normals: same key layout, so any backend reproduces them."""
    return torch.where(noise >= 0, 1.0, -1.0)


def linear_torch(
    x: Tensor,
    weight_mu: Tensor,
    weight_rho: Tensor,
    bias_mu: Tensor | None,
    bias_rho: Tensor | None,
    key: NoiseKey,
    *,
    weight_id: int,
    bias_id: int,
    estimator: str = "reparam",
    shared_input: bool = False,
    noise_ids: tuple[int, int] = (0, 0),
) -> Tensor:
    """Bayesian linear layer over ``key.num_samples`` samples; see :func:`spar.ops.bayes_linear`."""
    S = key.num_samples
    if estimator == "reparam":
        y = SampledLinearFn.apply(x, weight_mu, weight_rho, key, weight_id, shared_input)
        if bias_mu is not None:
            y = _add_bias(y, _sampled_bias(bias_mu, bias_rho, key, bias_id))
        return y
    if shared_input:
        x = x.unsqueeze(0).expand(S, *x.shape).flatten(0, 1)
    batch = x.shape[0] // S
    N = weight_mu.shape[0]
    if estimator == "lrt":
        eps = key.normal(noise_ids[0], (batch, N), first_row=key.data_offset, device=x.device)
        dt = x.dtype  # parameters stay fp32; the GEMMs run in the input's dtype
        var_b = None if bias_rho is None else F.softplus(bias_rho).square().to(dt)
        mean = F.linear(x, weight_mu.to(dt), None if bias_mu is None else bias_mu.to(dt))
        var = F.linear(x * x, F.softplus(weight_rho).square().to(dt), var_b)
        return mean + torch.sqrt(var.clamp_min(1e-30)) * eps.flatten(0, 1).to(x.dtype)
    if estimator == "flipout":
        K = weight_mu.shape[1]
        dev = x.device
        r = sign(key.normal(noise_ids[0], (batch, K), first_row=key.data_offset, device=dev))
        q = sign(key.normal(noise_ids[1], (batch, N), first_row=key.data_offset, device=dev))
        pert = SampledLinearFn.apply(
            x * r.flatten(0, 1).to(x.dtype), None, weight_rho, key, weight_id, False
        )
        y = F.linear(x, weight_mu.to(x.dtype)) + pert * q.flatten(0, 1).to(x.dtype)
        if bias_mu is not None:
            y = _add_bias(y, _sampled_bias(bias_mu, bias_rho, key, bias_id))
        return y
    raise ValueError(f"estimator must be one of 'reparam', 'lrt', 'flipout', got {estimator!r}")
