"""``SampleParallel``: split the S Monte Carlo samples of a step across ranks.

On a ``sample x data`` grid (``a x b`` ranks), the rank at ``(sample_rank=i, data_rank=j)``
evaluates global samples ``[i * S/a, (i + 1) * S/a)`` on data shard ``j``. Its noise comes
from the noise key ``(seed, step, param_id, global sample, element)`` (invariant I1), so the
union of the ranks' samples is exactly the sample set of one process running all S: no
``seed + rank`` reseeding, hence no approximation in the hybrid or in the mixture loss.
Gradients are averaged over the whole world by :class:`~spar.distributed.reducer.Reducer`
(why the world mean is exact for both ELBO reductions is written there).

BatchNorm and Dropout. Each sample is a separate network, so grid invariance (I3) needs the
sample-wise :class:`spar.nn.BatchNorm2d` (etc.) and :class:`spar.nn.Dropout`, which
:func:`spar.nn.bayesianize` swaps in; torch's own get a warning at wrap time. A sample-wise
BatchNorm reduces its per-sample statistics over the data axis (``grid.data_group``, set as
its ``process_group``: every sample is normalised over its whole global batch, forward and
backward), and after every training-mode forward its running statistics are averaged over
the sample axis, so every rank holds the running statistics of one process running all S
samples (the update is linear in the batch statistics: the mean of the ranks' updates is
the one-process update). Dropout masks are keyed by global sample and example: no
communication.
"""

from __future__ import annotations

import contextlib
import datetime
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from spar.distributed.collectives import all_gather_samples, broadcast_tensors
from spar.distributed.grid import Grid, make_grid
from spar.distributed.reducer import Reducer, StepTimings
from spar.nn import Dropout, MonteCarlo, is_bayesian
from spar.nn.norm import SAMPLE_BATCH_NORMS

__all__ = ["AUGMENT_MODES", "SampleParallel", "augment_seed"]

AUGMENT_MODES = ("independent", "shared", "none")
_MASK64 = (1 << 64) - 1


