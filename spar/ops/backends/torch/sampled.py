"""``sampled_linear`` and ``sampled_conv`` on the torch backend (any device), and the chunk
loops that the Triton backend's ``sampled_conv`` shares.

``y_s = op(x_s, W_s)`` with ``W_s = mu + softplus(rho) * eps_s`` for the key's S samples
(``mu=None``: the zero-mean perturbation of flipout). Forward and backward walk the
samples in chunks of at most ``SPAR_CHUNK_NUMEL`` weight elements (at least one sample);
for each chunk a *sampler* (:mod:`spar.ops.backends.torch.generator`) regenerates the
chunk's weights from the key, torch runs the GEMM or convolution, and in backward the
sampler reduces the chunk's per-sample weight gradients into ``grad_mu``/``grad_rho``
(eps regenerated again). Autograd saves ``x`` and the parameters, never ``eps`` or
``W_s``: extra memory is one chunk of weights whatever ``S`` is. The loops take the
sampler class as ``make_sampler``: the torch backend's own (:mod:`spar.rng` noise; the
Triton generator on CUDA) by default, :class:`~spar.ops.backends.triton.sample.TritonSampler`
from the Triton backend.

Convolutions run a chunk of samples as one grouped convolution (samples become channel
groups). A shared input ``(B, ...)`` (the first layer of a model) is read once: linear
multiplies it by each sample's weights, convolution stacks the chunk's weights along the
output channels, and its gradient is the sum over samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from spar.ops.backends.torch.generator import sampler_for
from spar.ops.library import chunk_samples
from spar.rng import NoiseKey

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def chunks(num_samples: int, numel_per_sample: int) -> Iterator[tuple[int, int]]:
    c = chunk_samples(num_samples, numel_per_sample)
    for lo in range(0, num_samples, c):
        yield lo, min(num_samples, lo + c)


def _sampler(make_sampler: type | None, key: NoiseKey, pid: int, mu: Tensor | None,
             rho: Tensor, need_mu: bool = False, need_rho: bool = False):  # fmt: skip
    """A sampler (:mod:`spar.ops.backends.torch.generator`) for this call: ``make_sampler``,
    or the torch backend's own for ``rho``'s device."""
    make = make_sampler or sampler_for(rho.device)
    return make(key, pid, mu, rho, need_mu, need_rho)


# --- linear -------------------------------------------------------------------------------


def linear_forward(x: Tensor, mu: Tensor | None, rho: Tensor, key: NoiseKey, pid: int,
                   shared: int, *, make_sampler: type | None = None) -> Tensor:  # fmt: skip
    """x ``(S*B, K)`` or shared ``(B, K)`` -> ``(S*B, N)``."""
    S = key.num_samples
    N, K = rho.shape
    sampler = _sampler(make_sampler, key, pid, mu, rho)
    xs = x.unsqueeze(0) if shared else x.view(S, -1, K)
    B = xs.shape[1]
    y = x.new_empty(S, B, N)
    for lo, hi in chunks(S, rho.numel()):
        w = sampler.weights(lo, hi, x.dtype)
        torch.matmul(xs if shared else xs[lo:hi], w.transpose(1, 2), out=y[lo:hi])
        del w  # before the next chunk's weights are drawn
    return y.view(S * B, N)


def linear_backward(dy: Tensor, x: Tensor, mu: Tensor | None, rho: Tensor, key: NoiseKey,
                    pid: int, shared: int, needs: tuple[bool, ...], *,
                    make_sampler: type | None = None) -> tuple:  # fmt: skip
    need_x, need_mu, need_rho = needs
    S = key.num_samples
    N, K = rho.shape
    need_mu = need_mu and mu is not None
    sampler = _sampler(make_sampler, key, pid, mu, rho, need_mu, need_rho)
    xs = x.unsqueeze(0) if shared else x.view(S, -1, K)
    dys = dy.view(S, -1, N)
    B = xs.shape[1]
    dx = None
    if need_x:  # shared: summed over samples, in at least fp32 whatever x's dtype
        acc = torch.promote_types(x.dtype, torch.float32)
        dx = x.new_zeros(x.shape, dtype=acc) if shared else x.new_empty(S, B, K)
    for lo, hi in chunks(S, rho.numel()):
        dy_c = dys[lo:hi]
        if need_x:
            w = sampler.weights(lo, hi, dy.dtype)
            if shared:  # sum_s dy_s @ W_s as one GEMM over the concatenated (sample, n) axis
                c = hi - lo
                dy_cat = dy_c.permute(1, 0, 2).reshape(B, c * N)
                dx += torch.mm(dy_cat, w.reshape(c * N, K)).to(dx.dtype)
            else:
                torch.matmul(dy_c, w, out=dx[lo:hi])
            del w  # free the chunk's weights before the weight gradients are formed
        if need_mu or need_rho:
            g_w = torch.matmul(dy_c.transpose(1, 2), xs if shared else xs[lo:hi])
            sampler.add_grads(g_w, lo, hi)
            del g_w
    if dx is not None:
        dx = dx.to(x.dtype) if shared else dx.view(x.shape)
    return dx, *sampler.grads()


# --- N-d convolution ----------------------------------------------------------------------


def _geometry(rho: Tensor, geometry: tuple[int, ...]):
    nd = rho.dim() - 2
    return geometry[:nd], geometry[nd : 2 * nd], geometry[2 * nd :]


def _conv_weight(w: Tensor, groups: int, shared: int) -> tuple[Tensor, int]:
    """A chunk's weights ``(c, O, C/g, *k)`` as one convolution's weight and groups.
    Folded input: samples are groups, output channels ``(c, O)``. Shared input: the
    chunk's weights stacked inside each of the ``g`` groups, output channels
    ``(g, c, O/g)``."""
    c = w.shape[0]
    if not shared:
        return w.flatten(0, 1), c * groups
    return w.unflatten(1, (groups, -1)).transpose(0, 1).flatten(0, 2), groups


def _conv_weight_grad(gw: Tensor, c: int, groups: int, shared: int) -> Tensor:
    """Inverse of :func:`_conv_weight`: ``(c, O, C/g, *k)``."""
    if not shared:
        return gw.unflatten(0, (c, -1))
    return gw.unflatten(0, (groups, c, -1)).transpose(0, 1).flatten(1, 2)


def _to_groups(t: Tensor, c: int, groups: int, shared: int) -> Tensor:
    """Per-sample activations ``(c, B, ch, *sp)`` in the channel order of the grouped
    convolution: ``(B, c*ch, *sp)``, or ``(B, g*c*ch/g, *sp)`` for the shared layout."""
    if not shared:
        return t.transpose(0, 1).flatten(1, 2)
    t = t.unflatten(2, (groups, -1))  # (c, B, g, ch/g, *sp)
    return t.permute(1, 2, 0, *range(3, t.dim())).flatten(1, 3)


def _from_groups(t: Tensor, c: int, groups: int, shared: int) -> Tensor:
    """Inverse of :func:`_to_groups`: ``(B, c*ch, *sp)`` -> ``(c, B, ch, *sp)``."""
    if not shared:
        return t.unflatten(1, (c, -1)).transpose(0, 1)
    t = t.unflatten(1, (groups, c, -1))  # (B, g, c, ch/g, *sp)
    return t.permute(2, 0, 1, *range(3, t.dim())).flatten(2, 3)


def conv_forward(x: Tensor, mu: Tensor | None, rho: Tensor, key: NoiseKey, pid: int,
                 shared: int, groups: int, *geometry: int,
                 make_sampler: type | None = None) -> Tensor:  # fmt: skip
    """x ``(S*B, C, *sp)`` or shared ``(B, C, *sp)`` -> ``(S*B, O, *sp_out)``, contiguous."""
    stride, padding, dilation = _geometry(rho, geometry)
    S = key.num_samples
    conv = _CONV[rho.dim() - 2]
    sampler = _sampler(make_sampler, key, pid, mu, rho)
    xs = None if shared else x.unflatten(0, (S, -1))
    outs = []
    for lo, hi in chunks(S, rho.numel()):
        c = hi - lo
        w, g = _conv_weight(sampler.weights(lo, hi, x.dtype), groups, shared)
        x_c = x if shared else _to_groups(xs[lo:hi], c, groups, shared)
        y = conv(x_c, w, None, stride, padding, dilation, g)
        outs.append(_from_groups(y, c, groups, shared).flatten(0, 1))
    # contiguous whatever the input's memory format: the fake promises that layout
    return torch.cat(outs, 0) if len(outs) > 1 else outs[0].contiguous()


def conv_backward(dy: Tensor, x: Tensor, mu: Tensor | None, rho: Tensor, key: NoiseKey,
                  pid: int, shared: int, groups: int, *rest,
                  make_sampler: type | None = None) -> tuple:  # fmt: skip
    """``rest``: the geometry of :func:`conv_forward`, then ``needs``."""
    *geometry, needs = rest
    stride, padding, dilation = _geometry(rho, tuple(geometry))
    need_x, need_mu, need_rho = needs
    S = key.num_samples
    nd = rho.dim() - 2
    need_mu = need_mu and mu is not None
    sampler = _sampler(make_sampler, key, pid, mu, rho, need_mu, need_rho)
    xs = None if shared else x.unflatten(0, (S, -1))
    dys = dy.unflatten(0, (S, -1))
    dx = None
    if need_x:
        dx = x.new_zeros(x.shape) if shared else x.new_empty(x.shape).unflatten(0, (S, -1))
    need_w = need_mu or need_rho
    for lo, hi in chunks(S, rho.numel()):
        c = hi - lo
        if need_x:
            w = sampler.weights(lo, hi, x.dtype)
        else:  # the weight gradient reads only the weight's shape: no noise drawn
            w = x.new_zeros(()).expand(c, *rho.shape)
        w, g = _conv_weight(w, groups, shared)
        x_c = x if shared else _to_groups(xs[lo:hi], c, groups, shared)
        gx, gw, _ = torch.ops.aten.convolution_backward(
            _to_groups(dys[lo:hi], c, groups, shared), x_c, w, None,
            list(stride), list(padding), list(dilation), False, [0] * nd, g,
            [need_x, need_w, False],
        )  # fmt: skip
        if need_x:
            if shared:
                dx += gx
            else:
                dx[lo:hi] = _from_groups(gx, c, groups, shared)
        if need_w:
            sampler.add_grads(_conv_weight_grad(gw, c, groups, shared), lo, hi)
    if dx is not None and not shared:
        dx = dx.flatten(0, 1)
    return dx, *sampler.grads()


# --- the primitives of a backend that supplies only a sampler -----------------------------


def sampler_primitives(make_sampler: type, check: Callable[[Tensor, Tensor | None, Tensor], None]
                       ) -> dict[str, tuple[Callable, Callable]]:  # fmt: skip
    """``{"sampled_linear": (forward, backward), "sampled_conv": (forward, backward)}`` of a
    backend whose whole contribution is its sampler: the chunk loops above with
    ``make_sampler``, after the backend's input check ``check(x, mu, rho)``; ``dy`` is cast
    to the activations' dtype. Signatures as :func:`linear_forward` / :func:`conv_forward`
    without ``make_sampler`` (see :mod:`spar.ops.library` for how they are registered)."""

    def linear_fwd(x, mu, rho, key, pid, shared):
        check(x, mu, rho)
        return linear_forward(x, mu, rho, key, pid, shared, make_sampler=make_sampler)

    def linear_bwd(dy, x, mu, rho, key, pid, shared, needs):
        check(x, mu, rho)
        return linear_backward(dy.to(x.dtype), x, mu, rho, key, pid, shared, needs,
                               make_sampler=make_sampler)  # fmt: skip

    def conv_fwd(x, mu, rho, key, pid, shared, groups, *geometry):
        check(x, mu, rho)
        return conv_forward(x, mu, rho, key, pid, shared, groups, *geometry,
                            make_sampler=make_sampler)  # fmt: skip

    def conv_bwd(dy, x, mu, rho, key, pid, shared, groups, *rest):
        check(x, mu, rho)
        return conv_backward(dy.to(x.dtype), x, mu, rho, key, pid, shared, groups, *rest,
                             make_sampler=make_sampler)  # fmt: skip

    return {"sampled_linear": (linear_fwd, linear_bwd), "sampled_conv": (conv_fwd, conv_bwd)}
