"""The cuda backend on a GPU (``bench/gpu_check.sh``, step ``cuda``): its kernels compiled by
NVRTC through CuPy, checked against the Triton kernels, the torch backend and the reference.

* the Philox integers of the CUDA generator are :mod:`spar.rng`'s bit for bit (known answers
  included), and its normals are the very bits of the CPU library (same ``philox.h``, no
  fma contraction), within a few ulp of Triton's;
* every primitive on ``SPAR_BACKEND=cuda`` against the torch backend and against Triton,
  outputs and input gradients;
* every estimator of the public ops, linear and 2-D conv, fp32 and bf16: cuda against the
  reference with the noise passed in (and the torch backend) under the tolerance policy,
  and against Triton;
* the backward is deterministic (the same call twice gives the same bits), kernels follow
  torch's current stream, and ``torch.compile`` (inductor) gives eager's results.

Off a GPU every test here is skipped: the cuda backend runs CUDA tensors only, and its CPU
checks are ``tests/ops/test_cuda_*.py`` (the host build of the same kernels). On a GPU
without CuPy the tests are skipped with the extra to install (the gpu_check step reports
NOT RUN).
"""

from __future__ import annotations

import pytest
import torch

from spar import rng
from spar.ops import ESTIMATORS, dispatch
from spar.rng import NoiseKey
from tests.gpu.conftest import DEVICE, ON_GPU, SIZES
from tests.gpu.test_gpu_backends import (
    DTYPES,
    NAMES,
    NORMAL_ATOL,
    WID,
    _conv_inputs,
    _key,
    _linear_inputs,
    _primitive_case,
    _public,
    _reductions,
    _reference,
    _run,
    _with_backend,
)
from tests.ops.tolerance import assert_close, assert_close_lowp, max_error
from tests.test_rng import KAT


def _cuda_unavailable() -> str | None:
    if not ON_GPU:
        return "the cuda backend runs on a GPU (its CPU checks: tests/ops/test_cuda_*.py)"
    error = dispatch.load_error("cuda")
    return None if error is None else f"the cuda backend does not load: {error}"


pytestmark = pytest.mark.skipif(_cuda_unavailable() is not None,
                                reason=str(_cuda_unavailable()))  # fmt: skip


def test_philox_integers_bit_exact():
    from spar.ops.backends.cuda import sample

    g = torch.Generator().manual_seed(0)
    ctr = torch.randint(0, 2**32, (4096, 4), dtype=torch.int64, generator=g)
    key = torch.randint(0, 2**32, (4096, 2), dtype=torch.int64, generator=g)
    for i, (c, k, _) in enumerate(KAT):
        ctr[i], key[i] = torch.tensor(c), torch.tensor(k)
    got = sample.philox(ctr.to(DEVICE), key.to(DEVICE)).cpu()
    assert torch.equal(got, torch.stack(rng.philox(*ctr.unbind(1), key[:, 0], key[:, 1]), 1))
    for i, (_, _, expected) in enumerate(KAT):
        assert tuple(got[i].tolist()) == expected


def test_normals_are_the_cpu_librarys_bits(monkeypatch):
    from spar.ops.backends.cuda import sample
    from spar.ops.backends.triton.sample import keyed_normal as triton_normal

    monkeypatch.setenv("SPAR_RNG", "native")
    key = _key(SIZES.S)
    shape = (SIZES.N, SIZES.K)
    got = sample.keyed_normal(key, WID, shape, DEVICE, first_row=5)
    assert torch.equal(got.cpu(), key.normal(WID, shape, first_row=5))
    tri = triton_normal(key, WID, shape, DEVICE, first_row=5)
    torch.testing.assert_close(got, tri, rtol=0, atol=NORMAL_ATOL)


