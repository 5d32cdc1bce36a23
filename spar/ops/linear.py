"""Bayesian linear op, torch backend: S weight samples without storing noise or weights.

Forward and backward walk the samples in chunks; for each chunk the noise is regenerated
from the noise key (:mod:`spar.rng`), the chunk's weights ``W_s = mu + sigma * eps_s``
are formed, used and dropped. Autograd saves ``x`` and the parameters, never ``eps`` or
``W_s``, so extra memory is one chunk of weights (``SPAR_CHUNK_NUMEL`` elements, default
2 M, 8 MB in fp32) whatever ``S`` is. ``lrt`` and ``flipout`` are composed from the same pieces.

Order: forward and backward math -> custom ops ``spar::sampled_linear`` and
``spar::sampled_linear_backward`` (:mod:`spar.ops.library`) -> ``SampledLinearFn`` ->
``linear_torch``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from spar.ops.library import key_args, make_key, normal, or_empty, spar_op
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


def sampled_linear_forward(x: Tensor, mu: Tensor | None, rho: Tensor, key: NoiseKey, pid: int,
                           shared_input: bool) -> Tensor:  # fmt: skip
    """``y_s = x_s @ W_s^T`` with ``W_s = mu + softplus(rho) * eps_s`` (``mu=None``: zero
    mean, the flipout perturbation). x: ``(S*B, K)`` or shared ``(B, K)``; returns
    ``(S*B, N)``."""
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
    return y.view(S * B, N)


def sampled_linear_backward(
    dy: Tensor,
    x: Tensor,
    mu: Tensor | None,
    rho: Tensor,
    key: NoiseKey,
    pid: int,
    shared_input: bool,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dx, grad_mu, grad_rho)`` of :func:`sampled_linear_forward` (None where
    ``needs`` says so), regenerating the noise chunk by chunk."""
    need_x, need_mu, need_rho = needs
    shared = shared_input
    S = key.num_samples
    N, K = rho.shape
    sig = F.softplus(rho)
    xs = x.unsqueeze(0) if shared else x.view(S, -1, K)
    dys = dy.view(S, -1, N)
    dx = x.new_zeros(x.shape) if (need_x and shared) else None
    dx_all = x.new_empty(S, xs.shape[1], K) if (need_x and not shared) else None
    g_mu = rho.new_zeros(rho.shape) if need_mu else None
    g_rho = rho.new_zeros(rho.shape) if need_rho else None
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
        dx = dx_all.view(x.shape)
    return dx, g_mu, g_rho


# --- custom ops (spar.ops.library): opaque to torch.compile --------------------------------


def _sampled_linear_fake(x, mu, rho, step, seed, first_sample, num_samples, pid, shared_input):
    rows = num_samples * x.shape[0] if shared_input else x.shape[0]
    return x.new_empty(rows, rho.shape[0])


@spar_op("sampled_linear", _sampled_linear_fake)
def sampled_linear_op(x: Tensor, mu: Tensor | None, rho: Tensor, step: Tensor, seed: int,
                      first_sample: int, num_samples: int, pid: int,
                      shared_input: bool) -> Tensor:  # fmt: skip
    key = make_key(step, seed, first_sample, num_samples)
    return sampled_linear_forward(x, mu, rho, key, pid, shared_input)


def _grads_fake(x, rho, need_x, need_mu, need_rho):
    return tuple(t.new_empty(t.shape if need else 0)
                 for t, need in ((x, need_x), (rho, need_mu), (rho, need_rho)))  # fmt: skip


def _sampled_linear_backward_fake(dy, x, mu, rho, step, seed, first_sample, num_samples, pid,
                                  shared_input, need_x, need_mu, need_rho):  # fmt: skip
    return _grads_fake(x, rho, need_x, need_mu, need_rho)


@spar_op("sampled_linear_backward", _sampled_linear_backward_fake)
def sampled_linear_backward_op(dy: Tensor, x: Tensor, mu: Tensor | None, rho: Tensor,
                               step: Tensor, seed: int, first_sample: int, num_samples: int,
                               pid: int, shared_input: bool, need_x: bool, need_mu: bool,
                               need_rho: bool) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    key = make_key(step, seed, first_sample, num_samples)
    dx, g_mu, g_rho = sampled_linear_backward(
        dy, x, mu, rho, key, pid, shared_input, (need_x, need_mu, need_rho)
    )
    return or_empty(dx, x), or_empty(g_mu, rho), or_empty(g_rho, rho)


class SampledLinearFn(torch.autograd.Function):
    """Autograd of ``spar::sampled_linear`` (:func:`sampled_linear_forward`): saves ``x``,
    the parameters and the step, never ``eps`` or ``W_s``. No bias: biases are small and go
    through plain autograd."""

    @staticmethod
    def forward(ctx, x, mu, rho, key: NoiseKey, pid: int, shared_input: bool):
        step, seed, first_sample, num_samples, _ = key_args(key)
        # the step (a 0-d key that nothing modifies in place: spar.sampling holds its own
        # copy) rides on ctx rather than in the saved tensors
        ctx.save_for_backward(x, mu, rho)
        ctx.step, ctx.args = step, (seed, first_sample, num_samples, pid, shared_input)
        return sampled_linear_op(x, mu, rho, step, *ctx.args)

    @staticmethod
    def backward(ctx, dy):
        x, mu, rho = ctx.saved_tensors
        need_x, need_mu, need_rho = ctx.needs_input_grad[:3]
        dx, g_mu, g_rho = sampled_linear_backward_op(
            dy, x, mu, rho, ctx.step, *ctx.args, need_x, need_mu, need_rho
        )
        return (dx if need_x else None, g_mu if need_mu else None, g_rho if need_rho else None,
                None, None, None)  # fmt: skip


def _sampled_bias(bias_mu, bias_rho, key: NoiseKey, pid: int) -> Tensor:
    """Per-sample biases ``(S, N)``; small, so plain autograd."""
    eps = normal(key, pid, bias_mu.shape, device=bias_mu.device, dtype=bias_mu.dtype)
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
        eps = normal(key, noise_ids[0], (batch, N), first_row=key.data_offset, device=x.device)
        dt = x.dtype  # parameters stay fp32; the GEMMs run in the input's dtype
        var_b = None if bias_rho is None else F.softplus(bias_rho).square().to(dt)
        mean = F.linear(x, weight_mu.to(dt), None if bias_mu is None else bias_mu.to(dt))
        var = F.linear(x * x, F.softplus(weight_rho).square().to(dt), var_b)
        return mean + torch.sqrt(var.clamp_min(1e-30)) * eps.flatten(0, 1).to(x.dtype)
    if estimator == "flipout":
        K = weight_mu.shape[1]
        dev = x.device
        r = sign(normal(key, noise_ids[0], (batch, K), first_row=key.data_offset, device=dev))
        q = sign(normal(key, noise_ids[1], (batch, N), first_row=key.data_offset, device=dev))
        pert = SampledLinearFn.apply(
            x * r.flatten(0, 1).to(x.dtype), None, weight_rho, key, weight_id, False
        )
        y = F.linear(x, weight_mu.to(x.dtype)) + pert * q.flatten(0, 1).to(x.dtype)
        if bias_mu is not None:
            y = _add_bias(y, _sampled_bias(bias_mu, bias_rho, key, bias_id))
        return y
    raise ValueError(f"estimator must be one of 'reparam', 'lrt', 'flipout', got {estimator!r}")
