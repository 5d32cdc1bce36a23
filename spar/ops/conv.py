"""Bayesian N-d convolution op, torch backend.

The S per-sample convolutions of a chunk are one grouped convolution: samples become
channel groups (``(c*B, C, ...) -> (B, c*C, ...)``, weights ``(c*O, C/g, ...)``, groups
``c*g``). As in :mod:`spar.ops.linear`, noise and sampled weights are regenerated per
chunk in backward (``aten.convolution_backward`` on the grouped problem), never stored.
Padding must be numeric and symmetric here; the modules turn padding modes and
``"same"`` into an explicit ``F.pad`` first.

Order: forward and backward math -> custom ops ``spar::sampled_conv`` and
``spar::sampled_conv_backward`` (:mod:`spar.ops.library`) -> ``SampledConvFn`` ->
``conv_torch``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from spar.ops.library import key_args, make_key, normal, or_empty, spar_op
from spar.ops.linear import _add_bias, _chunks, _grads_fake, _sampled_bias, _weights, sign
from spar.rng import NoiseKey

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _to_groups(x_c: Tensor, c: int) -> Tensor:
    """``(c*B, C, *sp) -> (B, c*C, *sp)``."""
    xs = x_c.unflatten(0, (c, -1))
    return xs.transpose(0, 1).flatten(1, 2)


def _from_groups(y: Tensor, c: int) -> Tensor:
    """``(B, c*O, *sp) -> (c*B, O, *sp)``."""
    return y.unflatten(1, (c, -1)).transpose(0, 1).flatten(0, 1)


def sampled_conv_forward(x: Tensor, mu: Tensor | None, rho: Tensor, key: NoiseKey, pid: int,
                         conv_args: tuple) -> Tensor:  # fmt: skip
    """``y_s = conv(x_s, W_s)`` for the key's samples (``mu=None``: zero-mean perturbation).
    x: ``(S*B, C, *spatial)``; returns ``(S*B, O, *spatial_out)``, contiguous; no bias."""
    stride, padding, dilation, groups = conv_args
    S = key.num_samples
    conv = _CONV[rho.dim() - 2]
    sig = F.softplus(rho)
    outs = []
    xs = x.unflatten(0, (S, -1))
    for lo, hi in _chunks(S, rho.numel()):
        c = hi - lo
        w = _weights(key, pid, mu, sig, lo, hi, x.dtype)
        xg = _to_groups(xs[lo:hi].flatten(0, 1), c)
        y = conv(xg, w.flatten(0, 1), None, stride, padding, dilation, c * groups)
        outs.append(_from_groups(y, c))
    # contiguous whatever the input's memory format: the op's fake promises that layout
    return torch.cat(outs, 0) if len(outs) > 1 else outs[0].contiguous()


def sampled_conv_backward(
    dy: Tensor,
    x: Tensor,
    mu: Tensor | None,
    rho: Tensor,
    key: NoiseKey,
    pid: int,
    conv_args: tuple,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dx, grad_mu, grad_rho)`` of :func:`sampled_conv_forward` (None where
    ``needs`` says so): ``aten.convolution_backward`` on each chunk's grouped problem with
    the noise regenerated."""
    stride, padding, dilation, groups = conv_args
    need_x, need_mu, need_rho = needs
    S = key.num_samples
    sig = F.softplus(rho)
    xs = x.unflatten(0, (S, -1))
    dys = dy.unflatten(0, (S, -1))
    dx = x.new_empty(x.shape).unflatten(0, (S, -1)) if need_x else None
    g_mu = rho.new_zeros(rho.shape) if need_mu else None
    g_rho = rho.new_zeros(rho.shape) if need_rho else None
    nd = rho.dim() - 2
    for lo, hi in _chunks(S, rho.numel()):
        c = hi - lo
        eps = key.normal(pid, rho.shape, samples=(lo, hi), device=rho.device, dtype=rho.dtype)
        w = sig * eps if mu is None else torch.addcmul(mu, sig, eps)
        xg = _to_groups(xs[lo:hi].flatten(0, 1), c)
        dyg = _to_groups(dys[lo:hi].flatten(0, 1), c)
        gx, gw, _ = torch.ops.aten.convolution_backward(
            dyg, xg, w.to(x.dtype).flatten(0, 1), None,
            list(stride), list(padding), list(dilation), False, [0] * nd, c * groups,
            [need_x, need_mu or need_rho, False],
        )  # fmt: skip
        if need_x:
            dx[lo:hi] = _from_groups(gx, c).unflatten(0, (c, -1))
        if need_mu or need_rho:
            gw = gw.to(rho.dtype).unflatten(0, (c, -1))  # (c, O, C/g, *k)
            if need_mu:
                g_mu += gw.sum(0)
            if need_rho:
                g_rho += gw.mul_(eps).sum(0)  # in place: gw is not needed any more
    if need_rho:
        g_rho *= torch.sigmoid(rho)
    if dx is not None:
        dx = dx.flatten(0, 1)
    return dx, g_mu, g_rho


# --- custom ops (spar.ops.library): opaque to torch.compile --------------------------------


def _sampled_conv_fake(x, mu, rho, step, seed, first_sample, num_samples, pid, stride, padding,
                       dilation, groups):  # fmt: skip
    sizes = zip(x.shape[2:], rho.shape[2:], stride, padding, dilation, strict=True)
    spatial = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in sizes]
    return x.new_empty(x.shape[0], rho.shape[0], *spatial)


