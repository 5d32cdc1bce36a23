"""Packaging: ``pip wheel`` of a copy of the source tree gives a wheel that holds the C and
CUDA sources of ``csrc/`` as ``spar/csrc/``, and spar installed from it (``pip install
--target``, outside the checkout) finds and assembles them: the CPU library's and the cuda
backend's sources come from the installed package, not from a checkout."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".h", ".c", ".cu", ".cuh"))


def _pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    for name in ("spar", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    # with setuptools here, no build isolation (no index needed); else pip fetches it
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    _pip("wheel", "--no-deps", *isolation, "-q", "-w", str(tmp / "dist"), str(src), cwd=tmp)
    (whl,) = (tmp / "dist").glob("spar-*.whl")
    return whl


def test_wheel_holds_the_c_and_cuda_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"philox.h", "spar_cpu.c", "spar_cuda.cuh", "spar_cuda.cu"} <= set(CSRC)
    for name in CSRC:
        assert f"spar/csrc/{name}" in names, name
    assert "spar/ops/backends/cuda/source.py" in names


def test_installed_wheel_finds_and_assembles_its_sources(wheel, tmp_path):
    site = tmp_path / "site"
    _pip("install", "--no-deps", "-q", "--target", str(site), str(wheel), cwd=tmp_path)
    code = (
        "import json, spar\n"
        "from spar import _native\n"
        "from spar.ops.backends.cuda import source\n"
        "text = source.assemble()\n"
        "print(json.dumps([spar.__file__, str(_native.source_dir()), str(source.source_dir()),\n"
        "                  text.count('#line 1 ')]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    spar_file, native_src, cuda_src, inlined = json.loads(out.stdout.strip().splitlines()[-1])
    csrc = site / "spar" / "csrc"
    assert Path(spar_file).is_relative_to(site), spar_file  # the wheel's spar, not the checkout
    assert Path(native_src) == csrc and Path(cuda_src) == csrc
    assert inlined == 3  # philox.h, spar_cuda.cuh, spar_cuda.cu
