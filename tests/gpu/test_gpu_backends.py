"""The backends agree on the device of this run (I1, I2), checked where it matters: on a
GPU with the Triton kernels compiled (``bench/gpu_check.sh``), and on the CPU under the
interpreter with tiny shapes everywhere else (see ``conftest.py``).

* every primitive the Triton backend implements (:func:`spar.ops.dispatch.implemented`,
  read when the tests are collected: a kernel added later is checked without editing this
  file, or the test says which case to add) against the torch backend, forward and
  gradients;
* every estimator (reparam, lrt, flipout) of the public ops, linear and 2-D conv, fp32 and
  bf16: Triton against the torch backend against :mod:`spar.ops.reference` with the noise
  passed in (tolerance policy of ``tests/ops/tolerance.py``);
* the Philox integers generated inside a Triton kernel are those of :mod:`spar.rng`, bit
  for bit, on this device;
* a ``bayesianize``d CNN through :class:`spar.nn.MonteCarlo`: forward and backward agree
  across backends (and, on a GPU, with the torch backend on the CPU);
* ``torch.compile`` of Bayesian layers on this device gives eager's outputs and gradients
  (inductor on a GPU; dynamo with the ``eager`` backend on the CPU, where inductor's C++
  build would take most of the folder's time budget).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

import spar
from spar import rng
from spar.ops import ESTIMATORS, bayes_conv, bayes_linear, dispatch, reference
from spar.ops.backends.triton._utils import as_i32, normal_tile, philox_key, philox_tile
from spar.rng import NoiseKey
from tests.gpu.conftest import DEVICE, ON_GPU, SIZES
from tests.ops.tolerance import assert_close, assert_close_lowp, max_error

WID, BID = rng.param_id("gpu.weight"), rng.param_id("gpu.bias")
NOISE_IDS = (rng.param_id("gpu#in"), rng.param_id("gpu#out"))
NAMES = ("y", "x", "weight_mu", "weight_rho", "bias_mu", "bias_rho")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# normals: Triton's Box-Muller against torch's. The interpreter's numpy float32 log/sin/cos
# differ from torch's by a few ulp; on a GPU tl.log/tl.cos/tl.sin may lower to the
# approximate PTX instructions (|error| ~ 2**-21 of the argument range), a few times more.
NORMAL_ATOL = 2e-5 if ON_GPU else 4e-6
# the Triton primitives at collection time (importing the backend registers them)
TRITON_PRIMITIVES = dispatch.implemented("triton")


def _key(S: int, seed: int = 0) -> NoiseKey:
    # first_sample, data_offset and a step above 2**31 exercise every counter
    return NoiseKey(seed=4242 + seed, step=2_500_000_001, first_sample=3, num_samples=S,
                    data_offset=7)  # fmt: skip


def _randn(*shape, g, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=g) * scale + shift).to(DEVICE)


def _run(fn, inputs, dy_seed=1, cast=None):
    """``[y, *grads]`` of ``fn(*inputs)`` (None for absent inputs); ``cast`` converts the
    floating inputs first (the converted tensors are the leaves)."""
    leaves = []
    for t in inputs:
        if t is None:
            leaves.append(None)
            continue
        t = t.detach().clone()
        leaves.append((cast(t) if cast else t).requires_grad_())
    y = fn(*leaves)
    g = torch.Generator().manual_seed(dy_seed)
    dy = torch.randn(y.shape, generator=g).to(DEVICE, y.dtype)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, present, dy))
    return [y.detach()] + [None if t is None else next(grads) for t in leaves]


def _with_backend(monkeypatch, backend: str, fn):
    """``fn`` run with ``SPAR_BACKEND=backend`` (left set for its backward, which runs
    before the next call sets another)."""

    def call(*args):
        monkeypatch.setenv("SPAR_BACKEND", backend)
        return fn(*args)

    return call


# --------------------------------------------------------------------------- the device


def test_the_run_is_on_the_device_it_asked_for():
    """``SPAR_TEST_DEVICE=cuda`` must not quietly turn into a CPU run; on a GPU the public
    ops pick Triton by themselves (``SPAR_BACKEND=auto``)."""
    if os.environ.get("SPAR_TEST_DEVICE", "").lower() == "cuda":
        assert ON_GPU
    from spar.ops.backends.triton._utils import interpret

    assert interpret() == (not ON_GPU)
    # triton's own reading of TRITON_INTERPRET ("0" is off; triton >= 3.4 has knobs)
    knobs = getattr(getattr(triton, "knobs", None), "runtime", None)
    if knobs is not None:
        assert bool(knobs.interpret) == (not ON_GPU)
    assert dispatch.available_backends()["triton"] is None
    if ON_GPU:
        assert dispatch.backend_for("sampled_linear", DEVICE) == "triton"
        assert "sampled_linear" in TRITON_PRIMITIVES


# --------------------------------------------------------------------------- primitives


def _primitive_case(name: str, key: NoiseKey, shared: int):
    """``(inputs, call(fn, *inputs), reduction)`` for one primitive, or None if unknown.
    The signatures are those :func:`spar.ops._estimate` calls them with."""
    s = SIZES
    g = torch.Generator().manual_seed(11)
    rows = s.B if shared else s.S * s.B
    if name == "sampled_linear":
        x = _randn(rows, s.K, g=g)
        mu = _randn(s.N, s.K, g=g, scale=0.5)
        rho = _randn(s.N, s.K, g=g, scale=0.5, shift=-1.0)
        return (x, mu, rho), lambda f, *t: f(*t, key, WID, shared), s.K * s.S * s.B
    if name == "sampled_conv":
        cg = (s.C + 1) // 2  # channels per group, 2 groups
        x = _randn(rows, 2 * cg, s.HW, s.HW, g=g)
        mu = _randn(2 * s.O, cg, 3, 3, g=g, scale=0.5)
        rho = _randn(2 * s.O, cg, 3, 3, g=g, scale=0.5, shift=-1.0)
        # (groups, *stride, *padding, *dilation): groups 2, stride 2, padding 1, dilation 1
        static = (2, 2, 2, 1, 1, 1, 1)
        red = cg * 9 * s.S * s.B * s.HW * s.HW
        return (x, mu, rho), lambda f, *t: f(*t, key, WID, shared, *static), red
    if name == "lrt_noise":
        var = _randn(rows, s.N, g=g).square() + 0.1
        return (var,), lambda f, *t: f(*t, key, NOISE_IDS[0], shared), s.S
    if name == "sign_mul":
        x = _randn(rows, s.C, s.HW, g=g)
        return (x,), lambda f, *t: f(*t, key, NOISE_IDS[0], shared), s.S
    if name == "normal":
        like = torch.zeros(s.N, device=DEVICE)
        return (like,), lambda f, *t: f(*t, key, BID, s.N, 2), 1
    return None


@pytest.mark.parametrize("shared", [0, 1], ids=["folded", "shared"])
@pytest.mark.parametrize("primitive", dispatch.PRIMITIVES)
def test_triton_primitive_matches_torch_backend(monkeypatch, primitive, shared):
    """Each primitive Triton implements, called directly on both backends: outputs and
    input gradients within the fp32 policy (``normal``: the noise itself)."""
    if primitive not in TRITON_PRIMITIVES:
        pytest.skip(f"{primitive} has no Triton kernel (it runs on the torch backend)")
    key = _key(SIZES.S)
    case = _primitive_case(primitive, key, shared)
    if case is None:
        pytest.fail(f"Triton implements {primitive!r}, which this test has no case for: add "
                    "one to _primitive_case (its signature is the one spar.ops calls)")  # fmt: skip
    inputs, call, red = case
    fns = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("SPAR_BACKEND", backend)
        assert dispatch.backend_for(primitive, DEVICE) == backend
        fns[backend] = dispatch.resolve(primitive, DEVICE)
    if primitive == "normal":
        if shared:
            pytest.skip("normal has no shared form")
        a, b = (call(fns[bk], *inputs) for bk in ("triton", "torch"))
        assert a.shape == b.shape == (SIZES.S, SIZES.N, 2)
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=NORMAL_ATOL)
        return
    ours = _run(_with_backend(monkeypatch, "triton", lambda *t: call(fns["triton"], *t)), inputs)
    other = _run(_with_backend(monkeypatch, "torch", lambda *t: call(fns["torch"], *t)), inputs)
    if primitive == "sign_mul":  # exact: a sign flip rounds nothing
        for a, b in zip(ours, other, strict=True):
            assert torch.equal(a, b)
        return
    for i, (a, b) in enumerate(zip(ours, other, strict=True)):
        # the output sums `red` terms; gradients of the weights sum every sample's rows
        assert_close(a, b, reduction=red, msg=f"{primitive} tensor {i}")


# --------------------------------------------------------------------------- estimators


def _linear_inputs(dtype, shared, seed=0):
    s = SIZES
    g = torch.Generator().manual_seed(seed)
    x = _randn(s.B if shared else s.S * s.B, s.K, g=g).to(dtype)
    mu = _randn(s.N, s.K, g=g, scale=s.K**-0.5)
    rho = _randn(s.N, s.K, g=g, scale=0.5, shift=-1.5)
    bmu = _randn(s.N, g=g, scale=0.1)
    brho = _randn(s.N, g=g, scale=0.5, shift=-1.5)
    return x, mu, rho, bmu, brho


def _conv_inputs(dtype, shared, seed=0):
    s = SIZES
    g = torch.Generator().manual_seed(seed)
    x = _randn(s.B if shared else s.S * s.B, s.C, s.HW, s.HW, g=g).to(dtype)
    mu = _randn(s.O, s.C, 3, 3, g=g, scale=(9 * s.C) ** -0.5)
    rho = _randn(s.O, s.C, 3, 3, g=g, scale=0.5, shift=-1.5)
    bmu = _randn(s.O, g=g, scale=0.1)
    brho = _randn(s.O, g=g, scale=0.5, shift=-1.5)
    return x, mu, rho, bmu, brho


CONV_GEO = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)


def _public(op, key, estimator, shared):
    def fn(x, mu, rho, bmu, brho):
        kw = dict(weight_id=WID, bias_id=BID, estimator=estimator, shared_input=shared,
                  noise_ids=NOISE_IDS)  # fmt: skip
        if op == "linear":
            return bayes_linear(x, mu, rho, bmu, brho, key, **kw)
        return bayes_conv(x, mu, rho, bmu, brho, key, **kw, **CONV_GEO)

    return fn


def _reference(op, key, estimator, shared):
    """The estimator with its noise drawn from the key by :mod:`spar.rng` (on the CPU, then
    moved) and passed in explicitly."""
    S = key.num_samples

    def fn(x, mu, rho, bmu, brho):
        if shared:
            x = x.unsqueeze(0).expand(S, *x.shape).flatten(0, 1)
        B = x.shape[0] // S

        def noise(pid, shape, **kw):
            return key.normal(pid, shape, **kw).to(x.device)

        def example_noise(pid, like):  # per-example noise, keyed by the global row
            return noise(pid, (B, *like.shape[1:]), first_row=key.data_offset).flatten(0, 1)

        def sign(pid, like):
            return torch.where(example_noise(pid, like) >= 0, 1.0, -1.0).to(x.dtype)

        eps_w = noise(WID, mu.shape).to(rho.dtype)
        eps_b = noise(BID, bmu.shape).to(rho.dtype)
        if op == "linear":
            if estimator == "reparam":
                return reference.linear_reparam(x, mu, rho, bmu, brho, eps_w, eps_b)
            out = F.linear(x[:B], mu.to(x.dtype))
            if estimator == "lrt":
                eps = example_noise(NOISE_IDS[0], out).to(x.dtype)
                return reference.linear_lrt(x, mu.to(x.dtype), rho, bmu.to(x.dtype), brho, eps)
            return reference.linear_flipout(
                x,
                mu.to(x.dtype),
                rho,
                bmu,
                brho,
                eps_w,
                eps_b,
                sign(NOISE_IDS[0], x),
                sign(NOISE_IDS[1], out),
            )
        conv = F.conv2d
        if estimator == "reparam":
            return reference.conv_reparam(conv, x, mu, rho, bmu, brho, eps_w, eps_b, **CONV_GEO)
        out = conv(x[:B], mu.to(x.dtype), None, **CONV_GEO)
        if estimator == "lrt":
            eps = example_noise(NOISE_IDS[0], out).to(x.dtype)
            return reference.conv_lrt(conv, x, mu.to(x.dtype), rho, bmu.to(x.dtype), brho, eps,
                                      **CONV_GEO)  # fmt: skip
        return reference.conv_flipout(conv, x, mu.to(x.dtype), rho, bmu, brho, eps_w, eps_b,
                                      sign(NOISE_IDS[0], x), sign(NOISE_IDS[1], out),
                                      **CONV_GEO)  # fmt: skip

    return fn


def _reductions(op, shared):
    """Terms summed into one element of ``y, dx, dmu, drho, dbmu, dbrho``."""
    s = SIZES
    if op == "linear":
        return (s.K, s.N * (s.S if shared else 1), *[s.S * s.B] * 4)
    positions = s.HW * s.HW
    return (9 * s.C, 9 * s.O * (s.S if shared else 1), *[s.S * s.B * positions] * 4)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("op", ["linear", "conv"])
def test_estimators_agree_triton_torch_reference(monkeypatch, op, estimator, dtype):
    """Public op on Triton, on the torch backend and the reference with injected noise:
    fp32 within the fp32 policy of each other; bf16 input (fp32 parameters): Triton within
    twice the error of torch's bf16 math against fp64 (lowp policy)."""
    dt = DTYPES[dtype]
    shared = estimator != "reparam" and op == "linear"  # the first-layer form, for variety
    key = _key(SIZES.S, seed=1)
    make = _linear_inputs if op == "linear" else _conv_inputs
    inputs = make(dt, shared)
    red = _reductions(op, shared)
    ours = _run(_with_backend(monkeypatch, "triton", _public(op, key, estimator, shared)), inputs)
    other = _run(_with_backend(monkeypatch, "torch", _public(op, key, estimator, shared)), inputs)
    ref_fn = _reference(op, key, estimator, shared)
    assert ours[0].dtype == dt and ours[0].device.type == DEVICE.type
    if dt == torch.float32:
        ref = _run(ref_fn, inputs)
        for what, expected in (("reference", ref), ("torch backend", other)):
            for name, a, e, n in zip(NAMES, ours, expected, red, strict=True):
                assert_close(a, e, reduction=n, msg=f"{op} {estimator} triton vs {what}: {name}")
        return
    ref64 = _run(ref_fn, inputs, cast=lambda t: t.double())
    # the baseline error of torch's bf16 math: the reference in bf16 throughout (parameters
    # too), or the torch backend, which runs the same estimator graph with torch ops,
    # whichever is larger. (Shared-input lrt/flipout round dmu twice, once in the bf16 sum
    # over samples of the mean GEMM's dy and once in the GEMM: ~2.2x the one-GEMM error on
    # both backends. The torch backend's own bf16 accuracy is tests/ops' business.)
    lowp = _run(ref_fn, inputs, cast=lambda t: t.to(dt))
    for name, a, r, lp, tb, n in zip(NAMES, ours, ref64, lowp, other, red, strict=True):
        if a is None:
            continue
        base = lp if max_error(lp, r) >= max_error(tb, r) else tb
        assert_close_lowp(a, r, base, dtype=dt, reduction=n, msg=f"{op} {estimator} {name}")


