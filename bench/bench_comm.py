"""Gradient communication: spar's bucketed Reducer against torch DDP on the same model.

Question: does spar's own overlapped, bucketed all-reduce (``spar.distributed.Reducer``,
the gradient sync of ``SampleParallel``) cost no more than PyTorch DDP's C++ reducer, and
how much of its communication stays exposed after backward? Goals: step time within 2% of
DDP or better; exposed communication <= 25% of communication time (gloo, CPU).

Setup: an MLP of ~21 M parameters (1024 -> 2048 -> 4 x (2048 -> 2048) -> 1000, ReLU),
batch ``B`` per rank, cross-entropy, SGD. One step = ``zero_grad(set_to_none=True)``,
forward, backward, ``optimizer.step()``. Every rank holds one copy of the model per
provider, all with the same initial weights:

- ``spar``: ``Reducer(model, bucket_mb=25, first_bucket_mb=1)`` (the defaults);
- ``spar_bf16``: the same with ``comm_dtype=torch.bfloat16`` (half the bytes on the wire);
- ``ddp``: ``DistributedDataParallel(model, bucket_cap_mb=25)`` (first bucket 1 MiB, its
  default);
- ``local``: no gradient sync at all: the compute-only floor of the step.

``comm_alone_ms`` is the all-reduce of spar's buckets with nothing else running (the price of
communication without overlap). For the spar providers the reducer's own accounting is
reported (median over steps, each the max over ranks): ``backward_ms`` (backward compute),
``comm_ms`` (time with at least one bucket in flight), ``exposed_ms`` (time the end of
backward waited for communication) and ``exposed_frac`` (median of ``exposed / comm``).

Timing: ``world`` ranks spawned on this machine (``spar.distributed.spawn``, torchrun-style
variables), gloo on CPU with ``cores // world`` compute threads per rank; NCCL on GPUs with
``--gpu`` when at least ``world`` GPUs are visible. After warm-up, every round runs one step
of every provider, in an order rotated every round; every step starts after a barrier and
its time is the max over ranks (a step is as slow as its slowest rank). Manual
``perf_counter`` timing: ``torch.utils.benchmark`` picks its own repeat count per process,
which would desynchronize the collectives of the ranks. Reported: median, IQR, min in ms,
``ratio_vs_ddp = median(provider) / median(ddp)`` and ``paired_ratio_vs_ddp``, the median
over rounds of the ratio of the two steps of the same round (robust to the machine's speed
drifting: on a shared 2-vCPU VM a neighbour intermittently takes a core).

Memory allocator (column ``malloc``): with glibc's default dynamic thresholds, whether the
16 MiB gradient tensors of a step are reused or handed back to the OS and faulted in again
(~70 MiB of page faults, 20-40 ms per step here) depends on the order in which earlier
tensors were freed, which differs between providers *and* between three models sharing one
process. ``pinned`` (the headline) sets ``MALLOC_MMAP_THRESHOLD_=1GiB`` and
``MALLOC_TRIM_THRESHOLD_=4GiB`` so no provider pays page faults in steady state (the
effect jemalloc/tcmalloc give, as PyTorch's CPU performance guide recommends); the
``default`` rows are kept for reference.

Usage::

    python bench/bench_comm.py                   # both configs, appends to comm_cpu.csv
    python bench/bench_comm.py --quick           # fewer rounds
    python bench/bench_comm.py --plot-only       # redraw comm_cpu.png from the CSV
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)

import spar.distributed as sd  # noqa: E402

PROVIDERS = ("spar", "spar_bf16", "ddp", "local")
_PINNED = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**32)}


@dataclass(frozen=True)
class Config:
    backend: str = "gloo"
    world: int = 2
    batch: int = 64
    bucket_mb: float = 25.0
    first_bucket_mb: float = 1.0
    rounds: int = 30
    warmup: int = 3
    threads: int = 1
    malloc: str = "pinned"


def mlp() -> nn.Module:
    torch.manual_seed(0)
    dims = [1024, 2048, 2048, 2048, 2048, 2048]
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], 1000))
    return nn.Sequential(*layers)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(cfg: Config) -> dict | None:
    """One rank of the benchmark (run under ``spar.distributed.spawn``)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(cfg.threads)
    grid = sd.init(mode="ddp", backend=cfg.backend)
    dev = grid.device
    rank = grid.rank
    models = {p: mlp().to(dev) for p in PROVIDERS}
    kw = dict(bucket_mb=cfg.bucket_mb, first_bucket_mb=cfg.first_bucket_mb)
    reducers = {
        "spar": sd.Reducer(models["spar"], **kw),
        "spar_bf16": sd.Reducer(models["spar_bf16"], comm_dtype=torch.bfloat16, **kw),
    }
    wrapped = dict(models, ddp=DDP(models["ddp"], bucket_cap_mb=cfg.bucket_mb))
    opts = {p: torch.optim.SGD(models[p].parameters(), lr=1e-3) for p in PROVIDERS}
    g = torch.Generator(device="cpu").manual_seed(rank)
    x = torch.randn(cfg.batch, 1024, generator=g).to(dev)
    y = torch.randint(0, 1000, (cfg.batch,), generator=g).to(dev)

    def step(p: str) -> None:
        opts[p].zero_grad(set_to_none=True)
        nn.functional.cross_entropy(wrapped[p](x), y).backward()
        opts[p].step()
        _sync(dev)

    for p in PROVIDERS:
        for _ in range(cfg.warmup):
            step(p)
    for red in reducers.values():
        red.timings.clear()

    times: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    for r in range(cfg.rounds):
        k = r % len(PROVIDERS)
        for p in PROVIDERS[k:] + PROVIDERS[:k]:
            dist.barrier()
            t0 = time.perf_counter()
            step(p)
            times[p].append(time.perf_counter() - t0)

    # the same buckets all-reduced back to back, with nothing to overlap
    alone = []
    for _ in range(cfg.rounds):
        dist.barrier()
        t0 = time.perf_counter()
        works = [dist.all_reduce(b.buffer, async_op=True) for b in reducers["spar"].buckets]
        for w in works:
            w.wait()
        _sync(dev)
        alone.append(time.perf_counter() - t0)

    local = {p: torch.tensor(times[p], dtype=torch.float64) for p in PROVIDERS}
    local["alone"] = torch.tensor(alone, dtype=torch.float64)
    for p, red in reducers.items():
        for key in ("backward_s", "comm_s", "exposed_s"):
            vals = [getattr(t, key) for t in red.timings]
            local[f"{p}.{key}"] = torch.tensor(vals, dtype=torch.float64)
    # max over ranks, step by step (collectives on CPU tensors need gloo; NCCL takes GPU ones)
    out = {}
    for name, t in local.items():
        t = t.to(dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out[name] = t.cpu().tolist()
    out["num_buckets"] = {p: len(red.buckets) for p, red in reducers.items()}
    out["params"] = sum(p.numel() for p in models["spar"].parameters())
    sd.shutdown()
    return out if rank == 0 else None


def run(cfg: Config, run_id: str) -> list[dict]:
    """Spawn the ranks for one configuration and turn rank 0's numbers into CSV rows."""
    common.wait_for_quiet(below=0.1, timeout=20.0)
    saved = {k: os.environ.get(k) for k in _PINNED}
    if cfg.malloc == "pinned":
        os.environ.update(_PINNED)  # read by glibc when the children start
    else:
        for k in _PINNED:
            os.environ.pop(k, None)
    try:
        res = sd.spawn(worker, cfg.world, args=(cfg,), timeout=1800)[0]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    stats = {p: common.Stats.from_seconds(res[p]) for p in PROVIDERS}
    med_ms = lambda key: round(1e3 * statistics.median(res[key]), 2)  # noqa: E731
    info = common.env_info()
    info["threads"] = str(cfg.threads)
    rows = []
    for p in PROVIDERS:
        s = stats[p]
        paired = statistics.median(a / b for a, b in zip(res[p], res["ddp"], strict=True))
        row = {
            **info,
            "run_id": run_id,
            **{k: v for k, v in asdict(cfg).items() if k != "warmup"},
            "params": res["params"],
            "provider": p,
            "steps": s.n,
            "median_ms": round(s.median, 2),
            "iqr_ms": round(s.iqr, 2),
            "min_ms": round(s.min, 2),
            "ratio_vs_ddp": round(s.median / stats["ddp"].median, 4),
            "paired_ratio_vs_ddp": round(paired, 4),
            "comm_alone_ms": med_ms("alone"),
        }
        if p in res["num_buckets"]:
            exposed, comm = res[f"{p}.exposed_s"], res[f"{p}.comm_s"]
            fracs = [e / c for e, c in zip(exposed, comm, strict=True) if c > 0]
            row.update(
                num_buckets=res["num_buckets"][p],
                backward_ms=med_ms(f"{p}.backward_s"),
                comm_ms=med_ms(f"{p}.comm_s"),
                exposed_ms=med_ms(f"{p}.exposed_s"),
                exposed_frac=round(statistics.median(fracs), 4),
            )
        rows.append(row)
    return rows


def _config_key(r: dict) -> tuple:
    return (r["backend"], r["malloc"], int(r["batch"]))


def plot(csv_path: Path, png_path: Path) -> None:
    """Draw the latest run of ``csv_path``: step times per provider, and spar's accounting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = common.read_rows(csv_path)
    if not rows:
        return
    rows = [r for r in rows if r.get("run_id") == rows[-1].get("run_id")]
    configs = sorted({_config_key(r) for r in rows}, key=lambda c: (c[0], c[1] != "pinned", c[2]))
    pick = {(_config_key(r), r["provider"]): r for r in rows}
    labels = [f"{b} {m}\nB={n}" for b, m, n in configs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.6))
    width = 0.8 / len(PROVIDERS)
    for i, p in enumerate(PROVIDERS):
        cells = [pick[(c, p)] for c in configs]
        xs = [k + (i - (len(PROVIDERS) - 1) / 2) * width for k in range(len(configs))]
        ax1.bar(xs, [float(r["median_ms"]) for r in cells], width, label=p,
                yerr=[float(r["iqr_ms"]) / 2 for r in cells], capsize=2)  # fmt: skip
        if p != "ddp":
            for x, r in zip(xs, cells, strict=True):
                top = float(r["median_ms"]) + float(r["iqr_ms"]) / 2
                ax1.text(x, top + 4, f"{float(r['paired_ratio_vs_ddp']):.2f}",
                         ha="center", va="bottom", fontsize=6)  # fmt: skip
    ax1.set_xticks(range(len(configs)), labels, fontsize=8)
    ax1.set_ylabel("median step time, ms (IQR bars; label: paired ratio vs ddp)")
    ax1.set_title(f"train step, {rows[0]['world']} ranks", fontsize=10)
    ax1.legend(fontsize=8)
    keys = [("backward_ms", "backward compute"), ("comm_ms", "comm in flight"),
            ("exposed_ms", "comm exposed"), ("comm_alone_ms", "comm alone")]  # fmt: skip
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        vals = [float(pick[(c, "spar")][key]) for c in configs]
        ax2.bar([k + (i - 1.5) * width for k in range(len(configs))], vals, width, label=label)
    fr = [float(pick[(c, "spar")]["exposed_frac"]) for c in configs]
    ax2.set_xticks(
        range(len(configs)),
        [f"{lab}\nexposed {f:.0%}" for lab, f in zip(labels, fr, strict=True)],
        fontsize=8,
    )
    ax2.set_ylabel("ms per step (median)")
    ax2.set_title("spar Reducer accounting (fp32 communication)", fontsize=10)
    ax2.legend(fontsize=8)
    first = rows[0]
    fig.suptitle(
        f"spar Reducer vs torch DDP, MLP {int(first['params']) / 1e6:.1f} M params; "
        f"{first['cpu']}, {first['threads']} thread(s)/rank, torch {first['torch']}, "
        f"{first['date'][:10]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--malloc", nargs="+", default=["pinned", "default"],
                    choices=["pinned", "default"])  # fmt: skip
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="5 rounds, pinned malloc only")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="also NCCL when enough GPUs are visible")
    args = ap.parse_args()
    csv_path = common.RESULTS_DIR / "comm_cpu.csv"
    run_id = time.strftime("%Y%m%dT%H%M%S")
    if not args.plot_only:
        rounds = 5 if args.quick else args.rounds
        mallocs = ["pinned"] if args.quick else args.malloc
        threads = max(1, (os.cpu_count() or 1) // args.world)
        rows = []
        for malloc in mallocs:
            for batch in args.batch:
                cfg = Config(batch=batch, world=args.world, rounds=rounds, threads=threads,
                             malloc=malloc)  # fmt: skip
                rows += run(cfg, run_id)
        common.append_rows(csv_path, rows)
        if args.gpu and torch.cuda.device_count() >= args.world:
            gpu_rows = []
            for batch in args.batch:
                cfg = Config(backend="nccl", batch=batch, world=args.world, rounds=rounds)
                gpu_rows += run(cfg, run_id)
            common.append_rows(common.RESULTS_DIR / "comm_gpu.csv", gpu_rows)
            rows += gpu_rows
        for r in rows:
            line = (
                f"{r['backend']} {r['malloc']:>7} B={r['batch']:>4} {r['provider']:>9}: "
                f"{r['median_ms']:8.2f} ms (median x{r['ratio_vs_ddp']:.3f}, "
                f"paired x{r['paired_ratio_vs_ddp']:.3f} of ddp)"
            )
            if "exposed_frac" in r:
                line += (
                    f"  exposed {r['exposed_frac']:.1%} of comm {r['comm_ms']} ms "
                    f"(backward {r['backward_ms']} ms, comm alone {r['comm_alone_ms']} ms)"
                )
            print(line)
    plot(csv_path, common.RESULTS_DIR / "comm_cpu.png")


if __name__ == "__main__":
    main()
