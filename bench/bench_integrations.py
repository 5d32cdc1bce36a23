"""What do the integrations cost? (spar.integrations.lightning and .peft, CPU)

1. ``--part lightning``: the step time of a Lightning ``Trainer`` with spar's
   ``SamplingParallel`` strategy against spar's own loop (``SampleParallel`` +
   ``GridSampler`` + the same optimiser), same model, same data, same 2-rank gloo job
   (sample axis 2). The two run side by side, one step each in turn (a callback runs a
   step of spar's loop before every Lightning step), so that load from other processes
   hits both alike. A spar step is data loading, forward, backward with the gradient
   all-reduce and the optimiser step; a Lightning step is the time from the end of that
   spar step to the next batch start (the same work plus Lightning's loop and hooks).
   Median over the steps after warm-up, for each of ``--rounds`` fresh Trainers and
   pooled, in wall time and in the process's CPU time (robust to other processes' load).
   The overhead goal is <= 5 %.
2. ``--part lora``: Bayesian LoRA (``bayesianize_lora``) on a tiny Llama (from a config)
   at S = 1, 4, 16 on one process: the training step (forward, ELBO, backward, Adam) and
   its peak memory, against S-fold replication of the batch by hand (``input_ids.repeat``
   and a hand-written Bayesian A that draws and keeps one weight sample per Monte Carlo
   sample: ``mu + sigma * randn(S, ...)``, used by ``bmm`` (reparam) or with random signs
   per token (flipout, as BLoB's code)). Peak memory is the peak of the
   bytes held by live tensors during one step, above what was live before it, from the
   torch profiler's allocation events (``profile_memory=True``): exact, independent of the
   allocator's caching. The providers take turns, one step each, for ``--steps`` rounds.

    python bench/bench_integrations.py                  # both parts
    python bench/bench_integrations.py --part lora --steps 10

Rows go to ``results/integrations_cpu.csv``; ``results/integrations_cpu.md`` is written from
the rows of this run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, append_rows, env_info, others_cpu  # noqa: E402

import spar  # noqa: E402
import spar.distributed as sd  # noqa: E402

CSV = RESULTS_DIR / "integrations_cpu.csv"
REPORT = RESULTS_DIR / "integrations_cpu.md"

# --------------------------------------------------------------------------- lightning

L_SAMPLES, L_BATCH, L_FEATURES, L_CLASSES = 8, 64, 64, 10


def _mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(L_FEATURES, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, L_CLASSES),
    )  # fmt: skip
    return spar.nn.bayesianize(net)


def _lightning_worker(steps: int, warmup: int, rounds: int, width: int) -> dict:
    import lightning.pytorch as L
    from torch.utils.data import DataLoader, TensorDataset

    from spar.integrations.lightning import SamplingParallel

    os.environ["TORCHELASTIC_RUN_ID"] = "bench"  # what torchrun sets: Lightning does not re-launch
    torch.set_num_threads(1)
    grid = sd.init(sample=2)
    n = (steps + warmup + 1) * L_BATCH
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(n, L_FEATURES, generator=g), torch.randint(0, L_CLASSES, (n,), generator=g)
    )

    def spar_loop() -> Iterator[None]:
        """spar's own loop, one step per ``next``."""
        model = _mlp(width)
        sp = sd.SampleParallel(model, L_SAMPLES, grid, augment=None)
        opt = torch.optim.Adam(sp.parameters(), lr=1e-3)
        sampler = spar.data.GridSampler(data, grid, batch_size=L_BATCH)
        for x, y in DataLoader(data, batch_size=L_BATCH, sampler=sampler):
            kl = spar.nn.kl_divergence(sp)
            loss = spar.losses.elbo(sp(x), y, kl=kl, dataset_size=n)
            opt.zero_grad()
            loss.backward()
            opt.step()
            yield

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.mc = spar.nn.MonteCarlo(_mlp(width), L_SAMPLES)

        def training_step(self, batch, batch_idx):
            x, y = batch
            kl = spar.nn.kl_divergence(self.mc)
            return spar.losses.elbo(self.mc(x), y, kl=kl, dataset_size=n)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    class Paired(L.Callback):
        """Runs one step of spar's loop before every Lightning step, so that the two are
        timed side by side: a Lightning step is the time from the end of that spar step to
        the next batch start (Lightning's loop, fetch, step and hooks)."""

        def __init__(self) -> None:
            self.loop = spar_loop()
            self.mark: tuple[float, float] | None = None
            self.spar: list[tuple[float, float]] = []  # (wall, CPU) seconds per step
            self.lightning: list[tuple[float, float]] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            t0 = (time.perf_counter(), time.process_time())
            if self.mark is not None:
                self.lightning.append((t0[0] - self.mark[0], t0[1] - self.mark[1]))
            next(self.loop)
            self.mark = (time.perf_counter(), time.process_time())
            self.spar.append((self.mark[0] - t0[0], self.mark[1] - t0[1]))

    out: dict = {"spar": [], "lightning": [], "others": []}
    for _ in range(rounds):
        clock = Paired()
        trainer = L.Trainer(
            strategy=SamplingParallel(sample=2), accelerator="cpu", devices=2,
            max_steps=steps + warmup + 1, callbacks=[clock], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        with others_cpu() as others:
            trainer.fit(Module(), DataLoader(data, batch_size=L_BATCH, shuffle=True))
        out["spar"].append(clock.spar[warmup : warmup + steps])
        out["lightning"].append(clock.lightning[warmup : warmup + steps])
        out["others"].append(others())
    sd.shutdown()
    return out


def bench_lightning(args, run_id: str) -> list[dict]:
    rows = []
    for width in args.widths:
        rows += _bench_lightning(args, run_id, width)
    return rows


def _bench_lightning(args, run_id: str, width: int) -> list[dict]:
    res = sd.spawn(
        _lightning_worker, 2, args=(args.steps, args.warmup, args.rounds, width), timeout=900
    )[0]
    info = env_info(packages={"lightning": "lightning"})

    def row(round_, spar: list, light: list, others: float) -> dict:
        ms = {
            f"{name}_{kind}_ms": round(statistics.median(t[i] for t in times) * 1e3, 3)
            for name, times in (("spar", spar), ("lightning", light))
            for i, kind in ((0, "step"), (1, "cpu"))
        }
        return {
            **info, "run_id": run_id, "part": "lightning", "width": width, "round": round_,
            "ranks": 2,
            "sample_axis": 2, "samples": L_SAMPLES, "batch": L_BATCH, "steps": len(spar), **ms,
            "overhead_pct": round(100 * (ms["lightning_step_ms"] / ms["spar_step_ms"] - 1), 2),
            "overhead_cpu_pct": round(100 * (ms["lightning_cpu_ms"] / ms["spar_cpu_ms"] - 1), 2),
            "others_cpu": round(others, 3),
            "loadavg": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        }  # fmt: skip

    rows = [
        row(r, res["spar"][r], res["lightning"][r], res["others"][r]) for r in range(args.rounds)
    ]
    pooled = [[t for ts in res[name] for t in ts] for name in ("spar", "lightning")]
    rows.append(row("all", *pooled, max(res["others"])))
    return rows


# --------------------------------------------------------------------------- LoRA

VOCAB, T, B = 128, 64, 8
PROVIDERS = ("spar_flipout", "by_hand_flipout", "spar_reparam", "by_hand_reparam")


def _tiny_peft_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T,
    )  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    return get_peft_model(LlamaForCausalLM(config), lora)


