"""The bucketed reducer against torch DDP, and the differentiable collectives (gloo, 2 ranks).

Each spawned job batches many checks (spawning is the slow part); the worker returns plain
values and the assertions run here, in the test process.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import spar.distributed as sd
from spar.distributed import Reducer, all_gather_samples, all_reduce_sum, broadcast_tensors

# ----------------------------------------------------------------------------- helpers


def _mlp(seed: int, width: int = 128) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, 4),
    )


def _batch(rank: int, step: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, 16, generator=g), torch.randn(n, 4, generator=g)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _max_rel_grads(a: nn.Module, b: nn.Module) -> float:
    return max(_rel(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters(), strict=True))


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.body = nn.Linear(8, 8)
        self.head_a = nn.Linear(8, 2)
        self.head_b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, use_b: bool = True) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        return self.head_a(h) + (self.head_b(h) if use_b else 0.0)


class _Swapped(nn.Module):
    """Registers its layers in the reverse of the order it runs them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.last = nn.Linear(64, 4)
        self.middle = nn.Linear(64, 64)
        self.first = nn.Linear(16, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.tanh(self.middle(torch.tanh(self.first(x)))))


def _manual_avg_grads(model: nn.Module, world: int) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        out.append(g / world)
    return out


# ----------------------------------------------------------------------------- job A


