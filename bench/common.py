"""Helpers shared by the scripts in ``bench/``: environment fields of a result row, CSV
append/read, environment variables set for a block, CPU timing statistics, the load other
processes put on the machine, and CPU peak-memory probes.

Nothing here knows about a particular benchmark; each script builds its own rows
(``env_info() | {...}``), appends them with :func:`append_rows` and draws its plot from
the CSV with :func:`read_rows`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import hashlib
import importlib.metadata
import os
import platform
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- environment


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), falling back to ``platform.processor()``."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    match = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else (platform.processor() or "unknown")


def package_version(dist: str) -> str:
    """Installed version of distribution ``dist`` (e.g. ``"torch-blue"``), or ``""``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def source_digest(package_dir: str | Path = _REPO_ROOT / "spar") -> str:
    """Short SHA-256 over the ``*.py`` files of a source tree: identifies the code that was
    measured when the working tree is not a clean commit."""
    h = hashlib.sha256()
    root = Path(package_dir)
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def device_name(device: torch.device | str | None = None) -> str:
    """What a row was measured on: the GPU's name for a CUDA device, else the CPU model."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return cpu_model()


def env_info(
    packages: Mapping[str, str] | None = None, device: torch.device | str | None = None
) -> dict[str, str]:
    """Fields every result row carries: UTC date, host, hardware, thread count and versions.

    ``packages`` maps a column name to a distribution name, e.g.
    ``{"torch_blue": "torch-blue"}``; its version is recorded under that column. With
    ``device``, ``device_name`` is what the row was measured on (:func:`device_name`) and
    ``gpu`` the name of that GPU (else of GPU 0, where there is one).
    """
    import spar  # imported here so that the helpers above work without spar installed

    dev = None if device is None else torch.device(device)
    on_cuda = dev is not None and dev.type == "cuda" and torch.cuda.is_available()
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "gpu": (
            torch.cuda.get_device_name(dev)
            if on_cuda
            else torch.cuda.get_device_name(0)
            if torch.cuda.is_available()
            else ""
        ),
        "threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "spar": spar.__version__,
        "spar_src": source_digest(),
    }
    if dev is not None:
        info["device_name"] = device_name(dev)
        info["cuda"] = torch.version.cuda or ""
    info.update({col: package_version(dist) for col, dist in (packages or {}).items()})
    return info


def _setenv(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextmanager
def environ(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set environment variables for the block (``None``: unset) and restore them after,
    e.g. ``with environ({"SPAR_BACKEND": "torch"}): ...`` (spar reads its variables when
    an op runs, so the block must hold the calls, backward included)."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            _setenv(name, value)
        yield
    finally:
        for name, value in saved.items():
            _setenv(name, value)


# --------------------------------------------------------------------------- CSV


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """All rows of a result CSV (``[]`` when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_rows(path: str | Path, rows: Sequence[Mapping[str, object]]) -> None:
    """Append ``rows`` to a CSV, writing the header for a new file. When the rows bring
    columns the file lacks, the file is rewritten with the union of the columns (old rows
    get empty cells), so results of older script versions are kept."""
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = read_rows(path)
    fields = list(old[0].keys()) if old else []
    for row in rows:
        fields += [k for k in row if k not in fields]
    if old and list(old[0].keys()) != fields:
        rewrite, mode = old, "w"
    else:
        rewrite, mode = [], ("a" if old else "w")
    with path.open(mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        if mode == "w":
            writer.writeheader()
        writer.writerows(rewrite)
        writer.writerows(rows)


# --------------------------------------------------------------------------- timing


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_counters() -> tuple[float, float, float] | None:
    """(wall s, CPU-seconds all processes spent busy machine-wide, CPU-seconds of this
    process), or None where ``/proc/stat`` is missing."""
    try:
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(vals) - vals[3] - vals[4]  # all but idle and iowait; steal counts as busy
    t = os.times()
    return time.perf_counter(), busy / _HZ, t.user + t.system


def _others_share(c0: tuple | None, c1: tuple | None) -> float:
    """Share of the machine's CPUs used by other processes (or the hypervisor) between two
    ``_cpu_counters`` readings; 0 where unknown. Resolution is one clock tick (10 ms)."""
    if c0 is None or c1 is None or c1[0] <= c0[0]:
        return 0.0
    others = (c1[1] - c0[1]) - (c1[2] - c0[2])
    return min(1.0, max(0.0, others / ((c1[0] - c0[0]) * (os.cpu_count() or 1))))


@contextmanager
def others_cpu() -> Iterator[Callable[[], float]]:
    """``with others_cpu() as others: ...``; after the block ``others()`` is the share of
    the machine's CPUs that other processes (or the hypervisor) used during it (0 to 1; 0
    where unknown), the ``others`` of :class:`Stats` for a block timed some other way."""
    c0, end = _cpu_counters(), []
    try:
        yield lambda: _others_share(c0, end[0] if end else _cpu_counters())
    finally:
        end.append(_cpu_counters())


def wait_for_quiet(below: float = 0.1, timeout: float = 30.0, probe: float = 0.5) -> float:
    """Sleep until other processes use less than ``below`` of the machine's CPUs over a
    ``probe`` window, or ``timeout`` seconds passed; returns the seconds waited. Useful on
    shared machines where neighbours' jobs come and go."""
    t0 = time.perf_counter()
    while True:
        c0 = _cpu_counters()
        time.sleep(probe)
        if c0 is None or _others_share(c0, _cpu_counters()) < below:
            break
        if time.perf_counter() - t0 > timeout:
            break
    return time.perf_counter() - t0


@dataclass(frozen=True)
class Stats:
    """Summary of repeated wall-clock measurements, in milliseconds. ``others`` is the mean
    share of the machine's CPUs that other processes used while they ran (0 to 1);
    ``dropped`` counts measurements discarded because the machine was busy."""

    median: float
    iqr: float
    min: float
    n: int
    others: float = 0.0
    dropped: int = 0

    @classmethod
    def from_seconds(
        cls, times: Iterable[float], others: Iterable[float] = (), dropped: int = 0
    ) -> Stats:
        # torch, not numpy: the GPU machine may have spar without its optional deps
        t = torch.tensor(list(times), dtype=torch.float64) * 1e3
        q1, med, q3 = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        o = list(others)
        return cls(
            median=float(med),
            iqr=float(q3 - q1),
            min=float(t.min()),
            n=int(t.numel()),
            others=float(sum(o) / len(o)) if o else 0.0,
            dropped=dropped,
        )


def time_once(
    fn: Callable[[], object], setup: Callable[[], object] | None = None
) -> tuple[float, float]:
    """One call of ``fn`` (after ``setup``, untimed) with the garbage collector off, like
    ``timeit``: returns (seconds, share of the CPUs other processes used meanwhile). CPU
    only: nothing here synchronizes a device."""
    if setup is not None:
        setup()
    enabled = gc.isenabled()
    gc.disable()
    try:
        c0 = _cpu_counters()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        return dt, _others_share(c0, _cpu_counters())
    finally:
        if enabled:
            gc.enable()


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    rounds: int,
    setup: Mapping[str, Callable[[], object]] | None = None,
    busy_above: float | None = None,
    max_wait: float = 120.0,
) -> dict[str, Stats]:
    """Time several candidates round-robin: each round calls every candidate once, in an
    order rotated from round to round, so that on a machine whose speed drifts (turbo,
    neighbours taking a core) every candidate samples the same conditions.

    With ``busy_above`` (a share of the CPUs, e.g. 0.15), the machine counts as busy when
    other processes use more than that: each round first waits for a quiet machine, and a
    round during which the machine was busy is dropped and run again. Waiting and
    retrying stop after ``max_wait`` seconds in all; the rounds still missing are then kept
    busy or not (``Stats.others`` tells), so the call always ends.
    """
    names = list(fns)
    setup = setup or {}
    kept: list[list[tuple[float, float]]] = []
    dropped: list[list[tuple[float, float]]] = []
    t_end = time.perf_counter() + max_wait
    r = 0
    while len(kept) < rounds:
        gate = busy_above is not None and time.perf_counter() < t_end
        if gate:
            wait_for_quiet(busy_above, timeout=max(0.0, t_end - time.perf_counter()))
        k = r % len(names)
        r += 1
        order = names[k:] + names[:k]
        c0 = _cpu_counters()
        calls = {name: time_once(fns[name], setup.get(name)) for name in order}
        row = [calls[name] for name in names]
        # judged over the whole round: /proc/stat ticks are 10 ms, too coarse for one short call
        busy = gate and _others_share(c0, _cpu_counters()) > busy_above
        (dropped if busy else kept).append(row)
    return {
        name: Stats.from_seconds(
            (row[i][0] for row in kept), (row[i][1] for row in kept), dropped=len(dropped)
        )
        for i, name in enumerate(names)
    }


# --------------------------------------------------------------------------- CPU memory


def cpu_tensor_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of live CPU tensor memory allocated during ``fn()``, above what was live when it
    started, from the allocation/free events of ``torch.profiler`` (``profile_memory``).

    Every CPU allocation through torch's allocator is seen, including temporaries freed
    inside an op and buffers of ``torch.compile``d code; Python objects and allocator slack
    are not. The count is byte-exact and independent of the OS and of malloc's caching.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())  # stable: same-time events keep their order
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _proc_status_kb(field: str) -> int:
    text = Path(f"/proc/{os.getpid()}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, flags=re.MULTILINE).group(1))


def rss_peak_growth_bytes(fn: Callable[[], object]) -> int | None:
    """Growth of the process's peak resident set during ``fn()``: ``VmHWM`` after the call
    minus ``VmRSS`` before it, with the high-water mark reset first (``clear_refs``).

    Linux only (``None`` elsewhere). Counts everything the process touches (allocator slack,
    thread stacks, Python objects), so it bounds the tensor peak from above; run it in a
    fresh process, since pages the allocator kept from earlier work hide new growth.
    """
    try:
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")
        before = _proc_status_kb("VmRSS")
    except (OSError, AttributeError):
        return None
    fn()
    return max(0, _proc_status_kb("VmHWM") - before) * 1024
