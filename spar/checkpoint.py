"""Checkpoints: atomic writes, a checksum, the previous good file kept, safe loads.

A checkpoint is a dict of tensors and plain containers with a format marker. It holds
everything a run needs to continue bit-identically (invariant I5): model (including the
Monte Carlo step counter, which keys the noise), optimizer, and the states of the data
and augmentation generators. Parameters are replicated on every rank, so a checkpoint
written on one grid shape loads on any other.

Nothing is lost and nothing wrong is accepted silently:

- the file is written atomically (temporary file, ``fsync``, rename): a crash or a full disk
  mid-write leaves the previous file intact;
- it stores a SHA-256 of its content (every tensor's bytes, dtype and shape, and every key
  and plain value), verified on load: flipped bytes are refused, not trained on;
- before a new file replaces ``checkpoint.pt``, the old one is kept as
  ``checkpoint.prev.pt`` (:func:`previous_path`), so a file that later turns out bad never
  was the only copy;
- loads unpickle only tensors and plain containers (``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from spar._fs import atomic_open

FORMAT = "spar-checkpoint"
VERSION = 2  # 2: with "sha256"; version 1 files (no checksum) are still read


class CheckpointError(ValueError):
    """The file is not a readable spar checkpoint."""


def previous_path(path: str | os.PathLike) -> Path:
    """Where :func:`save_checkpoint` keeps the file it replaces: ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _digest(obj: Any, h) -> None:
    """Feed ``obj`` (nested dicts, lists, tuples, tensors, plain values) into ``h`` in a
    canonical order: type tags, keys, dtype and shape and bytes of each tensor."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            h.update(f"K{k!r}".encode())
            _digest(v, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{type(obj).__name__}{len(obj)}".encode())
        for v in obj:
            _digest(v, h)
    else:
        h.update(f"V{obj!r}".encode())


def checksum(state: dict[str, Any]) -> str:
    """SHA-256 (hex) of a checkpoint's content, without its own ``"sha256"`` entry."""
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != "sha256"}, h)
    return h.hexdigest()


def save_checkpoint(
    path: str | os.PathLike, state: dict[str, Any], *, keep_previous: bool = True
) -> Path:
    """Write ``state`` to ``path`` atomically, with its checksum.

    With ``keep_previous`` an existing ``path`` is first copied (atomically too) to
    :func:`previous_path`; both files are complete at every moment. Pass ``False`` when the
    file at ``path`` is known to be bad (it would push the good previous one out).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **state}
    payload["sha256"] = checksum(payload)
    with atomic_open(path) as f:
        try:
            torch.save(payload, f)
        except RuntimeError as e:
            # torch's zip writer turns a failed write (a full disk) into an "enforce fail"
            # raised while it cleans up: give the caller the OSError that caused it
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
        if keep_previous and path.is_file():
            with atomic_open(previous_path(path)) as prev, open(path, "rb") as cur:
                shutil.copyfileobj(cur, prev, 1 << 20)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` and verify its checksum; only
    tensors and plain containers are unpickled (``weights_only=True``). Raises
    :class:`CheckpointError` with a one-line reason for a missing, foreign or damaged file."""
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
    version = state.get("version")
    if version not in (1, VERSION):
        raise CheckpointError(
            f"{path} has checkpoint version {version}; this spar reads 1 and {VERSION}"
        )
    if version >= 2 and state.get("sha256") != checksum(state):
        raise CheckpointError(
            f"{path} is damaged: its content does not match its checksum (SHA-256)"
        )
    return state
