"""The cuda backend as the dispatcher sees it, without a GPU:

* ``SPAR_BACKEND=cuda`` without CuPy, with CuPy but no GPU, or with a CuPy that cannot use
  the GPU (built for a newer CUDA than the driver), raises one ``BackendUnavailable`` that
  names the extras (``spar[cuda12]`` / ``spar[cuda13]``);
  ``SPAR_BACKEND=auto`` skips the backend silently;
* ``import spar`` (and the backend's package and sources) imports no CuPy;
* end to end, in a fresh process where a stand-in CuPy module and a "GPU" let the backend
  register, and the host build of the kernels runs its launches on CPU tensors: every
  estimator of ``bayes_linear`` and ``bayes_conv`` with ``SPAR_BACKEND=cuda`` gives the
  torch backend's outputs and gradients, through the custom ops, eagerly and under
  ``torch.compile``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from spar.ops import dispatch

ROOT = Path(__file__).resolve().parents[2]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # only the type is read


@pytest.fixture
def fresh_cuda(monkeypatch):
    """Forget whether the cuda backend loaded, so that the test's import attempt counts."""
    monkeypatch.delitem(dispatch._LOAD_RESULTS, "cuda", raising=False)
    monkeypatch.delitem(sys.modules, "spar.ops.backends.cuda.register", raising=False)
    monkeypatch.setenv("SPAR_BACKEND", "cuda")


def _message(primitive: str = "sampled_linear") -> str:
    with pytest.raises(dispatch.BackendUnavailable) as err:
        dispatch.resolve(primitive, CUDA)
    return str(err.value)


def test_without_cupy_the_error_names_the_extras(fresh_cuda, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    msg = _message()
    assert msg.startswith("SPAR_BACKEND=cuda cannot run:") and "needs CuPy" in msg, msg
    assert "spar[cuda12]" in msg and "spar[cuda13]" in msg, msg
    assert "\n" not in msg


def test_without_a_gpu_the_error_says_so(fresh_cuda, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    msg = _message("lrt_noise")
    assert "needs a CUDA GPU" in msg and "torch sees no CUDA device" in msg, msg
    assert "spar[cuda12]" in msg and "spar[cuda13]" in msg, msg


def test_cupy_that_cannot_use_the_gpu_says_so(fresh_cuda, monkeypatch):
    def no_driver():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")

    runtime = types.SimpleNamespace(getDeviceCount=no_driver)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(
        runtime=runtime)))  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    msg = _message("sign_mul")
    assert "CuPy cannot use the GPU" in msg and "InsufficientDriver" in msg, msg
    assert "spar[cuda12]" in msg and "spar[cuda13]" in msg, msg


def test_auto_skips_an_unavailable_cuda_backend_silently(fresh_cuda, monkeypatch):
    monkeypatch.setenv("SPAR_BACKEND", "auto")
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setitem(dispatch._LOAD_RESULTS, "triton", "pretend triton is missing")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.backend_for("sampled_conv", CUDA, torch.float32) == "torch"
    assert dispatch.load_error("cuda") is not None


