"""The ``sampled_linear`` primitive on the GPU (Triton).

``y[s] = x[s] @ W_s^T`` with ``W_s = mu + softplus(rho) * eps_s`` (``mu=None``: zero
mean); x is ``(S*B, K)`` folded sample-major, or one ``(B, K)`` shared by every sample
(first layer). Biases are the estimators' business (:mod:`spar.ops`). Two paths compute it:

``fused``
    The GEMM kernels generate each ``(BLOCK_N, BLOCK_K)`` weight tile in registers from
    the noise key (:mod:`spar.rng`) right before its ``tl.dot``: the forward computes
    ``y``, the backward computes ``dx[s] = dy[s] @ W_s`` regenerating the tiles, and
    ``grad_mu``/``grad_rho`` are reduced over all S samples inside one kernel whose
    programs each own a tile of the weight, so there is no per-sample ``dW`` in memory and
    the sum needs no atomics to be deterministic. Extra memory: ``softplus(rho)`` and the
    two fp32 gradient accumulators, O(|W|).
``chunked``
    A chunk of samples' weights is written by the sampling kernel
    (:mod:`spar.ops.backends.triton.sample`) into a workspace bounded by
    ``SPAR_CHUNK_NUMEL`` elements, and cuBLAS does the (batched) GEMMs; the backward
    reduces the chunk's ``dW`` with the sampling kernel's backward (eps regenerated).

Dispatch rule (``SPAR_LINEAR_PATH=auto``, the default; ``fused``/``chunked`` force one)
----------------------------------------------------------------------------------------
The fused forward and dx kernels regenerate a weight tile for every ``BLOCK_M`` rows of a
sample's batch. Generating one normal costs about 60 SASS instructions on sm_90 (a quarter
of a Philox4x32-10 call, ~15, and half a precise Box-Muller, ~45: ``bench/cost_model.py``):
on an H100 that is predicted at about 8x the tensor-core work of a 128-row sample, so the
noise, not the GEMM, sets the fused kernel's time, and it grows as ``ceil(B / BLOCK_M)``.
With ``BLOCK_M`` up to 128 and ``B <= FUSED_MAX_ROWS = 128`` every weight element's noise
is generated once per kernel, the minimum any path needs, and the fused path also saves the
chunked path's workspace write + read and its per-sample ``dW``: it takes ``B <= 128``.
Above that the chunked path generates each weight once per sample whatever ``B`` is, and
cuBLAS runs at full efficiency on the tall GEMMs: it takes ``B > 128``. The cost model
(``bench/results/cost_model.md``, predicted) puts the crossover between 128 and 256 rows.
The threshold is a module constant so that ``bench/bench_kernels.py`` measurements on a
GPU can move it.

Order in this file: kernels -> launchers -> the primitive's forward and backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from spar import _env
from spar.ops.backends.torch import sampled
from spar.ops.backends.triton._utils import (
    as_i32,
    check_sampled,
    dot_precision,
    interpret,
    next_pow2,
    normal_tile,
    num_sms,
    philox_key,
    to_dot,
    to_store,
)
from spar.ops.backends.triton.sample import TritonSampler
from spar.rng import NoiseKey

# Kept at 128 by the cost model (bench/cost_model.py; bench/results/cost_model.md, all
# figures predicted, none measured): fused over chunked step time at B = 128 is 0.47-0.82
# on every modelled layer (4096x4096, 1024x1024, 4096x1024; S = 16, bf16) on H100 and H200;
# at B = 256 it is 0.77-1.10 on the H100 but 1.05-1.31 on the H200; at 512, 1.24-1.91.
FUSED_MAX_ROWS = 128

# ---------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["key_w", "first_sample", "step"])
def _bayes_linear_fwd_kernel(
    x_ptr, mu_ptr, sig_ptr, y_ptr,
    S, B, N, K,
    stride_xs, stride_xm, stride_xk,
    stride_mun, stride_muk,
    stride_sn, stride_sk,
    stride_ys, stride_ym, stride_yn,
    key_w, first_sample, step,
    HAS_MU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """One ``(BLOCK_M, BLOCK_N)`` tile of ``y[s]`` per program.

    x: ``(S, B, K)`` (``stride_xs = 0`` when shared); mu, sig: ``(N, K)`` fp32;
    y: ``(S, B, N)``.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(B, BLOCK_M)
    # samples vary fastest: concurrent programs read the same mu/sigma rows (L2 hits)
    s = pid % S
    tile = pid // S
    pid_m = tile % num_m
    pid_n = tile // num_m
    sample = first_sample.to(tl.uint32, bitcast=True) + tl.cast(s, tl.uint32)
    step_u = step.to(tl.uint32, bitcast=True)
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < B
    mask_n = offs_n < N
    rows_n = offs_n.to(tl.uint32)
    x_rows = x_ptr + tl.cast(s, tl.int64) * stride_xs + offs_m.to(tl.int64)[:, None] * stride_xm
    mu_rows = mu_ptr + offs_n.to(tl.int64)[:, None] * stride_mun
    sig_rows = sig_ptr + offs_n.to(tl.int64)[:, None] * stride_sn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k64 = offs_k.to(tl.int64)[None, :]
        mask_k = (offs_k < K)[None, :]
        x = tl.load(x_rows + k64 * stride_xk, mask=mask_m[:, None] & mask_k, other=0.0)
        # out-of-range weight entries load sigma = mu = 0, so the tile is exactly 0 there
        w_mask = mask_n[:, None] & mask_k
        eps = normal_tile(key_w, rows_n, sample, k0, step_u, BLOCK_N, BLOCK_K)
        w = tl.load(sig_rows + k64 * stride_sk, mask=w_mask, other=0.0) * eps
        if HAS_MU:
            w += tl.load(mu_rows + k64 * stride_muk, mask=w_mask, other=0.0)
        acc = tl.dot(
            to_dot(x, DTYPE, INTERPRET), tl.trans(to_dot(w, DTYPE, INTERPRET)), acc,
            input_precision=PRECISION,
        )  # fmt: skip
    y = (y_ptr + tl.cast(s, tl.int64) * stride_ys + offs_m.to(tl.int64)[:, None] * stride_ym
         + offs_n.to(tl.int64)[None, :] * stride_yn)  # fmt: skip
    tl.store(
        y, to_store(acc, y_ptr.dtype.element_ty, INTERPRET), mask=mask_m[:, None] & mask_n[None, :]
    )


