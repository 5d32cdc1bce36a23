"""The training step of ``spar train``'s built-in models on the CPU (``spar.models``).

One process, ``SPAR_BACKEND=torch``, one torch thread (``--threads``; 0: torch's default).
One thread because the 2-vCPU machine it was written on is shared: with a neighbour's job
on the other core, two torch threads made the cnn step about 7x slower (278 against 42 ms)
than one. For each model (default:
``cnn`` on 1x8x8 digits, 8 classes, B = 64; ``resnet20`` and ``vit-tiny`` on 3x32x32,
10 classes, B = 32), at S = 4 Monte Carlo samples (``--samples``): a full training step,

    out = MonteCarlo(model, S)(x); loss = spar.losses.elbo(out, y,
        kl=spar.nn.kl_divergence(model), dataset_size=N); loss.backward(); adam.step()

with ``N`` the training-set size the model stands for (1149 digits, 50000 CIFAR-10
images; it only scales the KL term). Timing: ``--warmup`` steps, then ``steps`` timed
steps, one at a time with the garbage collector off (``common.time_once``), where
``steps`` fills about ``--budget`` seconds per model (at least ``--min-steps``, at most
``--max-steps``). Reported: median, IQR and min in ms, examples per second at the median,
and ``others_cpu``, the mean share of the machine's CPUs other processes used during the
timed steps (``/proc/stat``): this machine is shared and other jobs may load it, so a row
with a high value ran slower than an idle machine would give.

Memory (``--no-memory`` skips it), one step each, after the timing of all models:

- ``peak_tensor_mb``: peak of live CPU tensor memory during the step above what was live
  before it (activations, sampled weights, gradients, Adam's state being written), from
  ``torch.profiler``'s allocation events (``common.cpu_tensor_peak_bytes``): byte-exact;
- ``rss_peak_mb``: growth of the process's peak resident set over the step
  (``common.rss_peak_growth_bytes``), with glibc's mmap threshold pinned at 64 KiB so that
  freed tensors go back to the OS (pages kept from an earlier model could otherwise hide
  growth); an upper bound of the tensor peak.

Also: ``weights`` (the deterministic network's) and ``params`` (the Bayesian model's
trainable parameters: a mean and a sigma per weight, plus BatchNorm/LayerNorm affines and
the ViT's class token and position embeddings).

Rows are appended to ``results/models_cpu.csv``; ``results/models_cpu.md`` is written from
the rows of this run.

    python bench/bench_models.py                       # the three models, < 5 min on 2 cores
    python bench/bench_models.py --models resnet20 --samples 8 --budget 30
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("SPAR_BACKEND", "torch")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

import spar  # noqa: E402
from spar import models  # noqa: E402

CSV = common.RESULTS_DIR / "models_cpu.csv"
REPORT = common.RESULTS_DIR / "models_cpu.md"
MB = 2**20


@dataclass(frozen=True)
class Case:
    model: str
    input_shape: tuple[int, ...]
    classes: int
    batch: int
    dataset_size: int  # the training set the model stands for: scales the KL term


CASES = {
    "cnn": Case("cnn", (1, 8, 8), 8, 64, 1149),
    "mlp": Case("mlp", (64,), 8, 64, 1149),
    "resnet20": Case("resnet20", (3, 32, 32), 10, 32, 50_000),
    "vit-tiny": Case("vit-tiny", (3, 32, 32), 10, 32, 50_000),
}


def _pin_mmap_threshold() -> bool:
    """glibc: serve allocations >= 64 KiB by mmap and trim the heap at once, so that the
    RSS follows the live tensors (what ``MALLOC_MMAP_THRESHOLD_`` would do at start-up)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 64 * 1024)) and bool(
        libc.mallopt(m_trim_threshold, 0)
    )


