"""The noise key (I1): Philox bit-exact with Random123 and Triton, normals, layout."""

from __future__ import annotations

import os

import pytest
import torch

from spar import rng

# Random123 known-answer vectors for Philox4x32-10: (counter, key, expected output).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    c = [torch.tensor([v], dtype=torch.int64) for v in ctr]
    out = rng.philox(*c, key[0], key[1])
    assert tuple(int(o) for o in out) == expected


def test_philox_matches_triton_interpreter():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    assert os.environ.get("TRITON_INTERPRET") == "1"

    @triton.jit
    def kernel(out_ptr, seed, c1, c2, c3, N: tl.constexpr):
        offs = tl.arange(0, N)
        zero = offs.to(tl.int64) * 0
        a, b, c, d = tl.philox(
            seed,
            offs.to(tl.uint32),
            (zero + c1).to(tl.uint32),
            (zero + c2).to(tl.uint32),
            (zero + c3).to(tl.uint32),
        )
        for lane, v in ((0, a), (1, b), (2, c), (3, d)):
            tl.store(out_ptr + offs * 4 + lane, v.to(tl.int64) & 0xFFFFFFFF)

    seed, pid = 0xDEADBEEF, rng.param_id("encoder.layers.3.weight")
    out = torch.zeros(64 * 4, dtype=torch.int64)
    kernel[(1,)](out, seed | (pid << 32), 7, 3, 4_000_000_000, N=64)
    ref = rng.philox_uint32(seed, pid, torch.arange(64), 7, 3, 4_000_000_000).flatten()
    assert torch.equal(out, ref)


