"""Bayesian MLP training step on CPU: spar against torch_blue and bayesian-torch.

Question: forward+backward time and peak memory of a 3-layer Bayesian MLP
(1024 -> 1024 -> 1024 -> 10, ReLU, batch 128) for S = 1, 4, 16, 64 Monte Carlo samples,
spar (torch backend) against ``torch_blue`` (vmap over samples) and ``bayesian-torch``
(Python loop over samples), same machine, same run. Goal: spar faster than both at S >= 4,
and its peak memory growing more slowly with S than theirs.

One step, every provider: S weight samples ``w_s = mu + sigma * eps_s`` of all three layers
(reparameterization, one noise draw per weight per sample), logits ``(S, B, 10)``, loss
``mean over (s, b) of cross-entropy + KL / N`` (N = 60000), ``loss.backward()``; no
optimizer. Gradients are reset to ``None`` before each step (untimed), so every step
allocates its ``.grad`` tensors, as under ``optimizer.zero_grad()``.

Providers, each used the way its documentation sets up S samples:

- ``spar``: ``spar.nn.MonteCarlo(nn.Sequential(BayesLinear, ReLU, ...), S)`` with
  ``estimator="reparam"``; loss ``spar.losses.elbo(out, y, kl=spar.nn.kl_divergence(net),
  dataset_size=N)`` (closed-form KL). ``SPAR_BACKEND`` defaults to ``torch`` here.
- ``torch_blue``: ``vi.VISequential(vi.VILinear, nn.ReLU, ...)`` called as
  ``net(x, samples=S)``: the outermost module expands the batch and ``torch.vmap``s the
  forward over samples (``randomness="different"``). Weight sampling needs
  ``return_log_probs=True`` (the default; with ``False`` VILinear switches to the local
  reparameterization trick, a different estimator), so the KL term is torch_blue's Monte
  Carlo estimate ``mean_s[log q(w_s) - log p(w_s)]`` from ``out.log_probs``, as in its
  ``KullbackLeiblerLoss``. The data term is the same mean cross-entropy as for the others.
- ``bayesian_torch``: three ``LinearReparameterization`` layers, the num_mc loop of its
  examples: ``torch.stack([net(x) for _ in range(S)])`` with ``return_kl=False`` in the
  loop and the closed-form KL once per step (``get_kl_loss``; it is a per-element mean in
  this library, which changes the loss value, not the work). Note: bayesian-torch keeps
  ``eps`` in one buffer that each forward overwrites through ``.data``, so after a loop of
  S > 1 forwards the gradient of every ``rho`` is computed with the *last* sample's noise
  (wrong for S > 1), and its memory does not include S copies of ``eps``.

Timing: after two warm-up steps per provider and S (the first compiles spar's noise
generator for that shape), the providers are timed round-robin, one step each per round,
in an order rotated every round (``common.time_interleaved``); rounds are sized to a time
budget (at least 5, or 3 with ``--quick``). This is manual ``perf_counter`` timing with the
GC off, rather than ``torch.utils.benchmark``, because the latter times one statement at a
time: on a shared 2-vCPU machine where other jobs come and go (a two-thread GEMM flips
between ~5 and ~24 ms when one core is taken), only interleaving gives every provider the
same conditions. The machine counts as busy when other processes use more than 15% of the
CPUs (``--busy``, from ``/proc/stat``): each round first waits for a quiet machine, and a
round during which the machine was busy is dropped and rerun (``dropped_rounds``), for up
to ``--max-wait`` seconds per S; after that rounds are kept as they come. ``others_cpu``
is the share of the CPUs other processes used during the kept steps (0 to 1): a row with a
high value was measured on a busy machine. Reported: median, IQR and min over kept rounds,
in ms, and ``time_vs_spar = median(provider) / median(spar)`` (> 1: spar is faster).

Memory: each (provider, S) runs in a fresh subprocess: build, one warm-up step, grads
reset, then

- ``peak_mb``: peak of live CPU *tensor* memory during one step, above what was live
  before it (parameters, buffers and the input), from the allocation/free events of
  ``torch.profiler(profile_memory=True)`` summed in time order (``common.
  cpu_tensor_peak_bytes``). This counts activations saved for backward, sampled weights,
  noise, temporaries freed inside ops, compiled-kernel buffers and the new ``.grad``
  tensors: what "memory grows with S" is about, byte-exact and free of allocator effects.
- ``rss_peak_mb``: cross-check from the OS: growth of the process's peak RSS over the
  same kind of step (``VmHWM`` after, reset through ``/proc/self/clear_refs``, minus
  ``VmRSS`` before), with glibc's mmap threshold pinned at 64 KiB so that freed tensors go
  back to the OS instead of hiding in malloc's heap.
- ``model_mb``: parameters plus buffers (bayesian-torch keeps eps and prior tensors of
  weight size as buffers).

``peak_vs_spar = peak_mb(provider) / peak_mb(spar)``.

Output: rows appended to ``bench/results/layers_cpu.csv`` (one per provider and S, with
date, host, CPU, threads and versions; ``run`` groups the rows of one invocation), and
``bench/results/layers_cpu.png`` drawn from the CSV (latest full run).

Usage::

    python bench/bench_layers.py [--samples 1 4 16 64] [--quick] [--threads 2]
    python bench/bench_layers.py --plot-only          # redraw the PNG from the CSV
    python bench/bench_layers.py --profile 16         # top ops of spar's step at S=16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("SPAR_BACKEND", "torch")

import common  # noqa: E402  (bench/ is on sys.path when this file runs as a script)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

WIDTH, BATCH, CLASSES, DATASET_SIZE = 1024, 128, 10, 60_000
PROVIDERS = ("spar", "torch_blue", "bayesian_torch")
PEERS = {"torch_blue": "torch-blue", "bayesian_torch": "bayesian-torch"}  # column -> dist
CSV_PATH = common.RESULTS_DIR / "layers_cpu.csv"
PNG_PATH = common.RESULTS_DIR / "layers_cpu.png"
MB = 2**20


# --------------------------------------------------------------------------- providers


@dataclass
class Runner:
    model: nn.Module
    step: Callable[[], None]

    def zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, WIDTH, generator=g)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    return x, y


def _mean_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over samples and examples; out: (S, B, C), y: (B,)."""
    return F.cross_entropy(out.flatten(0, 1), y.repeat(out.shape[0]))


