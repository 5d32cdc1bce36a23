"""SampleParallel on real gloo grids: invariant I3, predict, augmentation, bad input.

I3: with shared augmentation, two training steps on the grids 2x1, 1x2 (2 ranks) and 2x2,
4x1, 1x4 (4 ranks), for both ELBO reductions, give the parameters (and gradients) of one
process running ``MonteCarlo`` with all S=4 samples on the full batch. The model mixes the
three estimators, so per-example noise (keyed by the global example index through
``data_offset``) is covered too.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

import spar.distributed as sd
import spar.nn as snn
from spar.data import GridSampler
from spar.losses import elbo

S = 4  # Monte Carlo samples per step
B = 8  # global batch size
N = 40  # dataset size
SEED = 123
STEPS = 2
REDUCTIONS = ("mean_samples", "mixture")


def _bayes_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        snn.BayesLinear(6, 16, init_sigma=0.2),
        nn.ReLU(),
        snn.BayesLinear(16, 16, init_sigma=0.2, estimator="flipout"),
        nn.Tanh(),
        snn.BayesLinear(16, 3, init_sigma=0.2, estimator="lrt"),
    )


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    return TensorDataset(torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g))


def _batches(grid) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first STEPS local batches of this rank (GridSampler layout)."""
    data = _dataset()
    b_local = B // (1 if grid is None else grid.data)
    idx = list(GridSampler(data, grid, shuffle=True, seed=11, batch_size=b_local))
    return [data[idx[k * b_local : (k + 1) * b_local]] for k in range(STEPS)]


