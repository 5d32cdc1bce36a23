"""Bayesian convolutions under ``SPAR_BACKEND=triton``: ``sampled_conv`` falls back to the
torch backend while the per-example noise (lrt, flipout) and the per-sample biases run on
Triton with convolution activations as they are (rows first). Every estimator against the
reference with injected noise and against the torch backend with the same key (I2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from spar import rng  # noqa: E402
from spar.ops import bayes_conv, dispatch, reference  # noqa: E402
from spar.rng import NoiseKey  # noqa: E402
from tests.ops.tolerance import assert_close  # noqa: E402

WID, BID = rng.param_id("conv.weight"), rng.param_id("conv.bias")
NOISE_IDS = (rng.param_id("conv#in"), rng.param_id("conv#out"))
NAMES = ("y", "x", "weight_mu", "weight_rho", "bias_mu", "bias_rho")
CONV = {1: F.conv1d, 2: F.conv2d}

# (nd, C, Co, kernel, stride, padding, dilation, groups, S, B, spatial, shared, bias)
CASES = [
    (2, 4, 6, 3, 2, 1, 1, 2, 2, 2, 5, False, True),
    (1, 3, 4, 3, 1, 2, 2, 1, 3, 2, 7, True, False),
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


def test_sampled_conv_falls_back_to_torch(monkeypatch):
    monkeypatch.setenv("SPAR_BACKEND", "triton")
    cpu = torch.device("cpu")
    assert dispatch.backend_for("sampled_conv", cpu) == "torch"
    for p in ("lrt_noise", "sign_mul", "normal"):
        assert dispatch.backend_for(p, cpu) == "triton", p


@pytest.mark.parametrize("estimator", ["reparam", "lrt", "flipout"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_conv_matches_reference_and_torch_backend(monkeypatch, case, estimator):
    nd, C, Co, k, _, _, _, g, S, B, _, shared, _ = case
    inputs, key, geo = _make(case)
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
