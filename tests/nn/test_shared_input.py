"""Shared input (issue 8, defect 2): MonteCarlo gives the model its un-expanded (B, ...)
input; the first Bayesian layer runs on B rows (``shared_input``) and the rest of the model
sees the folded (S*B, ...) batch. Outputs and gradients equal the folded copy's
(``fold_input=True``) within fp32 rounding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import spar
from spar.nn import BayesConv2d, BayesLinear, MonteCarlo
from tests.ops.tolerance import assert_close

ESTIMATORS = ("reparam", "lrt", "flipout")
S, B = 3, 4


def _model(kind: str, estimator: str, stem: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        layers = [nn.Flatten(), nn.Linear(12, 6), nn.LayerNorm(6), nn.Tanh()] if stem else []
        layers += [
            BayesLinear(6, 8, init_sigma=0.2, estimator=estimator),
            nn.ReLU(),
            BayesLinear(8, 3, init_sigma=0.2, estimator=estimator),
        ]
        x = torch.randn(B, 3, 4) if stem else torch.randn(B, 6)
    else:
        layers = [nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU()] if stem else []
        layers += [
            BayesConv2d(3, 4, 3, padding=1, init_sigma=0.2, estimator=estimator),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            BayesLinear(4 * 3 * 3, 3, init_sigma=0.2, estimator=estimator),
        ]
        x = torch.randn(B, 2 if stem else 3, 6, 6)
    return nn.Sequential(*layers), x


def _run(mc: MonteCarlo, x: torch.Tensor):
    x = x.clone().requires_grad_()
    out = mc(x)
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
    grads = torch.autograd.grad(loss, [x, *mc.parameters()])
    return out.detach(), grads


def _grad_terms(mc: MonteCarlo, kind: str) -> list[int]:
    """Terms summed into one element of each gradient, x's first: dx sums the outputs of
    the first Bayesian layer that read it, in all S samples; a parameter's gradient every
    sample's and example's rows, times the 6x6 output positions in the conv stage."""
    spatial = (nn.Conv2d, nn.BatchNorm2d, BayesConv2d)
    per_position = {n for n, m in mc.named_modules() if isinstance(m, spatial)}
    terms = [S * (8 if kind == "linear" else 4 * 3 * 3)]
    for name, _ in mc.named_parameters():
        terms.append(S * B * (6 * 6 if name.rpartition(".")[0] in per_position else 1))
    return terms


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("stem", [False, True])
def test_shared_input_equals_folded_copy(kind, estimator, stem):
    model, x = _model(kind, estimator, stem)
    shared = MonteCarlo(model, S, seed=2)
    shared.data_offset = 5  # per-example noise keyed by the global example index
    folded = MonteCarlo(copy.deepcopy(model), S, seed=2, fold_input=True)
    folded.data_offset = 5
    k_last = 8 if kind == "linear" else 4 * 3 * 3  # the output sums the last layer's K
    names = ["x", *(n for n, _ in shared.named_parameters())]
    for _ in range(2):  # training mode: the step advances the same way
        out_s, g_s = _run(shared, x)
        out_f, g_f = _run(folded, x)
        assert out_s.shape == (S, B, 3)
        assert_close(out_s, out_f, reduction=k_last, msg="output")
        for name, a, b, n in zip(names, g_s, g_f, _grad_terms(shared, kind), strict=True):
            assert_close(a, b, reduction=n, msg=name)
    assert shared.step == folded.step == 2
    folded_bufs = dict(folded.named_buffers())
    for name, buf in shared.named_buffers():
        if name.endswith("running_var"):
            # the conv stem's BatchNorm2d: the unbiased variance of n = B*H*W rows instead
            # of S*B*H*W (MonteCarlo's docstring). Both steps see the same stem output, so
            # with momentum m both runs hold (1-m)^2 + (1 - (1-m)^2) v n/(n-1), one v
            keep, n = (1 - 0.1) ** 2, B * 6 * 6
            unbiased = (folded_bufs[name] - keep) * (S * n - 1) / (S * n)
            assert_close(buf, keep + unbiased * n / (n - 1), reduction=S * n, msg=name)
            buf.copy_(folded_bufs[name])
        else:
            torch.testing.assert_close(buf, folded_bufs[name])
    shared.eval(), folded.eval()
    with torch.no_grad():
        assert_close(shared(x), folded(x), reduction=k_last, msg="eval output")


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("estimator", ["lrt", "flipout"])
def test_first_bayesian_layer_receives_b_rows(kind, estimator):
    model, x = _model(kind, estimator, stem=True)
    bayes = [m for m in model if isinstance(m, spar.nn.BayesModule)]
    seen: list[tuple[int, ...]] = []
    for m in bayes:
        m.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    MonteCarlo(model, S)(x)
    assert seen[0][0] == B  # the un-expanded input reaches the first Bayesian layer
    assert seen[1][0] == S * B  # after it, the folded batch
    seen.clear()
    MonteCarlo(model, S, fold_input=True)(x)
    assert [s[0] for s in seen] == [S * B, S * B]


def test_output_off_every_bayesian_path_is_expanded():
    with pytest.warns(UserWarning, match="without Bayesian layers"):
        mc = MonteCarlo(nn.Linear(3, 2), 4)
    x = torch.randn(5, 3)
    y = mc(x)
    assert y.shape == (4, 5, 2)
    for s in range(4):
        torch.testing.assert_close(y[s], mc.model(x))


class _StemResidual(nn.Module):
    """A deterministic stem followed by a residual block whose first conv is Bayesian: the
    block adds the shared stem output (B rows) to the folded conv output (S*B rows)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = BayesConv2d(4, 4, 3, padding=1, init_sigma=0.1)
        self.head = nn.Sequential(nn.Flatten(), BayesLinear(4 * 5 * 5, 2, init_sigma=0.1))

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head(h + self.conv(h))


