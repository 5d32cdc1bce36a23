"""The cuda backend without a GPU: the host build of its kernels (``csrc/spar_cuda.cuh``
compiled as C by ``csrc/spar_cuda_host.c``, each kernel run over its launch grid).

* Philox integers bit for bit with :mod:`spar.rng` (known answers included); normals bit
  for bit with the native CPU library (same code, no fma contraction on either side) and
  within a few ulp of the eager torch generator;
* sampled weights (fp32/fp16/bf16 out, any samples-per-thread split), the backward's
  reductions and flags, lrt's noise and flipout's sign flip against torch math with the
  noise of :mod:`spar.rng`; the fp16/bf16 conversions against torch's casts;
* the backend's Python layer (launchers, :class:`CudaSampler` in the chunk loops, every
  primitive's forward and backward) on CPU tensors, its launches routed to the host build
  (``kernels.host_runner``), against the torch backend.
"""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import pytest
import torch

from spar import _native, rng
from spar.ops.backends.cuda import kernels, noise, sample, source
from spar.ops.backends.torch import noise as torch_noise
from spar.ops.backends.torch import sampled as torch_sampled
from spar.rng import NoiseKey
from tests.ops.tolerance import assert_close
from tests.test_rng import KAT

MASK32 = rng.MASK32
_CTYPES = {source.PTR: ctypes.c_void_p, source.I64: ctypes.c_int64, source.U32: ctypes.c_uint32,
           source.I32: ctypes.c_int}  # fmt: skip
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _compiler() -> list[str] | None:
    try:
        return _native.compiler()
    except FileNotFoundError:
        return None


pytestmark = pytest.mark.skipif(_compiler() is None, reason="no C compiler")


