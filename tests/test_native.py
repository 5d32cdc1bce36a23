"""The native CPU noise generator (csrc/, spar._native): Philox bit-exact with spar.rng,
normals within a few ulp of the torch generator, sample / eps_dot equal to the eager
reference, and the build cache (reuse, rebuild of a corrupt file, concurrent builds, the
eager fallback without a compiler)."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from spar import _env, _native, rng
from tests.test_rng import KAT, triton_randn4x

MASK32 = rng.MASK32


def _have_compiler() -> bool:
    try:
        _native.compiler()
    except FileNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _have_compiler(), reason="no C compiler")


@pytest.fixture(scope="module")
def lib() -> _native.Library:
    lib = _native.get()
    assert lib is not None, f"a compiler exists, but the native build failed: {_native.error()}"
    return lib


@pytest.fixture
def native(monkeypatch):
    monkeypatch.setenv("SPAR_RNG", "native")


def _as_i32(t: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> int32 with the same bits (the C side reads uint32)."""
    return torch.where(t >= 2**31, t - 2**32, t).to(torch.int32).contiguous()


def _native_philox(lib, ctr: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    out = torch.empty(ctr.shape[0], 4, dtype=torch.int32)
    c, k = _as_i32(ctr), _as_i32(key)  # keep them alive across the call
    lib.philox_batch(ctr.shape[0], c.data_ptr(), k.data_ptr(), out.data_ptr())
    return out.to(torch.int64) & MASK32


def _native_normals(lib, ctr: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    out = torch.empty(ctr.shape[0], 4, dtype=torch.float32)
    c, k = _as_i32(ctr), _as_i32(key)
    lib.normal_batch(ctr.shape[0], c.data_ptr(), k.data_ptr(), out.data_ptr())
    return out


def _random_counters(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ctr = torch.randint(0, 2**32, (n, 4), dtype=torch.int64, generator=g)
    key = torch.randint(0, 2**32, (n, 2), dtype=torch.int64, generator=g)
    edges = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 2, MASK32])
    ctr[: len(edges)] = edges.view(-1, 1)
    key[: len(edges)] = edges.view(-1, 1)
    return ctr, key


# --- integers and normals ------------------------------------------------------------------


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_known_answers(lib, ctr, key, expected):
    out = _native_philox(lib, torch.tensor([ctr]), torch.tensor([key]))
    assert tuple(int(v) for v in out[0]) == expected


def test_philox_bit_exact_with_torch_reference(lib):
    ctr, key = _random_counters(20_000)
    assert (ctr >= 2**31).any() and (key >= 2**31).any()
    ref = torch.stack(rng.philox(*ctr.unbind(1), key[:, 0], key[:, 1]), dim=1)
    assert torch.equal(_native_philox(lib, ctr, key), ref)


def test_normals_within_a_few_ulp_of_torch(lib):
    ctr, key = _random_counters(20_000, seed=1)
    ours = _native_normals(lib, ctr, key)
    ref = rng._normals4(*ctr.unbind(1), key[:, 0], key[:, 1])
    # measured: max |diff| 9.5e-7, at most 4 ulp of the normal, a third of them differ at all
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)
    ulps = (ours.view(torch.int32).long() - ref.view(torch.int32).long()).abs()
    assert int(ulps.max()) <= 8
    # and as accurate as torch's against a float64 evaluation of the same formula
    i = torch.stack(rng.philox(*ctr.unbind(1), key[:, 0], key[:, 1]), dim=1)
    u = rng.uint_to_uniform(i).double()
    r = torch.sqrt(-2 * torch.log(u[:, 0::2].clamp_min(rng._U_MIN)))
    th = (rng.uint_to_uniform(i[:, 1::2]) * torch.tensor(rng._TWO_PI, dtype=torch.float32)).double()
    exact = torch.stack((r[:, 0] * th[:, 0].cos(), r[:, 0] * th[:, 0].sin(),
                         r[:, 1] * th[:, 1].cos(), r[:, 1] * th[:, 1].sin()), dim=1)  # fmt: skip
    err_ours = float((ours.double() - exact).abs().max())
    err_torch = float((ref.double() - exact).abs().max())
    assert err_ours <= 1e-6 and err_ours <= 1.5 * err_torch


def test_normals_match_triton_randn4x(lib):
    """The native normals against Triton's own conversion (tl.randn4x, interpreter)."""
    out = triton_randn4x(0xBEEF | (77 << 32), 256)
    c0 = torch.arange(256)
    ctr = torch.stack((c0, *(torch.zeros_like(c0),) * 3), dim=1)
    key = torch.tensor([[0xBEEF, 77]]).expand(256, 2)
    torch.testing.assert_close(_native_normals(lib, ctr, key).flatten(), out, rtol=0, atol=4e-6)


