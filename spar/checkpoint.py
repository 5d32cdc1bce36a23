"""Checkpoints: atomic writes, safe loads (``weights_only=True``), clear errors.

A checkpoint is a dict of tensors and plain containers with a format marker. It holds
everything a run needs to continue bit-identically (invariant I5): model (including the
Monte Carlo step counter, which keys the noise), optimizer, and the states of the data
and augmentation generators. Parameters are replicated on every rank, so a checkpoint
written on one grid shape loads on any other.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "spar-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """The file is not a readable spar checkpoint."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, flushed
    to disk, then renamed over the target. A crash mid-write leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; only tensors and plain
    containers are unpickled (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        # torch's messages run to pages: keep the first sentence
        reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {reason})"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a spar checkpoint (no '{FORMAT}' marker)")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {state.get('version')}; this spar reads {VERSION}"
        )
    return state
