"""Tests of spar.losses: the ELBO against its formula written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spar import losses, metrics


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cls(s: int, b: int, c: int, seed: int = 0, dtype=torch.float64):
    g = _gen(seed)
    return (
        3.0 * torch.randn(s, b, c, generator=g, dtype=dtype),
        torch.randint(0, c, (b,), generator=g),
    )


def _reg(s: int, b: int, d: int, seed: int = 0):
    g = _gen(seed)
    return (
        torch.randn(s, b, d, generator=g, dtype=torch.float64),
        torch.randn(b, d, generator=g, dtype=torch.float64),
    )


def _ref_ll_categorical(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    s, b, _ = logits.shape
    out = torch.empty(s, b, dtype=logits.dtype)
    for i in range(s):
        for j in range(b):
            out[i, j] = F.log_softmax(logits[i, j], dim=-1)[target[j]]
    return out


def _ref_ll_gaussian(means: torch.Tensor, target: torch.Tensor, sigma: float) -> torch.Tensor:
    s, b, d = means.shape
    out = torch.zeros(s, b, dtype=means.dtype)
    for i in range(s):
        for j in range(b):
            for k in range(d):
                z = (float(target[j, k]) - float(means[i, j, k])) / sigma
                out[i, j] += -0.5 * z * z - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    return out


def _hand_elbo(ll: torch.Tensor, kl: float, n: int, w: float, reduction: str) -> float:
    s, b = ll.shape
    total = 0.0
    for j in range(b):
        if reduction == "mean_samples":
            total += sum(float(ll[i, j]) for i in range(s)) / s
        else:
            total += math.log(sum(math.exp(float(ll[i, j])) for i in range(s)) / s)
    return -total / b + w * kl / n


# --------------------------------------------------------------------------- log_likelihood


@pytest.mark.parametrize(("s", "b", "c"), [(1, 1, 2), (2, 17, 3), (7, 5, 10)])
def test_log_likelihood_categorical(s, b, c):
    logits, target = _cls(s, b, c, seed=1)
    got = losses.log_likelihood(logits, target)
    assert got.shape == (s, b)
    torch.testing.assert_close(got, _ref_ll_categorical(logits, target))


@pytest.mark.parametrize(("s", "b", "d"), [(1, 1, 1), (2, 17, 3), (7, 5, 2)])
def test_log_likelihood_gaussian(s, b, d):
    means, target = _reg(s, b, d, seed=2)
    got = losses.log_likelihood(means, target, "gaussian", noise_std=0.3)
    torch.testing.assert_close(got, _ref_ll_gaussian(means, target, 0.3))
    # agrees with torch.distributions, incl. a per-dim std
    sigma = torch.linspace(0.2, 2.0, d, dtype=torch.float64)
    ref = torch.distributions.Normal(means, sigma).log_prob(target).sum(-1)
    torch.testing.assert_close(losses.log_likelihood(means, target, "gaussian", sigma), ref)


# --------------------------------------------------------------------------- elbo value


@pytest.mark.parametrize("reduction", ["mean_samples", "mixture"])
@pytest.mark.parametrize(("s", "b", "c"), [(1, 1, 2), (2, 17, 3), (7, 5, 10)])
def test_elbo_categorical_equals_hand_formula(reduction, s, b, c):
    logits, target = _cls(s, b, c, seed=3)
    kl, n, w = 123.4, 60_000, 0.3
    got = losses.elbo(
        logits,
        target,
        kl=torch.tensor(kl, dtype=torch.float64),
        dataset_size=n,
        kl_weight=w,
        reduction=reduction,
    )
    assert got.shape == ()
    ref = _hand_elbo(_ref_ll_categorical(logits, target), kl, n, w, reduction)
    assert float(got) == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("reduction", ["mean_samples", "mixture"])
def test_elbo_gaussian_equals_hand_formula(reduction):
    means, target = _reg(4, 9, 3, seed=4)
    got = losses.elbo(
        means,
        target,
        kl=7.0,
        dataset_size=1000,
        likelihood="gaussian",
        reduction=reduction,
        noise_std=0.8,
    )
    ref = _hand_elbo(_ref_ll_gaussian(means, target, 0.8), 7.0, 1000, 1.0, reduction)
    assert float(got) == pytest.approx(ref, rel=1e-10)


def test_mixture_never_exceeds_mean_samples_and_single_sample_agrees():
    for seed in range(5):
        logits, target = _cls(5, 16, 4, seed=10 + seed)
        kw = dict(kl=2.0, dataset_size=50)
        mix = losses.elbo(logits, target, reduction="mixture", **kw)
        mean = losses.elbo(logits, target, reduction="mean_samples", **kw)
        assert float(mix) < float(mean)  # strict: the samples disagree
    logits, target = _cls(1, 16, 4, seed=20)
    kw = dict(kl=0.0, dataset_size=1)
    mix = losses.elbo(logits, target, reduction="mixture", **kw)
    mean = losses.elbo(logits, target, reduction="mean_samples", **kw)
    torch.testing.assert_close(mix, mean)
    torch.testing.assert_close(mean, F.cross_entropy(logits[0], target))


def test_mixture_elbo_without_kl_is_the_metric_nll():
    logits, target = _cls(6, 11, 5, seed=21)
    loss = losses.elbo(logits, target, kl=0.0, dataset_size=1, reduction="mixture")
    torch.testing.assert_close(loss, metrics.nll(logits, target))
    means, y = _reg(6, 11, 3, seed=22)
    loss = losses.elbo(
        means, y, kl=0.0, dataset_size=1, likelihood="gaussian", reduction="mixture", noise_std=0.5
    )
    torch.testing.assert_close(loss / 3, metrics.gaussian_nll(means, y, 0.5))


def test_kl_weight_and_dataset_size_scale_only_the_kl_term():
    logits, target = _cls(3, 8, 4, seed=23)
    base = losses.elbo(logits, target, kl=5.0, dataset_size=10, kl_weight=0.0)
    full = losses.elbo(logits, target, kl=5.0, dataset_size=10, kl_weight=2.0)
    assert float(full - base) == pytest.approx(2.0 * 5.0 / 10, rel=1e-12)
    # a tensor kl_weight (e.g. an annealing schedule kept on device) behaves the same
    tw = losses.elbo(logits, target, kl=5.0, dataset_size=10, kl_weight=torch.tensor(2.0))
    assert float(tw) == pytest.approx(float(full), rel=1e-6)


def test_low_precision_outputs_give_fp32_loss():
    logits, target = _cls(3, 8, 4, seed=24, dtype=torch.bfloat16)
    loss = losses.elbo(logits, target, kl=1.0, dataset_size=10, reduction="mixture")
    assert loss.dtype == torch.float32
    ref = losses.elbo(logits.double(), target, kl=1.0, dataset_size=10, reduction="mixture")
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("reduction", ["mean_samples", "mixture"])
def test_elbo_categorical_gradcheck(reduction):
    logits, target = _cls(3, 4, 5, seed=30)
    logits.requires_grad_(True)
    kl = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    fn = lambda x, k: losses.elbo(x, target, kl=k, dataset_size=20, reduction=reduction)
    assert torch.autograd.gradcheck(fn, (logits, kl))


@pytest.mark.parametrize("reduction", ["mean_samples", "mixture"])
def test_elbo_gaussian_gradcheck_including_noise_std(reduction):
    means, target = _reg(3, 4, 2, seed=31)
    means.requires_grad_(True)
    sigma = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    fn = lambda m, sd: losses.elbo(
        m,
        target,
        kl=0.5,
        dataset_size=7,
        likelihood="gaussian",
        reduction=reduction,
        noise_std=sd,
    )
    assert torch.autograd.gradcheck(fn, (means, sigma))


def test_gradients_reach_every_input_with_the_expected_values():
    logits, target = _cls(4, 6, 3, seed=32)
    logits.requires_grad_(True)
    kl = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    loss = losses.elbo(logits, target, kl=kl, dataset_size=40, kl_weight=0.5)
    loss.backward()
    assert float(kl.grad) == pytest.approx(0.5 / 40)
    # mean_samples: d loss / d logits[s, b] = (softmax - onehot) / (S B)
    expected = (logits.detach().softmax(-1) - F.one_hot(target, 3)) / (4 * 6)
    torch.testing.assert_close(logits.grad, expected)


def test_mixture_gradient_weights_samples_by_responsibility():
    logits, target = _cls(4, 6, 3, seed=33)
    logits.requires_grad_(True)
    losses.elbo(logits, target, kl=0.0, dataset_size=1, reduction="mixture").backward()
    ll = _ref_ll_categorical(logits.detach(), target)  # (S, B)
    resp = ll.softmax(dim=0).unsqueeze(-1)  # posterior weight of each sample per example
    expected = resp * (logits.detach().softmax(-1) - F.one_hot(target, 3)) / 6
    torch.testing.assert_close(logits.grad, expected)


def test_learnable_noise_std_gets_the_analytic_gradient():
    means, target = _reg(1, 10, 2, seed=34)
    log_sigma = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    loss = losses.elbo(
        means, target, kl=0.0, dataset_size=1, likelihood="gaussian", noise_std=log_sigma.exp()
    )
    loss.backward()
    # loss = (1/B) sum_b sum_d [r^2 / (2 sigma^2) + log sigma] + const
    # d/d log sigma = (1/B) sum_b sum_d [1 - r^2 / sigma^2]
    r2 = (target - means[0]).square()
    expected = (1 - r2 / math.exp(0.4)).sum() / 10
    assert float(log_sigma.grad) == pytest.approx(float(expected), rel=1e-10)


# --------------------------------------------------------------------------- bad input


def _ok_args():
    logits, target = _cls(2, 4, 3, seed=40)
    return logits, target, dict(kl=1.0, dataset_size=10)


@pytest.mark.parametrize("dataset_size", [0, -3])
def test_dataset_size_must_be_positive(dataset_size):
    logits, target, kw = _ok_args()
    kw["dataset_size"] = dataset_size
    with pytest.raises(ValueError, match="dataset_size"):
        losses.elbo(logits, target, **kw)


@pytest.mark.parametrize("dataset_size", [2.5, True, "10"])
def test_dataset_size_must_be_int(dataset_size):
    logits, target, kw = _ok_args()
    kw["dataset_size"] = dataset_size
    with pytest.raises(TypeError, match="dataset_size"):
        losses.elbo(logits, target, **kw)


@pytest.mark.parametrize("kl_weight", [-0.1, float("nan"), torch.tensor(-1.0)])
def test_kl_weight_must_be_nonnegative(kl_weight):
    logits, target, kw = _ok_args()
    with pytest.raises(ValueError, match="kl_weight"):
        losses.elbo(logits, target, kl_weight=kl_weight, **kw)


def test_kl_must_be_scalar():
    logits, target, kw = _ok_args()
    kw["kl"] = torch.ones(3)
    with pytest.raises(ValueError, match="kl must be a scalar"):
        losses.elbo(logits, target, **kw)


@pytest.mark.parametrize(
    ("arg", "value", "valid"),
    [
        ("likelihood", "bernoulli", "'categorical', 'gaussian'"),
        ("reduction", "sum", "'mean_samples', 'mixture'"),
        ("reduction", None, "'mean_samples', 'mixture'"),
    ],
)
def test_unknown_choice_lists_valid_values(arg, value, valid):
    logits, target, kw = _ok_args()
    with pytest.raises(ValueError, match=f"{arg} must be one of {valid}"):
        losses.elbo(logits, target, **{arg: value}, **kw)


def test_shape_errors():
    logits, target, kw = _ok_args()
    with pytest.raises(ValueError, match=r"outputs.*\(S, B, C\)"):
        losses.elbo(logits[0], target, **kw)
    with pytest.raises(ValueError, match=r"outputs.*\(S, B, C\)"):
        losses.elbo(logits.unsqueeze(0), target, **kw)
    with pytest.raises(ValueError, match=r"target.*\(B,\) = \(4,\)"):
        losses.elbo(logits, target[:3], **kw)
    with pytest.raises(ValueError, match=r"target.*range \[0, 2\]"):
        losses.elbo(logits, torch.tensor([0, 1, 2, 3]), **kw)
    with pytest.raises(TypeError, match="target"):
        losses.elbo(logits, target.double(), **kw)
    means, y = _reg(2, 4, 3, seed=41)
    with pytest.raises(ValueError, match=r"target.*\(4, 3\)"):
        losses.elbo(means, y[:, :2], likelihood="gaussian", **kw)
    with pytest.raises(ValueError, match=r"outputs.*\(S, B, D\)"):
        losses.log_likelihood(means[0], y, "gaussian")


@pytest.mark.parametrize("noise_std", [0.0, -1.0, torch.tensor([1.0, 0.0, 1.0]), torch.ones(2)])
def test_noise_std_validated(noise_std):
    means, y = _reg(2, 4, 3, seed=42)
    with pytest.raises(ValueError, match="noise_std"):
        losses.elbo(means, y, kl=0.0, dataset_size=1, likelihood="gaussian", noise_std=noise_std)


def _spar_imports(path) -> set[str]:
    """The spar modules (and ``module.name`` for ``from spar.x import name``) a file imports."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "spar"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "spar":
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


@pytest.mark.parametrize("module", [losses, metrics])
def test_losses_and_metrics_depend_only_on_leaf_modules(module):
    """Layering: losses and metrics import neither spar.nn nor spar.distributed (not even
    lazily), nor each other's private names; only the private leaf modules."""
    from pathlib import Path

    imports = _spar_imports(Path(module.__file__))
    allowed = ("spar._prob.", "spar._collectives.")
    assert imports and all(name.startswith(allowed) for name in imports), imports


def test_mixture_gather_is_the_public_collective():
    """The all-gather the mixture loss uses is the one spar.distributed exports."""
    import spar
    from spar import _collectives

    assert losses.all_gather_samples is _collectives.all_gather_samples
    assert spar.distributed.all_gather_samples is _collectives.all_gather_samples
