"""Every ``SPAR_*`` environment variable spar reads, parsed in one place.

Each accessor reads its variable when called (tests and users may change the environment
between calls) and raises ``ValueError`` naming the variable and its valid values for
anything else. Boolean-like switches accept ``auto`` (where it exists), ``1/true/on/yes``
and ``0/false/off/no``, case-insensitively; nothing else.

| variable | values (default first) | read by |
| --- | --- | --- |
| ``SPAR_BACKEND`` | ``auto``, ``torch``, ``triton``, ``cuda`` | :mod:`spar.ops.dispatch` |
| ``SPAR_LINEAR_PATH`` | ``auto``, ``fused``, ``chunked`` | the Triton linear primitive |
| ``SPAR_CHUNK_NUMEL`` | weight elements per sample chunk, an int >= 1 (``2097152``) | torch backend, Triton chunked path |
| ``SPAR_RNG_COMPILE`` | ``auto``, on, off | :mod:`spar.rng` (CPU noise loop) |
"""

from __future__ import annotations

import os

_ON = ("1", "true", "on", "yes")
_OFF = ("0", "false", "off", "no")

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


def switch(name: str, *, default: str = "auto") -> str:
    """A tri-state switch: ``"auto"``, ``"on"`` or ``"off"``."""
    value = _raw(name)
    if not value or value == "auto":
        return default
    if value in _ON:
        return "on"
    if value in _OFF:
        return "off"
    valid = "auto, " + "/".join(_ON) + ", " + "/".join(_OFF)
    raise ValueError(f"{name} must be one of {valid}; got {value!r}")


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


def rng_compile() -> str:
    return switch("SPAR_RNG_COMPILE")
