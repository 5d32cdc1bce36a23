"""The backend registry: explicit requests raise with the reason, auto falls back."""

from __future__ import annotations

import pytest
import torch

from spar.ops import dispatch


def test_auto_uses_torch_on_cpu(monkeypatch):
    monkeypatch.setenv("SPAR_BACKEND", "auto")
    name, fn = dispatch.resolve("linear", torch.device("cpu"))
    assert name == "torch" and callable(fn)


def test_explicit_torch(monkeypatch):
    monkeypatch.setenv("SPAR_BACKEND", "torch")
    assert dispatch.resolve("conv", torch.device("cpu"))[0] == "torch"


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("SPAR_BACKEND", "tpu")
    with pytest.raises(ValueError, match="SPAR_BACKEND must be one of"):
        dispatch.resolve("linear", torch.device("cpu"))


def test_unavailable_backend_raises_with_reason(monkeypatch):
    monkeypatch.setenv("SPAR_BACKEND", "cuda")
    with pytest.raises(dispatch.BackendUnavailable, match="SPAR_BACKEND=cuda cannot run"):
        dispatch.resolve("linear", torch.device("cpu"))


def test_missing_op_in_a_backend(monkeypatch):
    monkeypatch.setenv("SPAR_BACKEND", "torch")
    with pytest.raises(dispatch.BackendUnavailable, match="no implementation of 'attention'"):
        dispatch.resolve("attention", torch.device("cpu"))
