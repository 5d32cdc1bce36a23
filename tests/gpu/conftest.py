"""GPU checks (``tests/gpu``): the device they run on, and shapes sized to it.

The same tests run in two places:

* on a GPU machine (what ``bench/gpu_check.sh`` does): CUDA tensors, the Triton kernels
  compiled for the GPU. Ask for it with ``TRITON_INTERPRET=0`` (the root conftest sets it to
  ``1`` only when unset) and, to fail instead of silently falling back to the CPU,
  ``SPAR_TEST_DEVICE=cuda``::

      TRITON_INTERPRET=0 SPAR_TEST_DEVICE=cuda python -m pytest tests/gpu -q

* anywhere else (CI, every machine here): CPU tensors, the kernels under
  ``TRITON_INTERPRET=1``, tiny shapes, so the whole folder runs in well under a minute.

Rule: ``SPAR_TEST_DEVICE`` (``cuda`` or ``cpu``) when set; otherwise CUDA when a GPU is
visible and the interpreter is off, else the CPU. A CPU run needs ``TRITON_INTERPRET=1``.

fp32 on the GPU is compared in full fp32: TF32 is switched off for cuBLAS and cuDNN (torch's
default lets cuDNN convolutions use TF32, which would put the torch backend and the
reference ~1e-3 away from the fp64 truth and from the Triton kernels' ieee dots).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")


def _device() -> torch.device:
    wanted = os.environ.get("SPAR_TEST_DEVICE", "").strip().lower()
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if wanted not in ("", "cuda", "cpu"):
        raise pytest.UsageError(f"SPAR_TEST_DEVICE must be cuda or cpu, got {wanted!r}")
    if wanted == "cuda" or (not wanted and torch.cuda.is_available() and not interpret):
        if not torch.cuda.is_available():
            raise pytest.UsageError("SPAR_TEST_DEVICE=cuda but torch sees no CUDA device")
        if interpret:
            raise pytest.UsageError(
                "SPAR_TEST_DEVICE=cuda needs the compiled kernels: set TRITON_INTERPRET=0"
            )
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


DEVICE = _device()
ON_GPU = DEVICE.type == "cuda"


@dataclass(frozen=True)
class Sizes:
    """Shapes of the checks: non-powers of two everywhere (masked tiles), larger on a GPU
    (several tiles per dimension, several programs per sample)."""

    S: int  # Monte Carlo samples
    B: int  # rows per sample
    K: int  # linear in
    N: int  # linear out
    C: int  # conv in channels
    O: int  # conv out channels  # noqa: E741
    HW: int  # conv spatial size
    cnn_hw: int  # image size of the small CNN (multiple of 2)


SIZES = (
    Sizes(S=5, B=37, K=193, N=130, C=12, O=20, HW=13, cnn_hw=16)
    if ON_GPU
    else Sizes(S=2, B=3, K=17, N=9, C=3, O=4, HW=5, cnn_hw=4)
)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def sizes() -> Sizes:
    return SIZES


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """Every check chooses its backend itself; no chunk budget or path left over; full fp32
    on the GPU (no TF32); a fresh dynamo cache (the backend is picked at trace time)."""
    for name in ("SPAR_BACKEND", "SPAR_LINEAR_PATH", "SPAR_CHUNK_NUMEL"):
        monkeypatch.delenv(name, raising=False)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    if ON_GPU:
        torch.cuda.synchronize()
