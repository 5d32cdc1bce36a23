"""Launching the kernels of ``csrc/spar_cuda.cu``: one CuPy ``RawModule`` per device, the
launch on torch's current stream, tensors passed by device pointer.

* Compile: the first launch on a device builds ``cupy.RawModule(code=source.assemble(),
  options=source.NVRTC_OPTIONS)`` under that device and looks up every kernel, so NVRTC
  compiles once per process and device (the NVRTC part: about 0.5 s, ``bench/README.md``),
  for the device's architecture;
  CuPy's on-disk kernel cache (``~/.cupy/kernel_cache``, ``CUPY_CACHE_DIR``) makes later
  processes load the binary instead. A compile error is raised with NVRTC's log, whose
  messages name the ``.cu``/``.cuh`` file and line (:mod:`.source`).
* Stream and device: kernels run on ``torch.cuda.current_stream(device)`` (wrapped as a
  CuPy stream, ``Stream.from_external`` or ``ExternalStream`` on CuPy before 14, cached per
  stream), under a ``cupy.cuda.Device`` guard for
  the tensors' device, so they are ordered with torch's own kernels on that stream and
  the caching allocator's reuse of the tensors' memory stays safe.
* Zero copy: a kernel receives each tensor's device pointer (``Tensor.data_ptr()``, what
  ``__cuda_array_interface__`` and DLPack would hand CuPy) as a 64-bit scalar: no CuPy
  array is built and nothing is copied. Callers pass contiguous tensors of the dtypes the
  kernel names (:mod:`.sample` and :mod:`.noise` check).

:data:`host_runner` is the test hook: a callable ``(name, grid, args)`` that runs a kernel
for tensors that are not on a GPU (``tests/ops/test_cuda_host.py`` routes launches to the
host build of the same kernels, ``csrc/spar_cuda_host.c``). It is ``None`` in normal use,
and then a launch for a CPU tensor raises.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from spar.ops.backends.cuda import source
from spar.rng import MASK32

# (kernel name, grid (x, y), converted args) -> None; see the module doc
host_runner: Callable[[str, tuple[int, int], list], None] | None = None

_lock = threading.Lock()
_modules: dict[int, _Module] = {}
_streams: dict[tuple[int, int], object] = {}


class _Module:
    """The kernels compiled for one device."""

    def __init__(self, index: int) -> None:
        import cupy

        self.cupy = cupy
        with cupy.cuda.Device(index):
            self.raw = cupy.RawModule(code=source.assemble(), options=source.NVRTC_OPTIONS)
            # get_function compiles (or loads from CuPy's cache) the module for this device
            self.functions = {name: self.raw.get_function(name) for name in source.SIGNATURES}


def module(index: int) -> _Module:
    """The compiled kernels of CUDA device ``index`` (built on first use)."""
    m = _modules.get(index)
    if m is None:
        with _lock:
            m = _modules.get(index)
            if m is None:
                m = _modules[index] = _Module(index)
    return m


class _StreamHandle:
    """A raw ``cudaStream_t`` behind the CUDA stream protocol (``__cuda_stream__``: version
    0, the handle), what ``cupy.cuda.Stream.from_external`` takes."""

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


def _stream(m: _Module, device: torch.device):
    """torch's current stream on ``device`` as a CuPy stream (one wrapper per stream):
    ``Stream.from_external`` where CuPy has it (14+, which deprecates ``ExternalStream``),
    else ``ExternalStream``."""
    ptr = torch.cuda.current_stream(device).cuda_stream
    key = (device.index, ptr)
    s = _streams.get(key)
    if s is None:
        stream_cls = m.cupy.cuda.Stream
        if hasattr(stream_cls, "from_external"):
            s = stream_cls.from_external(_StreamHandle(ptr))
        else:
            s = m.cupy.cuda.ExternalStream(ptr, device.index)
        with _lock:
            s = _streams.setdefault(key, s)  # another thread may have wrapped it first
    return s


def _ints(name: str, args: Sequence[Tensor | int | None]) -> list[int]:
    """The kernel's arguments as Python ints of its argument kinds (pointers as addresses,
    NULL as 0, uint32 counters wrapped)."""
    kinds = source.SIGNATURES[name]
    if len(args) != len(kinds):
        raise TypeError(f"{name} takes {len(kinds)} arguments, got {len(args)}")
    out = []
    for kind, a in zip(kinds, args, strict=True):
        if kind == source.PTR:
            out.append(0 if a is None else a.data_ptr())
        elif kind == source.U32:
            out.append(int(a) & MASK32)
        else:
            out.append(int(a))
    return out


_NUMPY = {source.PTR: np.uint64, source.I64: np.int64, source.U32: np.uint32, source.I32: np.int32}


def launch(name: str, device: torch.device, grid: tuple[int, int],
           args: Sequence[Tensor | int | None]) -> None:  # fmt: skip
    """Run kernel ``name`` of ``spar_cuda.cu`` over ``grid = (blocks_x, blocks_y)`` blocks of
    :data:`source.BLOCK` threads on ``device``'s current torch stream. ``args``: tensors (or
    None) for pointer arguments, ints for the others, in the kernel's order."""
    if grid[0] <= 0 or grid[1] <= 0:
        return
    values = _ints(name, args)
    if device.type != "cuda":
        if host_runner is None:
            raise RuntimeError(f"the cuda backend needs CUDA tensors, got a tensor on {device}")
        host_runner(name, grid, values)
        return
    index = torch.cuda.current_device() if device.index is None else device.index
    device = torch.device("cuda", index)
    m = module(index)
    kinds = source.SIGNATURES[name]
    typed = tuple(_NUMPY[k](v) for k, v in zip(kinds, values, strict=True))
    with m.cupy.cuda.Device(index), _stream(m, device):
        m.functions[name]((grid[0], grid[1], 1), (source.BLOCK, 1, 1), typed)


def blocks(threads: int) -> int:
    """Blocks of :data:`source.BLOCK` threads that cover ``threads`` threads."""
    return -(-threads // source.BLOCK)


def groups(rows: int, cols: int) -> int:
    """Threads of a launch over a ``(rows, cols)`` array: one per 4-column group of a row."""
    return rows * ((cols + 3) // 4)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small constant for the host runner)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
