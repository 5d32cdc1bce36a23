"""Noise generated inside the Triton kernels is the noise key of spar.rng (I1): Philox
integers bit for bit, normals within a few ulp, the same for every block size and every
kernel that regenerates it; the per-example noise primitives (``lrt_noise``, ``sign_mul``)
and the keyed ``normal`` equal the torch backend's for tensors of any shape (I2)."""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from spar import rng  # noqa: E402
from spar.ops.backends.torch import noise as torch_noise  # noqa: E402
from spar.ops.backends.triton import linear as lt  # noqa: E402
from spar.ops.backends.triton import noise as triton_noise  # noqa: E402
from spar.ops.backends.triton._utils import (  # noqa: E402
    as_i32,
    normal_tile,
    philox_key,
    philox_tile,
)
from spar.ops.backends.triton.sample import sample_weights  # noqa: E402
from spar.ops.library import VAR_FLOOR  # noqa: E402
from spar.rng import NoiseKey  # noqa: E402
from tests.ops.tolerance import assert_close, assert_close_lowp  # noqa: E402

# normals: the interpreter's float32 log/sin/cos (numpy) and torch's differ by a few ulp
NORMAL_ATOL = 4e-6

SEED, STEP = 0xDEADBEEF, 3_000_000_000  # values above 2**31 exercise the uint32 counters
PID = rng.param_id("encoder.layer.weight")