@spar_op("sampled_conv", _sampled_conv_fake)
def sampled_conv_op(x: Tensor, mu: Tensor | None, rho: Tensor, step: Tensor, seed: int,
                    first_sample: int, num_samples: int, pid: int, stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int],
                    groups: int) -> Tensor:  # fmt: skip
    key = make_key(step, seed, first_sample, num_samples)
    return sampled_conv_forward(x, mu, rho, key, pid, (stride, padding, dilation, groups))


def _sampled_conv_backward_fake(dy, x, mu, rho, step, seed, first_sample, num_samples, pid,
                                stride, padding, dilation, groups, need_x, need_mu,
                                need_rho):  # fmt: skip
    return _grads_fake(x, rho, need_x, need_mu, need_rho)


@spar_op("sampled_conv_backward", _sampled_conv_backward_fake)
def sampled_conv_backward_op(dy: Tensor, x: Tensor, mu: Tensor | None, rho: Tensor,
                             step: Tensor, seed: int, first_sample: int, num_samples: int,
                             pid: int, stride: Sequence[int], padding: Sequence[int],
                             dilation: Sequence[int], groups: int, need_x: bool, need_mu: bool,
                             need_rho: bool) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    key = make_key(step, seed, first_sample, num_samples)
    dx, g_mu, g_rho = sampled_conv_backward(
        dy, x, mu, rho, key, pid, (stride, padding, dilation, groups), (need_x, need_mu, need_rho)
    )
    return or_empty(dx, x), or_empty(g_mu, rho), or_empty(g_rho, rho)


class SampledConvFn(torch.autograd.Function):
    """Autograd of ``spar::sampled_conv`` (:func:`sampled_conv_forward`): saves ``x``, the
    parameters and the step, never ``eps`` or ``W_s``."""

    @staticmethod
    def forward(ctx, x, mu, rho, key: NoiseKey, pid: int, conv_args: tuple):
        step, seed, first_sample, num_samples, _ = key_args(key)
        stride, padding, dilation, groups = conv_args
        ctx.save_for_backward(x, mu, rho)
        ctx.step = step  # a 0-d key, as in SampledLinearFn
        ctx.args = (seed, first_sample, num_samples, pid, list(stride), list(padding),
                    list(dilation), groups)  # fmt: skip
        return sampled_conv_op(x, mu, rho, step, *ctx.args)

    @staticmethod
    def backward(ctx, dy):
        x, mu, rho = ctx.saved_tensors
        need_x, need_mu, need_rho = ctx.needs_input_grad[:3]
        dx, g_mu, g_rho = sampled_conv_backward_op(
            dy, x, mu, rho, ctx.step, *ctx.args, need_x, need_mu, need_rho
        )
        return (dx if need_x else None, g_mu if need_mu else None, g_rho if need_rho else None,
                None, None, None)  # fmt: skip


def conv_torch(
    x: Tensor,
    weight_mu: Tensor,
    weight_rho: Tensor,
    bias_mu: Tensor | None,
    bias_rho: Tensor | None,
    key: NoiseKey,
    *,
    weight_id: int,
    bias_id: int,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    estimator: str = "reparam",
    noise_ids: tuple[int, int] = (0, 0),
) -> Tensor:
    """Bayesian convolution over ``key.num_samples`` samples; see :func:`spar.ops.bayes_conv`."""
    S = key.num_samples
    conv_args = (tuple(stride), tuple(padding), tuple(dilation), int(groups))
    conv = _CONV[weight_mu.dim() - 2]
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if estimator == "reparam":
        y = SampledConvFn.apply(x, weight_mu, weight_rho, key, weight_id, conv_args)
        if bias_mu is not None:
            y = _add_bias(y, _sampled_bias(bias_mu, bias_rho, key, bias_id))
        return y
    batch = x.shape[0] // S
    if estimator == "lrt":
        dt = x.dtype  # parameters stay fp32; the convolutions run in the input's dtype
        var_b = None if bias_rho is None else F.softplus(bias_rho).square().to(dt)
        mean = conv(x, weight_mu.to(dt), None if bias_mu is None else bias_mu.to(dt), **kw)
        var = conv(x * x, F.softplus(weight_rho).square().to(dt), var_b, **kw)
        shape = (batch, *mean.shape[1:])
        eps = normal(key, noise_ids[0], shape, first_row=key.data_offset, device=x.device)
        return mean + torch.sqrt(var.clamp_min(1e-30)) * eps.flatten(0, 1).to(x.dtype)
    if estimator == "flipout":
        off, dev = key.data_offset, x.device
        r = sign(normal(key, noise_ids[0], (batch, *x.shape[1:]), first_row=off, device=dev))
        pert = SampledConvFn.apply(
            x * r.flatten(0, 1).to(x.dtype), None, weight_rho, key, weight_id, conv_args
        )
        q = sign(normal(key, noise_ids[1], (batch, *pert.shape[1:]), first_row=off, device=dev))
        y = conv(x, weight_mu.to(x.dtype), None, **kw) + pert * q.flatten(0, 1).to(x.dtype)
        if bias_mu is not None:
            y = _add_bias(y, _sampled_bias(bias_mu, bias_rho, key, bias_id))
        return y
    raise ValueError(f"estimator must be one of 'reparam', 'lrt', 'flipout', got {estimator!r}")
