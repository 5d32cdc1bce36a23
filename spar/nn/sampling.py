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
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from spar.rng import check_seed

_MAX_U32 = 2**32


@dataclass(frozen=True)
class SamplingState:
    num_samples: int
    seed: int
    step: int
    first_sample: int = 0
    data_offset: int = 0

    def __post_init__(self) -> None:
        for name in ("num_samples", "step", "first_sample", "data_offset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        check_seed(self.seed)
        if not 0 <= self.step < _MAX_U32:
            raise ValueError(f"step must be in [0, 2**32), got {self.step}")
        if self.first_sample < 0 or self.first_sample + self.num_samples > _MAX_U32:
            raise ValueError(
                f"first_sample must be >= 0 with first_sample + num_samples <= 2**32, got "
                f"first_sample={self.first_sample}, num_samples={self.num_samples}"
            )
        if self.data_offset < 0:
            raise ValueError(f"data_offset must be >= 0, got {self.data_offset}")


_local = threading.local()


def current_sampling() -> SamplingState | None:
    """The innermost active :func:`sampling` state of this thread, or ``None``."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def sampling(
    num_samples: int, *, seed: int, step: int, first_sample: int = 0, data_offset: int = 0
) -> Iterator[SamplingState]:
    """Make Bayesian layers draw ``num_samples`` samples, global indices
    ``[first_sample, first_sample + num_samples)``, at training step ``step``.

    Inputs of Bayesian layers inside the context must have a leading dimension divisible
    by ``num_samples`` (the folded ``(S*B, ...)`` convention).
    """
    state = SamplingState(num_samples, seed, step, first_sample, data_offset)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(state)
    try:
        yield state
    finally:
        stack.pop()
