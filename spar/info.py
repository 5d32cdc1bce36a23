"""``spar info``: versions, which backends work here, and the GPUs NVML sees."""

from __future__ import annotations

import importlib
import platform
import shutil
import subprocess

import torch

import spar
from spar.ops import available_backends
from spar.telemetry import nvml_devices


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001 - missing or broken: reported as absent
        return None


def _nvcc() -> str | None:
    exe = shutil.which("nvcc")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    release = [line for line in out.stdout.splitlines() if "release" in line]
    return release[-1].strip() if release else exe


def collect() -> dict:
    """Everything ``spar info`` prints, as a dict.

    Backends come from :func:`spar.ops.available_backends`, the public entry point of the
    op layer (a name -> ``None`` if it loads, else the reason it does not); this module
    imports nothing else of :mod:`spar.ops`.
    """
    devices, why_none = nvml_devices()
    return {
        "spar": spar.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "triton": _version("triton"),
        "cupy": _version("cupy"),
        "nvcc": _nvcc(),
        "backends": available_backends(),
        "gpus": devices,
        "gpu_note": why_none,
    }


def render(info: dict) -> str:
    lines = [
        f"spar      {info['spar']}",
        f"python    {info['python']} ({info['platform']})",
        f"torch     {info['torch']} (CUDA build: {info['torch_cuda'] or 'none'}, "
        f"CUDA available: {info['cuda_available']})",
        f"triton    {info['triton'] or 'not installed'}",
        f"cupy      {info['cupy'] or 'not installed'}",
        f"nvcc      {info['nvcc'] or 'not found'}",
        "backends:",
    ]
    for name, err in info["backends"].items():
        status = "loads" if err is None else "unavailable: " + err
        if err is None and name == "torch":
            status = "ok (CPU and GPU)"
        elif err is None and name == "cuda":
            status = "ok (CuPy; kernels compiled by NVRTC on first use, cached by CuPy)"
        elif err is None and name == "triton":
            status = (
                "ok (runs for CUDA tensors)"
                if info["cuda_available"]
                else "loads; no GPU here, so its kernels run only under TRITON_INTERPRET=1 (tests)"
            )
        lines.append(f"  {name:<8} {status}")
    if info["gpus"]:
        lines.append("GPUs:")
        for d in info["gpus"]:
            lines.append(
                f"  [{d['index']}] {d['name']}  {d['memory_used'] / 2**30:.1f} / "
                f"{d['memory_total'] / 2**30:.1f} GiB used, driver {d['driver']}"
            )
    else:
        lines.append(f"GPUs:     none ({info['gpu_note']})")
    return "\n".join(lines)
