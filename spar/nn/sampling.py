"""The sampling context: which Monte Carlo samples the Bayesian layers draw right now.

Activations carry the samples folded into the batch, sample-major: a tensor of shape
``(S*B, ...)`` whose first ``B`` rows belong to local sample 0. A Bayesian layer reads
``S`` (``num_samples``) from the active context and views its input as ``(S, B, ...)``.

Local sample ``j`` is global sample ``first_sample + j``; the noise of every Bayesian
parameter is keyed by ``(seed, step, param_id, global sample, element)`` (see
:mod:`spar.rng`), so a rank that evaluates samples ``[4, 8)`` draws exactly the weights
that one process evaluating ``[0, 8)`` draws for those samples. ``data_offset`` is the
global index of the first example of the local batch; estimators with per-example noise
(``lrt``, ``flipout``) key that noise by the global example index.

Shared input: ``batch_size`` (``B``, optional) is the per-sample batch size. When it is set,
a Bayesian layer whose input has ``B`` rows (not ``S*B``) treats it as one batch shared by
all ``S`` samples (the op's ``shared_input``) and returns the folded ``(S*B, ...)`` output.
:class:`spar.nn.MonteCarlo` sets it and passes the model its un-expanded ``(B, ...)`` input,
so the first Bayesian layer's GEMMs run on ``B`` rows and the folded copy of the input is
never made. With ``batch_size=None`` (the default) every input must be folded.

The step reaches the ops as data: the state keeps it as a 0-d int64 CPU tensor
(``step_tensor``, its own copy), which the ops read when they run. A model compiled with
``torch.compile`` is therefore not recompiled when the step changes, whether the step comes
from :class:`spar.nn.MonteCarlo`'s step buffer or from ``sampling(..., step=i)``; the other
fields are ints, and a change of any of them recompiles.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from spar.rng import check_seed

_MAX_U32 = 2**32


@dataclass(frozen=True)
class SamplingState:
    """The active sampling context. ``step`` is an int, or a one-element integer tensor
    (:class:`spar.nn.MonteCarlo` passes its step buffer; the value is not range-checked,
    it is taken modulo ``2**32`` as the counter); ``step_tensor`` is the state's own 0-d
    int64 CPU copy of it, the step the ops read. ``batch_size`` is the per-sample batch
    size ``B`` of a shared (un-expanded) input, or ``None`` (see the module docstring)."""

    num_samples: int
    seed: int
    step: int | Tensor
    first_sample: int = 0
    data_offset: int = 0
    batch_size: int | None = None
    step_tensor: Tensor = field(init=False, repr=False, compare=False)
    # ids of the unnamed noise modules (Bayesian layers, spar.nn.Dropout) that ran in this
    # context (eager mode only): two different ones would draw the same noise, see
    # NoiseModule.noise_name in spar.nn.layers
    unnamed: set = field(init=False, repr=False, compare=False)
    # set once a noise module has returned folded (S*B, ...) activations in this context
    # (eager mode only): before that, with ``batch_size`` set, an input must be the B shared
    # rows (see NoiseModule._key)
    folded: list = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("num_samples", "first_sample", "data_offset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
        ):
            raise TypeError(
                f"batch_size must be an int or None, got {type(self.batch_size).__name__}"
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        check_seed(self.seed)
        step = self.step
        if isinstance(step, Tensor):
            if step.numel() != 1 or step.dtype.is_floating_point or step.dtype.is_complex:
                raise TypeError(
                    f"step must be an int or a one-element integer tensor, got a tensor of "
                    f"dtype {step.dtype} and shape {tuple(step.shape)}"
                )
            # a copy: the step a backward pass regenerates noise with cannot change under it
            step_t = step.detach().reshape(()).to("cpu", torch.int64, copy=True)
        else:
            if isinstance(step, bool) or not isinstance(step, int):
                raise TypeError(f"step must be an int, got {type(step).__name__}")
            if not 0 <= step < _MAX_U32:
                raise ValueError(f"step must be in [0, 2**32), got {step}")
            step_t = torch.tensor(step, dtype=torch.int64)
        object.__setattr__(self, "step_tensor", step_t)
        object.__setattr__(self, "unnamed", set())
        object.__setattr__(self, "folded", [])
        if self.first_sample < 0 or self.first_sample + self.num_samples > _MAX_U32:
            raise ValueError(
                f"first_sample must be >= 0 with first_sample + num_samples <= 2**32, got "
                f"first_sample={self.first_sample}, num_samples={self.num_samples}"
            )
        if self.data_offset < 0:
            raise ValueError(f"data_offset must be >= 0, got {self.data_offset}")


class _Local(threading.local):
    def __init__(self) -> None:
        # every thread starts with a stack: torch.compile guards on it, and an attribute
        # that appears after the first call would cost a recompile
        self.stack: list[SamplingState] = []


_local = _Local()


def current_sampling() -> SamplingState | None:
    """The innermost active :func:`sampling` state of this thread, or ``None``."""
    stack = _local.stack
    return stack[-1] if stack else None


@contextlib.contextmanager
def sampling(
    num_samples: int,
    *,
    seed: int,
    step: int | Tensor,
    first_sample: int = 0,
    data_offset: int = 0,
    batch_size: int | None = None,
) -> Iterator[SamplingState]:
    """Make Bayesian layers draw ``num_samples`` samples, global indices
    ``[first_sample, first_sample + num_samples)``, at training step ``step``.

    Inputs of Bayesian layers inside the context must have a leading dimension divisible
    by ``num_samples`` (the folded ``(S*B, ...)`` convention), or, when ``batch_size`` is
    given, exactly ``batch_size`` rows: an input shared by all samples (see the module
    docstring). ``step`` may also be a one-element integer tensor (see
    :class:`SamplingState`).
    """
    state = SamplingState(num_samples, seed, step, first_sample, data_offset, batch_size)
    stack = _local.stack
    stack.append(state)
    try:
        yield state
    finally:
        stack.pop()
