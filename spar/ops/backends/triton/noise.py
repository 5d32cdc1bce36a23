"""Per-example noise primitives on the GPU (Triton): ``lrt_noise``, ``sign_mul``, and the
keyed ``normal`` of the per-sample biases.

Per-example noise is keyed as on the torch backend (:mod:`spar.ops.backends.torch.noise`): element
``(b, j)`` of local sample ``s`` of the noise ``noise_id`` is element ``(row = data_offset +
b, col = j)`` of global sample ``first_sample + s`` (:mod:`spar.rng`), ``j`` indexing the
example's flattened features; the kernels regenerate it instead of storing it. A tensor of
any shape is viewed as ``(rows, features)``: convolution activations work as they are.

Tensors are folded sample-major ``(S*B, C)``; where all samples read the same rows
(shared, ``(B, C)``) the kernels read them with a zero sample stride instead of expanding.

Each kernel reads one element and writes one (4 or 8 bytes each in fp32) and generates one
normal (a quarter of a Philox4x32-10 call and half a Box-Muller): it is bound by the
generator, not by memory. Order in this file: kernels -> launchers -> the primitives.
"""

from __future__ import annotations

import torch
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
from spar.ops.backends.triton.sample import keyed_normal
from spar.ops.library import VAR_FLOOR
from spar.rng import NoiseKey