def _train(model: nn.Module, forward, grid, reduction: str, group) -> dict:
    """STEPS SGD steps; returns the final parameters and the last gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for x, y in _batches(grid):
        opt.zero_grad()
        out = forward(x)  # (S_local, B_local, 3)
        kl = snn.kl_divergence(model)
        loss = elbo(out, y, kl=kl, dataset_size=N, reduction=reduction, group=group)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"params": params, "grads": grads}


def _reference(reduction: str) -> dict:
    model = _bayes_mlp()
    mc = snn.MonteCarlo(model, S, seed=SEED)
    res = _train(model, mc, None, reduction, None)
    mc.eval()
    # one batch at a time: per-example noise is keyed by the index within the batch
    res["predict"] = torch.stack([mc(x) for x, _ in _batches(None)])  # (STEPS, S, B, 3)
    return res


def _grid_runs(grids) -> dict:
    """I3 runs on each grid; what the parent compares with the single-process reference."""
    out = {}
    for grid in grids:
        key = f"{grid.sample}x{grid.data}"
        for reduction in REDUCTIONS:
            model = _bayes_mlp()
            sp = sd.SampleParallel(
                model, S, grid, seed=SEED, augment="shared", bucket_mb=0.002, first_bucket_mb=0.001
            )
            res = _train(sp.model, sp, grid, reduction, grid.sample_group)
            res["step"] = sp.step
            res["num_buckets"] = len(sp.reducer.buckets)
            if reduction == "mixture":
                sp.eval()
                # (STEPS, S, B_local, 3)
                res["predict"] = torch.stack([sp.predict(x) for x, _ in _batches(grid)])
                res["data_rank"] = grid.data_rank
            out[(key, reduction)] = res
    return out


def _augment_seeds(grid) -> dict:
    out = {}
    for mode in ("independent", "shared"):
        sp = sd.SampleParallel(_bayes_mlp(), S, grid, augment=mode)
        out[mode] = (sp.augment_seed, torch.rand(3, generator=sp.augment_generator))
    sp = sd.SampleParallel(_bayes_mlp(), S, grid, augment=None)
    out["none"] = (sp.augment_seed, sp.augment_generator)
    return out


# ----------------------------------------------------------------------------- predict


def _bn_dropout_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        snn.BayesLinear(6, 16, init_sigma=0.2),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(0.3),
        snn.BayesLinear(16, 3, init_sigma=0.2, estimator="flipout"),
    )


def _train_steps(sp, x, steps=2) -> list[torch.Tensor]:
    outs = []
    for k in range(steps):
        torch.manual_seed(100 + k)  # the same dropout masks in both runs
        outs.append(sp(x).detach())
    return outs


def _predict_keeps_training_state(grid) -> dict:
    """Predict in training mode between training steps: the run must equal one that never
    predicted (step counter, BatchNorm running stats, train/eval flags, later noise)."""
    x = torch.randn(B, 6, generator=torch.Generator().manual_seed(3))
    ref = sd.SampleParallel(_bn_dropout_mlp(), S, grid, seed=SEED)
    sp = sd.SampleParallel(_bn_dropout_mlp(), S, grid, seed=SEED)
    sp.model[4].eval()  # a submodule's own flag must survive too
    ref.model[4].eval()
    want = _train_steps(ref, x, 1)
    got = _train_steps(sp, x, 1)
    buffers = {n: b.clone() for n, b in sp.named_buffers()}
    flags = [m.training for m in sp.modules()]
    # the eval-mode predictive of the current step, from a copy in eval mode
    ev = sd.SampleParallel(_bn_dropout_mlp(), S, grid, seed=SEED)
    ev.load_state_dict(sp.state_dict())
    ev.eval()
    pred = sp.predict(x)
    res = {
        "step_before_after": (1, sp.step),
        "flags_kept": flags == [m.training for m in sp.modules()],
        "buffers_kept": all(torch.equal(b, buffers[n]) for n, b in sp.named_buffers()),
    }
    want += _train_steps(ref, x, 1)
    got += _train_steps(sp, x, 1)
    res["later_steps_equal"] = all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    res["predict_is_eval"] = torch.equal(pred, ev.predict(x)) and pred.shape == (S, B, 3)
    res["eval_flag_kept"] = not ev.training and ev.step == 1 and sp.step == 2
    return res


def _check_predict(res: dict) -> None:
    assert res["step_before_after"] == (1, 1)
    assert res["flags_kept"] and res["buffers_kept"] and res["eval_flag_kept"]
    assert res["later_steps_equal"] and res["predict_is_eval"]


def test_predict_keeps_training_state_one_process(monkeypatch):
    for k in list(os.environ):
        if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") or k.startswith("SLURM_"):
            monkeypatch.delenv(k)
    _check_predict(_predict_keeps_training_state(sd.make_grid()))


def test_sample_parallel_passes_estimator_chunk_and_fold_input(monkeypatch):
    for k in list(os.environ):
        if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") or k.startswith("SLURM_"):
            monkeypatch.delenv(k)
    x = torch.randn(B, 6)
    sp = sd.SampleParallel(_bayes_mlp(), S, seed=SEED, estimator="lrt", chunk=3)
    assert sp.module.chunk == 3 and not sp.module.fold_input
    assert {m.estimator for m in sp.model.modules() if snn.is_bayesian(m)} == {"lrt"}
    ref = snn.MonteCarlo(_bayes_mlp(), S, seed=SEED, estimator="lrt", fold_input=True)
    from tests.ops.tolerance import assert_close  # here, not at the top: see _check_rel

    assert_close(sp(x), ref(x), reduction=16)  # the last layer sums K=16 terms
    folded = sd.SampleParallel(_bayes_mlp(), S, seed=SEED, fold_input=True)
    assert folded.module.fold_input and folded.module.chunk is None
    with pytest.raises(ValueError, match="chunk must be"):
        sd.SampleParallel(_bayes_mlp(), S, chunk=0)


# ----------------------------------------------------------------------------- 2 ranks


def two_rank_job(ctx: dict) -> dict:
    grid = sd.init(sample=2)  # from the SLURM variables
    res: dict = {"grid": (grid.mode, grid.sample_rank, grid.data_rank)}
    res["runs"] = _grid_runs([grid, sd.make_grid(sample=1, data=2)])

    # wrapping broadcasts rank 0's parameters
    model = _bayes_mlp()
    if ctx["rank"] == 1:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    sp = sd.SampleParallel(model, S, grid)
    res["wrapped_params"] = torch.cat([p.detach().flatten() for p in sp.parameters()])

    # bad input, all with clear messages (and no hang)
    for name, make in (
        ("indivisible", lambda: sd.SampleParallel(_bayes_mlp(), 3, grid)),
        ("grid_world", lambda: sd.SampleParallel(_bayes_mlp(), 4, sd.Grid(sample=4, rank=0))),
        ("init_axes", lambda: sd.init(sample=2, data=2)),
    ):
        try:
            make()
            res[name] = "no error"
        except ValueError as e:
            res[name] = str(e)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = sd.SampleParallel(nn.Linear(6, 3), 2, grid)
    res["plain_warnings"] = [str(w.message) for w in caught]
    res["plain_out"] = tuple(plain(torch.randn(5, 6)).shape)
    res["predict_state"] = _predict_keeps_training_state(grid)
    sd.shutdown()
    return res


@pytest.mark.slow
def test_two_ranks_grid_invariance_and_bad_input(run_workers):
    results = run_workers("two_rank_job", 2, launch="slurm", timeout=150)
    refs = {r: _reference(r) for r in REDUCTIONS}
    torch.testing.assert_close(
        results[1]["wrapped_params"], results[0]["wrapped_params"], rtol=0, atol=0
    )
    for rank, res in enumerate(results):
        assert res["grid"] == ("sp", rank, 0)
        _check_runs(res["runs"], refs)
        assert (
            "num_samples=3 is not divisible by the sample axis grid.sample=2" in res["indivisible"]
        )
        assert "grid sample=4 x data=1 = 4 does not match the world size 2" in res["grid_world"]
        assert "sample=2 x data=2 = 4 does not match the world size 2" in res["init_axes"]
        assert any("without Bayesian layers" in w for w in res["plain_warnings"])
        assert res["plain_out"] == (1, 5, 3)
        _check_predict(res["predict_state"])


# ----------------------------------------------------------------------------- 4 ranks


def four_rank_job(ctx: dict) -> dict:
    grid = sd.init(
        sample=2, data=2, rank=ctx["rank"], world_size=ctx["world"], init_method=ctx["init_method"]
    )
    res: dict = {"grid": (grid.mode, grid.sample_rank, grid.data_rank)}
    res["sample_ranks"] = dist.get_process_group_ranks(grid.sample_group)
    res["data_ranks"] = dist.get_process_group_ranks(grid.data_group)
    grids = [grid, sd.make_grid(sample=4, data=1), sd.make_grid(mode="ddp")]
    res["modes"] = [g.mode for g in grids]
    res["runs"] = _grid_runs(grids)
    res["augment"] = _augment_seeds(grid)
    # the gather runs over the 2-rank sample group, in sample-rank order
    t = torch.full((1, 2), float(ctx["rank"]))
    res["gathered"] = sd.all_gather_samples(t, grid.sample_group)[:, 0]
    sd.shutdown()
    return res


@pytest.mark.slow
def test_four_ranks_grid_invariance_and_augmentation(run_workers):
    results = run_workers("four_rank_job", 4, timeout=200)
    refs = {r: _reference(r) for r in REDUCTIONS}
    for rank, res in enumerate(results):
        sample_rank, data_rank = rank % 2, rank // 2
        assert res["grid"] == ("hybrid", sample_rank, data_rank)
        assert res["sample_ranks"] == [2 * data_rank, 2 * data_rank + 1]  # contiguous
        assert res["data_ranks"] == [sample_rank, sample_rank + 2]
        assert res["modes"] == ["hybrid", "sp", "ddp"]
        _check_runs(res["runs"], refs)
        assert res["gathered"].tolist() == [2.0 * data_rank, 2.0 * data_rank + 1]
        assert res["augment"]["none"] == (None, None)

    indep = [res["augment"]["independent"] for res in results]
    shared = [res["augment"]["shared"] for res in results]
    assert len({seed for seed, _ in indep}) == 4  # every rank its own stream
    assert not torch.equal(indep[0][1], indep[1][1])
    # shared: one stream per sample group (ranks 0,1 and 2,3), different across data groups
    assert shared[0][0] == shared[1][0] and shared[2][0] == shared[3][0]
    assert shared[0][0] != shared[2][0]
    assert torch.equal(shared[0][1], shared[1][1])


def _check_rel(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """I3's bound: ``|a - b| / |b|`` (norms over the whole tensor) at most
    ``GRID_INVARIANCE_RTOL``."""
    # imported here, in the parent: the spawned ranks load this file by path without the
    # repository root on sys.path, so a module-level ``tests.ops`` import fails there
    from tests.ops.tolerance import GRID_INVARIANCE_RTOL

    a, b = a.detach(), b.detach()
    err = float((a - b).norm() / b.norm().clamp_min(1e-30))
    assert err <= GRID_INVARIANCE_RTOL, f"{what} rel. error {err:.2e}"


def _check_runs(runs: dict, refs: dict) -> None:
    for (key, reduction), res in runs.items():
        ref = refs[reduction]
        assert res["step"] == STEPS
        assert res["num_buckets"] > 1
        for name, p in ref["params"].items():
            where = f"grid {key}, {reduction}:"
            _check_rel(res["params"][name], p, f"{where} param {name}")
            _check_rel(res["grads"][name], ref["grads"][name], f"{where} grad {name}")
        if "predict" in res:
            b_local = res["predict"].shape[2]
            d = res["data_rank"]
            want = ref["predict"][:, :, d * b_local : (d + 1) * b_local]
            assert res["predict"].shape == (STEPS, S, b_local, 3)
            _check_rel(res["predict"], want, f"grid {key}: predict")