@triton.jit(do_not_specialize=["key_w", "first_sample", "step"])
def _bayes_linear_bwd_dx_kernel(
    dy_ptr, mu_ptr, sig_ptr, out_ptr,
    S, B, N, K, SAMPLES_PER_PROGRAM,
    stride_dys, stride_dym, stride_dyn,
    stride_mun, stride_muk,
    stride_sn, stride_sk,
    stride_og, stride_om, stride_ok,
    key_w, first_sample, step,
    HAS_MU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """``out[g] = sum_{s in group g} dy[s] @ W_s``, one ``(BLOCK_M, BLOCK_K)`` tile per
    program, weight tiles regenerated.

    dy: ``(S, B, N)``; out: ``(G, B, K)`` with ``G = cdiv(S, SAMPLES_PER_PROGRAM)``.
    Per-sample input: one sample per group, ``out`` is dx itself. Shared input: groups of
    samples, ``out`` is dx (one group) or fp32 partial sums reduced by the launcher.
    """
    pid = tl.program_id(0)
    G = tl.cdiv(S, SAMPLES_PER_PROGRAM)
    num_m = tl.cdiv(B, BLOCK_M)
    g = pid % G
    tile = pid // G
    pid_m = tile % num_m
    pid_k = tile // num_m
    step_u = step.to(tl.uint32, bitcast=True)
    first = first_sample.to(tl.uint32, bitcast=True)
    DTYPE: tl.constexpr = dy_ptr.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < B
    mask_k = (offs_k < K)[None, :]
    k64 = offs_k.to(tl.int64)[None, :]
    m64 = offs_m.to(tl.int64)[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    s_lo = g * SAMPLES_PER_PROGRAM
    s_hi = tl.minimum(S, s_lo + SAMPLES_PER_PROGRAM)
    for s in range(s_lo, s_hi):
        sample = first + tl.cast(s, tl.uint32)
        dy_rows = dy_ptr + tl.cast(s, tl.int64) * stride_dys + m64 * stride_dym
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            n64 = offs_n.to(tl.int64)
            dy = tl.load(
                dy_rows + n64[None, :] * stride_dyn,
                mask=mask_m[:, None] & mask_n[None, :],
                other=0.0,
            )
            w_mask = mask_n[:, None] & mask_k
            eps = normal_tile(
                key_w, offs_n.to(tl.uint32), sample, pid_k * BLOCK_K, step_u, BLOCK_N, BLOCK_K
            )
            w = (
                tl.load(
                    sig_ptr + n64[:, None] * stride_sn + k64 * stride_sk, mask=w_mask, other=0.0
                )
                * eps
            )
            if HAS_MU:
                w += tl.load(
                    mu_ptr + n64[:, None] * stride_mun + k64 * stride_muk, mask=w_mask, other=0.0
                )
            acc = tl.dot(
                to_dot(dy, DTYPE, INTERPRET),
                to_dot(w, DTYPE, INTERPRET),
                acc,
                input_precision=PRECISION,
            )
    out = out_ptr + g.to(tl.int64) * stride_og + m64 * stride_om + k64 * stride_ok
    tl.store(out, to_store(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask_m[:, None] & mask_k)


@triton.jit(do_not_specialize=["key_w", "first_sample", "step"])
def _bayes_linear_bwd_dw_kernel(
    x_ptr, dy_ptr, rho_ptr, gmu_ptr, grho_ptr,
    S, B, N, K,
    stride_xs, stride_xm, stride_xk,
    stride_dys, stride_dym, stride_dyn,
    stride_rn, stride_rk,
    key_w, first_sample, step,
    HAS_MU: tl.constexpr,
    APPLY_SIGMOID: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """Weight gradients summed over all samples, one ``(BLOCK_N, BLOCK_K)`` tile
    per program: ``gmu = sum_s dW_s`` and ``grho = sigmoid(rho) * sum_s dW_s * eps_s``
    (without the sigmoid when ``APPLY_SIGMOID`` is off), ``dW_s = dy[s]^T @ x[s]`` held in
    registers only.

    x: ``(S, B, K)`` (``stride_xs = 0`` when shared); dy: ``(S, B, N)``; rho ``(N, K)``;
    gmu, grho: ``(N, K)`` fp32 contiguous.
    """
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_n = pid // num_k
    pid_k = pid % num_k
    step_u = step.to(tl.uint32, bitcast=True)
    first = first_sample.to(tl.uint32, bitcast=True)
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    n64 = offs_n.to(tl.int64)
    k64 = offs_k.to(tl.int64)
    rows_n = offs_n.to(tl.uint32)

    acc_mu = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_eps = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for s in range(0, S):
        sample = first + tl.cast(s, tl.uint32)
        x_s = x_ptr + tl.cast(s, tl.int64) * stride_xs
        dy_s = dy_ptr + tl.cast(s, tl.int64) * stride_dys
        dw = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for m0 in range(0, B, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m64 = offs_m.to(tl.int64)
            mask_m = offs_m < B
            dy = tl.load(
                dy_s + m64[:, None] * stride_dym + n64[None, :] * stride_dyn,
                mask=mask_m[:, None] & mask_n[None, :],
                other=0.0,
            )
            x = tl.load(
                x_s + m64[:, None] * stride_xm + k64[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            dw = tl.dot(
                tl.trans(to_dot(dy, DTYPE, INTERPRET)),
                to_dot(x, DTYPE, INTERPRET),
                dw,
                input_precision=PRECISION,
            )
        eps = normal_tile(key_w, rows_n, sample, pid_k * BLOCK_K, step_u, BLOCK_N, BLOCK_K)
        acc_eps += dw * eps
        if HAS_MU:
            acc_mu += dw
    w_off = n64[:, None] * K + k64[None, :]
    w_mask = mask_n[:, None] & mask_k[None, :]
    if APPLY_SIGMOID:
        # d softplus(rho) / d rho, applied here so no |W| temporary is needed for it
        rho = tl.load(
            rho_ptr + n64[:, None] * stride_rn + k64[None, :] * stride_rk, mask=w_mask, other=0.0
        )
        acc_eps = acc_eps / (1.0 + tl.exp(-rho))
    tl.store(grho_ptr + w_off, acc_eps, mask=w_mask)
    if HAS_MU:
        tl.store(gmu_ptr + w_off, acc_mu, mask=w_mask)


# ---------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes of one kernel launch (``BLOCK_K`` and ``BLOCK_N`` multiples of 4 where
    they index weight columns; all powers of two >= 16 for ``tl.dot``)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def _rows_block(B: int, cap: int) -> int:
    return max(16, min(cap, next_pow2(B)))


def default_config(kernel: str, B: int, dtype: torch.dtype) -> KernelConfig:
    """Block sizes by shape (no autotuning: autotune does not run under the interpreter,
    and a fixed rule keeps the fused/chunked dispatch rule predictable).

    The GPU tables keep every kernel free of register spills on sm_90 (checked with
    ptxas): generating a weight tile costs registers for the Philox state and the precise
    sin/cos/log of Box-Muller, so a program makes at most ~8 noise elements per thread per
    step, and the fp32 ``ieee`` dot (FMA, not tensor cores) gets smaller tiles still.

    The cost model (``bench/results/cost_model.md``) keeps these tables: in bf16,
    ``BLOCK_M = 128`` already generates a tile once per sample for ``B <= 128`` (the
    minimum); in fp32, 128-row fwd/dx tiles are predicted 25 %/50 % cheaper per row but
    need 221-238 registers and spill when compiled without the 16-divisibility
    specialisation, so they wait for a GPU measurement. (On sm_80 the bf16 fwd/dx tiles
    for ``B = 128`` spill: these tables are for Hopper.) The fp32 dx and dW tiles are
    16x32 and 32x32 weight elements: Triton 3.6 (the GPU machine's) compiled the earlier
    16x64 and 64x32 tiles to 255 registers with 28 and 48 bytes of spills (Triton 3.9: 143
    and 169 registers, none); the smaller tiles compile clean with both, and a tile's size
    does not change how often its noise is generated.
    """
    if interpret():
        # few, large programs: each interpreted program costs Python overhead per op
        return KernelConfig(_rows_block(B, 64), 64, 64)
    wide = dtype != torch.float32  # 16-bit inputs: tensor-core dot
    if kernel == "fwd":
        if wide:
            bm = _rows_block(B, 128)
            m, n, k, w, st = {128: (128, 128, 16, 8, 4), 64: (64, 128, 16, 8, 4),
                              32: (32, 64, 32, 4, 3), 16: (16, 128, 16, 4, 4)}[bm]  # fmt: skip
            return KernelConfig(m, n, k, w, st)
        bm = _rows_block(B, 64)
        return KernelConfig(bm, 32 if bm == 64 else 64, 16, 4, 2)
    if kernel == "dx":
        if wide:
            return KernelConfig(_rows_block(B, 128), 32, 64, 8, 3)
        return KernelConfig(32, 16, 32, 4, 2)
    if kernel == "dw":
        # three (BLOCK_N, BLOCK_K) fp32 accumulators live in registers
        return KernelConfig(64, 128, 32, 8, 3) if wide else KernelConfig(32, 32, 32, 4, 2)
    raise ValueError(f"unknown kernel {kernel!r}")


def _config(config: KernelConfig | None, kernel: str, B: int, dtype) -> KernelConfig:
    """``config`` (checked) or the default for the kernel."""
    cfg = config or default_config(kernel, B, dtype)
    for v in (cfg.block_m, cfg.block_n, cfg.block_k):
        if v < 16 or v & (v - 1):
            raise ValueError(f"block sizes must be powers of two >= 16, got {cfg}")
    return cfg


def _x_strides(x: Tensor, B: int, shared: int) -> tuple[int, int, int]:
    """Strides of x viewed as ``(S, B, K)``; the sample stride is 0 for a shared input."""
    return (0 if shared else B * x.stride(0)), x.stride(0), x.stride(1)


def _rows(x: Tensor, key: NoiseKey, shared: int) -> int:
    return x.shape[0] if shared else x.shape[0] // key.num_samples


def fused_forward(x: Tensor, mu: Tensor | None, sigma: Tensor, key: NoiseKey, weight_id: int,
                  shared: int, config: KernelConfig | None = None) -> Tensor:  # fmt: skip
    """Fused forward: x ``(S*B, K)`` or shared ``(B, K)``; mu, sigma ``(N, K)`` fp32 ->
    y ``(S*B, N)`` in x's dtype."""
    S = key.num_samples
    N, K = sigma.shape
    B = _rows(x, key, shared)
    y = torch.empty((S * B, N), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    cfg = _config(config, "fwd", B, x.dtype)
    mu_ = sigma if mu is None else mu  # placeholder pointer when HAS_MU=False
    grid = (S * triton.cdiv(B, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _bayes_linear_fwd_kernel[grid](
        x, mu_, sigma, y,
        S, B, N, K,
        *_x_strides(x, B, shared),
        mu_.stride(0), mu_.stride(1), sigma.stride(0), sigma.stride(1),
        B * y.stride(0), y.stride(0), y.stride(1),
        philox_key(key.seed, weight_id), as_i32(key.first_sample), as_i32(key.step),
        HAS_MU=mu is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        PRECISION=dot_precision(x.dtype), INTERPRET=interpret(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


def dx_groups(S: int, B: int, K: int, cfg: KernelConfig, device: torch.device) -> int:
    """Sample groups of the shared-input dx kernel: enough programs to fill the GPU (about
    two per SM) without more fp32 partial sums ``(G, B, K)`` than needed."""
    tiles = triton.cdiv(B, cfg.block_m) * triton.cdiv(K, cfg.block_k)
    want = triton.cdiv(2 * num_sms(device), tiles)
    return max(1, min(S, want))


def fused_backward_dx(
    dy: Tensor,
    mu: Tensor | None,
    sigma: Tensor,
    key: NoiseKey,
    weight_id: int,
    shared: int,
    B: int,
    config: KernelConfig | None = None,
    groups: int | None = None,
) -> Tensor:
    """``dx[s] = dy[s] @ W_s`` (per-sample input, ``(S*B, K)``) or ``sum_s dy[s] @ W_s``
    (shared input, ``(B, K)``); dy ``(S*B, N)``. ``groups`` overrides the number of
    sample groups of the shared case (partial sums reduced in fixed order)."""
    S = key.num_samples
    N, K = sigma.shape
    dtype = dy.dtype
    cfg = _config(config, "dx", B, dtype)
    if shared:
        G = groups or dx_groups(S, B, K, cfg, dy.device)
        spp = triton.cdiv(S, G)
        G = triton.cdiv(S, spp)
        out = torch.empty((G, B, K), dtype=dtype if G == 1 else torch.float32, device=dy.device)
    else:
        spp, G = 1, S
        out = torch.empty((S, B, K), dtype=dtype, device=dy.device)
    if out.numel() == 0 or N == 0:
        return torch.zeros((B if shared else S * B, K), dtype=dtype, device=dy.device)
    mu_ = sigma if mu is None else mu
    grid = (G * triton.cdiv(B, cfg.block_m) * triton.cdiv(K, cfg.block_k),)
    _bayes_linear_bwd_dx_kernel[grid](
        dy, mu_, sigma, out,
        S, B, N, K, spp,
        B * dy.stride(0), dy.stride(0), dy.stride(1),
        mu_.stride(0), mu_.stride(1), sigma.stride(0), sigma.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        philox_key(key.seed, weight_id), as_i32(key.first_sample), as_i32(key.step),
        HAS_MU=mu is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        PRECISION=dot_precision(dtype), INTERPRET=interpret(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if not shared:
        return out.view(S * B, K)
    if G == 1:
        return out[0]
    return out.sum(0).to(dtype)


def fused_backward_dw(
    x: Tensor,
    dy: Tensor,
    key: NoiseKey,
    weight_id: int,
    shape: tuple[int, int],
    shared: int,
    B: int,
    *,
    rho: Tensor | None = None,
    need_mu: bool = True,
    config: KernelConfig | None = None,
) -> tuple[Tensor | None, Tensor]:
    """``(grad_mu, grad_rho)`` as fp32, never materializing a per-sample gradient:
    ``grad_mu = sum_s dW_s``, ``grad_rho = sigmoid(rho) * sum_s dW_s * eps_s`` with
    ``dW_s = dy[s]^T x[s]`` (without ``rho``: the bare sum ``sum_s dW_s * eps_s``).
    x ``(S*B, K)`` or shared ``(B, K)``; dy ``(S*B, N)``; ``shape = (N, K)``."""
    S = key.num_samples
    N, K = shape
    f32 = dict(dtype=torch.float32, device=x.device)
    grho = torch.empty((N, K), **f32)
    gmu = torch.empty((N, K), **f32) if need_mu else None
    if N * K == 0 or S * B == 0:
        for t in (grho, gmu):
            if t is not None:
                t.zero_()
        return gmu, grho
    cfg = _config(config, "dw", B, x.dtype)
    rho_ = grho if rho is None else rho
    grid = (triton.cdiv(N, cfg.block_n) * triton.cdiv(K, cfg.block_k),)
    _bayes_linear_bwd_dw_kernel[grid](
        x, dy, rho_, grho if gmu is None else gmu, grho,
        S, B, N, K,
        *_x_strides(x, B, shared),
        B * dy.stride(0), dy.stride(0), dy.stride(1),
        rho_.stride(0), rho_.stride(-1),
        philox_key(key.seed, weight_id), as_i32(key.first_sample), as_i32(key.step),
        HAS_MU=need_mu, APPLY_SIGMOID=rho is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        PRECISION=dot_precision(x.dtype), INTERPRET=interpret(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return gmu, grho


# ---------------------------------------------------------------------------------------
# the primitive: forward and backward of the two paths
# ---------------------------------------------------------------------------------------


def choose_path(rows_per_sample: int) -> str:
    """``fused`` or ``chunked`` for a per-sample batch of ``rows_per_sample`` rows (see the
    module docstring for the rule); ``SPAR_LINEAR_PATH`` forces one."""
    forced = _env.linear_path()
    if forced != "auto":
        return forced
    return "fused" if rows_per_sample <= FUSED_MAX_ROWS else "chunked"


def sampled_linear_forward(x: Tensor, mu: Tensor | None, rho: Tensor, key: NoiseKey,
                           pid: int, shared: int) -> Tensor:  # fmt: skip
    """The ``sampled_linear`` primitive: x ``(S*B, K)`` or shared ``(B, K)`` -> ``(S*B, N)``
    on the fused or the chunked path (:func:`choose_path`)."""
    check_sampled(x, mu, rho)
    if choose_path(_rows(x, key, shared)) == "fused":
        return fused_forward(x, mu, F.softplus(rho), key, pid, shared)
    return chunked_forward(x, mu, rho, key, pid, shared)


def sampled_linear_backward(dy: Tensor, x: Tensor, mu: Tensor | None, rho: Tensor,
                            key: NoiseKey, pid: int, shared: int,
                            needs: tuple[bool, ...]) -> tuple:  # fmt: skip
    need_x, need_mu, need_rho = needs
    need_mu = need_mu and mu is not None
    dy = dy.to(x.dtype)
    B = _rows(x, key, shared)
    if choose_path(B) == "chunked":
        return chunked_backward(dy, x, mu, rho, key, pid, shared, (need_x, need_mu, need_rho))
    dx = g_mu = g_rho = None
    if need_x:
        # softplus(rho) lives only while the dx kernel runs: the peak extra memory of the
        # backward is max(|W| + dx, the gradients themselves)
        dx = fused_backward_dx(dy, mu, F.softplus(rho), key, pid, shared, B)
    if need_mu or need_rho:
        g_mu, g_rho = fused_backward_dw(
            x, dy, key, pid, tuple(rho.shape), shared, B, rho=rho, need_mu=need_mu
        )
    return dx, g_mu, g_rho


def chunked_forward(x: Tensor, mu: Tensor | None, rho: Tensor, key: NoiseKey, pid: int,
                    shared: int) -> Tensor:  # fmt: skip
    """Chunked path: the sampling kernel writes a chunk of samples' weights (bounded by
    ``SPAR_CHUNK_NUMEL``) into a workspace, cuBLAS multiplies: the torch backend's chunk
    loop with the Triton sampler."""
    return sampled.linear_forward(x, mu, rho, key, pid, shared, make_sampler=TritonSampler)


def chunked_backward(dy: Tensor, x: Tensor, mu: Tensor | None, rho: Tensor, key: NoiseKey,
                     pid: int, shared: int, needs: tuple[bool, bool, bool]) -> tuple:  # fmt: skip
    """Gradients of :func:`chunked_forward`: per chunk, the weights are resampled for dx and
    ``dW`` is reduced by the sampling kernel's backward (eps regenerated)."""
    return sampled.linear_backward(
        dy, x, mu, rho, key, pid, shared, needs, make_sampler=TritonSampler
    )
