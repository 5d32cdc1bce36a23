"""Materialized weight samples ``W_s = mu + softplus(rho) * eps_s`` (Triton).

For layers whose GEMM is not fused with the noise (convolutions through cuDNN, the chunked
linear path) this writes the weights of a range of global samples into a buffer, and its
backward reduces the per-sample weight gradients into ``grad_mu`` and ``grad_rho`` with
``eps`` regenerated from the noise key: ``eps`` is never stored.

A parameter of any shape is viewed as the 2-D array ``(rows, cols) = (shape[0],
numel // shape[0])`` of the noise key (a vector is one row), see :mod:`spar.rng`.

Order in this file: kernels -> launchers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from spar.ops.backends.triton._utils import (
    as_i32,
    check_device,
    elementwise_block,
    interpret,
    normal_tile,
    philox_key,
    to_store,
)
from spar.rng import NoiseKey

# ---------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["key", "first_sample", "first_row", "step"])
def _sample_weights_kernel(
    mu_ptr, sig_ptr, out_ptr,
    R, C, num_samples,
    stride_mur, stride_muc,
    stride_sr, stride_sc,
    stride_os, stride_or, stride_oc,
    key, first_sample, first_row, step,
    HAS_MU: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """``out[s] = mu + sig * eps_{first_sample + s}``: one ``(BLOCK_R, BLOCK_C)`` tile of
    one sample per program. out: ``(num_samples, R, C)``; mu, sig: ``(R, C)`` fp32. Row
    ``r`` draws the noise of the key's row ``first_row + r`` (0 for parameters; the global
    index of the first example for per-example noise)."""
    pid = tl.program_id(0)
    # samples vary fastest so that programs reading the same mu/sigma tile run together
    s = pid % num_samples
    tile = pid // num_samples
    num_c = tl.cdiv(C, BLOCK_C)
    pid_r = tile // num_c
    pid_c = tile % num_c

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    r64 = offs_r.to(tl.int64)[:, None]
    c64 = offs_c.to(tl.int64)[None, :]

    sample = first_sample.to(tl.uint32, bitcast=True) + tl.cast(s, tl.uint32)
    rows = first_row.to(tl.uint32, bitcast=True) + offs_r.to(tl.uint32)
    eps = normal_tile(
        key, rows, sample, pid_c * BLOCK_C, step.to(tl.uint32, bitcast=True), BLOCK_R, BLOCK_C,
    )  # fmt: skip
    w = tl.load(sig_ptr + r64 * stride_sr + c64 * stride_sc, mask=mask, other=0.0) * eps
    if HAS_MU:
        w += tl.load(mu_ptr + r64 * stride_mur + c64 * stride_muc, mask=mask, other=0.0)
    out = out_ptr + tl.cast(s, tl.int64) * stride_os + r64 * stride_or + c64 * stride_oc
    tl.store(out, to_store(w, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit(do_not_specialize=["key", "first_sample", "step"])
def _sample_weights_bwd_kernel(
    g_ptr, rho_ptr, gmu_ptr, geps_ptr,
    R, C, num_samples,
    stride_gs, stride_gr, stride_gc,
    stride_rr, stride_rc,
    stride_ar, stride_ac,
    key, first_sample, step,
    HAS_MU: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    APPLY_SIGMOID: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``gmu (+)= sum_s g[s]``, ``geps (+)= sum_s g[s] * eps_s``, with eps regenerated;
    with ``APPLY_SIGMOID`` the finished ``geps`` is multiplied by ``sigmoid(rho)`` (it
    becomes ``grad_rho``).

    g: ``(num_samples, R, C)`` any float dtype; rho ``(R, C)``; gmu, geps: ``(R, C)`` fp32
    sharing the strides ``stride_a*``. Each program owns one tile and walks all samples,
    so the sum over samples is deterministic without atomics.
    """
    pid = tl.program_id(0)
    num_c = tl.cdiv(C, BLOCK_C)
    pid_r = pid // num_c
    pid_c = pid % num_c
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    r64 = offs_r.to(tl.int64)[:, None]
    c64 = offs_c.to(tl.int64)[None, :]
    rows = offs_r.to(tl.uint32)
    step_u = step.to(tl.uint32, bitcast=True)
    first = first_sample.to(tl.uint32, bitcast=True)

    acc_mu = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    acc_eps = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    g_base = g_ptr + r64 * stride_gr + c64 * stride_gc
    for s in range(0, num_samples):
        g = tl.load(g_base + tl.cast(s, tl.int64) * stride_gs, mask=mask, other=0.0).to(tl.float32)
        eps = normal_tile(
            key, rows, first + tl.cast(s, tl.uint32), pid_c * BLOCK_C, step_u, BLOCK_R, BLOCK_C
        )
        acc_mu += g
        acc_eps += g * eps
    a_off = r64 * stride_ar + c64 * stride_ac
    if ACCUMULATE:
        acc_eps += tl.load(geps_ptr + a_off, mask=mask, other=0.0)
    if APPLY_SIGMOID:
        rho = tl.load(rho_ptr + r64 * stride_rr + c64 * stride_rc, mask=mask, other=0.0)
        acc_eps = acc_eps / (1.0 + tl.exp(-rho))
    tl.store(geps_ptr + a_off, acc_eps, mask=mask)
    if HAS_MU:
        if ACCUMULATE:
            acc_mu += tl.load(gmu_ptr + a_off, mask=mask, other=0.0)
        tl.store(gmu_ptr + a_off, acc_mu, mask=mask)