# ---------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _tile(R, C, B, key, first_sample, data_offset, step,
          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """This program's tile of a folded ``(R, C)`` array (row ``r`` is example ``r % B`` of
    local sample ``r // B``): int64 ``(rows, sample, example, cols)`` offsets, the mask and
    the tile's normals."""
    pid = tl.program_id(0)
    num_c = tl.cdiv(C, BLOCK_C)
    offs_r = (pid // num_c) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = (pid % num_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    s = offs_r // B
    b = offs_r % B
    rows = data_offset.to(tl.uint32, bitcast=True) + b.to(tl.uint32)
    samples = first_sample.to(tl.uint32, bitcast=True) + s.to(tl.uint32)
    eps = normal_tile(
        key, rows, samples[:, None], (pid % num_c) * BLOCK_C, step.to(tl.uint32, bitcast=True),
        BLOCK_R, BLOCK_C,
    )  # fmt: skip
    r64 = offs_r.to(tl.int64)[:, None]
    s64 = s.to(tl.int64)[:, None]
    return r64, s64, b.to(tl.int64)[:, None], offs_c.to(tl.int64)[None, :], mask, eps


@triton.jit(do_not_specialize=["key", "first_sample", "data_offset", "step"])
def _lrt_noise_kernel(
    var_ptr, dy_ptr, out_ptr,
    R, C, B,
    stride_vs, stride_vb, stride_vc,
    stride_dr, stride_dc,
    stride_or, stride_oc,
    key, first_sample, data_offset, step,
    BACKWARD: tl.constexpr,
    VAR_FLOOR: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """Forward: ``out = sqrt(max(var, VAR_FLOOR)) * eps``. Backward: ``out = dy * eps /
    (2 sqrt(var))`` where ``var >= VAR_FLOOR``, else 0 (the floor's gradient). var
    ``(S, B, C)`` (sample stride 0 when shared); dy and out ``(S*B, C)``."""
    r, s, b, c, mask, eps = _tile(R, C, B, key, first_sample, data_offset, step,
                                  BLOCK_R, BLOCK_C)  # fmt: skip
    var = tl.load(var_ptr + s * stride_vs + b * stride_vb + c * stride_vc, mask=mask, other=1.0)
    var = var.to(tl.float32)
    std = tl.sqrt(tl.maximum(var, VAR_FLOOR))
    if BACKWARD:
        dy = tl.load(dy_ptr + r * stride_dr + c * stride_dc, mask=mask, other=0.0)
        out = tl.where(var >= VAR_FLOOR, dy.to(tl.float32) * eps / (2.0 * std), 0.0)
    else:
        out = std * eps
    tl.store(out_ptr + r * stride_or + c * stride_oc,
             to_store(out, out_ptr.dtype.element_ty, INTERPRET), mask=mask)  # fmt: skip


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
    """``out = x * sign(eps)`` (``+1`` where ``eps >= 0``; the map is its own transpose,
    so it is its backward too); x ``(S, B, C)`` (sample stride 0 when shared), out
    ``(S*B, C)``."""
    r, s, b, c, mask, eps = _tile(R, C, B, key, first_sample, data_offset, step,
                                  BLOCK_R, BLOCK_C)  # fmt: skip
    x = tl.load(x_ptr + s * stride_xs + b * stride_xb + c * stride_xc, mask=mask, other=0.0)
    # fp32 before the negation: the interpreter holds bf16 as raw uint16
    x = x.to(tl.float32)
    out = tl.where(eps >= 0.0, x, -x)
    tl.store(out_ptr + r * stride_or + c * stride_oc,
             to_store(out, out_ptr.dtype.element_ty, INTERPRET), mask=mask)  # fmt: skip


# ---------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------


def _as_2d(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def _sbc(t: Tensor, S: int, shared: int) -> tuple[int, int, int, int]:
    """``(B, *strides)`` of a 2-D ``(S*B, C)`` (or shared ``(B, C)``) tensor viewed as
    ``(S, B, C)``."""
    B = t.shape[0] if shared else t.shape[0] // S
    return B, (0 if shared else B * t.stride(0)), t.stride(0), t.stride(1)


def _launch(kernel, t: Tensor, out_dtype: torch.dtype, key: NoiseKey, noise_id: int,
            shared: int, *args, **meta) -> Tensor:  # fmt: skip
    """Run an elementwise noise kernel over ``t`` (any shape, rows first) into a new folded
    ``(S*B, ...)`` tensor of ``out_dtype``. ``args`` go between the input's strides and the
    output's (where the lrt backward passes ``dy``)."""
    check_device(t)
    S = key.num_samples
    t2 = _as_2d(t)
    B, *strides = _sbc(t2, S, shared)
    out = torch.empty((S * B, t2.shape[1]), dtype=out_dtype, device=t.device)
    if out.numel():
        br, bc = elementwise_block()
        R, C = out.shape
        kernel[(triton.cdiv(R, br) * triton.cdiv(C, bc),)](
            t2, *args[:1], out, R, C, B, *strides, *args[1:], out.stride(0), out.stride(1),
            philox_key(key.seed, noise_id), as_i32(key.first_sample), as_i32(key.data_offset),
            as_i32(key.step), BLOCK_R=br, BLOCK_C=bc, INTERPRET=interpret(), **meta,
        )  # fmt: skip
    return out.view(S * B, *t.shape[1:])


def _sum_if_shared(g: Tensor, S: int, shared: int, dtype: torch.dtype) -> Tensor:
    return g.unflatten(0, (S, -1)).sum(0, dtype=torch.float32).to(dtype) if shared else g


# ---------------------------------------------------------------------------------------
# the primitives
# ---------------------------------------------------------------------------------------


def lrt_noise_forward(var: Tensor, key: NoiseKey, noise_id: int, shared: int) -> Tensor:
    """``sqrt(var) * eps``: var ``(S*B, ...)`` or shared ``(B, ...)`` -> ``(S*B, ...)``."""
    return _launch(_lrt_noise_kernel, var, var.dtype, key, noise_id, shared, var, 0, 0,
                   BACKWARD=False, VAR_FLOOR=VAR_FLOOR)  # fmt: skip


def lrt_noise_backward(dy, var, key, noise_id, shared, needs):
    dy2 = _as_2d(dy)
    # shared: fp32 per-sample terms, summed over samples below
    dt = torch.float32 if shared else var.dtype
    g = _launch(_lrt_noise_kernel, var, dt, key, noise_id, shared, dy2,
                dy2.stride(0), dy2.stride(1), BACKWARD=True, VAR_FLOOR=VAR_FLOOR)  # fmt: skip
    return (_sum_if_shared(g, key.num_samples, shared, var.dtype),)


def sign_mul_forward(x: Tensor, key: NoiseKey, noise_id: int, shared: int) -> Tensor:
    """``x * sign(eps)``: x ``(S*B, ...)`` or shared ``(B, ...)`` -> ``(S*B, ...)``."""
    return _launch(_sign_mul_kernel, x, x.dtype, key, noise_id, shared)


def sign_mul_backward(dy, x, key, noise_id, shared, needs):
    g = _launch(_sign_mul_kernel, dy, dy.dtype, key, noise_id, 0)
    return (_sum_if_shared(g, key.num_samples, shared, x.dtype),)


def normal_forward(like: Tensor, key: NoiseKey, pid: int, *shape: int) -> Tensor:
    """fp32 normals ``(S, *shape)`` of parameter ``pid`` (a vector is one row of the key's
    2-D view)."""
    return keyed_normal(key, pid, shape, like.device)