def test_import_spar_imports_no_cupy():
    code = (
        "import sys, spar, spar.nn, spar.ops\n"
        "import spar.ops.backends.cuda, spar.ops.backends.cuda.source\n"
        "spar.ops.backends.cuda.source.assemble()\n"
        "print('cupy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, check=True).stdout  # fmt: skip
    assert out.strip().splitlines()[-1] == "False"


_END_TO_END = r"""
import json, os, sys, types
import torch
# stands in for CuPy: the backend only asks it for the device count
runtime = types.SimpleNamespace(getDeviceCount=lambda: 1)
sys.modules["cupy"] = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))
available = torch.cuda.is_available
torch.cuda.is_available = lambda: True  # ... and a GPU, while the backend registers
import spar.ops.backends.cuda.register
torch.cuda.is_available = available  # (dynamo would query the fake GPU's RNG)
from pathlib import Path
from spar.ops import bayes_conv, bayes_linear, dispatch, ESTIMATORS
from spar.ops.backends.cuda import kernels
from spar.rng import NoiseKey
from tests.ops.test_cuda_host import host_runner, load_host

calls = []
kernels.host_runner = host_runner(load_host(Path(sys.argv[1])), calls)
os.environ["SPAR_RNG"] = "native"


def run(backend, fn, est, shared, compiled):
    os.environ["SPAR_BACKEND"] = backend
    torch._dynamo.reset()  # the backend is chosen at trace time
    g = torch.Generator().manual_seed(0)
    S, B = 3, 2
    key = NoiseKey(seed=11, step=torch.tensor(2_500_000_001), first_sample=2, num_samples=S,
                   data_offset=5)
    if fn == "linear":
        x = torch.randn(B if shared else S * B, 7, generator=g)
        shape, op = (5, 7), bayes_linear
        kw = {}
    else:
        x = torch.randn(B if shared else S * B, 4, 6, 6, generator=g)
        shape, op = (6, 2, 3, 3), bayes_conv
        kw = dict(stride=1, padding=1, dilation=1, groups=2)
    w_mu = (torch.randn(*shape, generator=g) * 0.3).requires_grad_()
    w_rho = (torch.randn(*shape, generator=g) - 3).requires_grad_()
    b_mu = torch.randn(shape[0], generator=g).requires_grad_()
    b_rho = (torch.randn(shape[0], generator=g) - 3).requires_grad_()
    x.requires_grad_()

    def f(x, w_mu, w_rho, b_mu, b_rho):
        return op(x, w_mu, w_rho, b_mu, b_rho, key, weight_id=3, bias_id=4, estimator=est,
                  shared_input=bool(shared), noise_ids=(8, 9), **kw)

    if compiled:
        f = torch.compile(f, backend="eager", fullgraph=True)
    y = f(x, w_mu, w_rho, b_mu, b_rho)
    y.backward(torch.randn(y.shape, generator=g))
    return [t.detach() for t in (y, x.grad, w_mu.grad, w_rho.grad, b_mu.grad, b_rho.grad)]


worst = 0.0
cases = 0
for fn in ("linear", "conv"):
    for est in ESTIMATORS:
        for shared in (0, 1):
            ref = run("torch", fn, est, shared, False)
            # torch.compile once (slow): flipout runs three of the backend's custom ops
            once = fn == "linear" and est == "flipout" and shared
            for compiled in (False, True) if once else (False,):
                n = len(calls)
                got = run("cuda", fn, est, shared, compiled)
                assert len(calls) > n, (fn, est, "no kernel ran")
                for a, b in zip(got, ref):
                    err = float(((a - b).abs() / (1e-5 + b.abs())).max())
                    worst = max(worst, err)
                cases += 1
print(json.dumps({
    "cases": cases, "worst": worst,
    "backend": dispatch.backend_for("sampled_linear", torch.device("cpu"), torch.float32),
    "kernels": sorted({c[0] for c in calls}),
}))
"""


def test_every_estimator_end_to_end_on_the_host_build(tmp_path):
    pytest.importorskip("tests.ops.test_cuda_host")
    from tests.ops.test_cuda_host import _compiler, build_host

    if _compiler() is None:
        pytest.skip("no C compiler")
    lib = build_host(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _END_TO_END, str(lib)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cases"] == 2 * 3 * 2 + 1
    assert result["backend"] == "cuda"
    # every kernel family ran: sampling, its backward, lrt, flipout's signs, the biases
    families = {k.rsplit("_", 1)[0] for k in result["kernels"]}
    assert {"spar_sample", "spar_sample_bwd", "spar_lrt_noise", "spar_sign_mul"} <= families
    # the same noise (bit for bit), fp32 rounding apart: relative to 1e-5 + |ref|
    assert result["worst"] < 1e-4, result


def test_launch_glue_with_a_stand_in_cupy(monkeypatch):
    """``kernels.launch`` on a "CUDA" device through a stand-in CuPy that records what it is
    asked: one ``RawModule`` per device, from the assembled source with the backend's
    options, every kernel looked up once; each launch inside the device guard and torch's
    current stream, with the grid, the block and the arguments as numpy scalars of the
    kernel's C types (pointers as addresses, NULL as 0, counters wrapped to 32 bits)."""
    import numpy as np

    from spar.ops.backends.cuda import kernels, source

    events, modules = [], []

    class Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            events.append(("device", self.index))

        def __exit__(self, *exc):
            events.append(("device exit", self.index))

    class Stream:
        @classmethod
        def from_external(cls, handle):
            s = cls()
            s.ptr = handle.__cuda_stream__()[1]
            return s

        def __enter__(self):
            events.append(("stream", self.ptr))

        def __exit__(self, *exc):
            events.append(("stream exit", self.ptr))

    class RawModule:
        def __init__(self, code, options):
            modules.append((code, options))
            self.looked_up = []

        def get_function(self, name):
            self.looked_up.append(name)
            return lambda grid, block, args: events.append(("launch", name, grid, block, args))

    cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=Device, Stream=Stream),
                                 RawModule=RawModule)  # fmt: skip
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(kernels, "_modules", {})
    monkeypatch.setattr(kernels, "_streams", {})
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: types.SimpleNamespace(cuda_stream=0xABC))  # fmt: skip
    out, mu = torch.empty(2, 3, 5), torch.zeros(3, 5)
    args = (out, mu, None, 3, 5, 2, 1, 2**32 + 7, 11, 2**33 + 5, 3, 0)
    dev = torch.device("cuda", 1)
    kernels.launch("spar_sample_f32", dev, (2, 2), args)
    kernels.launch("spar_sample_f32", dev, (0, 2), args)  # an empty grid launches nothing
    kernels.launch("spar_philox", dev, (1, 1), (out, mu, out, 4))
    assert len(modules) == 1 and modules[0] == (source.assemble(), source.NVRTC_OPTIONS)
    assert kernels._modules[1].raw.looked_up == list(source.SIGNATURES)
    launches = [e for e in events if e[0] == "launch"]
    assert len(launches) == 2
    _, name, grid, block, values = launches[0]
    assert name == "spar_sample_f32" and grid == (2, 2, 1) and block == (source.BLOCK, 1, 1)
    types_ = [type(v) for v in values]
    kinds = {source.PTR: np.uint64, source.I64: np.int64, source.U32: np.uint32}
    assert types_ == [kinds[k] for k in source.SIGNATURES["spar_sample_f32"]]
    assert [int(v) for v in values] == [out.data_ptr(), mu.data_ptr(), 0, 3, 5, 2, 1, 7, 11, 5,
                                        3, 0]  # fmt: skip
    i = events.index(launches[0])
    assert events[i - 2 : i] == [("device", 1), ("stream", 0xABC)]
    with pytest.raises(TypeError, match="takes 12 arguments, got 2"):
        kernels.launch("spar_sample_f32", dev, (1, 1), (out, mu))
