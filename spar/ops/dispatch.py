"""Which backend runs a primitive: a registry keyed by ``(primitive, backend)``.

Backends (``spar/ops/backends/torch``, ``spar/ops/backends/triton``; ``cuda`` is reserved
for the CUDA backend and not written yet) register the primitives they implement when their
package is imported; nothing heavy (triton) is imported until a backend is needed.

The rule, per primitive and per call (``SPAR_BACKEND``, parsed by :mod:`spar._env`):

* ``auto`` (default): on a CUDA tensor the first of ``triton``, ``cuda``, ``torch`` that
  loads and implements the primitive; on any other device ``torch``.
* ``torch`` / ``triton`` / ``cuda``: that backend must load, else
  :class:`BackendUnavailable` says why. A primitive it does not implement runs on
  ``torch``, which implements every primitive on every device (e.g. ``sampled_conv`` has
  no Triton kernel yet: under ``SPAR_BACKEND=triton`` a convolution samples its weights on
  the torch backend and its lrt/flipout noise on Triton). :func:`backend_for` tells which.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from spar import _env

BACKENDS = ("torch", "triton", "cuda")
PRIMITIVES = ("sampled_linear", "sampled_conv", "lrt_noise", "sign_mul", "normal")

# backend -> package whose import registers its primitives (None: not written yet)
_LOADERS: dict[str, str | None] = {
    "torch": "spar.ops.backends.torch",
    "triton": "spar.ops.backends.triton",
    "cuda": None,
}
_REGISTRY: dict[tuple[str, str], Callable] = {}
# backend -> None once its package imported, else why it failed (each backend loads once)
_LOAD_RESULTS: dict[str, str | None] = {}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here."""


def register(primitive: str, backend: str, fn: Callable) -> None:
    if primitive not in PRIMITIVES:
        raise ValueError(f"primitive must be one of {PRIMITIVES}, got {primitive!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _REGISTRY[(primitive, backend)] = fn


@torch.compiler.assume_constant_result
def _load(backend: str) -> str | None:
    """Import the backend's package; return None on success, else why it failed. Under
    ``torch.compile`` this runs once at trace time and its result is a constant."""
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


def backend_for(primitive: str, device: torch.device) -> str:
    """The backend that runs ``primitive`` on ``device`` under the current
    ``SPAR_BACKEND`` (see the module doc for the rule)."""
    name = _env.backend()
    if name != "auto":
        err = _load(name)
        if err is not None:
            raise BackendUnavailable(f"SPAR_BACKEND={name} cannot run: {err}")
        if (primitive, name) in _REGISTRY:
            return name
    else:
        order = ("triton", "cuda") if device.type == "cuda" else ()
        for candidate in order:
            if _load(candidate) is None and (primitive, candidate) in _REGISTRY:
                return candidate
    err = _load("torch")
    if err is not None:  # pragma: no cover - the torch backend imports only torch
        raise BackendUnavailable(f"the torch backend does not load: {err}")
    return "torch"


def resolve(primitive: str, device: torch.device) -> Callable:
    """The function that runs ``primitive`` on ``device``."""
    return _REGISTRY[(primitive, backend_for(primitive, device))]


def available_backends() -> dict[str, str | None]:
    """``{backend: None if it loads, else the reason it does not}``."""
    return {b: _load(b) for b in BACKENDS}


def implemented(backend: str) -> tuple[str, ...]:
    """The primitives ``backend`` implements itself (after loading it)."""
    _load(backend)
    return tuple(p for p in PRIMITIVES if (p, backend) in _REGISTRY)
