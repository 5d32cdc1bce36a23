"""Checkpoint files and resource telemetry."""

from __future__ import annotations

import time

import pytest
import torch

from spar.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from spar.telemetry import Telemetry, nvml_devices, rss_bytes


def test_roundtrip_and_atomic_replace(tmp_path):
    path = tmp_path / "ckpt.pt"
    g = torch.Generator().manual_seed(3)
    save_checkpoint(path, {"w": torch.arange(4.0), "gen": g.get_state(), "step": 7})
    state = load_checkpoint(path)
    assert state["step"] == 7 and torch.equal(state["w"], torch.arange(4.0))
    g2 = torch.Generator()
    g2.set_state(state["gen"])
    assert torch.equal(torch.rand(3, generator=g2), torch.rand(3, generator=g))
    save_checkpoint(path, {"step": 8})
    assert load_checkpoint(path)["step"] == 8
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary left


def test_failed_write_keeps_old_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, {"step": 2, "bad": Unpicklable()})
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_corrupt_and_foreign_files(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a spar checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_telemetry_sees_rss_growth():
    with Telemetry(interval=0.01) as tel:
        big = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB
        time.sleep(0.05)
    s = tel.summary()
    assert s.samples >= 2 and s.seconds > 0
    assert s.peak_rss >= rss_bytes() - 1 and s.peak_rss > big.numel() * 4
    assert s.peak_gpu_memory is None  # no GPU asked for


def test_nvml_reports_a_reason_without_gpu():
    devices, reason = nvml_devices()
    if devices:  # on a GPU machine the list is real
        assert all(d["memory_total"] > 0 for d in devices)
    else:
        assert isinstance(reason, str) and reason
