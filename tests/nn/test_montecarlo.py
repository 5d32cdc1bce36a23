"""MonteCarlo: folded batch, step counter, reproducible resume (I5)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import spar
from spar.nn import BayesLinear, MonteCarlo


def _model():
    torch.manual_seed(0)
    return nn.Sequential(BayesLinear(5, 8, init_sigma=0.1), nn.ReLU(), BayesLinear(8, 3))


def test_output_shape_and_sample_independence():
    mc = MonteCarlo(_model(), 4, seed=3)
    x = torch.randn(6, 5)
    y = mc(x)
    assert y.shape == (4, 6, 3)
    assert not torch.allclose(y[0], y[1])
    # the same example in two batch positions sees the same weights within a sample
    y2 = MonteCarlo(_model(), 4, seed=3)(torch.cat([x[:1], x[:1]]))
    torch.testing.assert_close(y2[:, 0], y2[:, 1])


def test_samples_split_like_ranks_would():
    model = _model()
    x = torch.randn(2, 5)
    full = MonteCarlo(model, 6, seed=1).eval()(x)
    lo = MonteCarlo(model, 3, seed=1, first_sample=0).eval()(x)
    hi = MonteCarlo(model, 3, seed=1, first_sample=3).eval()(x)
    torch.testing.assert_close(torch.cat([lo, hi]), full)


def test_step_advances_in_training_only():
    mc = MonteCarlo(_model(), 2)
    x = torch.randn(3, 5)
    a = mc(x)
    assert mc.step == 1
    b = mc(x)
    assert mc.step == 2 and not torch.allclose(a, b)
    mc.eval()
    c, d = mc(x), mc(x)
    assert mc.step == 2
    torch.testing.assert_close(c, d)


def _train(mc, opt, steps, data):
    for i in range(steps):
        x, y = data[i]
        out = mc(x)
        loss = spar.losses.elbo(out, y, kl=spar.nn.kl_divergence(mc), dataset_size=100)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_resume_from_state_dict_is_bit_identical():
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(4, 5, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(6)
    ]
    mc = MonteCarlo(_model(), 3, seed=2)
    opt = torch.optim.Adam(mc.parameters(), lr=1e-2)
    _train(mc, opt, 6, data)

    mc2 = MonteCarlo(_model(), 3, seed=2)
    opt2 = torch.optim.Adam(mc2.parameters(), lr=1e-2)
    _train(mc2, opt2, 3, data)
    buf = io.BytesIO()
    torch.save({"model": mc2.state_dict(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    mc3 = MonteCarlo(_model(), 3, seed=2)
    opt3 = torch.optim.Adam(mc3.parameters(), lr=1e-2)
    mc3.load_state_dict(state["model"])
    opt3.load_state_dict(state["opt"])
    assert mc3.step == 3
    _train(mc3, opt3, 3, data[3:])
    for a, b in zip(mc.state_dict().values(), mc3.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_errors_and_warning():
    with pytest.raises(ValueError, match="num_samples"):
        MonteCarlo(_model(), 0)
    with pytest.raises(TypeError, match="num_samples"):
        MonteCarlo(_model(), 2.0)
    with pytest.raises(ValueError, match="seed"):
        MonteCarlo(_model(), 2, seed=-1)
    with pytest.warns(UserWarning, match="without Bayesian layers"):
        MonteCarlo(nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="folded batch"):
        MonteCarlo(nn.Sequential(BayesLinear(2, 2), nn.Flatten(0)), 2)(torch.randn(3, 2))


def test_estimator_override():
    model = _model()
    MonteCarlo(model, 2)  # None: left as it is
    assert [m.estimator for m in (model[0], model[2])] == ["reparam", "reparam"]
    ids = model[2]._ids()
    mc = MonteCarlo(model, 2, estimator="flipout")
    assert [m.estimator for m in (model[0], model[2])] == ["flipout", "flipout"]
    assert model[2].noise_name == "2" and model[2]._ids()["weight_id"] == ids["weight_id"]
    assert mc(torch.randn(3, 5)).shape == (2, 3, 3)
    with pytest.raises(ValueError, match="estimator must be one of"):
        MonteCarlo(model, 2, estimator="vmap")
    assert model[0].estimator == "flipout"  # a refused wrapper changed nothing


def test_argument_types():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        MonteCarlo(lambda x: x, 2)
    with pytest.raises(ValueError, match="first_sample"):
        MonteCarlo(_model(), 2, first_sample=-1)
    with pytest.raises(TypeError, match="batched tensor"):
        MonteCarlo(_model(), 2)(torch.tensor(1.0))
