"""Triton Bayesian linear through the public op (``SPAR_BACKEND=triton``): every estimator
(reparam on the fused and chunked paths, lrt, flipout) against the reference with injected
noise and against the torch backend with the same noise key (I2), the sampled_linear
primitive with partial ``needs``, the sampling kernel's backward, the memory claim of the
fused backward (I4), and the fused/chunked dispatch rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from spar import rng  # noqa: E402
from spar.ops import bayes_linear, dispatch, reference  # noqa: E402
from spar.ops.backends.triton import linear as lt  # noqa: E402
from spar.ops.backends.triton.sample import sample_weights, sample_weights_backward  # noqa: E402
from spar.rng import NoiseKey  # noqa: E402
from tests.ops.tolerance import assert_close, assert_close_lowp  # noqa: E402

WID, BID = rng.param_id("fc.weight"), rng.param_id("fc.bias")
NOISE_IDS = (rng.param_id("fc#in"), rng.param_id("fc#out"))
NAMES = ("y", "x", "weight_mu", "weight_rho", "bias_mu", "bias_rho")
PATHS = ("fused", "chunked")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("SPAR_BACKEND", "triton")
    monkeypatch.delenv("SPAR_LINEAR_PATH", raising=False)
    monkeypatch.delenv("SPAR_CHUNK_NUMEL", raising=False)


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


def _compare(ours, expected, reductions, what):
    for name, a, e, n in zip(NAMES, ours, expected, reductions, strict=True):
        assert (a is None) == (e is None), f"{what}: {name}"
        if a is not None:
            assert_close(a, e, reduction=n, msg=f"{what}: {name}")


def _public(monkeypatch, backend, key, shared, estimator="reparam", path="auto"):
    """``bayes_linear`` on ``backend`` (and the linear path ``path``); the environment
    stays set for the backward, which reads ``SPAR_LINEAR_PATH`` again."""

    def fn(x, mu, rho, bmu, brho):
        monkeypatch.setenv("SPAR_BACKEND", backend)
        monkeypatch.setenv("SPAR_LINEAR_PATH", path)
        return bayes_linear(x, mu, rho, bmu, brho, key, weight_id=WID, bias_id=BID,
                            estimator=estimator, shared_input=shared,
                            noise_ids=NOISE_IDS)  # fmt: skip

    return fn


def _reparam_ref(key, shared):
    def fn(x, mu, rho, bmu, brho):
        N, K = rho.shape
        eps_w = key.normal(WID, (N, K)).to(rho.dtype)
        eps_b = None if bmu is None else key.normal(BID, (N,)).to(rho.dtype)
        return reference.linear_reparam(x, mu, rho, bmu, brho, eps_w, eps_b, shared_input=shared)

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


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reparam_matches_reference_and_torch_backend(monkeypatch, case, path):
    K, N, S, B, shared, bias = case
    # a small chunk budget: the chunked path walks several chunks (2 samples each)
    monkeypatch.setenv("SPAR_CHUNK_NUMEL", str(2 * N * K))
    x, mu, rho, bmu, brho, key = _make(S, B, N, K, shared=shared, bias=bias)
    red = _reductions(S, B, N, K, shared)
    ours = _run(_public(monkeypatch, "triton", key, shared, path=path), x, mu, rho, bmu, brho)
    ref = _run(_reparam_ref(key, shared), x, mu, rho, bmu, brho)
    _compare(ours, ref, red, f"{path} vs reference")
    other = _run(_public(monkeypatch, "torch", key, shared), x, mu, rho, bmu, brho)
    _compare(ours, other, red, f"{path} vs torch backend")


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
    ours = _run(_public(monkeypatch, "triton", key, shared, path=path), x, mu, rho, bmu, brho)
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


def _expand(x, key, shared):
    """The folded ``(S*B, K)`` input and the per-sample batch ``B``."""
    S = key.num_samples
    if shared:
        return x.unsqueeze(0).expand(S, *x.shape).flatten(0, 1), x.shape[0]
    return x, x.shape[0] // S


def _lrt_ref(key, shared):
    def fn(x, mu, rho, bmu, brho):
        x, B = _expand(x, key, shared)
        eps = key.normal(NOISE_IDS[0], (B, rho.shape[0]), first_row=key.data_offset)
        return reference.linear_lrt(x, mu, rho, bmu, brho, eps.flatten(0, 1).to(x.dtype))

    return fn


def _flipout_ref(key, shared):
    def fn(x, mu, rho, bmu, brho):
        x, B = _expand(x, key, shared)
        N, K = rho.shape

        def sign(pid, C):
            noise = key.normal(pid, (B, C), first_row=key.data_offset)
            return torch.where(noise >= 0, 1.0, -1.0).flatten(0, 1).to(x.dtype)

        eps_w = key.normal(WID, (N, K)).to(rho.dtype)
        eps_b = None if bmu is None else key.normal(BID, (N,)).to(rho.dtype)
        return reference.linear_flipout(x, mu, rho, bmu, brho, eps_w, eps_b,
                                        sign(NOISE_IDS[0], K), sign(NOISE_IDS[1], N))  # fmt: skip

    return fn


_EST_REFS = {"lrt": _lrt_ref, "flipout": _flipout_ref}


@pytest.mark.parametrize(
    "estimator,path", [("lrt", "auto"), ("flipout", "fused"), ("flipout", "chunked")]
)
@pytest.mark.parametrize("case", EST_CASES, ids=_ids)
def test_lrt_flipout_match_reference_and_torch_backend(monkeypatch, case, estimator, path):
    K, N, S, B, shared, bias = case
    monkeypatch.setenv("SPAR_CHUNK_NUMEL", str(N * K))  # chunked: one sample per chunk
    x, mu, rho, bmu, brho, key = _make(S, B, N, K, shared=shared, bias=bias, seed=3)
    ours = _run(_public(monkeypatch, "triton", key, shared, estimator, path),
                x, mu, rho, bmu, brho)  # fmt: skip
    # lrt's parameter gradients also sum over the N or K axis of the variance GEMM
    red = (K, S * N, S * B * K, S * B * K, S * B, S * B)
    ref = _run(_EST_REFS[estimator](key, shared), x, mu, rho, bmu, brho)
    _compare(ours, ref, red, f"{estimator} {path} vs reference")
    other = _run(_public(monkeypatch, "torch", key, shared, estimator), x, mu, rho, bmu, brho)
    _compare(ours, other, red, f"{estimator} {path} vs torch backend")


@pytest.mark.parametrize(
    "estimator,dtype",
    [("lrt", torch.float16), ("lrt", torch.bfloat16), ("flipout", torch.float16),
     ("flipout", torch.bfloat16)],
    ids=["lrt-fp16", "lrt-bf16", "flipout-fp16", "flipout-bf16"],
)  # fmt: skip
def test_lrt_flipout_low_precision(monkeypatch, estimator, dtype):
    K, N, S, B, shared = 33, 20, 2, 3, False
    x, mu, rho, bmu, brho, key = _make(S, B, N, K, shared=shared, bias=True, seed=4,
                                       dtype=dtype)  # fmt: skip
    ref_fn = _EST_REFS[estimator](key, shared)
    ours = _run(_public(monkeypatch, "triton", key, shared, estimator), x, mu, rho, bmu, brho)
    ref64 = _run(ref_fn, x, mu, rho, bmu, brho, cast=lambda t: t.double())
    # torch's own evaluation of the same math with every operand in that dtype
    lowp = _run(ref_fn, x, mu, rho, bmu, brho, cast=lambda t: t.to(dtype))
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    for name, a, r, lp in zip(NAMES, ours, ref64, lowp, strict=True):
        if a is not None:
            assert_close_lowp(a, r, lp, dtype=dtype, reduction=S * B * K, msg=name)


# --- the sampled_linear primitive ---------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_primitive_partial_needs_and_zero_mean_match_torch_backend(monkeypatch, path):
    """``resolve("sampled_linear")`` called as ``fn(x, mu, rho, key, pid, shared)``: only
    the gradients asked for (frozen input or mean, ``mu=None``), equal to the torch
    backend's with the same key."""
    S, B, N, K = 3, 2, 9, 13
    monkeypatch.setenv("SPAR_LINEAR_PATH", path)
    monkeypatch.setenv("SPAR_CHUNK_NUMEL", str(N * K))
    for shared in (0, 1):
        x, mu, rho, _, _, key = _make(S, B, N, K, shared=bool(shared), bias=False, seed=5)
        dy = torch.randn(S * B, N, generator=torch.Generator().manual_seed(2))
        for grad_x, grad_mu, with_mu in ((False, False, True), (True, False, True),
                                         (False, True, True), (False, False, False)):  # fmt: skip
            got = []
            for backend in ("triton", "torch"):
                monkeypatch.setenv("SPAR_BACKEND", backend)
                fn = dispatch.resolve("sampled_linear", CPU)
                xs = x.clone().requires_grad_(grad_x)
                ms = mu.clone().requires_grad_(grad_mu) if with_mu else None
                rs = rho.clone().requires_grad_(True)
                y = fn(xs, ms, rs, key, WID, shared)
                leaves = [t for t in (xs, ms, rs) if t is not None and t.requires_grad]
                got.append([y, *torch.autograd.grad(y, leaves, dy)])
            what = f"{path} shared={shared} grad_x={grad_x} grad_mu={grad_mu} mu={with_mu}"
            red = [K, S * N if shared else N] if grad_x else [K]
            red += [S * B] * (len(got[0]) - len(red))
            for i, (a, e, n) in enumerate(zip(*got, red, strict=True)):
                assert_close(a, e, reduction=n, msg=f"{what}: result {i}")