def _build_spar(S: int) -> Runner:
    import spar

    net = nn.Sequential(
        spar.nn.BayesLinear(WIDTH, WIDTH), nn.ReLU(),
        spar.nn.BayesLinear(WIDTH, WIDTH), nn.ReLU(),
        spar.nn.BayesLinear(WIDTH, CLASSES),
    )  # fmt: skip
    mc = spar.nn.MonteCarlo(net, S)
    x, y = _data()

    def step() -> None:
        out = mc(x)  # (S, B, C)
        kl = spar.nn.kl_divergence(net)
        spar.losses.elbo(out, y, kl=kl, dataset_size=DATASET_SIZE).backward()

    return Runner(mc, step)


def _build_torch_blue(S: int) -> Runner:
    from torch_blue import vi

    net = vi.VISequential(
        vi.VILinear(WIDTH, WIDTH), nn.ReLU(),
        vi.VILinear(WIDTH, WIDTH), nn.ReLU(),
        vi.VILinear(WIDTH, CLASSES),
    )  # fmt: skip
    x, y = _data()

    def step() -> None:
        out = net(x, samples=S)  # VIReturn (S, B, C); log_probs (S, 2): log p(w_s), log q(w_s)
        lp = out.log_probs.reshape(-1, 2)
        kl = (lp[:, 1] - lp[:, 0]).mean()
        loss = _mean_ce(out.as_subclass(torch.Tensor), y) + kl / DATASET_SIZE
        loss.backward()

    return Runner(net, step)


