"""Run a function on N local processes as if launched by ``torchrun`` (CPU/gloo testing,
benchmarks, notebooks).

Each child gets torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), so the function calls :func:`spar.distributed.init`
exactly as in a real job. The function must be importable by the children (defined at
module level; in a script, guard the call with ``if __name__ == "__main__":``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["free_port", "spawn"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        result = fn(*args)
    except BaseException:  # report everything, including KeyboardInterrupt, to the parent
        queue.put((rank, False, traceback.format_exc()))
        raise
    try:
        # by value, with the plain pickler: the queue's own would send a tensor as a handle
        # to this process's shared memory, which is gone once the child exits
        payload = pickle.dumps(result)
    except Exception as e:  # noqa: BLE001 - whatever pickling raises, the parent hears of it
        queue.put((rank, False, f"its result cannot be sent back ({type(e).__name__}: {e})"))
        return
    queue.put((rank, True, payload))


def spawn(
    fn: Callable[..., Any],
    nprocs: int,
    args: tuple = (),
    *,
    timeout: float = 600.0,
    start_method: str = "spawn",
    preload: Sequence[str] = (),
) -> list[Any]:
    """Run ``fn(*args)`` on ``nprocs`` fresh processes; return their results by rank.

    Results travel back pickled by value (tensors included). Raises ``RuntimeError`` with
    every failing rank's traceback if any rank raises or returns something that cannot be
    pickled, and terminates all children if they do not finish within ``timeout`` seconds.

    ``start_method="forkserver"`` forks every rank from a server process that imported the
    modules in ``preload`` (by name, e.g. ``("torch", "spar")``) once: still fresh
    processes (new process groups, clean memory peaks), without importing torch in every
    rank of every call (seconds each), for scripts that spawn many small jobs.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    if start_method not in ("spawn", "forkserver"):
        raise ValueError(f"start_method must be 'spawn' or 'forkserver', got {start_method!r}")
    if preload and start_method != "forkserver":
        raise ValueError("preload needs start_method='forkserver'")
    ctx = mp.get_context(start_method)
    if preload:
        ctx.set_forkserver_preload(list(preload))
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, r, nprocs, port, args, queue), daemon=True)
        for r in range(nprocs)
    ]
    for p in procs:
        p.start()
    results: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < nprocs:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"spawned ranks did not finish within {timeout} s")
            try:
                rank, ok, value = queue.get(timeout=min(left, 1.0))
                results[rank] = (ok, pickle.loads(value) if ok else value)
                if not ok:
                    break  # the others may now be stuck in a collective: stop them below
            except queue_module.Empty:  # check whether a child died without reporting
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and all(r not in results for r in dead):
                    raise RuntimeError(f"rank(s) {dead} exited without a result") from None
    finally:
        for p in procs:
            p.join(timeout=1.0 if len(results) < nprocs else 30.0)
            if p.is_alive():
                p.terminate()
                p.join()
    errors = {r: v for r, (ok, v) in results.items() if not ok}
    if errors:
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise RuntimeError(f"{len(errors)} rank(s) failed:\n{text}")
    return [results[r][1] for r in range(nprocs)]