# --- the sampling kernel (chunked path, conv weights, per-sample biases) ------------------


def test_sample_kernel_matches_reference_forward_and_backward():
    """``sample_weights`` (any shape viewed as ``(rows, cols)``) is ``mu + sigma * eps``,
    and ``sample_weights_backward`` is the eager formula ``(sum_s g_s, sigmoid(rho) *
    sum_s g_s * eps_s)`` with eps regenerated."""
    S, shape = 3, (5, 3, 3, 3)
    key = NoiseKey(seed=9, step=2, first_sample=1, num_samples=S)
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(shape, generator=g)
    rho = torch.randn(shape, generator=g) * 0.5 - 1.0
    gw = torch.randn((S, *shape), generator=g)
    eps = key.normal(WID, shape)
    rows = (shape[0], -1)
    sig = F.softplus(rho)
    for with_mu in (True, False):
        w = sample_weights(mu.reshape(rows) if with_mu else None, sig.reshape(rows), key, WID)
        expected = reference.sample_weight(mu if with_mu else torch.zeros(shape), rho, eps)
        assert_close(w.view(S, *shape), expected, msg=f"W (mu={with_mu})")
    for need_mu in (True, False):
        g_mu, g_rho = sample_weights_backward(gw.reshape(S, *rows), key, WID, need_mu=need_mu,
                                              rho=rho.reshape(rows))  # fmt: skip
        assert (g_mu is None) == (not need_mu)
        if need_mu:
            assert_close(g_mu.view(shape), gw.sum(0), reduction=S, msg="grad_mu")
        expected_rho = (gw * eps).sum(0) * torch.sigmoid(rho)
        assert_close(g_rho.view(shape), expected_rho, reduction=S, msg="grad_rho")
    # without rho: the bare sum over samples of g_s * eps_s
    _, g_eps = sample_weights_backward(gw.reshape(S, *rows), key, WID, need_mu=False)
    assert_close(g_eps.view(shape), (gw * eps).sum(0), reduction=S, msg="grad_eps")
    # a vector is one row of the key (biases); bf16 output is the rounded fp32 sample
    bmu, bsig = mu[:, 0, 0, 0], sig[:, 0, 0, 0]
    b = sample_weights(bmu.view(1, -1), bsig.view(1, -1), key, BID, dtype=torch.bfloat16)
    expected = reference.sample_weight(bmu, rho[:, 0, 0, 0], key.normal(BID, (5,)))
    torch.testing.assert_close(b.view(S, 5), expected.to(torch.bfloat16), rtol=0, atol=0)


