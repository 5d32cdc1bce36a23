"""Tests of spar.metrics against brute-force references written out loop by loop."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from spar import metrics
from tests.ops.tolerance import assert_at_most, assert_close

SHAPES = [(1, 1, 2), (2, 17, 3), (7, 59, 10), (4, 8, 1)]
# Tolerances are the policy's (tests/ops/tolerance.py), ``reduction`` the terms summed into
# one element: every logit of an example for a per-example value of (S, B, C) logits (the
# C-way softmax of each of S samples), every logit for a scalar over the batch (S*B*C).


def _f64(value: float | list[float]) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _case(s: int, b: int, c: int, seed: int = 0, scale: float = 3.0):
    g = _gen(seed)
    logits = scale * torch.randn(s, b, c, generator=g, dtype=torch.float64)
    target = torch.randint(0, c, (b,), generator=g)
    return logits, target


# --------------------------------------------------------------------------- references


def _ref_probs(logits: torch.Tensor) -> list[list[float]]:
    s, b, c = logits.shape
    out = []
    for j in range(b):
        acc = [0.0] * c
        for i in range(s):
            row = logits[i, j].tolist()
            m = max(row)
            z = sum(math.exp(v - m) for v in row)
            for k in range(c):
                acc[k] += math.exp(row[k] - m) / z / s
        out.append(acc)
    return out


def _ref_entropy(p: list[float]) -> float:
    return -sum(v * math.log(v) for v in p if v > 0)


def _ref_sample_probs(logits: torch.Tensor, i: int, j: int) -> list[float]:
    row = logits[i, j].tolist()
    m = max(row)
    z = sum(math.exp(v - m) for v in row)
    return [math.exp(v - m) / z for v in row]


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize("shape", SHAPES)
def test_predictive_probs_matches_loop(shape):
    logits, _ = _case(*shape)
    got = metrics.predictive_probs(logits)
    assert got.shape == shape[1:]
    torch.testing.assert_close(got, torch.tensor(_ref_probs(logits), dtype=torch.float64))
    torch.testing.assert_close(got.sum(-1), torch.ones(shape[1], dtype=torch.float64))


@pytest.mark.parametrize("shape", SHAPES)
def test_entropies_and_mutual_information_match_loop(shape):
    logits, _ = _case(*shape, seed=1)
    s, b, c = shape
    probs = _ref_probs(logits)
    pe = [_ref_entropy(p) for p in probs]
    ee = [
        sum(_ref_entropy(_ref_sample_probs(logits, i, j)) for i in range(s)) / s for j in range(b)
    ]
    mi = [max(x - y, 0.0) for x, y in zip(pe, ee, strict=True)]
    as_t = lambda v: torch.tensor(v, dtype=torch.float64)
    torch.testing.assert_close(metrics.predictive_entropy(logits), as_t(pe))
    torch.testing.assert_close(metrics.expected_entropy(logits), as_t(ee))
    assert_close(metrics.mutual_information(logits), as_t(mi), reduction=s * c)


def test_mutual_information_zero_when_samples_agree_positive_when_they_disagree():
    one = torch.randn(1, 33, 5, generator=_gen(2))
    agree = one.expand(7, 33, 5)
    mi = metrics.mutual_information(agree)
    assert mi.shape == (33,)
    assert torch.all(mi >= 0)
    assert_close(mi, torch.zeros_like(mi), reduction=7 * 5)

    # Two confident samples that each pick a different class: the predictive is ~(1/2, 1/2)
    # while each sample is ~certain, so MI -> log 2.
    disagree = torch.tensor([[[20.0, -20.0]], [[-20.0, 20.0]]])
    assert_close(metrics.mutual_information(disagree), _f64([math.log(2)]), reduction=2 * 2)
    assert_close(metrics.expected_entropy(disagree), _f64([0.0]), reduction=2 * 2)

    mixed = torch.randn(5, 33, 5, generator=_gen(3))
    assert bool(torch.all(metrics.mutual_information(mixed) > 0))


def test_entropies_finite_for_extreme_logits():
    logits = torch.tensor([[[1e4, -1e4, 0.0]], [[-1e4, 1e4, 0.0]], [[0.0, 0.0, 1e4]]])
    for fn in (metrics.predictive_entropy, metrics.expected_entropy, metrics.mutual_information):
        value = fn(logits)
        assert bool(torch.isfinite(value).all())
    entropy = metrics.predictive_entropy(logits)
    assert_close(entropy, _f64([math.log(3)]), reduction=3 * 3)
    assert_at_most(entropy, math.log(3), reduction=3 * 3)


@pytest.mark.parametrize("shape", SHAPES)
def test_nll_matches_loop_and_jensen(shape):
    logits, target = _case(*shape, seed=4)
    s, b, c = shape
    probs = _ref_probs(logits)
    ref = -sum(math.log(probs[j][int(target[j])]) for j in range(b)) / b
    got = metrics.nll(logits, target)
    assert got.shape == ()
    assert_close(got, _f64(ref), reduction=s * b * c)

    mean_samples = -sum(
        math.log(_ref_sample_probs(logits, i, j)[int(target[j])])
        for i in range(s)
        for j in range(b)
    ) / (s * b)
    assert_at_most(got, mean_samples, reduction=s * b * c)  # Jensen
    if s == 1:
        assert_close(got, _f64(mean_samples), reduction=s * b * c)


def test_nll_stable_when_every_sample_is_confidently_wrong():
    logits = torch.tensor([[[500.0, -500.0]], [[400.0, -400.0]]])
    got = metrics.nll(logits, torch.tensor([1]))
    # log mean_s exp(-1000), exp(-800) = -800 - log 2 up to exp(-200)
    assert_close(got, _f64(800.0 + math.log(2)), reduction=2 * 2)


@pytest.mark.parametrize("shape", SHAPES)
def test_brier_matches_loop(shape):
    logits, target = _case(*shape, seed=5)
    s, b, c = shape
    probs = _ref_probs(logits)
    ref = sum(
        sum((p - (1.0 if k == int(target[j]) else 0.0)) ** 2 for k, p in enumerate(row))
        for j, row in enumerate(probs)
    ) / len(probs)
    assert_close(metrics.brier(logits, target), _f64(ref), reduction=s * b * c)


def test_brier_perfect_and_worst():
    target = torch.tensor([0, 2, 1])
    perfect = (100.0 * torch.nn.functional.one_hot(target, 3).double()).unsqueeze(0)
    assert_close(metrics.brier(perfect, target), _f64(0.0), reduction=3 * 3)
    wrong = torch.tensor([1, 0, 2])
    assert_close(metrics.brier(perfect, wrong), _f64(2.0), reduction=3 * 3)


@pytest.mark.parametrize("shape", SHAPES)
def test_accuracy_matches_loop(shape):
    logits, target = _case(*shape, seed=6)
    probs = _ref_probs(logits)
    ref = sum(
        max(range(len(r)), key=r.__getitem__) == int(t) for r, t in zip(probs, target, strict=True)
    )
    assert_close(metrics.accuracy(logits, target), _f64(ref / len(probs)), reduction=shape[1])


def test_accuracy_uses_predictive_probabilities_not_mean_logits():
    # Sample 0 is sure of class 0; sample 1 prefers class 1 mildly. Mean logits pick class 1,
    # the mean of the probabilities (the Bayesian predictive) picks class 0.
    logits = torch.tensor([[[10.0, 0.0, 0.0]], [[-10.0, 1.0, 0.0]]])
    assert int(logits.mean(0).argmax(-1)) == 1
    assert float(metrics.accuracy(logits, torch.tensor([0]))) == 1.0


def _two_class_logits(confidence: list[float]) -> torch.Tensor:
    """(1, B, 2) logits whose softmax is (p, 1 - p): class 0 predicted with confidence p."""
    p = torch.tensor(confidence, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()], dim=-1).unsqueeze(0)


def _calibration_case(groups: list[tuple[float, int, int]]):
    """groups of (confidence, n, n_correct) -> logits (1, B, 2), target (B,)."""
    conf, target = [], []
    for p, n, k in groups:
        conf += [p] * n
        target += [0] * k + [1] * (n - k)
    return _two_class_logits(conf), torch.tensor(target)


def test_ece_zero_on_perfectly_calibrated_case():
    logits, target = _calibration_case([(0.65, 20, 13), (0.75, 40, 30), (0.95, 100, 95)])
    n = 2 * 160  # S=1, B=160, C=2
    assert_close(metrics.ece(logits, target), _f64(0.0), reduction=n)
    for n_bins in (1, 4, 10, 15):
        assert_close(metrics.ece(logits, target, n_bins=n_bins), _f64(0.0), reduction=n)


def test_ece_known_value_on_miscalibrated_case():
    # 40 examples at confidence 0.9 with accuracy 0.5; 60 at 0.7 with accuracy 0.7.
    logits, target = _calibration_case([(0.9, 40, 20), (0.7, 60, 42)])
    assert_close(metrics.ece(logits, target, n_bins=10), _f64(0.4 * 0.4), reduction=2 * 100)
    # One bin pools both groups: |0.62 - 0.78| = 0.16 too; 0.9 and 0.7 can't cancel here.
    assert_close(metrics.ece(logits, target, n_bins=1), _f64(0.16), reduction=2 * 100)
    # Overconfident everywhere: conf 0.8, accuracy 0.5 -> ECE 0.3.
    logits, target = _calibration_case([(0.8, 50, 25)])
    assert_close(metrics.ece(logits, target), _f64(0.3), reduction=2 * 50)


def _ref_ece(logits: torch.Tensor, target: torch.Tensor, n_bins: int):
    probs = _ref_probs(logits)
    count = [0] * n_bins
    conf_sum = [0.0] * n_bins
    acc_sum = [0.0] * n_bins
    for row, t in zip(probs, target.tolist(), strict=True):
        conf = max(row)
        pred = row.index(conf)
        b = min(max(math.ceil(conf * n_bins) - 1, 0), n_bins - 1)
        count[b] += 1
        conf_sum[b] += conf
        acc_sum[b] += float(pred == t)
    n = len(probs)
    value = sum(abs(a - c) / n for a, c in zip(acc_sum, conf_sum, strict=True))
    return value, count, conf_sum, acc_sum


@pytest.mark.parametrize("n_bins", [1, 3, 15, 40])
def test_reliability_matches_loop(n_bins):
    logits, target = _case(5, 97, 4, seed=7, scale=1.5)
    value, count, conf_sum, acc_sum = _ref_ece(logits, target, n_bins)
    res = metrics.reliability(logits, target, n_bins=n_bins)
    assert_close(res.ece, _f64(value), reduction=5 * 97 * 4)
    torch.testing.assert_close(metrics.ece(logits, target, n_bins=n_bins), res.ece)
    assert res.bin_count.tolist() == count
    assert res.bin_edges.shape == (n_bins + 1,)
    assert float(res.bin_edges[0]) == 0.0 and float(res.bin_edges[-1]) == 1.0
    for b in range(n_bins):
        if count[b] == 0:
            assert math.isnan(float(res.bin_confidence[b]))
            assert math.isnan(float(res.bin_accuracy[b]))
        else:
            n = 5 * count[b] * 4  # the bin's examples' logits
            assert_close(res.bin_confidence[b], _f64(conf_sum[b] / count[b]), reduction=n)
            assert_close(res.bin_accuracy[b], _f64(acc_sum[b] / count[b]), reduction=count[b])
            lo, hi = float(res.bin_edges[b]), float(res.bin_edges[b + 1])
            assert lo <= float(res.bin_confidence[b]) <= hi


def test_reliability_confidence_one_falls_in_last_bin():
    logits = torch.tensor([[[100.0, -100.0], [0.3, 0.0]]])
    res = metrics.reliability(logits, torch.tensor([0, 0]), n_bins=5)
    assert res.bin_count.tolist() == [0, 0, 1, 0, 1]


# --------------------------------------------------------------------------- OOD AUROC


@pytest.mark.parametrize(
    ("n_in", "n_out", "integer"),
    [(1, 1, False), (50, 70, False), (200, 31, True), (17, 59, True), (500, 500, True)],
)
def test_ood_auroc_matches_sklearn(n_in, n_out, integer):
    g = _gen(n_in * 1000 + n_out)
    a = torch.randn(n_in, generator=g)
    b = torch.randn(n_out, generator=g) + 0.5
    if integer:  # coarse scores: many ties within and across the two sets
        a, b = (a * 2).round(), (b * 2).round()
    labels = [0] * n_in + [1] * n_out
    ref = roc_auc_score(labels, torch.cat([a, b]).numpy())
    # fp64 ranks (Mann-Whitney U): the OOD scores' ranks are summed
    assert_close(_f64(metrics.ood_auroc(a, b)), _f64(ref), reduction=n_in + n_out)


def test_ood_auroc_extremes_and_inputs():
    a = torch.arange(10.0)
    assert metrics.ood_auroc(a, a + 100) == 1.0
    assert metrics.ood_auroc(a + 100, a) == 0.0
    assert metrics.ood_auroc(torch.ones(7), torch.ones(3)) == 0.5
    # array-likes, integer dtype and infinite scores are fine
    assert metrics.ood_auroc([0, 1, 2], [3, float("inf")]) == 1.0
    assert isinstance(metrics.ood_auroc(a.double(), a), float)


@pytest.mark.parametrize(
    ("scores_in", "scores_out", "match"),
    [
        (torch.ones(0), torch.ones(3), "scores_in"),
        (torch.ones(3), torch.ones(2, 2), "scores_out"),
        (torch.tensor([0.0, float("nan")]), torch.ones(3), "scores_in.*NaN"),
    ],
)
def test_ood_auroc_bad_input(scores_in, scores_out, match):
    with pytest.raises(ValueError, match=match):
        metrics.ood_auroc(scores_in, scores_out)


# --------------------------------------------------------------------------- regression


def _reg_case(s: int, b: int, d: int, seed: int):
    g = _gen(seed)
    means = torch.randn(s, b, d, generator=g, dtype=torch.float64)
    target = torch.randn(b, d, generator=g, dtype=torch.float64)
    return means, target


@pytest.mark.parametrize(("s", "b", "d"), [(1, 1, 1), (2, 17, 3), (7, 5, 2)])
def test_gaussian_nll_matches_loop(s, b, d):
    means, target = _reg_case(s, b, d, seed=8)
    sigma = 0.7
    total = 0.0
    for j in range(b):
        p = 0.0
        for i in range(s):
            dens = 1.0
            for k in range(d):
                z = (float(target[j, k]) - float(means[i, j, k])) / sigma
                dens *= math.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi))
            p += dens / s
        total -= math.log(p)
    ref = total / (b * d)
    got = metrics.gaussian_nll(means, target, sigma)
    assert_close(got, _f64(ref), reduction=s * b * d)


def test_gaussian_nll_single_sample_is_elementwise_gaussian_nll():
    means, target = _reg_case(1, 13, 4, seed=9)
    sigma = torch.tensor([0.5, 1.0, 2.0, 0.1], dtype=torch.float64)
    ref = torch.nn.functional.gaussian_nll_loss(
        means[0], target, sigma.square().expand(13, 4), full=True
    )
    torch.testing.assert_close(metrics.gaussian_nll(means, target, sigma), ref)


def test_gaussian_nll_gradient_reaches_noise_std():
    means, target = _reg_case(3, 6, 2, seed=10)
    means.requires_grad_(True)
    log_sigma = torch.zeros((), dtype=torch.float64, requires_grad=True)
    metrics.gaussian_nll(means, target, log_sigma.exp()).backward()
    assert means.grad is not None and bool(torch.isfinite(means.grad).all())
    assert log_sigma.grad is not None and float(log_sigma.grad.abs()) > 0


def _ref_crps_ensemble(means: torch.Tensor, target: torch.Tensor) -> float:
    s, b, d = means.shape
    total = 0.0
    for j in range(b):
        for k in range(d):
            x = means[:, j, k].tolist()
            y = float(target[j, k])
            t1 = sum(abs(v - y) for v in x) / s
            t2 = sum(abs(u - v) for u in x for v in x) / (2 * s * s)
            total += t1 - t2
    return total / (b * d)


@pytest.mark.parametrize(("s", "b", "d"), [(1, 3, 1), (2, 17, 3), (7, 5, 2), (16, 4, 1)])
def test_crps_ensemble_matches_pairwise_loop(s, b, d):
    means, target = _reg_case(s, b, d, seed=11)
    ref = _ref_crps_ensemble(means, target)
    n = s * s * b * d  # the pairwise reference sums S^2 terms per (b, d)
    assert_close(metrics.crps(means, target), _f64(ref), reduction=n)
    # an all-zero noise tensor is the same ensemble
    zero = torch.zeros(d, dtype=torch.float64)
    assert_close(metrics.crps(means, target, zero), _f64(ref), reduction=n)


def test_crps_ensemble_with_ties_and_single_member():
    means = torch.tensor([[[1.0]], [[1.0]], [[3.0]]])
    target = torch.tensor([[2.0]])
    # E|X-y| = 1; E|X-X'| = (4 pairs of |1-3|=2)/9 = 8/9
    assert_close(metrics.crps(means, target), _f64(1.0 - 4.0 / 9.0), reduction=3 * 3)
    assert_close(metrics.crps(means[:1], target), _f64(1.0))


def test_crps_single_gaussian_closed_form():
    # CRPS(N(mu, s^2), y) = s [z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi)], z = (y - mu)/s
    means, target = _reg_case(1, 9, 2, seed=12)
    sigma = 0.8
    z = (target - means[0]) / sigma
    phi = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    big_phi = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    ref = (sigma * (z * (2 * big_phi - 1) + 2 * phi - 1 / math.sqrt(math.pi))).mean()
    torch.testing.assert_close(metrics.crps(means, target, sigma), ref)


@pytest.mark.parametrize("per_component", [False, True])
def test_crps_gaussian_mixture_matches_monte_carlo(per_component):
    s, b, d, n = 5, 4, 3, 100_000
    means, target = _reg_case(s, b, d, seed=13)
    if per_component:  # different std per sample and dim; one component a point mass
        sigma = 0.2 + torch.rand(s, 1, d, generator=_gen(14), dtype=torch.float64)
        sigma[0, 0, 0] = 0.0
    else:
        sigma = torch.tensor(0.6, dtype=torch.float64)
    sig = sigma.expand(s, b, d)
    g = _gen(15)

    def draw() -> torch.Tensor:  # (n, B, D) from the mixture, component drawn uniformly
        comp = torch.randint(0, s, (n, b, d), generator=g)
        mu = torch.gather(means.expand(n, s, b, d), 1, comp.unsqueeze(1)).squeeze(1)
        sd = torch.gather(sig.expand(n, s, b, d), 1, comp.unsqueeze(1)).squeeze(1)
        return mu + sd * torch.randn(n, b, d, generator=g, dtype=torch.float64)

    x, x2 = draw(), draw()
    # unbiased per-draw estimate of E|X - y| - 0.5 E|X - X'|, averaged over (B, D)
    per_draw = ((x - target).abs() - 0.5 * (x - x2).abs()).mean(dim=(1, 2))
    estimate = float(per_draw.mean())
    stderr = float(per_draw.std()) / math.sqrt(n)
    got = float(metrics.crps(means, target, sigma))
    assert abs(got - estimate) < 5 * stderr
    assert stderr < 1.5e-3  # the bound is tight enough to catch a wrong constant


def test_crps_mixture_reduces_to_ensemble_as_noise_vanishes_and_grows_with_noise():
    means, target = _reg_case(4, 6, 2, seed=16)
    ens = metrics.crps(means, target)
    # the mixture formula sums S^2 pairs per (b, d); sigma = 1e-9 moves it by O(1e-9)
    assert_close(metrics.crps(means, target, 1e-9), ens, reduction=4 * 4 * 6 * 2)
    # chunking path (many samples) agrees with the ensemble formula too
    many, tgt = _reg_case(64, 3, 1, seed=17)
    ref = _f64(_ref_crps_ensemble(many, tgt))
    assert_close(metrics.crps(many, tgt, 1e-12), ref, reduction=64 * 64 * 3)


def test_crps_gradients_are_finite():
    means, target = _reg_case(3, 5, 2, seed=18)
    means.requires_grad_(True)
    sigma = torch.tensor([0.0, 0.5], dtype=torch.float64, requires_grad=True)
    metrics.crps(means, target, sigma).backward()
    assert bool(torch.isfinite(means.grad).all()) and bool(torch.isfinite(sigma.grad).all())


# --------------------------------------------------------------------------- dtype, device


def test_low_precision_is_scored_in_fp32():
    logits, target = _case(3, 11, 4, seed=19)
    half = logits.bfloat16()
    got = metrics.nll(half, target)
    assert got.dtype == torch.float32
    # the bf16 logits are exact in fp32 and fp64: only the scoring's rounding differs
    assert_close(got, metrics.nll(half.double(), target), reduction=3 * 11 * 4)
    assert metrics.predictive_entropy(half).dtype == torch.float32


# --------------------------------------------------------------------------- bad input

CLASSIFICATION = [
    metrics.nll,
    metrics.brier,
    metrics.accuracy,
    metrics.ece,
    metrics.reliability,
]
UNARY = [
    metrics.predictive_probs,
    metrics.predictive_entropy,
    metrics.expected_entropy,
    metrics.mutual_information,
]


@pytest.mark.parametrize("fn", UNARY + CLASSIFICATION)
def test_logits_must_be_3d(fn):
    args = (torch.randn(4, 3),) if fn in UNARY else (torch.randn(4, 3), torch.zeros(4).long())
    with pytest.raises(ValueError, match=r"logits.*\(S, B, C\)"):
        fn(*args)


@pytest.mark.parametrize("fn", CLASSIFICATION)
def test_classification_target_errors(fn):
    logits = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match=r"target.*\(B,\) = \(4,\)"):
        fn(logits, torch.zeros(5).long())
    with pytest.raises(ValueError, match=r"target.*\(B,\)"):
        fn(logits, torch.zeros(4, 1).long())
    with pytest.raises(ValueError, match=r"target.*\[0, 2\]"):
        fn(logits, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"target.*range"):
        fn(logits, torch.tensor([0, -1, 2, 0]))
    with pytest.raises(TypeError, match="target"):
        fn(logits, torch.zeros(4))


def test_n_bins_validated():
    logits, target = torch.randn(2, 4, 3), torch.zeros(4).long()
    with pytest.raises(ValueError, match="n_bins"):
        metrics.ece(logits, target, n_bins=0)
    with pytest.raises(TypeError, match="n_bins"):
        metrics.reliability(logits, target, n_bins=2.5)


@pytest.mark.parametrize("fn", [metrics.crps, metrics.gaussian_nll])
def test_regression_input_errors(fn):
    means, target = torch.randn(3, 4, 2), torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"means.*\(S, B, D\)"):
        fn(means[0], target, 1.0)
    with pytest.raises(ValueError, match=r"target.*\(4, 2\)"):
        fn(means, torch.randn(4, 3), 1.0)
    with pytest.raises(ValueError, match=r"unsqueeze"):
        fn(means[..., :1], torch.randn(4), 1.0)
    with pytest.raises(ValueError, match="noise_std"):
        fn(means, target, -1.0)
    with pytest.raises(ValueError, match="noise_std"):
        fn(means, target, torch.ones(3))
    with pytest.raises(ValueError, match="noise_std"):
        fn(means, target, torch.tensor([0.5, float("nan")]))


def test_gaussian_nll_rejects_zero_noise():
    with pytest.raises(ValueError, match=r"noise_std.*> 0"):
        metrics.gaussian_nll(torch.randn(3, 4, 2), torch.randn(4, 2), 0.0)