@pytest.mark.parametrize("shared", [0, 1], ids=["folded", "shared"])
@pytest.mark.parametrize("primitive", dispatch.PRIMITIVES)
def test_primitive_matches_torch_and_triton(monkeypatch, primitive, shared):
    key = _key(SIZES.S)
    inputs, call, red = _primitive_case(primitive, key, shared)
    fns = {}
    for backend in ("cuda", "triton", "torch"):
        monkeypatch.setenv("SPAR_BACKEND", backend)
        assert dispatch.backend_for(primitive, DEVICE) == backend
        fns[backend] = dispatch.resolve(primitive, DEVICE)
    if primitive == "normal":
        if shared:
            pytest.skip("normal has no shared form")
        ours, tri = (call(fns[b], *inputs) for b in ("cuda", "triton"))
        torch.testing.assert_close(ours, tri, rtol=0, atol=NORMAL_ATOL)
        return
    results = {
        b: _run(_with_backend(monkeypatch, b, lambda *t, f=fns[b]: call(f, *t)), inputs)
        for b in ("cuda", "triton", "torch")
    }
    for other in ("torch", "triton"):
        for i, (a, b) in enumerate(zip(results["cuda"], results[other], strict=True)):
            if primitive == "sign_mul":  # a sign flip rounds nothing
                assert torch.equal(a, b), (other, i)
            else:
                assert_close(a, b, reduction=red, msg=f"{primitive} cuda vs {other}, tensor {i}")


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("op", ["linear", "conv"])
def test_estimators_agree_cuda_triton_reference(monkeypatch, op, estimator, dtype):
    """As the Triton backend's estimator check, for the cuda backend: fp32 within the
    policy of the reference, the torch backend and Triton; bf16 within twice torch's bf16
    error against fp64."""
    dt = DTYPES[dtype]
    shared = estimator != "reparam" and op == "linear"
    key = _key(SIZES.S, seed=1)
    inputs = (_linear_inputs if op == "linear" else _conv_inputs)(dt, shared)
    red = _reductions(op, shared)
    run = {b: _run(_with_backend(monkeypatch, b, _public(op, key, estimator, shared)), inputs)
           for b in ("cuda", "triton", "torch")}  # fmt: skip
    ours = run["cuda"]
    assert ours[0].dtype == dt and ours[0].device.type == "cuda"
    ref_fn = _reference(op, key, estimator, shared)
    if dt == torch.float32:
        expected = {"reference": _run(ref_fn, inputs), "torch": run["torch"],
                    "triton": run["triton"]}  # fmt: skip
        for what, exp in expected.items():
            for name, a, e, n in zip(NAMES, ours, exp, red, strict=True):
                assert_close(a, e, reduction=n, msg=f"{op} {estimator} cuda vs {what}: {name}")
        return
    ref64 = _run(ref_fn, inputs, cast=lambda t: t.double())
    lowp = _run(ref_fn, inputs, cast=lambda t: t.to(dt))
    for name, a, r, lp, tb, n in zip(NAMES, ours, ref64, lowp, run["torch"], red, strict=True):
        if a is None:
            continue
        base = lp if max_error(lp, r) >= max_error(tb, r) else tb
        assert_close_lowp(a, r, base, dtype=dt, reduction=n, msg=f"{op} {estimator} {name}")


def test_backward_is_deterministic_and_follows_the_current_stream(monkeypatch):
    key = _key(SIZES.S, seed=3)
    inputs = _conv_inputs(torch.float32, False, seed=3)
    fn = _with_backend(monkeypatch, "cuda", _public("conv", key, "reparam", False))
    first = _run(fn, inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        second = _run(fn, inputs)
    torch.cuda.current_stream().wait_stream(stream)
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), name


def test_compile_matches_eager(monkeypatch):
    monkeypatch.setenv("SPAR_BACKEND", "cuda")
    torch._dynamo.reset()
    key = NoiseKey(seed=5, step=torch.tensor(7), first_sample=0, num_samples=SIZES.S)
    inputs = _linear_inputs(torch.float32, True, seed=4)
    fn = _public("linear", key, "flipout", True)
    eager = _run(fn, inputs)
    compiled = _run(torch.compile(fn, fullgraph=True), inputs)
    for name, a, b, n in zip(NAMES, compiled, eager, _reductions("linear", True), strict=True):
        assert_close(a, b, reduction=n, msg=name)