def test_sample_backward_accumulates_over_chunks():
    S, R, C = 5, 7, 18
    key = NoiseKey(seed=1, step=1, first_sample=0, num_samples=S)
    g = torch.Generator().manual_seed(0)
    gw = torch.randn(S, R, C, generator=g)
    rho = torch.randn(R, C, generator=g)
    full_mu, full_rho = sample_weights_backward(gw, key, WID, rho=rho)
    g_mu = g_rho = None
    for lo, hi in ((0, 2), (2, 4), (4, 5)):
        last = rho if hi == S else None  # the last chunk finishes grad_rho
        g_mu, g_rho = sample_weights_backward(gw[lo:hi], key, WID, (lo, hi), grad_mu=g_mu,
                                              grad_eps=g_rho, rho=last)  # fmt: skip
    assert_close(g_mu, full_mu, reduction=S)
    assert_close(g_rho, full_rho, reduction=S)


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
    y = _public(monkeypatch, "triton", key, shared, path=path)(*leaves)
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


def test_primitive_follows_the_path_rule(monkeypatch):
    """Forward and backward of the primitive take the path of the per-sample rows (not the
    folded ``S*B``), and ``SPAR_LINEAR_PATH`` forces one."""
    taken = []
    for name in ("fused_forward", "chunked_forward", "fused_backward_dx", "fused_backward_dw",
                 "chunked_backward"):  # fmt: skip
        orig = getattr(lt, name)
        monkeypatch.setattr(lt, name, lambda *a, _o=orig, _n=name, **k: taken.append(_n) or
                            _o(*a, **k))  # fmt: skip
    monkeypatch.setattr(lt, "FUSED_MAX_ROWS", 2)  # small inputs on both sides of the rule

    def run(S, B, shared, path="auto"):
        taken.clear()
        x, mu, rho, bmu, brho, key = _make(S, B, 8, 8, shared=shared, bias=True)
        leaves = [t.requires_grad_(True) for t in (x, mu, rho, bmu, brho)]
        y = _public(monkeypatch, "triton", key, shared, path=path)(*leaves)
        torch.autograd.grad(y.sum(), leaves)
        return list(taken)

    fused = ["fused_forward", "fused_backward_dx", "fused_backward_dw"]
    chunked = ["chunked_forward", "chunked_backward"]
    assert run(3, 2, False) == fused  # 6 folded rows, 2 per sample
    assert run(1, 3, False) == chunked
    assert run(4, 2, True) == fused
    assert run(1, 3, True) == chunked
    assert run(3, 2, False, "chunked") == chunked
    assert run(1, 3, True, "fused") == fused