def triton_randn4x(key: int, n: int) -> torch.Tensor:
    """Triton's own normals ``tl.randn4x(key, arange(n))`` (interpreter), lanes interleaved:
    ``(4 * n,)`` float32. The counters are ``(i, 0, 0, 0)``."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def kernel(out_ptr, seed, N: tl.constexpr):
        offs = tl.arange(0, N)
        n0, n1, n2, n3 = tl.randn4x(seed, offs)
        for lane, v in ((0, n0), (1, n1), (2, n2), (3, n3)):
            tl.store(out_ptr + offs * 4 + lane, v)

    out = torch.zeros(n * 4)
    kernel[(1,)](out, key, N=n)
    return out


def test_normal_conversion_matches_triton_randn4x():
    out = triton_randn4x(1234, 256)
    c0 = torch.arange(256, dtype=torch.int64)
    zero = torch.zeros_like(c0)
    ref = rng._normals4(c0, zero, zero, zero, 1234, 0).flatten()
    torch.testing.assert_close(out, ref, rtol=0, atol=4e-6)


@pytest.mark.parametrize("mode", ["eager", "auto"])
def test_layout_is_written_contract(monkeypatch, mode):
    """Element (row, col) of sample s is lane col % 4 of Philox(col // 4, row, s, step)."""
    monkeypatch.setenv("SPAR_RNG", mode)
    seed, step, pid = 11, 123, rng.param_id("w")
    eps = rng.normal(seed, step, pid, 5, 2, (3, 10))  # samples 5, 6
    for s in (0, 1):
        for row in range(3):
            for col in range(10):
                c = [torch.tensor([v]) for v in (col // 4, row, 5 + s, step)]
                n = rng._normals4(*c, seed, pid)[0, col % 4]
                assert abs(float(eps[s, row, col] - n)) <= 2e-6


def test_same_key_same_noise_and_each_part_matters():
    base = dict(seed=1, step=2, pid=3, first_sample=0, num_samples=2, shape=(4, 5))
    ref = rng.normal(**base)
    assert torch.equal(ref, rng.normal(**base))
    for part, value in (("seed", 9), ("step", 9), ("pid", 9)):
        other = rng.normal(**{**base, part: value})
        assert not torch.isclose(other, ref).any(), part
    shifted = rng.normal(**{**base, "first_sample": 1})
    assert torch.equal(shifted[0], ref[1])
    assert not torch.isclose(shifted[1], ref[0]).any()


@pytest.mark.parametrize("mode", ["eager", "auto"])
def test_noise_independent_of_chunking(monkeypatch, mode):
    monkeypatch.setenv("SPAR_RNG", mode)
    full = rng.normal(5, 6, 7, 0, 9, (33, 21))
    # split over samples as ranks would
    parts = torch.cat([rng.normal(5, 6, 7, lo, n, (33, 21)) for lo, n in ((0, 4), (4, 1), (5, 4))])
    assert torch.equal(full, parts)
    # tiny internal chunks exercise the eager row/column/sample chunk loops
    monkeypatch.setenv("SPAR_RNG", "eager")
    monkeypatch.setattr(rng, "_CHUNK_COUNTERS", 3)
    torch.testing.assert_close(full, rng.normal(5, 6, 7, 0, 9, (33, 21)), rtol=0, atol=2e-6)


def test_rows_offset_for_per_example_noise():
    full = rng.normal(1, 1, 1, 0, 2, (10, 6))
    tail = rng.normal(1, 1, 1, 0, 2, (4, 6), first_row=6)
    assert torch.equal(full[:, 6:], tail)


@pytest.mark.parametrize("shape", [(50, 30), (7, 3, 2), (5,), (1, 1)])
def test_default_and_eager_agree(monkeypatch, shape):
    """The default CPU generator (native where it builds) draws the eager generator's noise,
    to a few ulp; tests/test_native.py tests the native one in depth."""
    mu, sig = torch.randn(shape), torch.rand(shape) + 0.1
    monkeypatch.setenv("SPAR_RNG", "auto")
    a = rng.normal(3, 4, 5, 2, 3, shape)
    w_a = rng.sample(3, 4, 5, 2, 3, mu, sig)
    monkeypatch.setenv("SPAR_RNG", "eager")
    b = rng.normal(3, 4, 5, 2, 3, shape)
    w_b = rng.sample(3, 4, 5, 2, 3, mu, sig)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(w_a, w_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(w_b, mu + sig * b, rtol=1e-6, atol=1e-6)


def test_moments_are_standard_normal():
    eps = rng.normal(0, 0, rng.param_id("stats"), 0, 4, (256, 256)).double()
    n = eps.numel()
    # mean ~ N(0, 1/n), var of sample variance ~ 2/n: 6 standard errors
    assert abs(float(eps.mean())) < 6 / n**0.5
    assert abs(float(eps.var()) - 1) < 6 * (2 / n) ** 0.5
    # lanes and neighbouring rows are uncorrelated
    flat = eps.reshape(-1, 4)
    corr = torch.corrcoef(flat.T)
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max() < 6 / (n / 4) ** 0.5


def test_param_id_and_seed_checks():
    assert rng.param_id("a.weight") == rng.param_id("a.weight")
    assert rng.param_id("a.weight") != rng.param_id("a.bias")
    assert 0 <= rng.param_id("x" * 100) < 2**31
    with pytest.raises(ValueError, match="seed"):
        rng.check_seed(2**32)
    with pytest.raises(TypeError, match="seed"):
        rng.check_seed(1.5)


@pytest.mark.parametrize("mode", ["eager", "auto"])
def test_out_workspaces(monkeypatch, mode):
    monkeypatch.setenv("SPAR_RNG", mode)
    mu, sig = torch.randn(6, 3, 2), torch.rand(6, 3, 2)
    ws = torch.full((4, 6, 3, 2), float("nan"))
    w = rng.sample(1, 2, 3, 0, 4, mu, sig, out=ws)
    assert w.data_ptr() == ws.data_ptr() and torch.equal(ws, rng.sample(1, 2, 3, 0, 4, mu, sig))
    eps = torch.empty(2, 6, 3, 2)
    key = rng.NoiseKey(1, 2, 0, 4)
    assert torch.equal(key.normal(3, (6, 3, 2), samples=(2, 4), out=eps), eps)
    assert torch.equal(eps, rng.normal(1, 2, 3, 2, 2, (6, 3, 2)))
    w64 = torch.empty(4, 6, 3, 2, dtype=torch.float64)
    key.sample(3, mu, sig, out=w64)
    torch.testing.assert_close(w64, ws.double())
    for bad in (torch.empty(4, 6, 6), torch.empty(4, 6, 3, 2, dtype=torch.float16),
                torch.empty(4, 6, 2, 3).transpose(2, 3)):  # fmt: skip
        with pytest.raises(ValueError, match="out must be"):
            rng.sample(1, 2, 3, 0, 4, mu, sig, out=bad, dtype=torch.float32)
    with pytest.raises(ValueError, match="out must be"):
        rng.normal(1, 2, 3, 0, 4, (6, 3, 2), out=torch.empty(4, 6, 3, 2, dtype=torch.float64))
