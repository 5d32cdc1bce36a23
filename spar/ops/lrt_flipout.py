"""Local reparameterization (``lrt``) and flipout estimators on the GPU path.

Both are GEMMs plus per-example noise on the outputs (flipout also on the inputs): the
GEMMs go to cuBLAS (``F.linear``) or to the reparam op of :mod:`spar.ops.linear_triton`
(flipout's per-sample perturbation), and small Triton kernels apply the noise, which they
regenerate from the noise key instead of storing it.

Per-example noise is keyed like :func:`spar.ops.linear.linear_torch` keys it: element
``(b, j)`` of local sample ``s`` of the noise of parameter id ``noise_id`` is element
``(row = data_offset + b, col = j)`` of global sample ``first_sample + s`` (:mod:`spar.rng`),
so a rank holding examples ``[data_offset, data_offset + B)`` draws exactly what one
process holding the whole batch draws for them (I3). Flipout's random signs are the signs
of those normals (``+1`` for ``>= 0``).

Tensors are folded sample-major ``(S*B, C)``; where an input is shared by the samples
(``(B, C)``) the kernels read it with a zero sample stride instead of expanding it.

Order in this file: kernels -> launchers -> custom ops (``spar::triton_lrt_noise`` and its
backward, ``spar::triton_sign_mul``, ``spar::triton_flipout_out``, ``spar::triton_normal``;
:mod:`spar.ops.library`) -> autograd Functions -> ``linear_lrt``, ``linear_flipout``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from spar.ops._triton_utils import (
    as_i32,
    check_device,
    interpret,
    normal_tile,
    philox_key,
    to_store,
)
from spar.ops.library import key_args, make_key, spar_op
from spar.ops.linear_triton import bayes_linear_reparam, check_linear_inputs
from spar.ops.sample import sample_weights
from spar.rng import NoiseKey

_VAR_MIN = 1e-30  # the clamp of the torch backend: sqrt stays differentiable at var = 0

# ---------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _example_noise(key, offs_r, B, data_offset, first_sample, col0, step,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """Normals ``(BLOCK_R, BLOCK_C)`` for folded rows ``offs_r`` (row ``r`` is example
    ``r % B`` of local sample ``r // B``) and columns from ``col0``."""
    s = offs_r // B
    b = offs_r % B
    rows = data_offset.to(tl.uint32, bitcast=True) + b.to(tl.uint32)
    samples = first_sample.to(tl.uint32, bitcast=True) + s.to(tl.uint32)
    return normal_tile(
        key, rows, samples[:, None], col0, step.to(tl.uint32, bitcast=True), BLOCK_R, BLOCK_C
    )


@triton.jit
def _tile(pid, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row and column offsets of elementwise tile ``pid`` of an ``(R, C)`` array."""
    num_c = tl.cdiv(C, BLOCK_C)
    pid_r = pid // num_c
    pid_c = pid % num_c
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return offs_r, offs_c, pid_c * BLOCK_C


@triton.jit(do_not_specialize=["key", "first_sample", "data_offset", "step"])
def _lrt_fwd_kernel(
    mean_ptr, var_ptr, y_ptr,
    R, C, B,
    stride_ms, stride_mb, stride_mc,
    stride_vs, stride_vb, stride_vc,
    stride_yr, stride_yc,
    key, first_sample, data_offset, step,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """``y = mean + sqrt(max(var, 1e-30)) * eps``; mean, var ``(S, B, C)`` (sample stride
    0 when shared), y ``(S*B, C)``."""
    offs_r, offs_c, col0 = _tile(tl.program_id(0), R, C, BLOCK_R, BLOCK_C)
    mask = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    s = (offs_r // B).to(tl.int64)[:, None]
    b = (offs_r % B).to(tl.int64)[:, None]
    c = offs_c.to(tl.int64)[None, :]
    mean = tl.load(
        mean_ptr + s * stride_ms + b * stride_mb + c * stride_mc, mask=mask, other=0.0
    ).to(tl.float32)
    var = tl.load(var_ptr + s * stride_vs + b * stride_vb + c * stride_vc, mask=mask, other=1.0).to(
        tl.float32
    )
    eps = _example_noise(key, offs_r, B, data_offset, first_sample, col0, step, BLOCK_R, BLOCK_C)
    y = mean + tl.sqrt(tl.maximum(var, 1e-30)) * eps
    y_ptrs = y_ptr + offs_r.to(tl.int64)[:, None] * stride_yr + c * stride_yc
    tl.store(y_ptrs, to_store(y, y_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit(do_not_specialize=["key", "first_sample", "data_offset", "step"])
def _lrt_bwd_kernel(
    dy_ptr, var_ptr, dvar_ptr,
    R, C, B,
    stride_dyr, stride_dyc,
    stride_vs, stride_vb, stride_vc,
    stride_or, stride_oc,
    key, first_sample, data_offset, step,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """``dvar = dy * eps / (2 sqrt(var))`` where ``var >= 1e-30`` (else 0, the clamp's
    gradient); dy, dvar ``(S*B, C)``, var ``(S, B, C)``."""
    offs_r, offs_c, col0 = _tile(tl.program_id(0), R, C, BLOCK_R, BLOCK_C)
    mask = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    r = offs_r.to(tl.int64)[:, None]
    s = (offs_r // B).to(tl.int64)[:, None]
    b = (offs_r % B).to(tl.int64)[:, None]
    c = offs_c.to(tl.int64)[None, :]
    dy = tl.load(dy_ptr + r * stride_dyr + c * stride_dyc, mask=mask, other=0.0)
    var = tl.load(var_ptr + s * stride_vs + b * stride_vb + c * stride_vc, mask=mask, other=1.0).to(
        tl.float32
    )
    eps = _example_noise(key, offs_r, B, data_offset, first_sample, col0, step, BLOCK_R, BLOCK_C)
    std = tl.sqrt(tl.maximum(var, 1e-30))
    dvar = tl.where(var >= 1e-30, dy.to(tl.float32) * eps / (2.0 * std), 0.0)
    tl.store(
        dvar_ptr + r * stride_or + c * stride_oc,
        to_store(dvar, dvar_ptr.dtype.element_ty, INTERPRET),
        mask=mask,
    )


@triton.jit(do_not_specialize=["key", "first_sample", "data_offset", "step"])
def _sign_mul_kernel(
    x_ptr, out_ptr,
    R, C, B,
    stride_xs, stride_xb, stride_xc,
    stride_or, stride_oc,
    key, first_sample, data_offset, step,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """``out = x * sign(eps)`` (flipout's random signs, and their backward: the map is its
    own transpose); x ``(S, B, C)`` (sample stride 0 when shared), out ``(S*B, C)``."""
    offs_r, offs_c, col0 = _tile(tl.program_id(0), R, C, BLOCK_R, BLOCK_C)
    mask = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    s = (offs_r // B).to(tl.int64)[:, None]
    b = (offs_r % B).to(tl.int64)[:, None]
    c = offs_c.to(tl.int64)[None, :]
    x = tl.load(x_ptr + s * stride_xs + b * stride_xb + c * stride_xc, mask=mask, other=0.0).to(
        tl.float32
    )
    eps = _example_noise(key, offs_r, B, data_offset, first_sample, col0, step, BLOCK_R, BLOCK_C)
    out = tl.where(eps >= 0.0, x, -x)
    tl.store(
        out_ptr + offs_r.to(tl.int64)[:, None] * stride_or + c * stride_oc,
        to_store(out, out_ptr.dtype.element_ty, INTERPRET),
        mask=mask,
    )


@triton.jit(do_not_specialize=["key", "first_sample", "data_offset", "step"])
def _flipout_out_kernel(
    base_ptr, pert_ptr, bias_ptr, y_ptr,
    R, C, B,
    stride_bs, stride_bb, stride_bc,
    stride_pr, stride_pc,
    stride_biass, stride_biasc,
    stride_yr, stride_yc,
    key, first_sample, data_offset, step,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """``y = base + pert * sign(eps) + bias[s]``; base ``(S, B, C)`` (sample stride 0 when
    shared), pert and y ``(S*B, C)``, bias ``(S, C)``."""
    offs_r, offs_c, col0 = _tile(tl.program_id(0), R, C, BLOCK_R, BLOCK_C)
    mask = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    r = offs_r.to(tl.int64)[:, None]
    s = (offs_r // B).to(tl.int64)[:, None]
    b = (offs_r % B).to(tl.int64)[:, None]
    c = offs_c.to(tl.int64)[None, :]
    base = tl.load(
        base_ptr + s * stride_bs + b * stride_bb + c * stride_bc, mask=mask, other=0.0
    ).to(tl.float32)
    pert = tl.load(pert_ptr + r * stride_pr + c * stride_pc, mask=mask, other=0.0).to(tl.float32)
    eps = _example_noise(key, offs_r, B, data_offset, first_sample, col0, step, BLOCK_R, BLOCK_C)
    y = base + tl.where(eps >= 0.0, pert, -pert)
    if HAS_BIAS:
        y += tl.load(bias_ptr + s * stride_biass + c * stride_biasc, mask=mask, other=0.0).to(
            tl.float32
        )
    tl.store(
        y_ptr + r * stride_yr + c * stride_yc,
        to_store(y, y_ptr.dtype.element_ty, INTERPRET),
        mask=mask,
    )


# ---------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------


def _block() -> tuple[int, int]:
    return (32, 64) if interpret() else (16, 128)


def _sbc_strides(t: Tensor, S: int, B: int, shared: bool) -> tuple[int, int, int]:
    """Strides of a ``(S*B, C)`` (or shared ``(B, C)``) tensor viewed as ``(S, B, C)``."""
    return (0 if shared else B * t.stride(0)), t.stride(0), t.stride(1)


def _kernel_key_args(key: NoiseKey, noise_id: int) -> tuple[int, int, int, int]:
    return (
        philox_key(key.seed, noise_id), as_i32(key.first_sample), as_i32(key.data_offset),
        as_i32(key.step),
    )  # fmt: skip


def _grid(R: int, C: int) -> tuple[int]:
    br, bc = _block()
    return (triton.cdiv(R, br) * triton.cdiv(C, bc),)


def lrt_noise_forward(mean: Tensor, var: Tensor, key: NoiseKey, noise_id: int,
                      shared: bool) -> Tensor:  # fmt: skip
    """``mean + sqrt(var) * eps`` for mean, var ``(S*B, N)`` or shared ``(B, N)`` ->
    ``(S*B, N)`` in mean's dtype."""
    S = key.num_samples
    B = mean.shape[0] if shared else mean.shape[0] // S
    N = mean.shape[1]
    y = torch.empty((S * B, N), dtype=mean.dtype, device=mean.device)
    if y.numel() == 0:
        return y
    br, bc = _block()
    _lrt_fwd_kernel[_grid(S * B, N)](
        mean, var, y, S * B, N, B,
        *_sbc_strides(mean, S, B, shared), *_sbc_strides(var, S, B, shared),
        y.stride(0), y.stride(1), *_kernel_key_args(key, noise_id),
        BLOCK_R=br, BLOCK_C=bc, INTERPRET=interpret(),
    )  # fmt: skip
    return y


def lrt_noise_backward(dy: Tensor, var: Tensor, key: NoiseKey, noise_id: int,
                       shared: bool) -> Tensor:  # fmt: skip
    """Gradient of :func:`lrt_noise_forward` w.r.t. ``var`` (``var``'s shape and dtype)."""
    S = key.num_samples
    B = var.shape[0] if shared else var.shape[0] // S
    N = var.shape[1]
    out_dtype = torch.float32 if shared else var.dtype  # shared: summed over samples below
    dvar = torch.empty((S * B, N), dtype=out_dtype, device=dy.device)
    if dvar.numel() == 0:
        return var.new_zeros(var.shape)
    br, bc = _block()
    _lrt_bwd_kernel[_grid(S * B, N)](
        dy, var, dvar, S * B, N, B,
        dy.stride(0), dy.stride(1), *_sbc_strides(var, S, B, shared),
        dvar.stride(0), dvar.stride(1), *_kernel_key_args(key, noise_id),
        BLOCK_R=br, BLOCK_C=bc, INTERPRET=interpret(),
    )  # fmt: skip
    return dvar.view(S, B, N).sum(0).to(var.dtype) if shared else dvar


def sign_mul(x: Tensor, key: NoiseKey, noise_id: int, shared: bool,
             *, dtype: torch.dtype | None = None) -> Tensor:  # fmt: skip
    """``x * sign(eps)``: x ``(S*B, C)`` or shared ``(B, C)`` -> ``(S*B, C)``."""
    S = key.num_samples
    B = x.shape[0] if shared else x.shape[0] // S
    C = x.shape[1]
    out = torch.empty((S * B, C), dtype=dtype or x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    br, bc = _block()
    _sign_mul_kernel[_grid(S * B, C)](
        x, out, S * B, C, B, *_sbc_strides(x, S, B, shared),
        out.stride(0), out.stride(1), *_kernel_key_args(key, noise_id),
        BLOCK_R=br, BLOCK_C=bc, INTERPRET=interpret(),
    )  # fmt: skip
    return out


def flipout_out_forward(base: Tensor, pert: Tensor, bias: Tensor | None, key: NoiseKey,
                        noise_id: int, shared: bool) -> Tensor:  # fmt: skip
    """``base + pert * sign(eps) + bias[s]``: base ``(S*B, N)`` or shared ``(B, N)``, pert
    ``(S*B, N)``, bias ``(S, N)`` -> ``(S*B, N)`` in pert's dtype."""
    S = key.num_samples
    R, N = pert.shape
    B = R // S
    y = torch.empty((R, N), dtype=pert.dtype, device=pert.device)
    if y.numel() == 0:
        return y
    br, bc = _block()
    bias_ = pert if bias is None else bias  # placeholder pointer when HAS_BIAS=False
    _flipout_out_kernel[_grid(R, N)](
        base, pert, bias_, y, R, N, B,
        *_sbc_strides(base, S, B, shared), pert.stride(0), pert.stride(1),
        bias_.stride(0), bias_.stride(1), y.stride(0), y.stride(1),
        *_kernel_key_args(key, noise_id),
        HAS_BIAS=bias is not None, BLOCK_R=br, BLOCK_C=bc, INTERPRET=interpret(),
    )  # fmt: skip
    return y


def param_noise(key: NoiseKey, pid: int, shape: tuple[int, ...],
                device: torch.device) -> Tensor:  # fmt: skip
    """The normals ``(S, *shape)`` fp32 of parameter ``pid`` (the sampling kernel with
    ``sigma = 1``): flipout's bias noise."""
    ones = torch.ones((), dtype=torch.float32, device=device)
    rows = shape[0] if len(shape) > 1 else 1
    eps = sample_weights(None, ones.expand(rows, math.prod(shape) // max(rows, 1)), key, pid)
    return eps.view(key.num_samples, *shape)


# ---------------------------------------------------------------------------------------
# custom ops (spar.ops.library)
# ---------------------------------------------------------------------------------------


def _folded_rows(t: Tensor, num_samples: int, shared: bool):
    return num_samples * t.shape[0] if shared else t.shape[0]


def _lrt_noise_fake(mean, var, step, seed, first_sample, num_samples, data_offset, noise_id,
                    shared):  # fmt: skip
    return mean.new_empty(_folded_rows(mean, num_samples, shared), mean.shape[1])


@spar_op("triton_lrt_noise", _lrt_noise_fake)
def lrt_noise_op(mean: Tensor, var: Tensor, step: Tensor, seed: int, first_sample: int,
                 num_samples: int, data_offset: int, noise_id: int,
                 shared: bool) -> Tensor:  # fmt: skip
    key = make_key(step, seed, first_sample, num_samples, data_offset)
    return lrt_noise_forward(mean, var, key, noise_id, shared)


def _lrt_noise_backward_fake(dy, var, step, seed, first_sample, num_samples, data_offset,
                             noise_id, shared):  # fmt: skip
    return var.new_empty(var.shape)


@spar_op("triton_lrt_noise_backward", _lrt_noise_backward_fake)
def lrt_noise_backward_op(dy: Tensor, var: Tensor, step: Tensor, seed: int, first_sample: int,
                          num_samples: int, data_offset: int, noise_id: int,
                          shared: bool) -> Tensor:  # fmt: skip
    key = make_key(step, seed, first_sample, num_samples, data_offset)
    return lrt_noise_backward(dy, var, key, noise_id, shared)


def _sign_mul_fake(x, step, seed, first_sample, num_samples, data_offset, noise_id, shared,
                   dtype):  # fmt: skip
    return x.new_empty(_folded_rows(x, num_samples, shared), x.shape[1], dtype=dtype)


@spar_op("triton_sign_mul", _sign_mul_fake)
def sign_mul_op(x: Tensor, step: Tensor, seed: int, first_sample: int, num_samples: int,
                data_offset: int, noise_id: int, shared: bool,
                dtype: torch.dtype | None) -> Tensor:  # fmt: skip
    key = make_key(step, seed, first_sample, num_samples, data_offset)
    return sign_mul(x, key, noise_id, shared, dtype=dtype)


def _flipout_out_fake(base, pert, bias, step, seed, first_sample, num_samples, data_offset,
                      noise_id, shared):  # fmt: skip
    return pert.new_empty(pert.shape)


@spar_op("triton_flipout_out", _flipout_out_fake)
def flipout_out_op(base: Tensor, pert: Tensor, bias: Tensor | None, step: Tensor, seed: int,
                   first_sample: int, num_samples: int, data_offset: int, noise_id: int,
                   shared: bool) -> Tensor:  # fmt: skip
    key = make_key(step, seed, first_sample, num_samples, data_offset)
    return flipout_out_forward(base, pert, bias, key, noise_id, shared)


def _param_noise_fake(step, seed, first_sample, num_samples, pid, shape, device):
    return torch.empty((num_samples, *shape), dtype=torch.float32, device=device)


@spar_op("triton_normal", _param_noise_fake)
def param_noise_op(step: Tensor, seed: int, first_sample: int, num_samples: int, pid: int,
                   shape: Sequence[int], device: torch.device) -> Tensor:  # fmt: skip
    key = make_key(step, seed, first_sample, num_samples)
    return param_noise(key, pid, tuple(shape), device)


# ---------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------


def _sum_samples(g: Tensor, S: int, shared: bool, dtype: torch.dtype) -> Tensor:
    """Gradient of a shared ``(B, C)`` input from its ``(S*B, C)`` uses."""
    if not shared:
        return g
    return g.view(S, -1, g.shape[1]).sum(0, dtype=torch.float32).to(dtype)


def _keep_key(ctx, key: NoiseKey, noise_id: int, shared: bool) -> tuple:
    """Put the op arguments of the key on ctx (the step is a 0-d key, kept on ctx as in
    :class:`spar.ops.linear.SampledLinearFn`); returns them."""
    step, *ints = key_args(key)
    ctx.step, ctx.key_ints, ctx.noise_id, ctx.shared = step, tuple(ints), noise_id, shared
    ctx.S = key.num_samples
    return (step, *ints, noise_id, shared)


class LRTNoiseFunction(torch.autograd.Function):
    """``y = mean + sqrt(max(var, 1e-30)) * eps`` with per-example eps regenerated in
    backward (ops ``spar::triton_lrt_noise`` and its backward). mean, var: ``(S*B, N)`` or
    shared ``(B, N)``; y: ``(S*B, N)``."""

    @staticmethod
    def forward(ctx, mean, var, key: NoiseKey, noise_id: int, shared: bool):
        ctx.save_for_backward(var)
        ctx.mean_dtype = mean.dtype
        return lrt_noise_op(mean, var, *_keep_key(ctx, key, noise_id, shared))

    @staticmethod
    def backward(ctx, dy):
        (var,) = ctx.saved_tensors
        d_mean = d_var = None
        if ctx.needs_input_grad[0]:
            d_mean = _sum_samples(dy, ctx.S, ctx.shared, ctx.mean_dtype)
        if ctx.needs_input_grad[1]:
            d_var = lrt_noise_backward_op(
                dy, var, ctx.step, *ctx.key_ints, ctx.noise_id, ctx.shared
            )
        return d_mean, d_var, None, None, None


class SignMulFunction(torch.autograd.Function):
    """``x * sign(eps)`` per example (op ``spar::triton_sign_mul``): x ``(S*B, C)`` or
    shared ``(B, C)`` -> ``(S*B, C)``."""

    @staticmethod
    def forward(ctx, x, key: NoiseKey, noise_id: int, shared: bool):
        ctx.dtype = x.dtype
        return sign_mul_op(x, *_keep_key(ctx, key, noise_id, shared), None)

    @staticmethod
    def backward(ctx, g):
        # the signs are their own inverse: the gradient is g times the same signs
        dtype = torch.float32 if ctx.shared else ctx.dtype
        dx = sign_mul_op(g, ctx.step, *ctx.key_ints, ctx.noise_id, False, dtype)
        return _sum_samples(dx, ctx.S, ctx.shared, ctx.dtype), None, None, None


class FlipoutOutFunction(torch.autograd.Function):
    """``y = base + pert * sign(eps) + bias[s]`` (op ``spar::triton_flipout_out``): base
    ``(S*B, N)`` or shared ``(B, N)``, pert ``(S*B, N)``, bias ``(S, N)`` or None ->
    ``(S*B, N)``."""

    @staticmethod
    def forward(ctx, base, pert, bias, key: NoiseKey, noise_id: int, shared: bool):
        ctx.base_dtype = base.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        args = _keep_key(ctx, key, noise_id, shared)
        return flipout_out_op(base, pert, bias, *args)

    @staticmethod
    def backward(ctx, dy):
        S = ctx.S
        need_base, need_pert, need_bias = ctx.needs_input_grad[:3]
        d_base = _sum_samples(dy, S, ctx.shared, ctx.base_dtype) if need_base else None
        d_pert = None
        if need_pert:
            d_pert = sign_mul_op(dy, ctx.step, *ctx.key_ints, ctx.noise_id, False, None)
        d_bias = None
        if need_bias:
            d_bias = dy.view(S, -1, dy.shape[1]).sum(1, dtype=torch.float32).to(ctx.bias_dtype)
        return d_base, d_pert, d_bias, None, None, None


# ---------------------------------------------------------------------------------------
# estimators
# ---------------------------------------------------------------------------------------


def linear_lrt(
    x: Tensor,
    weight_mu: Tensor,
    weight_rho: Tensor,
    bias_mu: Tensor | None,
    bias_rho: Tensor | None,
    key: NoiseKey,
    *,
    noise_id: int,
    shared_input: bool = False,
) -> Tensor:
    """Local reparameterization: ``x mu^T + b_mu + sqrt(x^2 sigma^2^T + sigma_b^2) * eps``,
    two cuBLAS GEMMs (on the ``B`` shared rows only when the input is shared) and one noise
    kernel. x ``(S*B, K)`` or shared ``(B, K)`` -> ``(S*B, N)``."""
    check_linear_inputs(x, weight_mu, weight_rho, bias_mu, bias_rho, key, shared_input)
    check_device(x)
    mean = F.linear(x, weight_mu.to(x.dtype), None if bias_mu is None else bias_mu.to(x.dtype))
    var_w = F.softplus(weight_rho).square().to(x.dtype)
    var_b = None if bias_rho is None else F.softplus(bias_rho).square().to(x.dtype)
    var = F.linear(x * x, var_w, var_b)
    return LRTNoiseFunction.apply(mean, var, key, noise_id, shared_input)


def linear_flipout(
    x: Tensor,
    weight_mu: Tensor,
    weight_rho: Tensor,
    bias_mu: Tensor | None,
    bias_rho: Tensor | None,
    key: NoiseKey,
    *,
    weight_id: int,
    bias_id: int,
    noise_ids: tuple[int, int],
    shared_input: bool = False,
    path: str | None = None,
) -> Tensor:
    """Flipout: ``y_s = x_s mu^T + ((x_s * r_s) (sigma * eps_s)^T) * q_s + b_s`` with
    per-example signs ``r`` (``noise_ids[0]``, ``(B, K)``) and ``q`` (``noise_ids[1]``,
    ``(B, N)``). The mean GEMM runs once on cuBLAS (on the ``B`` shared rows when the input
    is shared); the perturbation is the fused/chunked reparam op with zero mean."""
    check_linear_inputs(x, weight_mu, weight_rho, bias_mu, bias_rho, key, shared_input)
    check_device(x)
    xr = SignMulFunction.apply(x, key, noise_ids[0], shared_input)  # (S*B, K)
    pert = bayes_linear_reparam(
        xr, None, weight_rho, None, None, key, weight_id=weight_id, bias_id=bias_id,
        shared_input=False, path=path,
    )  # fmt: skip
    base = F.linear(x, weight_mu.to(x.dtype))
    bias = None
    if bias_mu is not None:
        # (S, N), small: plain autograd, as in the torch backend, and rounded to x's dtype
        # before the sum as the torch backend does
        eps_b = param_noise_op(*key_args(key)[:4], bias_id, list(bias_mu.shape),
                                             x.device)  # fmt: skip
        bias = torch.addcmul(bias_mu, F.softplus(bias_rho), eps_b).to(x.dtype)
    return FlipoutOutFunction.apply(base, pert, bias, key, noise_ids[1], shared_input)
