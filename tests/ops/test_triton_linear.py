"""Triton Bayesian linear (fused and chunked paths, lrt, flipout) against the reference with
injected noise and against the torch backend with the same noise key (I2), the memory
claim of the fused backward (I4), and the dispatch rule."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from spar import rng  # noqa: E402
from spar.ops import dispatch, reference  # noqa: E402
from spar.ops import linear_triton as lt  # noqa: E402
from spar.ops._triton_backend import linear_triton  # noqa: E402
from spar.ops.linear import linear_torch  # noqa: E402
from spar.ops.lrt_flipout import linear_flipout, linear_lrt  # noqa: E402
from spar.ops.sample import sample_weight, sample_weights_backward  # noqa: E402
from spar.rng import NoiseKey  # noqa: E402
from tests.ops.tolerance import assert_close, assert_close_lowp  # noqa: E402

WID, BID = rng.param_id("fc.weight"), rng.param_id("fc.bias")
NOISE_IDS = (rng.param_id("fc#in"), rng.param_id("fc#out"))
NAMES = ("y", "x", "weight_mu", "weight_rho", "bias_mu", "bias_rho")


@pytest.fixture(autouse=True)
def _eager_rng(monkeypatch):
    # the torch.compile'd generator costs a compile per test process; eager is exact too
    monkeypatch.setenv("SPAR_RNG_COMPILE", "0")
    monkeypatch.delenv("SPAR_LINEAR_PATH", raising=False)


def _make(S, B, N, K, *, shared, bias, seed=0, dtype=torch.float32):
    """Inputs with sigma ~ 0.2-0.6 (noise terms well above the tolerances)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B if shared else S * B, K, generator=g).to(dtype)
    mu = torch.randn(N, K, generator=g)
    rho = torch.randn(N, K, generator=g) * 0.5 - 1.0
    bmu = torch.randn(N, generator=g) if bias else None
    brho = torch.randn(N, generator=g) * 0.5 - 1.0 if bias else None
    key = NoiseKey(seed=1234 + seed, step=7, first_sample=3, num_samples=S, data_offset=5)
    return x, mu, rho, bmu, brho, key


def _run(fn, x, mu, rho, bmu, brho, dy_seed=1, cast=None):
    """Output and gradients of every input (None where absent); ``cast`` converts the
    inputs first (the leaves are the converted tensors)."""
    leaves = [t if t is None else t.detach().clone() for t in (x, mu, rho, bmu, brho)]
    if cast is not None:
        leaves = [t if t is None else cast(t) for t in leaves]
    for t in leaves:
        if t is not None:
            t.requires_grad_(True)
    y = fn(*leaves)
    g = torch.Generator().manual_seed(dy_seed)
    dy = torch.randn(y.shape, generator=g).to(y.dtype)
    inputs = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, inputs, dy))
    return [y.detach()] + [None if t is None else next(grads) for t in leaves]


def _reductions(S, B, N, K, shared):
    """Terms summed into one element of each result (the atol growth of the policy)."""
    per_param = S * B
    return (K, (S * N) if shared else N, per_param, per_param, per_param, per_param)


def _compare(ours, expected, S, B, N, K, shared, what):
    for name, a, e, n in zip(NAMES, ours, expected, _reductions(S, B, N, K, shared), strict=True):
        assert (a is None) == (e is None), f"{what}: {name}"
        if a is not None:
            assert_close(a, e, reduction=n, msg=f"{what}: {name}")


def _reparam_ref(key, shared):
    def fn(x, mu, rho, bmu, brho):
        N, K = rho.shape
        eps_w = key.normal(WID, (N, K)).to(rho.dtype)
        eps_b = None if bmu is None else key.normal(BID, (N,)).to(rho.dtype)
        return reference.linear_reparam(x, mu, rho, bmu, brho, eps_w, eps_b, shared_input=shared)

    return fn


def _torch_backend(key, shared, estimator="reparam"):
    def fn(x, mu, rho, bmu, brho):
        return linear_torch(
            x, mu, rho, bmu, brho, key, weight_id=WID, bias_id=BID, estimator=estimator,
            shared_input=shared, noise_ids=NOISE_IDS,
        )  # fmt: skip

    return fn


