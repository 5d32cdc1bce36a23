"""spar's ops as PyTorch custom ops (``torch.library``, namespace ``spar``).

Each Bayesian op is registered with the dispatcher as a forward and a backward custom op,
both with a fake implementation (shapes and dtypes only). ``torch.compile`` and FakeTensor
tracing see one opaque node per op: they do not trace into the noise generator (whose CPU
loop is itself ``torch.compile``d) or the Triton launchers. The op files define their ops
next to the code they run (:func:`spar_op`); each keeps its ``torch.autograd.Function``,
whose forward and backward call the two ops (dynamo traces the Function, so the compiled
graph calls the backward op, which regenerates the noise: nothing is stored, as in eager
mode).

In eager mode the Functions call the ops' implementations directly: no dispatcher round
trip per call, and dispatch modes (memory trackers, FLOP counters) see the aten ops inside,
as they did before the ops were registered. Traced (torch.compile, export, FakeTensor
inputs), they call the registered op.

The noise key reaches an op as ``(step, seed, first_sample, num_samples[, data_offset])``.
``step`` is a 0-d int64 tensor that the op reads when it runs, so a compiled model whose
step advances every training step (``MonteCarlo``'s step buffer) is traced once; the other
fields are ints, constant from step to step (``num_samples`` also fixes shapes). Keep that
tensor on the CPU: reading it from a GPU would synchronize once per op.

This module holds the key helpers and the one op every backend shares, ``spar::normal``
(the keyed normals of :mod:`spar.rng`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from spar import rng
from spar.rng import NoiseKey


def step_tensor(key: NoiseKey) -> Tensor:
    """The key's step as the 0-d int64 tensor the ops take: a tensor step (from
    :class:`spar.nn.MonteCarlo` or :func:`spar.sampling`) passes through, an int is wrapped."""
    step = key.step
    if isinstance(step, Tensor):
        return step
    return torch.tensor(step, dtype=torch.int64)


def key_args(key: NoiseKey) -> tuple[Tensor, int, int, int, int]:
    """``(step, seed, first_sample, num_samples, data_offset)``: the key as op arguments."""
    return step_tensor(key), key.seed, key.first_sample, key.num_samples, key.data_offset


def make_key(step: Tensor, seed: int, first_sample: int, num_samples: int,
             data_offset: int = 0) -> NoiseKey:  # fmt: skip
    """The key with an int step, inside an op's implementation (where the launchers and
    the generator run)."""
    return NoiseKey(seed, int(step), first_sample, num_samples, data_offset)


def or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    """An op's output where the result was not asked for: an empty placeholder (custom ops
    return tensors, never None; the autograd Function maps it back to None)."""
    return like.new_empty(0) if t is None else t


def spar_op(name: str, fake: Callable) -> Callable[[Callable], Callable]:
    """Register the decorated function (type-annotated: the schema is inferred from it) as
    the custom op ``spar::{name}`` with the fake implementation ``fake``; returns a function
    that calls the registered op (``torch.ops.spar.{name}``) when traced and the
    implementation itself in eager mode."""

    def register(impl: Callable) -> Callable:
        op = torch.library.custom_op(f"spar::{name}", impl, mutates_args=())
        op.register_fake(fake)

        @functools.wraps(impl)
        def call(*args):
            if torch.compiler.is_compiling() or any(isinstance(a, FakeTensor) for a in args):
                return op(*args)
            return impl(*args)

        return call

    return register


def _normal_fake(step, seed, first_sample, num_samples, pid, shape, first_row, device):
    return torch.empty((num_samples, *shape), dtype=torch.float32, device=device)


@spar_op("normal", _normal_fake)
def normal_op(step: Tensor, seed: int, first_sample: int, num_samples: int, pid: int,
              shape: Sequence[int], first_row: int, device: torch.device) -> Tensor:  # fmt: skip
    """Float32 ``(num_samples, *shape)`` noise of parameter ``pid`` (:func:`spar.rng.normal`)."""
    return rng.normal(seed, int(step), pid, first_sample, num_samples, shape,
                      first_row=first_row, device=device)  # fmt: skip


def normal(
    key: NoiseKey,
    pid: int,
    shape: Sequence[int],
    *,
    first_row: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """:meth:`spar.rng.NoiseKey.normal` for all of the key's samples through the
    ``spar::normal`` op: ``(num_samples, *shape)`` in ``dtype``, generated in float32."""
    device = torch.device("cpu") if device is None else torch.device(device)
    eps = normal_op(
        step_tensor(key), key.seed, key.first_sample, key.num_samples, pid, list(shape),
        first_row, device,
    )  # fmt: skip
    return eps.to(dtype)
