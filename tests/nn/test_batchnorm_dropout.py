"""Sample-wise BatchNorm and keyed Dropout: each Monte Carlo sample is a separate network.

* BatchNorm: the outputs, gradients and running statistics equal those of a loop over S
  copies of ``torch.nn.BatchNorm`` (one per sample; the running statistics are the copies'
  mean); chunked or shared-input MonteCarlo runs equal the one-pass folded run.
* Dropout: the mask of a (key, sample, example) is the same whichever rank, chunk or batch
  split draws it; the drop rate is ``p`` within the sampling error; eval is the identity.
* ``bayesianize`` swaps both in with their state; ``torch.compile`` traces them.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import spar
from spar.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, Dropout
from tests.ops.tolerance import assert_close

S, B = 3, 5

NORMS = (
    (BatchNorm1d, nn.BatchNorm1d, (4,)),  # (S*B, C)
    (BatchNorm1d, nn.BatchNorm1d, (4, 7)),  # (S*B, C, L)
    (BatchNorm2d, nn.BatchNorm2d, (4, 3, 5)),
    (BatchNorm3d, nn.BatchNorm3d, (4, 2, 3, 2)),
)


def _norm_pair(cls, torch_cls, momentum):
    torch.manual_seed(0)
    ours = cls(4, momentum=momentum)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1.0, 1.0)
        ours.running_mean.uniform_(-1.0, 1.0)
        ours.running_var.uniform_(0.5, 2.0)
    ref = torch_cls(4, momentum=momentum)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(("cls", "torch_cls", "shape"), NORMS)
def test_batchnorm_equals_a_loop_over_per_sample_copies(cls, torch_cls, shape, momentum):
    """Two training steps: each sample normalised by its own rows, the gradients of x and of
    the affine parameters, the running statistics (the copies' mean, unbiased variance) and
    the counter; then eval mode reads the running statistics."""
    ours, ref = _norm_pair(cls, torch_cls, momentum)
    copies = [copy.deepcopy(ref) for _ in range(S)]
    rows = math.prod(shape[1:])  # values per channel per example
    for step in range(2):
        x = (torch.randn(S * B, *shape) * 2 + 0.5).requires_grad_()
        w = torch.randn(S * B, *shape)
        with spar.sampling(S, seed=0, step=step):
            y = ours(x)
        y_ref = torch.cat([c(xs) for c, xs in zip(copies, x.chunk(S), strict=True)])
        assert_close(y, y_ref, reduction=B * rows)
        g_ours = torch.autograd.grad((y * w).sum(), [x, ours.weight, ours.bias])
        params = [x] + [p for c in copies for p in (c.weight, c.bias)]
        g_ref = torch.autograd.grad((y_ref * w).sum(), params)
        g_w = sum(g_ref[1::2])  # the affine parameters are shared by the samples
        g_b = sum(g_ref[2::2])
        terms = (B * rows, S * B * rows, S * B * rows)  # x: one sample's rows; w, b: all
        for got, want, n in zip(g_ours, (g_ref[0], g_w, g_b), terms, strict=True):
            assert_close(got, want, reduction=n)
        for name in ("running_mean", "running_var"):
            want = torch.stack([getattr(c, name) for c in copies]).mean(0)
            assert_close(getattr(ours, name), want, reduction=B * rows, msg=name)
        assert int(ours.num_batches_tracked) == step + 1
    ours.eval()
    avg = copy.deepcopy(ref).eval()
    avg.load_state_dict(ours.state_dict())
    x = torch.randn(S * B, *shape)
    with spar.sampling(S, seed=0, step=0):
        assert_close(ours(x), avg(x))


def test_batchnorm_without_running_stats_uses_batch_statistics_in_eval():
    ours = BatchNorm2d(3, track_running_stats=False).eval()
    ref = nn.BatchNorm2d(3, track_running_stats=False).eval()
    x = torch.randn(S * B, 3, 4, 4)
    with spar.sampling(S, seed=0, step=0):
        y = ours(x)
    assert_close(y, torch.cat([ref(xs) for xs in x.chunk(S)]), reduction=B * 16)
    assert ours.running_mean is None


def test_batchnorm_outside_a_sampling_context_is_torch_batchnorm():
    ours, ref = _norm_pair(BatchNorm2d, nn.BatchNorm2d, 0.1)
    x = torch.randn(6, 4, 3, 3)
    assert_close(ours(x), ref(x), reduction=6 * 9)
    assert_close(ours.running_var, ref.running_var, reduction=6 * 9)


def _cnn(dropout: float = 0.25) -> nn.Module:
    """BatchNorm and Dropout in the stem (shared input), and after Bayesian layers."""
    torch.manual_seed(4)
    return nn.Sequential(
        BatchNorm2d(2),
        Dropout(dropout),
        spar.nn.BayesConv2d(2, 4, 3, padding=1, init_sigma=0.3),
        BatchNorm2d(4),
        nn.ReLU(),
        Dropout(dropout),
        nn.Flatten(),
        spar.nn.BayesLinear(4 * 16, 6, init_sigma=0.3, estimator="flipout"),
        BatchNorm1d(6, momentum=None),
        Dropout(dropout),
        spar.nn.BayesLinear(6, 3, init_sigma=0.3, estimator="lrt"),
    )


def _run_steps(mc: spar.nn.MonteCarlo, steps: int = 2) -> dict:
    x = torch.randn(B, 2, 4, 4, generator=torch.Generator().manual_seed(9))
    outs, grads = [], []
    for _ in range(steps):
        y = mc(x)
        outs.append(y.detach())
        grads.append(torch.autograd.grad(y.square().sum(), list(mc.parameters())))
    buffers = {n: b.clone() for n, b in mc.named_buffers()}
    return {"outs": outs, "grads": grads, "buffers": buffers}


@pytest.mark.parametrize(
    "kw", [dict(fold_input=True), dict(chunk=2), dict(chunk=1, fold_input=True), dict(chunk="auto")]
)
def test_chunked_and_shared_runs_equal_the_folded_one_pass(kw):
    """Outputs, gradients and every buffer (running statistics once per step, counters)
    agree with the default run (shared input, one pass): BatchNorm statistics are per
    sample, and dropout masks are keyed by sample whatever the chunk."""
    want = _run_steps(spar.nn.MonteCarlo(_cnn(), 5, seed=3))
    got = _run_steps(spar.nn.MonteCarlo(_cnn(), 5, seed=3, **kw))
    for a, b in zip(got["outs"], want["outs"], strict=True):
        assert_close(a, b, reduction=6 * B * 16)
    for ga, gb in zip(got["grads"], want["grads"], strict=True):
        for i, (a, b) in enumerate(zip(ga, gb, strict=True)):
            assert_close(a, b, reduction=5 * B * 16 * 4, msg=f"grad {i}")
    assert got["buffers"].keys() == want["buffers"].keys()
    for name, b in want["buffers"].items():
        if b.is_floating_point():
            assert_close(got["buffers"][name], b, reduction=5 * B * 16, msg=name)
        else:  # counters: the step, num_batches_tracked
            assert torch.equal(got["buffers"][name], b), name
    assert int(got["buffers"]["model.3.num_batches_tracked"]) == 2


def test_batchnorm_errors():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel and sample"):
        with spar.sampling(4, seed=0, step=0):
            BatchNorm1d(3)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="divisible by num_samples=3"):
        with spar.sampling(3, seed=0, step=0):
            BatchNorm1d(3)(torch.randn(4, 3))
    with pytest.raises(TypeError, match="floating-point"):
        BatchNorm1d(3)(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        BatchNorm1d(3)(torch.randn(4, 3, 2, 2))


# ----------------------------------------------------------------------------- Dropout


def _dropout(p: float) -> Dropout:
    d = Dropout(p)
    d.noise_name = "drop"
    return d


def test_dropout_masks_depend_on_key_sample_and_example_only():
    """The masks of samples [2, 5) and examples [3, 7) of a 6-sample, 8-example run are
    drawn again by a run holding only them (other first_sample and data_offset, as a rank
    of a grid would), bit for bit; a shared input gives the folded input's masks."""
    d = _dropout(0.4)
    x = torch.randn(8, 5, 3)
    with spar.sampling(6, seed=7, step=2):
        full = d(x.repeat(6, 1, 1)).unflatten(0, (6, 8))
    with spar.sampling(3, seed=7, step=2, first_sample=2, data_offset=3):
        part = d(x[3:7].repeat(3, 1, 1)).unflatten(0, (3, 4))
    assert torch.equal(part, full[2:5, 3:7])
    with spar.sampling(6, seed=7, step=2, batch_size=8):
        shared = d(x)  # the stem's un-expanded (B, ...) input: folded per-sample masks
    assert torch.equal(shared, full.flatten(0, 1))
    with spar.sampling(6, seed=7, step=3):
        other_step = d(x.repeat(6, 1, 1)).unflatten(0, (6, 8))
    assert not torch.equal(other_step, full)
    assert not torch.equal(full[0] == 0, full[1] == 0)  # each sample its own mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_rate_and_scale(p):
    """The dropped fraction is p within 5 standard errors of a Bernoulli(p) mean; the kept
    values are scaled by 1/(1-p); the gradient is the mask times the scale."""
    d = _dropout(p)
    n = 4 * 50_000
    x = torch.ones(4 * 50, 1000, requires_grad=True)
    with spar.sampling(4, seed=1, step=0):
        y = d(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - p) <= 5 * math.sqrt(p * (1 - p) / n)
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, y.detach())


