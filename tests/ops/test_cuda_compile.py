"""The cuda backend's sources compile for the GPU, without a GPU:

* the translation unit NVRTC gets (:func:`source.assemble`) holds every file once, under
  ``#line`` directives, so that a compile error names the real file and line;
* ``nvcc`` (where it is installed) compiles ``csrc/spar_cuda.cu`` to PTX for sm_80 and
  sm_90 with warnings as errors, and every kernel of :data:`source.SIGNATURES` is an entry
  with the parameter widths the launcher passes;
* NVRTC through CuPy (where CuPy and libnvrtc are installed: ``pip install cupy-cuda13x
  "nvidia-cuda-nvrtc>=13,<14"``, as CI does) compiles the assembled source with the
  backend's options and no warning: the compile users run, minus the device query that
  picks the architecture (patched here, since there is no device).
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from spar.ops.backends.cuda import source

ARCHS = ("80", "90")
NVCC = shutil.which("nvcc")
# PTX parameter types of the argument kinds: pointers and int64 are 64-bit words
_PTX_TYPE = {source.PTR: "u64", source.I64: "u64", source.U32: "u32", source.I32: "u32"}


def _entries(ptx: str) -> dict[str, list[str]]:
    """``{kernel: [param type, ...]}`` of a PTX module."""
    out = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\((.*?)\)", ptx, re.S):
        out[m.group(1)] = re.findall(r"\.param\s+\.(\w+)", m.group(2))
    return out


def _check_entries(ptx: str) -> None:
    entries = _entries(ptx)
    assert set(entries) == set(source.SIGNATURES), set(entries) ^ set(source.SIGNATURES)
    for name, kinds in source.SIGNATURES.items():
        want = [_PTX_TYPE[k] for k in kinds]
        got = [{"s32": "u32", "s64": "u64", "b32": "u32", "b64": "u64"}.get(t, t)
               for t in entries[name]]  # fmt: skip
        assert got == want, (name, got, want)


def test_assemble_inlines_each_file_once_under_line_directives():
    src = source.source_dir()
    text = source.assemble()
    assert '#include "' not in text
    for name in source.FILES:
        assert text.count(f'#line 1 "{src / name}"') == 1, name
    # after an include, the includer resumes at the line that follows it
    cu = (src / source.MAIN).read_text().splitlines()
    n = next(i for i, line in enumerate(cu, 1) if line.startswith('#include "spar_cuda.cuh"'))
    assert f'#line {n + 1} "{src / source.MAIN}"' in text


def _broken_copy(tmp_path: Path) -> tuple[Path, int]:
    """A copy of the sources with an error on a known line of spar_cuda.cuh."""
    dst = tmp_path / "csrc"
    shutil.copytree(source.source_dir(), dst)
    header = dst / "spar_cuda.cuh"
    lines = header.read_text().splitlines()
    bad = next(i for i, line in enumerate(lines) if "SPAR_FN void spar_sample_thread" in line)
    lines.insert(bad, "SPAR_FN int spar_broken(void) { return undeclared_name; }")
    header.write_text("\n".join(lines) + "\n")
    return dst, bad + 1


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ARCHS)
def test_nvcc_compiles_every_kernel_to_ptx_without_warnings(tmp_path, arch):
    src = source.source_dir()
    out = tmp_path / f"spar_sm{arch}.ptx"
    cmd = [NVCC, "-ptx", f"-arch=sm_{arch}", "--fmad=false", "-Werror", "all-warnings",
           "-I", str(src), str(src / source.MAIN), "-o", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    _check_entries(out.read_text())


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_compile_errors_name_the_real_file_and_line(tmp_path):
    """The assembled source (what NVRTC gets) compiled by nvcc: the error points into the
    header, not into the one-string translation unit."""
    broken, line = _broken_copy(tmp_path)
    unit = tmp_path / "unit.cu"
    unit.write_text(source.assemble(broken))
    proc = subprocess.run([NVCC, "-ptx", "-arch=sm_90", str(unit), "-o", str(tmp_path / "u.ptx")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    assert f"{broken / 'spar_cuda.cuh'}({line})" in proc.stderr, proc.stderr


def _nvrtc_compiler(monkeypatch):
    """CuPy's compiler module with the architecture query patched (no device here), or a
    skip saying what is missing."""
    try:
        from cupy.cuda import compiler
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001 - CuPy or libnvrtc missing: say which
        pytest.skip(f"NVRTC through CuPy is not available here: {type(e).__name__}: {e}")
    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc",
                        lambda arch=None: (f"-arch=compute_{arch}", "ptx"))  # fmt: skip
    return compiler


@pytest.mark.parametrize("arch", ARCHS)
def test_nvrtc_compiles_the_assembled_source(monkeypatch, arch):
    compiler = _nvrtc_compiler(monkeypatch)
    log = io.StringIO()
    ptx, _ = compiler.compile_using_nvrtc(source.assemble(), options=source.NVRTC_OPTIONS,
                                          arch=arch, log_stream=log)  # fmt: skip
    assert log.getvalue().strip() == "", log.getvalue()  # no warning either
    _check_entries(ptx.decode() if isinstance(ptx, bytes) else ptx)


def test_nvrtc_errors_name_the_real_file_and_line(monkeypatch, tmp_path):
    compiler = _nvrtc_compiler(monkeypatch)
    broken, line = _broken_copy(tmp_path)
    with pytest.raises(compiler.CompileException) as err:
        compiler.compile_using_nvrtc(source.assemble(broken), options=source.NVRTC_OPTIONS,
                                     arch="90")  # fmt: skip
    assert f"{broken / 'spar_cuda.cuh'}({line})" in str(err.value), str(err.value)


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_cost_model_counts_the_cuda_kernels():
    """``bench/cost_model.py --cuda``'s counting on sm_90: every kernel, no spills, the
    sampling loops found (labels at branch targets) with one Philox call's integer work and
    the Box-Muller arithmetic per group of 4, and every FADD counted as fp32 (an opcode of
    hex letters, which the SASS parser must not take for an address)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import cost_model as cm

    why = cm.tools_available(90)
    if why:
        pytest.skip(f"cuobjdump/ptxas unavailable: {why}")
    compiled = cm.compile_cuda(90)
    assert set(compiled) == set(source.SIGNATURES)
    assert all(c["spill_bytes"] == 0 and 0 < c["regs"] <= 64 for c in compiled.values())
    rows = {r["kernel"]: r for r in cm.cuda_rows(90, compiled)}
    for name in ("spar_sample_f32", "spar_sample_bwd_f32"):
        r = rows[name]
        assert r["segment"] == "loop1", name  # the loop over samples
        # 10 Philox rounds (2 wide multiplies each) per 4 elements; Box-Muller in fp32
        assert r["int_mad_per_elem"] >= 20 / 4 and r["fp32_per_elem"] >= 15, (name, r)
        assert r["local_per_elem"] == 0 and 30 < r["total_per_elem"] < 150, (name, r)
    assert rows["spar_sample_f32"]["gmem_st_per_elem"] == 1.0  # one store per weight
    sass = compiled["spar_sample_f32"]["sass"]
    fadds = sum(1 for it in cm.parse_sass(sass) if it[0] == "ins" and it[1] == "FADD")
    # every line whose opcode (after an optional predicate) is FADD
    assert fadds > 0 and fadds == len(re.findall(r"(?m)^(?:@!?U?P\w+\s+)?FADD[\s.]", sass))
