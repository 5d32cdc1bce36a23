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
On CPU the generator is a small C library (``csrc/philox.h``, ``csrc/spar_cpu.c``, built at
first use and cached, see :mod:`spar._native`): the Philox loop is vectorised, the normals
are consumed in the loop that draws them (``sample`` writes ``mu + sigma * eps``,
``eps_dot`` accumulates ``sum_s g_s * eps_s``: eps never reaches memory), and the work is
spread over ``torch.get_num_threads()`` threads. Its integers are bit-exact with
:func:`philox`; its normals use portable float32 ``log``/``sincos`` polynomials and differ
from the torch ones by a few ulp (at most ~1e-6 absolute).

Elsewhere (GPU tensors, ``SPAR_RNG=eager``, or where no C compiler works: one
``RuntimeWarning``), the generator runs on torch ``int64`` tensors holding values in
``[0, 2**32)`` (torch has no unsigned 32-bit arithmetic on all devices); the 32x32->64
products are split so that no intermediate leaves ``int64``. That is about a hundred
elementwise passes per four normals, so requests are produced in blocks of
``_CHUNK_COUNTERS`` counters whose temporaries stay in cache. This eager generator is also
the reference the native one is tested against.

``SPAR_RNG`` selects the CPU generator: ``auto`` (native where it builds, else eager),
``native`` (native or an error) or ``eager``.
"""

from __future__ import annotations

import functools
import warnings
import zlib
from dataclasses import dataclass

import torch

from spar import _env, _native

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10
MASK32 = 0xFFFFFFFF
# param ids are 31 bits: ``seed | param_id << 32`` fits a signed 64-bit kernel argument
PARAM_ID_MASK = 0x7FFFFFFF

# Triton's uint_to_uniform_float scale for 32-bit inputs, and its Box-Muller constants.
_UNIFORM_SCALE = 4.6566127342e-10
_TWO_PI = 6.283185307179586
_U_MIN = 1.0e-7

# counters per generator call when materializing big requests (64 K counters = 256 K
# normals: the ~20 int64 temporaries stay within a few MB of cache)
_CHUNK_COUNTERS = 1 << 16

# elements per native noise block where torch does the arithmetic (float64 parameters)
_NATIVE_CHUNK = 1 << 20

_CPU = torch.device("cpu")


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed <= MASK32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return seed


def param_id(qualified_name: str) -> int:
    """Stable 31-bit id of a parameter from its qualified name (CRC-32, top bit cleared so
    that ``seed | param_id << 32`` fits a signed 64-bit kernel argument)."""
    return zlib.crc32(qualified_name.encode("utf-8")) & PARAM_ID_MASK


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


def _block(ns: int, nr: int, ng: int, s0: int, r0: int, g0: int, step: int, k0: int, k1: int,
           device: torch.device) -> torch.Tensor:  # fmt: skip
    """Normals ``(ns, nr, 4 * ng)`` of the counter block samples ``s0 + [0, ns)`` x rows
    ``r0 + [0, nr)`` x column groups ``g0 + [0, ng)`` (eager torch)."""
    ar = functools.partial(torch.arange, dtype=torch.int64, device=device)
    c0 = (ar(ng) + g0).view(1, 1, ng)
    c1 = (ar(nr) + r0).view(1, nr, 1)
    c2 = (ar(ns) + s0).view(ns, 1, 1)
    c0, c1, c2 = torch.broadcast_tensors(c0, c1, c2)
    return _normals4(c0, c1, c2, torch.full_like(c0, step), k0, k1).view(ns, nr, 4 * ng)


_warned = False


def _native_lib(device: torch.device) -> _native.Library | None:
    """The native library where it serves this call: CPU tensors, ``SPAR_RNG`` not
    ``eager``, and the library built (decided once per process; ``auto`` warns once and
    falls back to the eager generator when it is not, ``native`` raises)."""
    if device.type != "cpu":
        return None  # on GPU the kernels generate their own noise; eager torch is the fallback
    mode = _env.rng()
    if mode == "eager":
        return None
    lib = _native.get()
    if lib is None:
        reason = _native.error()
        if mode == "native":
            raise RuntimeError(
                f"SPAR_RNG=native, but the native generator is unavailable: {reason}"
            )
        global _warned
        if not _warned:
            _warned = True
            warnings.warn(
                f"spar.rng: the native CPU noise generator is unavailable ({reason}); "
                "using the slower eager torch generator",
                RuntimeWarning,
                stacklevel=3,
            )
    return lib


def _check_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {dtype} tensor of shape {shape}, got "
            f"{'a non-contiguous ' if not out.is_contiguous() else ''}{out.dtype} "
            f"{tuple(out.shape)}"
        )


def _as_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    numel = 1
    for d in shape:
        numel *= d
    rows = shape[0] if len(shape) > 1 else 1
    return rows, (numel // rows if rows else 0)


def _run(lib, seed, step, pid, first_sample, num_samples, rows, cols, first_row, device,
         consume):  # fmt: skip
    """Call ``consume(s0, s1, r0, r1, c0, c1, eps)`` for float32 noise blocks covering
    ``(num_samples, rows, cols)``: from the native library (``lib``; whole sample planes,
    as many as fit in ``_NATIVE_CHUNK`` elements, at least one), else from the eager
    generator in blocks of ``_CHUNK_COUNTERS`` counters, so that its ~20 int64 temporaries
    stay in cache."""
    with torch.no_grad():
        if lib is not None:
            s_step = max(1, _NATIVE_CHUNK // (rows * cols))
            for s0 in range(0, num_samples, s_step):
                s1 = min(num_samples, s0 + s_step)
                eps = torch.empty((s1 - s0, rows, cols), dtype=torch.float32)
                lib.normal(eps.data_ptr(), seed & MASK32, pid & MASK32, step & MASK32,
                           (first_sample + s0) & MASK32, s1 - s0, first_row & MASK32, rows, cols,
                           torch.get_num_threads())  # fmt: skip
                consume(s0, s1, 0, rows, 0, cols, eps)
            return
        ngroups = (cols + 3) // 4
        step &= MASK32
        budget = _CHUNK_COUNTERS
        g_step = min(ngroups, budget)
        r_step = max(1, budget // g_step)
        s_step = max(1, budget // (g_step * rows))
        for s0 in range(0, num_samples, s_step):
            s1 = min(num_samples, s0 + s_step)
            for r0 in range(0, rows, r_step):
                r1 = min(rows, r0 + r_step)
                for g0 in range(0, ngroups, g_step):
                    g1 = min(ngroups, g0 + g_step)
                    c0, c1 = 4 * g0, min(cols, 4 * g1)
                    eps = _block(s1 - s0, r1 - r0, g1 - g0, first_sample + s0, first_row + r0,
                                 g0, step, seed, pid, device)  # fmt: skip
                    consume(s0, s1, r0, r1, c0, c1, eps[..., : c1 - c0])


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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Noise of global samples ``[first_sample, first_sample + num_samples)`` for a tensor
    of ``shape``: returns float32 ``(num_samples, *shape)`` (written into ``out`` when
    given: a contiguous float32 workspace of that shape, on ``device``).

    ``first_row`` shifts the row counter: the rows of ``shape`` are rows
    ``[first_row, first_row + shape[0])`` of the keyed 2-D array (used for per-example noise
    keyed by the global example index).
    """
    shape = tuple(int(d) for d in shape)
    rows, cols = _as_2d(shape)
    if out is None:
        device = _CPU if device is None else torch.device(device)
        out = torch.empty((num_samples, *shape), dtype=torch.float32, device=device)
    else:
        _check_out(out, (num_samples, *shape), torch.float32)
        device = out.device
    if num_samples and rows and cols:
        lib = _native_lib(device)
        if lib is not None:
            lib.normal(out.data_ptr(), seed & MASK32, pid & MASK32, step & MASK32,
                       first_sample & MASK32, num_samples, first_row & MASK32, rows, cols,
                       torch.get_num_threads())  # fmt: skip
        else:
            out3 = out.view(num_samples, rows, cols)

            def write(s0, s1, r0, r1, c0, c1, eps):
                out3[s0:s1, r0:r1, c0:c1] = eps

            _run(None, seed, step, pid, first_sample, num_samples, rows, cols, first_row,
                 device, write)  # fmt: skip
    return out


