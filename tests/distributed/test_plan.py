"""The cost model of ``spar.distributed.plan``: formulas on hand-computed cases, ranking,
memory fit, explanations, bad input, and calibration recovering known constants."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

import spar
from spar.distributed import PlanRow, plan
from spar.distributed.plan import (
    Observation,
    calibrate,
    measure_sample_cost,
    predict_step,
    ring_allreduce_time,
)

GIB = 2**30
MIB = 2**20

# a small job whose numbers are easy to follow by hand
BASE = dict(
    num_params=1_000_000,
    num_samples=8,
    batch_size=64,
    gpus=4,
    gpus_per_node=4,
    sample_cost_s=1e-3,
    intra_node_gb_s=100.0,
    inter_node_gb_s=10.0,
    latency_us=5.0,
)


def test_ring_allreduce_hand_computed():
    # n=4, 8 MB at 100 GB/s, 5 us per step: 6 steps x 5 us + 2*3/4 * 8e6 / 1e11
    assert ring_allreduce_time(8e6, 4, 100e9, 5e-6) == pytest.approx(30e-6 + 1.5 * 8e-5)
    # n=2: bus factor 1, 2 ring steps
    assert ring_allreduce_time(1e9, 2, 1e9, 1e-3) == pytest.approx(2e-3 + 1.0)
    # n=16: bus factor 2*15/16 = 1.875, 30 ring steps
    assert ring_allreduce_time(4e6, 16, 2e9, 0.0) == pytest.approx(1.875 * 2e-3)
    assert ring_allreduce_time(4e6, 16, 2e9, 1e-6) == pytest.approx(1.875 * 2e-3 + 30e-6)
    assert ring_allreduce_time(123.0, 1, 1.0, 1.0) == 0.0


def test_one_bucket_no_overlap_and_nodes():
    # 1 M params, Bayesian: 2 M trained x 4 B = 8 MB in one bucket (cap 25 MiB, no split)
    kw = {**BASE, "bucket_mb": 25.0, "first_bucket_mb": 25.0, "small_last_bucket": False}
    row = next(r for r in plan(**kw) if r.mode == "sp")
    assert row.num_buckets == 1
    comm = ring_allreduce_time(8e6, 4, 100e9, 5e-6)
    assert row.comm_s == pytest.approx(comm)
    assert row.exposed_comm_s == pytest.approx(comm)  # ready only at the end of backward
    assert row.compute_s == pytest.approx(2 * 1e-3)  # 2 samples x 64 examples
    assert row.step_time_s == pytest.approx(2e-3 + comm)
    # 8 GPUs over 2 nodes of 4: the ring runs at the inter-node rate
    kw8 = {**kw, "gpus": 8}
    row8 = next(r for r in plan(**kw8) if r.mode == "sp")
    assert row8.comm_s == pytest.approx(ring_allreduce_time(8e6, 8, 10e9, 5e-6))
    assert "across 2 nodes" in row8.explanation


def test_overlap_hides_all_but_the_last_bucket():
    # 4 equal buckets of 2 MB ready at 1/4, 2/4, 3/4, 1 of a long backward: only the last
    # one is exposed. Per bucket at n=2: 2 x 0 + 1 * 2e6 / 1e9 = 2 ms.
    kw = dict(BASE, gpus=2, latency_us=0.0, intra_node_gb_s=1.0, sample_cost_s=1.0,
              bucket_mb=2e6 / MIB, first_bucket_mb=2e6 / MIB, small_last_bucket=False)  # fmt: skip
    row = next(r for r in plan(**kw) if r.mode == "sp")
    assert row.num_buckets == 4
    assert row.comm_s == pytest.approx(8e-3)
    assert row.exposed_comm_s == pytest.approx(2e-3)
    # a short backward hides nothing beyond what it lasts: backward 4 x 0.3 ms... = 1.2 ms
    kw["sample_cost_s"] = 1.8e-3 / 4  # compute of 4 samples = 1.8 ms, backward 1.2 ms
    row = next(r for r in plan(**kw) if r.mode == "sp")
    # buckets start at 0.3, 2.3, 4.3, 6.3 ms (serial), the last ends at 8.3 ms
    assert row.exposed_comm_s == pytest.approx(8.3e-3 - 1.2e-3)


def test_grad_profile_early_bytes_overlap():
    # 90% of the bytes ready at once (like fc layers), 10% at the end: only the tail shows
    profile = [(0.9, 0.0), (0.1, 1.0)]
    kw = dict(BASE, gpus=2, latency_us=0.0, intra_node_gb_s=1.0, sample_cost_s=1.0,
              first_bucket_mb=1.0, small_last_bucket=False, grad_profile=profile)  # fmt: skip
    row = next(r for r in plan(**kw) if r.mode == "sp")
    assert row.num_buckets == 2
    assert row.exposed_comm_s == pytest.approx(0.1 * 8e6 / 1e9)


def test_ranking_fits_first_then_fastest_and_modes():
    rows = plan(**{**BASE, "gpus": 8, "gpus_per_node": 8, "weight_cost_s": 1e-4})
    assert {r.mode for r in rows} == {"sp", "hybrid", "ddp"}
    assert [(r.sample_axis, r.data_axis) for r in rows][0] == (8, 1)  # fewer weight draws
    times = [r.step_time_s for r in rows]
    assert times == sorted(times)
    for r in rows:
        assert r.sample_axis * r.data_axis == 8
        assert 8 % r.sample_axis == 0 and 64 % r.data_axis == 0
        assert r.samples_per_rank == 8 // r.sample_axis
        assert r.batch_per_rank == 64 // r.data_axis
        assert 0 < r.efficiency <= 1
    one = plan(**{**BASE, "gpus": 1})
    assert [r.mode for r in one] == ["local"] and one[0].efficiency == pytest.approx(1.0)
    only = plan(**{**BASE, "gpus": 8, "gpus_per_node": 8}, modes=["ddp"])
    assert [r.mode for r in only] == ["ddp"]
    # S = 3 on 4 GPUs: the sample axis can be 1 only
    rows = plan(**{**BASE, "num_samples": 3})
    assert [(r.sample_axis, r.data_axis) for r in rows] == [(1, 4)]


def test_memory_fit_and_reason():
    kw = dict(BASE, activation_bytes=1e6, device_memory_gib=2.0, memory_overhead_gib=0.5)
    rows = plan(**kw)
    for r in rows:
        p = 2_000_000  # trained values (mu and rho)
        static = 4 * p * 4  # params + grads + 2 Adam copies, fp32
        assert r.param_bytes == 4 * p and r.optimizer_bytes == 8 * p
        act = int(1e6 * r.samples_per_rank * r.batch_per_rank)
        assert r.memory_per_rank_bytes == static + act + GIB // 2
        assert r.fits == (r.memory_per_rank_bytes <= 2 * GIB)
    small = plan(**{**kw, "device_memory_gib": 0.6})
    assert not any(r.fits for r in small)
    assert all(r.reason.startswith("needs") and "GiB" in r.reason for r in small)
    assert all(r.explanation.startswith("does not fit") for r in small)
    # grids that fit come before grids that do not
    mixed = plan(**{**kw, "gpus": 1, "num_samples": 8, "device_memory_gib": 1.0})
    assert [r.fits for r in mixed] == [False]
    sgd = plan(**{**BASE, "optimizer": "sgd"})[0]
    assert sgd.optimizer_bytes == 0
    bf16 = plan(**{**BASE, "param_dtype": torch.bfloat16, "comm_dtype": "bf16"})[0]
    assert bf16.param_bytes == 2 * 2_000_000


def test_explanation_and_to_dict():
    rows = plan(**BASE, dataset_size=6400, activation_bytes=1e5)
    r = rows[0]
    assert isinstance(r, PlanRow)
    assert r.steps_per_epoch == 100
    assert r.epoch_time_s == pytest.approx(100 * r.step_time_s)
    assert "per epoch" in r.explanation and "exposed all-reduce" in r.explanation
    assert f"{r.samples_per_rank} sample" in r.explanation and "\n" not in r.explanation
    d = r.to_dict()
    for key in ("mode", "sample_axis", "data_axis", "step_time_s", "epoch_time_s",
                "efficiency", "memory_per_rank_bytes", "fits", "explanation"):  # fmt: skip
        assert key in d
    with pytest.raises(AttributeError):
        r.mode = "x"  # frozen
    step_only = plan(**BASE)[0]
    assert step_only.epoch_time_s is None and "per step" in step_only.explanation
    assert "activations not counted" in step_only.explanation


def test_model_counts_mu_and_rho():
    det = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    n = sum(p.numel() for p in det.parameters())
    kw = {k: v for k, v in BASE.items() if k != "num_params"}
    from_det = plan(det, **kw)[0]
    from_count = plan(num_params=n, **kw)[0]
    assert from_det.param_bytes == from_count.param_bytes == 2 * n * 4
    bayes = spar.nn.bayesianize(nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3)))
    assert plan(bayes, **kw)[0].param_bytes == 2 * n * 4
    half = plan(num_params=n, bayesian_fraction=0.5, **kw)[0]
    assert half.param_bytes == round(1.5 * n) * 4


@pytest.mark.parametrize(
    "change, exc, words",
    [
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"num_samples": 2.5}, TypeError, "num_samples"),
        ({"gpus": True}, TypeError, "gpus"),
        ({"sample_cost_s": -1.0}, ValueError, "sample_cost_s"),
        ({"sample_cost_s": float("nan")}, ValueError, "sample_cost_s"),
        ({"sample_cost_s": None}, ValueError, "sample_cost_s"),
        ({"inter_node_gb_s": 0}, ValueError, "inter_node_gb_s"),
        ({"latency_us": "5"}, TypeError, "latency_us"),
        ({"comm_dtype": "int8"}, ValueError, "comm_dtype"),
        ({"optimizer": "lion"}, ValueError, "optimizer"),
        ({"bayesian_fraction": 2.0}, ValueError, "bayesian_fraction"),
        ({"backward_fraction": 1.5}, ValueError, "backward_fraction"),
        ({"num_params": None}, ValueError, "num_params"),
        ({"modes": ["fsdp"]}, ValueError, "modes"),
        ({"grad_profile": [(0.5, 0.0)]}, ValueError, "grad_profile"),
        ({"grad_profile": [(0.5, 0.9), (0.5, 0.1)]}, ValueError, "grad_profile"),
        ({"num_samples": 7, "batch_size": 9}, ValueError, "no grid"),
    ],
)
def test_bad_input_names_the_argument(change, exc, words):
    with pytest.raises(exc, match=words):
        plan(**{**BASE, **change})


def test_bad_model_argument():
    with pytest.raises(TypeError, match="model"):
        plan("resnet", **{k: v for k, v in BASE.items() if k != "num_params"})
    with pytest.raises(ValueError, match="not both"):
        plan(nn.Linear(2, 2), **BASE)


def _synthetic(constants: dict, common: dict) -> list[Observation]:
    obs = []
    for s in (16, 32, 64):  # one GPU: S x B varies
        obs.append(Observation(s, 64, 1, 1, predict_step(Observation(s, 64, 1, 1, 1.0),
                                                         **common, **constants)))  # fmt: skip
    for s, a, b in [(16, 2, 1), (16, 8, 1), (16, 16, 1), (64, 16, 1), (64, 4, 4), (16, 1, 8),
                    (32, 8, 2), (32, 32, 1), (64, 64, 1)]:  # fmt: skip
        o = Observation(s, 64 * b, a, b, 1.0)
        obs.append(Observation(s, 64 * b, a, b, predict_step(o, **common, **constants)))
    return obs


def test_calibration_recovers_known_constants():
    common = dict(num_params=2_000_000, gpus_per_node=4, cost_batch=64, intra_node_gb_s=100.0,
                  first_bucket_mb=1.0, bucket_mb=4.0, small_last_bucket=False)  # fmt: skip
    truth = dict(sample_cost_s=4e-4, step_overhead_s=2e-3, latency_us=30.0, inter_node_gb_s=3.0)
    cal = calibrate(_synthetic(truth, common), **common)
    assert cal.sample_cost_s == pytest.approx(4e-4, rel=1e-6)
    assert cal.step_overhead_s == pytest.approx(2e-3, rel=1e-6)
    assert cal.latency_us == pytest.approx(30.0, rel=0.03)
    assert cal.inter_node_gb_s == pytest.approx(3.0, rel=0.03)
    assert cal.max_abs_rel_error < 1e-2
    assert set(cal.plan_kwargs()) == set(truth)


def test_calibration_bad_input():
    common = dict(num_params=1000, cost_batch=64)
    with pytest.raises(ValueError, match="distinct"):
        calibrate([Observation(8, 64, 1, 1, 1.0)], **common)
    with pytest.raises(TypeError, match="Observation"):
        calibrate([(8, 64, 1, 1, 1.0)], **common)
    with pytest.raises(ValueError, match="latency_us"):
        calibrate([Observation(8, 64, 1, 1, 1.0)], latency_us=3.0, **common)
    with pytest.raises(ValueError, match="step_time_s"):
        calibrate([Observation(8, 64, 1, 1, -1.0)], **common)


def test_published_point_reproduced():
    """The calibrated constants of bench/results/plan.md put SP S=128 on 16 GPUs in the
    published floor (10.97 s/epoch) within 20%."""
    pytest.importorskip("numpy")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "validate_plan.py"
    spec = importlib.util.spec_from_file_location("validate_plan", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cal, rows, _ = mod.validate()
    assert max(abs(r["rel_error"]) for r in rows if r["gpus"] >= 8) <= 0.20
    floor = next(r for r in rows if (r["strategy"], r["S"], r["gpus"]) == ("sp", 128, 16))
    assert math.isclose(floor["predicted_s"], 10.97, rel_tol=0.2)


def test_measured_cost_and_activations():
    model = spar.nn.bayesianize(nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3)))
    x = torch.randn(16, 10)
    cost, act = measure_sample_cost(model, x, num_samples=2, repeats=1)
    assert cost > 0
    assert act == (20 + 20 + 3) * 4  # outputs of Linear, ReLU, Linear per example, fp32
    rows = plan(model, example_input=x, num_samples=4, batch_size=32, gpus=2)
    assert all(r.activation_bytes == act * r.samples_per_rank * r.batch_per_rank for r in rows)
    with pytest.raises(TypeError, match="example_input"):
        measure_sample_cost(model, [1.0, 2.0])


def _loop_pipeline(buckets, t_backward, n, bw, lat):
    """The per-bucket reference of ``_pipeline``: every bucket of a row, one by one."""
    end = total = 0.0
    for nbytes, ready, count, step in buckets:
        for j in range(count):
            t = ring_allreduce_time(nbytes, n, bw, lat)
            end = max(end, min(1.0, ready + j * step) * t_backward) + t
            total += t
    return total, max(0.0, end - t_backward)


@pytest.mark.parametrize("sample_cost", [1e-5, 1e-3, 0.1, 10.0])
@pytest.mark.parametrize("bucket_mb", [0.01, 0.3, 1.0, 7.0])
@pytest.mark.parametrize("small_last", [True, False])
def test_equal_buckets_closed_form_matches_the_loop(sample_cost, bucket_mb, small_last):
    from spar.distributed.plan import _buckets, _config_for, _num_buckets, _pipeline

    kw = dict(BASE, sample_cost_s=sample_cost, bucket_mb=bucket_mb, first_bucket_mb=0.5,
              small_last_bucket=small_last)  # fmt: skip
    del kw["num_samples"], kw["batch_size"], kw["gpus"]
    cfg = _config_for(Observation(8, 64, 2, 2, 1.0), kw)
    buckets = _buckets(cfg)
    assert sum(b * c for b, _, c, _ in buckets) == pytest.approx(8e6)  # all bytes, once
    expect = math.ceil((8e6 - (1 + small_last) * 0.5 * MIB) / (bucket_mb * MIB))
    assert _num_buckets(buckets) == 1 + small_last + expect
    for n, tb in [(4, 1e-6), (4, 1e-3), (4, 0.05), (32, 2.0)]:
        got = _pipeline(buckets, tb, n, 10e9, 5e-6)
        assert got == pytest.approx(_loop_pipeline(buckets, tb, n, 10e9, 5e-6), rel=1e-9)


def test_many_buckets_return_at_once():
    # 2e15 values x 4 B in 1 KiB buckets: 8e12 buckets, in closed form (was one loop each)
    t = time.perf_counter()
    kw = dict(BASE, num_params=10**15, bucket_mb=1 / 1024, first_bucket_mb=1 / 1024)
    rows = plan(**kw)
    assert time.perf_counter() - t < 2.0
    assert rows[0].num_buckets == 8 * 10**15 // 1024
    assert all(math.isfinite(r.step_time_s) and r.exposed_comm_s > 0 for r in rows)


@pytest.mark.parametrize("name", ["bucket_mb", "first_bucket_mb"])
def test_bucket_under_1_kib_rejected(name):
    with pytest.raises(ValueError, match=f"{name} must be >= 1 KiB"):
        plan(**{**BASE, name: 1e-6})


def test_divisors_fast_and_exact():
    from spar.distributed.plan import _divisors

    for n in range(1, 200):
        assert _divisors(n) == [d for d in range(1, n + 1) if n % d == 0]
    t = time.perf_counter()
    with pytest.raises(ValueError, match="no grid"):  # 1e9 GPUs: was a loop over 1e9
        plan(**{**BASE, "gpus": 10**9})
    rows = plan(**{**BASE, "gpus": 2**29, "num_samples": 2**20, "batch_size": 2**20})
    assert time.perf_counter() - t < 2.0
    assert sorted(r.sample_axis for r in rows) == [2**k for k in range(9, 21)]  # data <= 2^20
    with pytest.raises(ValueError, match="gpus must be an int <= 1e"):
        plan(**{**BASE, "gpus": 10**12})


@pytest.mark.parametrize(
    "change, name",
    [
        ({"sample_cost_s": 1e308}, "sample_cost_s"),
        ({"weight_cost_s": 1e300}, "weight_cost_s"),
        ({"step_overhead_s": 1e300}, "step_overhead_s"),
        ({"activation_bytes": 1e300}, "activation_bytes"),
        ({"num_params": 10**300}, "num_params"),
        ({"num_params": 1e300}, "num_params"),
        ({"num_params": 10**400}, "num_params"),  # past a float: no OverflowError
        ({"sample_cost_s": 10**400}, "sample_cost_s"),
        ({"num_samples": 10**300}, "num_samples"),
        ({"dataset_size": 10**300}, "dataset_size"),
        ({"inter_node_gb_s": 1e-300}, "inter_node_gb_s"),
        ({"intra_node_gb_s": 1e300}, "intra_node_gb_s"),
        ({"latency_us": 1e300}, "latency_us"),
        ({"device_memory_gib": 1e300}, "device_memory_gib"),
        ({"bucket_mb": 1e300}, "bucket_mb"),
        ({"dataset_size": 10}, "dataset_size must be >= batch_size"),
    ],
)
def test_out_of_range_input_rejected(change, name):
    with pytest.raises(ValueError, match=name):
        plan(**{**BASE, **change})


def test_extreme_but_valid_input_gives_finite_short_results():
    rows = plan(num_params=10**15, num_samples=10**9, batch_size=10**9, gpus=10**9,
                sample_cost_s=1e9, weight_cost_s=1e9, step_overhead_s=1e9, latency_us=1e9,
                inter_node_gb_s=1e-6, activation_bytes=2**50, dataset_size=10**15)  # fmt: skip
    for r in rows:
        for v in (r.step_time_s, r.epoch_time_s, r.comm_s, r.efficiency):
            assert math.isfinite(v) and v > 0
        assert len(r.explanation) < 400 and "e+" in r.explanation  # no 30-digit numbers


def test_overflowing_result_names_the_inputs():
    from spar.distributed.plan import _check_finite

    _check_finite(step=1.0, epoch=None)
    with pytest.raises(ValueError, match="compute time overflowed.*sample_cost_s"):
        _check_finite(step=1.0, compute=math.inf)


def test_default_grids_tie_and_docstring_says_why():
    rows = plan(**BASE)
    assert len({round(r.step_time_s, 12) for r in rows}) == 1  # weight_cost_s = 0: all tie
    assert [r.data_axis for r in rows] == sorted(r.data_axis for r in rows)  # the tie-break
    doc = " ".join(plan.__doc__.split())
    assert "Ties" in doc and "weight_cost_s" in doc and "not modelled" in doc
    rows = plan(**BASE, weight_cost_s=1e-4)
    assert rows[0].step_time_s < rows[-1].step_time_s * 0.999
