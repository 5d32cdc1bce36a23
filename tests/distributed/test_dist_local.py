"""One-process tests of the distributed layer: grid arithmetic and validation, launcher
environments, GridSampler layouts on virtual grids, local-mode SampleParallel."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

import spar.distributed as sd
import spar.nn as snn
from spar.data import GridSampler
from spar.distributed.grid import _resolve_axes

_LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k in _LAUNCH or k.startswith("SLURM_"):
            monkeypatch.delenv(k)


# ----------------------------------------------------------------------------- grid


def test_grid_layout_and_modes():
    grids = [sd.Grid(sample=2, data=3, rank=r) for r in range(6)]
    assert [(g.sample_rank, g.data_rank) for g in grids] == [
        (0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2),
    ]  # fmt: skip
    g = grids[3]
    assert g.sample_group_ranks() == [2, 3]  # contiguous sample groups
    assert g.data_group_ranks() == [1, 3, 5]
    assert g.global_rank(1, 2) == 5
    assert g.is_virtual and g.mode == "hybrid"
    assert sd.Grid(sample=4).mode == "sp"
    assert sd.Grid(data=4).mode == "ddp"
    assert sd.Grid().mode == "local" and sd.Grid.local().world_size == 1


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(sample=0), ValueError, "sample must be >= 1, got 0"),
        (dict(sample=2.0), TypeError, "sample must be an int"),
        (dict(sample=2, data=2, rank=4), ValueError, r"rank must be in \[0, sample \* data\)"),
    ],
)
def test_grid_rejects_bad_values(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sd.Grid(**kwargs)
    with pytest.raises(ValueError, match="outside the grid"):
        sd.Grid(sample=2).global_rank(2, 0)


def test_axis_resolution():
    assert _resolve_axes(None, 1, None, 8) == (8, 1)
    assert _resolve_axes(None, None, None, 8) == (8, 1)
    assert _resolve_axes(2, None, None, 8) == (2, 4)
    assert _resolve_axes(None, 4, None, 8) == (2, 4)
    assert _resolve_axes(None, 1, "ddp", 8) == (1, 8)
    assert _resolve_axes(None, 1, "sp", 8) == (8, 1)
    assert _resolve_axes(2, 4, "hybrid", 8) == (2, 4)
    with pytest.raises(ValueError, match=r"grid sample=3 x data=2 = 6 does not match the world"):
        _resolve_axes(3, 2, None, 8)
    with pytest.raises(ValueError, match=r"data=3 does not divide the world size 8 \(8 % 3 = 2\)"):
        _resolve_axes(None, 3, None, 8)
    with pytest.raises(ValueError, match="sample=3 does not divide the world size 8"):
        _resolve_axes(3, None, None, 8)
    with pytest.raises(ValueError, match="mode='ddp' puts all 8 ranks on the data axis"):
        _resolve_axes(2, None, "ddp", 8)
    with pytest.raises(ValueError, match="mode='hybrid' needs both axes > 1"):
        _resolve_axes(8, 1, "hybrid", 8)
    with pytest.raises(ValueError, match="mode must be one of"):
        _resolve_axes(None, 1, "tp", 8)


def test_init_local_and_bad_grid(clean_env):
    grid = sd.init()
    assert grid.mode == "local" and grid.sample_group is None and grid.data_group is None
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match=r"grid sample=2 x data=1 = 2 does not match the world"):
        sd.init(sample=2)
    with pytest.raises(ValueError, match="needs both rank= and world_size="):
        sd.init(rank=0)
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        sd.init(timeout=-1)


# ----------------------------------------------------------------------------- launchers


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("node7", "node7"),
        ("gpu[007-010,12],cpu1", "gpu007"),
        ("a[3,5-6]", "a3"),
        ("rack[2-3]-n[01-04]", "rack2-n01"),
        ("x1,x2", "x1"),
    ],
)
def test_first_host(nodelist, host):
    assert sd.first_host(nodelist) == host


def test_detect_launch_env():
    tr = sd.detect_launch_env(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "9",
         "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    )  # fmt: skip
    assert tr == sd.LaunchEnv("torchrun", 3, 8, 1, "h", 9)
    sl = sd.detect_launch_env(
        {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "8",
         "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[04-07]", "SLURM_JOB_ID": "123456"}
    )  # fmt: skip
    assert sl == sd.LaunchEnv("slurm", 5, 8, 1, "gpu04", 10000 + 123456 % 20000)
    assert sd.detect_launch_env({}) == sd.LaunchEnv("local", 0, 1, 0)
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        sd.detect_launch_env({"RANK": "x", "WORLD_SIZE": "2"})


# ----------------------------------------------------------------------------- GridSampler


def _epoch(n, sample, data, **kw):
    grids = [sd.Grid(sample=sample, data=data, rank=r) for r in range(sample * data)]
    return [list(GridSampler(range(n), g, **kw)) for g in grids], grids


@pytest.mark.parametrize("n, batch_size", [(40, None), (37, 4), (17, 3), (5, None)])
def test_grid_sampler_shards(n, batch_size):
    shards, grids = _epoch(n, 2, 3, seed=5, batch_size=batch_size)
    for g, idx in zip(grids, shards, strict=True):
        # the ranks of a sample group see the same indices
        assert idx == shards[g.global_rank(0, g.data_rank)]
        assert len(idx) == len(GridSampler(range(n), g)) == -(-n // 3)
    heads = [shards[sd.Grid(sample=2, data=3).global_rank(0, d)] for d in range(3)]
    union = sorted(i for h in heads for i in h)
    assert set(union) == set(range(n))  # every example, the padding wraps around
    if n % 3 == 0:
        assert union == list(range(n))  # and disjoint when no padding is needed


def test_grid_sampler_blocks_form_the_single_process_batches():
    n, bl, data = 37, 4, 3
    single = list(GridSampler(range(n), None, seed=9, batch_size=bl * data))
    shards, _ = _epoch(n, 1, data, seed=9, batch_size=bl)
    # local batch k of data rank j is block j of global batch k (the last one split evenly)
    sizes = [bl] * (len(shards[0]) // bl) + ([len(shards[0]) % bl] if len(shards[0]) % bl else [])
    pos = 0
    glob = []
    for size in sizes:
        for j in range(data):
            glob.extend(shards[j][pos : pos + size])
        pos += size
    assert glob[:n] == single[:n]


def test_grid_sampler_epochs_and_options():
    s = GridSampler(range(10), None, seed=1)
    first = list(s)
    s.set_epoch(1)
    assert sorted(list(s)) == list(range(10)) and list(s) != first
    assert list(GridSampler(range(10), None, shuffle=False)) == list(range(10))
    s = GridSampler(range(10), sd.Grid(data=4, rank=3), drop_last=True)
    assert len(s) == len(list(s)) == 2
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        GridSampler(range(10), None, batch_size=0)
    with pytest.raises(ValueError, match="dataset is empty"):
        GridSampler([], None)


# ----------------------------------------------------------------------------- local mode


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(snn.BayesLinear(5, 8), nn.ReLU(), snn.BayesLinear(8, 2))


def test_sample_parallel_local_equals_monte_carlo(clean_env):
    sp = sd.SampleParallel(_model(), 3, seed=4)
    assert sp.grid.mode == "local" and sp.reducer is None and sp.last_timings is None
    mc = snn.MonteCarlo(_model(), 3, seed=4)
    x = torch.randn(6, 5)
    out = sp(x)
    assert out.shape == (3, 6, 2) and sp.step == 1
    torch.testing.assert_close(out, mc(x), rtol=0, atol=0)
    out.sum().backward()
    with sp.no_sync():
        pass
    sp.eval()
    torch.testing.assert_close(sp.predict(x), mc.eval()(x), rtol=0, atol=0)
    assert isinstance(sp.augment_generator, torch.Generator)
    assert "module._step" in sp.state_dict()


def test_sample_parallel_bad_input(clean_env):
    with pytest.raises(ValueError, match="augment must be one of"):
        sd.SampleParallel(_model(), 2, augment="random")
    with pytest.raises(TypeError, match="num_samples must be an int"):
        sd.SampleParallel(_model(), 2.0)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        sd.SampleParallel(_model(), 0)
    with pytest.raises(ValueError, match="does not match the world size 1"):
        sd.SampleParallel(_model(), 4, sd.Grid(sample=2, rank=1))
    with pytest.raises(TypeError, match="grid must be a spar.distributed.Grid"):
        sd.SampleParallel(_model(), 4, "sp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sd.SampleParallel(nn.Linear(3, 2), 2)
    assert [str(w.message) for w in caught if "Bayesian" in str(w.message)] and len(caught) == 1


def test_single_process_pieces(clean_env):
    lin = nn.Linear(3, 3)
    red = sd.Reducer(lin)
    assert not red.enabled and red.last_timings is None
    t = torch.randn(2, 3)
    assert sd.all_gather_samples(t, None) is t and sd.all_reduce_sum(t, None) is t
    seeds = {sd.augment_seed(0, s, d) for s in range(4) for d in range(4)}
    assert len(seeds) == 16 and all(0 <= v < 2**63 for v in seeds)
    with pytest.raises(ValueError, match="bucket_mb must be a positive number"):
        sd.Reducer(lin, bucket_mb=0)
    with pytest.raises(ValueError, match="comm_dtype must be one of"):
        sd.Reducer(lin, comm_dtype=torch.int8)


@pytest.mark.slow
def test_spawn_sets_torchrun_env_and_reports_errors():
    assert sd.spawn(os.getenv, 2, args=("RANK",), timeout=120) == ["0", "1"]
    with pytest.raises(RuntimeError, match="invalid literal for int"):
        sd.spawn(int, 2, args=("x",), timeout=120)


@pytest.mark.slow
def test_spawn_forkserver_preloads_and_checks_its_options():
    assert sd.spawn(
        os.getenv, 2, args=("WORLD_SIZE",), timeout=120, start_method="forkserver",
        preload=("torch",),
    ) == ["2", "2"]  # fmt: skip
    with pytest.raises(ValueError, match="start_method must be"):
        sd.spawn(os.getenv, 1, args=("RANK",), start_method="fork")
    with pytest.raises(ValueError, match="preload needs start_method='forkserver'"):
        sd.spawn(os.getenv, 1, args=("RANK",), preload=("torch",))