# ---------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------


def _block(R: int, C: int, block: tuple[int, int] | None) -> tuple[int, int]:
    if block is not None:
        br, bc = block
        if bc % 4 or bc & (bc - 1) or br & (br - 1):
            raise ValueError(f"block must be powers of two with cols % 4 == 0, got {block}")
        return br, bc
    return elementwise_block()


def _sample_range(key: NoiseKey, samples: tuple[int, int] | None) -> tuple[int, int]:
    lo, hi = (0, key.num_samples) if samples is None else samples
    if not 0 <= lo <= hi <= key.num_samples:
        raise ValueError(f"samples must satisfy 0 <= lo <= hi <= {key.num_samples}, got {samples}")
    return lo, hi


def sample_weights(
    mu: Tensor | None,
    sigma: Tensor,
    key: NoiseKey,
    pid: int,
    samples: tuple[int, int] | None = None,
    *,
    dtype: torch.dtype | None = None,
    out: Tensor | None = None,
    block: tuple[int, int] | None = None,
    first_row: int = 0,
) -> Tensor:
    """Weights of local samples ``[lo, hi)`` (default: all of ``key``):
    mu, sigma ``(R, C)`` fp32 (``mu=None``: zero mean) -> ``(hi - lo, R, C)`` in ``dtype``
    (default fp32), written into ``out`` when given (a bounded workspace). ``first_row``
    shifts the key's row counter (``sigma = 1`` and ``first_row = data_offset``: the
    per-example noise itself)."""
    lo, hi = _sample_range(key, samples)
    if sigma.dim() != 2:
        raise ValueError(f"sigma must be 2-D (rows, cols), got shape {tuple(sigma.shape)}")
    if mu is not None and mu.shape != sigma.shape:
        raise ValueError(f"mu shape {tuple(mu.shape)} != sigma shape {tuple(sigma.shape)}")
    check_device(mu, sigma)
    R, C = sigma.shape
    c = hi - lo
    dtype = dtype or torch.float32
    if out is None:
        out = torch.empty((c, R, C), dtype=dtype, device=sigma.device)
    elif out.shape != (c, R, C):
        raise ValueError(f"out must have shape {(c, R, C)}, got {tuple(out.shape)}")
    if c == 0 or R * C == 0:
        return out
    br, bc = _block(R, C, block)
    mu_ = sigma if mu is None else mu  # placeholder pointer, never read when HAS_MU=False
    grid = (c * triton.cdiv(R, br) * triton.cdiv(C, bc),)
    _sample_weights_kernel[grid](
        mu_, sigma, out, R, C, c,
        mu_.stride(0), mu_.stride(1), sigma.stride(0), sigma.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        philox_key(key.seed, pid), as_i32(key.first_sample + lo), as_i32(first_row),
        as_i32(key.step), HAS_MU=mu is not None, BLOCK_R=br, BLOCK_C=bc, INTERPRET=interpret(),
    )  # fmt: skip
    return out


