"""Output files that are never half written, and an output folder that one run owns.

* :func:`atomic_write`: a temporary file in the target's folder, flushed to disk, then
  renamed over the target; a crash or a full disk mid-write leaves the old file (or none),
  never a truncated one. Temporary files are named ``.<target>.<random>.tmp``.
* :func:`remove_stale_temps`: delete the temporary files a killed run left behind (call it
  only while holding the folder's :class:`OutputLock`: then no other writer is running).
* :func:`check_writable`: fail at once, with the reason, where the folder cannot be created
  or written (a read-only file system, a path under a file), not after the first epoch.
* :class:`OutputLock`: an exclusive ``flock`` on ``<folder>/.spar.lock``; a second run on
  the same folder is refused with the holder's process id and command line. The kernel
  releases the lock when the holder dies (even by ``kill -9``): no stale lock to clean.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".spar.lock"


def _umask() -> int:
    """The process's umask, read without changing it (``/proc``), else by setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """``with atomic_open(path) as f: f.write(...)``: the file appears at ``path`` complete,
    or not at all (the previous content stays) when the block raises."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:  # owns fd from here: closed on every path
            # mkstemp makes the file private (0600): give it the mode open() would have
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[IO[bytes]], None]) -> Path:
    """Write ``data`` (bytes, text as UTF-8, or a function that writes to a binary file)
    to ``path`` atomically (see :func:`atomic_open`)."""
    path = Path(path)
    with atomic_open(path) as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode() if isinstance(data, str) else data)
    return path


def remove_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files of :func:`atomic_open` in ``folder``; return their names."""
    removed = []
    for p in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p.name)
    return sorted(removed)


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (with parents) and write and delete a file in it; raise
    ``PermissionError``/``OSError`` subclasses as ``OSError`` with a one-line reason."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test.", suffix=TEMP_SUFFIX, dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(folder) else ""
        raise OSError(e.errno, f"{folder} is not writable: {e.strerror}{where}") from None
    return folder


class OutputBusyError(RuntimeError):
    """Another process holds the output folder's lock."""


class OutputLock:
    """Exclusive lock on an output folder for the life of a run (see the module docstring).

    ``with OutputLock(folder): ...``; raises :class:`OutputBusyError` naming the holder.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputBusyError(
                f"{self.path.parent} is in use by another run (process {holder}); "
                "wait for it or choose another --out"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}: {' '.join(sys.argv)}\n".encode(), 0)
        except OSError:  # a full disk: the lock holds, only the holder's name is missing
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            # empty the holder line before unlocking: a reader never names a finished run
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
