"""Per-example noise primitives on the cuda backend: ``lrt_noise`` and ``sign_mul``.

Keyed as on every backend (:mod:`spar.ops.backends.torch.noise`): element ``(b, j)`` of
local sample ``s`` of the noise ``noise_id`` is element ``(row = data_offset + b, col =
j)`` of global sample ``first_sample + s``, ``j`` indexing the example's flattened
features. Tensors are folded sample-major ``(S*B, ...)``; a shared ``(B, ...)`` input is
read with a zero sample stride instead of being expanded, and its gradient is the fp32 sum
over samples. The kernels (``spar_lrt_noise_*``, ``spar_sign_mul_*`` in
``csrc/spar_cuda.cu``) regenerate the noise in backward instead of storing it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spar.ops.backends.cuda import kernels
from spar.ops.backends.cuda.sample import SUFFIX, check_tensors
from spar.rng import NoiseKey


def _launch(name: str, t: Tensor, out_dtype: torch.dtype, key: NoiseKey, noise_id: int,
            shared: int, dy: Tensor | None = None) -> Tensor:  # fmt: skip
    """Run a per-example noise kernel over ``t`` (any shape, rows first; ``dy``: lrt's
    backward) into a new folded ``(S*B, ...)`` tensor of ``out_dtype``."""
    check_tensors(t, dy)
    S = key.num_samples
    t2 = t.reshape(t.shape[0], -1).contiguous()
    B, C = t2.shape[0] if shared else t2.shape[0] // S, t2.shape[1]
    out = torch.empty((S * B, C), dtype=out_dtype, device=t.device)
    R = S * B
    if out.numel():
        if name.startswith("spar_sign_mul"):
            inputs = (t2,)
        else:  # lrt: var, then dy in var's dtype (NULL: the forward)
            inputs = (t2, None if dy is None else dy.reshape(R, C).to(t.dtype).contiguous())
        kernels.launch(
            name, t.device, (kernels.blocks(kernels.groups(R, C)), 1),
            (*inputs, out, R, C, B, 0 if shared else B * C, key.seed, noise_id, key.step,
             key.first_sample, key.data_offset),
        )  # fmt: skip
    return out.view(S * B, *t.shape[1:])


def _sum_if_shared(g: Tensor, S: int, shared: int, dtype: torch.dtype) -> Tensor:
    return g.unflatten(0, (S, -1)).sum(0, dtype=torch.float32).to(dtype) if shared else g


def lrt_noise_forward(var: Tensor, key: NoiseKey, noise_id: int, shared: int) -> Tensor:
    """``sqrt(max(var, VAR_FLOOR)) * eps``: var ``(S*B, ...)`` or shared ``(B, ...)`` ->
    ``(S*B, ...)`` in var's dtype."""
    return _launch(f"spar_lrt_noise_{SUFFIX[var.dtype]}", var, var.dtype, key, noise_id, shared)


def lrt_noise_backward(dy, var, key, noise_id, shared, needs):
    # shared: fp32 per-sample terms, summed over samples below
    dt = torch.float32 if shared else var.dtype
    suffix = SUFFIX[var.dtype] + ("_f32" if dt != var.dtype else "")
    g = _launch(f"spar_lrt_noise_{suffix}", var, dt, key, noise_id, shared, dy)
    return (_sum_if_shared(g, key.num_samples, shared, var.dtype),)


def sign_mul_forward(x: Tensor, key: NoiseKey, noise_id: int, shared: int) -> Tensor:
    """``x * sign(eps)`` (``+1`` where ``eps >= 0``): x ``(S*B, ...)`` or shared ``(B, ...)``
    -> ``(S*B, ...)``."""
    return _launch(f"spar_sign_mul_{SUFFIX[x.dtype]}", x, x.dtype, key, noise_id, shared)


def sign_mul_backward(dy, x, key, noise_id, shared, needs):
    # the map is its own transpose: the kernel on dy (folded), summed over samples if shared
    g = _launch(f"spar_sign_mul_{SUFFIX[dy.dtype]}", dy, dy.dtype, key, noise_id, 0)
    return (_sum_if_shared(g, key.num_samples, shared, x.dtype),)