def _grid_dependent_modules(model: nn.Module) -> list[str]:
    """Qualified names of torch's BatchNorm and dropout modules (they make a step depend on
    the grid: pooled batch statistics, masks from the global generator)."""
    torch_kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    return [
        name or type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, torch_kinds) and not isinstance(m, (*SAMPLE_BATCH_NORMS, Dropout))
    ]


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def augment_seed(seed: int, sample_rank: int, data_rank: int) -> int:
    """A 63-bit seed for the augmentation generator of grid position
    ``(sample_rank, data_rank)``; well mixed, so neighbouring ranks get unrelated streams."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (sample_rank & _MASK64))
    h = _splitmix64(h ^ ((data_rank << 32) & _MASK64))
    return h >> 1


class SampleParallel(nn.Module):
    """Sampling parallelism for a Bayesian model (see the module docstring).

    Args:
        model: the Bayesian model. It receives the local batch ``(B_local, ...)`` shared
            by the local samples; after its first Bayesian layer it sees the folded
            ``(S_local * B_local, ...)`` batch (see :class:`spar.nn.MonteCarlo`;
            ``fold_input=True`` gives it the folded copy from the start).
        num_samples: S, the total number of Monte Carlo samples per step; must be divisible
            by ``grid.sample``.
        grid: from :func:`spar.distributed.init`; default the grid of the initialized
            default group with ``sample = world`` (or a local grid).
        seed: noise seed (shared by all ranks: it is part of the noise key).
        bucket_mb, first_bucket_mb, comm_dtype, find_unused_parameters, timeout: passed
            to the gradient :class:`~spar.distributed.reducer.Reducer`.
        augment: ``"independent"``: every rank gets its own augmentation stream (the
            ranks of a sample group then see differently augmented copies of the same
            batch, which the paper reports to converge faster); ``"shared"``: the ranks of a
            sample group share one stream (needed for grid invariance I3); ``"none"``/None:
            no generator.
        broadcast: copy rank 0's parameters and buffers to every rank at wrap time.
        estimator, chunk, fold_input: passed to the inner :class:`spar.nn.MonteCarlo`
            (set every Bayesian layer's estimator; run the local samples in chunks; give the
            model the folded copy of its input instead of the shared ``(B_local, ...)``).

    Attributes:
        module: the inner :class:`spar.nn.MonteCarlo` (``state_dict`` keys start with
            ``module.``). ``model`` is the wrapped model itself.
        augment_generator: ``torch.Generator`` (CPU) for the training loop's random
            augmentation, seeded with :attr:`augment_seed`; ``None`` with ``augment="none"``.
        reducer: the gradient reducer (``None`` on a one-rank grid).
    """

    def __init__(
        self,
        model: nn.Module,
        num_samples: int,
        grid: Grid | None = None,
        *,
        seed: int = 0,
        bucket_mb: float = 25.0,
        first_bucket_mb: float = 1.0,
        augment: str | None = "independent",
        comm_dtype: torch.dtype | None = None,
        find_unused_parameters: bool = False,
        broadcast: bool = True,
        timeout: float | datetime.timedelta | None = None,
        estimator: str | None = None,
        chunk: int | str | None = None,
        fold_input: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int):
            raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if augment is None:
            augment = "none"
        if augment not in AUGMENT_MODES:
            raise ValueError(f"augment must be one of {AUGMENT_MODES} or None, got {augment!r}")
        grid = make_grid() if grid is None else grid
        if not isinstance(grid, Grid):
            raise TypeError(f"grid must be a spar.distributed.Grid, got {type(grid).__name__}")
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if grid.world_size != world:
            raise ValueError(
                f"grid sample={grid.sample} x data={grid.data} = {grid.world_size} does not "
                f"match the world size {world}; build the grid with spar.distributed.init() "
                "or make_grid() on this job"
            )
        if grid.world_size > 1 and grid.world_group is None:
            raise ValueError(
                f"grid {grid} has no process groups (a virtual grid); build it with "
                "spar.distributed.init() or make_grid()"
            )
        if num_samples % grid.sample:
            raise ValueError(
                f"num_samples={num_samples} is not divisible by the sample axis "
                f"grid.sample={grid.sample} ({num_samples} % {grid.sample} = "
                f"{num_samples % grid.sample}); use a multiple of {grid.sample}"
            )
        if grid.device.type == "cuda":
            off = [n for n, p in model.named_parameters() if p.device != grid.device]
            if off:
                raise ValueError(
                    f"parameters must be on this rank's device {grid.device}; move the model "
                    f"first (model.to(grid.device)). Off device: {', '.join(off[:5])}"
                )
        if not any(is_bayesian(m) for m in model.modules()):
            warnings.warn(
                "SampleParallel wraps a model without Bayesian layers: every sample (and so "
                "every rank of a sample group) computes the same output; use "
                "spar.nn.bayesianize or spar.nn.Bayes* layers",
                UserWarning,
                stacklevel=2,
            )
        torch_modules = _grid_dependent_modules(model)
        if torch_modules:
            shown = ", ".join(torch_modules[:5]) + (", ..." if len(torch_modules) > 5 else "")
            warnings.warn(
                f"SampleParallel wraps a model with torch BatchNorm or Dropout modules "
                f"({shown}): they pool the statistics of all local samples or draw masks from "
                "torch's global generator, so training depends on the sample x data grid "
                "(invariant I3 does not hold). Replace them with the sample-wise "
                "spar.nn.BatchNorm1d/2d/3d and spar.nn.Dropout: spar.nn.bayesianize(model) "
                "swaps them in (it keeps their state)",
                UserWarning,
                stacklevel=2,
            )
        self.grid = grid
        self.num_samples = num_samples
        self.local_samples = num_samples // grid.sample
        self.first_sample = grid.sample_rank * self.local_samples
        self.augment = augment
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # we warned about it above
            self.module = MonteCarlo(
                model,
                self.local_samples,
                seed=seed,
                first_sample=self.first_sample,
                estimator=estimator,
                chunk=chunk,
                fold_input=fold_input,
            )
        # the sample-wise BatchNorms reduce their statistics over the ranks holding other
        # rows of the same samples, and average their running statistics over the sample
        # axis after every training step (see the module docstring)
        self._norms = [m for m in model.modules() if isinstance(m, SAMPLE_BATCH_NORMS)]
        if grid.data > 1:
            for m in self._norms:
                m.process_group = grid.data_group
        self.reducer: Reducer | None = None
        if grid.world_size > 1:
            # built first: it validates its arguments, and it runs no collective
            self.reducer = Reducer(
                self.module,
                grid.world_group,
                bucket_mb=bucket_mb,
                first_bucket_mb=first_bucket_mb,
                comm_dtype=comm_dtype,
                find_unused_parameters=find_unused_parameters,
                timeout=timeout,
            )
            if broadcast:
                states = [*self.module.parameters(), *self.module.buffers()]
                broadcast_tensors(states, grid.world_group, bucket_mb=bucket_mb)
        if augment == "none":
            self.augment_seed: int | None = None
            self.augment_generator: torch.Generator | None = None
        else:
            srank = grid.sample_rank if augment == "independent" else 0
            self.augment_seed = augment_seed(seed, srank, grid.data_rank)
            self.augment_generator = torch.Generator()
            self.augment_generator.manual_seed(self.augment_seed)

    @property
    def model(self) -> nn.Module:
        """The wrapped model."""
        return self.module.model

    @property
    def step(self) -> int:
        """The training step of the noise key (advanced by every training-mode forward)."""
        return self.module.step

    @step.setter
    def step(self, value: int) -> None:
        self.module.step = value

    @property
    def last_timings(self) -> StepTimings | None:
        """The reducer's timings of the latest synchronized backward."""
        return None if self.reducer is None else self.reducer.last_timings

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients without communication (gradient accumulation)."""
        if self.reducer is None:
            yield
        else:
            with self.reducer.no_sync():
                yield

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """This rank's samples of the predictive.

        Args:
            x: ``(B_local, ...)``, the local batch (the same on every rank of the sample group).

        Returns:
            ``(S_local, B_local, ...)``: row ``k`` is global sample ``first_sample + k``.
        """
        if not isinstance(x, Tensor) or x.dim() == 0:
            raise TypeError("SampleParallel expects a batched tensor input (B, ...)")
        # data rank j holds examples [j * B_local, (j + 1) * B_local) of the global batch
        # (the GridSampler layout): per-example noise is keyed by that global index
        self.module.data_offset = self.grid.data_rank * x.shape[0]
        out = self.module(x, *args, **kwargs)
        if self.training:
            self._average_running_stats()
        return out

    @torch.no_grad()
    def _average_running_stats(self) -> None:
        """Average the running statistics of the sample-wise BatchNorms in training mode over
        the sample group (one flat all-reduce per dtype): each rank updated them with its own
        samples' statistics, and the mean of those updates is the update of all S samples."""
        if self.grid.sample == 1:
            return
        stats = [
            t for m in self._norms if m.training and m.track_running_stats
            for t in (m.running_mean, m.running_var)
        ]  # fmt: skip
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in stats:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.grid.sample_group)
            flat.div_(self.grid.sample)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    @torch.no_grad()
    def predict(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The full predictive: all S samples, gathered over the sample group.

        Prediction never changes training state: it runs in eval mode (the noise of the
        current step, which the next training step will also draw; BatchNorm reads its
        running statistics and does not update them; dropout is off) and restores every
        module's train/eval flag afterwards, so the step counter, the running statistics
        and the noise of every later training step are as if it had not been called.

        Args:
            x: ``(B_local, ...)``.

        Returns:
            ``(S, B_local, ...)`` on every rank of the sample group, samples in global order.
        """
        if not isinstance(x, Tensor) or x.dim() == 0:
            raise TypeError("SampleParallel expects a batched tensor input (B, ...)")
        return self._predict(x, self.grid.data_rank * x.shape[0], *args, **kwargs)

    @torch.no_grad()
    def _predict(self, x: Tensor, data_offset: int, *args: Any, **kwargs: Any) -> Tensor:
        """:meth:`predict` with the global index of ``x``'s first example given: a chunk of
        an evaluation set keys its per-example noise by its position in the whole set
        (``spar._job.predictive``), not by the data rank's block of a training batch."""
        flags = [(m, m.training) for m in self.modules()]
        saved = self.module.data_offset
        self.eval()
        try:
            self.module.data_offset = data_offset
            out = self.module(x, *args, **kwargs)
        finally:
            for m, training in flags:
                m.training = training
            self.module.data_offset = saved
        return all_gather_samples(out, self.grid.sample_group)

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, local_samples={self.local_samples}, "
            f"first_sample={self.first_sample}, mode={self.grid.mode!r}, augment={self.augment!r}"
        )
