"""Which backend runs a primitive: a registry keyed by ``(primitive, backend)``.

Backends (``spar/ops/backends/torch``, ``spar/ops/backends/triton``,
``spar/ops/backends/cuda``) register the primitives they implement when their loader module
(:data:`_LOADERS`) is imported, each with the dtypes it serves (the parameters' dtype for
``sampled_linear``/``sampled_conv``, the tensor input's for ``lrt_noise``/``sign_mul``;
``normal`` serves any); nothing heavy (triton) is imported until a backend is needed.

The rule, per primitive and per call (``SPAR_BACKEND``, parsed by :mod:`spar._env`). A
backend *serves* a call when it loads, implements the primitive, and accepts the call's
dtype (Triton and cuda: fp32 parameters, fp32/fp16/bf16 activations; cuda also needs CuPy
and a GPU, else it does not load):

* ``auto`` (default): on a CUDA tensor the first of ``triton``, ``cuda``, ``torch`` that
  serves the call; on any other device ``torch``. An fp64 (or fp16/bf16-parameter) model
  on CUDA therefore samples its weights on the torch backend instead of failing in Triton.
* ``torch`` / ``triton`` / ``cuda``: that backend must load, else
  :class:`BackendUnavailable` says why. A call it does not serve (a primitive it does not
  implement, or a dtype it does not accept) runs on ``torch``, which implements every
  primitive for every dtype on every device. :func:`backend_for` tells which.

On a CUDA tensor the torch backend does not draw its noise with the eager int64 Philox of
:mod:`spar.rng` but with the Triton generator (same integers), when triton imports
(:mod:`spar.ops.backends.torch.generator`): whichever backend runs a primitive there, no
noise comes from the eager loop.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable

import torch

from spar import _env

BACKENDS = ("torch", "triton", "cuda")
PRIMITIVES = ("sampled_linear", "sampled_conv", "lrt_noise", "sign_mul", "normal")

# backend -> module whose import registers its primitives (None: not written yet)
_LOADERS: dict[str, str | None] = {
    "torch": "spar.ops.backends.torch",
    "triton": "spar.ops.backends.triton",
    # a submodule: the package itself imports no CuPy (tests use its sources without a GPU)
    "cuda": "spar.ops.backends.cuda.register",
}
_REGISTRY: dict[tuple[str, str], Callable] = {}
# (primitive, backend) -> the dtypes it accepts (None: every dtype)
_DTYPES: dict[tuple[str, str], frozenset[torch.dtype] | None] = {}
# backend -> None once its package imported, else why it failed (each backend loads once)
_LOAD_RESULTS: dict[str, str | None] = {}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here."""


def register(
    primitive: str, backend: str, fn: Callable, dtypes: Iterable[torch.dtype] | None = None
) -> None:
    """``backend`` implements ``primitive`` as ``fn`` for ``dtypes`` (None: every dtype; see
    the module doc for which tensor's dtype counts)."""
    if primitive not in PRIMITIVES:
        raise ValueError(f"primitive must be one of {PRIMITIVES}, got {primitive!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _REGISTRY[(primitive, backend)] = fn
    _DTYPES[(primitive, backend)] = None if dtypes is None else frozenset(dtypes)


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


def load_error(backend: str) -> str | None:
    """None when ``backend``'s package imports (importing it once), else why it does not."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return _load(backend)


def _serves(primitive: str, backend: str, dtype: torch.dtype | None) -> bool:
    """Whether a loaded ``backend`` implements ``primitive`` for ``dtype`` (None: any)."""
    if (primitive, backend) not in _REGISTRY:
        return False
    dtypes = _DTYPES.get((primitive, backend))
    return dtype is None or dtypes is None or dtype in dtypes


def backend_for(primitive: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that runs ``primitive`` on ``device`` for ``dtype`` (the parameters'
    dtype for the sampled primitives, the input's for the per-example noise; None: not
    considered) under the current ``SPAR_BACKEND`` (see the module doc for the rule)."""
    name = _env.backend()
    if name != "auto":
        err = _load(name)
        if err is not None:
            raise BackendUnavailable(f"SPAR_BACKEND={name} cannot run: {err}")
        if _serves(primitive, name, dtype):
            return name
    else:
        order = ("triton", "cuda") if device.type == "cuda" else ()
        for candidate in order:
            if _load(candidate) is None and _serves(primitive, candidate, dtype):
                return candidate
    err = _load("torch")
    if err is not None:  # pragma: no cover - the torch backend imports only torch
        raise BackendUnavailable(f"the torch backend does not load: {err}")
    return "torch"


def resolve(primitive: str, device: torch.device, dtype: torch.dtype | None = None) -> Callable:
    """The function that runs ``primitive`` on ``device`` for ``dtype``."""
    return _REGISTRY[(primitive, backend_for(primitive, device, dtype))]


def available_backends() -> dict[str, str | None]:
    """``{backend: None if it loads, else the reason it does not}``."""
    return {b: _load(b) for b in BACKENDS}


def implemented(backend: str) -> tuple[str, ...]:
    """The primitives ``backend`` implements itself (after loading it)."""
    _load(backend)
    return tuple(p for p in PRIMITIVES if (p, backend) in _REGISTRY)


def served_dtypes(primitive: str, backend: str) -> frozenset[torch.dtype] | None:
    """The dtypes ``backend`` serves ``primitive`` for (None: every dtype); after loading
    it. Raises ``KeyError`` when it does not implement the primitive."""
    _load(backend)
    return _DTYPES[(primitive, backend)]
