"""bayesianize: every Linear/Conv replaced, weights kept as posterior means."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spar
from spar.nn import BayesConv1d, BayesConv2d, BayesLinear, MonteCarlo, bayesianize
from tests.ops.tolerance import assert_close


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding="same", padding_mode="reflect"), nn.ReLU(),
        )  # fmt: skip
        self.seq = nn.Conv1d(8, 8, 2, groups=2)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * 4 * 3, 16), nn.ReLU(), nn.Linear(16, 3)
        )

    def forward(self, x):
        h = self.features(x)
        # h.shape[0], not x.shape[0]: MonteCarlo passes x un-expanded (B rows) and h is
        # the folded (S*B) activation after the Bayesian layers
        h = self.seq(h.flatten(2))[..., :12].reshape(h.shape[0], 8, 4, 3)
        return self.head(h)


def test_every_layer_replaced_and_outputs_reproduced_as_sigma_vanishes():
    torch.manual_seed(0)
    model = SmallCNN()
    x = torch.randn(5, 1, 8, 8)
    expected = model(x)
    out = bayesianize(model, init_sigma=1e-10)
    assert out is model
    kinds = [type(m) for m in model.modules()]
    assert not any(t in (nn.Linear, nn.Conv1d, nn.Conv2d) for t in kinds)
    assert kinds.count(BayesConv2d) == 2 and kinds.count(BayesLinear) == 2
    assert kinds.count(BayesConv1d) == 1
    mc = MonteCarlo(model, 3)
    y = mc(x)
    assert y.shape == (3, 5, 3)
    for s in range(3):  # the head's Linear(16, 3) sums 16 terms
        assert_close(y[s], expected, reduction=16, msg=f"sample {s}")


def test_skip_and_noise_names():
    model = SmallCNN()
    bayesianize(model, skip=["head.3", "seq"])
    assert type(model.head[3]) is nn.Linear and type(model.seq) is nn.Conv1d
    assert isinstance(model.head[1], BayesLinear)
    assert model.head[1].noise_name == "head.1"
    assert model.features[0].noise_name == "features.0"
    with pytest.raises(ValueError, match="not modules"):
        bayesianize(SmallCNN(), skip=["nope"])


def test_posterior_samples_spread_and_priors():
    torch.manual_seed(1)
    lin = nn.Linear(4, 2)
    model = bayesianize(nn.Sequential(lin), init_sigma=0.1, prior=spar.nn.pretrained_prior(0.5))
    layer = model[0]
    torch.testing.assert_close(layer.weight_prior_mean, lin.weight.detach())
    torch.testing.assert_close(layer.sigma("weight"), torch.full((2, 4), 0.1))
    # posterior mean equals prior mean: KL only from the variances
    s, p = 0.1, 0.5
    per = 0.5 * (s**2 / p**2 - 1) - torch.log(torch.tensor(s / p))
    assert_close(layer.kl(), per * 10, reduction=10)  # a sum over the 10 parameters
    y = MonteCarlo(model, 4)(torch.randn(3, 4))
    assert (y.std(0) > 0).all()


def test_bayesianize_a_bare_layer_returns_the_replacement():
    conv = nn.Conv2d(2, 3, 3)
    new = bayesianize(conv)
    assert isinstance(new, BayesConv2d)
    torch.testing.assert_close(new.weight_mu, conv.weight)


def test_non_finite_weights_are_refused():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"2\.weight has non-finite values"):
        bayesianize(model)
    assert type(model[0]) is nn.Linear  # nothing was replaced


@pytest.mark.parametrize("estimator", ["reparam", "lrt", "flipout"])
def test_bayesianize_sets_the_estimator(estimator):
    torch.manual_seed(0)
    model = bayesianize(SmallCNN(), estimator=estimator, init_sigma=0.05)
    layers = [m for m in model.modules() if isinstance(m, spar.nn.BayesModule)]
    assert len(layers) == 5 and {m.estimator for m in layers} == {estimator}
    assert bayesianize(nn.Linear(2, 2), estimator=estimator).estimator == estimator
    assert MonteCarlo(model, 2)(torch.randn(3, 1, 8, 8)).shape == (2, 3, 3)


def test_bayesianize_refuses_bad_arguments_before_changing_anything():
    model = SmallCNN()
    with pytest.raises(ValueError, match="estimator must be one of"):
        bayesianize(model, estimator="mcdropout")
    with pytest.raises(ValueError, match="init_sigma"):
        bayesianize(model, init_sigma=0.0)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        bayesianize("resnet18")
    assert not any(isinstance(m, spar.nn.BayesModule) for m in model.modules())