@triton.jit
def _tile_probe_kernel(ints_ptr, normals_ptr, R, C, key, first_sample, step,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """Writes the raw lanes (column order) and the normals of one sample's (R, C) array."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    sample = first_sample.to(tl.uint32, bitcast=True)
    step_u = step.to(tl.uint32, bitcast=True)
    i0, i1, i2, i3 = philox_tile(
        key, rows.to(tl.uint32), sample, pid_c * BLOCK_C, step_u, BLOCK_R, BLOCK_C
    )
    ints = tl.interleave(tl.interleave(i0, i2), tl.interleave(i1, i3))
    off = rows.to(tl.int64)[:, None] * C + cols[None, :]
    tl.store(ints_ptr + off, ints.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    normals = normal_tile(
        key, rows.to(tl.uint32), sample, pid_c * BLOCK_C, step_u, BLOCK_R, BLOCK_C
    )
    tl.store(normals_ptr + off, normals, mask=mask)


def _probe(R: int, C: int, sample: int, block: tuple[int, int]):
    ints = torch.zeros((R, C), dtype=torch.int64)
    normals = torch.zeros((R, C))
    grid = (triton.cdiv(R, block[0]), triton.cdiv(C, block[1]))
    _tile_probe_kernel[grid](ints, normals, R, C, philox_key(SEED, PID), as_i32(sample),
                             as_i32(STEP), BLOCK_R=block[0], BLOCK_C=block[1])  # fmt: skip
    return ints, normals


@pytest.mark.parametrize("block", [(4, 16), (16, 64)])
def test_kernel_integers_are_philox_bit_exact(block):
    R, C, sample = 9, 37, 2_500_000_000
    ints, normals = _probe(R, C, sample, block)
    cols = torch.arange(C, dtype=torch.int64)
    rows = torch.arange(R, dtype=torch.int64)[:, None]
    c0, c1 = torch.broadcast_tensors(cols[None, :] // 4, rows)
    lanes = rng.philox(c0, c1, torch.full_like(c0, sample), torch.full_like(c0, STEP), SEED, PID)
    expected = torch.gather(torch.stack(lanes, -1), -1, (cols % 4).expand(R, C)[..., None])[..., 0]
    assert torch.equal(ints, expected)
    ref = rng.normal(SEED, STEP, PID, sample, 1, (R, C))[0]
    torch.testing.assert_close(normals, ref, rtol=0, atol=NORMAL_ATOL)


def test_kernel_noise_is_independent_of_block_size():
    a = _probe(13, 50, 5, (16, 16))
    b = _probe(13, 50, 5, (2, 64))
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])


def _key(S: int, first: int = 0, data_offset: int = 0) -> NoiseKey:
    return NoiseKey(seed=SEED, step=STEP, first_sample=first, num_samples=S,
                    data_offset=data_offset)  # fmt: skip


def test_sample_kernel_matches_rng_and_any_block_or_sample_range():
    R, C, S = 11, 29, 3
    key = _key(S, first=7)
    ones = torch.ones(R, C)
    eps = sample_weights(None, ones, key, PID, block=(16, 16))
    ref = key.normal(PID, (R, C))
    torch.testing.assert_close(eps, ref, rtol=0, atol=NORMAL_ATOL)
    assert torch.equal(eps, sample_weights(None, ones, key, PID, block=(4, 64)))
    # local sample range [1, 3) of the key draws what the full call draws for it
    assert torch.equal(eps[1:], sample_weights(None, ones, key, PID, (1, 3), block=(8, 32)))


CONFIGS = [lt.KernelConfig(16, 16, 16), lt.KernelConfig(32, 16, 32), lt.KernelConfig(64, 64, 64)]


def test_fused_kernels_regenerate_the_same_noise_for_any_block_size():
    """One-hot inputs make the GEMMs exact copies of the weights: forward gives W_s^T,
    dx gives W_s, and the dW kernel's eps accumulator gives eps_s, bit for bit across block
    sizes and equal to the sampling kernel's output."""
    N, K, S = 21, 19, 2
    key = _key(S, first=3)
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(N, K, generator=g)
    sig = torch.rand(N, K, generator=g) + 0.1
    w = sample_weights(mu, sig, key, PID)  # (S, N, K)
    eye_k = torch.eye(K)
    eye_n = torch.eye(N).repeat(S, 1)
    for cfg in CONFIGS:
        y = lt.fused_forward(eye_k, mu, sig, key, PID, 1, config=cfg)
        assert torch.equal(y.view(S, K, N), w.transpose(1, 2))
        dx = lt.fused_backward_dx(eye_n, mu, sig, key, PID, 0, N, config=cfg)
        assert torch.equal(dx.view(S, N, K), w)
    key1 = _key(1, first=4)
    eps = sample_weights(None, torch.ones(N, K), key1, PID)[0]
    for cfg in CONFIGS:
        g_mu, g_eps = lt.fused_backward_dw(
            torch.ones(1, K), torch.ones(1, N), key1, PID, (N, K), 0, 1, need_mu=False,
            config=cfg,
        )  # fmt: skip
        assert g_mu is None
        assert torch.equal(g_eps, eps)


def test_fused_shared_dx_sums_samples_in_any_number_of_groups():
    """Shared input: ``dx = sum_s dy[s] @ W_s``, with the samples split into groups whose
    fp32 partial sums are reduced afterwards (one group writes dx directly)."""
    N, K, S = 13, 11, 5
    key = _key(S, first=1)
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(N, K, generator=g)
    sig = torch.rand(N, K, generator=g) + 0.1
    w = sample_weights(mu, sig, key, PID)
    eye_n = torch.eye(N).repeat(S, 1)
    for groups in (1, 2, S, None):
        dx = lt.fused_backward_dx(eye_n, mu, sig, key, PID, 1, N, groups=groups)
        assert dx.shape == (N, K)
        assert_close(dx, w.sum(0), reduction=S, msg=f"groups={groups}")


def test_fused_forward_moments():
    """y = x @ (sigma * eps)^T with x = 1 is N(0, K sigma^2): sample mean and variance of
    S*N outputs within 6 standard errors."""
    S, N, K, s0 = 32, 64, 64, 0.5
    key = _key(S)
    y = lt.fused_forward(torch.ones(1, K), None, torch.full((N, K), s0), key, PID, 1).double() / (
        s0 * math.sqrt(K)
    )
    n = y.numel()
    assert abs(float(y.mean())) < 6 / math.sqrt(n)
    assert abs(float(y.var()) - 1) < 6 * math.sqrt(2 / n)


# --- per-example noise primitives and the keyed normals, against the torch backend --------

# (shape of one example's features, samples, batch, shared): 2-D linear activations and
# 4-D convolution activations (rows first, features flattened), odd sizes
EXAMPLE_CASES = [((23,), 3, 5, False), ((23,), 3, 5, True), ((3, 5, 4), 2, 3, False),
                 ((3, 5, 4), 3, 2, True)]  # fmt: skip


def _example_ids(case):
    feat, S, B, shared = case
    return f"{len(feat) + 1}d-S{S}-B{B}-{'shared' if shared else 'per'}"


def _example_inputs(feat, S, B, shared, seed=0):
    """Key, input ``(S*B or B, *feat)`` with exact zeros (the variance floor), and the
    folded gradient ``dy``."""
    key = _key(S, first=2, data_offset=1000)
    g = torch.Generator().manual_seed(seed)
    t = torch.randn((B if shared else S * B, *feat), generator=g)
    t.view(-1)[::7] = 0.0
    dy = torch.randn((S * B, *feat), generator=g)
    return key, t, dy


@pytest.mark.parametrize("case", EXAMPLE_CASES, ids=_example_ids)
def test_sign_mul_matches_torch_backend_bit_for_bit(case):
    feat, S, B, shared = case
    key, x, dy = _example_inputs(feat, S, B, shared)
    shared = int(shared)
    out = triton_noise.sign_mul_forward(x, key, PID, shared)
    assert out.shape == (S * B, *feat)
    assert torch.equal(out, torch_noise.sign_mul_forward(x, key, PID, shared))
    (g,) = triton_noise.sign_mul_backward(dy, x, key, PID, shared, (True,))
    (g_ref,) = torch_noise.sign_mul_backward(dy, x, key, PID, shared, (True,))
    assert g.shape == x.shape
    if shared:  # a sum over samples of signed terms
        assert_close(g, g_ref, reduction=S)
    else:
        assert torch.equal(g, g_ref)
    # and the signs are those of the keyed normals of the examples' global rows
    noise = key.normal(PID, (B, *feat), first_row=key.data_offset)
    ones = triton_noise.sign_mul_forward(torch.ones(B, *feat), key, PID, 1)
    assert torch.equal(ones, torch.where(noise >= 0, 1.0, -1.0).flatten(0, 1))


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        torch.bfloat16,
    ],
    ids=["fp16", "bf16"],
)  # fmt: skip
def test_sign_mul_low_precision_is_exact(dtype):
    """A sign flip is exact in any dtype: bit for bit the torch backend's, forward and
    backward."""
    feat, S, B = (3, 5, 4), 2, 3
    key, x, dy = _example_inputs(feat, S, B, False, seed=3)
    x, dy = x.to(dtype), dy.to(dtype)
    out = triton_noise.sign_mul_forward(x, key, PID, 0)
    assert out.dtype == dtype
    assert torch.equal(out, torch_noise.sign_mul_forward(x, key, PID, 0))
    (g,) = triton_noise.sign_mul_backward(dy, x, key, PID, 0, (True,))
    assert torch.equal(g, torch_noise.sign_mul_backward(dy, x, key, PID, 0, (True,))[0])


