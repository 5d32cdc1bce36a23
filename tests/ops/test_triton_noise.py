"""Noise generated inside the Triton kernels is the noise key of spar.rng (I1): Philox
integers bit for bit, normals within a few ulp, the same for every block size and every
kernel that regenerates it."""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from spar import rng  # noqa: E402
from spar.ops import linear_triton as lt  # noqa: E402
from spar.ops._triton_utils import as_i32, normal_tile, philox_key, philox_tile  # noqa: E402
from spar.ops.lrt_flipout import sign_mul  # noqa: E402
from spar.ops.sample import sample_weights  # noqa: E402
from spar.rng import NoiseKey  # noqa: E402

# normals: the interpreter's float32 log/sin/cos (numpy) and torch's differ by a few ulp
NORMAL_ATOL = 4e-6

SEED, STEP = 0xDEADBEEF, 3_000_000_000  # values above 2**31 exercise the uint32 counters
PID = rng.param_id("encoder.layer.weight")


@pytest.fixture(autouse=True)
def _eager_rng(monkeypatch):
    # the torch.compile'd generator costs a compile per test process; eager is exact too
    monkeypatch.setenv("SPAR_RNG_COMPILE", "0")


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
        y = lt.bayes_linear_forward(eye_k, mu, sig, None, None, key, PID, 0, True, config=cfg)
        assert torch.equal(y.view(S, K, N), w.transpose(1, 2))
        dx = lt.bayes_linear_backward_dx(eye_n, mu, sig, key, PID, False, N, config=cfg)
        assert torch.equal(dx.view(S, N, K), w)
    key1 = _key(1, first=4)
    eps = sample_weights(None, torch.ones(N, K), key1, PID)[0]
    for cfg in CONFIGS:
        _, g_eps, _, _ = lt.bayes_linear_backward_dw(
            torch.ones(1, K), torch.ones(1, N), key1, PID, 0, (N, K), False, 1,
            need_mu=False, config=cfg,
        )  # fmt: skip
        assert torch.equal(g_eps, eps)


def test_per_example_signs_match_the_torch_backend():
    S, B, C, offset = 3, 5, 23, 1000
    key = _key(S, first=2, data_offset=offset)
    x = torch.ones(B, C)
    signs = sign_mul(x, key, PID, shared=True)  # (S*B, C)
    noise = key.normal(PID, (B, C), first_row=offset)
    assert torch.equal(signs, torch.where(noise >= 0, 1.0, -1.0).flatten(0, 1))


def test_fused_forward_moments():
    """y = x @ (sigma * eps)^T with x = 1 is N(0, K sigma^2): sample mean and variance of
    S*N outputs within 6 standard errors."""
    S, N, K, s0 = 32, 64, 64, 0.5
    key = _key(S)
    y = lt.bayes_linear_forward(
        torch.ones(1, K), None, torch.full((N, K), s0), None, None, key, PID, 0, True
    ).double() / (s0 * math.sqrt(K))
    n = y.numel()
    assert abs(float(y.mean())) < 6 / math.sqrt(n)
    assert abs(float(y.var()) - 1) < 6 * math.sqrt(2 / n)
