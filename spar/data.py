"""Data utilities for the ``sample x data`` grid.

:class:`GridSampler` is a ``DistributedSampler`` for the grid: the ranks of one sample
group (same ``data_rank``) get *the same* indices, the data groups get disjoint shards.

Shard layout
------------
Every epoch draws one permutation of the dataset (seeded by ``seed + epoch``, the same on
all ranks). Global batch ``k`` is ``perm[k * G : (k + 1) * G]`` with ``G = data * batch_size``,
and data rank ``j`` gets its ``j``-th block of ``batch_size`` consecutive entries. So with
``DataLoader(dataset, batch_size=batch_size, sampler=GridSampler(...))`` the concatenation
of the local batches in data-rank order *is* the batch one process would draw with
``batch_size * data``, and the global index of a rank's first example is
``data_rank * local_batch_size``; that is the ``data_offset`` that keys per-example noise
(invariant I1), and what :class:`spar.distributed.SampleParallel` sets.

Without ``batch_size`` the blocks are single examples (``perm[j::data]``, the classic
strided shard). The epoch is padded by wrapping around (or truncated with
``drop_last=True``) so that every data rank gets the same number of examples, and so that
the local batches of a step have the same size on every rank: averaging the rank gradients
is then exactly the full-batch mean.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["GridSampler"]


class GridSampler(Sampler[int]):
    """Indices of this rank's shard: same within a sample group, disjoint across data groups.

    Args:
        dataset: anything with ``len()``.
        grid: a :class:`spar.distributed.Grid` (only ``data`` and ``data_rank`` are read),
            or ``None`` for one process.
        shuffle: draw a new permutation every epoch (call :meth:`set_epoch`).
        seed: base seed of the permutation; must be the same on every rank.
        batch_size: the local batch size of the ``DataLoader``; makes each global batch a
            contiguous block split across data ranks (see the module docstring).
        drop_last: drop the tail instead of padding by wrap-around.
    """

    def __init__(
        self,
        dataset: Sized,
        grid: Any = None,
        *,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        self.dataset = dataset
        self.num_replicas = 1 if grid is None else int(grid.data)
        self.data_rank = 0 if grid is None else int(grid.data_rank)
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.block = 1 if batch_size is None else batch_size
        self.drop_last = bool(drop_last)
        self.epoch = 0
        n = len(dataset)
        if n == 0:
            raise ValueError("dataset is empty")
        b = self.num_replicas
        if drop_last:
            self.total = (n // b) * b
            if self.total == 0:
                raise ValueError(
                    f"drop_last=True leaves no examples: {n} examples < data axis size {b}"
                )
        else:
            self.total = math.ceil(n / b) * b
        self.num_samples = self.total // b

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use permutation ``seed + epoch``; call it every epoch on
        every rank, with the same value."""
        self.epoch = int(epoch)

    def _global_order(self) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.total > n:
            # wrap around (repeatedly, for tiny datasets) so every rank gets as many examples
            reps = math.ceil((self.total - n) / n)
            order = order + (order * reps)[: self.total - n]
        return order[: self.total]

    def __iter__(self) -> Iterator[int]:
        order = self._global_order()
        b, j, blk = self.num_replicas, self.data_rank, self.block
        full = b * blk
        out: list[int] = []
        n_full = len(order) // full
        for k in range(n_full):
            base = k * full + j * blk
            out.extend(order[base : base + blk])
        tail = order[n_full * full :]
        if tail:
            # the last global batch is split evenly too (len(tail) is a multiple of b)
            per = len(tail) // b
            out.extend(tail[j * per : (j + 1) * per])
        return iter(out)

    def __len__(self) -> int:
        return self.num_samples
