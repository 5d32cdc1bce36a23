"""Weight sampling on the cuda backend, and the sampled primitives built on it.

``W_s = mu + softplus(rho) * eps_s`` for a range of global samples is written by
``spar_sample_*`` (``csrc/spar_cuda.cu``), and ``grad_mu = sum_s g_s``,
``grad_rho = sigmoid(rho) * sum_s g_s * eps_s`` are reduced by ``spar_sample_bwd_*`` with
eps regenerated (each thread owns 4 weights and walks the samples in order: deterministic,
no atomics). :class:`CudaSampler` plugs them into the chunk loops of the torch backend
(:mod:`spar.ops.backends.torch.sampled`), which run the GEMMs and convolutions in torch
(cuBLAS, cuDNN): ``sampled_linear`` and ``sampled_conv`` on this backend are those loops
with this sampler, as the Triton backend's convolution is with Triton's.

The backend serves fp32 parameters (activations fp32, fp16 or bf16, the dtype the weights
are written in); other parameter dtypes run on the torch backend (:mod:`spar.ops.dispatch`).
A parameter of any shape is viewed as the 2-D array ``(rows, cols) = (shape[0], numel //
shape[0])`` of the noise key (a vector is one row), see :mod:`spar.rng`.

Order in this file: launchers -> the sampler -> the primitives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from spar.ops.backends.cuda import kernels
from spar.ops.backends.torch import sampled
from spar.rng import NoiseKey

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the parameter dtypes of the sampled primitives (their activations: FLOAT_DTYPES)
PARAM_DTYPES = (torch.float32,)
SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
# threads per SM the sampling grid aims at (a full SM holds 2048): with fewer groups x
# samples than 4 waves of that, each thread writes fewer samples (more parallelism);
# with more, it writes more of them per read of mu and sigma
_THREADS_PER_SM = 4 * 2048
_MAX_GRID_Y = 65535
# flags of spar_sample_bwd_* (spar_cuda.cuh)
_HAS_MU, _ACCUMULATE, _SIGMOID = 1, 2, 4


# ---------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------


def check_tensors(*tensors: Tensor | None, dtypes=FLOAT_DTYPES, what: str = "tensors") -> None:
    """CUDA tensors (or CPU ones with the test runner, see :mod:`.kernels`) of ``dtypes``
    (None: any dtype)."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda" and kernels.host_runner is None:
            raise RuntimeError(
                f"the cuda backend needs CUDA tensors (got a tensor on {t.device}); use "
                "SPAR_BACKEND=torch or auto for other devices"
            )
        if dtypes is not None and t.dtype not in dtypes:
            names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
            raise TypeError(f"the cuda backend takes {names} {what}, got {t.dtype}")


def _sample_range(key: NoiseKey, samples: tuple[int, int] | None) -> tuple[int, int]:
    lo, hi = (0, key.num_samples) if samples is None else samples
    if not 0 <= lo <= hi <= key.num_samples:
        raise ValueError(f"samples must satisfy 0 <= lo <= hi <= {key.num_samples}, got {samples}")
    return lo, hi


