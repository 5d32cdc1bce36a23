"""Checkpoint files and resource telemetry."""

from __future__ import annotations

import time

import pytest
import torch

from spar.checkpoint import (
    CheckpointError,
    checksum,
    load_checkpoint,
    previous_path,
    save_checkpoint,
)
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
    assert load_checkpoint(previous_path(path))["step"] == 7  # the replaced file, kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.prev.pt", "ckpt.pt"]  # no temp
    save_checkpoint(path, {"step": 9}, keep_previous=False)
    assert load_checkpoint(previous_path(path))["step"] == 7


def test_checksum_covers_values_keys_and_structure():
    base = {"w": torch.arange(6.0).view(2, 3), "epoch": 1, "grid": [2, 1]}
    digest = checksum(base)
    assert checksum({**base}) == digest
    for changed in (
        {**base, "w": torch.arange(6.0).view(3, 2)},  # same bytes, other shape
        {**base, "w": torch.arange(6.0).view(2, 3).double()},  # other dtype
        {**base, "epoch": 2},
        {**base, "grid": (2, 1)},
        {"epoch": 1, "w": base["w"], "grid": [2, 1]},  # key order is part of the content
    ):
        assert checksum(changed) != digest
    assert checksum({**base, "sha256": "anything"}) == digest  # its own entry is left out


def test_version_1_files_still_load(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": "spar-checkpoint", "version": 1, "epoch": 3}, path)
    assert load_checkpoint(path)["epoch"] == 3
    torch.save({"format": "spar-checkpoint", "version": 9}, path)
    with pytest.raises(CheckpointError, match="version 9; this spar reads 1 and 2"):
        load_checkpoint(path)


def test_failed_write_keeps_old_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, {"step": 2, "bad": Unpicklable()})
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary, no .prev


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