def test_dropout_eval_edge_probabilities_and_inplace():
    x = torch.randn(6, 4)
    d = _dropout(0.5).eval()
    assert d(x) is x
    assert _dropout(0.0)(x) is x
    with spar.sampling(2, seed=0, step=0):
        assert torch.equal(_dropout(1.0)(x), torch.zeros_like(x))
        want = _dropout(0.5)(x)
        inplace = Dropout(0.5, inplace=True)
        inplace.noise_name = "drop"
        x2 = x.clone()
        assert inplace(x2) is not None and torch.equal(x2, want)
    assert isinstance(d, nn.Dropout) and d.p == 0.5
    with pytest.raises(ValueError, match="between 0 and 1"):
        Dropout(1.5)
    with pytest.raises(TypeError, match="floating-point"):
        with spar.sampling(2, seed=0, step=0):
            _dropout(0.5)(torch.ones(4, 2, dtype=torch.int64))


def test_unnamed_dropouts_in_one_context_are_refused():
    a, b = Dropout(0.5), Dropout(0.5)
    with pytest.raises(ValueError, match="unnamed Bayesian layers.*assign_noise_names"):
        with spar.sampling(2, seed=0, step=0):
            b(a(torch.randn(4, 3)))


# ----------------------------------------------------------------------------- bayesianize


