"""The ``sampled_conv`` primitive on the GPU (Triton sampling + cuDNN).

``y[s] = conv(x[s], W_s)`` with ``W_s = mu + softplus(rho) * eps_s`` (``mu=None``: zero
mean) for 1-3 spatial dims and any stride, padding, dilation and groups; x is folded
``(S*B, C, *spatial)`` sample-major, or one ``(B, C, *spatial)`` batch shared by every
sample (the first layer).

No convolution kernel is written here: per chunk of samples (at most ``SPAR_CHUNK_NUMEL``
weight elements, at least one sample, never ``S * |W|``) the sampling kernel
(:mod:`spar.ops.backends.triton.sample`) writes the chunk's weights into a workspace, and
torch's convolution (cuDNN) runs the chunk as one grouped convolution. The backward
regenerates the chunk's weights for ``dx`` (``aten.convolution_backward``) and reduces the
chunk's weight gradient into ``grad_mu`` and ``grad_rho`` with the sampling kernel's
backward, which regenerates eps in the same pass (deterministic, no atomics). The chunk
loop is the torch backend's (:mod:`spar.ops.backends.torch.sampled`) with the Triton
sampler, so the two backends share the grouping and layout code and differ only in where
the noise comes from.
"""

from __future__ import annotations

from spar.ops.backends.torch import sampled
from spar.ops.backends.triton._utils import check_sampled
from spar.ops.backends.triton.sample import TritonSampler

# forward x ``(S*B, C, *sp)`` or shared ``(B, C, *sp)`` -> ``(S*B, O, *sp_out)``, contiguous
# (geometry: stride, padding, dilation, ``nd`` ints each); backward -> (dx, grad_mu, grad_rho)
sampled_conv_forward, sampled_conv_backward = sampled.sampler_primitives(
    TritonSampler, check_sampled
)["sampled_conv"]
