"""Multi-process harness for the distributed tests (real gloo groups on loopback).

``run_workers(func, world, launch=..., **kwargs)`` starts ``world`` fresh Python processes,
each running ``func(ctx)`` from the calling test file (``ctx`` holds ``rank``, ``world``,
``init_method`` (a ``file://`` rendezvous), ``job_dir`` and ``kwargs``), and returns the
per-rank results. ``launch`` sets the environment a launcher would: ``"torchrun"`` (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), ``"slurm"`` (SLURM_PROCID, SLURM_NTASKS, ...) or
``None``. A rank that raises fails the test with every rank's traceback; a job that runs
past ``timeout`` is killed and fails the test: nothing can hang the suite.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

_RUNNER = Path(__file__).with_name("_worker_main.py")
_LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "TORCHELASTIC_RUN_ID",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class RankError(Exception):
    """A rank raised; ``errors`` maps rank -> traceback text."""

    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        super().__init__("\n".join(f"--- rank {r} ---\n{e}" for r, e in sorted(errors.items())))


def _run(
    tmp_path: Path,
    caller_file: str,
    func: str,
    world: int,
    *,
    launch: str | None,
    timeout: float,
    allow_errors: bool,
    kwargs: dict,
) -> list:
    job_dir = tmp_path / f"job_{func}_{world}_{time.monotonic_ns()}"
    job_dir.mkdir()
    spec = {"file": caller_file, "func": func, "world": world, "kwargs": kwargs}
    spec["dump_after"] = max(1.0, timeout - 5.0)
    torch.save(spec, job_dir / "spec.pt")
    port = _free_port()
    base = {
        k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("SLURM_")
    }
    base.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = []
    for rank in range(world):
        env = dict(base)
        if launch == "torchrun":
            env.update(
                RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        elif launch == "slurm":
            env.update(
                SLURM_PROCID=str(rank),
                SLURM_NTASKS=str(world),
                SLURM_STEP_NUM_TASKS=str(world),
                SLURM_LOCALID=str(rank),
                SLURM_JOB_NODELIST="127.0.0.[1-4]",
                SLURM_JOB_ID="4242",
                MASTER_PORT=str(port),
            )
        elif launch is not None:
            raise ValueError(f"unknown launch {launch!r}")
        out = open(job_dir / f"log_{rank}.txt", "wb")  # closed in the finally below
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(_RUNNER), str(job_dir), str(rank)],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                ),
                out,
            )
        )
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p, _ in procs):
            if time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- rank {r} log ---\n{_tail(job_dir / f'log_{r}.txt')}" for r in range(world)
                )
                pytest.fail(
                    f"distributed job {func} (world {world}) ran past {timeout} s; killed\n{logs}"
                )
            time.sleep(0.05)
    finally:
        for p, out in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            out.close()
    results, errors = [], {}
    for rank in range(world):
        path = job_dir / f"result_{rank}.pt"
        if not path.exists():
            errors[rank] = f"no result (exit code {procs[rank][0].returncode}); log:\n" + _tail(
                job_dir / f"log_{rank}.txt"
            )
            results.append(None)
            continue
        res = torch.load(path, weights_only=False)
        if res["ok"]:
            results.append(res["value"])
        else:
            errors[rank] = res["error"]
            results.append(RankError({rank: res["error"]}))
    if errors and not allow_errors:
        pytest.fail(
            f"distributed job {func} (world {world}) failed:\n{RankError(errors)}", pytrace=False
        )
    return results


@pytest.fixture
def run_workers(tmp_path, request):
    """``run_workers(func_name, world, *, launch=None, timeout=120, allow_errors=False,
    **kwargs) -> list`` (one entry per rank; a ``RankError`` where a rank raised and
    ``allow_errors`` is set)."""
    caller = request.module.__file__  # worker functions live in the requesting test module

    def run(
        func: str,
        world: int,
        *,
        launch: str | None = None,
        timeout: float = 120.0,
        allow_errors: bool = False,
        file: str | None = None,
        **kwargs,
    ):
        return _run(
            tmp_path,
            file or caller,
            func,
            world,
            launch=launch,
            timeout=timeout,
            allow_errors=allow_errors,
            kwargs=kwargs,
        )

    return run
