"""Bayesian networks' training step (CPU, or ``--device cuda``): spar against its peers and
against floors.

One script, one question per ``--config`` (each config's providers are timed interleaved in
one invocation, "the same run"):

``mlp`` (default)
    3-layer Bayesian MLP 1024 -> 1024 -> 1024 -> 10 (ReLU; the issue writes
    "1024-1024-10", this is the net the script has always measured, with two hidden
    layers), batch 128, S = 1, 4, 16, 64. Providers ``spar`` (``estimator="reparam"``),
    ``torch_blue``, ``bayesian_torch`` and ``bmm``, the floor: the same network on weights
    sampled once, outside the timed step. Goals: spar faster than both peers at S >= 4 and
    its peak memory growing more slowly with S (the original question); spar's step at most
    2.3x the ``bmm`` step at S = 16 and 64.
``mlp-lrt``
    The same MLP at S = 16 with the local reparameterization trick: spar
    (``MonteCarlo(..., estimator="lrt")``) against torch_blue's fast path (below). Goal:
    spar at least 1.3x faster than torch_blue.
``small``
    MLP 64 -> 128 -> 128 -> 8, batch 64, S = 8: spar, bayesian-torch, ``deterministic``
    (the plain ``nn`` network on the 8-fold batch) and ``bmm``. Goal: spar's step at most
    0.5x bayesian-torch's.
``cnn``
    CIFAR-shaped CNN: conv 3->32 (3x3, pad 1), ReLU, max-pool 2, conv 32->64 (3x3, pad 1),
    ReLU, max-pool 2, flatten, linear 4096->10; input (32, 3, 32, 32), S = 8. Providers
    ``spar`` (``MonteCarlo(chunk=None)``), ``spar_chunked`` (``chunk="auto"``),
    ``bayesian_torch`` and ``deterministic``. Goal: the better spar at most 0.8x
    bayesian-torch, with ``spar_chunked`` equal to ``spar`` within fp32 rounding (checked
    once, outside the timing, on the outputs and parameter gradients of the same two steps;
    ``out_maxdiff`` / ``grad_maxdiff``, max abs difference).

One step, every provider: S weight samples of all layers, outputs ``(S, B, C)``, loss
``mean over (s, b) of cross-entropy + KL / N`` (N = 60000), ``loss.backward()``; no
optimizer. Gradients are reset to ``None`` before each step (untimed), so every step
allocates its ``.grad`` tensors, as under ``optimizer.zero_grad()``.

Providers, each used the way its documentation sets up S samples:

- ``spar``: ``spar.nn.MonteCarlo(nn.Sequential(BayesLinear | BayesConv2d, ReLU, ...), S,
  estimator=..., chunk=...)``; loss ``spar.losses.elbo(out, y, kl=spar.nn.kl_divergence(net),
  dataset_size=N)`` (closed-form KL). ``SPAR_BACKEND`` defaults to ``torch`` here.
  ``spar_chunked`` is the same with ``chunk="auto"`` (the ``chunk`` column records the
  chunk it chose, ``auto:c``).
- ``torch_blue``: ``vi.VISequential(vi.VILinear, nn.ReLU, ...)`` called as
  ``net(x, samples=S)``: the outermost module expands the batch and ``torch.vmap``s the
  forward over samples (``randomness="different"``). Weight sampling needs
  ``return_log_probs=True`` (the default), so with ``reparam`` the KL term is torch_blue's
  Monte Carlo estimate ``mean_s[log q(w_s) - log p(w_s)]`` from ``out.log_probs``, as in
  its ``KullbackLeiblerLoss``. With ``return_log_probs=False`` VILinear takes its fast
  path, the local reparameterization trick (the ``lrt`` rows): the KL term is then the
  closed form of its ``AnalyticalKullbackLeiblerLoss.prior_matching()`` (the loss that sets
  ``return_log_probs=False``). The data term is the same mean cross-entropy as for the
  others.
- ``bayesian_torch``: ``LinearReparameterization`` / ``Conv2dReparameterization`` layers,
  the num_mc loop of its examples: ``torch.stack([net(x) for _ in range(S)])`` with
  ``return_kl=False`` in the loop and the closed-form KL once per step (``get_kl_loss``; a
  per-element mean in this library, which changes the loss value, not the work). Note:
  bayesian-torch keeps ``eps`` in one buffer that each forward overwrites through ``.data``,
  so after a loop of S > 1 forwards the gradient of every ``rho`` is computed with the
  *last* sample's noise (wrong for S > 1), and its memory does not include S copies of
  ``eps``.
- ``bmm`` (MLPs): weights ``(S, out, in)`` and biases ``(S, 1, out)`` sampled once at build
  time and held as leaves that require grad; the step is ``torch.baddbmm`` per layer on the
  input expanded to ``(S, B, in)``, ReLU, the mean cross-entropy (no KL: there are no
  ``mu``/``rho``), backward. The same GEMMs as any weight-sampling estimator, without
  noise, sampling or the reduction of per-sample gradients into ``mu``/``rho``: the floor.
- ``deterministic`` (small, cnn): the plain ``nn`` network (``nn.Linear`` / ``nn.Conv2d``)
  on the input repeated S times (``(S*B, ...)``, built once), the mean cross-entropy over
  ``(S, B, C)``, backward: what the same work costs without any Bayesian layer.

Timing: after warming up each provider (two steps and at least 0.3 s; the first step
compiles spar's noise generator for that shape and measures ``chunk="auto"``), the
providers are timed round-robin, one call each per round, in an order rotated every round
(``common.time_interleaved``). A call is ``inner`` consecutive steps (gradients reset
between them, as by an optimizer) when one step is shorter than 0.1 s, so that a call
lasts about 0.1 s and the machine-load probe (10 ms ticks) can judge it; the reported
times are per step (call time / ``inner``). Rounds are sized to a time budget (at least 5,
or 3 with ``--quick``, at most 25). This is manual ``perf_counter`` timing with the GC off,
rather than ``torch.utils.benchmark``, because the latter times one statement at a time: on
a shared 2-vCPU machine where other jobs come and go (a two-thread GEMM flips between ~5
and ~24 ms when one core is taken), only interleaving gives every provider the same
conditions. The machine counts as busy when other processes use more than 15% of the CPUs
(``--busy``, from ``/proc/stat``): each round first waits for a quiet machine, and a round
during which the machine was busy is dropped and rerun (``dropped_rounds``), for up to
``--max-wait`` seconds per S; after that rounds are kept as they come. ``others_cpu`` is
the share of the CPUs other processes used during the kept steps (0 to 1): a row with a
high value was measured on a busy machine. Reported: median, IQR and min over kept rounds,
in ms, and ``time_vs_spar = median(provider) / median(spar)`` (> 1: spar is faster).

Memory (every config; ``--no-memory`` skips it): each (provider, S) runs in a fresh
subprocess: build, one warm-up step, grads reset, then

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
  weight size as buffers; ``bmm`` holds its S sampled weights).

``peak_vs_spar = peak_mb(provider) / peak_mb(spar)``.

Output: rows appended to ``bench/results/layers_cpu.csv`` (one per config, provider and S,
with date, host, CPU, threads and versions; ``run`` groups the rows of one invocation;
rows written before the ``config`` column existed are the ``mlp`` config with
``estimator=reparam``), ``bench/results/layers_cpu.md`` (the latest full run of each config
and the verdict on its goals) and ``bench/results/layers_cpu.png`` (``mlp``: time and peak
memory against S; the other configs: bars), both drawn from the CSV.

``--profile [S]`` prints where one provider's step (``--profile-provider``, default spar)
of the first ``--config`` spends its time: the step's wall time, then ``torch.profiler``'s
top ops by self CPU time per step (spar's noise generator, which runs through ctypes and is
no aten op, is shown as ``spar.rng.*`` ranges), the time outside any op (Python,
dispatch, autograd bookkeeping), and ``cProfile``'s top Python functions.

On a GPU (``--device cuda``): models, inputs and floors live on the GPU, ``SPAR_BACKEND``
defaults to ``auto`` (Triton) instead of ``torch``, every timed step ends with
``torch.cuda.synchronize()`` (so the wall clock around a call covers the GPU work it
launched), and memory is measured in-process from the caching allocator: ``peak_mb`` is
``torch.cuda.max_memory_allocated`` during one step minus what was allocated before it
(``rss_peak_mb`` stays empty). Output defaults to ``bench/results/layers_gpu.{csv,md,png}``;
rows carry ``device`` and ``device_name`` (the GPU's name). The goals printed are the CPU
issue's; on a GPU they are informative only.

Usage::

    python bench/bench_layers.py [--config mlp] [--samples 1 4 16 64] [--quick]
    python bench/bench_layers.py --device cuda --config mlp small cnn --quick
    python bench/bench_layers.py --config all          # the four configs, one after another
    python bench/bench_layers.py --plot-only           # redraw the PNG and the MD from the CSV
    python bench/bench_layers.py --config small --profile      # where spar's step goes
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import json
import math
import os
import pstats
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_USER_BACKEND = os.environ.get("SPAR_BACKEND")  # None: main() picks per device
os.environ.setdefault("SPAR_BACKEND", "torch")

import common  # noqa: E402  (bench/ is on sys.path when this file runs as a script)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

DATASET_SIZE = 60_000
PEERS = {"torch_blue": "torch-blue", "bayesian_torch": "bayesian-torch"}  # column -> dist
CSV_PATH = common.RESULTS_DIR / "layers_cpu.csv"
PNG_PATH = common.RESULTS_DIR / "layers_cpu.png"
MD_PATH = common.RESULTS_DIR / "layers_cpu.md"
# where models and inputs live (main() sets it from --device)
DEVICE = torch.device("cpu")
MB = 2**20
MIN_CALL_S = 0.1  # a timed call repeats the step until it lasts about this long
CNN_INPUT = (3, 32, 32)
FIELDS = [
    "run", "date", "host", "cpu", "gpu", "device", "device_name", "threads", "python",
    "torch", "spar", "spar_src",
    "torch_blue", "bayesian_torch", "spar_backend", "config", "net", "provider",
    "estimator", "chunk", "samples", "batch", "width", "inner", "median_ms", "iqr_ms",
    "min_ms", "rounds", "dropped_rounds", "others_cpu", "peak_mb", "rss_peak_mb",
    "model_mb", "time_vs_spar", "peak_vs_spar", "out_maxdiff", "grad_maxdiff", "quick",
]  # fmt: skip


@dataclass(frozen=True)
class Config:
    name: str
    kind: str  # "mlp" or "cnn"
    dims: tuple[int, ...]  # mlp: in, hidden..., classes; cnn: classes
    batch: int
    samples: tuple[int, ...]
    quick_samples: tuple[int, ...]
    providers: tuple[str, ...]  # the defaults, in plotting order
    allowed: tuple[str, ...]
    estimator: str = "reparam"  # of spar (and torch_blue: "lrt" takes its fast path)

    @property
    def classes(self) -> int:
        return self.dims[-1]

    @property
    def net(self) -> str:
        if self.kind == "cnn":
            return "conv32-pool-conv64-pool-fc10 on 3x32x32"
        return "-".join(map(str, self.dims))

    @property
    def width(self) -> int | str:
        return max(self.dims[1:-1]) if self.kind == "mlp" else ""


_MLP = (1024, 1024, 1024, 10)
_MLP_PROVIDERS = ("spar", "torch_blue", "bayesian_torch", "bmm", "deterministic")
_CNN_PROVIDERS = ("spar", "spar_chunked", "bayesian_torch", "deterministic")
CONFIGS = {
    c.name: c
    for c in (
        Config("mlp", "mlp", _MLP, batch=128, samples=(1, 4, 16, 64), quick_samples=(1, 4),
               providers=("spar", "torch_blue", "bayesian_torch", "bmm"),
               allowed=_MLP_PROVIDERS),
        Config("mlp-lrt", "mlp", _MLP, batch=128, samples=(16,), quick_samples=(16,),
               providers=("spar", "torch_blue"), allowed=("spar", "torch_blue"),
               estimator="lrt"),
        Config("small", "mlp", (64, 128, 128, 8), batch=64, samples=(8,), quick_samples=(8,),
               providers=("spar", "bayesian_torch", "deterministic", "bmm"),
               allowed=_MLP_PROVIDERS),
        Config("cnn", "cnn", (10,), batch=32, samples=(8,), quick_samples=(8,),
               providers=_CNN_PROVIDERS, allowed=_CNN_PROVIDERS),
    )
}  # fmt: skip


# --------------------------------------------------------------------------- providers


@dataclass
class Runner:
    model: nn.Module
    forward: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # -> (outputs (S, B, C), loss)
    estimator: str = ""
    chunk: Callable[[], str] = field(default=lambda: "")

    def step(self) -> None:
        self.forward()[1].backward()
        if DEVICE.type == "cuda":  # the wall clock around a step covers its GPU work
            torch.cuda.synchronize(DEVICE)

    def zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None


def _data(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (cfg.batch, *CNN_INPUT) if cfg.kind == "cnn" else (cfg.batch, cfg.dims[0])
    x = torch.randn(shape, generator=g)
    y = torch.randint(0, cfg.classes, (cfg.batch,), generator=g)
    return x.to(DEVICE), y.to(DEVICE)


def _mean_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over samples and examples; out: (S, B, C), y: (B,)."""
    return F.cross_entropy(out.flatten(0, 1), y.repeat(out.shape[0]))


