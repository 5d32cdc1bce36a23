"""Every ``SPAR_*`` environment variable spar reads, parsed in one place.

Each accessor reads its variable when called (tests and users may change the environment
between calls) and raises ``ValueError`` naming the variable and its valid values for
anything else (values are case-insensitive; unset or empty means the default).

* ``SPAR_BACKEND``: ``auto`` (default), ``torch``, ``triton``, ``cuda``; which backend runs
  each primitive (:mod:`spar.ops.dispatch`).
* ``SPAR_LINEAR_PATH``: ``auto`` (default), ``fused``, ``chunked``; the Triton linear path.
* ``SPAR_CHUNK_NUMEL``: an int >= 1 (default 2097152); weight elements per sample chunk
  that the torch backend and the Triton chunked path materialize (at least one sample).
* ``SPAR_RNG``: ``auto`` (default), ``native``, ``eager``; the noise generator of the torch
  backend: on CPU the native C library (``auto``: unless it cannot be built) or the eager
  torch loop (:mod:`spar.rng`); on CUDA the Triton kernels, or with ``eager`` the eager
  loop (:mod:`spar.ops.backends.torch.generator`).
* ``SPAR_CACHE_DIR``: a folder (default ``$XDG_CACHE_HOME/spar``, else
  ``~/.cache/spar``) where the native generator is built (:mod:`spar._native`).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CHUNK_NUMEL = 1 << 21


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None else value.strip().lower()


def choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """The value of ``name``, one of ``choices`` (``default`` when unset or empty)."""
    value = _raw(name)
    if not value:
        return default
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def positive_int(name: str, default: int) -> int:
    value = _raw(name)
    if not value:
        return default
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    return n


def backend() -> str:
    return choice("SPAR_BACKEND", ("auto", "torch", "triton", "cuda"), "auto")


def linear_path() -> str:
    return choice("SPAR_LINEAR_PATH", ("auto", "fused", "chunked"), "auto")


def chunk_numel() -> int:
    return positive_int("SPAR_CHUNK_NUMEL", DEFAULT_CHUNK_NUMEL)


def rng() -> str:
    return choice("SPAR_RNG", ("auto", "native", "eager"), "auto")


def cache_dir() -> Path:
    value = os.environ.get("SPAR_CACHE_DIR", "").strip()
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "spar"
