"""Which elastic job and attempt this rank belongs to, and the watchdog that ends a job
whose training stopped making progress (:class:`StallWatch`), naming the rank that
stalled and where. Used by :mod:`spar.train`; private."""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import signal
import socket
import sys
import threading
import time

import torch.distributed as dist

from spar.distributed import detect_launch_env


def job_id() -> str | None:
    """The launcher's id of this job (the same in every rank and across elastic restarts):
    spar's own launcher makes a fresh one per run; torchrun takes ``--rdzv-id`` (random with
    ``--standalone``)."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


class StallWatch:
    """Ends the job when training stops making progress, and says which rank stalled where.

    The training loop calls :meth:`beat` when a step starts loading its batch and when it
    starts computing (and around the slower work at the end of an epoch, with ``allow``).
    Each beat publishes this rank's ``(epoch, step, phase)`` in the launcher's key-value
    store, and a daemon thread bumps this rank's heartbeat counter there twice a second. The
    same thread checks the time since the last beat: past the limit, it names the stalled
    rank (one whose heartbeat stopped: a stopped process; else the one furthest behind: a
    stuck data loader) and the step it did not finish, in one line; stops that rank when it
    runs on this machine (a stopped process would hold the launcher for its grace period);
    and exits with code 124.

    The limit of a step is ``timeout`` when given, else ``max(min_limit, factor x the
    slowest step so far)``: measured, so a slow model does not trip it and a fast one does
    not wait minutes. Until a step has been measured (the first one compiles and warms up),
    and around epoch ends (``allow`` of :meth:`beat`), it is at least ``startup``.
    """

    PHASES = ("loading its batch", "computing")

    def __init__(
        self,
        rank: int,
        timeout: float | None,
        startup: float,
        *,
        factor: float = 20.0,
        min_limit: float = 60.0,
    ) -> None:
        self.rank, self.timeout, self.startup = rank, timeout, startup
        self.factor, self.min_limit = factor, min_limit
        self.slowest = 0.0
        self.where = (0, 0, 0)
        self.step_start = self.last = time.monotonic()
        self.deadline = math.inf
        self._stop = threading.Event()
        self._store = None
        env = detect_launch_env()
        if env.source != "local" and env.master_addr and env.master_port:
            # a client of the launcher's store (torchrun's agent, or rank 0); without one
            # the watch still ends the job, it only cannot name the stalled rank
            with contextlib.suppress(Exception):
                self._store = dist.TCPStore(
                    env.master_addr, env.master_port, env.world_size, is_master=False,
                    timeout=datetime.timedelta(seconds=10),
                )  # fmt: skip
            self._world = env.world_size
            self._prefix = f"spar/watch/{job_id()}/{restart_count()}/"
        self._thread = threading.Thread(target=self._run, name="spar-stallwatch", daemon=True)

    def limit(self) -> float:
        """Seconds a step may take now."""
        if not self.slowest:
            return max(self.startup, self.timeout or 0.0)
        if self.timeout is not None:
            return self.timeout
        return max(self.min_limit, self.factor * self.slowest)

    def beat(self, epoch: int, step: int, phase: int = 0, *, allow: float | None = None) -> None:
        """This rank is at ``step`` (from 0) of ``epoch`` (from 0), in ``PHASES[phase]``; the
        next beat is due within ``allow`` seconds (default: :meth:`limit`)."""
        now = time.monotonic()
        if phase == 0:  # a step starts (or, with step -1, an epoch): the previous one ended
            if step > 0 and self.where[:2] == (epoch, step - 1):
                self.slowest = max(self.slowest, now - self.step_start)
            self.step_start = now
        self.where, self.last = (epoch, step, phase), now
        self.deadline = now + (self.limit() if allow is None else allow)
        if self._store is not None:
            info = f"{epoch} {step} {phase} {socket.gethostname()} {os.getpid()}"
            with contextlib.suppress(Exception):  # monitoring must not fail the training
                self._store.set(f"{self._prefix}at/{self.rank}", info)

    def __enter__(self) -> StallWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            if self._store is not None:
                with contextlib.suppress(Exception):  # the store's host is gone: no heartbeat
                    self._store.add(f"{self._prefix}alive/{self.rank}", 1)
            if time.monotonic() > self.deadline:
                self._fire()

    def _fire(self) -> None:
        epoch, step, phase = self.where
        line = (f"no progress for {time.monotonic() - self.last:.0f} s "
                f"(limit {self.limit():.0f} s, --timeout)")  # fmt: skip
        stalled = self._stalled()
        if stalled is None:
            line += f"; this rank waits in epoch {epoch + 1}, step {step + 1}"
        else:
            r, (e, s_, ph, host, pid), stopped = stalled
            who = "this rank" if r == self.rank else f"rank {r}"
            how = "stopped" if stopped else "stuck"
            line += f"; {who} {how} in epoch {e + 1}, step {s_ + 1}, {self.PHASES[ph]}"
            if stopped and r != self.rank and host == socket.gethostname():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        print(f"spar train: rank {self.rank}: {line}; stopping", file=sys.stderr, flush=True)
        os._exit(124)

    def _stalled(self):
        """``(rank, (epoch, step, phase, host, pid), stopped)`` of the stalled rank: one whose
        heartbeat does not move, else the one furthest behind; ``None`` if it cannot tell."""
        if self._store is None:
            return None

        def read(key: str) -> dict:
            out = {}
            for r in range(self._world):
                name = f"{self._prefix}{key}/{r}"
                with contextlib.suppress(Exception):  # the store is gone
                    # check first: get() of a key not set yet waits out the store's timeout
                    if self._store.check([name]):
                        out[r] = self._store.get(name).decode()
            return out

        at = {r: v.split() for r, v in read("at").items()}
        at = {r: (int(e), int(s), int(p), host, int(pid)) for r, (e, s, p, host, pid) in at.items()}
        alive = read("alive")
        time.sleep(1.5)  # three heartbeats
        # (this thread is this rank's heartbeat, and it is busy here: this rank is alive)
        frozen = [r for r, n in read("alive").items() if alive.get(r) == n and r != self.rank]
        if frozen and frozen[0] in at:
            return frozen[0], at[frozen[0]], True
        if len({v[:3] for v in at.values()}) > 1:
            r = min(at, key=lambda k: at[k][:3])
            return r, at[r], False
        return None
