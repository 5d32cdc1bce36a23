"""Philox4x32-10 counter streams: the noise key of every Bayesian parameter (invariant I1).

The counter layout
------------------
Every random normal spar draws is a pure function of five things::

    eps[seed, step, param_id, sample, row, col]

where a parameter (or a per-example noise tensor) is viewed as a 2-D array
``(rows, cols) = (shape[0], numel // shape[0])`` (a vector is one row). Element
``(row, col)`` of global Monte Carlo sample ``sample`` takes lane ``col % 4`` of one
Philox4x32-10 call with

    key     = (k0, k1)       = (seed, param_id)
    counter = (c0, c1, c2, c3) = (col // 4, row, sample, step)

and the four 32-bit outputs ``(i0, i1, i2, i3)`` become four normals by Triton's
conversion: ``u = uint_to_uniform_float(i)`` then Box-Muller on the pairs
``(u0, u1) -> (n0, n1)`` and ``(u2, u3) -> (n2, n3)`` (``tl.randn4x``). Calling
``tl.philox(seed | param_id << 32, col // 4, row, sample, step)`` in a Triton kernel gives
the same integers bit for bit, which is how the fused kernels regenerate noise for any
tile without storing it.

``seed`` is a 32-bit integer, ``param_id`` a 31-bit hash of the parameter's qualified
name (:func:`param_id`), ``step`` and ``sample`` are 32-bit counters. Nothing in the
layout depends on tile sizes, chunking, backend, rank or grid shape: a rank evaluating
global samples ``[4, 8)`` draws exactly what one process evaluating ``[0, 8)`` draws
for them.

Implementation
--------------
Torch has no unsigned 32-bit arithmetic on all devices, so the generator runs on
``int64`` tensors holding values in ``[0, 2**32)``; the 32x32->64 products are split so
that no intermediate leaves ``int64``. Philox in plain elementwise torch ops is about a
hundred passes over memory per four normals, so large requests are produced in chunks
that stay in cache, and on CPU the whole generator can be fused into one loop with
``torch.compile`` (``SPAR_RNG_COMPILE=1``, the default when a C++ compiler is found).
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
import zlib
from dataclasses import dataclass

import torch

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10
MASK32 = 0xFFFFFFFF

# Triton's uint_to_uniform_float scale for 32-bit inputs, and its Box-Muller constants.
_UNIFORM_SCALE = 4.6566127342e-10
_TWO_PI = 6.283185307179586
_U_MIN = 1.0e-7

# counters per generator call when materializing big requests (64 K counters = 256 K
# normals: the ~20 int64 temporaries stay within a few MB of cache)
_CHUNK_COUNTERS = 1 << 16


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed <= MASK32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return seed


def param_id(qualified_name: str) -> int:
    """Stable 31-bit id of a parameter from its qualified name (CRC-32, top bit cleared so
    that ``seed | param_id << 32`` fits a signed 64-bit kernel argument)."""
    return zlib.crc32(qualified_name.encode("utf-8")) & 0x7FFFFFFF


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for ``a`` (int64 tensor in [0, 2**32)) and a 32-bit
    constant ``b``, without overflowing int64."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_lo = a * b_lo  # < 2**48
    p_hi = a * b_hi  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return hi, lo


def philox(
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
    k0: torch.Tensor | int,
    k1: torch.Tensor | int,
    n_rounds: int = N_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 on int64 tensors holding uint32 values (broadcasting), same rounds as
    Random123 and ``tl.philox``. Keys may be Python ints or 0-d int64 tensors."""
    for _ in range(n_rounds):
        hi0, lo0 = _mulhilo(c0, PHILOX_ROUND_A)
        hi2, lo2 = _mulhilo(c2, PHILOX_ROUND_B)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for 32-bit values: float32 in [0, 1)."""
    x = torch.where(x >= 1 << 31, MASK32 - x, x)  # bitcast to int32, then ~x for x < 0
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u1 = torch.clamp_min(u1, _U_MIN)
    th = u2 * torch.tensor(_TWO_PI, dtype=torch.float32)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def _normals4(c0, c1, c2, c3, k0, k1) -> torch.Tensor:
    """(..., 4) float32 normals of the given counters, lanes in order n0..n3."""
    i0, i1, i2, i3 = philox(c0, c1, c2, c3, k0, k1)
    n0, n1 = box_muller(uint_to_uniform(i0), uint_to_uniform(i1))
    n2, n3 = box_muller(uint_to_uniform(i2), uint_to_uniform(i3))
    return torch.stack((n0, n1, n2, n3), dim=-1)


def _block(ns: int, nr: int, ng: int, s0, r0, g0, step, k0, k1) -> torch.Tensor:
    """Normals ``(ns, nr, 4 * ng)`` of the counter block samples ``s0 + [0, ns)`` x rows
    ``r0 + [0, nr)`` x column groups ``g0 + [0, ng)``. Offsets and keys are 0-d int64
    tensors, so one compiled loop serves every key and step."""
    dev = k0.device
    c0 = (torch.arange(ng, dtype=torch.int64, device=dev) + g0).view(1, 1, ng)
    c1 = (torch.arange(nr, dtype=torch.int64, device=dev) + r0).view(1, nr, 1)
    c2 = (torch.arange(ns, dtype=torch.int64, device=dev) + s0).view(ns, 1, 1)
    c0, c1, c2 = torch.broadcast_tensors(c0, c1, c2)
    return _normals4(c0, c1, c2, torch.zeros_like(c0) + step, k0, k1).view(ns, nr, 4 * ng)


def _block_normal(ns, nr, ng, ncols, s0, r0, g0, step, k0, k1):
    return _block(ns, nr, ng, s0, r0, g0, step, k0, k1)[..., :ncols]


def _block_sample(ns, nr, ng, ncols, s0, r0, g0, step, k0, k1, mu, sig):
    # W = mu + sigma * eps, formed in the generator's loop: eps never reaches memory
    return mu + sig * _block(ns, nr, ng, s0, r0, g0, step, k0, k1)[..., :ncols]


_KERNELS = {"normal": _block_normal, "sample": _block_sample}


def _compiler_available() -> bool:
    return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("cc") is not None


@functools.cache
def _compiled(kind: str):
    # dynamic=True: sizes are symbolic, offsets and keys are tensors, so a handful of
    # compiled loops (sizes 1 and >1 specialize) serve every layer, key and step
    return torch.compile(_KERNELS[kind], dynamic=True, fullgraph=True)


_compile_failed: set[str] = set()
_RECOMPILE_LIMIT = 64


def _use_compile(device: torch.device) -> bool:
    flag = os.environ.get("SPAR_RNG_COMPILE", "auto").lower()
    if flag in ("0", "false", "off", "no"):
        return False
    if device.type != "cpu":
        return False  # on GPU the kernels generate their own noise; eager torch is the fallback
    if flag in ("1", "true", "on", "yes"):
        return True
    return _compiler_available()


def _call(kind: str, compiled: bool, *args):
    if compiled and kind not in _compile_failed:
        try:
            # sizes 1 vs >1, column remainders and dtypes each specialize: allow enough
            # variants for a whole model without touching the global limit
            with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                return _compiled(kind)(*args)
        except Exception as e:  # noqa: BLE001 - e.g. recompile limit, no working compiler
            _compile_failed.add(kind)
            warnings.warn(
                f"spar.rng: torch.compile of the {kind!r} noise loop failed ({type(e).__name__}); "
                "using the slower eager generator",
                RuntimeWarning,
                stacklevel=3,
            )
    return _KERNELS[kind](*args)


def _as_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    numel = 1
    for d in shape:
        numel *= d
    rows = shape[0] if len(shape) > 1 else 1
    return rows, (numel // rows if rows else 0)


def _run(kind, seed, step, pid, first_sample, num_samples, rows, cols, first_row, device, out,
         *operands):  # fmt: skip
    """Fill ``out`` (``(num_samples, rows, cols)``) block by block. Compiled, one block
    covers everything (the fused loop needs no temporaries); eager, blocks of
    ``_CHUNK_COUNTERS`` counters keep the ~20 int64 temporaries in cache."""
    compiled = _use_compile(device)
    ngroups = (cols + 3) // 4
    t = functools.partial(torch.tensor, dtype=torch.int64, device=device)
    k0, k1, step_t = t(seed), t(pid), t(step & MASK32)
    budget = 1 << 62 if compiled else _CHUNK_COUNTERS
    g_step = min(ngroups, budget)
    r_step = max(1, budget // g_step)
    s_step = max(1, budget // (g_step * rows))
    with torch.no_grad():
        for s0 in range(0, num_samples, s_step):
            s1 = min(num_samples, s0 + s_step)
            for r0 in range(0, rows, r_step):
                r1 = min(rows, r0 + r_step)
                for g0 in range(0, ngroups, g_step):
                    g1 = min(ngroups, g0 + g_step)
                    c0, c1 = 4 * g0, min(cols, 4 * g1)
                    extra = tuple(o[r0:r1, c0:c1] for o in operands)
                    block = _call(
                        kind, compiled, s1 - s0, r1 - r0, g1 - g0, c1 - c0,
                        t(first_sample + s0), t(first_row + r0), t(g0), step_t, k0, k1, *extra,
                    )  # fmt: skip
                    out[s0:s1, r0:r1, c0:c1] = block
    return out


def normal(
    seed: int,
    step: int,
    pid: int,
    first_sample: int,
    num_samples: int,
    shape: tuple[int, ...] | torch.Size,
    *,
    first_row: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Noise of global samples ``[first_sample, first_sample + num_samples)`` for a tensor
    of ``shape``: returns float32 ``(num_samples, *shape)``.

    ``first_row`` shifts the row counter: the rows of ``shape`` are rows
    ``[first_row, first_row + shape[0])`` of the keyed 2-D array (used for per-example noise
    keyed by the global example index).
    """
    shape = tuple(int(d) for d in shape)
    device = torch.device("cpu") if device is None else torch.device(device)
    rows, cols = _as_2d(shape)
    out = torch.empty((num_samples, rows, cols), dtype=torch.float32, device=device)
    if out.numel():
        _run("normal", seed, step, pid, first_sample, num_samples, rows, cols, first_row,
             device, out)  # fmt: skip
    return out.view(num_samples, *shape)


