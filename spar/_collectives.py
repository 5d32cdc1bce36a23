"""Differentiable collectives over a process group: the one piece of communication that
a loss needs.

Why this module sits low in the layering
----------------------------------------
The exact mixture likelihood of :func:`spar.losses.elbo` (``reduction="mixture"``) needs
the log-likelihoods of *all* ``S`` samples of an example, and under sampling parallelism
those samples live on different ranks. :mod:`spar.losses` must not import
:mod:`spar.distributed` (losses and metrics are pure tensor math that any training loop
may use; ``spar.distributed`` holds the grid, the reducer and ``SampleParallel``, which
depend on the Bayesian layers). So the differentiable all-gather lives here, in a leaf
module that depends on ``torch.distributed`` only: :mod:`spar.losses`,
:mod:`spar.distributed` and the sample-wise BatchNorm of :mod:`spar.nn.norm` (its
per-sample sums over the data axis) import it, and the dependency arrows point one way.
:mod:`spar.distributed` re-exports :func:`all_gather_samples` and :func:`all_reduce_sum`,
which stay public there; this module is private.

Gradient routing
----------------
The losses that need samples from other ranks (the exact mixture likelihood, the full
predictive) are computed *identically* on every rank of a sample group from the gathered
tensor. The backward of :func:`all_gather_samples` is therefore a reduce-scatter with SUM:
rank ``i`` receives ``sum over ranks j of dL_j / d(slice i)`` = ``a * dL / d(slice i)`` for
a sample group of size ``a``. The reducer then divides by the world size ``a * b`` when it
averages parameter gradients, which cancels the ``a`` and leaves the mean over the ``b``
data shards: exactly the single-process gradient (invariant I3). The same argument holds
for :func:`all_reduce_sum`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_samples", "all_reduce_sum", "group_size"]

# torch >= 2.10 renamed the tensor-in/tensor-out collectives; older releases lack the new
# names, and gloo only gained reduce-scatter together with them.
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(
    dist, "all_gather_into_tensor", None
)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None)


def group_size(group) -> int:
    """Number of ranks in ``group`` (1 for ``None`` or an uninitialized job)."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _gather(t: Tensor, group) -> Tensor:
    n = dist.get_world_size(group)
    t = t.contiguous()
    out = t.new_empty((n * t.shape[0], *t.shape[1:]))
    if _all_gather_single is not None:
        _all_gather_single(out, t, group=group)
    else:
        dist.all_gather(list(out.chunk(n)), t, group=group)
    return out


def _reduce_scatter(g: Tensor, group) -> Tensor:
    n = dist.get_world_size(group)
    g = g.contiguous()
    rows = g.shape[0] // n
    if _reduce_scatter_single is not None:
        out = g.new_empty((rows, *g.shape[1:]))
        _reduce_scatter_single(out, g, op=dist.ReduceOp.SUM, group=group)
        return out
    # fallback for old gloo without reduce-scatter: n times the traffic, same result
    g = g.clone()
    dist.all_reduce(g, op=dist.ReduceOp.SUM, group=group)
    r = dist.get_group_rank(group, dist.get_rank())
    return g[r * rows : (r + 1) * rows].clone()


class _AllGatherSamples(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        return _gather(t, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _reduce_scatter(grad, ctx.group), None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        # every rank's output depends on every rank's input with weight 1
        g = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


def all_gather_samples(t: Tensor, group) -> Tensor:
    """Differentiable all-gather along dim 0 in group-rank order.

    Args:
        t: ``(S_local, ...)``, the same shape on every rank of ``group``.
        group: a process group, or ``None`` (then ``t`` is returned unchanged).

    Returns:
        ``(n * S_local, ...)`` where ``n`` is the group size; rows
        ``[i * S_local, (i + 1) * S_local)`` come from group rank ``i``. Its backward is a
        reduce-scatter with SUM (see the module docstring for why that is the right scale).
    """
    if group_size(group) == 1:
        return t
    if t.dim() == 0:
        raise ValueError("all_gather_samples needs a tensor with a leading sample dim, got 0-d")
    return _AllGatherSamples.apply(t, group)


def all_reduce_sum(t: Tensor, group) -> Tensor:
    """Differentiable all-reduce with SUM: every rank gets ``sum_i t_i``; backward all-reduces
    the gradient with SUM. With ``group=None`` it returns ``t``."""
    if group_size(group) == 1:
        return t
    return _AllReduceSum.apply(t, group)