def reducer_job(ctx: dict) -> dict:
    rank, world = ctx["rank"], ctx["world"]
    res: dict = {}

    # init from torchrun's variables; a second init reuses the grid
    grid = sd.init()
    res["grid"] = (grid.mode, grid.sample, grid.data, grid.sample_rank, grid.data_rank)
    res["same_grid"] = sd.init() is grid
    ddp_grid = sd.make_grid(sample=1, data=world)
    res["ddp_grid"] = (ddp_grid.mode, ddp_grid.sample_group is None, ddp_grid.data_group is None)
    try:
        sd.init(sample=3)
    except ValueError as e:
        res["bad_sample"] = str(e)
    try:
        sd.make_grid(sample=2, data=2)
    except ValueError as e:
        res["bad_grid"] = str(e)

    # (a) gradients equal DDP's over 3 steps (set_to_none and in-place zeroing, which
    # accumulates into the bucket views), with several buckets
    kw = dict(bucket_mb=0.05, first_bucket_mb=0.01)
    ref = DDP(_mlp(0))
    ours = _mlp(0)
    red = Reducer(ours, **kw)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    errs = []
    for step in range(3):
        x, y = _batch(rank, step)
        for m, o in ((ref, opt_ref), (ours, opt)):
            o.zero_grad(set_to_none=step < 2)
            _loss(m, x, y).backward()
        errs.append(_max_rel_grads(ours, ref.module))
        opt_ref.step()
        opt.step()
    res["ddp_grad_err"] = max(errs)
    res["ddp_param_err"] = max(
        _rel(p, q) for p, q in zip(ours.parameters(), ref.module.parameters(), strict=True)
    )
    res["buckets"] = red.bucket_names()
    t = red.last_timings
    res["timings"] = t
    res["grad_is_view"] = all(
        p.grad.untyped_storage().data_ptr() == red.buckets[red._slot[i][0]].buffer.data_ptr()
        for i, p in enumerate(red.params)
    )

    # buckets are rebuilt once from the observed ready order: here registration order is
    # the reverse of execution order, so the initial reverse-order buckets are wrong
    swapped = _Swapped()
    red_sw = Reducer(swapped, bucket_mb=0.01, first_bucket_mb=0.001)
    res["swapped_before"] = red_sw.bucket_names()
    x, y = _batch(rank, 3)
    _loss(swapped, x, y).backward()
    res["swapped_after"] = red_sw.bucket_names()

    # (b) no_sync accumulates the local sum; the next synced backward matches DDP's
    ours2 = _mlp(1, 64)
    local = copy.deepcopy(ours2)
    red2 = Reducer(ours2, **kw)
    ref2 = DDP(_mlp(1, 64))
    micro = [_batch(rank, 10 + k) for k in range(3)]
    with red2.no_sync(), ref2.no_sync():
        for x, y in micro[:2]:
            _loss(ours2, x, y).backward()
            _loss(local, x, y).backward()
            _loss(ref2, x, y).backward()
    res["no_sync_local_err"] = _max_rel_grads(ours2, local)
    res["no_sync_timings_count"] = len(red2.timings)
    _loss(ours2, *micro[2]).backward()
    _loss(ref2, *micro[2]).backward()
    res["no_sync_ddp_err"] = _max_rel_grads(ours2, ref2.module)

    # (c) bf16 communication: close to the fp32 average
    ours3 = _mlp(0)
    Reducer(ours3, comm_dtype=torch.bfloat16, **kw)
    fp32 = _mlp(0)
    Reducer(fp32, **kw)
    x, y = _batch(rank, 0)
    _loss(ours3, x, y).backward()
    _loss(fp32, x, y).backward()
    res["bf16_err"] = _max_rel_grads(ours3, fp32)
    res["bf16_grad_dtype"] = str(next(ours3.parameters()).grad.dtype)

    # (d) unused parameters: a clear error on every rank, then training goes on in step
    heads = _TwoHeads()
    red4 = Reducer(heads)
    x, y = _batch(rank, 20, n=8)
    x, y = x[:, :8], y[:, :2]
    try:
        nn.functional.mse_loss(heads(x, use_b=False), y).backward()
    except RuntimeError as e:
        res["unused_msg"] = str(e)
    # unused on rank 0 only: rank 0 raises, rank 1 completes; no desynchronization after
    for p in heads.parameters():
        p.grad = None
    try:
        nn.functional.mse_loss(heads(x, use_b=rank != 0), y).backward()
        res["unused_one_rank"] = "ok"
    except RuntimeError as e:
        res["unused_one_rank"] = str(e)
    for p in heads.parameters():
        p.grad = None
    nn.functional.mse_loss(heads(x), y).backward()
    got = [p.grad.clone() for p in heads.parameters()]
    red4.remove()
    for p in heads.parameters():
        p.grad = None
    nn.functional.mse_loss(heads(x), y).backward()
    want = _manual_avg_grads(heads, world)
    res["after_unused_err"] = max(_rel(a, b) for a, b in zip(got, want, strict=True))

    # (e) find_unused_parameters=True: the unused rank contributes zeros
    heads5 = _TwoHeads()
    Reducer(heads5, find_unused_parameters=True)
    nn.functional.mse_loss(heads5(x, use_b=rank == 1), y).backward()
    got = [p.grad.clone() for p in heads5.parameters()]
    plain = _TwoHeads()
    nn.functional.mse_loss(plain(x, use_b=rank == 1), y).backward()
    want = _manual_avg_grads(plain, world)
    res["find_unused_err"] = max(_rel(a, b) for a, b in zip(got, want, strict=True))

    # (f) differentiable collectives
    xs = (torch.arange(6.0).view(3, 2) + 10 * rank).requires_grad_()
    gathered = all_gather_samples(xs, dist.group.WORLD)
    w = torch.arange(gathered.numel(), dtype=torch.float32).view_as(gathered)
    (gathered * w).sum().backward()
    res["gathered"] = gathered.detach()
    res["gather_grad"] = xs.grad.clone()
    res["gather_expected_grad"] = world * w[3 * rank : 3 * rank + 3]
    xr = torch.full((4,), float(rank + 1), requires_grad=True)
    summed = all_reduce_sum(xr, dist.group.WORLD)
    (summed * torch.arange(4.0)).sum().backward()
    res["reduce_sum"] = summed.detach()
    res["reduce_grad"] = xr.grad.clone()
    res["gather_none_is_identity"] = all_gather_samples(xs, None) is xs

    # (g) broadcast of mixed dtypes in small chunks
    ts = [torch.full((300,), float(rank)), torch.full((5, 7), rank, dtype=torch.int64)]
    ts.append(torch.full((1000,), float(rank) + 0.5, dtype=torch.float64))
    broadcast_tensors(ts, dist.group.WORLD, bucket_mb=0.001)
    res["broadcast_ok"] = (
        all(bool((t == t.flatten()[0]).all()) for t in ts) and float(ts[0][0]) == 0.0
    )
    sd.shutdown()
    return res