@pytest.mark.parametrize("case", EXAMPLE_CASES, ids=_example_ids)
def test_lrt_noise_matches_torch_backend(case):
    feat, S, B, shared = case
    key, var, dy = _example_inputs(feat, S, B, shared, seed=1)
    var = var.abs()
    shared = int(shared)
    out = triton_noise.lrt_noise_forward(var, key, PID, shared)
    assert out.shape == (S * B, *feat)
    assert_close(out, torch_noise.lrt_noise_forward(var, key, PID, shared), msg="forward")
    (g,) = triton_noise.lrt_noise_backward(dy, var, key, PID, shared, (True,))
    (g_ref,) = torch_noise.lrt_noise_backward(dy, var, key, PID, shared, (True,))
    assert g.shape == var.shape
    # where var = 0: the forward is the floor's sqrt(VAR_FLOOR) * eps, the gradient is 0
    zero = var == 0
    zero_folded = zero.expand(S, *zero.shape).flatten(0, 1) if shared else zero
    assert zero.any()
    assert out[zero_folded].abs().max() < 10 * math.sqrt(VAR_FLOOR)
    assert (g[zero] == 0).all()
    # a gradient near 1/sqrt(var) is large where var is small: relative tolerance
    assert_close(g, g_ref, reduction=S if shared else 1, msg="backward")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_lrt_noise_low_precision(dtype):
    """fp16/bf16 variances (positive; zeros: the next test): error against
    an fp64 evaluation with the same noise at most twice the torch backend's."""
    feat, S, B = (3, 5, 4), 2, 3
    key, var, dy = _example_inputs(feat, S, B, False, seed=2)
    var = var.abs() + 0.1
    eps = key.normal(PID, (B, *feat), first_row=key.data_offset).double()
    std64 = var.to(dtype).double().unflatten(0, (S, -1)).sqrt()
    dy_lp, var_lp = dy.to(dtype), var.to(dtype)
    out = triton_noise.lrt_noise_forward(var_lp, key, PID, 0)
    assert out.dtype == dtype
    ref_out = (std64 * eps).flatten(0, 1)
    lowp_out = torch_noise.lrt_noise_forward(var_lp, key, PID, 0)
    assert_close_lowp(out, ref_out, lowp_out, dtype=dtype, msg="forward")
    (g,) = triton_noise.lrt_noise_backward(dy_lp, var_lp, key, PID, 0, (True,))
    assert g.dtype == dtype
    ref_g = (dy_lp.double().unflatten(0, (S, -1)) * eps / (2 * std64)).flatten(0, 1)
    (lowp_g,) = torch_noise.lrt_noise_backward(dy_lp, var_lp, key, PID, 0, (True,))
    assert_close_lowp(g, ref_g, lowp_g, dtype=dtype, msg="backward")


def test_lrt_noise_fp16_zero_variance_gradient_matches_torch_backend():
    """The floor is applied in fp32 on both backends (1e-30 is 0 in fp16): var = 0 has
    gradient 0, not dy * eps / 0."""
    S, B, C = 2, 2, 8
    key = _key(S)
    var = torch.zeros(S * B, C, dtype=torch.float16)
    dy = torch.ones(S * B, C, dtype=torch.float16)
    (g,) = triton_noise.lrt_noise_backward(dy, var, key, PID, 0, (True,))
    assert torch.equal(g, torch.zeros_like(g))
    (g_ref,) = torch_noise.lrt_noise_backward(dy, var, key, PID, 0, (True,))
    assert torch.equal(g_ref, g)


@pytest.mark.parametrize("shape", [(7,), (5, 9), (4, 3, 3, 3), ()], ids=str)
def test_normal_matches_the_key(shape):
    """The per-sample biases' (and any parameter's) keyed normals ``(S, *shape)``, a vector
    being one row of the key, against the torch backend's."""
    key = _key(3, first=5)
    like = torch.empty(0)
    eps = triton_noise.normal_forward(like, key, PID, *shape)
    assert eps.shape == (3, *shape) and eps.dtype == torch.float32
    expected = torch_noise.normal_forward(like, key, PID, *shape)
    torch.testing.assert_close(eps, expected, rtol=0, atol=NORMAL_ATOL)
