"""Collectives of sampling parallelism: the differentiable ones, and parameter broadcast.

:func:`all_gather_samples`, :func:`all_reduce_sum` and :func:`group_size` are defined in
:mod:`spar._collectives`, a leaf module that depends on ``torch.distributed`` only, so that
:mod:`spar.losses` can use the differentiable all-gather for the mixture likelihood without
importing this package (see that module for the gradient routing and why it gives the
single-process gradient). They are re-exported here, where they are public.
:func:`broadcast_tensors` (start-up parameter sync) is used only by this package.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from spar._collectives import all_gather_samples, all_reduce_sum, group_size

__all__ = ["all_gather_samples", "all_reduce_sum", "broadcast_tensors", "group_size"]


@torch.no_grad()
def broadcast_tensors(tensors: list[Tensor], group=None, *, bucket_mb: float = 25.0) -> None:
    """Overwrite ``tensors`` on every rank of ``group`` with group rank 0's values, in place.

    Tensors are packed into flat buffers of at most ``bucket_mb`` per dtype and device, so a
    model of many small parameters costs a few collectives, not one per tensor.
    """
    if group_size(group) == 1 or not tensors:
        return
    src = dist.get_global_rank(group, 0) if group is not None else 0
    cap = max(1, int(bucket_mb * 2**20))
    by_kind: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for chunk_list in by_kind.values():
        chunk: list[Tensor] = []
        size = 0
        for t in [*chunk_list, None]:
            if t is not None and (not chunk or size + t.numel() * t.element_size() <= cap):
                chunk.append(t)
                size += t.numel() * t.element_size()
                continue
            if chunk:
                flat = torch.cat([c.reshape(-1) for c in chunk])
                dist.broadcast(flat, src=src, group=group)
                offset = 0
                for c in chunk:
                    c.copy_(flat[offset : offset + c.numel()].view_as(c))
                    offset += c.numel()
            chunk = [t] if t is not None else []
            size = t.numel() * t.element_size() if t is not None else 0
