"""Sampling parallelism in PyTorch Lightning: the ``SamplingParallel`` strategy (extra
``lightning``).

Write the ``LightningModule`` as for one process: put the Bayesian model in a
:class:`spar.nn.MonteCarlo` and call it in the steps::

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.mc = spar.nn.MonteCarlo(spar.nn.bayesianize(net), num_samples=8, seed=0)

        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self.mc(x)  # (S_local, B, C): this rank's samples
            kl = spar.nn.kl_divergence(self.mc)
            return spar.losses.elbo(out, y, kl=kl, dataset_size=N)

        def predict_step(self, batch, batch_idx):
            return self.mc(batch[0])  # (S, B, C): all S samples (eval mode)

    Trainer(strategy=SamplingParallel(sample=2, data=1), accelerator="cpu", devices=2)

Without the strategy this module runs all S samples in one process. With it, each
:class:`~spar.nn.MonteCarlo` of the module is replaced, for the duration of a ``fit``,
``validate``, ``test`` or ``predict``, by a :class:`spar.distributed.SampleParallel` over
the same model, seed and step on the strategy's ``sample x data`` grid. In training mode
it returns this rank's ``S / sample`` samples (pass ``group=trainer.strategy.sample_group``
to :func:`spar.losses.elbo` for ``reduction="mixture"``; ``"mean_samples"`` needs nothing);
in eval mode it returns all S samples, gathered over the sample group, like
:meth:`SampleParallel.predict`. Gradients are averaged by spar's reducer during
``backward``, so Lightning's optimiser step and gradient clipping see the averaged
gradients. One step equals one step of spar's own loop on the same grid (invariant I3).

What the strategy changes in Lightning's ``DDPStrategy`` (it inherits the launchers, the
process-group set-up, ``barrier``/``broadcast``/``reduce`` and device placement):

- ``setup_environment``: after the process group, builds the grid
  (:func:`spar.distributed.make_grid`).
- ``setup``: the generic ``Strategy.setup`` (so the model is prepared the same way for
  every trainer function), with ``_setup_model`` swapping the ``MonteCarlo`` modules for
  ``SampleParallel`` instead of wrapping the module in ``DistributedDataParallel``; the
  ``LightningModule`` stays the model Lightning calls, so no forward redirection.
- ``teardown``: puts the ``MonteCarlo`` modules back (with the step counter reached), and
  removes the reducer's hooks.
- ``lightning_module_state_dict``: checkpoints hold the keys of the plain module (no
  ``SampleParallel`` in them), so they load with or without the strategy and on any grid
  (Lightning restores them before ``setup``, into the plain module); the step counter that
  keys the noise is in them (invariant I5), so resuming on the same grid continues the run
  bit for bit.
- ``distributed_sampler_kwargs`` / ``process_dataloader``: the ranks of a sample group get
  the same batches and data ranks disjoint shards; the ``DistributedSampler`` Lightning
  injects is replaced by :class:`spar.data.GridSampler` (same seed and shuffling) for the
  layout I3 relies on. The ``DataLoader``'s ``batch_size`` is the per-rank batch; the
  global batch is ``data`` times it. Prediction keeps Lightning's sampler.
- ``block_backward_sync``: gradient accumulation (``accumulate_grad_batches``) skips the
  all-reduce with ``SampleParallel.no_sync``, as DDP's ``no_sync``.

Requirements, checked with a clear error: the module has at least one ``MonteCarlo``
(not nested, ``first_sample=0``), every trainable parameter is inside one, and
``sync_batchnorm`` is off (the ranks of a sample group hold different samples).
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from spar.data import GridSampler
from spar.distributed import Grid, SampleParallel, all_gather_samples, make_grid
from spar.integrations import require
from spar.nn import MonteCarlo

require("lightning", integration="lightning", extra="lightning")
# after the check above, which turns a missing extra into one line naming it
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, ParallelStrategy  # noqa: E402
from lightning.pytorch.utilities.data import _update_dataloader  # noqa: E402

__all__ = ["SamplingParallel"]


class _LightningSampleParallel(SampleParallel):
    """``SampleParallel`` that in eval mode returns all S samples gathered over the sample
    group, as the ``MonteCarlo`` it stands in for returns all S."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = super().forward(x, *args, **kwargs)
        if self.training:
            return out
        return all_gather_samples(out, self.grid.sample_group)


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (root.get_submodule(path) if path else root), attr


