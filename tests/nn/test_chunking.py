"""Sample chunking (issue 8, defect 5): ``MonteCarlo(..., chunk=c)`` runs the model on
chunks of c samples with the noise of one pass (noise is keyed by the global sample index),
so outputs and gradients equal the unchunked ones within fp32 rounding; backward visits one
chunk at a time."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import spar
from spar.losses import elbo
from spar.nn import BayesConv2d, BayesLinear, MonteCarlo
from spar.nn import montecarlo as mcmod
from tests.ops.tolerance import assert_close

ESTIMATORS = ("reparam", "lrt", "flipout")
S, B = 5, 3


def _model(kind: str, estimator: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        net = nn.Sequential(
            BayesLinear(6, 8, init_sigma=0.2, estimator=estimator),
            nn.ReLU(),
            BayesLinear(8, 3, init_sigma=0.2, estimator=estimator),
        )
        return net, torch.randn(B, 6)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 1),  # a deterministic stem: it runs once per chunk
        BayesConv2d(3, 4, 3, padding=1, init_sigma=0.2, estimator=estimator),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        BayesLinear(4 * 3 * 3, 3, init_sigma=0.2, estimator=estimator),
    )
    return net, torch.randn(B, 2, 6, 6)


def _grad_terms(mc: MonteCarlo, kind: str) -> list[int]:
    """Terms summed into one element of each gradient, x's first: dx sums the outputs of
    the first Bayesian layer that read it, in all S samples; a parameter's gradient every
    sample's and example's rows, times the 6x6 output positions in the conv stage."""
    spatial = {n for n, m in mc.named_modules() if isinstance(m, nn.Conv2d | BayesConv2d)}
    terms = [S * (8 if kind == "linear" else 4 * 3 * 3)]
    for name, _ in mc.named_parameters():
        terms.append(S * B * (6 * 6 if name.rpartition(".")[0] in spatial else 1))
    return terms


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("reduction", ["mean_samples", "mixture"])
@pytest.mark.parametrize("chunk", [1, 2, "auto-1", "auto"])
def test_chunked_equals_one_pass(kind, estimator, reduction, chunk, monkeypatch):
    expect = {1: 1, 2: 2, "auto": S, "auto-1": 1}[chunk]
    if chunk == "auto-1":  # no room at all: one sample per chunk
        monkeypatch.setattr(mcmod, "AUTO_CHUNK_ELEMENTS", 1)
        chunk = "auto"
    model, x = _model(kind, estimator)
    y = torch.tensor([0, 2, 1])
    runs = {}
    for c in (None, chunk):
        mc = MonteCarlo(copy.deepcopy(model), S, seed=4, first_sample=2, chunk=c)
        mc.data_offset = 6
        outs, grads = [], []
        for _ in range(2):  # two training steps: the step advances once per forward
            xr = x.clone().requires_grad_()
            out = mc(xr)
            loss = elbo(out, y, kl=spar.nn.kl_divergence(mc), dataset_size=50, reduction=reduction)
            grads.append(torch.autograd.grad(loss, [xr, *mc.parameters()]))
            outs.append(out.detach())
        assert mc.step == 2 and mc.chunk_size(x) == (S if c is None else expect)
        runs[c] = (outs, grads)
    (o1, g1), (o2, g2) = runs[None], runs[chunk]
    k_last = 8 if kind == "linear" else 4 * 3 * 3  # the output sums the last layer's K
    for a, b in zip(o1, o2, strict=True):
        assert a.shape == b.shape == (S, B, 3)
        assert_close(a, b, reduction=k_last, msg="output")
    names = ["x", *(n for n, _ in mc.named_parameters())]
    for ga, gb in zip(g1, g2, strict=True):
        for name, a, b, n in zip(names, ga, gb, _grad_terms(mc, kind), strict=True):
            assert_close(a, b, reduction=n, msg=name)


def test_each_chunk_gets_the_shared_input_and_backward_goes_chunk_by_chunk():
    model, x = _model("linear", "lrt")
    first, last = model[0], model[2]
    rows, order = [], []
    calls = {"first": 0, "last": 0}

    def tag(name):
        def hook(mod, args, out):
            k = calls[name]
            calls[name] += 1
            rows.append((name, args[0].shape[0]))
            out.register_hook(lambda g: order.append((name, k)))

        return hook

    first.register_forward_hook(tag("first"))
    last.register_forward_hook(tag("last"))
    out = MonteCarlo(model, S, chunk=2)(x)  # chunks of 2, 2, 1 samples
    assert rows == [("first", B), ("last", 2 * B), ("first", B), ("last", 2 * B),
                    ("first", B), ("last", 1 * B)]  # fmt: skip
    out.sum().backward()
    # depth first: the last chunk's whole graph, then the one before it, ...
    assert order == [("last", 2), ("first", 2), ("last", 1), ("first", 1),
                     ("last", 0), ("first", 0)]  # fmt: skip


def test_auto_chunk_is_measured_per_input_shape(monkeypatch):
    model, x = _model("linear", "reparam")  # Linear(6, 8), ReLU, Linear(8, 3)
    per_sample = B * (8 + 8 + 3)  # the distinct module outputs of one sample
    monkeypatch.setattr(mcmod, "AUTO_CHUNK_ELEMENTS", 2 * per_sample + 1)
    mc = MonteCarlo(model, S, chunk="auto")
    assert mc.chunk_size(x) is None  # not measured yet
    with torch.no_grad():
        y = mc(x)
    assert mc.chunk_size(x) == 2 and y.shape == (S, B, 3)
    assert mc.chunk_size(torch.randn(2 * B, 6)) is None  # another shape: measured anew
    calls = []
    model[0].register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    ref = MonteCarlo(model, S).eval()
    ref.step = mc.eval().step  # 1: the training-mode call above advanced it
    assert_close(mc(x), ref(x), reduction=8)  # the last layer sums K=8 terms
    assert calls[:3] == [B, B, B]  # chunks of 2, 2, 1: the first layer gets B rows each time
    # an MLP on the default budget: no chunking (it would not pay)
    monkeypatch.undo()
    big = MonteCarlo(
        nn.Sequential(BayesLinear(784, 512), nn.ReLU(), BayesLinear(512, 10)), 8, chunk="auto"
    )
    xb = torch.randn(128, 784)
    big(xb)
    assert big.chunk_size(xb) == 8
    assert MonteCarlo(model, 8, chunk=20).chunk_size(xb) == 8  # clamped to S
    assert MonteCarlo(model, 8).chunk_size(xb) == 8


def test_chunk_validation_and_batchnorm_warning():
    model, x = _model("linear", "reparam")
    for bad in (0, -2, "big"):
        with pytest.raises(ValueError, match="chunk must be"):
            MonteCarlo(model, 4, chunk=bad)
    for bad in (1.5, True, [2]):
        with pytest.raises(TypeError, match="chunk must be"):
            MonteCarlo(model, 4, chunk=bad)
    with pytest.warns(UserWarning, match="chunk=.*BatchNorm"):
        MonteCarlo(nn.Sequential(BayesLinear(2, 2), nn.BatchNorm1d(2)), 4, chunk=2)
    assert "chunk=2" in repr(MonteCarlo(model, 4, chunk=2))


@pytest.mark.slow  # inductor compiles
@pytest.mark.parametrize("chunk", [2, "auto"])
def test_chunked_montecarlo_compiles_one_graph(chunk, monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setenv("SPAR_BACKEND", "torch")
    monkeypatch.setattr(mcmod, "AUTO_CHUNK_ELEMENTS", 2 * B * (8 + 8 + 3))  # auto: c = 2
    torch._dynamo.reset()
    model, x = _model("linear", "flipout")
    eager = MonteCarlo(model, S, chunk=chunk)
    with torch.no_grad():
        eager.eval()(x)  # "auto" measures its chunk in eager mode; the copy keeps it
    eager.train()
    twin = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(twin, fullgraph=True, backend=counter)
    try:
        for _ in range(2):
            y_c, y_e = compiled(x), eager(x)
            assert_close(y_c, y_e, reduction=8, msg="output")  # the last layer's K=8
            g_c = torch.autograd.grad(y_c.square().sum(), list(twin.parameters()))
            g_e = torch.autograd.grad(y_e.square().sum(), list(eager.parameters()))
            for a, b in zip(g_c, g_e, strict=True):  # summed over the S*B rows
                assert_close(a, b, reduction=S * B, msg="gradient")
        assert twin.step == eager.step == 2 and twin.chunk_size(x) == 2
        assert counter.frame_count == 1
    finally:
        torch._dynamo.reset()
