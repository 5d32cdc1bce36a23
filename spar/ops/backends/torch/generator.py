"""Where the torch backend's noise comes from, and the *samplers* of the sampled primitives.

The torch backend runs its math in torch ops on any device; only its noise generator
depends on the device type (:func:`generator_for`):

* ``rng`` (CPU and every other non-CUDA device): :mod:`spar.rng`, the native C generator
  on CPU (eager torch elsewhere).
* ``triton`` (CUDA, when triton imports): the Triton kernels of
  :mod:`spar.ops.backends.triton` (same Philox integers as :mod:`spar.rng`, normals within
  a few ulp). :mod:`spar.rng`'s GPU path is an eager loop of about a hundred int64
  elementwise passes per four normals: that would make the torch backend's noise cost
  more than its GEMMs. Without triton the eager loop is used, with one warning;
  ``SPAR_RNG=eager`` chooses it on purpose (a machine where Triton imports but cannot
  compile or launch kernels: then ``SPAR_BACKEND=torch SPAR_RNG=eager`` runs no Triton).

A *sampler* holds one call's ``(key, param_id, mu, rho)`` and gives the chunk loops of
:mod:`spar.ops.backends.torch.sampled` (shared with the Triton backend's convolution) the
two things that involve noise:

``weights(lo, hi, dtype)``
    ``mu + softplus(rho) * eps_s`` for local samples ``[lo, hi)``, ``(hi - lo, *rho.shape)``
    in ``dtype``; valid until the next call (it may live in a reused workspace).
``add_grads(g_w, lo, hi)``
    add a chunk's per-sample weight gradients ``g_w (hi - lo, *rho.shape)`` into
    ``grad_mu = sum_s g_w[s]`` and ``grad_rho = sigmoid(rho) * sum_s g_w[s] * eps_s``,
    with eps regenerated. Chunks arrive in order, the last one ending at ``num_samples``.
``grads()``
    ``(grad_mu, grad_rho)`` in rho's dtype (None where not asked for).

:class:`RngSampler` is the :mod:`spar.rng` one; the Triton one is
:class:`spar.ops.backends.triton.sample.TritonSampler`. This module imports no triton
until a CUDA tensor asks for it (``spar.rng`` never imports ``spar.ops``: the choice
lives here, in the ops layer).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from spar import _env
from spar.ops import dispatch
from spar.rng import NoiseKey

# device types whose torch-backend noise comes from the Triton kernels (tests add "cpu"
# to run that path under the interpreter)
TRITON_DEVICE_TYPES = ("cuda",)

_warned = False


def generator_for(device_type: str) -> str:
    """``"triton"`` or ``"rng"``: which generator draws the torch backend's noise for
    tensors on ``device_type`` (see the module doc). Where Triton should serve but triton
    does not import, one ``RuntimeWarning`` says what it costs and how to fix it."""
    if device_type not in TRITON_DEVICE_TYPES or _env.rng() == "eager":
        return "rng"
    error = dispatch.load_error("triton")
    if error is None:
        return "triton"
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"spar: the torch backend draws its noise on {device_type} tensors with the eager "
            "int64 Philox of spar.rng (about 100 elementwise passes per four normals, often "
            "slower than the layer's own GEMM) because the Triton generator does not load "
            f"({error}); install triton (`pip install triton`) so that spar's Triton kernels "
            "draw it",
            RuntimeWarning,
            stacklevel=3,
        )
    return "rng"


def sampler_for(device: torch.device) -> type:
    """The sampler class of the torch backend for tensors on ``device``."""
    if generator_for(device.type) == "triton":
        from spar.ops.backends.triton.sample import TritonSampler

        return TritonSampler
    return RngSampler


def normal(key: NoiseKey, pid: int, shape: tuple[int, ...], device: torch.device, *,
           first_row: int = 0) -> Tensor:  # fmt: skip
    """fp32 keyed normals ``(S, *shape)`` of ``pid`` (rows shifted by ``first_row``, the
    per-example noise) from the generator of ``device``."""
    if generator_for(device.type) == "triton":
        from spar.ops.backends.triton.noise import keyed_normal

        return keyed_normal(key, pid, shape, device, first_row=first_row)
    return key.normal(pid, shape, first_row=first_row, device=device)


class RngSampler:
    """The sampler whose noise comes from :mod:`spar.rng` (see the module doc)."""

    def __init__(self, key: NoiseKey, pid: int, mu: Tensor | None, rho: Tensor, need_mu: bool,
                 need_rho: bool) -> None:  # fmt: skip
        self.key, self.pid, self.mu, self.rho = key, pid, mu, rho
        self._sig: Tensor | None = None
        self.g_mu = rho.new_zeros(rho.shape) if need_mu and mu is not None else None
        self.g_eps = rho.new_zeros(rho.shape) if need_rho else None

    def weights(self, lo: int, hi: int, dtype: torch.dtype) -> Tensor:
        if self._sig is None:
            self._sig = F.softplus(self.rho)
        # formed in the generator's loop: eps never reaches memory on CPU
        return self.key.sample(self.pid, self.mu, self._sig, samples=(lo, hi), dtype=dtype)

    def add_grads(self, g_w: Tensor, lo: int, hi: int) -> None:
        g_w = g_w.to(self.rho.dtype)
        if self.g_mu is not None:
            self.g_mu += g_w.sum(0)
        if self.g_eps is not None:
            self.key.eps_dot(self.pid, g_w, self.g_eps, samples=(lo, hi))

    def grads(self) -> tuple[Tensor | None, Tensor | None]:
        # d softplus(rho) / d rho = sigmoid(rho)
        g_rho = None if self.g_eps is None else self.g_eps.mul_(torch.sigmoid(self.rho))
        return self.g_mu, g_rho