def test_residual_around_first_bayesian_layer_needs_fold_input():
    x = torch.randn(B, 3, 5, 5)
    with pytest.raises(RuntimeError) as info:
        MonteCarlo(_StemResidual(), S)(x)
    text = str(info.value) + "".join(getattr(info.value, "__notes__", []))
    assert "fold_input=True" in text and f"B={B}" in text
    y = MonteCarlo(_StemResidual(), S, fold_input=True)(x)
    assert y.shape == (S, B, 2)
    # one sample, or one sample per chunk, needs no fold: shared and folded are the same
    assert MonteCarlo(_StemResidual(), 1)(x).shape == (1, B, 2)
    assert MonteCarlo(_StemResidual(), S, chunk=1)(x).shape == (S, B, 2)


def test_batch_axis_changes_are_reported():
    # a model that reshapes by its *input's* batch size after the Bayesian layer
    class ByInputBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = BayesLinear(6, 4)

        def forward(self, x):
            return self.fc(x).reshape(x.shape[0], 2, 2)

    x = torch.randn(B, 6)
    with pytest.raises(RuntimeError) as info:
        MonteCarlo(ByInputBatch(), S)(x)
    assert "fold_input=True" in "".join(getattr(info.value, "__notes__", [str(info.value)]))
    assert MonteCarlo(ByInputBatch(), S, fold_input=True)(x).shape == (S, B, 2, 2)
    # a layer input that is neither B nor a multiple of S rows names the option too
    with pytest.raises(ValueError, match="B=4 rows of the input shared.*fold_input=True"):
        with spar.sampling(3, seed=0, step=0, batch_size=4):
            BayesLinear(6, 2)(torch.randn(5, 6))


def test_sampling_batch_size_validation():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        with spar.sampling(2, seed=0, step=0, batch_size=0):
            pass
    with pytest.raises(TypeError, match="batch_size must be an int"):
        with spar.sampling(2, seed=0, step=0, batch_size=2.0):
            pass
    with pytest.raises(TypeError, match="fold_input must be a bool"):
        MonteCarlo(BayesLinear(2, 2), 2, fold_input=1)


def test_batch_reshape_before_the_first_bayesian_layer_is_refused():
    """A model that reshapes its batch (B, T, D) -> (B*T, D) before its first Bayesian layer
    would otherwise pass B*T rows as a folded batch and return S identical samples; it gets
    an error pointing to fold_input=True, which gives distinct samples."""
    torch.manual_seed(0)

    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = BayesLinear(4, 3, init_sigma=0.5)

        def forward(self, x):
            return self.fc(x.reshape(-1, 4)).view(-1, x.shape[1], 3)

    x = torch.randn(2, 3, 4)  # B=2, T=3: B*T=6 rows, divisible by S=3
    with pytest.raises(ValueError, match="fold_input=True"):
        MonteCarlo(Tokens(), 3)(x)
    out = MonteCarlo(Tokens(), 3, fold_input=True)(x)
    assert out.shape == (3, 2, 3, 3) and not torch.allclose(out[0], out[1])
