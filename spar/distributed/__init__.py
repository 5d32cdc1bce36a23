"""Sampling parallelism over ``torch.distributed`` (arXiv 2604.04736, done exactly).

* :func:`init` / :func:`make_grid` -> :class:`Grid`: the ``sample x data`` rank grid.
* :class:`SampleParallel`: split S Monte Carlo samples over the sample axis, shards over
  the data axis, gradients averaged by our overlapped bucketed :class:`Reducer`.
* :func:`all_gather_samples`: differentiable gather for the exact mixture likelihood.
* :func:`plan`: cost model that ranks the feasible ``sample x data`` grids.
"""

from spar.distributed.collectives import all_gather_samples, all_reduce_sum, broadcast_tensors
from spar.distributed.grid import (
    MODES,
    Grid,
    LaunchEnv,
    detect_launch_env,
    first_host,
    init,
    make_grid,
    shutdown,
)
from spar.distributed.launch import free_port, spawn
from spar.distributed.plan import PlanRow, plan
from spar.distributed.reducer import Reducer, StepTimings
from spar.distributed.sample_parallel import AUGMENT_MODES, SampleParallel, augment_seed

__all__ = [
    "AUGMENT_MODES",
    "MODES",
    "Grid",
    "LaunchEnv",
    "PlanRow",
    "Reducer",
    "SampleParallel",
    "StepTimings",
    "all_gather_samples",
    "all_reduce_sum",
    "augment_seed",
    "broadcast_tensors",
    "detect_launch_env",
    "first_host",
    "free_port",
    "init",
    "make_grid",
    "plan",
    "shutdown",
    "spawn",
]
