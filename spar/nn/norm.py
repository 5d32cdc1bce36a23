"""Sample-wise BatchNorm: every Monte Carlo sample normalises by its own batch statistics.

Each of the S samples of a step is a separate network. torch's BatchNorm on the folded
``(S*B, ...)`` batch pools the statistics of all samples (the spread *between* samples
enters the variance), and under sampling parallelism each rank pools only its own samples,
so the result of a step depends on the ``sample x data`` grid (invariant I3 breaks).

:class:`BatchNorm1d`, :class:`BatchNorm2d` and :class:`BatchNorm3d` are drop-in subclasses
of torch's (same arguments, parameters, buffers and ``state_dict``) that, in training mode:

* normalise sample ``s`` by the mean and the biased variance over its own ``B`` rows (and
  the spatial positions), per channel: what S separate copies of ``nn.BatchNorm`` would
  compute, one per sample;
* update the running statistics with the *average over the samples* of those copies'
  updates: ``running_mean <- (1 - m) running_mean + m mean_s(mu_s)`` and ``running_var``
  the same with each sample's unbiased variance. This is the average of the running
  statistics that the S copies would hold.

In eval mode they use the running statistics as usual (``track_running_stats=False``:
the per-sample batch statistics, as in training).

Distributed. ``process_group`` is the group of ranks that hold *other rows of the same
samples* (a grid's data axis, ``grid.data_group``; :class:`spar.distributed.SampleParallel`
sets it): the per-sample sums are all-reduced over it, in forward and (differentiably) in
backward, so each sample's statistics are those of its whole global batch, as in one
process; the local batches must have the same size on every rank of the group (the
:class:`spar.data.GridSampler` layout). The ranks of the sample axis hold other samples:
their running statistics are averaged over the sample group after each training step by
``SampleParallel``; the update being linear in the batch statistics, the average of the
local updates is exactly the update of one process holding all S samples.

The shared ``(B, ...)`` input of a layer in front of the first Bayesian layer (see
:class:`spar.nn.MonteCarlo`) is the same batch for every sample: it is normalised once,
by its own statistics, which are every sample's.

Cost. Without a process group the samples are laid side by side as channels,
``(B, S*C, ...)``, and torch's fused batch norm runs once (a transposed copy in and out).
With one, the statistics come from two all-reduced sums (mean, then the centred squares)
and the normalisation is written in tensor operations, as in ``nn.SyncBatchNorm``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spar._collectives import all_reduce_sum, group_size
from spar.nn.layers import _shared_input
from spar.nn.sampling import current_sampling

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class _SampleBatchNorm:
    """The sample-wise forward of :class:`BatchNorm1d` / ``2d`` / ``3d``."""

    process_group = None

    def __deepcopy__(self, memo: dict):
        # a process group is a handle that cannot be copied: the copy shares it (as an
        # EMA/SWA copy of the model, torch.optim.swa_utils.AveragedModel, needs)
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        return new

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not x.dtype.is_floating_point:
            raise TypeError(f"{type(self).__name__} expects a floating-point tensor, got {x.dtype}")
        if not self.training and self.track_running_stats:  # eval: the running statistics
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)  # fmt: skip
        state = current_sampling()
        shared = _shared_input(x, state, type(self).__name__)
        S = 1 if state is None or shared else state.num_samples
        xs = x.unflatten(0, (S, -1))  # (S, B, C, *spatial)
        xf = xs.float() if x.dtype in _LOW_PRECISION else xs
        ranks = group_size(self.process_group)
        group = self.process_group if ranks > 1 else None
        # elements per sample and channel: this rank's, times the ranks holding other rows
        n = xs.numel() // (S * xs.shape[2]) * ranks
        if n <= 1:
            raise ValueError(
                f"{type(self).__name__}: expected more than 1 value per channel and sample "
                f"when training, got input of shape {tuple(x.shape)} with {S} sample(s)"
            )
        if group is None:
            y, mean, var = self._local_batch_norm(xf)
        else:
            y, mean, var = self._synced_batch_norm(xf, n, group)
        if self.training and self.track_running_stats:
            self._update_running(mean, var)
        return y.to(x.dtype).flatten(0, 1)

    def _local_batch_norm(self, xs: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """torch's fused batch norm on the samples laid side by side as channels,
        ``(B, S*C, ...)``: the output ``(S, B, C, ...)`` and, when the running statistics
        are tracked, the per-sample batch means and unbiased variances ``(S, C)`` (what a
        momentum-1 update of zeroed running statistics holds)."""
        S, B, C = xs.shape[:3]
        side = xs.transpose(0, 1).reshape(B, S * C, *xs.shape[3:])
        w = self.weight.repeat(S) if self.affine else None
        b = self.bias.repeat(S) if self.affine else None
        track = self.training and self.track_running_stats
        mean = torch.zeros(S * C, dtype=xs.dtype, device=xs.device) if track else None
        var = torch.zeros_like(mean) if track else None
        y = F.batch_norm(side, mean, var, w, b, True, 1.0, self.eps)
        y = y.view(B, S, C, *xs.shape[3:]).transpose(0, 1)
        if mean is None:
            return y, None, None
        return y, mean.view(S, C), var.view(S, C)

    def _synced_batch_norm(self, xs: Tensor, n: int, group) -> tuple[Tensor, Tensor, Tensor]:
        """The batch norm of ``xs`` ``(S, B, C, ...)`` with per-sample statistics summed over
        the ``n`` values per channel of all ranks of ``group`` (differentiable all-reduces):
        the output, the means and the unbiased variances ``(S, C)``."""
        dims = (1, *range(3, xs.dim()))
        mean = all_reduce_sum(xs.sum(dims), group) / n  # (S, C)
        shape = (xs.shape[0], 1, -1, *([1] * (xs.dim() - 3)))
        centered = xs - mean.view(shape)
        var = all_reduce_sum(centered.square().sum(dims), group) / n
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape[1:]) + self.bias.view(shape[1:])
        return y, mean.detach(), var.detach() * (n / (n - 1))

    @torch.no_grad()
    def _update_running(self, mean: Tensor, unbiased_var: Tensor) -> None:
        """The mean over the samples of S copies' updates (the EMA is linear in the batch
        statistics): ``(S, C)`` per-sample means and unbiased variances."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as torch's
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        rm, rv = self.running_mean, self.running_var
        rm.mul_(1 - factor).add_(mean.mean(0).to(rm.dtype), alpha=factor)
        rv.mul_(1 - factor).add_(unbiased_var.mean(0).to(rv.dtype), alpha=factor)


class BatchNorm1d(_SampleBatchNorm, nn.BatchNorm1d):
    """Sample-wise ``nn.BatchNorm1d`` (same arguments): ``(S*B, C)`` or ``(S*B, C, L)``; see
    the module docstring. ``process_group``: the ranks holding other rows of the same
    samples (``None``: this process only)."""


class BatchNorm2d(_SampleBatchNorm, nn.BatchNorm2d):
    """Sample-wise ``nn.BatchNorm2d`` (same arguments): ``(S*B, C, H, W)``; see the module
    docstring."""


class BatchNorm3d(_SampleBatchNorm, nn.BatchNorm3d):
    """Sample-wise ``nn.BatchNorm3d`` (same arguments): ``(S*B, C, D, H, W)``; see the
    module docstring."""


SAMPLE_BATCH_NORMS = (BatchNorm1d, BatchNorm2d, BatchNorm3d)
