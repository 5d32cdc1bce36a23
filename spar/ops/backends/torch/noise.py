"""Per-example noise primitives and keyed normals on the torch backend (any device).

Per-example noise is keyed like every other noise (:mod:`spar.rng`): element ``(b, j)``
of local sample ``s`` of the noise ``noise_id`` is element ``(row = data_offset + b,
col = j)`` of global sample ``first_sample + s``, where ``j`` indexes the example's
flattened features. A rank holding examples ``[data_offset, data_offset + B)`` therefore
draws what one process holding the whole batch draws for them (I3). Tensors are folded
``(S*B, ...)``, or shared ``(B, ...)`` where all samples read the same rows (broadcast, and
the gradient is the sum over samples). The noise is regenerated in backward, by the
generator of the tensors' device (:mod:`spar.ops.backends.torch.generator`: Triton on CUDA).
"""

from __future__ import annotations

import torch
from torch import Tensor

from spar.ops.backends.torch import generator
from spar.ops.library import VAR_FLOOR
from spar.rng import NoiseKey


def _per_sample(t: Tensor, S: int, shared: int) -> Tensor:
    """``t`` as ``(S or 1, B, ...)``."""
    return t.unsqueeze(0) if shared else t.unflatten(0, (S, -1))


def _example_noise(t: Tensor, key: NoiseKey, noise_id: int, shared: int) -> Tensor:
    """fp32 normals ``(S, B, ...)`` for the examples of ``t``."""
    B = t.shape[0] if shared else t.shape[0] // key.num_samples
    return generator.normal(key, noise_id, (B, *t.shape[1:]), t.device, first_row=key.data_offset)


def _at_least_fp32(t: Tensor) -> Tensor:
    """fp16/bf16 -> fp32 (the floor 1e-30 is 0 in fp16, and the kernels work in fp32)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _sum_if_shared(g: Tensor, shared: int) -> Tensor:
    return g.sum(0) if shared else g.flatten(0, 1)


def lrt_noise_forward(var: Tensor, key: NoiseKey, noise_id: int, shared: int) -> Tensor:
    """``sqrt(max(var, VAR_FLOOR)) * eps``, folded ``(S*B, ...)`` in var's dtype."""
    v = _per_sample(_at_least_fp32(var), key.num_samples, shared)
    eps = _example_noise(var, key, noise_id, shared)
    return (v.clamp_min(VAR_FLOOR).sqrt() * eps).to(var.dtype).flatten(0, 1)


def lrt_noise_backward(dy, var, key, noise_id, shared, needs):
    S = key.num_samples
    eps = _example_noise(var, key, noise_id, shared)
    v = _per_sample(_at_least_fp32(var), S, shared)
    dys = dy.unflatten(0, (S, -1)).to(v.dtype)
    g = torch.where(v >= VAR_FLOOR, dys * eps / (2 * v.sqrt()), 0.0)
    return (_sum_if_shared(g, shared).to(var.dtype),)


def sign_mul_forward(x: Tensor, key: NoiseKey, noise_id: int, shared: int) -> Tensor:
    """``x * sign(eps)`` (``+1`` where ``eps >= 0``), folded ``(S*B, ...)``."""
    xs = _per_sample(x, key.num_samples, shared)
    eps = _example_noise(x, key, noise_id, shared)
    return torch.where(eps >= 0, xs, -xs).flatten(0, 1)


def sign_mul_backward(dy, x, key, noise_id, shared, needs):
    # the map is its own transpose; shared: summed over samples
    eps = _example_noise(x, key, noise_id, shared)
    dys = dy.unflatten(0, (key.num_samples, -1))
    return (_sum_if_shared(torch.where(eps >= 0, dys, -dys), shared),)


def normal_forward(like: Tensor, key: NoiseKey, pid: int, *shape: int) -> Tensor:
    """fp32 normals ``(S, *shape)`` of parameter ``pid``, on ``like``'s device."""
    return generator.normal(key, pid, tuple(shape), like.device)