def sample(
    seed: int,
    step: int,
    pid: int,
    first_sample: int,
    num_samples: int,
    mu: torch.Tensor | None,
    sigma: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled weights ``W_s = mu + sigma * eps_s``: ``(num_samples, *mu.shape)`` in
    ``dtype`` (default ``mu.dtype``; written into ``out`` when given: a contiguous
    workspace of that shape, whose dtype then sets the result's), with the noise of
    :func:`normal` formed in the loop that consumes it (natively: eps never reaches
    memory). ``mu`` and ``sigma`` have the
    same number of elements (``mu=None``: zero mean, shape and dtype from ``sigma``);
    float32 parameters are combined in float32 and the result rounded to ``dtype``; other
    dtypes (float64 in gradcheck) are combined by torch, with the same noise."""
    like = sigma if mu is None else mu
    shape = tuple(like.shape)
    rows, cols = _as_2d(shape)
    if out is None:
        dtype = dtype or like.dtype
        out = torch.empty((num_samples, *shape), dtype=dtype, device=like.device)
    else:
        dtype = dtype or out.dtype
        _check_out(out, (num_samples, *shape), dtype)
    if not (num_samples and rows and cols):
        return out
    if sigma.numel() != rows * cols:
        raise ValueError(f"sigma has {sigma.numel()} elements, mu {rows * cols}")
    lib = _native_lib(sigma.device)
    f32 = torch.float32
    if (
        lib is not None
        and sigma.dtype == f32
        and (mu is None or (mu.dtype == f32 and mu.device == sigma.device))
    ):
        mu_c = None if mu is None else mu.contiguous()  # self when contiguous: no copy
        sig_c = sigma.contiguous()
        key = (seed & MASK32, pid & MASK32, step & MASK32, first_sample & MASK32)
        args = (None if mu_c is None else mu_c.data_ptr(), sig_c.data_ptr(), *key,
                num_samples, rows, cols, torch.get_num_threads())  # fmt: skip
        if dtype == torch.float32:
            lib.sample_f32(out.data_ptr(), *args)
        elif dtype == torch.float64:
            lib.sample_f64(out.data_ptr(), *args)
        else:  # e.g. bf16: fp32 in the loop, one rounding pass
            tmp = torch.empty(out.shape, dtype=torch.float32)
            lib.sample_f32(tmp.data_ptr(), *args)
            out.copy_(tmp)
    else:  # torch arithmetic (other dtypes, devices), noise from the process's generator
        sig2 = sigma.detach().reshape(rows, cols)
        mu2 = None if mu is None else mu.detach().reshape(rows, cols)
        out3 = out.view(num_samples, rows, cols)

        def write(s0, s1, r0, r1, c0, c1, eps):
            w = sig2[r0:r1, c0:c1] * eps
            out3[s0:s1, r0:r1, c0:c1] = w if mu2 is None else mu2[r0:r1, c0:c1] + w

        _run(lib, seed, step, pid, first_sample, num_samples, rows, cols, 0, sigma.device,
             write)  # fmt: skip
    return out


def eps_dot(
    seed: int,
    step: int,
    pid: int,
    first_sample: int,
    num_samples: int,
    g: torch.Tensor,
    out: torch.Tensor,
    *,
    first_row: int = 0,
) -> torch.Tensor:
    """``out += sum_s g[s] * eps_s`` over samples ``[first_sample, first_sample +
    num_samples)``, in place: the grad-rho reduction of the backward pass, with the noise
    of :func:`normal` regenerated and never stored. ``g`` is ``(num_samples, *shape)``;
    ``out`` has ``shape`` (or any shape with as many elements). Returns ``out``.

    Natively (float32 ``g`` and ``out`` on CPU) the samples are added to each element in
    order; otherwise torch sums blocks of samples first (in ``g``'s precision, at least
    float32), so the two agree to rounding.
    """
    shape = tuple(g.shape[1:])
    rows, cols = _as_2d(shape)
    if g.shape[0] != num_samples:
        raise ValueError(f"g has {g.shape[0]} samples, expected {num_samples}")
    if out.numel() != rows * cols:
        raise ValueError(f"out has {out.numel()} elements, g[0] {rows * cols}")
    if not (num_samples and rows and cols):
        return out
    lib = _native_lib(out.device)
    f32 = torch.float32
    if lib is not None and g.dtype == f32 and out.dtype == f32 and g.device == out.device:
        g_c = g.contiguous()
        acc = out if out.is_contiguous() else out.contiguous()
        lib.eps_dot(acc.data_ptr(), g_c.data_ptr(), seed & MASK32, pid & MASK32, step & MASK32,
                    first_sample & MASK32, num_samples, first_row & MASK32, rows, cols,
                    torch.get_num_threads())  # fmt: skip
        if acc is not out:
            out.copy_(acc)
    else:
        g2 = g.detach().reshape(num_samples, rows, cols)
        acc = torch.zeros((rows, cols), dtype=torch.promote_types(g.dtype, torch.float32),
                          device=out.device)  # fmt: skip

        def add(s0, s1, r0, r1, c0, c1, eps):
            acc[r0:r1, c0:c1] += (g2[s0:s1, r0:r1, c0:c1] * eps).sum(0)

        _run(lib, seed, step, pid, first_sample, num_samples, rows, cols, first_row,
             out.device, add)  # fmt: skip
        with torch.no_grad():
            out.add_(acc.view(out.shape).to(out.dtype))
    return out


def philox_uint32(seed: int, pid: int, c0: torch.Tensor, c1: int, c2: int, c3: int) -> torch.Tensor:
    """The raw Philox integers ``(n, 4)`` for counters ``(c0[i], c1, c2, c3)`` under key
    ``(seed, pid)``: what tests compare bit for bit with ``tl.philox``."""
    c0 = c0.to(torch.int64)
    full = lambda v: torch.full_like(c0, v)  # noqa: E731
    out = philox(c0, full(c1), full(c2), full(c3), seed, pid)
    return torch.stack(out, dim=-1)


def _int(step: int | torch.Tensor) -> int:
    return step if type(step) is int else int(step)


@dataclass(frozen=True)
class NoiseKey:
    """Which noise a Bayesian op draws: Monte Carlo samples
    ``[first_sample, first_sample + num_samples)`` of training step ``step`` (an int, or a
    0-d int64 CPU tensor read when the noise is drawn).

    ``data_offset`` is the global index of the first example of the local batch; estimators
    with per-example noise key their rows by it. Parameter ids are passed per call.
    """

    seed: int
    step: int | torch.Tensor
    first_sample: int
    num_samples: int
    data_offset: int = 0

    def _range(self, samples: tuple[int, int] | None) -> tuple[int, int]:
        return (0, self.num_samples) if samples is None else samples

    def normal(
        self,
        pid: int,
        shape: tuple[int, ...] | torch.Size,
        *,
        samples: tuple[int, int] | None = None,
        first_row: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Noise ``(n, *shape)`` for local samples ``[lo, hi)`` (default: all of them),
        generated in float32 (into ``out`` when given) and returned in ``dtype``."""
        lo, hi = self._range(samples)
        eps = normal(self.seed, _int(self.step), pid, self.first_sample + lo, hi - lo, shape,
                     first_row=first_row, device=device, out=out)  # fmt: skip
        return eps if dtype == torch.float32 else eps.to(dtype)

    def sample(
        self,
        pid: int,
        mu: torch.Tensor | None,
        sigma: torch.Tensor,
        *,
        samples: tuple[int, int] | None = None,
        dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weights ``mu + sigma * eps_s`` ``(n, *mu.shape)`` for local samples ``[lo, hi)``
        (``mu=None``: zero mean; into the workspace ``out`` when given)."""
        lo, hi = self._range(samples)
        return sample(self.seed, _int(self.step), pid, self.first_sample + lo, hi - lo, mu, sigma,
                      dtype=dtype, out=out)  # fmt: skip

    def eps_dot(
        self,
        pid: int,
        g: torch.Tensor,
        out: torch.Tensor,
        *,
        samples: tuple[int, int] | None = None,
        first_row: int = 0,
    ) -> torch.Tensor:
        """``out += sum_s g[s] * eps_s`` for local samples ``[lo, hi)`` (:func:`eps_dot`);
        ``g`` is ``(hi - lo, *shape)``."""
        lo, hi = self._range(samples)
        return eps_dot(self.seed, _int(self.step), pid, self.first_sample + lo, hi - lo, g, out,
                       first_row=first_row)  # fmt: skip
