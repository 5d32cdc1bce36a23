"""How a backend turns its kernels into spar primitives: custom ops, fakes, autograd.

A *primitive* is one differentiable piece of math that an estimator is written in
(:mod:`spar.ops`): ``sampled_linear``, ``sampled_conv``, ``lrt_noise``, ``sign_mul``, plus
the non-differentiable ``normal``. A backend supplies, per primitive, a forward and a
backward function with plain Python signatures::

    forward(*inputs, key, *static) -> Tensor
    backward(dy, *inputs, key, *static, needs) -> tuple[Tensor | None, ...]  # one per input

``inputs`` are tensors (or None), ``key`` is a :class:`spar.rng.NoiseKey` with an int
step, ``static`` are ints (parameter ids, flags, convolution geometry), ``needs`` says
which input gradients are wanted. :func:`define` registers both as ``torch.library``
custom ops and returns a differentiable function. Every primitive shares one schema, so the
noise key is packed in one place (:func:`pack_key`); for ``op = {backend}_{primitive}``::

    spar::{op}(Tensor?[] inputs, Tensor step, int[] key, int[] static) -> Tensor
    spar::{op}_backward(Tensor dy, Tensor?[] inputs, Tensor step, int[] key,
                        int[] static, bool[] needs) -> Tensor[]

``step`` is a 0-d int64 CPU tensor read when the op runs, so a compiled model whose step
advances every training step is traced once; ``key`` is ``[seed, first_sample,
num_samples, data_offset]``, constant from step to step. The backward's fake is generic
(each gradient has its input's shape and dtype); a backend gives only the forward's.

``torch.compile`` and FakeTensor tracing see one opaque node per op; they do not trace into
the noise generator or the kernels. The autograd Function saves the inputs and the key,
never noise or sampled weights, and its backward calls the backward op, which regenerates
the noise. In eager mode the Function calls the implementations directly (no dispatcher
round trip, and dispatch modes such as memory trackers see the aten ops inside).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from spar import _env
from spar.ops import dispatch
from spar.rng import NoiseKey

# the floor under a variance before its square root: sqrt stays differentiable at 0 and the
# gradient is 0 below it (lrt's variance of a zero input). Every backend and the reference.
VAR_FLOOR = 1e-30


def chunk_samples(num_samples: int, numel_per_sample: int) -> int:
    """How many samples' weights a backend materializes at once: as many as fit in
    ``SPAR_CHUNK_NUMEL`` elements, and at least one (a weight larger than the budget is
    sampled whole)."""
    return max(1, min(num_samples, _env.chunk_numel() // max(1, numel_per_sample)))


def pack_key(key: NoiseKey) -> tuple[Tensor, list[int]]:
    """``(step, [seed, first_sample, num_samples, data_offset])``: the key as op arguments.
    A tensor step (from :class:`spar.nn.MonteCarlo` or :func:`spar.sampling`) passes
    through; an int is wrapped."""
    step = key.step
    if not isinstance(step, Tensor):
        step = torch.tensor(step, dtype=torch.int64)
    return step, [key.seed, key.first_sample, key.num_samples, key.data_offset]


def unpack_key(step: Tensor, ints: Sequence[int]) -> NoiseKey:
    """The key with an int step, inside an implementation (where kernels run)."""
    seed, first_sample, num_samples, data_offset = (int(v) for v in ints)
    return NoiseKey(seed, int(step), first_sample, num_samples, data_offset)


def _traced(args) -> bool:
    if torch.compiler.is_compiling():
        return True
    return any(isinstance(a, FakeTensor) for a in args if isinstance(a, Tensor)) or any(
        isinstance(t, FakeTensor) for a in args if isinstance(a, list) for t in a
    )


# --- fakes: the output of each primitive as an empty tensor (shapes, dtypes, device) ------
# Arguments: the tensor inputs, the number of samples, then the static ints.


def _folded_rows(t, num_samples: int, shared: int) -> int:
    return num_samples * t.shape[0] if shared else t.shape[0]


def _sampled_linear_fake(x, mu, rho, num_samples, pid, shared):
    return x.new_empty(_folded_rows(x, num_samples, shared), rho.shape[0])


def conv_out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _sampled_conv_fake(x, mu, rho, num_samples, pid, shared, groups, *geometry):
    nd = rho.dim() - 2
    geo = (geometry[:nd], geometry[nd : 2 * nd], geometry[2 * nd :])
    spatial = [conv_out_size(*a) for a in zip(x.shape[2:], rho.shape[2:], *geo, strict=True)]
    return x.new_empty(_folded_rows(x, num_samples, shared), rho.shape[0], *spatial)


def _folded_fake(t, num_samples, noise_id, shared):
    return t.new_empty(_folded_rows(t, num_samples, shared), *t.shape[1:])


def _normal_fake(like, num_samples, pid, *shape):
    return like.new_empty((num_samples, *shape), dtype=torch.float32)


FAKES = {
    "sampled_linear": _sampled_linear_fake,
    "sampled_conv": _sampled_conv_fake,
    "lrt_noise": _folded_fake,
    "sign_mul": _folded_fake,
    "normal": _normal_fake,
}


def _fake_grads(dy, inputs, step, key, static, needs):
    return [
        (t.new_empty(t.shape) if need else t.new_empty(0)) if t is not None else dy.new_empty(0)
        for t, need in zip(inputs, needs, strict=True)
    ]


def _device_of(tensors: Sequence[Tensor | None]):
    """A guard that makes the tensors' CUDA device the current one while a primitive runs:
    Triton (and CuPy) launch on the current device, not on their arguments' (a model on
    ``cuda:1`` in a process whose current device is ``cuda:0``). No-op on other devices."""
    t = next((t for t in tensors if isinstance(t, Tensor)), None)
    if t is not None and t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def define(primitive: str, backend: str, forward: Callable, backward: Callable | None = None,
           *, dtypes: Sequence[torch.dtype] | None = None):  # fmt: skip
    """Register ``backend``'s implementation of ``primitive`` as the custom ops
    ``spar::{backend}_{primitive}`` (and ``..._backward`` when ``backward`` is given, i.e.
    for every primitive but ``normal``) and with the dispatcher, serving ``dtypes`` (None:
    every dtype; see :mod:`spar.ops.dispatch` for which tensor's dtype counts); returns
    ``apply(*inputs, key, *static)``, differentiable w.r.t. the tensor inputs."""
    fake = FAKES[primitive]
    name = f"{backend}_{primitive}"

    def fwd_impl(inputs: Sequence[Tensor | None], step: Tensor, key: Sequence[int],
                 static: Sequence[int]) -> Tensor:  # fmt: skip
        with _device_of(inputs):
            return forward(*inputs, unpack_key(step, key), *(int(s) for s in static))

    def fwd_fake(inputs, step, key, static):
        return fake(*inputs, int(key[2]), *(int(s) for s in static))

    fwd_op = torch.library.custom_op(f"spar::{name}", fwd_impl, mutates_args=())
    fwd_op.register_fake(fwd_fake)

    def call_forward(inputs, step, key, static):
        args = (inputs, step, key, static)
        return fwd_op(*args) if _traced(inputs) else fwd_impl(*args)

    if backward is None:

        def apply_nograd(*args):
            n = len(args) - next(i for i, a in enumerate(args) if isinstance(a, NoiseKey))
            inputs, (key, *static) = args[:-n], args[-n:]
            step, ints = pack_key(key)
            # not differentiable: detached inputs keep autograd away from the op
            inputs = [t.detach() if isinstance(t, Tensor) else t for t in inputs]
            return call_forward(inputs, step, ints, list(static))

        dispatch.register(primitive, backend, apply_nograd, dtypes)
        return apply_nograd

    def bwd_impl(dy: Tensor, inputs: Sequence[Tensor | None], step: Tensor, key: Sequence[int],
                 static: Sequence[int], needs: Sequence[bool]) -> list[Tensor]:  # fmt: skip
        with _device_of([dy]):
            grads = backward(
                dy, *inputs, unpack_key(step, key), *(int(s) for s in static), tuple(needs)
            )
        # custom ops return tensors: what was not asked for is an empty placeholder
        return [
            g if (g is not None and need) else dy.new_empty(0)
            for g, need in zip(grads, needs, strict=True)
        ]

    bwd_op = torch.library.custom_op(f"spar::{name}_backward", bwd_impl, mutates_args=())
    bwd_op.register_fake(_fake_grads)

    def call_backward(dy, inputs, step, key, static, needs):
        args = (dy, inputs, step, key, static, needs)
        return bwd_op(*args) if _traced([dy, inputs]) else bwd_impl(*args)

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, step, key, static, *inputs):
            ctx.save_for_backward(*inputs)
            # the step (a 0-d tensor that nothing modifies in place: spar.sampling holds its
            # own copy) rides on ctx rather than in the saved tensors
            ctx.step, ctx.key, ctx.static = step, key, static
            return call_forward(list(inputs), step, key, static)

        @staticmethod
        def backward(ctx, dy):
            inputs = ctx.saved_tensors
            needs = list(ctx.needs_input_grad[3:])
            grads = call_backward(dy, list(inputs), ctx.step, ctx.key, ctx.static, needs)
            return None, None, None, *(g if n else None for g, n in zip(grads, needs, strict=True))

    Fn.__name__ = Fn.__qualname__ = f"{name}_function"

    @functools.wraps(forward)
    def apply(*args):
        n = len(args) - next(i for i, a in enumerate(args) if isinstance(a, NoiseKey))
        inputs, (key, *static) = args[:-n], args[-n:]
        step, ints = pack_key(key)
        return Fn.apply(step, ints, [int(s) for s in static], *inputs)

    dispatch.register(primitive, backend, apply, dtypes)
    return apply