def _build_bayesian_torch(S: int) -> Runner:
    from bayesian_torch.layers import LinearReparameterization
    from bayesian_torch.models.dnn_to_bnn import get_kl_loss

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = LinearReparameterization(WIDTH, WIDTH)
            self.fc2 = LinearReparameterization(WIDTH, WIDTH)
            self.fc3 = LinearReparameterization(WIDTH, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.relu(self.fc1(x, return_kl=False))
            x = F.relu(self.fc2(x, return_kl=False))
            return self.fc3(x, return_kl=False)

    net = MLP()
    x, y = _data()

    def step() -> None:
        out = torch.stack([net(x) for _ in range(S)])  # (S, B, C)
        loss = _mean_ce(out, y) + get_kl_loss(net) / DATASET_SIZE
        loss.backward()

    return Runner(net, step)


BUILDERS = {
    "spar": _build_spar,
    "torch_blue": _build_torch_blue,
    "bayesian_torch": _build_bayesian_torch,
}


def build(provider: str, S: int) -> Runner:
    torch.manual_seed(0)
    return BUILDERS[provider](S)


def available(providers: list[str]) -> list[str]:
    """The providers whose library imports; the others are skipped with a note."""
    ok = []
    for p in providers:
        try:
            build(p, 1)
        except ImportError as e:
            print(f"[bench_layers] skipping {p}: {e}", file=sys.stderr)
        else:
            ok.append(p)
    return ok


# --------------------------------------------------------------------------- measurement


def warm_up(runner: Runner, steps: int = 2) -> float:
    """Run ``steps`` steps; seconds of the last one."""
    t = 0.0
    for _ in range(steps):
        t, _ = common.time_once(runner.step, runner.zero_grad)
    return t


def time_providers(
    providers: list[str],
    S: int,
    *,
    budget_s: float,
    min_rounds: int,
    busy_above: float | None,
    max_wait: float,
) -> dict[str, common.Stats]:
    runners = {p: build(p, S) for p in providers}
    round_s = sum(warm_up(r) for r in runners.values())
    rounds = int(min(25, max(min_rounds, budget_s // max(round_s, 1e-6))))
    return common.time_interleaved(
        {p: r.step for p, r in runners.items()},
        rounds=rounds,
        setup={p: r.zero_grad for p, r in runners.items()},
        busy_above=busy_above,
        max_wait=max_wait,
    )


def memory_worker(provider: str, S: int) -> dict:
    """Body of the fresh subprocess that measures one provider at one S."""
    runner = build(provider, S)
    warm_up(runner, steps=1)  # compiles spar's generator; nothing else needs more
    state = [*runner.model.parameters(), *runner.model.buffers()]
    out = {"model_mb": sum(t.numel() * t.element_size() for t in state) / MB}
    runner.zero_grad()
    gc.collect()
    rss = common.rss_peak_growth_bytes(runner.step)
    out["rss_peak_mb"] = None if rss is None else rss / MB
    runner.zero_grad()
    gc.collect()
    out["peak_mb"] = common.cpu_tensor_peak_bytes(runner.step) / MB
    return out


def measure_memory(provider: str, S: int, threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads)]
    cmd += ["--memory-worker", provider, str(S)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {provider} S={S} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def profile_spar(S: int, rows: int = 15) -> None:
    """Print the top ops (self CPU time) of one spar step at S samples."""
    from torch.profiler import ProfilerActivity, profile

    runner = build("spar", S)
    warm_up(runner)
    runner.zero_grad()
    common.wait_for_quiet(0.1, timeout=60.0)
    prof = profile(activities=[ProfilerActivity.CPU])

    def profiled_step() -> None:
        with prof:
            runner.step()

    seconds, others = common.time_once(profiled_step)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    print(
        f"spar S={S}: {seconds * 1e3:.0f} ms under the profiler, "
        f"{torch.get_num_threads()} threads; other processes used {others:.0%} of the CPUs"
    )


# --------------------------------------------------------------------------- results


def _fmt(v: float | None, digits: int = 1) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def make_rows(run: str, env: dict, results: dict, quick: bool) -> list[dict]:
    import spar.ops.dispatch as dispatch

    backend = dispatch.resolve("linear", torch.device("cpu"))[0]
    rows = []
    for (provider, S), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ref = results.get(("spar", S), {})
        st = r["stats"]
        t_ratio = st.median / ref["stats"].median if ref else None
        m_ratio = r["peak_mb"] / ref["peak_mb"] if ref and ref["peak_mb"] else None
        rows.append(
            {
                "run": run, **env, "spar_backend": backend, "provider": provider,
                "samples": S, "batch": BATCH, "width": WIDTH,
                "median_ms": _fmt(st.median), "iqr_ms": _fmt(st.iqr), "min_ms": _fmt(st.min),
                "rounds": st.n, "dropped_rounds": st.dropped,
                "others_cpu": _fmt(st.others, 2), "peak_mb": _fmt(r["peak_mb"]),
                "rss_peak_mb": _fmt(r["rss_peak_mb"]), "model_mb": _fmt(r["model_mb"]),
                "time_vs_spar": _fmt(t_ratio, 2), "peak_vs_spar": _fmt(m_ratio, 2),
                "quick": int(quick),
            }
        )  # fmt: skip
    return rows


def summarize(rows: list[dict]) -> str:
    """Text table of one run and the verdict on the two goals."""
    lines = [
        f"{'provider':<15}{'S':>4}{'median ms':>11}{'IQR ms':>9}{'min ms':>9}"
        f"{'peak MB':>9}{'RSS MB':>9}{'t/spar':>8}{'mem/spar':>9}"
    ]
    for r in rows:
        lines.append(
            f"{r['provider']:<15}{r['samples']:>4}{r['median_ms']:>11}{r['iqr_ms']:>9}"
            f"{r['min_ms']:>9}{r['peak_mb']:>9}{r['rss_peak_mb']:>9}{r['time_vs_spar']:>8}"
            f"{r['peak_vs_spar']:>9}"
        )
    by = {(r["provider"], int(r["samples"])): r for r in rows}
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    samples = sorted({int(r["samples"]) for r in rows})
    peers = [p for p in providers if p != "spar"]
    if "spar" not in providers or not peers:
        return "\n".join(lines)
    big = [s for s in samples if s >= 4]
    faster = [
        s for s in big
        if all(float(by[("spar", s)]["median_ms"]) < float(by[(p, s)]["median_ms"]) for p in peers)
    ]  # fmt: skip
    lines.append(
        f"goal 1 (spar faster than {', '.join(peers)} at S >= 4): "
        + (
            f"{'met' if faster == big else 'NOT met'} (met at S = {faster or 'none'})"
            if big
            else "not measured (no S >= 4)"
        )
    )
    if len(samples) >= 2:
        lo, hi = samples[0], samples[-1]
        slope = {
            p: (float(by[(p, hi)]["peak_mb"]) - float(by[(p, lo)]["peak_mb"])) / (hi - lo)
            for p in providers
        }
        ok = all(slope["spar"] < slope[p] for p in peers)
        lines.append(
            f"goal 2 (peak memory grows slower with S, MB per extra sample S={lo}->{hi}): "
            + ", ".join(f"{p} {v:.2f}" for p, v in slope.items())
            + f" -> {'met' if ok else 'NOT met'}"
        )
    return "\n".join(lines)


def plot(csv_path: Path = CSV_PATH, png_path: Path = PNG_PATH) -> Path | None:
    """Draw time and peak memory against S for the latest full run in the CSV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = common.read_rows(csv_path)
    if not rows:
        return None
    full = [r for r in rows if r.get("quick") == "0"] or rows
    run = max(r["run"] for r in full)
    rows = [r for r in full if r["run"] == run]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.3))
    samples = sorted({int(r["samples"]) for r in rows})
    present = {r["provider"] for r in rows}
    for provider in [p for p in PROVIDERS if p in present] + sorted(present - set(PROVIDERS)):
        rs = sorted((r for r in rows if r["provider"] == provider), key=lambda r: int(r["samples"]))
        s = [int(r["samples"]) for r in rs]
        med = [float(r["median_ms"]) for r in rs]
        iqr = [float(r["iqr_ms"]) for r in rs]
        # the CSV keeps median and IQR only: draw the IQR as a bar of its length around the median
        err = [[min(i / 2, m * 0.9) for i, m in zip(iqr, med, strict=True)], [i / 2 for i in iqr]]
        ax_t.errorbar(s, med, yerr=err, marker="o", capsize=3, label=provider)
        ax_m.plot(s, [float(r["peak_mb"]) for r in rs], marker="o", label=provider)
    for ax, ylabel in ((ax_t, "fwd+bwd step, median ms (bars: IQR)"), (ax_m, "peak tensor MB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(samples, [str(s) for s in samples])
        ax.set_xlabel("Monte Carlo samples S")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    r0 = rows[0]
    fig.suptitle(
        f"Bayesian MLP {WIDTH}-{WIDTH}-{WIDTH}-{CLASSES}, batch {BATCH}, CPU "
        f"({r0['cpu']}, {r0['threads']} threads) - {r0['date'][:10]}\n"
        f"torch {r0['torch']}, spar {r0['spar']} ({r0.get('spar_backend', '')}, src "
        f"{r0.get('spar_src', '')}), torch_blue {r0.get('torch_blue', '')}, "
        f"bayesian-torch {r0.get('bayesian_torch', '')}",
        fontsize=9,
    )
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--samples",
        type=int,
        nargs="+",
        default=None,
        help="S values (default 1 4 16 64; 1 4 with --quick)",
    )
    ap.add_argument("--quick", action="store_true", help="fewer rounds, S = 1 4 by default")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--csv", type=Path, default=CSV_PATH)
    ap.add_argument("--png", type=Path, default=PNG_PATH)
    ap.add_argument(
        "--busy",
        type=float,
        default=0.15,
        help="share of the CPUs used by other processes above which the machine counts as "
        "busy: timing waits for a quiet machine and reruns busy rounds (default 0.15; "
        "negative: never wait)",
    )
    ap.add_argument(
        "--max-wait",
        type=float,
        default=300.0,
        help="seconds per S that timing may spend waiting for and rerunning busy rounds",
    )
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the CSV")
    ap.add_argument("--profile", type=int, metavar="S", help="print spar's top ops at S")
    ap.add_argument("--memory-worker", nargs=2, metavar=("PROVIDER", "S"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.memory_worker:
        provider, S = args.memory_worker[0], int(args.memory_worker[1])
        print(json.dumps(memory_worker(provider, S)))
        return 0
    if args.plot_only:
        print(plot(args.csv, args.png))
        return 0
    if args.profile:
        profile_spar(args.profile)
        return 0

    samples = args.samples or ([1, 4] if args.quick else [1, 4, 16, 64])
    if any(s < 1 for s in samples):
        raise ValueError(f"--samples must be >= 1, got {samples}")
    budget_s, min_rounds = (6.0, 3) if args.quick else (45.0, 5)
    t_start = time.perf_counter()
    providers = available(args.providers)
    env = common.env_info(PEERS)
    run = env["date"]
    results: dict[tuple[str, int], dict] = {}
    for S in samples:
        stats = time_providers(
            providers,
            S,
            budget_s=budget_s,
            min_rounds=min_rounds,
            busy_above=args.busy if args.busy >= 0 else None,
            max_wait=args.max_wait,
        )
        for p, st in stats.items():
            results[(p, S)] = {"stats": st}
            print(
                f"[time] S={S:<3} {p:<15} median {st.median:9.1f} ms  IQR {st.iqr:7.1f}  "
                f"min {st.min:8.1f}  ({st.n} rounds, {st.dropped} dropped as busy; others "
                f"used {st.others:.0%} of the CPUs)",
                flush=True,
            )
        gc.collect()
    for S in samples:
        for p in providers:
            results[(p, S)].update(measure_memory(p, S, args.threads))
            print(
                f"[mem]  S={S:<3} {p:<15} peak {results[(p, S)]['peak_mb']:8.1f} MB  "
                f"RSS {_fmt(results[(p, S)]['rss_peak_mb'])} MB",
                flush=True,
            )
    rows = make_rows(run, env, results, args.quick)
    common.append_rows(args.csv, rows)
    print(summarize(rows))
    print(
        f"wrote {args.csv} and {plot(args.csv, args.png)} in {time.perf_counter() - t_start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