def samples_per_thread(ns: int, threads: int, device: torch.device) -> int:
    """How many samples one thread of the sampling kernel writes: as few as keep about four
    full waves of threads in flight (at least 1, at most ``ns``), and enough that the grid's
    y extent ``ceil(ns / spt)`` stays within CUDA's limit of 65535."""
    target = kernels.num_sms(device) * _THREADS_PER_SM
    spt = max(1, min(ns, -(-(threads * ns) // target)))
    return max(spt, -(-ns // _MAX_GRID_Y))


def sample_weights(mu: Tensor | None, sigma: Tensor | None, key: NoiseKey, pid: int,
                   samples: tuple[int, int] | None = None, *, shape: tuple[int, int] | None = None,
                   dtype: torch.dtype = torch.float32, out: Tensor | None = None,
                   first_row: int = 0, device: torch.device | None = None) -> Tensor:  # fmt: skip
    """Weights of local samples ``[lo, hi)`` (default: all of ``key``): ``mu``, ``sigma``
    fp32 ``(R, C)`` -> ``(hi - lo, R, C)`` in ``dtype``, into ``out`` when given (a
    contiguous workspace). ``mu=None``: zero mean; ``sigma=None``: the normals themselves
    (then ``shape`` gives ``(R, C)`` and ``device`` the device). ``first_row`` shifts the
    key's row counter (per-example noise: the global index of the first example)."""
    lo, hi = _sample_range(key, samples)
    like = sigma if sigma is not None else mu
    if like is None:
        if shape is None or device is None:
            raise ValueError("without mu and sigma, shape and device are needed")
        R, C = shape
    else:
        if like.dim() != 2:
            raise ValueError(f"mu/sigma must be 2-D (rows, cols), got shape {tuple(like.shape)}")
        R, C = like.shape
        device = like.device
        for t in (mu, sigma):
            if t is not None and (t.shape != (R, C) or not t.is_contiguous()):
                raise ValueError(f"mu and sigma must be contiguous {(R, C)}, got {tuple(t.shape)}")
        check_tensors(mu, sigma, dtypes=(torch.float32,), what="parameters")
    c = hi - lo
    if out is None:
        out = torch.empty((c, R, C), dtype=dtype, device=device)
    elif out.shape != (c, R, C) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} {(c, R, C)}, got {out.dtype} "
                         f"{tuple(out.shape)}")  # fmt: skip
    check_tensors(out)
    if c == 0 or R * C == 0:
        return out
    threads = kernels.groups(R, C)
    spt = samples_per_thread(c, threads, device)
    grid = (kernels.blocks(threads), -(-c // spt))
    kernels.launch(
        f"spar_sample_{SUFFIX[dtype]}", device, grid,
        (out, mu, sigma, R, C, c, spt, key.seed, pid, key.step, key.first_sample + lo, first_row),
    )  # fmt: skip
    return out


def sample_weights_backward(
    grad_w: Tensor,
    key: NoiseKey,
    pid: int,
    samples: tuple[int, int] | None = None,
    *,
    grad_mu: Tensor | None = None,
    grad_eps: Tensor | None = None,
    need_mu: bool = True,
    rho: Tensor | None = None,
) -> tuple[Tensor | None, Tensor]:
    """Reduce per-sample weight gradients ``grad_w (c, R, C)`` (fp32/fp16/bf16) of local
    samples ``[lo, hi)``: returns ``(sum_s grad_w[s], sum_s grad_w[s] * eps_s)`` as fp32
    ``(R, C)``. Given ``grad_mu``/``grad_eps`` buffers, the sums are added to them in place
    (chunks arrive in order, so the result stays deterministic). Given ``rho`` (on the last
    chunk only), the second result is finished into ``grad_rho = sigmoid(rho) * sum``."""
    lo, hi = _sample_range(key, samples)
    c, R, C = grad_w.shape
    if c != hi - lo:
        raise ValueError(f"grad_w has {c} samples, expected {hi - lo}")
    check_tensors(grad_w, what="gradients")
    check_tensors(rho, grad_mu, grad_eps, dtypes=(torch.float32,), what="parameters")
    accumulate = grad_eps is not None
    f32 = dict(dtype=torch.float32, device=grad_w.device)
    if grad_eps is None:
        grad_eps = torch.empty((R, C), **f32)
    if need_mu and grad_mu is None:
        if accumulate:
            raise ValueError("grad_mu must be given with grad_eps when accumulating")
        grad_mu = torch.empty((R, C), **f32)
    for t in (grad_mu, grad_eps, rho):
        if t is not None and (t.shape != (R, C) or not t.is_contiguous()):
            raise ValueError(f"rho and the gradient buffers must be contiguous {(R, C)}, "
                             f"got {tuple(t.shape)}")  # fmt: skip
    if R * C == 0:
        return grad_mu, grad_eps
    flags = ((_HAS_MU if grad_mu is not None else 0) | (_ACCUMULATE if accumulate else 0)
             | (_SIGMOID if rho is not None else 0))  # fmt: skip
    kernels.launch(
        f"spar_sample_bwd_{SUFFIX[grad_w.dtype]}", grad_w.device,
        (kernels.blocks(kernels.groups(R, C)), 1),
        (grad_w.contiguous(), rho, grad_mu, grad_eps, R, C, c, key.seed, pid, key.step,
         key.first_sample + lo, flags),
    )  # fmt: skip
    return grad_mu, grad_eps


def keyed_normal(key: NoiseKey, pid: int, shape: tuple[int, ...], device: torch.device, *,
                 first_row: int = 0, samples: tuple[int, int] | None = None) -> Tensor:  # fmt: skip
    """fp32 normals ``(hi - lo, *shape)`` of ``pid`` for local samples ``[lo, hi)``
    (default: all of ``key``), rows shifted by ``first_row``: what ``key.normal(pid, shape,
    first_row=first_row)`` of :mod:`spar.rng` returns (a vector is one row of the key's
    2-D view)."""
    shape = tuple(int(d) for d in shape)
    rows = shape[0] if len(shape) > 1 else 1
    numel = 1
    for d in shape:
        numel *= d
    eps = sample_weights(None, None, key, pid, samples, shape=(rows, numel // max(rows, 1)),
                         first_row=first_row, device=device)  # fmt: skip
    return eps.view(eps.shape[0], *shape)


def philox(ctr: Tensor, key: Tensor) -> Tensor:
    """Raw Philox4x32-10 integers of the GPU generator: counters ``ctr (n, 4)`` and keys
    ``key (n, 2)`` (int64 holding uint32 values) -> ``(n, 4)`` int64 in ``[0, 2**32)``, on
    ``ctr``'s device: what the tests compare bit for bit with :func:`spar.rng.philox`."""
    n = ctr.shape[0]
    if ctr.shape != (n, 4) or key.shape != (n, 2):
        raise ValueError(f"ctr must be (n, 4) and key (n, 2), got {tuple(ctr.shape)}, "
                         f"{tuple(key.shape)}")  # fmt: skip

    def as_u32(t: Tensor) -> Tensor:  # int32 with the same bits
        t = t.to(device=ctr.device, dtype=torch.int64) & 0xFFFFFFFF
        return torch.where(t >= 2**31, t - 2**32, t).to(torch.int32).contiguous()

    c, k = as_u32(ctr), as_u32(key)
    out = torch.empty((n, 4), dtype=torch.int32, device=ctr.device)
    check_tensors(c, dtypes=(torch.int32,), what="counters")
    kernels.launch("spar_philox", ctr.device, (kernels.blocks(n), 1), (c, k, out, n))
    return out.to(torch.int64) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------
# the sampler of the chunk loops (spar.ops.backends.torch.generator documents the API)
# ---------------------------------------------------------------------------------------


class CudaSampler:
    """Weights and parameter gradients of one sampled-op call from the CUDA kernels: a
    chunk of weights is written into a workspace reused from chunk to chunk, and each
    chunk's weight gradients are reduced into ``grad_mu`` and ``grad_rho`` with eps
    regenerated in the same pass (``sigmoid(rho)`` applied on the last chunk). fp32
    parameters only (what the backend serves)."""

    def __init__(self, key: NoiseKey, pid: int, mu: Tensor | None, rho: Tensor, need_mu: bool,
                 need_rho: bool) -> None:  # fmt: skip
        self.key, self.pid, self.shape = key, pid, tuple(rho.shape)
        rows = rho.shape[0] if rho.dim() > 1 else 1
        self.rc = (rows, rho.numel() // max(rows, 1))  # the key's 2-D view
        self.rho = rho.reshape(self.rc).contiguous()
        self.mu = None if mu is None else mu.reshape(self.rc).contiguous()
        self.need_mu, self.need_rho = need_mu and mu is not None, need_rho
        self._sig: Tensor | None = None
        self._work: Tensor | None = None
        self.g_mu: Tensor | None = None
        self.g_eps: Tensor | None = None

    def weights(self, lo: int, hi: int, dtype: torch.dtype) -> Tensor:
        c = hi - lo
        if self._sig is None:
            self._sig = F.softplus(self.rho)
        work = self._work
        if work is None or work.dtype != dtype or work.shape[0] < c:
            # the first chunk is the largest: one allocation per call
            work = self._work = torch.empty((c, *self.rc), dtype=dtype, device=self.rho.device)
        w = sample_weights(self.mu, self._sig, self.key, self.pid, (lo, hi), dtype=dtype,
                           out=work[:c])  # fmt: skip
        return w.view(c, *self.shape)

    def add_grads(self, g_w: Tensor, lo: int, hi: int) -> None:
        last = hi == self.key.num_samples
        self.g_mu, self.g_eps = sample_weights_backward(
            g_w.reshape(hi - lo, *self.rc), self.key, self.pid, (lo, hi), grad_mu=self.g_mu,
            grad_eps=self.g_eps, need_mu=self.need_mu,
            rho=self.rho if last and self.need_rho else None,
        )  # fmt: skip

    def grads(self) -> tuple[Tensor | None, Tensor | None]:
        g_mu = self.g_mu.view(self.shape) if self.need_mu and self.g_mu is not None else None
        g_rho = self.g_eps.view(self.shape) if self.need_rho and self.g_eps is not None else None
        return g_mu, g_rho


# ---------------------------------------------------------------------------------------
# the primitives
# ---------------------------------------------------------------------------------------


def _check_sampled(x: Tensor, mu: Tensor | None, rho: Tensor) -> None:
    check_tensors(x, what="input")
    check_tensors(mu, rho, dtypes=PARAM_DTYPES, what="parameters")


# the chunk loops of the torch backend with this sampler (cuBLAS GEMMs and cuDNN
# convolutions per chunk), after the checks above
_PRIMITIVES = sampled.sampler_primitives(CudaSampler, _check_sampled)
sampled_linear_forward, sampled_linear_backward = _PRIMITIVES["sampled_linear"]
sampled_conv_forward, sampled_conv_backward = _PRIMITIVES["sampled_conv"]


def normal_forward(like: Tensor, key: NoiseKey, pid: int, *shape: int) -> Tensor:
    """fp32 normals ``(S, *shape)`` of parameter ``pid`` on ``like``'s device."""
    check_tensors(like, dtypes=None)
    return keyed_normal(key, pid, shape, like.device)
