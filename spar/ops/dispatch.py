"""Backend registry: which implementation of an op runs for a given tensor.

``SPAR_BACKEND`` selects it: ``auto`` (default) takes the fastest backend that loads for
the tensor's device and falls back silently to ``torch``; ``torch``, ``triton`` or
``cuda`` ask for one backend, and asking for one that cannot run raises with the reason.
A backend registers its ops by importing its module; the loaders below say which module
that is, so nothing heavy (triton, nvcc) is imported until it is needed.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

BACKENDS = ("torch", "triton", "cuda")

# backend -> module whose import registers its ops (None: not written yet)
_LOADERS: dict[str, str | None] = {
    "torch": "spar.ops._torch_backend",
    "triton": "spar.ops._triton_backend",
    "cuda": None,
}
_REGISTRY: dict[tuple[str, str], Callable] = {}
# backend -> None once its module imported, else why it failed (each backend loads once)
_LOAD_RESULTS: dict[str, str | None] = {}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here."""


def register(op: str, backend: str, fn: Callable) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _REGISTRY[(op, backend)] = fn


@torch.compiler.assume_constant_result
def _load(backend: str) -> str | None:
    """Import the backend's module; return None on success, else why it failed. Under
    ``torch.compile`` this runs once at trace time and its result is a constant: the first
    call may happen inside a traced model."""
    if backend in _LOAD_RESULTS:
        return _LOAD_RESULTS[backend]
    module = _LOADERS[backend]
    error = None
    if module is None:
        error = f"the {backend} backend is not implemented in this version of spar"
    else:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - any import failure means "unavailable"
            error = f"importing {module} failed: {type(e).__name__}: {e}"
    _LOAD_RESULTS[backend] = error
    return error


def requested_backend() -> str:
    name = os.environ.get("SPAR_BACKEND", "auto").strip().lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"SPAR_BACKEND must be one of auto, {', '.join(BACKENDS)}; got {name!r}")
    return name


def _auto_order(device: torch.device) -> tuple[str, ...]:
    return ("triton", "cuda", "torch") if device.type == "cuda" else ("torch",)


def resolve(op: str, device: torch.device) -> tuple[str, Callable]:
    """The backend name and function that run ``op`` on ``device``."""
    name = requested_backend()
    if name != "auto":
        err = _load(name)
        if err is None and (op, name) not in _REGISTRY:
            err = f"the {name} backend has no implementation of {op!r}"
        if err is not None:
            raise BackendUnavailable(f"SPAR_BACKEND={name} cannot run {op!r}: {err}")
        return name, _REGISTRY[(op, name)]
    for candidate in _auto_order(device):
        if _load(candidate) is None and (op, candidate) in _REGISTRY:
            return candidate, _REGISTRY[(op, candidate)]
    errors = {b: e for b, e in _LOAD_RESULTS.items() if e is not None}
    raise BackendUnavailable(f"no backend can run {op!r} on {device}: {errors}")


def available_backends() -> dict[str, str | None]:
    """``{backend: None if it loads, else the reason it does not}``."""
    return {b: _load(b) for b in BACKENDS}