def sample_weights_backward(
    grad_w: Tensor,
    key: NoiseKey,
    pid: int,
    samples: tuple[int, int] | None = None,
    *,
    grad_mu: Tensor | None = None,
    grad_eps: Tensor | None = None,
    need_mu: bool = True,
    rho: Tensor | None = None,
    block: tuple[int, int] | None = None,
) -> tuple[Tensor | None, Tensor]:
    """Reduce per-sample weight gradients ``grad_w (c, R, C)`` of local samples
    ``[lo, hi)``: returns ``(sum_s grad_w[s], sum_s grad_w[s] * eps_s)`` as fp32 ``(R, C)``.

    Given ``grad_mu``/``grad_eps`` buffers, the sums are added to them in place (the chunked
    path walks its chunks sequentially, so this stays deterministic). Given ``rho`` (on the
    last call only), the second result is finished into ``grad_rho = sigmoid(rho) * sum``.
    """
    lo, hi = _sample_range(key, samples)
    c, R, C = grad_w.shape
    if c != hi - lo:
        raise ValueError(f"grad_w has {c} samples, expected {hi - lo}")
    check_device(grad_w)
    accumulate = grad_eps is not None
    f32 = dict(dtype=torch.float32, device=grad_w.device)
    if grad_eps is None:
        grad_eps = torch.empty((R, C), **f32)
    if need_mu and grad_mu is None:
        if accumulate:
            raise ValueError("grad_mu must be given with grad_eps when accumulating")
        grad_mu = torch.empty((R, C), **f32)
    for t in (grad_mu, grad_eps):
        if t is not None and (t.shape != (R, C) or t.dtype != torch.float32):
            raise ValueError(f"gradient buffers must be fp32 {(R, C)}, got {t.dtype} {t.shape}")
        if t is not None and not t.is_contiguous():
            raise ValueError("gradient buffers must be contiguous")
    if R * C == 0:
        return grad_mu, grad_eps
    if c == 0:
        if not accumulate:
            grad_eps.zero_()
            if grad_mu is not None:
                grad_mu.zero_()
        elif rho is not None:
            grad_eps.mul_(torch.sigmoid(rho))
        return grad_mu, grad_eps
    br, bc = _block(R, C, block)
    grid = (triton.cdiv(R, br) * triton.cdiv(C, bc),)
    gmu = grad_eps if grad_mu is None else grad_mu  # placeholder pointers when not read
    rho_ = grad_eps if rho is None else rho
    if rho is not None and rho.shape != (R, C):
        raise ValueError(f"rho must have shape {(R, C)}, got {tuple(rho.shape)}")
    _sample_weights_bwd_kernel[grid](
        grad_w, rho_, gmu, grad_eps, R, C, c,
        grad_w.stride(0), grad_w.stride(1), grad_w.stride(2), rho_.stride(0), rho_.stride(1),
        C, 1,
        philox_key(key.seed, pid), as_i32(key.first_sample + lo), as_i32(key.step),
        HAS_MU=grad_mu is not None, ACCUMULATE=accumulate, APPLY_SIGMOID=rho is not None,
        BLOCK_R=br, BLOCK_C=bc,
    )  # fmt: skip
    return grad_mu, grad_eps


# ---------------------------------------------------------------------------------------
# the sampler of the chunked loops (spar.ops.backends.torch.generator documents the API)
# ---------------------------------------------------------------------------------------