class SamplingParallel(DDPStrategy):
    """Lightning strategy: sampling parallelism on a ``sample x data`` grid (see the module
    docstring for what it does and requires).

    Args:
        sample, data: the grid's axis sizes, as for :func:`spar.distributed.init`
            (``sample=None`` means ``world // data``).
        bucket_mb, first_bucket_mb, comm_dtype, find_unused_parameters: options of the
            gradient reducer (:class:`spar.distributed.Reducer`).
        accelerator, parallel_devices, cluster_environment, checkpoint_io,
            precision_plugin, process_group_backend, timeout, start_method: as for
            Lightning's ``DDPStrategy`` (the Trainer sets the first five).

    Attributes:
        grid: the :class:`spar.distributed.Grid` (after the environment is set up).
        sample_group: ``grid.sample_group``, for :func:`spar.losses.elbo`'s ``group``.
    """

    def __init__(
        self,
        sample: int | None = None,
        data: int | None = 1,
        *,
        bucket_mb: float = 25.0,
        first_bucket_mb: float = 1.0,
        comm_dtype: torch.dtype | None = None,
        find_unused_parameters: bool = False,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        process_group_backend: str | None = None,
        timeout: datetime.timedelta | None = None,
        start_method: str = "popen",
    ) -> None:
        for name, value in (("sample", sample), ("data", data)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
        kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            start_method=start_method,
            **kwargs,
        )
        self._axes = (sample, data)
        self._reducer_options = dict(
            bucket_mb=bucket_mb,
            first_bucket_mb=first_bucket_mb,
            comm_dtype=comm_dtype,
            find_unused_parameters=find_unused_parameters,
        )
        self._grid: Grid | None = None
        # (qualified name, the user's MonteCarlo, the SampleParallel standing in for it)
        self._swapped: list[tuple[str, MonteCarlo, SampleParallel]] = []

    @property
    def grid(self) -> Grid:
        if self._grid is None:
            raise RuntimeError("the grid exists once the Trainer has set up the strategy")
        return self._grid

    @property
    def sample_group(self) -> Any:
        return self.grid.sample_group

    def setup_environment(self) -> None:
        super().setup_environment()
        sample, data = self._axes
        self._grid = make_grid(sample, data, device=self.root_device)

    def setup(self, trainer: pl.Trainer) -> None:
        if self._layer_sync is not None:
            raise ValueError(
                "SamplingParallel does not support sync_batchnorm: the ranks of a sample group "
                "hold different weight samples, so their batch statistics must stay apart"
            )
        ParallelStrategy.setup(self, trainer)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        module = self.lightning_module
        found = [(n, m) for n, m in module.named_modules() if isinstance(m, MonteCarlo)]
        if not found:
            raise ValueError(
                "SamplingParallel needs a spar.nn.MonteCarlo in the LightningModule: wrap the "
                "Bayesian model (self.mc = spar.nn.MonteCarlo(model, num_samples=S)) and call "
                "self.mc(x) in the steps"
            )
        for name, mc in found:
            outer = [n for n, _ in found if name.startswith(n + ".")]
            if outer:
                raise ValueError(f"MonteCarlo {name!r} is nested in MonteCarlo {outer[0]!r}")
            if mc.first_sample != 0:
                raise ValueError(
                    f"MonteCarlo {name!r} has first_sample={mc.first_sample}; SamplingParallel "
                    "splits the samples itself, so leave it at 0"
                )
        inside = {id(p) for _, mc in found for p in mc.parameters()}
        outside = [
            n for n, p in module.named_parameters() if p.requires_grad and id(p) not in inside
        ]
        if outside:
            raise ValueError(
                "trainable parameters outside the spar.nn.MonteCarlo modules would not be "
                f"averaged over the ranks: {', '.join(outside[:5])}; move them into the wrapped "
                "model or freeze them"
            )
        for name, mc in found:
            sp = _LightningSampleParallel(
                mc.model, mc.num_samples, self.grid, seed=mc.seed, augment=None,
                chunk=mc.chunk, fold_input=mc.fold_input, **self._reducer_options,
            )  # fmt: skip
            sp.step = mc.step  # restored from a checkpoint before setup
            sp.train(mc.training)
            parent, attr = _parent(module, name)
            setattr(parent, attr, sp)
            self._swapped.append((name, mc, sp))
        return model

    def teardown(self) -> None:
        module = self.lightning_module
        for name, mc, sp in reversed(self._swapped):
            mc.step = sp.step
            mc.train(sp.training)
            if sp.reducer is not None:
                sp.reducer.remove()
            parent, attr = _parent(module, name)
            setattr(parent, attr, mc)
        self._swapped.clear()
        super().teardown()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The plain module's state dict: ``mc.module.x`` (under ``SampleParallel``) is
        saved as ``mc.x``. Lightning loads checkpoints before ``setup``, into the plain
        module."""
        state = super().lightning_module_state_dict()
        for name, _, _ in self._swapped:
            wrapped, plain = f"{name}.module.", f"{name}."
            state = {
                (plain + k[len(wrapped) :] if k.startswith(wrapped) else k): v
                for k, v in state.items()
            }
        return state

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.grid.data, "rank": self.grid.data_rank}

    def process_dataloader(self, dataloader: object) -> object:
        if isinstance(dataloader, DataLoader) and type(dataloader.sampler) is DistributedSampler:
            s = dataloader.sampler
            sampler = GridSampler(
                s.dataset, self.grid, shuffle=s.shuffle, seed=s.seed,
                batch_size=dataloader.batch_size, drop_last=s.drop_last,
            )  # fmt: skip
            return _update_dataloader(dataloader, sampler)
        return dataloader

    @contextlib.contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for _, _, sp in self._swapped:
                stack.enter_context(sp.no_sync())
            yield
