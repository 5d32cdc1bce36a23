"""``MonteCarlo``: run a Bayesian model on S weight samples at once."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from spar.nn.layers import assign_noise_names, is_bayesian
from spar.nn.sampling import sampling
from spar.rng import check_seed


class MonteCarlo(nn.Module):
    """Evaluate ``model`` on ``num_samples`` posterior samples in one pass.

    ``forward(x)``: x ``(B, ...)`` is expanded to the folded ``(S*B, ...)`` batch, the model
    runs inside :func:`spar.sampling` and the output ``(S*B, ...)`` comes back as
    ``(S, B, ...)``. In training mode every forward advances the step counter, so each
    step draws fresh noise; in eval mode the step stays put and repeated predictions are
    identical. The step counter is a buffer: it is saved and restored with ``state_dict``,
    which makes a resumed run draw exactly the noise of the uninterrupted one.

    first_sample: global index of local sample 0 (sampling parallelism splits S this way).
    data_offset: global index of the first example of the local batch (per-example noise).

    ``torch.compile(MonteCarlo(model, S), fullgraph=True)`` works: the step reaches the
    Bayesian ops as a tensor (the buffer), so advancing it does not recompile. The backend
    (``SPAR_BACKEND``) is chosen when the model is traced.
    """

    def __init__(
        self, model: nn.Module, num_samples: int, *, seed: int = 0, first_sample: int = 0
    ) -> None:
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int):
            raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if isinstance(first_sample, bool) or not isinstance(first_sample, int) or first_sample < 0:
            raise ValueError(f"first_sample must be an int >= 0, got {first_sample!r}")
        self.model = model
        self.num_samples = num_samples
        self.seed = check_seed(seed)
        self.first_sample = first_sample
        self.data_offset = 0
        self.register_buffer("_step", torch.zeros((), dtype=torch.int64))
        assign_noise_names(model)
        if not any(is_bayesian(m) for m in model.modules()):
            warnings.warn(
                "MonteCarlo wraps a model without Bayesian layers: all samples are identical "
                "(use spar.nn.bayesianize or spar.nn.Bayes* layers)",
                stacklevel=2,
            )

    @property
    def step(self) -> int:
        return int(self._step)

    @step.setter
    def step(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"step must be >= 0, got {value}")
        self._step.fill_(value)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() == 0:
            raise TypeError("MonteCarlo expects a batched tensor input (B, ...)")
        S = self.num_samples
        folded = x.unsqueeze(0).expand(S, *x.shape).reshape(S * x.shape[0], *x.shape[1:])
        # the step buffer itself, not int(step): under torch.compile it stays data
        with sampling(
            S, seed=self.seed, step=self._step, first_sample=self.first_sample,
            data_offset=self.data_offset,
        ):  # fmt: skip
            out = self.model(folded, *args, **kwargs)
        if self.training:
            # a new tensor, not an in-place add: inductor (torch 2.13) may recompute the
            # sampling state's copy of the step from the buffer for backward, after the add
            self._step = self._step + 1
        if not isinstance(out, Tensor) or out.shape[0] != folded.shape[0]:
            raise ValueError(
                "the wrapped model must return a tensor whose first dimension is the folded "
                f"batch S*B={folded.shape[0]}; got "
                f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"
            )
        return out.unflatten(0, (S, x.shape[0]))

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, seed={self.seed}, first_sample={self.first_sample}"
