"""The CUDA sources of the cuda backend: where they are, the one translation unit NVRTC
compiles, the options, and the kernels' argument lists. Imports neither CuPy nor a GPU
runtime, so tests and benchmarks use it on any machine.

``csrc/spar_cuda.cu`` includes ``spar_cuda.cuh``, which includes ``philox.h`` (the Philox
and Box-Muller the CPU library uses too). :func:`assemble` inlines those local includes
into one string, each file under a ``#line 1 "<path>"`` directive and the includer resumed
under ``#line N "<path>"``, so that:

* NVRTC (which reads no files from disk here) gets the whole program in one string, and
  its errors and warnings name the real file and line;
* CuPy's on-disk kernel cache (keyed by the source string and the options) is invalidated
  by a change to any of the files, headers included.
"""

from __future__ import annotations

import re
from pathlib import Path

from spar import _native

MAIN = "spar_cuda.cu"
FILES = ("philox.h", "spar_cuda.cuh", MAIN)
# NVRTC options (CuPy adds the architecture of the device). --fmad=false: no a*b+c becomes
# an fma, so the normals are the bits of the CPU library (built with -ffp-contract=off);
# division and sqrt are IEEE (NVRTC's defaults, --prec-div/--prec-sqrt=true).
NVRTC_OPTIONS = ("--std=c++14", "--fmad=false")
# threads per block of every kernel (SPAR_BLOCK in spar_cuda.cu)
BLOCK = 256

# argument kinds: a tensor's device pointer (or NULL), int64_t, uint32_t, int
PTR, I64, U32, I32 = "ptr", "i64", "u32", "i32"
_SAMPLE = (PTR, PTR, PTR, I64, I64, I64, I64, U32, U32, U32, U32, U32)
_SAMPLE_BWD = (PTR, PTR, PTR, PTR, I64, I64, I64, U32, U32, U32, U32, I32)
_LRT = (PTR, PTR, PTR, I64, I64, I64, I64, U32, U32, U32, U32, U32)
_SIGN = (PTR, PTR, I64, I64, I64, I64, U32, U32, U32, U32, U32)
# kernel name (extern "C" in spar_cuda.cu) -> its argument kinds, in order
SIGNATURES: dict[str, tuple[str, ...]] = {
    **{f"spar_sample_{dt}": _SAMPLE for dt in ("f32", "f16", "bf16")},
    **{f"spar_sample_bwd_{dt}": _SAMPLE_BWD for dt in ("f32", "f16", "bf16")},
    **{f"spar_lrt_noise_{dt}": _LRT for dt in ("f32", "f16", "bf16", "f16_f32", "bf16_f32")},
    **{f"spar_sign_mul_{dt}": _SIGN for dt in ("f32", "f16", "bf16")},
    "spar_philox": (PTR, PTR, PTR, I64),
}

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def source_dir() -> Path:
    """The directory holding the C/CUDA sources (``spar/csrc`` in a wheel, ``csrc/`` in a
    checkout: the one :func:`spar._native.source_dir` finds)."""
    src = _native.source_dir()
    missing = [name for name in FILES if not (src / name).is_file()]
    if missing:
        raise FileNotFoundError(f"spar's CUDA sources {missing} are not installed in {src}")
    return src


def _inline(path: Path, seen: set[Path], out: list[str]) -> None:
    seen.add(path)
    out.append(f'#line 1 "{path}"')
    for number, line in enumerate(path.read_text().splitlines(), 1):
        m = _INCLUDE.match(line)
        if m is None:
            out.append(line)
            continue
        target = path.parent / m.group(1)
        if not target.is_file():
            raise FileNotFoundError(f"{path}:{number}: included file {m.group(1)} not found")
        if target not in seen:
            _inline(target, seen, out)
        out.append(f'#line {number + 1} "{path}"')


def assemble(src: Path | None = None) -> str:
    """``spar_cuda.cu`` with its local includes inlined under ``#line`` directives (see the
    module doc)."""
    out: list[str] = []
    _inline((src or source_dir()) / MAIN, set(), out)
    return "\n".join(out) + "\n"