def _malloc_trim() -> None:
    """glibc: give the free pages of the heap back to the OS (``malloc_trim(0)``); large
    requests are served from free heap chunks before any mmap, so pages kept from earlier
    work would hide a step's growth."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Trainer:
    """A built-in model made Bayesian, its data and one training step."""

    def __init__(self, case: Case, samples: int) -> None:
        self.case, self.samples = case, samples
        torch.manual_seed(0)
        self.model = models.build(case.model, case.input_shape, case.classes)
        self.mc = spar.nn.MonteCarlo(self.model, samples, seed=0).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(case.batch, *case.input_shape, generator=g)
        self.y = torch.randint(0, case.classes, (case.batch,), generator=g)
        self.loss = float("nan")

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        out = self.mc(self.x)
        kl = spar.nn.kl_divergence(self.model)
        loss = spar.losses.elbo(out, self.y, kl=kl, dataset_size=self.case.dataset_size)
        loss.backward()
        self.opt.step()
        self.loss = float(loss.detach())


def _weights(case: Case) -> int:
    """Weights of the deterministic network (built on the meta device: no memory, no RNG)."""
    with torch.device("meta"):
        builder = getattr(models, case.model.replace("-", "_"))
        return sum(p.numel() for p in builder(case.input_shape, case.classes).parameters())


def time_steps(case: Case, samples: int, args: argparse.Namespace) -> tuple[Trainer, dict]:
    """Warm up, then time ``case``'s training step at ``samples``: the trainer and its row."""
    tr = Trainer(case, samples)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        tr.step()
    warm = (time.perf_counter() - t0) / max(1, args.warmup)
    n = int(min(args.max_steps, max(args.min_steps, args.budget // max(warm, 1e-6))))
    timed = [common.time_once(tr.step) for _ in range(n)]
    stats = common.Stats.from_seconds((t for t, _ in timed), (o for _, o in timed))
    shape = "x".join(map(str, case.input_shape))
    print(
        f"{case.model:>9} {shape:>8} B={case.batch} S={samples} threads="
        f"{torch.get_num_threads()}: median {stats.median:9.1f} ms (IQR {stats.iqr:.1f}, "
        f"min {stats.min:.1f}, n={stats.n}), others_cpu {stats.others:.2f}, loss {tr.loss:.3f}",
        flush=True,
    )
    return tr, {
        "model": case.model,
        "input": shape,
        "classes": case.classes,
        "batch": case.batch,
        "samples": samples,
        "weights": _weights(case),
        "params": sum(p.numel() for p in tr.model.parameters()),
        "warmup": args.warmup,
        "steps": stats.n,
        "median_ms": round(stats.median, 2),
        "iqr_ms": round(stats.iqr, 2),
        "min_ms": round(stats.min, 2),
        "examples_per_s": round(case.batch / (stats.median / 1e3), 1),
        "others_cpu": round(stats.others, 3),
        "final_loss": round(tr.loss, 4),
    }


def memory(tr: Trainer) -> dict:
    """Tensor peak and RSS growth of one step each (after the timing, mmap pinned)."""
    peak = common.cpu_tensor_peak_bytes(tr.step)
    _malloc_trim()  # free heap pages back to the OS: reusing them shows as growth
    rss = common.rss_peak_growth_bytes(tr.step)
    print(
        f"{tr.case.model:>9} S={tr.samples}: tensor peak {peak / MB:.1f} MiB, RSS peak "
        f"{'-' if rss is None else f'{rss / MB:.1f}'} MiB",
        flush=True,
    )
    return {
        "peak_tensor_mb": round(peak / MB, 2),
        "rss_peak_mb": "" if rss is None else round(rss / MB, 2),
    }


def write_report(rows: list[dict], argv: list[str], wall_s: float) -> None:
    r0 = rows[0]
    lines = [
        "# Built-in models' training step on CPU (bench/bench_models.py)",
        "",
        f"Measured (CPU): {r0['cpu']}, {r0['threads']} thread(s), torch {r0['torch']}, "
        f"SPAR_BACKEND={r0['spar_backend']}; run {r0['run']} ({r0['date']}), spar_src "
        f"{r0['spar_src']}, the whole script {wall_s:.0f} s. This machine is shared: other "
        "jobs may load it while a step runs. `others_cpu` is the mean share of the CPUs that "
        "other processes used during the timed steps (from `/proc/stat`, "
        "`bench/common.py`); with a high value a step ran slower than on an idle machine, so "
        "compare rows of one run rather than absolute times across runs. One torch thread "
        "(`--threads`): with a neighbour's job on the other core of this 2-vCPU machine, two "
        "threads made the steps several times slower (cnn 278 ms against 42 ms, resnet20 "
        "7.6 s against 1.2 s in trial runs).",
        "",
        "Command: `python bench/bench_models.py" + "".join(f" {a}" for a in argv) + "`",
        "",
        "Step = `spar.nn.MonteCarlo` forward of the model from `spar.models.build` (Bayesian, "
        "reparameterisation, sample-wise BatchNorm), `spar.losses.elbo` with "
        "`spar.nn.kl_divergence`, backward, Adam step; median over the timed steps after "
        "warm-up. `weights`: the deterministic network's; `params`: the Bayesian model's "
        "(mean and sigma per weight, plus norms and the ViT's tokens). Tensor peak: live CPU "
        "tensor bytes during one step above those before it (torch profiler); RSS peak: "
        "growth of the process's peak resident set over one step (glibc mmap threshold "
        "64 KiB, heap trimmed first).",
        "",
        "| model | input | K | B | S | weights | params | steps | median ms | IQR ms | "
        "min ms | examples/s | tensor peak MiB | RSS peak MiB | others_cpu |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['input']} | {r['classes']} | {r['batch']} | {r['samples']} "
            f"| {r['weights'] / 1e6:.3f} M | {r['params'] / 1e6:.3f} M | {r['steps']} "
            f"| {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | {r['min_ms']:.1f} "
            f"| {r['examples_per_s']:.1f} | {r['peak_tensor_mb']} | {r['rss_peak_mb']} "
            f"| {r['others_cpu']} |"
        )
    lines.append("")
    REPORT.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=list(CASES),
                   default=["cnn", "resnet20", "vit-tiny"])  # fmt: skip
    p.add_argument("--samples", type=int, nargs="+", default=[4], help="S (default 4)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--budget", type=float, default=20.0,
                   help="seconds of timed steps per model and S (default 20)")  # fmt: skip
    p.add_argument("--min-steps", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1; 0: torch's default)")  # fmt: skip
    p.add_argument("--no-memory", action="store_true", help="skip the memory steps")
    p.add_argument("--no-write", action="store_true", help="print only, write no results")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    run = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    env = common.env_info() | {"run": run, "spar_backend": os.environ["SPAR_BACKEND"]}
    done = [time_steps(CASES[name], S, args) for name in args.models for S in args.samples]
    pinned = False
    if not args.no_memory:
        # after the timing: mmap'ing every tensor >= 64 KiB would slow the timed steps
        pinned = _pin_mmap_threshold()
        for tr, row in done:
            row.update(memory(tr))
    rows = [env | row | {"mmap_pinned": pinned} for _, row in done]
    wall = time.perf_counter() - t0
    print(f"total {wall:.0f} s")
    if not args.no_write:
        common.append_rows(CSV, rows)
        write_report(rows, argv, wall)
        print(f"wrote {CSV} and {REPORT}")


if __name__ == "__main__":
    main()