def build_host(directory: Path) -> Path:
    """Compile the host build into ``directory``: the native library's flags minus
    -march=native (the kernels' arithmetic is scalar IEEE fp32 either way), warnings as
    errors."""
    src = source.source_dir()
    out = directory / "spar_cuda_host.so"
    cmd = [*_compiler(), *_native.BASE_FLAGS, "-Wall", "-Wextra", "-Werror", "-I", str(src),
           str(src / "spar_cuda_host.c"), "-o", str(out), "-lm"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out


def load_host(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, kinds in source.SIGNATURES.items():
        fn = getattr(lib, f"host_{name}")
        fn.argtypes = [ctypes.c_int64, ctypes.c_int64, *(_CTYPES[k] for k in kinds)]
        fn.restype = None
    for name in ("host_f32_to_f16", "host_f32_to_bf16", "host_f16_to_f32"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def host_runner(lib: ctypes.CDLL, calls: list | None = None):
    """A ``kernels.host_runner`` that runs each launch on the host build (and records
    ``(name, grid)`` in ``calls``)."""

    def run(name, grid, values):
        if calls is not None:
            calls.append((name, grid))
        getattr(lib, f"host_{name}")(grid[0], grid[1], *values)

    return run


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> ctypes.CDLL:
    return load_host(build_host(tmp_path_factory.mktemp("cuda_host")))


@pytest.fixture
def runner(host, monkeypatch):
    """Route the backend's launches for CPU tensors to the host build."""
    calls = []
    monkeypatch.setattr(kernels, "host_runner", host_runner(host, calls))
    return calls


def _key(S: int = 3, **kw) -> NoiseKey:
    # a step above 2**31, nonzero first_sample and data_offset exercise every counter
    args = dict(seed=4242, step=2_500_000_001, first_sample=3, num_samples=S, data_offset=7)
    return NoiseKey(**{**args, **kw})


# --- integers and normals ------------------------------------------------------------------


def test_philox_known_answers_and_random_counters(runner):
    g = torch.Generator().manual_seed(0)
    ctr = torch.randint(0, 2**32, (300, 4), dtype=torch.int64, generator=g)
    key = torch.randint(0, 2**32, (300, 2), dtype=torch.int64, generator=g)
    for i, (c, k, _) in enumerate(KAT):
        ctr[i], key[i] = torch.tensor(c), torch.tensor(k)
    got = sample.philox(ctr, key)
    ref = torch.stack(rng.philox(*ctr.unbind(1), key[:, 0], key[:, 1]), dim=1)
    assert torch.equal(got, ref)
    for i, (_, _, expected) in enumerate(KAT):
        assert tuple(got[i].tolist()) == expected


@pytest.mark.parametrize("shape", [(5, 13), (3, 8), (1, 1), (7,)])
def test_normals_bit_exact_with_the_cpu_library(runner, monkeypatch, shape):
    """The same philox.h functions without fma contraction on both sides: same bits. The
    eager torch generator (Sleef log/sin/cos) is a few ulp away."""
    key = _key(S=4)
    got = sample.keyed_normal(key, 77, shape, torch.device("cpu"), first_row=11)
    monkeypatch.setenv("SPAR_RNG", "native")
    assert torch.equal(got, key.normal(77, shape, first_row=11))
    monkeypatch.setenv("SPAR_RNG", "eager")
    torch.testing.assert_close(got, key.normal(77, shape, first_row=11), rtol=0, atol=2e-6)
    part = sample.keyed_normal(key, 77, shape, torch.device("cpu"), first_row=11, samples=(1, 3))
    assert torch.equal(part, got[1:3])


# --- conversions ---------------------------------------------------------------------------


def _edge_floats() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    vals = [0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 1e6, float("inf"), float("-inf"),
            6.1e-5, 6.0e-5, 2**-24, 2**-25, 2**-25 * 1.0001, 2**-26, 3 * 2**-25, 1e-30,
            3.3895314e38, 1.0 + 2**-8, 1.0 + 3 * 2**-9]  # fmt: skip
    x = torch.tensor(vals, dtype=torch.float32)
    rand = torch.randn(20000, generator=g) * torch.logspace(-9, 6, 20000)
    bits = torch.randint(0, 2**31, (20000,), generator=g, dtype=torch.int64)
    ints = torch.where(bits % 2 == 0, bits, -bits).to(torch.int32).view(torch.float32)
    ints = ints[torch.isfinite(ints)]
    return torch.cat((x, -x, rand, ints))


def test_fp16_bf16_conversions_round_like_torch(host):
    x = _edge_floats()
    n = x.numel()
    for name, dt in (("host_f32_to_f16", torch.float16), ("host_f32_to_bf16", torch.bfloat16)):
        out = torch.empty(n, dtype=torch.int16)
        getattr(host, name)(x.data_ptr(), out.data_ptr(), n)
        assert torch.equal(out, x.to(dt).view(torch.int16)), name
    nan = torch.tensor([float("nan")])
    for name, dt in (("host_f32_to_f16", torch.float16), ("host_f32_to_bf16", torch.bfloat16)):
        out = torch.empty(1, dtype=torch.int16)
        getattr(host, name)(nan.data_ptr(), out.data_ptr(), 1)
        assert out.view(dt).isnan().all(), name
    h = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    back = torch.empty(h.numel(), dtype=torch.float32)
    host.host_f16_to_f32(h.data_ptr(), back.data_ptr(), h.numel())
    ref = h.view(torch.float16).float()
    finite = ~ref.isnan()
    assert torch.equal(back[finite], ref[finite]) and back[~finite].isnan().all()


# --- weight sampling and its backward ------------------------------------------------------


def _params(R: int, C: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(R, C, generator=g)
    sig = torch.rand(R, C, generator=g) * 0.5 + 0.01
    return mu, sig


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,C", [(9, 17), (4, 8), (1, 3)])
def test_sample_weights(runner, monkeypatch, dtype, R, C):
    monkeypatch.setenv("SPAR_RNG", "native")
    key = _key(S=5)
    mu, sig = _params(R, C)
    eps = key.normal(31, (R, C), samples=(1, 5))
    ref = (mu + sig * eps).to(dtype)  # fp32 math, one rounding: exactly the kernel's
    got = sample.sample_weights(mu, sig, key, 31, (1, 5), dtype=dtype)
    assert torch.equal(got, ref)
    assert torch.equal(sample.sample_weights(None, sig, key, 31, (1, 5), dtype=dtype),
                       (sig * eps).to(dtype))  # fmt: skip


def test_samples_per_thread_does_not_change_the_weights(runner, monkeypatch):
    """Whatever split of the samples over grid.y the launcher picks, the same weights."""
    key = _key(S=7)
    mu, sig = _params(6, 10)
    ref = sample.sample_weights(mu, sig, key, 5)
    seen = set()
    for spt in (1, 2, 3, 7):
        monkeypatch.setattr(sample, "samples_per_thread", lambda ns, threads, dev, s=spt: s)
        runner.clear()
        assert torch.equal(sample.sample_weights(mu, sig, key, 5), ref)
        seen.add(runner[-1][1][1])
    assert seen == {7, 4, 3, 1}  # grid.y = ceil(7 / spt)


def test_samples_per_thread_rule(monkeypatch):
    cpu = torch.device("cpu")  # 4 "SMs" off-GPU
    target = 4 * sample._THREADS_PER_SM
    assert sample.samples_per_thread(16, 10, cpu) == 1  # a small weight: all in parallel
    assert sample.samples_per_thread(16, target, cpu) == 16  # four full waves per sample
    assert sample.samples_per_thread(16, target // 4, cpu) == 4
    # 132 SMs, one group, 10**6 samples: one per thread would need grid.y = 10**6 > 65535
    monkeypatch.setattr(kernels, "num_sms", lambda device: 132)
    assert sample.samples_per_thread(10**6, 1, cpu) == -(-(10**6) // 65535)


@pytest.mark.parametrize("gdtype", DTYPES)
def test_sample_backward_reductions(runner, monkeypatch, gdtype):
    monkeypatch.setenv("SPAR_RNG", "native")
    R, C, S = 7, 11, 6
    key = _key(S=S)
    g = torch.Generator().manual_seed(2)
    gw = torch.randn(S, R, C, generator=g).to(gdtype)
    rho = torch.randn(R, C, generator=g)
    eps = key.normal(9, (R, C))
    g32 = gw.float()
    gmu, geps = sample.sample_weights_backward(gw, key, 9)
    assert_close(gmu, g32.sum(0), reduction=S)
    assert_close(geps, (g32 * eps).sum(0), reduction=S)
    # chunks in order, sigmoid(rho) on the last: the sampler's use
    gmu2, geps2 = sample.sample_weights_backward(gw[:4], key, 9, (0, 4))
    gmu2, geps2 = sample.sample_weights_backward(gw[4:], key, 9, (4, 6), grad_mu=gmu2,
                                                 grad_eps=geps2, rho=rho)  # fmt: skip
    assert_close(gmu2, g32.sum(0), reduction=S)
    assert_close(geps2, (g32 * eps).sum(0) * torch.sigmoid(rho), reduction=S)
    _, only_eps = sample.sample_weights_backward(gw, key, 9, need_mu=False)
    assert torch.equal(only_eps, geps)
    # deterministic: the same call twice gives the same bits
    assert torch.equal(sample.sample_weights_backward(gw, key, 9)[1], geps)


def test_launcher_input_errors(runner):
    key = _key(S=2)
    mu, sig = _params(3, 4)
    with pytest.raises(ValueError, match="samples must satisfy"):
        sample.sample_weights(mu, sig, key, 1, (1, 3))
    with pytest.raises(TypeError, match="float32 parameters"):
        sample.sample_weights(mu.double(), sig.double(), key, 1)
    with pytest.raises(ValueError, match="contiguous"):
        sample.sample_weights(mu.t().contiguous().t(), sig, key, 1)
    with pytest.raises(ValueError, match="grad_w has 2 samples, expected 1"):
        sample.sample_weights_backward(torch.zeros(2, 3, 4), key, 1, (0, 1))


def test_cpu_tensors_without_the_test_runner_raise():
    key = _key(S=1)
    mu, sig = _params(2, 4)
    assert kernels.host_runner is None
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        sample.sample_weights(mu, sig, key, 1)


# --- the primitives against the torch backend ----------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [0, 1])
def test_per_example_noise_primitives(runner, monkeypatch, dtype, shared):
    monkeypatch.setenv("SPAR_RNG", "native")
    S, B = 3, 5
    key = _key(S=S)
    g = torch.Generator().manual_seed(3)
    rows = B if shared else S * B
    var = (torch.rand(rows, 4, 3, generator=g) + 0.1).to(dtype)
    var[0, 0, 0] = 0.0  # under the floor: zero gradient
    x = torch.randn(rows, 4, 3, generator=g).to(dtype)
    dy = torch.randn(S * B, 4, 3, generator=g).to(dtype)
    nid = 1234
    pairs = [
        (noise.lrt_noise_forward(var, key, nid, shared),
         torch_noise.lrt_noise_forward(var, key, nid, shared)),
        (noise.lrt_noise_backward(dy, var, key, nid, shared, (True,))[0],
         torch_noise.lrt_noise_backward(dy, var, key, nid, shared, (True,))[0]),
        (noise.sign_mul_forward(x, key, nid, shared),
         torch_noise.sign_mul_forward(x, key, nid, shared)),
        (noise.sign_mul_backward(dy, x, key, nid, shared, (True,))[0],
         torch_noise.sign_mul_backward(dy, x, key, nid, shared, (True,))[0]),
    ]  # fmt: skip
    for i, (got, ref) in enumerate(pairs):
        assert got.shape == ref.shape and got.dtype == ref.dtype, i
        if dtype == torch.float32:
            assert_close(got, ref, reduction=S if shared else 1, msg=str(i))
        else:  # both round the same fp32 value once; summed in fp32 when shared
            tol = 2**-7 if dtype == torch.bfloat16 else 2**-10
            torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol, msg=str(i))
    assert pairs[1][0].reshape(-1)[0] == 0  # the floor's gradient


def _linear_inputs(S, B, K, N, shared, dtype, seed=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B if shared else S * B), K, generator=g).to(dtype)
    mu = torch.randn(N, K, generator=g) * 0.3
    rho = torch.randn(N, K, generator=g) - 3
    dy = torch.randn(S * B, N, generator=g).to(dtype)
    return x, mu, rho, dy


@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("chunk", [None, 40])
def test_sampled_linear_against_the_torch_backend(runner, monkeypatch, shared, chunk):
    monkeypatch.setenv("SPAR_RNG", "native")
    if chunk is not None:  # several chunks: the workspace reuse and in-order accumulation
        monkeypatch.setenv("SPAR_CHUNK_NUMEL", str(chunk))
    S, B, K, N = 4, 3, 9, 5
    key = _key(S=S)
    x, mu, rho, dy = _linear_inputs(S, B, K, N, shared, torch.float32)
    for m in (mu, None):  # None: flipout's zero-mean perturbation
        y = sample.sampled_linear_forward(x, m, rho, key, 21, shared)
        ref = torch_sampled.linear_forward(x, m, rho, key, 21, shared)
        assert_close(y, ref, reduction=K)
        got = sample.sampled_linear_backward(dy, x, m, rho, key, 21, shared, (True, True, True))
        exp = torch_sampled.linear_backward(dy, x, m, rho, key, 21, shared, (True, True, True))
        for name, a, b in zip(("dx", "mu", "rho"), got, exp, strict=True):
            if b is None:
                assert a is None, name
                continue
            assert_close(a, b, reduction=S * B * N, msg=name)


def test_sampled_linear_bf16_activations(runner, monkeypatch):
    monkeypatch.setenv("SPAR_RNG", "native")
    S, B, K, N = 2, 3, 8, 4
    key = _key(S=S)
    x, mu, rho, dy = _linear_inputs(S, B, K, N, 0, torch.bfloat16)
    y = sample.sampled_linear_forward(x, mu, rho, key, 21, 0)
    ref = torch_sampled.linear_forward(x, mu, rho, key, 21, 0)
    assert y.dtype == torch.bfloat16
    # both: the same bf16 weights (one rounding of the same fp32 value) through bf16 matmul
    assert torch.equal(y, ref)


@pytest.mark.parametrize("shared", [0, 1])
def test_sampled_conv_against_the_torch_backend(runner, monkeypatch, shared):
    monkeypatch.setenv("SPAR_RNG", "native")
    S, B, C, Cout, HW = 3, 2, 4, 6, 5
    key = _key(S=S)
    g = torch.Generator().manual_seed(5)
    x = torch.randn((B if shared else S * B), C, HW, HW, generator=g)
    mu = torch.randn(Cout, C // 2, 3, 3, generator=g) * 0.3
    rho = torch.randn(Cout, C // 2, 3, 3, generator=g) - 3
    geo = (1, 1, 1, 1, 1, 1)  # stride, padding, dilation
    y = sample.sampled_conv_forward(x, mu, rho, key, 8, shared, 2, *geo)
    ref = torch_sampled.conv_forward(x, mu, rho, key, 8, shared, 2, *geo)
    assert_close(y, ref, reduction=C * 9)
    dy = torch.randn(y.shape, generator=g)
    got = sample.sampled_conv_backward(dy, x, mu, rho, key, 8, shared, 2, *geo, (True,) * 3)
    exp = torch_sampled.conv_backward(dy, x, mu, rho, key, 8, shared, 2, *geo, (True,) * 3)
    for name, a, b in zip(("dx", "mu", "rho"), got, exp, strict=True):
        assert_close(a, b, reduction=S * B * Cout * HW * HW, msg=name)


def test_normal_primitive(runner, monkeypatch):
    monkeypatch.setenv("SPAR_RNG", "native")
    key = _key(S=3)
    like = torch.zeros(1, dtype=torch.float64)
    got = sample.normal_forward(like, key, 55, 6)
    assert got.dtype == torch.float32 and got.shape == (3, 6)
    assert torch.equal(got, key.normal(55, (6,)))