def keyed_normal(key: NoiseKey, pid: int, shape: tuple[int, ...], device: torch.device, *,
                 first_row: int = 0, samples: tuple[int, int] | None = None) -> Tensor:  # fmt: skip
    """fp32 normals ``(hi - lo, *shape)`` of ``pid`` for local samples ``[lo, hi)`` (default:
    all of ``key``), rows shifted by ``first_row`` (per-example noise: the global index of
    the first example): what ``key.normal(pid, shape, first_row=first_row)`` of
    :mod:`spar.rng` returns. The sampling kernel with ``sigma = 1`` (``1 * eps`` is exact);
    a vector is one row of the key's 2-D view."""
    shape = tuple(int(d) for d in shape)
    rows = shape[0] if len(shape) > 1 else 1
    numel = 1
    for d in shape:
        numel *= d
    ones = torch.ones((), dtype=torch.float32, device=device)
    eps = sample_weights(None, ones.expand(rows, numel // max(rows, 1)), key, pid, samples,
                         first_row=first_row)  # fmt: skip
    return eps.view(eps.shape[0], *shape)


class TritonSampler:
    """Weights and parameter gradients of one sampled-op call from the Triton kernels: the
    sampling kernel writes a chunk of weights into a workspace reused from chunk to chunk,
    and its backward reduces each chunk's weight gradients into ``grad_mu`` and
    ``grad_rho`` with eps regenerated in the same pass (deterministic: each program owns a
    tile and walks the chunk's samples; chunks are added in order, no atomics).

    fp32 parameters (all the Triton backend accepts) take the fused kernels. Other dtypes
    (the torch backend on CUDA with fp64 or 16-bit parameters) get the same normals from
    the kernel, one chunk at a time, and torch does the arithmetic (16-bit parameters: in
    fp32, the gradients cast to their dtype at the end)."""

    def __init__(self, key: NoiseKey, pid: int, mu: Tensor | None, rho: Tensor, need_mu: bool,
                 need_rho: bool) -> None:  # fmt: skip
        self.key, self.pid, self.shape = key, pid, tuple(rho.shape)
        rows = rho.shape[0] if rho.dim() > 1 else 1
        self.rc = (rows, rho.numel() // max(rows, 1))  # the key's 2-D view
        self.rho = rho.reshape(self.rc)
        self.mu = None if mu is None else mu.reshape(self.rc)
        f32 = torch.float32
        self.fused = rho.dtype == f32 and (mu is None or mu.dtype == f32)
        self.need_mu, self.need_rho = need_mu and mu is not None, need_rho
        self._sig: Tensor | None = None
        self._work: Tensor | None = None
        self.g_mu: Tensor | None = None
        self.g_eps: Tensor | None = None

    def _eps(self, lo: int, hi: int) -> Tensor:
        """fp32 normals ``(hi - lo, R, C)``."""
        return keyed_normal(self.key, self.pid, self.rc, self.rho.device, samples=(lo, hi))

    def weights(self, lo: int, hi: int, dtype: torch.dtype) -> Tensor:
        c = hi - lo
        if self._sig is None:
            self._sig = F.softplus(self.rho)
        if not self.fused:
            w = self._sig * self._eps(lo, hi)
            w = w if self.mu is None else self.mu + w
            return w.to(dtype).view(c, *self.shape)
        work = self._work
        if work is None or work.dtype != dtype or work.shape[0] < c:
            # the first chunk is the largest: one allocation per call
            work = self._work = torch.empty((c, *self.rc), dtype=dtype, device=self.rho.device)
        w = sample_weights(self.mu, self._sig, self.key, self.pid, (lo, hi), out=work[:c])
        return w.view(c, *self.shape)

    def add_grads(self, g_w: Tensor, lo: int, hi: int) -> None:
        c = hi - lo
        g = g_w.reshape(c, *self.rc)
        if not self.fused:
            dt = self.rho.dtype
            g = g.to(dt)
            if self.need_mu:
                self.g_mu = g.sum(0) if self.g_mu is None else self.g_mu.add_(g.sum(0))
            if self.need_rho:
                ge = (g * self._eps(lo, hi)).sum(0)
                self.g_eps = ge if self.g_eps is None else self.g_eps.add_(ge)
            return
        last = hi == self.key.num_samples
        self.g_mu, self.g_eps = sample_weights_backward(
            g, self.key, self.pid, (lo, hi), grad_mu=self.g_mu, grad_eps=self.g_eps,
            need_mu=self.need_mu, rho=self.rho if last and self.need_rho else None,
        )  # fmt: skip

    def grads(self) -> tuple[Tensor | None, Tensor | None]:
        g_mu = None if self.g_mu is None or not self.need_mu else self.g_mu.view(self.shape)
        g_rho = None
        if self.need_rho and self.g_eps is not None:
            g_rho = self.g_eps.view(self.shape)
            if not self.fused:  # the fused kernel applied sigmoid(rho) on the last chunk
                g_rho = g_rho * torch.sigmoid(self.rho).view(self.shape)
        # in rho's dtype, as the fake promises (the sums over 16-bit chunks are fp32)
        dt = self.rho.dtype
        return (None if g_mu is None else g_mu.to(dt)), (None if g_rho is None else g_rho.to(dt))