@pytest.mark.parametrize("path", ["fused", "chunked"])
def test_linear_paths_agree(monkeypatch, path):
    """Both Triton linear paths (fused noise in the GEMM; sampled chunk + bmm) against the
    torch backend, fp32, reparam and flipout (the two estimators that sample weights)."""
    monkeypatch.setenv("SPAR_LINEAR_PATH", path)
    monkeypatch.setenv("SPAR_CHUNK_NUMEL", str(2 * SIZES.N * SIZES.K))  # several chunks
    key = _key(SIZES.S, seed=2)
    inputs = _linear_inputs(torch.float32, False, seed=2)
    red = _reductions("linear", False)
    for estimator in ("reparam", "flipout"):
        fn = _public("linear", key, estimator, False)
        ours = _run(_with_backend(monkeypatch, "triton", fn), inputs)
        other = _run(_with_backend(monkeypatch, "torch", fn), inputs)
        for name, a, e, n in zip(NAMES, ours, other, red, strict=True):
            assert_close(a, e, reduction=n, msg=f"{path} {estimator}: {name}")


# --------------------------------------------------------------------------- noise bits


@triton.jit
def _philox_probe_kernel(ints_ptr, normals_ptr, R, C, key, sample, step,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """Raw Philox lanes (column order) and normals of one sample's (R, C) noise array,
    drawn by spar's own tile functions."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    sample_u = sample.to(tl.uint32, bitcast=True)
    step_u = step.to(tl.uint32, bitcast=True)
    i0, i1, i2, i3 = philox_tile(key, rows.to(tl.uint32), sample_u, pid_c * BLOCK_C, step_u,
                                 BLOCK_R, BLOCK_C)  # fmt: skip
    ints = tl.interleave(tl.interleave(i0, i2), tl.interleave(i1, i3))
    off = rows.to(tl.int64)[:, None] * C + cols[None, :]
    tl.store(ints_ptr + off, ints.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    normals = normal_tile(key, rows.to(tl.uint32), sample_u, pid_c * BLOCK_C, step_u,
                          BLOCK_R, BLOCK_C)  # fmt: skip
    tl.store(normals_ptr + off, normals, mask=mask)


@pytest.mark.parametrize("block", [(4, 16), (16, 64)], ids=["4x16", "16x64"])
def test_kernel_philox_integers_bit_exact_on_device(block):
    """I1 on this device: the integers are spar.rng's bit for bit for any tile shape; the
    normals within a few ulp."""
    seed, pid = 0xDEADBEEF, rng.param_id("gpu.probe")
    R, C = (37, 301) if ON_GPU else (5, 37)
    sample, step = 2_500_000_000, 3_000_000_007
    ints = torch.zeros((R, C), dtype=torch.int64, device=DEVICE)
    normals = torch.zeros((R, C), device=DEVICE)
    grid = (triton.cdiv(R, block[0]), triton.cdiv(C, block[1]))
    _philox_probe_kernel[grid](ints, normals, R, C, philox_key(seed, pid), as_i32(sample),
                               as_i32(step), BLOCK_R=block[0], BLOCK_C=block[1])  # fmt: skip
    cols = torch.arange(C, dtype=torch.int64)
    rows = torch.arange(R, dtype=torch.int64)[:, None]
    c0, c1 = torch.broadcast_tensors(cols[None, :] // 4, rows)
    lanes = rng.philox(c0, c1, torch.full_like(c0, sample), torch.full_like(c0, step), seed, pid)
    expected = torch.gather(torch.stack(lanes, -1), -1, (cols % 4).expand(R, C)[..., None])[..., 0]
    assert torch.equal(ints.cpu(), expected)
    ref = rng.normal(seed, step, pid, sample, 1, (R, C))[0]
    torch.testing.assert_close(normals.cpu().double(), ref.double(), rtol=0, atol=NORMAL_ATOL)


# --------------------------------------------------------------------------- a whole model


def _cnn(estimator: str) -> nn.Module:
    torch.manual_seed(5)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * (SIZES.cnn_hw // 2) ** 2, 16), nn.ReLU(), nn.Linear(16, 5),
    )  # fmt: skip
    return spar.nn.bayesianize(net, init_sigma=0.1, estimator=estimator)


def _cnn_step(monkeypatch, backend: str, device: torch.device, estimator: str):
    monkeypatch.setenv("SPAR_BACKEND", backend)
    mc = spar.nn.MonteCarlo(_cnn(estimator), 3, seed=9).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, SIZES.cnn_hw, SIZES.cnn_hw, generator=g).to(device)
    y = torch.randint(0, 5, (4,), generator=g).to(device)
    out = mc(x)  # (S, B, 5)
    loss = spar.losses.elbo(out, y, kl=spar.nn.kl_divergence(mc), dataset_size=100)
    loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in mc.named_parameters()}
    return out.detach().cpu(), grads


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_bayesianized_cnn_forward_backward_agree_across_backends(monkeypatch, estimator):
    """``bayesianize`` + ``MonteCarlo``: outputs and every parameter's gradient agree between
    the Triton and torch backends on this device (and the torch backend on the CPU when the
    device is a GPU). Gradients are of the mean-over-samples ELBO."""
    ours = _cnn_step(monkeypatch, "triton", DEVICE, estimator)
    others = {"torch backend": _cnn_step(monkeypatch, "torch", DEVICE, estimator)}
    if ON_GPU:
        others["torch backend on the CPU"] = _cnn_step(
            monkeypatch, "torch", torch.device("cpu"), estimator
        )
    # terms per element: the widest fan-in along the path for outputs, every sample's and
    # position's rows for the gradients (several layers deep: 4x the one-layer count)
    hw = SIZES.cnn_hw
    out_terms = 4 * max(9 * 6, 8 * (hw // 2) ** 2)
    grad_terms = 4 * 3 * 4 * hw * hw
    for what, (out, grads) in others.items():
        assert_close(ours[0], out, reduction=out_terms, msg=f"{estimator} vs {what}: output")
        assert ours[1].keys() == grads.keys()
        for name, gr in grads.items():
            assert_close(ours[1][name], gr, reduction=grad_terms,
                         msg=f"{estimator} vs {what}: grad {name}")  # fmt: skip


# --------------------------------------------------------------------------- torch.compile


def test_compiled_bayesian_layers_match_eager(monkeypatch):
    """``torch.compile(MonteCarlo(...), fullgraph=True)`` of a Bayesian model (conv +
    linear on a GPU, linear on the CPU) on this device (SPAR_BACKEND=auto: Triton on a
    GPU) gives eager's outputs and gradients over two training steps, and the second step
    does not recompile."""
    from torch._dynamo.testing import CompileCounterWithBackend

    if not ON_GPU:
        monkeypatch.setenv("SPAR_BACKEND", "triton")  # auto picks torch for CPU tensors
    torch._dynamo.reset()
    hw = SIZES.cnn_hw
    torch.manual_seed(1)
    # the interpreter runs a Triton conv at seconds per step: the CPU run compiles the
    # linear layers only (tests/ops/test_compile.py covers compiled convs on the CPU)
    stem = [
        spar.nn.BayesConv2d(3, 4, 3, padding=1, init_sigma=0.1, estimator="flipout"), nn.ReLU(),
        nn.Flatten(),
    ] if ON_GPU else [nn.Flatten()]  # fmt: skip
    width = (4 if ON_GPU else 3) * hw * hw
    net = nn.Sequential(
        *stem, spar.nn.BayesLinear(width, 6, init_sigma=0.1, estimator="reparam"), nn.ReLU(),
        spar.nn.BayesLinear(6, 3, init_sigma=0.1, estimator="lrt"),
    ).to(DEVICE)  # fmt: skip
    eager = spar.nn.MonteCarlo(net, 2, seed=3)
    compiled_net = spar.nn.MonteCarlo(
        nn.Sequential(*[m for m in net]).to(DEVICE), 2, seed=3
    )  # the same modules (parameters shared), its own step counter
    counter = CompileCounterWithBackend("inductor" if ON_GPU else "eager")
    compiled = torch.compile(compiled_net, fullgraph=True, backend=counter)
    x = torch.randn(3, 3, hw, hw, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    params = list(net.parameters())
    for step in range(2):
        outs, grads = [], []
        for model in (compiled, eager):
            out = model(x)
            outs.append(out.detach())
            grads.append(torch.autograd.grad(out.square().sum(), params))
        assert_close(outs[0], outs[1], reduction=width, msg=f"step {step}: output")
        for i, (a, b) in enumerate(zip(*grads, strict=True)):
            assert_close(a, b, reduction=2 * 3 * hw * hw * 4, msg=f"step {step}: grad {i}")
    assert counter.frame_count == 1, f"traced {counter.frame_count} graphs (a recompile)"
    assert math.isfinite(float(outs[0].sum()))
    torch._dynamo.reset()