def _triton(key, shared, path=None, estimator="reparam"):
    def fn(x, mu, rho, bmu, brho):
        if estimator == "reparam":
            return lt.bayes_linear_reparam(x, mu, rho, bmu, brho, key, weight_id=WID,
                                           bias_id=BID, shared_input=shared, path=path)  # fmt: skip
        if estimator == "lrt":
            return linear_lrt(x, mu, rho, bmu, brho, key, noise_id=NOISE_IDS[0],
                              shared_input=shared)  # fmt: skip
        return linear_flipout(x, mu, rho, bmu, brho, key, weight_id=WID, bias_id=BID,
                              noise_ids=NOISE_IDS, shared_input=shared, path=path)  # fmt: skip

    return fn


# (K, N, S, B, shared, bias): every K and N in {1, 17, 64, 97}, S in {1, 2, 7}, batch 1
# and odd, shared and per-sample input, with and without bias
CASES = [
    (1, 17, 2, 1, False, True),
    (17, 1, 7, 3, True, True),
    (64, 97, 1, 5, False, False),
    (97, 64, 2, 3, True, True),
    (17, 17, 7, 1, False, True),
    (97, 97, 2, 5, False, True),
    (64, 1, 1, 1, True, False),
    (1, 64, 7, 5, True, True),
]


def _ids(case):
    K, N, S, B, shared, bias = case
    return f"K{K}-N{N}-S{S}-B{B}-{'shared' if shared else 'per'}{'-bias' if bias else ''}"


@pytest.mark.parametrize("path", lt.PATHS)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reparam_matches_reference_and_torch_backend(monkeypatch, case, path):
    K, N, S, B, shared, bias = case
    # a small chunk budget: the chunked path walks several chunks (2 samples each)
    monkeypatch.setenv("SPAR_CHUNK_NUMEL", str(2 * N * K))
    x, mu, rho, bmu, brho, key = _make(S, B, N, K, shared=shared, bias=bias)
    ours = _run(_triton(key, shared, path), x, mu, rho, bmu, brho)
    ref = _run(_reparam_ref(key, shared), x, mu, rho, bmu, brho)
    _compare(ours, ref, S, B, N, K, shared, f"{path} vs reference")
    other = _run(_torch_backend(key, shared), x, mu, rho, bmu, brho)
    _compare(ours, other, S, B, N, K, shared, f"{path} vs torch backend")