class _HandLoraA(nn.Module):
    """Bayesian LoRA A as written without spar, on the replicated batch: a weight sample
    per Monte Carlo sample, drawn with ``torch.randn`` and kept for backward (``reparam``:
    ``bmm`` with ``mu + sigma * eps_s``; ``flipout``, as BLoB's code: the mean product plus
    ``((x * r) @ (sigma * eps_s)^T) * q`` with random signs ``r``, ``q`` per token)."""

    def __init__(
        self, mu: nn.Parameter, rho: nn.Parameter, num_samples: int, estimator: str
    ) -> None:
        super().__init__()
        self.mu, self.rho = mu, rho
        self.num_samples, self.estimator = num_samples, estimator

    @property
    def weight(self) -> torch.Tensor:  # peft reads the adapter's dtype from it
        return self.mu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        S = self.num_samples
        xs = x.reshape(S, -1, x.shape[-1])
        delta = F.softplus(self.rho) * torch.randn(S, *self.mu.shape)
        if self.estimator == "reparam":
            out = torch.bmm(xs, (self.mu + delta).transpose(1, 2))
        else:
            r = torch.empty_like(xs).uniform_(-1, 1).sign()
            q = torch.empty(*xs.shape[:-1], self.mu.shape[0]).uniform_(-1, 1).sign()
            out = xs @ self.mu.t() + torch.bmm(xs * r, delta.transpose(1, 2)) * q
        return out.reshape(*x.shape[:-1], -1)

    def kl(self) -> torch.Tensor:
        q = torch.distributions.Normal(self.mu, F.softplus(self.rho))
        p = torch.distributions.Normal(0.0, 0.2)
        return torch.distributions.kl_divergence(q, p).sum()


