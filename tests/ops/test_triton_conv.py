"""Bayesian convolutions under ``SPAR_BACKEND=triton``: ``sampled_conv`` (Triton sampling
into a bounded workspace + torch's convolution), the per-example noise (lrt, flipout) and
the per-sample biases all run on Triton, with convolution activations as they are (rows
first). Every estimator against the reference with injected noise and against the torch
backend with the same key (I2); the primitive itself (several chunks, ``mu=None``, partial
gradients); the Triton sampler against :mod:`spar.rng`; and the torch backend drawing its
noise from the Triton generator (what it does on CUDA)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from spar import rng  # noqa: E402
from spar.ops import bayes_conv, dispatch, reference  # noqa: E402
from spar.rng import NoiseKey  # noqa: E402
from tests.ops.tolerance import assert_close, assert_close_lowp  # noqa: E402

WID, BID = rng.param_id("conv.weight"), rng.param_id("conv.bias")
NOISE_IDS = (rng.param_id("conv#in"), rng.param_id("conv#out"))
NAMES = ("y", "x", "weight_mu", "weight_rho", "bias_mu", "bias_rho")
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CPU = torch.device("cpu")

# (nd, C, Co, kernel, stride, padding, dilation, groups, S, B, spatial, shared, bias)
CASES = [
    (2, 4, 6, 3, 2, 1, 1, 2, 2, 2, 5, False, True),
    (1, 3, 4, 3, 1, 2, 2, 1, 3, 2, 7, True, False),
    (3, 2, 3, 2, 1, 0, 2, 1, 2, 1, 5, False, True),
    (2, 3, 3, 3, 1, 1, 1, 3, 3, 1, 6, True, True),  # depthwise
]


def _ids(case):
    nd, C, Co, k, st, pad, dil, g, S, B, sp, shared, bias = case
    return (f"{nd}d-C{C}-O{Co}-k{k}-s{st}-p{pad}-d{dil}-g{g}-S{S}-B{B}-"
            f"{'shared' if shared else 'per'}{'-bias' if bias else ''}")  # fmt: skip


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.delenv("SPAR_CHUNK_NUMEL", raising=False)


def _make(case, seed=0):
    nd, C, Co, k, st, pad, dil, g, S, B, sp, shared, bias = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B if shared else S * B, C, *([sp] * nd), generator=gen)
    shape = (Co, C // g, *([k] * nd))
    mu = torch.randn(shape, generator=gen) * 0.5
    rho = torch.randn(shape, generator=gen) * 0.5 - 1.0
    bmu = torch.randn(Co, generator=gen) if bias else None
    brho = torch.randn(Co, generator=gen) * 0.5 - 1.0 if bias else None
    key = NoiseKey(seed=77 + seed, step=4, first_sample=2, num_samples=S, data_offset=3)
    geo = dict(stride=(st,) * nd, padding=(pad,) * nd, dilation=(dil,) * nd, groups=g)
    return (x, mu, rho, bmu, brho), key, geo


def _run(fn, inputs, dy_seed=1):
    leaves = [t if t is None else t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed))
    grads = iter(torch.autograd.grad(y, [t for t in leaves if t is not None], dy))
    return [y.detach()] + [None if t is None else next(grads) for t in leaves]


def _public(monkeypatch, backend, key, geo, estimator, shared):
    def fn(x, mu, rho, bmu, brho):
        monkeypatch.setenv("SPAR_BACKEND", backend)
        return bayes_conv(x, mu, rho, bmu, brho, key, weight_id=WID, bias_id=BID,
                          estimator=estimator, shared_input=shared, noise_ids=NOISE_IDS,
                          **geo)  # fmt: skip

    return fn


def _reference(key, geo, estimator, shared):
    S = key.num_samples
    kw = dict(geo)
    conv = CONV[len(kw["stride"])]

    def fn(x, mu, rho, bmu, brho):
        if shared:
            x = x.unsqueeze(0).expand(S, *x.shape).flatten(0, 1)
        B = x.shape[0] // S

        def example_noise(pid, like):
            eps = key.normal(pid, (B, *like.shape[1:]), first_row=key.data_offset)
            return eps.flatten(0, 1)

        eps_w = key.normal(WID, mu.shape)
        eps_b = None if bmu is None else key.normal(BID, bmu.shape)
        if estimator == "reparam":
            return reference.conv_reparam(conv, x, mu, rho, bmu, brho, eps_w, eps_b, **kw)
        out = conv(x[:B], mu, None, **kw)  # the output's shape, for the output noise
        if estimator == "lrt":
            eps = example_noise(NOISE_IDS[0], out)
            return reference.conv_lrt(conv, x, mu, rho, bmu, brho, eps, **kw)

        def sign(pid, like):
            return torch.where(example_noise(pid, like) >= 0, 1.0, -1.0)

        return reference.conv_flipout(conv, x, mu, rho, bmu, brho, eps_w, eps_b,
                                      sign(NOISE_IDS[0], x), sign(NOISE_IDS[1], out),
                                      **kw)  # fmt: skip

    return fn


def test_sampled_conv_runs_on_triton_for_fp32_parameters(monkeypatch):
    """Every primitive of a convolution runs on Triton; other parameter dtypes sample on
    torch (the dtype rule of :mod:`spar.ops.dispatch`)."""
    monkeypatch.setenv("SPAR_BACKEND", "triton")
    for p in dispatch.PRIMITIVES:
        assert dispatch.backend_for(p, CPU, torch.float32) == "triton", p
    assert dispatch.backend_for("sampled_conv", CPU, torch.float64) == "torch"
    assert dispatch.backend_for("sampled_conv", CPU, torch.bfloat16) == "torch"


@pytest.mark.parametrize("estimator", ["reparam", "lrt", "flipout"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_conv_matches_reference_and_torch_backend(monkeypatch, case, estimator):
    nd, C, Co, k, _, _, _, g, S, B, _, shared, _ = case
    inputs, key, geo = _make(case)
    # one sample per chunk: the chunk loop (workspace reuse, in-order reduction) is walked
    monkeypatch.setenv("SPAR_CHUNK_NUMEL", str(inputs[2].numel()))
    ours = _run(_public(monkeypatch, "triton", key, geo, estimator, shared), inputs)
    out_numel = ours[0][0, 0].numel()  # spatial elements of one output map
    taps = (C // g) * k**nd
    # terms per element: y sums a kernel window, dx the output channels' windows (and the
    # samples when shared), the parameters every sample's and example's output positions
    per_param = S * B * out_numel
    red = (taps, (Co // g) * k**nd * (S if shared else 1), *[per_param] * 4)
    ref = _run(_reference(key, geo, estimator, shared), inputs)
    other = _run(_public(monkeypatch, "torch", key, geo, estimator, shared), inputs)
    for what, expected in (("reference", ref), ("torch backend", other)):
        for name, a, e, n in zip(NAMES, ours, expected, red, strict=True):
            assert (a is None) == (e is None), f"{estimator} vs {what}: {name}"
            if a is not None:
                assert_close(a, e, reduction=n, msg=f"{estimator} vs {what}: {name}")


# --- the sampled_conv primitive -----------------------------------------------------------


def _primitive_case(nd, shared, seed=3):
    """x, mu, rho, key, static (pid, shared, groups, stride, padding, dilation), dy."""
    S, B, C, n_out, g, k, sp = 3, 2, 4, 6, 2, 3, 5
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B if shared else S * B, C, *([sp] * nd), generator=gen)
    shape = (n_out, C // g, *([k] * nd))
    mu = torch.randn(shape, generator=gen) * 0.5
    rho = torch.randn(shape, generator=gen) * 0.5 - 1.0
    key = NoiseKey(seed=5, step=2, first_sample=1, num_samples=S, data_offset=0)
    geometry = (2,) * nd + (1,) * nd + (1,) * nd
    out_sp = (sp + 2 - (k - 1) - 1) // 2 + 1
    dy = torch.randn(S * B, n_out, *([out_sp] * nd), generator=gen)
    return x, mu, rho, key, (WID, int(shared), g, *geometry), dy


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_primitive_chunks_partial_needs_and_zero_mean_match_torch_backend(monkeypatch, nd):
    """``resolve("sampled_conv")`` called as ``fn(x, mu, rho, key, *static)``, folded and
    shared, in chunks of 2 samples (3 = 2 + 1), with only the gradients asked for and with
    ``mu=None`` (flipout's perturbation): Triton equals the torch backend."""
    for shared in (False, True):
        x, mu, rho, key, static, dy = _primitive_case(nd, shared)
        monkeypatch.setenv("SPAR_CHUNK_NUMEL", str(2 * rho.numel()))
        n_out, c_group, *kernel = rho.shape
        taps = c_group * math.prod(kernel)
        for grad_x, grad_mu, with_mu in ((True, True, True), (False, False, True),
                                         (True, False, False)):  # fmt: skip
            got = []
            for backend in ("triton", "torch"):
                monkeypatch.setenv("SPAR_BACKEND", backend)
                fn = dispatch.resolve("sampled_conv", CPU, torch.float32)
                xs = x.clone().requires_grad_(grad_x)
                ms = mu.clone().requires_grad_(grad_mu) if with_mu else None
                rs = rho.clone().requires_grad_(True)
                y = fn(xs, ms, rs, key, *static)
                leaves = [t for t in (xs, ms, rs) if t is not None and t.requires_grad]
                got.append([y, *torch.autograd.grad(y, leaves, dy)])
            what = f"{nd}d shared={shared} grad_x={grad_x} grad_mu={grad_mu} mu={with_mu}"
            per_param = key.num_samples * dy.shape[0] * dy[0, 0].numel()
            red = [taps] + ([n_out * math.prod(kernel) * key.num_samples] if grad_x else [])
            red += [per_param] * (len(got[0]) - len(red))
            for i, (a, e, n) in enumerate(zip(*got, red, strict=True)):
                assert_close(a, e, reduction=n, msg=f"{what}: result {i}")


def test_primitive_workspace_is_bounded_by_the_chunk(monkeypatch):
    """The sampling kernel writes at most ``chunk_samples`` samples' weights at a time
    (one workspace reused), never ``S * |W|``, in forward and backward."""
    from spar.ops.backends.triton import sample as sample_mod

    x, mu, rho, key, static, dy = _primitive_case(2, False)
    monkeypatch.setenv("SPAR_BACKEND", "triton")
    monkeypatch.setenv("SPAR_CHUNK_NUMEL", str(rho.numel()))  # one sample per chunk
    written, reduced = [], []
    real_fwd, real_bwd = sample_mod.sample_weights, sample_mod.sample_weights_backward

    def spy_fwd(*args, out=None, **kw):
        written.append((out.shape[0], out.untyped_storage().data_ptr()))
        return real_fwd(*args, out=out, **kw)

    def spy_bwd(grad_w, *args, **kw):
        reduced.append(grad_w.shape[0])
        return real_bwd(grad_w, *args, **kw)

    monkeypatch.setattr(sample_mod, "sample_weights", spy_fwd)
    monkeypatch.setattr(sample_mod, "sample_weights_backward", spy_bwd)
    leaves = [t.clone().requires_grad_() for t in (x, mu, rho)]
    y = dispatch.resolve("sampled_conv", CPU, torch.float32)(*leaves[:1], *leaves[1:], key,
                                                             *static)  # fmt: skip
    torch.autograd.grad(y, leaves, dy)
    S = key.num_samples
    assert [c for c, _ in written] == [1] * (2 * S)  # forward + dx in backward
    assert len({p for _, p in written[:S]}) == 1  # one workspace per call
    assert reduced == [1] * S


def test_primitive_passes_opcheck(monkeypatch):
    """Schema, fake implementation (shape, dtype, strides) and AOT dispatch of the Triton
    op, forward and backward (shared input: the fake's row count is S * B)."""
    from torch.library import opcheck

    import spar.ops.backends.triton  # noqa: F401 - registers the ops

    x, mu, rho, key, static, dy = _primitive_case(1, True)
    step, ints = torch.tensor(key.step), [key.seed, key.first_sample, key.num_samples, 0]
    ops = torch.ops.spar
    opcheck(ops.triton_sampled_conv.default, ([x, mu, rho], step, ints, list(static)))
    opcheck(ops.triton_sampled_conv_backward.default,
            (dy, [x, mu, rho], step, ints, list(static), [True, True, True]))  # fmt: skip


def test_fp64_parameters_sample_on_torch_under_triton(monkeypatch):
    """``SPAR_BACKEND=triton`` with fp64 parameters, which the Triton kernels refuse: the
    sampled primitive runs on torch (no error), the same result as ``SPAR_BACKEND=torch``
    (the bias normals, fp32 on every backend, may come from either generator: fp32's
    tolerance)."""
    case = CASES[0]
    inputs, key, geo = _make(case)
    inputs = [None if t is None else t.double() for t in inputs]
    got = [
        _run(_public(monkeypatch, b, key, geo, "reparam", case[11]), inputs)
        for b in ("triton", "torch")
    ]
    for name, a, e in zip(NAMES, *got, strict=True):
        assert (a is None) == (e is None)
        if a is not None:
            assert a.dtype == torch.float64
            assert_close(a, e, dtype=torch.float32, msg=name)


# --- the Triton sampler and generator -----------------------------------------------------


@pytest.mark.parametrize("with_mu", [True, False])
def test_triton_sampler_weights_equal_spar_rng(with_mu):
    """Parameters of any shape are the key's 2-D view ``(shape[0], numel // shape[0])``:
    the Triton sampler's weights are spar.rng's (same integers, normals within a few ulp),
    for any sample range, and its reduction matches the spar.rng sampler's."""
    from spar.ops.backends.torch.generator import RngSampler
    from spar.ops.backends.triton.sample import TritonSampler

    gen = torch.Generator().manual_seed(0)
    shape = (5, 3, 3, 2, 3)  # a 3-d kernel: (5, 54) in the key
    mu = torch.randn(shape, generator=gen) if with_mu else None
    rho = torch.randn(shape, generator=gen) - 1.0
    key = NoiseKey(seed=9, step=6, first_sample=3, num_samples=4, data_offset=0)
    ours = TritonSampler(key, WID, mu, rho, True, True)
    theirs = RngSampler(key, WID, mu, rho, True, True)
    g = torch.randn(4, *shape, generator=gen)
    for lo, hi in ((0, 3), (3, 4)):
        w = ours.weights(lo, hi, torch.float32)
        assert w.shape == (hi - lo, *shape)
        assert_close(w, theirs.weights(lo, hi, torch.float32), msg=f"weights [{lo}, {hi})")
        ours.add_grads(g[lo:hi], lo, hi)
        theirs.add_grads(g[lo:hi], lo, hi)
    for name, a, e in zip(("grad_mu", "grad_rho"), ours.grads(), theirs.grads(), strict=True):
        if not with_mu and name == "grad_mu":
            assert a is None and e is None
            continue
        assert_close(a, e, reduction=4, msg=name)


def test_keyed_normal_equals_spar_rng():
    """The Triton generator of the torch backend on CUDA: ``keyed_normal`` is
    ``key.normal`` (row offset included) for vectors, matrices and activations."""
    from spar.ops.backends.triton.noise import keyed_normal

    key = NoiseKey(seed=4, step=11, first_sample=2, num_samples=3, data_offset=7)
    for shape, first_row in (((6,), 0), ((3, 7), 0), ((2, 3, 4, 5), 7)):
        ours = keyed_normal(key, 17, shape, CPU, first_row=first_row)
        assert ours.shape == (3, *shape) and ours.dtype == torch.float32
        assert_close(ours, key.normal(17, shape, first_row=first_row), msg=str(shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator", ["reparam", "lrt", "flipout"])
def test_torch_backend_with_the_triton_generator(monkeypatch, estimator, dtype):
    """What the torch backend does on CUDA: its noise (sampled weights, per-example noise,
    biases) comes from the Triton kernels. Run here by declaring CPU a Triton device type
    (the interpreter runs the kernels): the same outputs and gradients as its spar.rng
    noise, for fp32 (fused sampling kernels) and fp64 (Triton normals, torch arithmetic)."""
    from spar.ops.backends.torch import generator

    case = CASES[0]
    inputs, key, geo = _make(case)
    inputs = [None if t is None else t.to(dtype) for t in inputs]
    monkeypatch.setenv("SPAR_CHUNK_NUMEL", str(inputs[2].numel()))
    fn = _public(monkeypatch, "torch", key, geo, estimator, case[11])
    eager = _run(fn, inputs)
    monkeypatch.setattr(generator, "TRITON_DEVICE_TYPES", ("cuda", "cpu"))
    assert generator.generator_for("cpu") == "triton"
    ours = _run(fn, inputs)
    for name, a, e in zip(NAMES, ours, eager, strict=True):
        if a is not None:
            assert_close(a, e, reduction=64, msg=f"{estimator} {dtype}: {name}")


def test_triton_sampler_gradients_keep_the_parameter_dtype(monkeypatch):
    """16-bit parameters on the torch backend with the Triton generator: the primitive's
    backward returns grad_mu/grad_rho in the parameters' dtype, as its fake promises
    (opcheck's fake-tensor test compares them)."""
    from spar.ops.backends.torch import generator
    from spar.ops.library import pack_key

    monkeypatch.setattr(generator, "TRITON_DEVICE_TYPES", ("cuda", "cpu"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * 3, 5, generator=gen, dtype=torch.bfloat16)
    mu = torch.randn(4, 5, generator=gen).to(torch.bfloat16)
    rho = (torch.randn(4, 5, generator=gen) - 2).to(torch.bfloat16)
    step, ints = pack_key(NoiseKey(seed=1, step=0, first_sample=0, num_samples=2))
    dy = torch.randn(2 * 3, 4, generator=gen, dtype=torch.bfloat16)
    args = (dy, [x, mu, rho], step, ints, [WID, 0], [True, True, True])
    grads = torch.ops.spar.torch_sampled_linear_backward(*args)
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    torch.library.opcheck(
        torch.ops.spar.torch_sampled_linear_backward, args, test_utils=("test_faketensor",)
    )


@pytest.mark.parametrize("estimator", ["reparam", "flipout"])
def test_bf16_input_with_fp32_parameters(monkeypatch, estimator):
    """Mixed precision (bf16 activations, fp32 parameters) on Triton: the output and every
    gradient within the low-precision policy (error against fp64 at most twice that of the
    torch backend's same bf16 computation)."""
    case = CASES[0]
    nd, C, Co, k, _, _, _, g, S, B, _, shared, _ = case
    inputs, key, geo = _make(case)
    dy = torch.randn(_run(_reference(key, geo, estimator, shared), inputs)[0].shape,
                     generator=torch.Generator().manual_seed(1))  # fmt: skip

    def run(fn, ins, x_dtype):
        leaves = [t if t is None else t.detach().clone().requires_grad_() for t in ins]
        x = leaves[0].to(x_dtype)
        y = fn(x, *leaves[1:])
        grads = iter(torch.autograd.grad(y, [t for t in leaves if t is not None], dy.to(y.dtype)))
        return [y.detach()] + [None if t is None else next(grads) for t in leaves]

    ours = run(_public(monkeypatch, "triton", key, geo, estimator, shared), inputs, torch.bfloat16)
    lowp = run(_public(monkeypatch, "torch", key, geo, estimator, shared), inputs, torch.bfloat16)
    inputs64 = [None if t is None else t.double() for t in inputs]
    ref64 = run(_reference(key, geo, estimator, shared), inputs64, torch.float64)
    assert ours[0].dtype == torch.bfloat16 and ours[1].dtype == torch.float32
    per_param = S * B * ours[0][0, 0].numel()
    red = ((C // g) * k**nd, (Co // g) * k**nd, *[per_param] * 4)
    for name, a, r, lp, n in zip(NAMES, ours, ref64, lowp, red, strict=True):
        if a is not None:
            assert_close_lowp(a, r, lp, dtype=torch.bfloat16, reduction=n, msg=name)