def test_triton_backend_primitives_and_dtype_fallback(monkeypatch):
    """On CPU tensors ``auto`` takes the torch backend; ``SPAR_BACKEND=triton`` takes
    Triton for every primitive (``sampled_conv`` included: Triton sampling + cuDNN) and
    torch for a dtype the Triton primitive does not serve (fp64)."""
    own = ("sampled_linear", "sampled_conv", "lrt_noise", "sign_mul", "normal")
    monkeypatch.setenv("SPAR_BACKEND", "auto")
    for p in dispatch.PRIMITIVES:
        assert dispatch.backend_for(p, CPU) == "torch", p
    monkeypatch.setenv("SPAR_BACKEND", "torch")
    torch_fns = {p: dispatch.resolve(p, CPU) for p in dispatch.PRIMITIVES}
    monkeypatch.setenv("SPAR_BACKEND", "triton")
    assert dispatch.implemented("triton") == own
    for p in dispatch.PRIMITIVES:
        fn = dispatch.resolve(p, CPU)
        assert dispatch.backend_for(p, CPU) == "triton" and fn is not torch_fns[p], p
        served = dispatch.served_dtypes(p, "triton")
        if served is not None and torch.float64 not in served:
            assert dispatch.backend_for(p, CPU, torch.float64) == "torch", p


