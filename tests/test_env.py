"""Every SPAR_* variable is parsed in spar._env: defaults, case, and errors that name the
variable and its valid values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spar import _env

CHOICES = [
    (_env.backend, "SPAR_BACKEND", "auto", "Triton", "triton"),
    (_env.linear_path, "SPAR_LINEAR_PATH", "auto", " Fused ", "fused"),
    (_env.rng, "SPAR_RNG", "auto", "EAGER", "eager"),
]


@pytest.mark.parametrize(("read", "name", "default", "raw", "value"), CHOICES)
def test_choices(monkeypatch, read, name, default, raw, value):
    monkeypatch.delenv(name, raising=False)
    assert read() == default
    monkeypatch.setenv(name, "")
    assert read() == default
    monkeypatch.setenv(name, raw)
    assert read() == value
    monkeypatch.setenv(name, "yes please")
    with pytest.raises(ValueError, match=f"{name} must be one of .*; got 'yes please'"):
        read()


def test_chunk_numel(monkeypatch):
    monkeypatch.delenv("SPAR_CHUNK_NUMEL", raising=False)
    assert _env.chunk_numel() == _env.DEFAULT_CHUNK_NUMEL
    monkeypatch.setenv("SPAR_CHUNK_NUMEL", "4096")
    assert _env.chunk_numel() == 4096
    for bad in ("0", "-3", "2M", "1.5"):
        monkeypatch.setenv("SPAR_CHUNK_NUMEL", bad)
        with pytest.raises(ValueError, match="SPAR_CHUNK_NUMEL must be an integer >= 1"):
            _env.chunk_numel()


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("SPAR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _env.cache_dir() == tmp_path / "spar"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert _env.cache_dir() == Path.home() / ".cache" / "spar"
    monkeypatch.setenv("SPAR_CACHE_DIR", str(tmp_path / "c"))
    assert _env.cache_dir() == tmp_path / "c"


def test_nothing_else_reads_spar_variables():
    """Outside spar/_env.py no module reads a SPAR_* variable from the environment."""
    root = Path(__file__).resolve().parents[1] / "spar"
    pattern = re.compile(r"environ(\.get)?[\[(]\s*['\"]SPAR_")
    offenders = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if p.name != "_env.py" and pattern.search(p.read_text())
    ]
    assert offenders == []