LOWP_CASES = [
    (97, 64, 2, 5, False, True, "fused"),
    (17, 97, 7, 3, True, True, "fused"),
    (64, 17, 2, 3, False, True, "chunked"),
    (33, 40, 3, 5, True, False, "chunked"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", LOWP_CASES, ids=lambda c: _ids(c[:6]) + "-" + c[6])
def test_reparam_low_precision(monkeypatch, case, dtype):
    """fp16/bf16 inputs, fp32 parameters, fp32 accumulation: error against fp64 at most
    twice torch's error for the same math in that dtype."""
    K, N, S, B, shared, bias, path = case
    monkeypatch.setenv("SPAR_CHUNK_NUMEL", str(2 * N * K))
    x, mu, rho, bmu, brho, key = _make(S, B, N, K, shared=shared, bias=bias, dtype=dtype)
    ours = _run(_triton(key, shared, path), x, mu, rho, bmu, brho)
    ref64 = _run(_reparam_ref(key, shared), x, mu, rho, bmu, brho, cast=lambda t: t.double())
    lowp = _run(_reparam_ref(key, shared), x, mu, rho, bmu, brho)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    for name, a, r, lp, n in zip(
        NAMES, ours, ref64, lowp, _reductions(S, B, N, K, shared), strict=True
    ):
        if a is not None:
            assert_close_lowp(a, r, lp, dtype=dtype, reduction=n, msg=f"{path} {name}")


# (K, N, S, B, shared, bias) for the per-example estimators
EST_CASES = [
    (17, 64, 2, 3, False, True),
    (97, 1, 7, 1, True, True),
    (1, 97, 1, 5, False, False),
    (64, 17, 2, 5, True, True),
]


def _lrt_ref(key, shared):
    def fn(x, mu, rho, bmu, brho):
        S, N = key.num_samples, rho.shape[0]
        B = x.shape[0] if shared else x.shape[0] // S
        if shared:
            x = x.unsqueeze(0).expand(S, *x.shape).flatten(0, 1)
        eps = key.normal(NOISE_IDS[0], (B, N), first_row=key.data_offset).flatten(0, 1)
        return reference.linear_lrt(x, mu, rho, bmu, brho, eps.to(x.dtype))

    return fn


def _flipout_ref(key, shared):
    def fn(x, mu, rho, bmu, brho):
        S, (N, K) = key.num_samples, rho.shape
        B = x.shape[0] if shared else x.shape[0] // S
        if shared:
            x = x.unsqueeze(0).expand(S, *x.shape).flatten(0, 1)

        def sign(pid, C):
            noise = key.normal(pid, (B, C), first_row=key.data_offset)
            return torch.where(noise >= 0, 1.0, -1.0).flatten(0, 1).to(x.dtype)

        eps_w = key.normal(WID, (N, K)).to(rho.dtype)
        eps_b = None if bmu is None else key.normal(BID, (N,)).to(rho.dtype)
        return reference.linear_flipout(x, mu, rho, bmu, brho, eps_w, eps_b,
                                        sign(NOISE_IDS[0], K), sign(NOISE_IDS[1], N))  # fmt: skip

    return fn


@pytest.mark.parametrize(
    "estimator,path", [("lrt", None), ("flipout", "fused"), ("flipout", "chunked")]
)
@pytest.mark.parametrize("case", EST_CASES, ids=_ids)
def test_lrt_flipout_match_reference_and_torch_backend(monkeypatch, case, estimator, path):
    K, N, S, B, shared, bias = case
    monkeypatch.setenv("SPAR_CHUNK_NUMEL", str(N * K))  # chunked: one sample per chunk
    x, mu, rho, bmu, brho, key = _make(S, B, N, K, shared=shared, bias=bias, seed=3)
    ours = _run(_triton(key, shared, path, estimator), x, mu, rho, bmu, brho)
    ref_fn = _lrt_ref if estimator == "lrt" else _flipout_ref
    ref = _run(ref_fn(key, shared), x, mu, rho, bmu, brho)
    # lrt's parameter gradients also sum over the N or K axis of the variance GEMM
    red = (K, S * N, S * B * K, S * B * K, S * B, S * B)
    for name, a, e, n in zip(NAMES, ours, ref, red, strict=True):
        if a is not None:
            assert_close(a, e, reduction=n, msg=f"{estimator} vs reference: {name}")
    other = _run(_torch_backend(key, shared, estimator), x, mu, rho, bmu, brho)
    for name, a, e, n in zip(NAMES, ours, other, red, strict=True):
        if a is not None:
            assert_close(a, e, reduction=n, msg=f"{estimator} vs torch backend: {name}")


@pytest.mark.parametrize("estimator", ["lrt", "flipout"])
def test_lrt_flipout_bf16(estimator):
    K, N, S, B, shared = 33, 20, 2, 3, False
    dtype = torch.bfloat16
    x, mu, rho, bmu, brho, key = _make(S, B, N, K, shared=shared, bias=True, seed=4,
                                       dtype=dtype)  # fmt: skip
    ref_fn = (_lrt_ref if estimator == "lrt" else _flipout_ref)(key, shared)
    ours = _run(_triton(key, shared, estimator=estimator), x, mu, rho, bmu, brho)
    ref64 = _run(ref_fn, x, mu, rho, bmu, brho, cast=lambda t: t.double())
    # torch's own bf16 evaluation of the same math (all operands in bf16)
    lowp = _run(ref_fn, x, mu, rho, bmu, brho, cast=lambda t: t.to(dtype))
    for name, a, r, lp in zip(NAMES, ours, ref64, lowp, strict=True):
        if a is not None:
            assert_close_lowp(a, r, lp, dtype=dtype, reduction=S * B * K, msg=name)


def test_sample_weight_op_matches_reference():
    """The materializing op (conv weights): any shape, gradients summed over samples."""
    S, shape = 3, (5, 3, 3, 3)
    key = NoiseKey(seed=9, step=2, first_sample=1, num_samples=S)
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(shape, generator=g)
    rho = torch.randn(shape, generator=g) * 0.5 - 1.0
    gw = torch.randn((S, *shape), generator=g)
    for with_mu in (True, False):
        m = mu.clone().requires_grad_(with_mu)
        r = rho.clone().requires_grad_(True)
        w = sample_weight(m if with_mu else None, r, key, WID)
        grads = torch.autograd.grad(w, [m, r] if with_mu else [r], gw)
        m2, r2 = mu.clone().requires_grad_(with_mu), rho.clone().requires_grad_(True)
        eps = key.normal(WID, shape)
        w2 = reference.sample_weight(m2 if with_mu else torch.zeros(shape), r2, eps)
        grads2 = torch.autograd.grad(w2, [m2, r2] if with_mu else [r2], gw)
        assert_close(w, w2, msg="W")
        for a, e in zip(grads, grads2, strict=True):
            assert_close(a, e, reduction=S, msg="grad")
    # a vector is one row of the key (biases); bf16 output is the rounded fp32 sample
    b = sample_weight(mu[:, 0, 0, 0], rho[:, 0, 0, 0], key, BID, dtype=torch.bfloat16)
    eps_b = key.normal(BID, (5,))
    expected = reference.sample_weight(mu[:, 0, 0, 0], rho[:, 0, 0, 0], eps_b)
    torch.testing.assert_close(b, expected.to(torch.bfloat16), rtol=0, atol=0)


def test_sample_backward_accumulates_over_chunks():
    S, R, C = 5, 7, 18
    key = NoiseKey(seed=1, step=1, first_sample=0, num_samples=S)
    gw = torch.randn(S, R, C, generator=torch.Generator().manual_seed(0))
    full_mu, full_eps = sample_weights_backward(gw, key, WID)
    g_mu = g_eps = None
    for lo, hi in ((0, 2), (2, 4), (4, 5)):
        g_mu, g_eps = sample_weights_backward(gw[lo:hi], key, WID, (lo, hi), grad_mu=g_mu,
                                              grad_eps=g_eps)  # fmt: skip
    assert_close(g_mu, full_mu, reduction=S)
    assert_close(g_eps, full_eps, reduction=S)


# --- memory (I4) ------------------------------------------------------------------------


class _AllocationTracker(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of every new tensor an aten op returns (in-place ops and
    views return aliases, not allocations: among them the Triton interpreter's own
    byte-wise copies of the kernel arguments)."""

    def __init__(self):
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        if returns and returns[0].alias_info is None:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.numels.append(t.numel())
        return out


def _largest_backward_allocation(path, monkeypatch, S=4, B=3, N=32, K=32, shared=False):
    monkeypatch.setenv("SPAR_CHUNK_NUMEL", str(1 << 30))  # chunked: all samples at once
    x, mu, rho, bmu, brho, key = _make(S, B, N, K, shared=shared, bias=True)
    leaves = [t.requires_grad_(True) for t in (x, mu, rho, bmu, brho)]
    y = lt.bayes_linear_reparam(*leaves, key, weight_id=WID, bias_id=BID, shared_input=shared,
                                path=path)  # fmt: skip
    dy = torch.randn_like(y)
    with _AllocationTracker() as tracker:
        torch.autograd.grad(y, leaves, dy)
    return max(tracker.numels), S * N * K


@pytest.mark.parametrize("shared", [False, True])
def test_fused_backward_never_allocates_per_sample_weights(monkeypatch, shared):
    largest, s_w = _largest_backward_allocation("fused", monkeypatch, shared=shared)
    assert largest < s_w, f"fused backward allocated {largest} elements (S*|W| = {s_w})"
    # the tracker does see per-sample weights where a path makes them
    largest, s_w = _largest_backward_allocation("chunked", monkeypatch, shared=shared)
    assert largest >= s_w


# --- dispatch -----------------------------------------------------------------------------


def test_path_rule_and_override(monkeypatch):
    assert lt.choose_path(1) == "fused"
    assert lt.choose_path(lt.FUSED_MAX_ROWS) == "fused"
    assert lt.choose_path(lt.FUSED_MAX_ROWS + 1) == "chunked"
    monkeypatch.setenv("SPAR_LINEAR_PATH", "chunked")
    assert lt.choose_path(1) == "chunked"
    monkeypatch.setenv("SPAR_LINEAR_PATH", "fused")
    assert lt.choose_path(10_000) == "fused"
    monkeypatch.setenv("SPAR_LINEAR_PATH", "fast")
    with pytest.raises(ValueError, match="SPAR_LINEAR_PATH"):
        lt.choose_path(1)


def test_backend_entry_point_follows_the_path_rule(monkeypatch):
    taken = []
    for cls in (lt.FusedBayesLinearFunction, lt.ChunkedBayesLinearFunction):
        orig = cls.apply
        monkeypatch.setattr(cls, "apply", lambda *a, _o=orig, _c=cls: taken.append(_c) or _o(*a))
    x, mu, rho, bmu, brho, key = _make(2, 3, 8, 8, shared=False, bias=True)
    kw = dict(weight_id=WID, bias_id=BID)
    linear_triton(x, mu, rho, bmu, brho, key, **kw)
    monkeypatch.setenv("SPAR_LINEAR_PATH", "chunked")
    linear_triton(x, mu, rho, bmu, brho, key, **kw)
    assert taken == [lt.FusedBayesLinearFunction, lt.ChunkedBayesLinearFunction]
    with pytest.raises(ValueError, match="estimator"):
        linear_triton(x, mu, rho, bmu, brho, key, estimator="mc", **kw)


def test_dispatcher_selects_triton_only_when_asked_on_cpu(monkeypatch):
    monkeypatch.setenv("SPAR_BACKEND", "auto")
    assert dispatch.resolve("linear", torch.device("cpu"))[0] == "torch"
    monkeypatch.setenv("SPAR_BACKEND", "triton")
    name, fn = dispatch.resolve("linear", torch.device("cpu"))
    assert name == "triton" and fn is linear_triton


def test_input_validation(monkeypatch):
    x, mu, rho, bmu, brho, key = _make(2, 3, 8, 6, shared=False, bias=True)
    kw = dict(weight_id=WID, bias_id=BID)
    with pytest.raises(ValueError, match="features"):
        lt.bayes_linear_reparam(x[:, :5], mu, rho, bmu, brho, key, **kw)
    with pytest.raises(ValueError, match="divisible"):
        lt.bayes_linear_reparam(x[:5], mu, rho, bmu, brho, key, **kw)
    with pytest.raises(TypeError, match="weight_rho"):
        lt.bayes_linear_reparam(x, mu, rho.half(), bmu, brho, key, **kw)
    with pytest.raises(ValueError, match="bias"):
        lt.bayes_linear_reparam(x, mu, rho, bmu, None, key, **kw)
    with pytest.raises(TypeError, match="x must be"):
        lt.bayes_linear_reparam(x.double(), mu, rho, bmu, brho, key, **kw)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        lt.bayes_linear_reparam(x, mu, rho, bmu, brho, key, **kw)


@pytest.mark.parametrize("path", lt.PATHS)
def test_strided_inputs_and_expanded_grad(path):
    """A transposed (non-contiguous) input and the stride-0 gradient of ``y.sum()``: each
    tensor is read through its own strides."""
    S, B, N, K = 2, 3, 17, 20
    x, mu, rho, bmu, brho, key = _make(S, B, N, K, shared=False, bias=True)
    xt = x.t().contiguous().t()  # same values, strides (1, S*B)

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (xt, mu, rho, bmu, brho)]
        assert leaves[0].stride() == (1, S * B)
        y = fn(*leaves)
        return [y.detach(), *torch.autograd.grad(y.sum(), leaves)]

    ours = run(_triton(key, False, path))
    _compare(ours, run(_reparam_ref(key, False)), S, B, N, K, False, f"{path} strided")


def test_backend_import_fails_cleanly_without_triton():
    """Without triton the backend module raises ImportError, which the dispatcher turns
    into 'unavailable' (auto falls back, an explicit request raises with the reason)."""
    code = """
import sys
sys.modules["triton"] = None  # as if triton were not installed
try:
    import spar.ops._triton_backend
except ImportError:
    pass
else:
    raise SystemExit("imported without triton")
import os, torch
from spar.ops import dispatch
os.environ["SPAR_BACKEND"] = "triton"
try:
    dispatch.resolve("linear", torch.device("cpu"))
except dispatch.BackendUnavailable as e:
    assert "triton" in str(e), e
else:
    raise SystemExit("resolved triton without triton")
os.environ["SPAR_BACKEND"] = "auto"
assert dispatch.resolve("linear", torch.device("cuda"))[0] == "torch"
"""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