def _lora_step_fn(provider: str, S: int):
    """``step()`` for one configuration: forward, ELBO, backward, Adam."""
    from spar.integrations.peft import BayesLoraA, CausalLM, bayesianize_lora, next_token

    estimator = provider.rsplit("_", 1)[1]
    peft_model = bayesianize_lora(_tiny_peft_model(), estimator=estimator)
    lm = CausalLM(peft_model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    if provider.startswith("by_hand"):
        hand = []
        for module in peft_model.modules():
            for key, a in getattr(module, "lora_A", {}).items():
                if isinstance(a, BayesLoraA):
                    module.lora_A[key] = _HandLoraA(a.weight_mu, a.weight_rho, S, estimator)
                    hand.append(module.lora_A[key])

        def forward():
            logits = lm(ids.repeat(S, 1))  # the S-fold replicated batch
            return logits.unflatten(0, (S, B)), sum(h.kl() for h in hand)
    else:
        mc = spar.nn.MonteCarlo(lm, S, fold_input=True)

        def forward():
            return mc(ids), spar.nn.kl_divergence(lm)

    opt = torch.optim.Adam([p for p in lm.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        logits, kl = forward()
        out, target = next_token(logits, ids)
        loss = spar.losses.elbo(out, target, kl=kl, dataset_size=10_000)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _peak_bytes(step) -> int:
    """Peak bytes of live tensors during ``step()`` above those live before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def bench_lora(args, run_id: str) -> list[dict]:
    torch.set_num_threads(1)
    info = env_info(packages={"transformers": "transformers", "peft": "peft"})
    rows = []
    for S in (1, 4, 16):
        steps = {p: _lora_step_fn(p, S) for p in PROVIDERS}
        peaks, times = {}, {p: [] for p in PROVIDERS}
        for provider, step in steps.items():
            for _ in range(args.warmup):
                step()
            peaks[provider] = _peak_bytes(step)
        # the providers take turns, one step each, so that other load hits all alike
        with others_cpu() as others:
            for _ in range(args.steps):
                for provider, step in steps.items():
                    t0 = time.perf_counter()
                    step()
                    times[provider].append(time.perf_counter() - t0)
        share = round(others(), 3)
        for provider in PROVIDERS:
            rows.append({
                **info, "run_id": run_id, "part": "lora", "provider": provider, "samples": S,
                "batch": B, "seq_len": T, "steps": args.steps,
                "step_ms": round(statistics.median(times[provider]) * 1e3, 3),
                "peak_mib": round(peaks[provider] / 2**20, 3), "others_cpu": share,
                "loadavg": " ".join(f"{v:.2f}" for v in os.getloadavg()),
            })  # fmt: skip
            print(f"lora S={S:>2} {provider:>15}: {rows[-1]['step_ms']:8.2f} ms, "
                  f"{rows[-1]['peak_mib']:7.2f} MiB", flush=True)  # fmt: skip
    return rows


# --------------------------------------------------------------------------- report


def _report(rows: list[dict], command: str) -> str:
    first = rows[0]
    lines = [
        "# Integrations on CPU (bench/bench_integrations.py)",
        "",
        f"Measured (CPU): {first['cpu']}, {first['threads']} thread(s) per process, torch "
        f"{first['torch']}; run {first['run_id']} ({first['date']}), spar_src "
        f"{first['spar_src']}. Other processes' share of the CPUs during the timed steps "
        "is the column `others_cpu` (this machine is shared: compare the ratios of one "
        "run, not absolute times across runs).",
        "",
        f"Command: `{command}`",
        "",
    ]
    light = [r for r in rows if r["part"] == "lightning"]
    if light:
        lines += [
            "## Lightning: SamplingParallel strategy vs spar's own loop",
            "",
            f"2 ranks (gloo, sample axis 2), Bayesian MLP 64-w-w-10, S = {L_SAMPLES}, "
            f"B = {L_BATCH}, Adam; median step over the steps after warm-up, wall time and "
            "this process's CPU time (`time.process_time`, which other processes' load "
            "does not inflate; it leaves out waiting in collectives).",
            "",
            "| w | round | steps | spar loop ms | Lightning ms | overhead | spar CPU ms | "
            "Lightning CPU ms | CPU overhead | others_cpu |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['width']} | {r['round']} | {r['steps']} | {r['spar_step_ms']:.2f} | "
            f"{r['lightning_step_ms']:.2f} | {r['overhead_pct']:+.1f} % | "
            f"{r['spar_cpu_ms']:.2f} | {r['lightning_cpu_ms']:.2f} | "
            f"{r['overhead_cpu_pct']:+.1f} % | {r['others_cpu']} |"
            for r in light
        ]
        lines.append("")
    lora = [r for r in rows if r["part"] == "lora"]
    if lora:
        lines += [
            "## Bayesian LoRA: spar's folded batch vs S-fold replication by hand",
            "",
            f"Tiny Llama (2 layers, hidden 64, vocab {VOCAB}), LoRA r = 8 on q_proj and "
            f"v_proj, B = {B} sequences of T = {T} tokens, one process; step = forward, "
            "ELBO, backward, Adam (median); memory = peak of live tensor bytes during one "
            "step (profiler).",
            "",
            "| S | provider | step ms | peak MiB | step / by hand | memory / by hand |",
            "|---|---|---|---|---|---|",
        ]
        # each provider against the hand-written version of the same estimator
        hand = {(r["samples"], r["provider"].rsplit("_", 1)[1]): r for r in lora
                if r["provider"].startswith("by_hand")}  # fmt: skip
        for r in lora:
            h = hand[r["samples"], r["provider"].rsplit("_", 1)[1]]
            lines.append(
                f"| {r['samples']} | {r['provider']} | {r['step_ms']:.2f} | "
                f"{r['peak_mib']:.2f} | {r['step_ms'] / h['step_ms']:.2f} | "
                f"{r['peak_mib'] / h['peak_mib']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--part", choices=("lightning", "lora", "all"), default="all")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3, help="Lightning: Trainers per width")
    parser.add_argument(
        "--widths", type=int, nargs="+", default=[256, 1024], help="Lightning: MLP widths"
    )
    args = parser.parse_args()
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    rows: list[dict] = []
    if args.part in ("lightning", "all"):
        rows += bench_lightning(args, run_id)
        for r in rows:
            spar_ms, light_ms = r["spar_step_ms"], r["lightning_step_ms"]
            print(f"lightning w={r['width']} round {r['round']}: spar {spar_ms:.2f} ms, "
                  f"Lightning {light_ms:.2f} ms ({r['overhead_pct']:+.1f} %; CPU time "
                  f"{r['overhead_cpu_pct']:+.1f} %)")  # fmt: skip
    if args.part in ("lora", "all"):
        rows += bench_lora(args, run_id)
    append_rows(CSV, rows)
    command = " ".join(["python bench/bench_integrations.py", *sys.argv[1:]])
    REPORT.write_text(_report(rows, command))
    print(f"wrote {CSV.name} and {REPORT.name}")


if __name__ == "__main__":
    main()
