"""The primitive registry: explicit requests raise with the reason, a backend without a
primitive falls back to torch, and SPAR_BACKEND is validated."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from spar.ops import dispatch

CPU = torch.device("cpu")


def test_auto_uses_torch_on_cpu(monkeypatch):
    monkeypatch.setenv("SPAR_BACKEND", "auto")
    for p in dispatch.PRIMITIVES:
        assert dispatch.backend_for(p, CPU) == "torch"
        assert callable(dispatch.resolve(p, CPU))


def test_torch_implements_every_primitive():
    assert dispatch.implemented("torch") == dispatch.PRIMITIVES


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("SPAR_BACKEND", "tpu")
    with pytest.raises(ValueError, match="SPAR_BACKEND must be one of auto, torch, triton, cuda"):
        dispatch.resolve("sampled_linear", CPU)


def test_unavailable_backend_raises_with_reason(monkeypatch):
    monkeypatch.setenv("SPAR_BACKEND", "cuda")
    with pytest.raises(dispatch.BackendUnavailable, match="SPAR_BACKEND=cuda cannot run"):
        dispatch.resolve("sampled_linear", CPU)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_missing_primitive_falls_back_to_torch(monkeypatch):
    """The Triton backend has no convolution kernel: under SPAR_BACKEND=triton the
    convolution samples on torch, while its per-example noise runs on Triton."""
    monkeypatch.setenv("SPAR_BACKEND", "triton")
    assert "sampled_conv" not in dispatch.implemented("triton")
    assert dispatch.backend_for("sampled_conv", CPU) == "torch"
    assert dispatch.backend_for("sign_mul", CPU) == "triton"


def test_register_rejects_unknown_names():
    with pytest.raises(ValueError, match="primitive must be one of"):
        dispatch.register("attention", "torch", lambda: None)
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.register("normal", "tpu", lambda: None)
