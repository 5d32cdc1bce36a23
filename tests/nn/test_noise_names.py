"""Noise names (issue 8, defect 1): a layer's noise is a function of the sampling key and
its name only, never of how many layers the process built before it; distinct layers of
one model still draw independent noise."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import spar
from spar.nn import BayesConv2d, BayesLinear, MonteCarlo


def _pair():
    """Two layers with identical parameters, with other layers built in between."""
    torch.manual_seed(0)
    a = BayesLinear(4, 3, init_sigma=0.5)
    for _ in range(3):  # what the process built before b must not matter
        BayesLinear(2, 2), BayesConv2d(1, 1, 1)
    b = BayesLinear(4, 3, init_sigma=0.5)
    b.load_state_dict(a.state_dict())
    return a, b


def test_bare_layer_noise_does_not_depend_on_construction_order():
    a, b = _pair()
    x = torch.randn(2 * 5, 4)
    outs = []
    for layer in (a, b):
        with spar.sampling(2, seed=3, step=7):
            outs.append(layer(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert a.noise_name == b.noise_name == ""
    # outside any context too: seed 0 and each layer's own call counter
    a2, b2 = _pair()
    torch.testing.assert_close(a2(x), b2(x), rtol=0, atol=0)
    # and a bare layer's default name is the one assign_noise_names gives it
    c = copy.deepcopy(a)
    spar.nn.assign_noise_names(c)
    with spar.sampling(2, seed=3, step=7):
        torch.testing.assert_close(c(x), outs[0], rtol=0, atol=0)


def test_noise_is_a_function_of_key_and_name():
    a, b = _pair()
    a.noise_name = b.noise_name = "net.fc"
    x = torch.randn(3, 4)
    with spar.sampling(3, seed=1, step=2, first_sample=4):
        ya = a(x.repeat(3, 1))
    with spar.sampling(3, seed=1, step=2, first_sample=4):
        yb = b(x.repeat(3, 1))
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    b.noise_name = "net.other"
    with spar.sampling(3, seed=1, step=2, first_sample=4):
        yc = b(x.repeat(3, 1))
    assert not torch.allclose(ya, yc)
    with pytest.raises(TypeError, match="noise_name must be a str"):
        a.noise_name = 3


class _TwoBranches(nn.Module):
    """Two layers with identical parameters applied to the same input."""

    def __init__(self):
        super().__init__()
        a, b = _pair()
        self.left, self.right = a, b

    def forward(self, x):
        return torch.stack([self.left(x), self.right(x)], dim=1)


def test_distinct_layers_of_one_model_draw_independent_noise():
    model = _TwoBranches()
    mc = MonteCarlo(model, 3, seed=5)
    assert (model.left.noise_name, model.right.noise_name) == ("left", "right")
    y = mc(torch.randn(4, 4))  # (S, B, 2, 3)
    assert not torch.allclose(y[:, :, 0], y[:, :, 1])
    # the names come from the model, so a copy built later draws the same noise
    twin = MonteCarlo(copy.deepcopy(_TwoBranches()), 3, seed=5)
    twin.load_state_dict(mc.state_dict())
    mc.eval(), twin.eval()
    x = torch.randn(4, 4)
    torch.testing.assert_close(mc(x), twin(x), rtol=0, atol=0)


def test_two_unnamed_layers_in_one_context_are_refused():
    model = _TwoBranches()  # never named: both layers would use the name ""
    x = torch.randn(2 * 3, 4)
    with pytest.raises(ValueError, match="unnamed Bayesian layers.*assign_noise_names"):
        with spar.sampling(2, seed=0, step=0):
            model(x)
    # one layer used twice in a context is fine (weight sharing), and naming fixes the rest
    a = model.left
    with spar.sampling(2, seed=0, step=0):
        torch.testing.assert_close(a(x), a(x), rtol=0, atol=0)
    spar.nn.assign_noise_names(model)
    with spar.sampling(2, seed=0, step=0):
        y = model(x)
    assert not torch.allclose(y[:, 0], y[:, 1])