@pytest.mark.parametrize("cols", [1, 3, 4, 127, 128, 129, 1023, 1024, 1029, 2305])
def test_block_path_is_the_contract(lib, native, cols):
    """rng.normal (vectorised blocks, tiles, tails) == per-counter normals of the layout,
    bit for bit, including counters at and above 2**31."""
    seed, pid, step = 0xFFFFFFF0, rng.param_id("w"), 2**32 - 1
    s0, r0, ns, rows = 2**31 - 1, 2**31 - 2, 3, 4
    eps = rng.normal(seed, step, pid, s0, ns, (rows, cols), first_row=r0)
    s, r, c = torch.meshgrid(torch.arange(ns), torch.arange(rows), torch.arange(cols),
                             indexing="ij")  # fmt: skip
    ctr = torch.stack((c // 4, r + r0, s + s0, torch.full_like(c, step)), -1).view(-1, 4)
    key = torch.tensor([[seed, pid]]).expand(ctr.shape[0], 2)
    lanes = _native_normals(lib, ctr, key)
    expected = lanes.gather(1, (c % 4).reshape(-1, 1)).view(ns, rows, cols)
    assert torch.equal(eps, expected)


def test_threads_do_not_change_results(lib):
    ns, rows, cols = 8, 96, 130  # > 2 * 32768 normals: two threads take part
    a, b = torch.empty(ns, rows, cols), torch.empty(ns, rows, cols)
    lib.normal(a.data_ptr(), 1, 2, 3, 4, ns, 5, rows, cols, 1)
    lib.normal(b.data_ptr(), 1, 2, 3, 4, ns, 5, rows, cols, 2)
    assert torch.equal(a, b)
    g = torch.randn(ns, rows, cols)
    acc1, acc2 = torch.ones(rows, cols), torch.ones(rows, cols)
    lib.eps_dot(acc1.data_ptr(), g.data_ptr(), 1, 2, 3, 4, ns, 0, rows, cols, 1)
    lib.eps_dot(acc2.data_ptr(), g.data_ptr(), 1, 2, 3, 4, ns, 0, rows, cols, 2)
    assert torch.equal(acc1, acc2)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISA variants")
def test_isa_variants_agree(lib, tmp_path):
    """The AVX-512, AVX2 and portable Philox loops give the same numbers."""
    cc, src = _native.compiler(), _native.source_dir()
    ns, rows, cols = 2, 3, 333
    ref = torch.empty(ns, rows, cols)
    lib.normal(ref.data_ptr(), 7, 8, 9, 10, ns, 11, rows, cols, 1)
    for i, extra in enumerate((["-mno-avx512f"], ["-DSPAR_PORTABLE_PHILOX"])):
        so = tmp_path / f"variant{i}.so"
        cmd = [*cc, *_native.BASE_FLAGS, "-march=native", *extra, "-I", str(src),
               str(src / "spar_cpu.c"), "-o", str(so)]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
        variant = _native.Library(ctypes.CDLL(str(so)), so, True)
        assert variant.self_test() is None
        out = torch.empty(ns, rows, cols)
        variant.normal(out.data_ptr(), 7, 8, 9, 10, ns, 11, rows, cols, 1)
        assert torch.equal(out, ref), extra


_CUDA_SRC = """
#include "philox.h"
__global__ void normals(float *out, unsigned seed, unsigned pid) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    spar_f32x4 n = spar_normal4(i, 1u, 2u, 3u, seed, pid);
    out[4 * i] = n.x; out[4 * i + 1] = n.y; out[4 * i + 2] = n.z; out[4 * i + 3] = n.w;
}
"""

_CPP_SRC = """
#include <cstdio>
#include "philox.h"
int main() {
    for (unsigned i = 0; i < 64; ++i) {
        spar_f32x4 n = spar_normal4(i * 77777u, 1u, 2u, 3u, 0xDEADBEEFu, 12345u);
        std::printf("%a %a %a %a\\n", n.x, n.y, n.z, n.w);
    }
}
"""


def test_header_is_usable_from_cpp_and_cuda(lib, tmp_path):
    """philox.h compiles as C++ (the same numbers as the C library) and, where nvcc
    exists, as CUDA (__host__ __device__)."""
    src = _native.source_dir()
    cxx = next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if cxx is not None:
        (tmp_path / "t.cpp").write_text(_CPP_SRC)
        exe = tmp_path / "t"
        subprocess.run([cxx, "-O2", "-ffp-contract=off", "-fno-math-errno", "-I", str(src),
                        str(tmp_path / "t.cpp"), "-o", str(exe)], check=True)  # fmt: skip
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
        got = torch.tensor([[float.fromhex(v) for v in line.split()] for line in out.splitlines()])
        c0 = torch.arange(64) * 77777
        ctr = torch.stack((c0, *(torch.full_like(c0, v) for v in (1, 2, 3))), dim=1)
        key = torch.tensor([[0xDEADBEEF, 12345]]).expand(64, 2)
        assert torch.equal(got, _native_normals(lib, ctr, key))
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        (tmp_path / "t.cu").write_text(_CUDA_SRC)
        subprocess.run([nvcc, "-I", str(src), "-c", str(tmp_path / "t.cu"), "-o",
                        str(tmp_path / "t.o")], check=True, timeout=300)  # fmt: skip
    if cxx is None and nvcc is None:
        pytest.skip("no C++ or CUDA compiler")


def test_one_openmp_runtime_in_the_process(lib):
    """The library binds to the libgomp torch already loaded: one thread pool. Checked in a
    fresh process that imports only torch and spar (other packages, scikit-learn for one,
    bring their own libgomp into the test process)."""
    if not Path("/proc/self/maps").exists() or not lib.openmp:
        pytest.skip("Linux with an OpenMP build only")
    code = (
        "import json, re, torch\n"
        "from spar import _native, rng\n"
        "assert _native.get() is not None, _native.error()\n"
        "rng.normal(1, 2, 3, 0, 4, (256, 512))\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(json.dumps(sorted(set(re.findall(r'\\S*libgomp[^/\\s]*\\.so[.\\d]*', maps)))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout  # fmt: skip
    gomps = json.loads(out.strip().splitlines()[-1])
    assert len(gomps) == 1, gomps


# --- sample and eps_dot against the eager generator ----------------------------------------


SHAPES = [(64, 128), (7, 3, 2), (5,), (1, 1), (3, 1030)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sample_matches_eager(lib, monkeypatch, shape, dtype):
    mu, sig = torch.randn(shape), torch.rand(shape) + 0.1
    args = (3, 2**31 + 4, 5, 2, 3)
    monkeypatch.setenv("SPAR_RNG", "native")
    w = rng.sample(*args, mu, sig, dtype=dtype)
    w0 = rng.sample(*args, None, sig, dtype=dtype)
    monkeypatch.setenv("SPAR_RNG", "eager")
    ref = rng.sample(*args, mu, sig, dtype=dtype)
    ref0 = rng.sample(*args, None, sig, dtype=dtype)
    assert w.shape == ref.shape == (3, *shape) and w.dtype == ref.dtype == dtype
    tol = {} if dtype == torch.bfloat16 else dict(rtol=0, atol=1e-5)
    torch.testing.assert_close(w, ref, **tol)
    torch.testing.assert_close(w0, ref0, **tol)


def test_sample_non_contiguous_and_grad_inputs(lib, monkeypatch):
    mu = torch.randn(40, 30, requires_grad=True)
    sig = (torch.rand(30, 40) + 0.1).t()  # non-contiguous (40, 30)
    monkeypatch.setenv("SPAR_RNG", "native")
    w = rng.sample(1, 2, 3, 0, 4, mu, sig)
    eps = rng.normal(1, 2, 3, 0, 4, (40, 30))
    torch.testing.assert_close(w, mu.detach() + sig * eps, rtol=0, atol=0)
    assert not w.requires_grad


@pytest.mark.parametrize("shape", SHAPES)
def test_eps_dot_matches_eager(lib, monkeypatch, shape):
    S = 6
    g = torch.randn(S, *shape)
    out0 = torch.randn(shape)
    monkeypatch.setenv("SPAR_RNG", "native")
    ours = rng.eps_dot(9, 8, 7, 5, S, g, out0.clone())
    eps = rng.normal(9, 8, 7, 5, S, shape)
    monkeypatch.setenv("SPAR_RNG", "eager")
    ref = rng.eps_dot(9, 8, 7, 5, S, g, out0.clone())
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, out0 + (g * eps).sum(0), rtol=1e-5, atol=1e-5)


def test_eps_dot_dtypes_layouts_and_key(lib, native):
    S, shape = 4, (20, 9)
    g = torch.randn(S, *shape, dtype=torch.float64)
    eps = rng.normal(1, 2, 3, 10, S, shape).double()
    # float64 (gradcheck): torch does the arithmetic in float64, with the same (native) noise
    out64 = rng.eps_dot(1, 2, 3, 10, S, g, torch.zeros(shape, dtype=torch.float64))
    torch.testing.assert_close(out64, (g * eps).sum(0))
    mu, sig = torch.randn(shape, dtype=torch.float64), torch.rand(shape, dtype=torch.float64)
    torch.testing.assert_close(rng.sample(1, 2, 3, 10, S, mu, sig), mu + sig * eps)
    # a non-contiguous fp32 accumulator is updated in place
    acc = torch.zeros(shape[::-1]).t()
    res = rng.eps_dot(1, 2, 3, 10, S, g.float(), acc)
    assert res is acc
    torch.testing.assert_close(acc, (g * eps).sum(0).float(), rtol=1e-5, atol=1e-5)
    # the key's method: local samples [1, 3) of a key starting at global sample 9, tensor step
    key = rng.NoiseKey(1, torch.tensor(2), 9, 4)
    a = key.eps_dot(3, g[:2].float(), torch.zeros(shape), samples=(1, 3))
    b = rng.eps_dot(1, 2, 3, 10, 2, g[:2].float(), torch.zeros(shape))
    assert torch.equal(a, b)
    assert torch.equal(key.normal(3, shape, samples=(1, 3)), rng.normal(1, 2, 3, 10, 2, shape))
    with pytest.raises(ValueError, match="samples"):
        rng.eps_dot(1, 2, 3, 10, 3, g.float(), torch.zeros(shape))


def test_native_mode_is_used_and_eager_mode_is_not(lib, monkeypatch):
    calls = []
    real = lib.normal
    monkeypatch.setattr(lib, "normal", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("SPAR_RNG", "native")
    rng.normal(1, 1, 1, 0, 1, (2, 2))
    monkeypatch.setenv("SPAR_RNG", "eager")
    rng.normal(1, 1, 1, 0, 1, (2, 2))
    assert len(calls) == 1
    monkeypatch.setenv("SPAR_RNG", "bogus")
    with pytest.raises(ValueError, match="SPAR_RNG"):
        rng.normal(1, 1, 1, 0, 1, (2, 2))


# --- the build cache -----------------------------------------------------------------------


def _cached_path(cache: Path) -> Path:
    return cache / f"spar_cpu-{_native.cache_key(_native.compiler(), _native.source_dir())}.so"


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPAR_CACHE_DIR", str(tmp_path / "x"))
    assert _env.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("SPAR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _env.cache_dir() == tmp_path / "xdg" / "spar"


def test_unwritable_cache_dir_falls_back_to_a_temporary_one(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    got = _native._writable_dir(blocked / "spar")
    assert got.is_dir() and Path(tempfile.gettempdir()) in got.parents


def test_second_load_reuses_the_build(tmp_path):
    first = _native.load(tmp_path)
    path = _cached_path(tmp_path)
    assert first.built and first.path == path and path.is_file()
    mtime = path.stat().st_mtime_ns
    second = _native.load(tmp_path)
    assert not second.built and second.path == path
    assert path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".lock"]


@pytest.mark.parametrize("content", [b"", b"\x7fELF not really a library"])
def test_corrupt_cached_library_is_rebuilt(tmp_path, content):
    path = _cached_path(tmp_path)
    path.write_bytes(content)
    lib = _native.load(tmp_path)
    assert lib.built and lib.self_test() is None
    assert path.stat().st_size > 1000
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


_STANDALONE = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("spar_native_standalone", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
print("built" if mod.load(sys.argv[2]).built else "loaded")
"""


def test_concurrent_first_builds_are_safe(tmp_path):
    """Ranks starting together: one builds, the others wait and load its file."""
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-c", _STANDALONE, _native.__file__, str(cache)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]  # fmt: skip
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    outcomes = sorted(out.strip() for out, _ in results)
    assert outcomes == ["built", "loaded", "loaded"], outcomes
    assert [p.name for p in cache.glob("*.so")] == [_cached_path(cache).name]
    assert not list(cache.glob(".*.tmp"))


_NO_COMPILER = """
import os, warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from spar import _native, rng
    mu, sig = torch.zeros(3, 5), torch.ones(3, 5)
    a = rng.normal(1, 2, 3, 0, 2, (3, 5))
    w = rng.sample(1, 2, 3, 0, 2, mu, sig)
    rng.normal(1, 2, 3, 0, 2, (3, 5))
ours = [w for w in caught if issubclass(w.category, RuntimeWarning) and "native" in str(w.message)]
assert len(ours) == 1, [str(w.message) for w in caught]
assert "no C compiler" in str(ours[0].message), ours[0].message
assert _native.get() is None
os.environ["SPAR_RNG"] = "eager"
assert torch.equal(a, rng.normal(1, 2, 3, 0, 2, (3, 5)))
assert torch.equal(w, a)
os.environ["SPAR_RNG"] = "native"
try:
    rng.normal(1, 2, 3, 0, 2, (3, 5))
except RuntimeError as e:
    assert "SPAR_RNG=native" in str(e)
else:
    raise AssertionError("SPAR_RNG=native without a compiler must raise")
print("OK")
"""


def test_missing_compiler_falls_back_to_eager_with_one_warning(tmp_path):
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "SPAR_CACHE_DIR": str(tmp_path)}
    env.pop("SPAR_RNG", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_NO_COMPILER)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