def _layers(cfg: Config, linear: Callable, conv: Callable | None = None) -> list[nn.Module]:
    """The config's network as a list of modules, Bayesian or not by the constructors."""
    if cfg.kind == "cnn":
        return [
            conv(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            conv(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), linear(64 * 8 * 8, cfg.classes),
        ]  # fmt: skip
    mods: list[nn.Module] = []
    for k, n in zip(cfg.dims[:-1], cfg.dims[1:], strict=True):
        mods += [linear(k, n), nn.ReLU()]
    return mods[:-1]


def _build_spar(cfg: Config, S: int, chunk: int | str | None = None) -> Runner:
    import spar

    net = nn.Sequential(*_layers(cfg, spar.nn.BayesLinear, spar.nn.BayesConv2d)).to(DEVICE)
    mc = spar.nn.MonteCarlo(net, S, estimator=cfg.estimator, chunk=chunk).to(DEVICE)
    x, y = _data(cfg)

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        out = mc(x)  # (S, B, C)
        kl = spar.nn.kl_divergence(net)
        return out, spar.losses.elbo(out, y, kl=kl, dataset_size=DATASET_SIZE)

    def chunk_label() -> str:
        if chunk is None:
            return "none"
        c = mc.chunk_size(x)
        return f"{chunk}:{c}" if chunk == "auto" else str(c)

    return Runner(mc, forward, cfg.estimator, chunk_label)


def _build_spar_chunked(cfg: Config, S: int) -> Runner:
    return _build_spar(cfg, S, chunk="auto")


def _build_torch_blue(cfg: Config, S: int) -> Runner:
    from torch_blue import vi

    if cfg.kind != "mlp":
        raise ValueError("torch_blue is measured on the MLP configs only")
    net = vi.VISequential(*_layers(cfg, vi.VILinear)).to(DEVICE)
    x, y = _data(cfg)
    if cfg.estimator == "lrt":
        # the analytical loss sets return_log_probs=False: VILinear's fast path (LRT)
        kl_loss = vi.AnalyticalKullbackLeiblerLoss(
            net, vi.distributions.Categorical(), dataset_size=DATASET_SIZE
        )
        assert not net.return_log_probs

        def forward() -> tuple[torch.Tensor, torch.Tensor]:
            out = net(x, samples=S).as_subclass(torch.Tensor)  # (S, B, C)
            return out, _mean_ce(out, y) + kl_loss.prior_matching() / DATASET_SIZE

    else:

        def forward() -> tuple[torch.Tensor, torch.Tensor]:
            out = net(x, samples=S)  # VIReturn (S, B, C); log_probs (S, 2): log p, log q
            lp = out.log_probs.reshape(-1, 2)
            kl = (lp[:, 1] - lp[:, 0]).mean()
            out = out.as_subclass(torch.Tensor)
            return out, _mean_ce(out, y) + kl / DATASET_SIZE

    return Runner(net, forward, cfg.estimator)


def _build_bayesian_torch(cfg: Config, S: int) -> Runner:
    from bayesian_torch.layers import Conv2dReparameterization, LinearReparameterization
    from bayesian_torch.models.dnn_to_bnn import get_kl_loss

    bayes = (LinearReparameterization, Conv2dReparameterization)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(_layers(cfg, LinearReparameterization,
                                                Conv2dReparameterization))  # fmt: skip

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for m in self.layers:
                x = m(x, return_kl=False) if isinstance(m, bayes) else m(x)
            return x

    net = Net().to(DEVICE)
    x, y = _data(cfg)

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.stack([net(x) for _ in range(S)])  # (S, B, C)
        return out, _mean_ce(out, y) + get_kl_loss(net) / DATASET_SIZE

    return Runner(net, forward, "reparam")


def _build_bmm(cfg: Config, S: int) -> Runner:
    if cfg.kind != "mlp":
        raise ValueError("bmm is the floor of the MLP configs only")
    ws, bs = nn.ParameterList(), nn.ParameterList()
    for k, n in zip(cfg.dims[:-1], cfg.dims[1:], strict=True):
        lin = nn.Linear(k, n)
        with torch.no_grad():  # one weight sample per Monte Carlo sample, drawn once
            ws.append(nn.Parameter(lin.weight + 0.01 * torch.randn(S, n, k)))
            bs.append(nn.Parameter((lin.bias + 0.01 * torch.randn(S, n)).unsqueeze(1)))
    model = nn.ModuleDict({"weight": ws, "bias": bs}).to(DEVICE)
    x, y = _data(cfg)
    last = len(ws) - 1

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        h = x.expand(S, *x.shape)
        for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
            h = torch.baddbmm(b, h, w.transpose(1, 2))  # (S, B, out)
            if i < last:
                h = F.relu(h)
        return h, _mean_ce(h, y)

    return Runner(model, forward, "presampled")


def _build_deterministic(cfg: Config, S: int) -> Runner:
    net = nn.Sequential(*_layers(cfg, nn.Linear, nn.Conv2d)).to(DEVICE)
    x, y = _data(cfg)
    xs = x.repeat(S, *([1] * (x.dim() - 1)))  # the S-fold batch, built once

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        out = net(xs).unflatten(0, (S, -1))
        return out, _mean_ce(out, y)

    return Runner(net, forward, "none")


BUILDERS = {
    "spar": _build_spar,
    "spar_chunked": _build_spar_chunked,
    "torch_blue": _build_torch_blue,
    "bayesian_torch": _build_bayesian_torch,
    "bmm": _build_bmm,
    "deterministic": _build_deterministic,
}
PROVIDERS = tuple(BUILDERS)


def build(cfg: Config, provider: str, S: int) -> Runner:
    torch.manual_seed(0)
    return BUILDERS[provider](cfg, S)


def available(cfg: Config, providers: list[str]) -> list[str]:
    """The providers whose library imports; the others are skipped with a note."""
    ok = []
    for p in providers:
        try:
            build(cfg, p, 1)
        except ImportError as e:
            print(f"[bench_layers] {cfg.name}: skipping {p}: {e}", file=sys.stderr)
        else:
            ok.append(p)
    return ok


# --------------------------------------------------------------------------- measurement


def warm_up(runner: Runner, steps: int = 2, min_s: float = 0.0) -> float:
    """Run at least ``steps`` steps and ``min_s`` seconds; seconds of the last step."""
    t, t_end, n = 0.0, time.perf_counter() + min_s, 0
    while n < steps or time.perf_counter() < t_end:
        t, _ = common.time_once(runner.step, runner.zero_grad)
        n += 1
    return t


def repeated(runner: Runner, inner: int) -> Callable[[], None]:
    """``inner`` steps in one call, gradients reset between them (before the first one
    by the untimed setup)."""
    if inner == 1:
        return runner.step

    def call() -> None:
        runner.step()
        for _ in range(inner - 1):
            runner.zero_grad()
            runner.step()

    return call


def time_providers(
    cfg: Config,
    providers: list[str],
    S: int,
    *,
    budget_s: float,
    min_rounds: int,
    busy_above: float | None,
    max_wait: float,
) -> dict[str, dict]:
    """Per provider: ``stats`` (per step), ``inner`` (steps per timed call), ``estimator``
    and ``chunk``."""
    runners = {p: build(cfg, p, S) for p in providers}
    step_s = {p: warm_up(r, min_s=0.3) for p, r in runners.items()}
    inner = {p: max(1, min(1000, math.ceil(MIN_CALL_S / max(t, 1e-6)))) for p, t in step_s.items()}
    round_s = sum(step_s[p] * inner[p] for p in providers)
    rounds = int(min(25, max(min_rounds, budget_s // max(round_s, 1e-6))))
    stats = common.time_interleaved(
        {p: repeated(r, inner[p]) for p, r in runners.items()},
        rounds=rounds,
        setup={p: r.zero_grad for p, r in runners.items()},
        busy_above=busy_above,
        max_wait=max_wait,
    )
    per_step = {
        p: common.Stats(
            median=st.median / inner[p], iqr=st.iqr / inner[p], min=st.min / inner[p],
            n=st.n, others=st.others, dropped=st.dropped,
        )
        for p, st in stats.items()
    }  # fmt: skip
    return {
        p: {"stats": per_step[p], "inner": inner[p], "estimator": r.estimator, "chunk": r.chunk()}
        for p, r in runners.items()
    }


def check_chunked(cfg: Config, S: int, steps: int = 2) -> dict[str, float]:
    """Max abs difference of the outputs and of the parameter gradients between ``spar``
    (one pass) and ``spar_chunked`` over their first ``steps`` steps (the first one of
    ``chunk="auto"`` measures the chunk), computed outside any timing."""
    a, b = build(cfg, "spar", S), build(cfg, "spar_chunked", S)
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    assert all(torch.equal(pa[k], pb[k]) for k in pa), "the two builds differ"
    out_d = grad_d = out_max = grad_max = 0.0
    for _ in range(steps):
        a.zero_grad()
        b.zero_grad()
        (oa, la), (ob, lb) = a.forward(), b.forward()
        la.backward()
        lb.backward()
        out_d = max(out_d, (oa - ob).abs().max().item())
        out_max = max(out_max, oa.abs().max().item())
        for k in pa:
            grad_d = max(grad_d, (pa[k].grad - pb[k].grad).abs().max().item())
            grad_max = max(grad_max, pa[k].grad.abs().max().item())
    return {"out_maxdiff": out_d, "grad_maxdiff": grad_d, "out_absmax": out_max,
            "grad_absmax": grad_max}  # fmt: skip


def memory_worker(cfg: Config, provider: str, S: int) -> dict:
    """Body of the fresh subprocess that measures one provider at one S."""
    runner = build(cfg, provider, S)
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


def cuda_memory(cfg: Config, provider: str, S: int) -> dict:
    """GPU memory of one step, in this process: the caching allocator's peak during the
    step above what was allocated before it (the allocator's counters are exact and reset
    per call, so no fresh process is needed)."""
    runner = build(cfg, provider, S)
    warm_up(runner, steps=1)
    state = [*runner.model.parameters(), *runner.model.buffers()]
    out = {"model_mb": sum(t.numel() * t.element_size() for t in state) / MB, "rss_peak_mb": None}
    runner.zero_grad()
    gc.collect()
    torch.cuda.synchronize(DEVICE)
    base = torch.cuda.memory_allocated(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    runner.step()  # synchronizes
    out["peak_mb"] = (torch.cuda.max_memory_allocated(DEVICE) - base) / MB
    del runner
    torch.cuda.empty_cache()
    return out


def measure_memory(cfg: Config, provider: str, S: int, threads: int) -> dict:
    if DEVICE.type == "cuda":
        return cuda_memory(cfg, provider, S)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads)]
    cmd += ["--memory-worker", cfg.name, provider, str(S)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"memory worker {cfg.name} {provider} S={S} failed:\n{proc.stderr[-3000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- profile


def _rng_ranges() -> Callable[[], None]:
    """Wrap spar's noise-generator entry points (ctypes calls, invisible to the profiler
    as ops) in ``record_function`` ranges; returns the function that undoes it."""
    from spar.rng import NoiseKey

    saved = {}
    for name in ("sample", "normal", "eps_dot"):
        fn = getattr(NoiseKey, name)
        saved[name] = fn

        def wrapped(*args, _fn=fn, _label=f"spar.rng.{name}", **kwargs):
            with torch.profiler.record_function(_label):
                return _fn(*args, **kwargs)

        setattr(NoiseKey, name, functools.wraps(fn)(wrapped))

    def undo() -> None:
        for name, fn in saved.items():
            setattr(NoiseKey, name, fn)

    return undo


def profile_step(cfg: Config, provider: str, S: int, rows: int = 20) -> None:
    """Print where one step of ``provider`` goes: wall time, top ops by self CPU time per
    step, time outside any op, and the top Python functions (cProfile)."""
    from torch.profiler import ProfilerActivity, profile

    runner = build(cfg, provider, S)
    t1 = warm_up(runner, min_s=1.0)
    n = max(1, min(200, math.ceil(1.0 / max(t1, 1e-6))))  # about 1 s of steps
    common.wait_for_quiet(0.1, timeout=60.0)
    with common.others_cpu() as others:
        wall = [common.time_once(runner.step, runner.zero_grad)[0] for _ in range(n)]
    wall.sort()
    wall_ms = wall[len(wall) // 2] * 1e3
    print(
        f"{cfg.name} {provider} S={S} ({cfg.net}, batch {cfg.batch}, "
        f"estimator {runner.estimator}, chunk {runner.chunk() or '-'}): median step "
        f"{wall_ms:.3f} ms over {n} steps, {torch.get_num_threads()} threads; other "
        f"processes used {others():.0%} of the CPUs"
    )

    undo = _rng_ranges()
    try:
        runner.zero_grad()
        runner.step()  # the wrappers' first call outside the profile
        prof = profile(activities=[ProfilerActivity.CPU])
        enabled = gc.isenabled()
        gc.disable()
        try:
            with prof:
                t0 = time.perf_counter()
                for _ in range(n):
                    runner.zero_grad()
                    runner.step()
                prof_ms = (time.perf_counter() - t0) * 1e3 / n
        finally:
            if enabled:
                gc.enable()
    finally:
        undo()
    events = list(prof.key_averages())
    self_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / n
    calls = sum(e.count for e in events) / n
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    print(
        f"\ntorch.profiler, per step (profiled step {prof_ms:.3f} ms; {calls:.0f} op calls "
        f"and ranges): inside ops {self_ms:.3f} ms, outside any op (Python, autograd "
        f"engine, profiler) {prof_ms - self_ms:.3f} ms"
    )
    print(f"{'op':<58}{'calls':>7}{'self ms':>10}{'total ms':>10}{'% step':>8}")
    for e in events[:rows]:
        s = e.self_cpu_time_total / 1e3 / n
        print(
            f"{e.key[:57]:<58}{e.count / n:>7.0f}{s:>10.3f}"
            f"{e.cpu_time_total / 1e3 / n:>10.3f}{100 * s / prof_ms:>7.1f}%"
        )

    pr = cProfile.Profile()
    runner.zero_grad()
    t0 = time.perf_counter()
    pr.enable()
    for _ in range(n):
        runner.zero_grad()
        runner.step()
    pr.disable()
    cp_ms = (time.perf_counter() - t0) * 1e3 / n
    stats = pstats.Stats(pr).stats  # (file, line, function) -> (cc, ncalls, tt, ct, callers)
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:rows]
    print(f"\ncProfile over {n} steps (cProfiled step {cp_ms:.3f} ms), top by own time per step:")
    print(f"{'function':<70}{'calls':>7}{'own ms':>9}{'cum ms':>9}")
    root = str(Path(__file__).resolve().parent.parent) + os.sep
    for (file, line, func), (_, ncalls, tt, ct, _) in top:
        where = func if file == "~" else f"{file.replace(root, '')}:{line}({func})"
        print(f"{where[-69:]:<70}{ncalls / n:>7.1f}{tt * 1e3 / n:>9.3f}{ct * 1e3 / n:>9.3f}")


# --------------------------------------------------------------------------- results


def _fmt(v: float | None, digits: int = 1) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _fmt_ms(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def make_rows(run: str, env: dict, cfg: Config, results: dict, quick: bool) -> list[dict]:
    import spar.ops.dispatch as dispatch

    backend = dispatch.backend_for("sampled_linear", DEVICE)
    order = {p: i for i, p in enumerate(PROVIDERS)}
    rows = []
    for (provider, S), r in sorted(results.items(), key=lambda kv: (kv[0][1], order[kv[0][0]])):
        ref = results.get(("spar", S), {})
        st = r["stats"]
        t_ratio = st.median / ref["stats"].median if ref else None
        peak, ref_peak = r.get("peak_mb"), ref.get("peak_mb")
        m_ratio = peak / ref_peak if peak is not None and ref_peak else None
        rows.append(
            {
                "run": run, **env, "device": DEVICE.type, "spar_backend": backend,
                "config": cfg.name,
                "net": cfg.net, "provider": provider, "estimator": r["estimator"],
                "chunk": r["chunk"], "samples": S, "batch": cfg.batch, "width": cfg.width,
                "inner": r["inner"], "median_ms": _fmt_ms(st.median),
                "iqr_ms": _fmt_ms(st.iqr), "min_ms": _fmt_ms(st.min), "rounds": st.n,
                "dropped_rounds": st.dropped, "others_cpu": _fmt(st.others, 2),
                "peak_mb": _fmt(peak), "rss_peak_mb": _fmt(r.get("rss_peak_mb")),
                "model_mb": _fmt(r.get("model_mb")), "time_vs_spar": _fmt(t_ratio, 2),
                "peak_vs_spar": _fmt(m_ratio, 2),
                "out_maxdiff": f"{r['out_maxdiff']:.2e}" if "out_maxdiff" in r else "",
                "grad_maxdiff": f"{r['grad_maxdiff']:.2e}" if "grad_maxdiff" in r else "",
                "quick": int(quick),
            }
        )  # fmt: skip
    return rows


def _migrate(row: dict[str, str]) -> dict[str, str]:
    """A row of an older version of this script (no ``config`` column): the mlp config."""
    if row.get("config"):
        return row
    row = dict(row)
    row.update(config="mlp", net="1024-1024-1024-10", estimator="reparam", inner="1")
    row["chunk"] = "none" if row.get("provider") == "spar" else ""
    return row


def write_rows(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to the CSV, rewriting it in the column order of FIELDS (older rows
    mapped by :func:`_migrate`; columns FIELDS lacks are kept at the end)."""
    import csv

    old = [_migrate(r) for r in common.read_rows(path)]
    fields = list(FIELDS)
    for r in [*old, *rows]:
        fields += [k for k in r if k not in fields]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(old)
        writer.writerows(rows)


def _ms(rows: list[dict], provider: str, S: int) -> float | None:
    for r in rows:
        if r["provider"] == provider and int(r["samples"]) == S:
            return float(r["median_ms"])
    return None


def goals(cfg_name: str, rows: list[dict]) -> list[str]:
    """The verdict on a config's goals from the rows of one run."""
    samples = sorted({int(r["samples"]) for r in rows})
    out: list[str] = []

    def ratio(a: str, b: str, S: int) -> float | None:
        ta, tb = _ms(rows, a, S), _ms(rows, b, S)
        return ta / tb if ta is not None and tb else None

    if cfg_name == "mlp":
        peers = [p for p in ("torch_blue", "bayesian_torch") if _ms(rows, p, samples[0])]
        big = [s for s in samples if s >= 4]
        if peers and big:
            faster = [s for s in big if all(_ms(rows, "spar", s) < _ms(rows, p, s) for p in peers)]
            out.append(
                f"spar faster than {', '.join(peers)} at S >= 4: "
                f"{'met' if faster == big else 'NOT met'} (met at S = {faster or 'none'})"
            )
        have_peak = all(r["peak_mb"] for r in rows)
        if len(samples) >= 2 and peers and have_peak:
            lo, hi = samples[0], samples[-1]
            peak = {(r["provider"], int(r["samples"])): float(r["peak_mb"]) for r in rows}
            slope = {
                p: (peak[(p, hi)] - peak[(p, lo)]) / (hi - lo)
                for p in ("spar", *peers)
                if (p, hi) in peak and (p, lo) in peak
            }
            ok = all(slope["spar"] < slope[p] for p in peers)
            out.append(
                f"peak memory grows slower with S (MB per extra sample, S={lo}->{hi}): "
                + ", ".join(f"{p} {v:.2f}" for p, v in slope.items())
                + f" -> {'met' if ok else 'NOT met'}"
            )
        for S in (16, 64):
            r = ratio("spar", "bmm", S)
            if r is not None:
                out.append(
                    f"S={S}: spar / bmm = {r:.2f} (goal <= 2.3): {'met' if r <= 2.3 else 'NOT met'}"
                )
    elif cfg_name == "mlp-lrt":
        for S in samples:
            r = ratio("torch_blue", "spar", S)
            if r is not None:
                out.append(
                    f"S={S}: torch_blue lrt / spar lrt = {r:.2f} (goal >= 1.3): "
                    f"{'met' if r >= 1.3 else 'NOT met'}"
                )
    elif cfg_name == "small":
        for S in samples:
            r = ratio("spar", "bayesian_torch", S)
            if r is not None:
                out.append(
                    f"S={S}: spar / bayesian_torch = {r:.2f} (goal <= 0.5): "
                    f"{'met' if r <= 0.5 else 'NOT met'}"
                )
            r = ratio("spar", "deterministic", S)
            if r is not None:
                out.append(f"S={S}: spar / deterministic = {r:.2f} (no goal)")
    elif cfg_name == "cnn":
        for S in samples:
            t = [v for v in (_ms(rows, "spar", S), _ms(rows, "spar_chunked", S)) if v]
            bt = _ms(rows, "bayesian_torch", S)
            if t and bt:
                r = min(t) / bt
                out.append(
                    f"S={S}: best spar / bayesian_torch = {r:.2f} (goal <= 0.8): "
                    f"{'met' if r <= 0.8 else 'NOT met'}"
                )
            for r in rows:
                if r["provider"] == "spar_chunked" and int(r["samples"]) == S:
                    if r.get("out_maxdiff"):
                        out.append(
                            f"S={S}: chunk={r['chunk']} vs chunk=None, max abs diff: outputs "
                            f"{r['out_maxdiff']}, parameter grads {r['grad_maxdiff']}"
                        )
    return out


def summarize(rows: list[dict]) -> str:
    """Text table of one config's run and the verdict on its goals."""
    lines = [
        f"{'provider':<15}{'est':>11}{'chunk':>8}{'S':>4}{'median ms':>11}{'IQR ms':>9}"
        f"{'min ms':>9}{'peak MB':>9}{'RSS MB':>9}{'t/spar':>8}{'mem/spar':>9}"
    ]
    for r in rows:
        lines.append(
            f"{r['provider']:<15}{r['estimator']:>11}{r['chunk']:>8}{r['samples']:>4}"
            f"{r['median_ms']:>11}{r['iqr_ms']:>9}{r['min_ms']:>9}{r['peak_mb']:>9}"
            f"{r['rss_peak_mb']:>9}{r['time_vs_spar']:>8}{r['peak_vs_spar']:>9}"
        )
    lines += [f"goal: {g}" for g in goals(rows[0]["config"], rows)] if rows else []
    return "\n".join(lines)


def latest_runs(csv_path: Path) -> dict[str, list[dict]]:
    """The rows of the latest full (else latest) run of each config in the CSV."""
    rows = [_migrate(r) for r in common.read_rows(csv_path)]
    out = {}
    for name in CONFIGS:
        mine = [r for r in rows if r["config"] == name]
        full = [r for r in mine if r.get("quick") == "0"] or mine
        if full:
            run = max(r["run"] for r in full)
            out[name] = [r for r in full if r["run"] == run]
    return out


def write_md(csv_path: Path = CSV_PATH, md_path: Path = MD_PATH) -> Path | None:
    """A Markdown summary: the latest full run of each config and its goals."""
    runs = latest_runs(csv_path)
    if not runs:
        return None
    text = [
        f"# Bayesian layers on {'GPU' if DEVICE.type == 'cuda' else 'CPU'}: training step "
        "(forward + backward)",
        "",
        f"Generated by `bench/bench_layers.py` from `{csv_path.name}` (latest full run of each "
        "config); times are the median per step over interleaved rounds, `t/spar` = "
        "median / spar's median in the same run (> 1: spar faster). See the script's "
        "docstring for the method.",
    ]
    for name, rows in runs.items():
        cfg, r0 = CONFIGS[name], rows[0]
        text += [
            "",
            f"## `{name}`: {r0['net']}, batch {r0['batch']}",
            "",
            f"Run {r0['run']}, {r0.get('device_name') or r0['cpu']}, {r0['threads']} threads, "
            f"torch {r0['torch']}, "
            f"spar {r0['spar']} (src {r0.get('spar_src', '')}, backend "
            f"{r0.get('spar_backend', '')}), torch_blue {r0.get('torch_blue', '')}, "
            f"bayesian-torch {r0.get('bayesian_torch', '')}.",
            "",
            "| provider | estimator | chunk | S | median ms | IQR ms | min ms | peak MB "
            "| t/spar | mem/spar | others_cpu |",
            "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for r in rows:
            text.append(
                f"| {r['provider']} | {r['estimator']} | {r['chunk']} | {r['samples']} "
                f"| {r['median_ms']} | {r['iqr_ms']} | {r['min_ms']} | {r['peak_mb']} "
                f"| {r['time_vs_spar']} | {r['peak_vs_spar']} | {r['others_cpu']} |"
            )
        g = goals(cfg.name, rows)
        if g:
            text += ["", *[f"- {line}" for line in g]]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(text) + "\n")
    return md_path


def plot(csv_path: Path = CSV_PATH, png_path: Path = PNG_PATH) -> Path | None:
    """mlp: time and peak memory against S; the other configs: bars of the median step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = latest_runs(csv_path)
    if not runs:
        return None
    others = [n for n in runs if n != "mlp"]
    has_mlp = "mlp" in runs
    fig = plt.figure(figsize=(12, (4.3 if has_mlp else 0) + (3.6 if others else 0)))
    grid = fig.add_gridspec(int(has_mlp) + int(bool(others)), 6)
    if has_mlp:
        rows = runs["mlp"]
        ax_t, ax_m = fig.add_subplot(grid[0, :3]), fig.add_subplot(grid[0, 3:])
        samples = sorted({int(r["samples"]) for r in rows})
        present = {r["provider"] for r in rows}
        for provider in [p for p in PROVIDERS if p in present]:
            rs = sorted(
                (r for r in rows if r["provider"] == provider), key=lambda r: int(r["samples"])
            )
            s = [int(r["samples"]) for r in rs]
            med = [float(r["median_ms"]) for r in rs]
            iqr = [float(r["iqr_ms"]) for r in rs]
            # the CSV keeps median and IQR only: a bar of the IQR's length around the median
            err = [
                [min(i / 2, m * 0.9) for i, m in zip(iqr, med, strict=True)],
                [i / 2 for i in iqr],
            ]
            color = f"C{PROVIDERS.index(provider)}"  # the same in every panel
            ax_t.errorbar(s, med, yerr=err, marker="o", capsize=3, label=provider, color=color)
            if all(r["peak_mb"] for r in rs):
                peak = [float(r["peak_mb"]) for r in rs]
                ax_m.plot(s, peak, marker="o", label=provider, color=color)
        for ax, ylabel in ((ax_t, "fwd+bwd step, median ms (bars: IQR)"), (ax_m, "peak tensor MB")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(samples, [str(s) for s in samples])
            ax.set_xlabel("Monte Carlo samples S")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        ax_t.set_title(f"mlp {rows[0]['net']}, batch {rows[0]['batch']}", fontsize=9)
    for i, name in enumerate(others[:3]):
        rows = runs[name]
        ax = fig.add_subplot(grid[int(has_mlp), 2 * i : 2 * i + 2])
        labels = [
            f"{r['provider']}\n{r['estimator']}"
            + (f" {r['chunk']}" if r["chunk"] not in ("", "none") else "")
            + ("" if len({x["samples"] for x in rows}) == 1 else f" S={r['samples']}")
            for r in rows
        ]
        med = [float(r["median_ms"]) for r in rows]
        iqr = [float(r["iqr_ms"]) / 2 for r in rows]
        ax.bar(range(len(rows)), med, yerr=iqr, capsize=3,
               color=[f"C{PROVIDERS.index(r['provider'])}" for r in rows])  # fmt: skip
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylabel("fwd+bwd step, median ms")
        ax.set_title(
            f"{name}: {rows[0]['net']}, batch {rows[0]['batch']}, S={rows[0]['samples']}",
            fontsize=8,
        )
        ax.grid(True, axis="y", alpha=0.3)
    r0 = next(iter(runs.values()))[0]
    fig.suptitle(
        f"Bayesian layers, training step on {r0.get('device') or 'cpu'} "
        f"({r0.get('device_name') or r0['cpu']}, {r0['threads']} threads) - "
        f"{r0['date'][:10]}\ntorch {r0['torch']}, spar {r0['spar']} "
        f"({r0.get('spar_backend', '')}, src {r0.get('spar_src', '')}), torch_blue "
        f"{r0.get('torch_blue', '')}, bayesian-torch {r0.get('bayesian_torch', '')}",
        fontsize=9,
    )
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


# --------------------------------------------------------------------------- main


def _plot_or_note(csv_path: Path, png_path: Path) -> str:
    """The PNG drawn, or why not (matplotlib is optional: the GPU machine may lack it)."""
    try:
        return str(plot(csv_path, png_path))
    except ImportError as e:
        return f"no plot ({e})"


def run_config(cfg: Config, args: argparse.Namespace, env: dict) -> list[dict]:
    samples = args.samples or list(cfg.quick_samples if args.quick else cfg.samples)
    if any(s < 1 for s in samples):
        raise ValueError(f"--samples must be >= 1, got {samples}")
    wanted = args.providers or list(cfg.providers)
    skipped = [p for p in wanted if p not in cfg.allowed]
    if skipped:
        print(f"[bench_layers] {cfg.name}: no {skipped} in this config", file=sys.stderr)
    providers = available(cfg, [p for p in wanted if p in cfg.allowed])
    if "spar" not in providers:
        raise ValueError("every config needs the spar provider (the ratios divide by it)")
    budget_s, min_rounds = (6.0, 3) if args.quick else (45.0, 5)
    if args.budget_s is not None:
        budget_s = args.budget_s
    results: dict[tuple[str, int], dict] = {}
    for S in samples:
        if "spar_chunked" in providers:
            diff = check_chunked(cfg, S)
            print(
                f"[check] {cfg.name} S={S}: chunk='auto' vs None, max abs diff outputs "
                f"{diff['out_maxdiff']:.2e} (of |out| <= {diff['out_absmax']:.3g}), grads "
                f"{diff['grad_maxdiff']:.2e} (of |grad| <= {diff['grad_absmax']:.3g})",
                flush=True,
            )
        timed = time_providers(
            cfg,
            providers,
            S,
            budget_s=budget_s,
            min_rounds=min_rounds,
            busy_above=args.busy if args.busy >= 0 else None,
            max_wait=args.max_wait,
        )
        for p, r in timed.items():
            st = r["stats"]
            if p == "spar_chunked":
                r.update({k: diff[k] for k in ("out_maxdiff", "grad_maxdiff")})
            results[(p, S)] = r
            print(
                f"[time] {cfg.name} S={S:<3} {p:<15} median {st.median:9.3f} ms  IQR "
                f"{st.iqr:7.3f}  min {st.min:8.3f}  ({st.n} rounds of {r['inner']} steps, "
                f"{st.dropped} dropped as busy; others used {st.others:.0%} of the CPUs)",
                flush=True,
            )
        gc.collect()
    if not args.no_memory:
        for S in samples:
            for p in providers:
                results[(p, S)].update(measure_memory(cfg, p, S, args.threads))
                print(
                    f"[mem]  {cfg.name} S={S:<3} {p:<15} peak "
                    f"{results[(p, S)]['peak_mb']:8.1f} MB  RSS "
                    f"{_fmt(results[(p, S)]['rss_peak_mb'])} MB",
                    flush=True,
                )
    return make_rows(env["date"], env, cfg, results, args.quick)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--config",
        nargs="+",
        default=["mlp"],
        choices=[*CONFIGS, "all"],
        help="the question(s) to measure, one after another (default mlp; all: the four)",
    )
    ap.add_argument(
        "--samples",
        type=int,
        nargs="+",
        default=None,
        help="S values (default per config: mlp 1 4 16 64, 1 4 with --quick; mlp-lrt 16; "
        "small and cnn 8)",
    )
    ap.add_argument("--quick", action="store_true", help="fewer rounds (and S = 1 4 for mlp)")
    ap.add_argument(
        "--budget-s", type=float, default=None,
        help="seconds of timed rounds per S (default 45, 6 with --quick; at least the "
        "minimum rounds run)",
    )  # fmt: skip
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument(
        "--providers",
        nargs="+",
        default=None,
        choices=PROVIDERS,
        help="default: the config's (those a config has no builder for are skipped)",
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    ap.add_argument("--csv", type=Path, help="default bench/results/layers_{cpu,gpu}.csv")
    ap.add_argument("--png", type=Path, help="default: the CSV path with .png")
    ap.add_argument("--md", type=Path, help="default: the CSV path with .md")
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
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG and MD from the CSV")
    ap.add_argument(
        "--profile",
        type=int,
        nargs="?",
        const=0,
        default=None,
        metavar="S",
        help="profile one step of the first config at S (default: its first S)",
    )
    ap.add_argument("--profile-provider", default="spar", choices=PROVIDERS)
    ap.add_argument("--memory-worker", nargs=3, metavar=("CONFIG", "PROVIDER", "S"),
                    help=argparse.SUPPRESS)  # fmt: skip
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
        if DEVICE.index is None:
            DEVICE = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(DEVICE)
        if _USER_BACKEND is None:
            os.environ["SPAR_BACKEND"] = "auto"  # Triton where it serves the call
    elif DEVICE.type != "cpu":
        raise SystemExit(f"--device must be cpu or cuda, got {args.device!r}")
    suffix = "gpu" if DEVICE.type == "cuda" else "cpu"
    args.csv = args.csv or common.RESULTS_DIR / f"layers_{suffix}.csv"
    args.png = args.png or args.csv.with_suffix(".png")
    args.md = args.md or args.csv.with_suffix(".md")

    torch.set_num_threads(args.threads)
    if args.memory_worker:
        name, provider, S = args.memory_worker
        print(json.dumps(memory_worker(CONFIGS[name], provider, int(S))))
        return 0
    if args.plot_only:
        print(_plot_or_note(args.csv, args.png), write_md(args.csv, args.md))
        return 0
    names = list(CONFIGS) if "all" in args.config else list(dict.fromkeys(args.config))
    if args.profile is not None:
        cfg = CONFIGS[names[0]]
        profile_step(cfg, args.profile_provider, args.profile or cfg.samples[0])
        return 0

    t_start = time.perf_counter()
    env = common.env_info(PEERS, device=DEVICE)
    summaries = []
    for name in names:
        rows = run_config(CONFIGS[name], args, env)
        write_rows(args.csv, rows)
        summaries.append(f"== {name} ==\n{summarize(rows)}")
        print(summaries[-1], flush=True)
    if len(summaries) > 1:
        print("\n\n".join(summaries))
    print(
        f"wrote {args.csv}, {_plot_or_note(args.csv, args.png)} and "
        f"{write_md(args.csv, args.md)} in {time.perf_counter() - t_start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