def test_input_validation(monkeypatch):
    """The public op's checks run before the backend; 16-bit parameters are not served by
    the Triton primitive (the dispatcher sends them to torch) and the primitive itself
    refuses them; CPU tensors outside the interpreter are refused."""
    x, mu, rho, bmu, brho, key = _make(2, 3, 8, 6, shared=False, bias=True)
    kw = dict(weight_id=WID, bias_id=BID)
    with pytest.raises(ValueError, match=r"x must be \(S\*B, 6\)"):
        bayes_linear(x[:, :5], mu, rho, bmu, brho, key, **kw)
    with pytest.raises(ValueError, match="divisible"):
        bayes_linear(x[:5], mu, rho, bmu, brho, key, **kw)
    with pytest.raises(TypeError, match="must share one float dtype"):
        bayes_linear(x, mu, rho.half(), bmu, brho, key, **kw)
    with pytest.raises(ValueError, match="bias"):
        bayes_linear(x, mu, rho, bmu, None, key, **kw)
    with pytest.raises(TypeError, match="x is torch.float64"):
        bayes_linear(x.double(), mu, rho, bmu, brho, key, **kw)
    with pytest.raises(ValueError, match="estimator"):
        bayes_linear(x, mu, rho, bmu, brho, key, estimator="mc", **kw)
    half = [t.half() for t in (x, mu, rho, bmu, brho)]
    assert dispatch.backend_for("sampled_linear", CPU, torch.float16) == "torch"
    with pytest.raises(TypeError, match="fp32 parameters"):
        lt.sampled_linear_forward(half[0], half[1], half[2], key, WID, 0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for estimator in ("reparam", "lrt", "flipout"):
        with pytest.raises(RuntimeError, match="CUDA tensors"):
            bayes_linear(x, mu, rho, bmu, brho, key, estimator=estimator, **kw)


@pytest.mark.parametrize(
    "estimator,path",
    [
        ("reparam", "fused"),
        ("reparam", "chunked"),
        ("lrt", "auto"),
        ("flipout", "auto"),
    ],  # fmt: skip
)
def test_strided_inputs_and_expanded_grad(monkeypatch, estimator, path):
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

    ours = run(_public(monkeypatch, "triton", key, False, estimator, path))
    ref = (_reparam_ref if estimator == "reparam" else _EST_REFS[estimator])(key, False)
    red = (K, N, S * B * K, S * B * K, S * B, S * B)
    _compare(ours, run(ref), red, f"{estimator} {path} strided")


def test_backend_import_fails_cleanly_without_triton():
    """Without triton the backend package raises ImportError, which the dispatcher turns
    into 'unavailable' (auto falls back, an explicit request raises with the reason)."""
    code = """
import sys
sys.modules["triton"] = None  # as if triton were not installed
try:
    import spar.ops.backends.triton
except ImportError:
    pass
else:
    raise SystemExit("imported without triton")
import os, torch
from spar.ops import dispatch
os.environ["SPAR_BACKEND"] = "triton"
try:
    dispatch.resolve("sampled_linear", torch.device("cpu"))
except dispatch.BackendUnavailable as e:
    assert "triton" in str(e), e
else:
    raise SystemExit("resolved triton without triton")
os.environ["SPAR_BACKEND"] = "auto"
for p in dispatch.PRIMITIVES:
    assert dispatch.backend_for(p, torch.device("cuda")) == "torch", p
"""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