def _torch_model() -> nn.Module:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4, momentum=0.3),
        nn.Dropout(0.2),
        nn.Flatten(),
        nn.Linear(16, 5),
        nn.BatchNorm1d(5, affine=False),
        nn.Dropout(0.4, inplace=True),
        nn.Linear(5, 2),
    )
    model(torch.randn(8, 2, 4, 4))  # running statistics that are not the defaults
    model[2].eval()
    return model


def test_bayesianize_swaps_batchnorm_and_dropout_with_their_state():
    model = _torch_model()
    before = copy.deepcopy(model)
    spar.nn.bayesianize(model)
    assert [type(m) for m in model] == [
        spar.nn.BayesConv2d, BatchNorm2d, Dropout, nn.Flatten, spar.nn.BayesLinear,
        BatchNorm1d, Dropout, spar.nn.BayesLinear,
    ]  # fmt: skip
    for i in (1, 5):
        old, new = before[i], model[i]
        assert (new.eps, new.momentum, new.affine) == (old.eps, old.momentum, old.affine)
        for name, t in old.state_dict().items():
            assert torch.equal(new.state_dict()[name], t), name
    assert (model[2].p, model[2].inplace, model[2].training) == (0.2, False, False)
    assert (model[6].p, model[6].inplace, model[6].training) == (0.4, True, True)
    assert model[6].noise_name == "6"

    kept = spar.nn.bayesianize(_torch_model(), sample_wise=False)
    assert type(kept[1]) is nn.BatchNorm2d and type(kept[2]) is nn.Dropout
    skipped = spar.nn.bayesianize(_torch_model(), skip=("1", "6"))
    assert type(skipped[1]) is nn.BatchNorm2d and type(skipped[6]) is nn.Dropout
    assert type(skipped[2]) is Dropout
    assert type(spar.nn.bayesianize(nn.BatchNorm1d(3))) is BatchNorm1d
    with pytest.raises(TypeError, match="sample_wise must be a bool"):
        spar.nn.bayesianize(_torch_model(), sample_wise="yes")


# ----------------------------------------------------------------------------- compile


@pytest.mark.parametrize("chunk", [None, 2])
def test_montecarlo_with_batchnorm_and_dropout_compiles_one_graph(monkeypatch, chunk):
    """``torch.compile(MonteCarlo(...), fullgraph=True)`` of an MLP with both (BatchNorm
    and Dropout on the shared input too): outputs, gradients and buffers agree with eager
    over three training steps, from one graph, in one pass or in chunks. The ``aot_eager``
    backend traces forward and backward as inductor does (fake tensors, functionalized
    buffer updates) without its code generation, which tests/ops/test_compile.py covers
    for the Bayesian ops."""
    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setenv("SPAR_BACKEND", "torch")
    torch._dynamo.reset()
    torch.manual_seed(6)
    model = nn.Sequential(
        BatchNorm1d(4),
        Dropout(0.3),
        spar.nn.BayesLinear(4, 8, init_sigma=0.3),
        BatchNorm1d(8),
        Dropout(0.3),
        spar.nn.BayesLinear(8, 3, init_sigma=0.3, estimator="flipout"),
    )
    eager = spar.nn.MonteCarlo(model, 3, seed=5, chunk=chunk)
    twin = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(twin, fullgraph=True, backend=counter)
    x = torch.randn(B, 4)
    try:
        for _ in range(3):
            y_c, y_e = compiled(x), eager(x)
            assert_close(y_c, y_e, reduction=8 * B)
            g_c = torch.autograd.grad(y_c.square().sum(), list(twin.parameters()))
            g_e = torch.autograd.grad(y_e.square().sum(), list(eager.parameters()))
            for a, b in zip(g_c, g_e, strict=True):
                assert_close(a, b, reduction=3 * B * 8)
        for (name, a), b in zip(twin.named_buffers(), eager.buffers(), strict=True):
            if b.is_floating_point():
                assert_close(a, b, reduction=B, msg=name)
            else:
                assert torch.equal(a, b), name
        assert int(twin.model[3].num_batches_tracked) == 3
        assert counter.frame_count == 1, "recompiled as the step advanced"
    finally:
        torch._dynamo.reset()