@pytest.mark.slow
def test_reducer_matches_ddp_and_fails_loudly(run_workers):
    results = run_workers("reducer_job", 2, launch="torchrun", timeout=40)
    for rank, r in enumerate(results):
        assert r["grid"] == ("sp", 2, 1, rank, 0)
        assert r["same_grid"]
        assert r["ddp_grid"] == ("ddp", True, False)
        assert "sample=3 x data=1 = 3 does not match the world size 2" in r["bad_sample"]
        assert "sample=2 x data=2 = 4 does not match the world size 2" in r["bad_grid"]

        assert r["ddp_grad_err"] <= 1e-6, r["ddp_grad_err"]
        assert r["ddp_param_err"] <= 1e-6
        assert len(r["buckets"]) >= 3
        # reverse parameter order, with a small first bucket
        assert "6.weight" in r["buckets"][0] and "0.weight" in r["buckets"][-1]
        assert r["grad_is_view"]
        assert all(n.startswith("first.") for n in r["swapped_before"][0])
        assert all(n.startswith("last.") for n in r["swapped_after"][0])
        assert all(n.startswith("first.") for n in r["swapped_after"][-1])

        t = r["timings"]
        assert t.num_buckets == len(r["buckets"])
        # every bucket but the last is complete (and launched) while backward still runs
        assert t.launched_before_end >= t.num_buckets - 1 >= 2
        assert 0 <= t.first_launch_s < t.backward_s
        assert t.comm_s > 0 and 0 <= t.exposed_s <= t.finalize_s

        assert r["no_sync_local_err"] <= 1e-6
        assert r["no_sync_timings_count"] == 0
        assert r["no_sync_ddp_err"] <= 1e-6

        assert r["bf16_err"] <= 2e-2
        assert r["bf16_grad_dtype"] == "torch.float32"

        assert "received no gradient" in r["unused_msg"]
        assert "head_b.weight" in r["unused_msg"] and "head_b.bias" in r["unused_msg"]
        assert r["after_unused_err"] <= 1e-6
        assert r["find_unused_err"] <= 1e-6

        assert torch.equal(r["gathered"][:3, 0], torch.tensor([0.0, 2.0, 4.0]))
        assert torch.equal(r["gathered"][3:, 0], torch.tensor([10.0, 12.0, 14.0]))
        assert torch.equal(r["gather_grad"], r["gather_expected_grad"])
        assert torch.equal(r["reduce_sum"], torch.full((4,), 3.0))
        assert torch.equal(r["reduce_grad"], 2 * torch.arange(4.0))
        assert r["gather_none_is_identity"]
        assert r["broadcast_ok"]
    assert "head_b.weight" in results[0]["unused_one_rank"]
    assert results[1]["unused_one_rank"] == "ok"


# ----------------------------------------------------------------------------- job B


def timeout_job(ctx: dict) -> dict:
    sd.init(rank=ctx["rank"], world_size=ctx["world"], init_method=ctx["init_method"], timeout=2.0)
    model = _mlp(0, 32)
    Reducer(model)
    x, y = _batch(ctx["rank"], 0)
    if ctx["rank"] == 1:
        try:
            raise RuntimeError("simulated failure in the forward pass of rank 1")
        finally:
            time.sleep(6.0)  # stay alive: rank 0 must time out, not see a closed socket
    t0 = time.monotonic()
    try:
        _loss(model, x, y).backward()
    except RuntimeError as e:
        return {"elapsed": time.monotonic() - t0, "msg": str(e)}
    return {"elapsed": time.monotonic() - t0, "msg": "no error"}


@pytest.mark.slow
def test_failed_rank_does_not_hang_the_others(run_workers):
    results = run_workers("timeout_job", 2, timeout=60, allow_errors=True)
    assert "simulated failure" in str(results[1])
    r0 = results[0]
    assert isinstance(r0, dict), r0
    assert "another rank probably raised" in r0["msg"], r0["msg"]
    assert r0["elapsed"] < 5.0, r0
