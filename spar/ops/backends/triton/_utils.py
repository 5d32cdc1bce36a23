"""Pieces shared by spar's Triton kernels: the noise key in registers, dtype handling, and
host-side helpers for launching.

Noise tiles
-----------
:func:`philox_tile` and :func:`normal_tile` reproduce :mod:`spar.rng` inside a kernel.
Element ``(row, col)`` of global sample ``sample`` is lane ``col % 4`` of
``tl.philox(seed | param_id << 32, col // 4, row, sample, step)``; a tile of ``BLOCK_C``
columns starting at a multiple of 4 therefore needs ``BLOCK_C // 4`` Philox calls per row,
and the four lanes are interleaved back into column order. Nothing depends on the tile
shape, so every kernel (and every block size) draws the same noise for the same element.

Interpreter
-----------
Under ``TRITON_INTERPRET=1`` bf16 values are stored as raw ``uint16`` in numpy: ``tl.dot``
on them multiplies the bit patterns and the fp32->bf16 cast truncates. Kernels therefore
take an ``INTERPRET`` constexpr: when it is set, dot operands are rounded to the input
dtype with round-to-nearest-even by bit arithmetic (what the GPU's cast does) and kept in
fp32 for the dot, which gives the numerics of the GPU path (exact products, fp32
accumulation) on any backend.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from spar.rng import MASK32, PARAM_ID_MASK

# ---------------------------------------------------------------------------------------
# device functions
# ---------------------------------------------------------------------------------------


@triton.jit
def philox_tile(key, rows, samples, col0, step, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Raw Philox lanes for a ``(BLOCK_R, BLOCK_C)`` tile whose first column ``col0`` is a
    multiple of 4: four uint32 tensors ``(BLOCK_R, BLOCK_C // 4)``.

    ``rows`` (``(BLOCK_R,)``) and ``samples`` (a scalar, or ``(BLOCK_R, 1)`` for per-row
    samples) are the row and sample counters as uint32; ``step`` is a uint32 scalar;
    ``key`` is ``seed | param_id << 32``.
    """
    G: tl.constexpr = BLOCK_C // 4
    groups = (col0 // 4 + tl.arange(0, G)).to(tl.uint32)
    zero = tl.zeros((BLOCK_R, G), dtype=tl.uint32)
    # counters are broadcast to the full tile up front: tl.philox mixes them lane-wise
    c0 = zero + groups[None, :]
    c1 = zero + rows[:, None]
    c2 = zero + samples
    c3 = zero + step
    return tl.philox(key, c0, c1, c2, c3)


@triton.jit
def normal_tile(key, rows, samples, col0, step, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Standard normals ``(BLOCK_R, BLOCK_C)`` fp32 of the noise key (see
    :func:`philox_tile` for the arguments), in column order."""
    i0, i1, i2, i3 = philox_tile(key, rows, samples, col0, step, BLOCK_R, BLOCK_C)
    n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(i0), tl.uint_to_uniform_float(i1))
    n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(i2), tl.uint_to_uniform_float(i3))
    # interleave(interleave(a, c), interleave(b, d)) puts lane l of group g at column 4g + l
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))


@triton.jit
def round_bf16(x):
    """fp32 -> nearest-even bf16 value, returned as fp32 (bit arithmetic: the interpreter's
    own cast truncates). Inf and NaN are not special-cased: they do not reach here."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def to_dot(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Round a tile to the dot input dtype ``DTYPE``. On GPU: a plain cast (tensor cores
    take the narrow type). Interpreted: the rounded value kept in fp32 (see module doc)."""
    if INTERPRET:
        x = x.to(tl.float32)
        if DTYPE == tl.bfloat16:
            x = round_bf16(x)
        elif DTYPE == tl.float16:
            x = x.to(tl.float16).to(tl.float32)
        return x
    else:
        return x.to(DTYPE)


@triton.jit
def to_store(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Cast an fp32 result to the output dtype with round-to-nearest-even on every
    backend."""
    if INTERPRET:
        if DTYPE == tl.bfloat16:
            x = round_bf16(x)
    return x.to(DTYPE)


# ---------------------------------------------------------------------------------------
# host helpers
# ---------------------------------------------------------------------------------------

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the parameter dtypes of the sampled primitives (their activations: FLOAT_DTYPES)
PARAM_DTYPES = (torch.float32,)


def interpret() -> bool:
    """Whether kernels run under the Triton interpreter (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def elementwise_block() -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_C)`` of the elementwise noise kernels (weight sampling, per-example
    noise). GPU: 2 K elements per program keeps the Philox + Box-Muller temporaries in
    registers (ptxas, sm_90: no spills); the interpreter wants fewer, bigger programs (each
    one is a Python call).

    Kept by the cost model (``bench/results/cost_model.md``, predicted): 4 K elements per
    program save 7 % of the sampling kernel's instructions (66.7 vs 71.9 per element) for
    105 instead of 62 registers, on a kernel that is HBM-bound on the chunked linear path
    and a few per cent of a conv step."""
    return (32, 64) if interpret() else (16, 128)


def as_i32(value: int) -> int:
    """A uint32 counter as the signed 32-bit int with the same bits, so that every counter
    argument has the kernel type ``i32`` whatever its value (bitcast back in the kernel)."""
    value &= MASK32
    return value - (1 << 32) if value >= 1 << 31 else value


def philox_key(seed: int, pid: int) -> int:
    """The 64-bit Philox key ``seed | param_id << 32`` (fits int64: param ids are 31 bits)."""
    return (seed & MASK32) | ((pid & PARAM_ID_MASK) << 32)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 ``tl.dot`` precision: TF32 only where torch itself allows it for matmuls, so the
    Triton and torch backends round alike (``torch.backends.cuda.matmul.allow_tf32``)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small constant off-GPU, used only to size
    grids)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check_device(*tensors: torch.Tensor | None) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda" and not interpret():
            raise RuntimeError(
                f"the triton backend needs CUDA tensors (got a tensor on {t.device}); set "
                "TRITON_INTERPRET=1 to run the kernels on CPU, or SPAR_BACKEND=torch"
            )


def check_sampled(x: torch.Tensor, *params: torch.Tensor | None) -> None:
    """The inputs a sampled primitive (``sampled_linear``, ``sampled_conv``) accepts on this
    backend: CUDA tensors, fp32/fp16/bf16 activations, fp32 parameters."""
    check_device(x, *params)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"the triton backend takes fp32/fp16/bf16 input, got {x.dtype}")
    for t in params:
        if t is not None and t.dtype not in PARAM_DTYPES:
            raise TypeError(f"the triton backend takes fp32 parameters, got {t.dtype}")