def sample(
    seed: int,
    step: int,
    pid: int,
    first_sample: int,
    num_samples: int,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sampled weights ``W_s = mu + sigma * eps_s``: ``(num_samples, *mu.shape)`` in
    ``dtype`` (default ``mu.dtype``), with the noise of :func:`normal` formed in the same
    loop that consumes it (on CPU with ``torch.compile``: eps is never materialized)."""
    shape = tuple(mu.shape)
    rows, cols = _as_2d(shape)
    out = torch.empty((num_samples, rows, cols), dtype=dtype or mu.dtype, device=mu.device)
    if out.numel():
        mu2, sig2 = mu.detach().reshape(rows, cols), sigma.detach().reshape(rows, cols)
        _run("sample", seed, step, pid, first_sample, num_samples, rows, cols, 0, mu.device,
             out, mu2, sig2)  # fmt: skip
    return out.view(num_samples, *shape)


def philox_uint32(seed: int, pid: int, c0: torch.Tensor, c1: int, c2: int, c3: int) -> torch.Tensor:
    """The raw Philox integers ``(n, 4)`` for counters ``(c0[i], c1, c2, c3)`` under key
    ``(seed, pid)``: what tests compare bit for bit with ``tl.philox``."""
    c0 = c0.to(torch.int64)
    full = lambda v: torch.full_like(c0, v)  # noqa: E731
    out = philox(c0, full(c1), full(c2), full(c3), seed, pid)
    return torch.stack(out, dim=-1)


@dataclass(frozen=True)
class NoiseKey:
    """Which noise a Bayesian op draws: Monte Carlo samples
    ``[first_sample, first_sample + num_samples)`` of training step ``step``.

    ``data_offset`` is the global index of the first example of the local batch; estimators
    with per-example noise key their rows by it. Parameter ids are passed per call.
    """

    seed: int
    step: int
    first_sample: int
    num_samples: int
    data_offset: int = 0

    def normal(
        self,
        pid: int,
        shape: tuple[int, ...] | torch.Size,
        *,
        samples: tuple[int, int] | None = None,
        first_row: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Noise ``(n, *shape)`` for local samples ``[lo, hi)`` (default: all of them),
        generated in float32 and returned in ``dtype``."""
        lo, hi = (0, self.num_samples) if samples is None else samples
        return normal(
            self.seed,
            self.step,
            pid,
            self.first_sample + lo,
            hi - lo,
            shape,
            first_row=first_row,
            device=device,
        ).to(dtype)

    def sample(
        self,
        pid: int,
        mu: torch.Tensor,
        sigma: torch.Tensor,
        *,
        samples: tuple[int, int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Weights ``mu + sigma * eps_s`` ``(n, *mu.shape)`` for local samples ``[lo, hi)``."""
        lo, hi = (0, self.num_samples) if samples is None else samples
        return sample(
            self.seed, self.step, pid, self.first_sample + lo, hi - lo, mu, sigma, dtype=dtype
        )
