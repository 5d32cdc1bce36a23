"""The native CPU noise generator: ``csrc/spar_cpu.c`` built at first use, loaded with ctypes.

Why: Philox in torch integer ops is about a hundred passes over memory per four normals
(about 24 M normals/s on 2 cores), and the ``torch.compile``d loop spar used before cost
every process 14-20 s of compilation. One small C file, vectorised (AVX-512 / AVX2 /
portable) and spread over torch's threads with OpenMP, draws the same numbers (integers
bit-exact, normals within a few ulp of the torch generator): 1.0-1.3 G normals/s on 2
cores, about 10 us of overhead per call (``bench/bench_rng.py``,
``bench/results/rng_cpu.csv``).

How:

* Sources: ``spar/csrc/`` in an installed wheel (setup.py copies the top-level ``csrc/``
  there), else ``csrc/`` next to the ``spar`` package (a source checkout or an editable
  install).
* Build: the C compiler ``$CC`` (default ``cc``; it may carry arguments, e.g.
  ``ccache gcc``) with ``-O3 -march=native -ffp-contract=off -fno-math-errno -fopenmp``
  (retried without OpenMP, then without ``-march=native``, where the compiler refuses).
  The library lands in the cache directory (``SPAR_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/spar``, else ``~/.cache/spar``; a temporary directory where that is not
  writable) under a name that hashes the sources,
  the flags, the compiler (path, size, mtime) and the CPU (``-march=native`` code must not
  reach another CPU through a shared home directory). It is built under a lock file into a
  temporary name, loaded and self-tested from there, then renamed into place: ranks that
  start together build it once, and no process ever loads a half-written file. A cached
  file that fails to load or to pass the self-test is rebuilt.
* Once per process: :func:`get` decides, under a lock, whether the library is available and
  keeps the answer; a warm process pays a few milliseconds (hash, ``dlopen``), never a
  compiler run. Where no compiler exists or the build fails, :func:`get` returns ``None``
  and :func:`error` says why (:mod:`spar.rng` then warns once and uses its eager torch
  generator).

The C functions take raw pointers (``tensor.data_ptr()``) and ``nthreads`` (the caller
passes ``torch.get_num_threads()``; with torch loaded, the library binds to torch's own
``libgomp.so.1``, so both share one thread pool and never oversubscribe the cores).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

from spar import _env

ABI = 1  # must equal SPAR_CPU_ABI in csrc/spar_cpu.c
SOURCES = ("philox.h", "spar_cpu.c")
BASE_FLAGS = ("-O3", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared",
              "-fvisibility=hidden")  # fmt: skip
# tried in order: the first set the compiler accepts is used
FLAG_SETS = (
    ("-march=native", "-fopenmp"),
    ("-march=native",),
    (),
)
_BUILD_TIMEOUT_S = 300

_u32, _i64, _int, _ptr = ctypes.c_uint32, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
# name -> argtypes of the exported functions (see csrc/spar_cpu.c)
_SIGNATURES = {
    "spar_cpu_abi": (),
    "spar_cpu_openmp": (),
    "spar_philox_batch": (_i64, _ptr, _ptr, _ptr),
    "spar_normal_batch": (_i64, _ptr, _ptr, _ptr),
    # out, seed, pid, step, first_sample, ns, first_row, rows, cols, nthreads
    "spar_normal": (_ptr, _u32, _u32, _u32, _u32, _i64, _u32, _i64, _i64, _int),
    # out, mu, sigma, seed, pid, step, first_sample, ns, rows, cols, nthreads
    "spar_sample_f32": (_ptr, _ptr, _ptr, _u32, _u32, _u32, _u32, _i64, _i64, _i64, _int),
    "spar_sample_f64": (_ptr, _ptr, _ptr, _u32, _u32, _u32, _u32, _i64, _i64, _i64, _int),
    # acc, g, seed, pid, step, first_sample, ns, first_row, rows, cols, nthreads
    "spar_eps_dot": (_ptr, _ptr, _u32, _u32, _u32, _u32, _i64, _u32, _i64, _i64, _int),
}
# Random123 known answer: Philox4x32-10 of counter 0, key 0
_KAT = (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)


class Library:
    """The loaded library: its exported functions as attributes (``normal``, ``sample_f32``,
    ``sample_f64``, ``eps_dot``, ``philox_batch``, ``normal_batch``), plus ``path``,
    ``built`` (whether this process compiled it) and ``openmp``."""

    def __init__(self, cdll: ctypes.CDLL, path: Path, built: bool):
        self._cdll = cdll
        self.path = path
        self.built = built
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(cdll, name)
            fn.argtypes = argtypes
            fn.restype = _int if name.startswith("spar_cpu_") else None
            setattr(self, name.removeprefix("spar_"), fn)
        self.openmp = bool(self.cpu_openmp())

    def self_test(self) -> str | None:
        """``None`` when the library is the one this module expects and computes Philox
        correctly, else what is wrong."""
        abi = self.cpu_abi()
        if abi != ABI:
            return f"ABI {abi}, expected {ABI}"
        zeros = (ctypes.c_uint32 * 4)()
        out = (ctypes.c_uint32 * 4)()
        self.philox_batch(1, zeros, zeros, out)
        if tuple(out) != _KAT:
            return "Philox known-answer test failed"
        return None


_lock = threading.Lock()
_decided = False
_lib: Library | None = None
_error: str | None = None


def get() -> Library | None:
    """The library, built and loaded on the first call of the process; ``None`` (with
    :func:`error` saying why) where it cannot be built or loaded."""
    if _decided:
        return _lib
    return _decide()


def error() -> str | None:
    """Why :func:`get` returned ``None`` (``None`` before the decision or on success)."""
    return _error


def _decide() -> Library | None:
    global _decided, _lib, _error
    with _lock:
        if not _decided:
            try:
                _lib = load()
            except Exception as e:  # noqa: BLE001 - any failure means: use the eager generator
                _lib, _error = None, f"{type(e).__name__}: {e}"
            _decided = True
    return _lib


# --- environment ---------------------------------------------------------------------------


def _env_cc() -> list[str]:
    """``CC`` (the standard variable, not a SPAR_* one): the C compiler command."""
    return shlex.split(os.environ.get("CC", "").strip() or "cc")


# --- building -------------------------------------------------------------------------------


def source_dir() -> Path:
    """The directory holding ``philox.h`` and ``spar_cpu.c``."""
    pkg = Path(__file__).resolve().parent
    for candidate in (pkg / "csrc", pkg.parent / "csrc"):
        if all((candidate / name).is_file() for name in SOURCES):
            return candidate
    raise FileNotFoundError(f"spar's C sources ({', '.join(SOURCES)}) are not installed")


def compiler() -> list[str]:
    """The compiler command with its first word resolved to a path."""
    cmd = _env_cc()
    path = shutil.which(cmd[0]) if cmd else None
    if path is None:
        raise FileNotFoundError(f"no C compiler: {' '.join(cmd) or '(empty CC)'!r} not found")
    return [path, *cmd[1:]]


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and feature flags (first CPU)."""
    try:
        lines = []
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key = line.split(":", 1)[0].strip()
                if key in ("vendor_id", "cpu family", "model", "model name", "flags", "Features",
                           "CPU implementer", "CPU part"):  # fmt: skip
                    lines.append(line.strip())
        if lines:
            return "\n".join(lines)
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def cache_key(cc: list[str], src: Path) -> str:
    """Hash of everything the built library depends on."""
    h = hashlib.sha256()
    h.update(f"abi={ABI}\0{sys.platform}\0{platform.machine()}\0".encode())
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (src / name).read_bytes() + b"\0")
    h.update(repr((BASE_FLAGS, FLAG_SETS)).encode())
    real = os.path.realpath(cc[0])
    st = os.stat(real)
    h.update(f"{cc[1:]}\0{real}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    h.update(_cpu_id().encode())
    return h.hexdigest()[:20]


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock (flock) where the platform and file system have one;
    otherwise nothing (concurrent builds are still safe, only wasteful)."""
    try:
        import fcntl

        f = open(path, "a+b")  # noqa: SIM115
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        f.close()  # releases the lock


def _writable_dir(cache: Path) -> Path:
    """``cache``, created; where it cannot be written (a read-only home), a per-user
    directory under the system's temporary directory."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if os.access(cache, os.W_OK | os.X_OK):
            return cache
    except OSError:
        pass
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    fallback = Path(tempfile.gettempdir()) / f"spar-cache-{uid}"
    fallback.mkdir(mode=0o700, parents=True, exist_ok=True)
    # a shared temporary directory: load nothing from a folder another user could write
    st = fallback.stat()
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        raise OSError(f"{fallback} is not a private directory of this user")
    return fallback


def _try_load(path: Path, built: bool) -> Library:
    lib = Library(ctypes.CDLL(str(path)), path, built)
    problem = lib.self_test()
    if problem:
        raise OSError(f"{path}: {problem}")
    return lib


def _compile(cc: list[str], src: Path, out: Path) -> tuple[str, ...]:
    """Compile into ``out`` with the first flag set the compiler accepts; returns it."""
    errors = []
    for extra in FLAG_SETS:
        flags = (*BASE_FLAGS, *extra)
        cmd = [*cc, *flags, "-I", str(src), str(src / "spar_cpu.c"), "-o", str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"running {cc[0]} failed: {e}") from e
        if proc.returncode == 0 and out.is_file() and out.stat().st_size > 0:
            return flags
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        errors.append(f"[{' '.join(extra) or 'plain'}] " + " | ".join(tail))
    raise RuntimeError(f"compiling {src / 'spar_cpu.c'} failed: " + "; ".join(errors))


def build(cc: list[str], src: Path, path: Path) -> Library:
    """Compile into a temporary file next to ``path``, load and self-test it, then rename it
    to ``path`` (atomic: a concurrent process loads either the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _compile(cc, src, tmp)
        lib = _try_load(tmp, True)
        os.replace(tmp, path)
        lib.path = path
        return lib
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def load(cache: Path | None = None) -> Library:
    """Find the library for this machine in the cache, or build it; raises on failure.
    (:func:`get` calls this once per process; tests call it directly.)"""
    src = source_dir()
    cc = compiler()
    cache = _writable_dir(_env.cache_dir() if cache is None else Path(cache))
    path = cache / f"spar_cpu-{cache_key(cc, src)}.so"
    if path.is_file():
        with contextlib.suppress(OSError):
            return _try_load(path, False)
    with _file_lock(cache / f"{path.name}.lock"):
        if path.is_file():  # another process may have built it while we waited
            with contextlib.suppress(OSError):
                return _try_load(path, False)
        return build(cc, src, path)
