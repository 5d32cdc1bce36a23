"""Scaling of a Bayesian training step over ranks: weak and strong scaling of ``local``,
``sp``, ``ddp`` and ``hybrid`` grids.

Question: how fast does one training step of a Bayesian model get when its S Monte Carlo
samples (``sp``), its batch (``ddp``) or both (``hybrid``) are split over ranks, and what do
communication and memory cost? This is the end-to-end counterpart of ``bench_comm.py``
(which isolates the gradient all-reduce).

Models (built with ``spar.nn.bayesianize``, mean-field Gaussian, ``reparam`` estimator):

- ``mlp``: 784 -> 512 -> 512 -> 10 (ReLU), ~1.3 M trainable numbers (mu and rho), default
  global batch 64, dataset size 60 000 (MNIST-sized) for the epoch time;
- ``cnn``: conv 3->16, pool, conv 16->32, pool, 2048 -> 128 -> 10 on 3x32x32 inputs,
  ~0.5 M trainable numbers, default global batch 32, dataset size 50 000 (CIFAR-sized);
- ``mlp-tiny`` / ``cnn-tiny``: the same shapes, much narrower (tests and ``--quick``).

At S=8 one step of ``mlp``/``cnn`` takes ~90 / ~170 ms on one thread of the 2-vCPU
development VM while it is quiet (two to three times that while other jobs load it).

One step, as in ``spar/train.py``: ``zero_grad(set_to_none=True)``, ``SampleParallel``
forward, ``spar.losses.elbo`` (mean over samples) with ``spar.nn.kl_divergence``,
``backward()`` (spar's bucketed all-reduce, overlapped), ``Adam.step()``. Data is a fixed
synthetic batch already on the device: data loading is not measured.

Scalings (``--samples S``, ``--batch B`` are the 1-rank values; B is the *global* batch):

- ``weak``: S grows with the ranks (``S * n`` global samples on n ranks, batch B), so the
  work per rank stays ``S * B`` sample-examples in every mode;
- ``strong``: S and B fixed, the same work split over n ranks.

Modes: ``local`` (one process, all samples; the 1-rank baseline of both scalings),
``sp`` (``sample = n``), ``ddp`` (``data = n``: every rank runs all samples on B/n
examples) and ``hybrid`` (``sample = a``, ``data = b``, ``a * b = n``, both > 1: needs
n >= 4; the most square grid with ``a >= b``). A configuration whose S or B does not
divide by its axis is skipped with a message.

Per configuration (each in fresh processes, see "Ranks start" below):

- ``step_ms``: median over ``--steps`` timed steps after warm-up, each step started after a
  barrier and taken as the max over ranks; spread as ``iqr_ms``, ``min_ms``, ``max_ms``.
- ``epoch_s``: ``ceil(dataset_size / B) * step_ms`` (derived, not a measured epoch).
- ``samples_per_s``: Monte Carlo sample-examples per second, ``S * B / step``;
  ``speedup = samples_per_s / samples_per_s(1 rank)`` (for strong scaling this is
  ``t1 / tn``, for weak scaling the scaled speedup ``n * t1 / tn``) and
  ``efficiency = speedup / n`` (ideal 1); ``efficiency_min`` is the same computed from
  the fastest step of each configuration (``min_ms``), less sensitive to a busy machine.
- Exposed communication, two ways:
  ``exposed_comm_ms`` is the Reducer's ``StepTimings.exposed_s`` (median over steps, max
  over ranks): the time the end of backward waited for all-reduces that overlap did not
  hide. ``comm_overhead_ms`` is measured: the median over rounds of
  ``step - compute-only step``, where the compute-only step is the same step under
  ``sp.no_sync()`` (no communication at all), run in the same round (order rotated). The
  second also counts compute slowed down by the communication (on CPU, gloo's threads
  share the cores with the compute) and write-back; a negative value means the
  difference is below the noise. ``comm_ms`` / ``backward_ms`` are the Reducer's
  in-flight communication and backward compute times, ``compute_only_ms`` the median
  compute-only step.
- ``peak_mem_mib``: per-rank peak, max over ranks (``peak_mem_mib_ranks`` lists every
  rank). CPU: the RSS high-water mark (``VmHWM``) of the rank's process after warm-up and
  a few synchronized steps (torch runtime included; ``base_mem_mib`` is the RSS after
  imports, before the model was built, and ``mem_growth_mib`` the largest per-rank
  ``peak - base``: model, optimizer, buckets, activations). Absolute RSS depends on how
  the ranks were started (a forked rank has not touched all library pages: ~230 MiB at
  start vs ~410 MiB spawned); compare it within one start method, or compare the growth.
  GPU: ``torch.cuda.max_memory_allocated`` (``base_mem_mib`` stays the host RSS).
- Machine load: ``loadavg_before`` / ``loadavg_after`` (``/proc/loadavg``) and
  ``others_cpu``, the share of the machine's CPUs that processes other than the ranks
  used during the timed steps. ``oversubscribed`` is True when
  ``ranks * threads > cores`` (CPU) or ranks > visible GPUs: such timings say little.
- ``plan_step_ms`` / ``plan_exposed_comm_ms``: what the cost model
  ``spar.distributed.plan`` predicts for the same grid when it exists (empty otherwise;
  ``plan_note`` says why). Its compute constant is this run's 1-rank step divided by S,
  its link constants are plan's GPU defaults unless ``--plan-gb-s`` /
  ``--plan-latency-us`` are given, so on CPU it shows the ideal split plus an optimistic
  all-reduce: the gap to ``step_ms`` is what the model does not capture here.

Ranks start from a fork server that imported torch and spar once (``--start-method
spawn`` uses ``spar.distributed.spawn`` instead): every configuration gets fresh processes
and new process groups, without re-importing torch in every rank (16 s per process on the
loaded 2-vCPU VM). ``wall_s`` is the wall time of a configuration, start-up included.

CPU: gloo, ``--threads`` compute threads per rank (default ``cores // max(ranks)``, the
same for every rank count, so that one rank stands for one "device"), glibc malloc with
pinned thresholds as in ``bench_comm.py`` (no page-fault churn in steady state). GPU
(``--device cuda``): NCCL, one GPU per rank, rank counts above the visible GPUs skipped.

Usage::

    python bench/bench_scaling.py                        # mlp+cnn, ranks 1 2, all modes
    python bench/bench_scaling.py --quick --model mlp-tiny --ranks 1 2
    python bench/bench_scaling.py --device cuda --ranks 1 2 4 8
    python bench/bench_scaling.py --plot-only            # redraw the PNG from the CSV
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)

import spar  # noqa: E402
import spar.distributed as sd  # noqa: E402

MODES = ("local", "sp", "ddp", "hybrid")
SCALINGS = ("weak", "strong")
_PINNED = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**32)}
_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "mlp" or "cnn"
    width: tuple[int, ...]  # mlp: hidden sizes; cnn: (conv1, conv2, hidden)
    batch: int  # default global batch
    dataset_size: int  # for the epoch time
    classes: int = 10


MODELS = {
    "mlp": ModelSpec("mlp", (512, 512), batch=64, dataset_size=60_000),
    "cnn": ModelSpec("cnn", (16, 32, 128), batch=32, dataset_size=50_000),
    "mlp-tiny": ModelSpec("mlp", (32,), batch=16, dataset_size=1_000),
    "cnn-tiny": ModelSpec("cnn", (4, 8, 16), batch=8, dataset_size=1_000),
}


def input_shape(spec: ModelSpec) -> tuple[int, ...]:
    return (784,) if spec.kind == "mlp" else (3, 32, 32)


def build_model(spec: ModelSpec) -> nn.Module:
    """The deterministic network of ``spec``, made Bayesian by ``spar.nn.bayesianize``."""
    torch.manual_seed(0)
    if spec.kind == "mlp":
        dims = [784, *spec.width]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], spec.classes))
        net = nn.Sequential(*layers)
    else:
        c1, c2, hidden = spec.width
        net = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * 8 * 8, hidden),
            nn.ReLU(),
            nn.Linear(hidden, spec.classes),
        )
    return spar.nn.bayesianize(net)


# --------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Config:
    model: str
    mode: str
    scaling: str  # "weak", "strong", or "baseline" (the 1-rank local run of both)
    ranks: int
    sample_axis: int
    data_axis: int
    samples: int  # global S
    batch: int  # global B
    threads: int
    device: str = "cpu"
    steps: int = 20
    warmup: int = 3
    mem_steps: int = 2
    dataset_size: int = 60_000
    compute_only: bool = True
    timeout_s: float = 300.0


def hybrid_axes(n: int) -> tuple[int, int] | None:
    """``(sample, data)`` of the most square grid with both axes > 1 and sample >= data."""
    for b in range(math.isqrt(n), 1, -1):
        if n % b == 0:
            return n // b, b
    return None


def grid_axes(mode: str, n: int) -> tuple[int, int] | None:
    if mode == "local":
        return (1, 1) if n == 1 else None
    if n == 1:
        return None  # every mode is the local baseline at one rank
    if mode == "sp":
        return n, 1
    if mode == "ddp":
        return 1, n
    return hybrid_axes(n)


def plan_configs(
    model: str,
    modes: list[str],
    ranks: list[int],
    scalings: list[str],
    samples: int,
    batch: int,
    threads: int,
    **common_kw,
) -> tuple[list[Config], list[str]]:
    """The configurations to run (the 1-rank baseline first) and the reasons for skips."""
    configs = [Config(model, "local", "baseline", 1, 1, 1, samples, batch, threads, **common_kw)]
    skipped: list[str] = []
    for scaling in scalings:
        for n in ranks:
            if n == 1:
                continue
            for mode in modes:
                if mode == "local":
                    continue
                axes = grid_axes(mode, n)
                if axes is None:
                    why = f"{mode} at {n} ranks: needs >= 4 ranks with both axes > 1"
                    if why not in skipped:
                        skipped.append(why)
                    continue
                a, b = axes
                s = samples * n if scaling == "weak" else samples
                why = []
                if s % a:
                    why.append(f"S={s} not divisible by the sample axis {a}")
                if batch % b:
                    why.append(f"B={batch} not divisible by the data axis {b}")
                if why:
                    skipped.append(f"{scaling} {mode} at {n} ranks: {'; '.join(why)}")
                    continue
                configs.append(
                    Config(model, mode, scaling, n, a, b, s, batch, threads, **common_kw)
                )
    return configs, skipped


# --------------------------------------------------------------------------- probes


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_now_bytes() -> int:
    kib = _proc_status_kib("VmRSS")
    return 0 if kib is None else kib * 1024


def rss_peak_bytes() -> int:
    """``VmHWM`` (the resident-set high-water mark of this process), else ``ru_maxrss``."""
    kib = _proc_status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def machine_busy_s() -> float | None:
    """CPU-seconds all processes spent busy so far, machine-wide (``/proc/stat``)."""
    try:
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(vals) - vals[3] - vals[4]) / _HZ  # all but idle and iowait


def process_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


# --------------------------------------------------------------------------- one rank


def _barrier(grid) -> None:
    if grid.world_size > 1:
        if grid.device.type == "cuda":
            dist.barrier(device_ids=[grid.device.index])
        else:
            dist.barrier()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(cfg: Config) -> dict | None:
    """One rank of one configuration (run by :func:`launch_ranks`); rank 0 returns the
    per-step numbers (max over ranks), the others ``None``."""
    torch.set_num_threads(cfg.threads)
    base_rss = rss_now_bytes()
    if cfg.ranks == 1:
        device = torch.device("cuda", 0) if cfg.device == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        grid = sd.Grid.local(device)
    else:
        backend = "nccl" if cfg.device == "cuda" else "gloo"
        grid = sd.init(
            sample=cfg.sample_axis, data=cfg.data_axis, backend=backend, timeout=cfg.timeout_s
        )
    dev = grid.device
    try:
        spec = MODELS[cfg.model]
        model = build_model(spec).to(dev)
        sp = sd.SampleParallel(model, cfg.samples, grid, seed=0, augment=None)
        opt = torch.optim.Adam(sp.parameters(), lr=1e-4)
        local_batch = cfg.batch // grid.data
        gen = torch.Generator().manual_seed(1000 + grid.data_rank)  # same within a sample group
        x = torch.randn(local_batch, *input_shape(spec), generator=gen).to(dev)
        y = torch.randint(0, spec.classes, (local_batch,), generator=gen).to(dev)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            out = sp(x)  # (S_local, B_local, classes)
            kl = spar.nn.kl_divergence(sp)
            loss = spar.losses.elbo(out, y, kl=kl, dataset_size=cfg.dataset_size)
            loss.backward()
            opt.step()
            _sync(dev)

        def compute_only() -> None:
            with sp.no_sync():
                step()

        # synchronized warm-up (its first step rebuilds the buckets), then the memory peak,
        # read before any no_sync step: those keep a full set of gradients next to the buckets
        for _ in range(cfg.warmup + cfg.mem_steps):
            step()
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated(dev)
        else:
            peak = rss_peak_bytes()
        kinds = {"step": step}
        if cfg.compute_only and grid.world_size > 1:
            kinds["compute"] = compute_only
            for _ in range(cfg.warmup):
                compute_only()
        names = list(kinds)
        times: dict[str, list[float]] = {k: [] for k in names}
        red: dict[str, list[float]] = {"backward_s": [], "comm_s": [], "exposed_s": []}
        _barrier(grid)
        wall0, busy0, cpu0 = time.perf_counter(), machine_busy_s(), process_cpu_s()
        for r in range(cfg.steps):
            k0 = r % len(names)
            for k in names[k0:] + names[:k0]:
                _barrier(grid)
                t0 = time.perf_counter()
                kinds[k]()
                times[k].append(time.perf_counter() - t0)
                if k == "step" and sp.last_timings is not None:
                    for key in red:
                        red[key].append(getattr(sp.last_timings, key))
        _barrier(grid)
        wall1, busy1, cpu1 = time.perf_counter(), machine_busy_s(), process_cpu_s()

        world = grid.world_size

        def reduce(values: list[float], op) -> list[float]:
            t = torch.tensor(values, dtype=torch.float64, device=dev)
            if world > 1:
                dist.all_reduce(t, op=op)
            return t.cpu().tolist()

        out = {f"{k}_s": reduce(v, dist.ReduceOp.MAX) for k, v in times.items()}
        if red["exposed_s"]:
            out.update({k: reduce(v, dist.ReduceOp.MAX) for k, v in red.items()})
        mem = [0.0] * world
        mem[grid.rank] = float(peak)
        out["peak_mem"] = reduce(mem, dist.ReduceOp.SUM)
        base = [0.0] * world
        base[grid.rank] = float(base_rss)
        out["base_mem"] = reduce(base, dist.ReduceOp.SUM)
        out["ranks_cpu_s"] = reduce([cpu1 - cpu0], dist.ReduceOp.SUM)[0]
        out["wall_s"] = wall1 - wall0
        out["machine_busy_s"] = None if busy0 is None or busy1 is None else busy1 - busy0
        out["params"] = sum(p.numel() for p in sp.parameters() if p.requires_grad)
        out["comm_bytes"] = sp.last_timings.comm_bytes if sp.last_timings is not None else 0
        out["num_buckets"] = sp.last_timings.num_buckets if sp.last_timings is not None else 0
        return out if grid.rank == 0 else None
    finally:
        if cfg.ranks > 1:
            sd.shutdown()


# --------------------------------------------------------------------------- launching ranks


def launch_ranks(fn, nprocs: int, args: tuple, *, timeout: float, start_method: str) -> list:
    """``fn(*args)`` on ``nprocs`` fresh processes with torchrun's variables; results by rank.

    ``"forkserver"`` (the default) forks each rank from a server that imported torch and
    spar once: every configuration still gets fresh processes (clean memory peaks, new
    process groups), without paying the ~3 s (16 s on a loaded 2-vCPU VM) of importing
    torch and spar in every rank of every configuration.
    """
    # preloaded by module name: preloading "__main__" would make every child re-import it
    preload = ("torch", "torch.distributed", "spar", "spar.distributed")
    return sd.spawn(
        fn, nprocs, args=args, timeout=timeout, start_method=start_method,
        preload=preload if start_method == "forkserver" else (),
    )  # fmt: skip


# --------------------------------------------------------------------------- plan (cost model)


def plan_prediction(
    cfg: Config, baseline_step_ms: float, baseline_samples: int, hardware: dict
) -> tuple[float | None, float | None, str]:
    """Step time and exposed communication (ms) that ``spar.distributed.plan`` predicts for
    ``cfg``, and a note saying how it was called (or why there is no prediction).

    The compute constant comes from this run: ``sample_cost_s`` = the measured 1-rank step
    divided by its S, per ``cost_batch = B`` examples, ``step_overhead_s = 0``; the model is
    the same Bayesian network (mu and rho counted), Adam, the Reducer's default buckets.
    The link constants are plan's defaults unless ``hardware`` (``--plan-gb-s``,
    ``--plan-latency-us``) overrides them: plan's defaults describe GPUs, so on CPU/gloo
    its communication term is a lower bound unless calibrated.
    """
    kwargs = dict(
        num_samples=cfg.samples,
        batch_size=cfg.batch,
        gpus=cfg.ranks,
        dataset_size=cfg.dataset_size,
        sample_cost_s=baseline_step_ms / 1e3 / baseline_samples,
        cost_batch=cfg.batch,
        step_overhead_s=0.0,
        optimizer="adam",
        bucket_mb=25.0,
        first_bucket_mb=1.0,
        **hardware,
    )
    try:
        rows = sd.plan(build_model(MODELS[cfg.model]), **kwargs)
    except (TypeError, ValueError) as exc:
        return None, None, f"plan() raised {type(exc).__name__}: {exc}"
    for row in rows:
        if (row.sample_axis, row.data_axis) == (cfg.sample_axis, cfg.data_axis):
            hw = ", ".join(f"{k}={v}" for k, v in hardware.items()) or "plan's default links"
            note = f"sample_cost from the 1-rank step, {hw}"
            return 1e3 * row.step_time_s, 1e3 * row.exposed_comm_s, note
    return None, None, f"plan() returned no row for grid {cfg.sample_axis}x{cfg.data_axis}"


# --------------------------------------------------------------------------- one configuration


def _median_ms(values: list[float]) -> float:
    return round(1e3 * statistics.median(values), 3)


def _quantiles_ms(values: list[float]) -> tuple[float, float, float, float]:
    t = sorted(1e3 * v for v in values)
    if len(t) == 1:
        return t[0], 0.0, t[0], t[0]
    q = statistics.quantiles(t, n=4, method="inclusive")
    return q[1], q[2] - q[0], t[0], t[-1]


def measure(cfg: Config, malloc: str, wait_quiet: float, start_method: str) -> dict:
    """Start the ranks of ``cfg`` and turn rank 0's numbers into one CSV row (without the
    columns that need the baseline)."""
    if wait_quiet > 0:
        common.wait_for_quiet(below=0.1, timeout=wait_quiet)
    load_before = loadavg()
    t0 = time.perf_counter()
    res = launch_ranks(
        worker, cfg.ranks, (cfg,), timeout=cfg.timeout_s + 120, start_method=start_method
    )[0]
    elapsed = time.perf_counter() - t0
    cores = os.cpu_count() or 1
    if cfg.device == "cuda":
        oversub = cfg.ranks > max(1, torch.cuda.device_count())
    else:
        oversub = cfg.ranks * cfg.threads > cores
    med, iqr, lo, hi = _quantiles_ms(res["step_s"])
    step_s = med / 1e3
    steps_per_epoch = math.ceil(cfg.dataset_size / cfg.batch)
    others = ""
    if res["machine_busy_s"] is not None and res["wall_s"] > 0:
        share = (res["machine_busy_s"] - res["ranks_cpu_s"]) / (res["wall_s"] * cores)
        others = round(min(1.0, max(0.0, share)), 3)
    row = {
        "model": cfg.model,
        "params": res["params"],
        "mode": cfg.mode,
        "scaling": cfg.scaling,
        "ranks": cfg.ranks,
        "sample_axis": cfg.sample_axis,
        "data_axis": cfg.data_axis,
        "samples": cfg.samples,
        "local_samples": cfg.samples // cfg.sample_axis,
        "batch": cfg.batch,
        "local_batch": cfg.batch // cfg.data_axis,
        "device": cfg.device,
        "backend": "local" if cfg.ranks == 1 else ("nccl" if cfg.device == "cuda" else "gloo"),
        "threads": cfg.threads,
        "cores": cores,
        "oversubscribed": oversub,
        "malloc": malloc if cfg.device == "cpu" else "",
        "steps": len(res["step_s"]),
        "warmup": cfg.warmup,
        "step_ms": round(med, 3),
        "iqr_ms": round(iqr, 3),
        "min_ms": round(lo, 3),
        "max_ms": round(hi, 3),
        "dataset_size": cfg.dataset_size,
        "steps_per_epoch": steps_per_epoch,
        "epoch_s": round(steps_per_epoch * step_s, 3),
        "samples_per_s": round(cfg.samples * cfg.batch / step_s, 1),
        "examples_per_s": round(cfg.batch / step_s, 1),
        "compute_only_ms": _median_ms(res["compute_s"]) if "compute_s" in res else round(med, 3),
        "comm_overhead_ms": 0.0,
        "exposed_comm_ms": 0.0,
        "comm_ms": 0.0,
        "backward_ms": "",
        "comm_mib": round(res["comm_bytes"] / 2**20, 3),
        "num_buckets": res["num_buckets"],
        "peak_mem_mib": round(max(res["peak_mem"]) / 2**20, 1),
        "peak_mem_mib_ranks": ";".join(f"{m / 2**20:.1f}" for m in res["peak_mem"]),
        "base_mem_mib": round(max(res["base_mem"]) / 2**20, 1),
        "mem_growth_mib": round(
            max(p - b for p, b in zip(res["peak_mem"], res["base_mem"], strict=True)) / 2**20, 1
        ),
        "mem_kind": "max_memory_allocated" if cfg.device == "cuda" else "rss_hwm",
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "others_cpu": others,
        "wall_s": round(elapsed, 1),
    }
    if "compute_s" in res:
        diffs = [a - b for a, b in zip(res["step_s"], res["compute_s"], strict=True)]
        row["comm_overhead_ms"] = _median_ms(diffs)
    if "exposed_s" in res:
        row["exposed_comm_ms"] = _median_ms(res["exposed_s"])
        row["comm_ms"] = _median_ms(res["comm_s"])
        row["backward_ms"] = _median_ms(res["backward_s"])
    return row


def add_scaling_columns(rows: list[dict]) -> None:
    """``speedup`` and ``efficiency`` of every row against the 1-rank baseline of its model
    (throughput ratio: S * B / step time)."""
    base = {r["model"]: r for r in rows if r["scaling"] == "baseline"}
    for r in rows:
        b = base.get(r["model"])
        if b is None:
            r["speedup"] = r["efficiency"] = r["efficiency_min"] = ""
            continue
        speedup = float(r["samples_per_s"]) / float(b["samples_per_s"])
        r["speedup"] = round(speedup, 4)
        r["efficiency"] = round(speedup / int(r["ranks"]), 4)
        # the same from the fastest step of each run: less sensitive to a busy machine
        best = (int(r["samples"]) / float(r["min_ms"])) / (int(b["samples"]) / float(b["min_ms"]))
        r["efficiency_min"] = round(best / int(r["ranks"]), 4)


def describe(r: dict) -> str:
    grid = f"{r['sample_axis']}x{r['data_axis']}"
    flag = "  OVERSUBSCRIBED" if str(r["oversubscribed"]) == "True" else ""
    plan = r.get("plan_step_ms", "")
    plan_txt = f"plan {plan} ms" if plan not in ("", None) else "plan n/a"
    return (
        f"{r['model']:>8} {r['scaling']:>8} {r['mode']:>6} n={r['ranks']} grid {grid:>5} "
        f"S={r['samples']:>3} B={r['batch']:>3}: step {r['step_ms']:8.2f} ms "
        f"(IQR {r['iqr_ms']:.2f}) eff {r['efficiency']} | exposed {r['exposed_comm_ms']} ms, "
        f"overhead {r['comm_overhead_ms']} ms | peak {r['peak_mem_mib']} MiB | "
        f"load {r['loadavg_before']} others {r['others_cpu']} | {plan_txt}{flag}"
    )


def markdown_table(rows: list[dict]) -> str:
    """The main columns of ``rows`` as a Markdown table."""
    cols = [
        ("model", "model"), ("scaling", "scaling"), ("mode", "mode"), ("ranks", "n"),
        ("samples", "S"), ("batch", "B"), ("step_ms", "step ms"), ("iqr_ms", "IQR ms"),
        ("epoch_s", "epoch s"), ("samples_per_s", "sample-ex/s"), ("efficiency", "eff."),
        ("efficiency_min", "eff. (min)"),
        ("compute_only_ms", "compute-only ms"), ("exposed_comm_ms", "exposed ms"),
        ("comm_overhead_ms", "step-compute ms"),
        ("peak_mem_mib", "peak MiB/rank"), ("mem_growth_mib", "growth MiB"),
        ("plan_step_ms", "plan ms"),
        ("others_cpu", "others CPU"), ("loadavg_before", "loadavg"),
        ("oversubscribed", "oversub."),
    ]  # fmt: skip
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k, _ in cols) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot


def _plan_ratio(r: dict, base: dict) -> float | None:
    """Speedup that ``spar.distributed.plan`` predicts for row ``r`` (None without one)."""
    try:
        pred, base_step = float(r["plan_step_ms"]), float(base["step_ms"])
    except (KeyError, ValueError):
        return None
    return (int(r["samples"]) / pred) / (int(base["samples"]) / base_step)


def plot(csv_path: Path, png_path: Path) -> bool:
    """Speedup and efficiency vs ranks (latest run of ``csv_path``), with the ideal lines.
    Returns False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = common.read_rows(csv_path)
    if not rows:
        return False
    run_id = rows[-1].get("run_id")
    rows = [r for r in rows if r.get("run_id") == run_id]
    models = sorted({r["model"] for r in rows})
    styles = ["-", "--", ":", "-."]
    colors = {"sp": "C0", "ddp": "C1", "hybrid": "C2"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    max_n = max(int(r["ranks"]) for r in rows)
    ns = list(range(1, max_n + 1))
    any_over = any_plan = False
    for i, scaling in enumerate(SCALINGS):
        ax_s, ax_e = axes[i]
        ax_s.plot(ns, ns, "k:", lw=1, label="ideal")
        ax_e.plot(ns, [1.0] * len(ns), "k:", lw=1, label="ideal")
        for j, model in enumerate(models):
            base = [r for r in rows if r["model"] == model and r["scaling"] == "baseline"]
            for mode in ("sp", "ddp", "hybrid"):
                pts = [
                    r
                    for r in rows
                    if r["model"] == model and r["scaling"] == scaling and r["mode"] == mode
                ]
                if not pts:
                    continue
                pts = sorted(base + pts, key=lambda r: int(r["ranks"]))
                xs = [int(r["ranks"]) for r in pts]
                for ax, key in ((ax_s, "speedup"), (ax_e, "efficiency")):
                    ys = [float(r[key]) for r in pts]
                    style = styles[j % len(styles)]
                    ax.plot(xs, ys, style, color=colors[mode], label=f"{model} {mode}")
                    for x, y, r in zip(xs, ys, pts, strict=True):
                        over = r["oversubscribed"] == "True"
                        any_over |= over
                        ax.plot(
                            [x], [y], "o", color=colors[mode], mfc="none" if over else colors[mode]
                        )
                        pred = _plan_ratio(r, base[0]) if base else None
                        if pred is not None:
                            any_plan = True
                            div = x if key == "efficiency" else 1
                            ax.plot([x], [pred / div], "x", color=colors[mode], ms=7)
        what = "S grows with ranks" if scaling == "weak" else "S fixed"
        ax_s.set(
            xlabel="ranks",
            ylabel="speedup (throughput vs 1 rank)",
            title=f"{scaling} scaling ({what})",
        )
        ax_e.set(xlabel="ranks", ylabel="parallel efficiency", title=f"{scaling} scaling")
        ax_e.set_ylim(bottom=0)
        for ax in (ax_s, ax_e):
            ax.set_xticks(ns)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    first = rows[0]
    loads = sorted(
        {float(r["loadavg_before"].split(" ")[0]) for r in rows if r.get("loadavg_before")}
    )
    others = sorted(float(r["others_cpu"]) for r in rows if r.get("others_cpu") not in ("", None))
    busy = f", other processes used {others[0]:.0%}-{others[-1]:.0%} of the CPUs" if others else ""
    dev = first["gpu"] if first.get("device") == "cuda" else first["cpu"]
    note = "; hollow markers: oversubscribed" if any_over else ""
    note += "; x: spar.distributed.plan prediction" if any_plan else ""
    fig.suptitle(
        f"spar sampling-parallel scaling, {dev}, {first['threads']} thread(s)/rank, "
        f"torch {first['torch']}, {first['date'][:10]}\n"
        f"1-min load average {min(loads, default='?')}-{max(loads, default='?')} on "
        f"{first['cores']} cores{busy}{note}",
        fontsize=9,
    )
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", nargs="+", default=["mlp", "cnn"], choices=list(MODELS))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--scaling", nargs="+", default=list(SCALINGS), choices=list(SCALINGS))
    ap.add_argument(
        "--ranks",
        type=int,
        nargs="+",
        default=None,
        help="rank counts (default: 1 2 on CPU, powers of 2 up to the GPUs)",
    )
    ap.add_argument("--samples", type=int, default=8, help="S at one rank (default 8)")
    ap.add_argument(
        "--batch",
        type=int,
        default=None,
        help="global batch B (default: the model's, 64 mlp / 32 cnn)",
    )
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="compute threads per rank (default: cores // max(ranks), >= 1)",
    )
    ap.add_argument(
        "--dataset-size",
        type=int,
        default=None,
        help="examples per epoch for epoch_s (default: the model's)",
    )
    ap.add_argument("--malloc", choices=["pinned", "default"], default="pinned")
    ap.add_argument(
        "--no-compute-only",
        action="store_true",
        help="skip the no_sync compute-only steps (no comm_overhead_ms)",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=10.0,
        help="seconds to wait for a quiet machine before each configuration",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="3 timed steps, 1 warm-up, no waiting: a correctness run",
    )
    ap.add_argument(
        "--start-method",
        choices=["forkserver", "spawn"],
        default="forkserver",
        help="how rank processes start (spawn: spar.distributed.spawn, slower start-up)",
    )
    ap.add_argument(
        "--plan-gb-s",
        type=float,
        default=None,
        help="all-reduce bandwidth (GB/s) given to spar.distributed.plan (default: plan's)",
    )
    ap.add_argument(
        "--plan-latency-us",
        type=float,
        default=None,
        help="per-ring-step latency (us) given to spar.distributed.plan (default: plan's)",
    )
    ap.add_argument("--csv", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args(argv)

    suffix = "gpu" if args.device == "cuda" else "cpu"
    csv_path = args.csv or common.RESULTS_DIR / f"scaling_{suffix}.csv"
    png_path = args.png or csv_path.with_suffix(".png")
    if args.plot_only:
        if not plot(csv_path, png_path):
            sys.exit(f"bench_scaling: no rows in {csv_path}")
        rows = common.read_rows(csv_path)
        print(markdown_table([r for r in rows if r.get("run_id") == rows[-1].get("run_id")]))
        print(f"wrote {png_path}")
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_scaling: --device cuda but no CUDA GPU is visible")
    for name in ("samples", "steps"):
        if getattr(args, name) < 1:
            sys.exit(f"bench_scaling: --{name} must be >= 1")
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    ranks = args.ranks
    if ranks is None:
        ranks = [1, 2] if args.device == "cpu" else [n for n in (1, 2, 4, 8) if n <= gpus]
    ranks = sorted(set(ranks))
    if ranks[0] < 1:
        sys.exit("bench_scaling: --ranks must be >= 1")
    if gpus:
        too_many = [n for n in ranks if n > gpus]
        if too_many:
            print(f"skipped ranks {too_many}: only {gpus} GPU(s) visible (one GPU per rank)")
        ranks = [n for n in ranks if n <= gpus]
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // max(ranks))
    steps, warmup = (3, 1) if args.quick else (args.steps, args.warmup)
    wait = 0.0 if args.quick else args.wait_quiet
    run_id = time.strftime("%Y%m%dT%H%M%S")
    # run-wide environment of the ranks, set before the first rank (or the fork server)
    # starts: glibc reads its malloc thresholds at process start
    if args.malloc == "pinned":
        os.environ.update(_PINNED)
    else:
        for k in _PINNED:
            os.environ.pop(k, None)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    info = common.env_info()
    print(f"run {run_id}: {info['cpu']}, {cores} cores, {threads} thread(s)/rank, load {loadavg()}")

    hardware: dict[str, float] = {}
    if args.plan_gb_s is not None:
        hardware.update(intra_node_gb_s=args.plan_gb_s, inter_node_gb_s=args.plan_gb_s)
    if args.plan_latency_us is not None:
        hardware["latency_us"] = args.plan_latency_us
    rows: list[dict] = []
    for model in args.model:
        spec = MODELS[model]
        batch = args.batch or spec.batch
        configs, skipped = plan_configs(
            model,
            args.modes,
            ranks,
            args.scaling,
            args.samples,
            batch,
            threads,
            device=args.device,
            steps=steps,
            warmup=warmup,
            dataset_size=args.dataset_size or spec.dataset_size,
            compute_only=not args.no_compute_only,
        )
        for why in skipped:
            print(f"{model}: skipped {why}")
        model_rows = []
        for cfg in configs:
            row = measure(cfg, args.malloc, wait, args.start_method)
            base = model_rows[0] if model_rows else row  # the baseline runs first
            pred, pred_exp, note = plan_prediction(
                cfg, float(base["step_ms"]), int(base["samples"]), hardware
            )
            row["plan_step_ms"] = "" if pred is None else round(pred, 3)
            row["plan_exposed_comm_ms"] = "" if pred_exp is None else round(pred_exp, 3)
            row["plan_note"] = note
            model_rows.append(row)
            add_scaling_columns(model_rows)
            print(describe(row), flush=True)
        rows += model_rows
    full = []
    for r in rows:
        full.append({**info, "threads": str(threads), "run_id": run_id, "quick": args.quick, **r})
    common.append_rows(csv_path, full)
    plot(csv_path, png_path)
    print(markdown_table(full))
    print(f"wrote {len(full)} rows to {csv_path} and {png_path}")


if __name__ == "__main__":
    main()
