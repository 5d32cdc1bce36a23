"""How fast and how lean is one Bayesian linear layer over S Monte Carlo samples?

Times forward, backward and the full step of ``y[s] = x[s] @ W_s^T + b_s`` with
``W_s = mu + softplus(rho) * eps_s`` for each provider, and its peak extra memory:

``spar_fused``      spar's Triton kernels, noise generated inside the GEMMs (CUDA only)
``spar_chunked``    spar's sampling kernel into a bounded workspace + cuBLAS bmm (CUDA only)
``spar_torch``      spar's torch backend (chunked, memory-lean autograd; any device)
``bmm``             torch bmm on pre-sampled weights (no noise at all): the baseline, the
                    ``ratio_to_bmm`` column divides by its time in the same run
``torch_ref``       materialize ``W_s`` (``torch.randn`` noise) and matmul: spar.ops.reference
``torch_blue``      ``torch_blue.vi.VILinear`` (vmap over samples; its reparameterized path
                    also computes the log-probabilities it needs for the KL)
``bayesian_torch``  ``bayesian_torch`` ``LinearReparameterization``, a Python loop over
                    samples (one sample per call)

Peers keep their parameters in the benchmark dtype (``module.to(dtype)``); spar keeps
``mu``/``rho`` in fp32 and takes x in the benchmark dtype. Peak extra memory (CUDA only:
torch's caching allocator) is the peak during the measured call minus what was allocated
before it (parameters, inputs, ``dy`` and, for ``bwd``, the forward graph); gradients are
returned by ``torch.autograd.grad``, so they count. ``workspace_mb`` subtracts from it what
the call returns and, for ``full``, the layer output ``y``: the memory an implementation
needs beyond its own results. ``weight_mb`` is the size of the layer's variational
parameters, ``mu`` and ``rho`` in fp32 (``2 * N * K * 4`` bytes); ``mem_ratio`` and
``workspace_ratio`` are the two memory figures in units of it.

Timing: ``triton.testing.do_bench`` on CUDA (L2 flushed, median and 20/80 % quantiles),
``torch.utils.benchmark`` on CPU. Rows are appended to a CSV with the device, versions and
date; the PNG is drawn from the CSV (``--plot-only`` redraws it).

Examples::

    python bench/bench_kernels.py --device cpu                 # small CPU run (default)
    python bench/bench_kernels.py --device cuda                # the issue's configuration
    python bench/bench_kernels.py --device cuda --samples 16 --batch 32 128 512 2048 \\
        --providers spar_fused spar_chunked bmm                # calibrate FUSED_MAX_ROWS
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.metadata
import math
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from spar.ops import reference  # noqa: E402
from spar.ops.linear import linear_torch  # noqa: E402
from spar.rng import NoiseKey, param_id  # noqa: E402
from spar.telemetry import Telemetry  # noqa: E402

PROVIDERS = (
    "spar_fused", "spar_chunked", "spar_torch", "bmm", "torch_ref", "torch_blue",
    "bayesian_torch",
)  # fmt: skip
MODES = ("fwd", "bwd", "full")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FIELDS = (
    "run_id", "date", "device", "device_name", "torch", "triton", "spar", "torch_blue",
    "bayesian_torch", "python", "threads", "provider", "mode", "S", "B", "N", "K", "dtype",
    "shared", "ms_median", "ms_q20", "ms_q80", "tflops", "peak_extra_mb", "workspace_mb",
    "weight_mb", "mem_ratio", "workspace_ratio", "ratio_to_bmm", "nvml_peak_mb",
    "gpu_util", "note",
)  # fmt: skip
WID, BID = param_id("bench.weight"), param_id("bench.bias")


class Skip(Exception):
    """A provider that cannot run here (missing package, no GPU): a message, not a failure."""


@dataclass(frozen=True)
class Config:
    S: int
    B: int
    N: int
    K: int
    dtype: torch.dtype
    shared: bool
    device: torch.device

    @property
    def rows(self) -> int:
        return self.B if self.shared else self.S * self.B


@dataclass
class Case:
    """One provider set up on one config: ``forward()`` runs the layer over all samples,
    ``leaves`` are what the backward differentiates."""

    forward: Callable[[], torch.Tensor]
    leaves: list[torch.Tensor]
    note: str = ""


def _params(cfg: Config, dtype: torch.dtype = torch.float32):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *shape, scale=1.0, shift=0.0: (  # noqa: E731
        (torch.randn(*shape, generator=g) * scale + shift).to(cfg.device, dtype).requires_grad_()
    )
    x = mk(cfg.rows, cfg.K).detach().to(cfg.dtype).requires_grad_()
    mu = mk(cfg.N, cfg.K, scale=cfg.K**-0.5)
    rho = mk(cfg.N, cfg.K, scale=0.1, shift=-5.0)
    bmu = mk(cfg.N, scale=0.1)
    brho = mk(cfg.N, scale=0.1, shift=-5.0)
    return x, mu, rho, bmu, brho


def _key(cfg: Config) -> NoiseKey:
    return NoiseKey(seed=0, step=1, first_sample=0, num_samples=cfg.S)


def _spar(cfg: Config, path: str | None) -> Case:
    x, mu, rho, bmu, brho = _params(cfg)
    key = _key(cfg)
    if path is None:
        fwd = lambda: linear_torch(  # noqa: E731
            x, mu, rho, bmu, brho, key, weight_id=WID, bias_id=BID, shared_input=cfg.shared
        )
        return Case(fwd, [x, mu, rho, bmu, brho])
    if cfg.device.type != "cuda":
        raise Skip("needs CUDA (the Triton interpreter is a correctness tool, not a benchmark)")
    from spar.ops.linear_triton import bayes_linear_reparam

    fwd = lambda: bayes_linear_reparam(  # noqa: E731
        x, mu, rho, bmu, brho, key, weight_id=WID, bias_id=BID, shared_input=cfg.shared,
        path=path,
    )  # fmt: skip
    return Case(fwd, [x, mu, rho, bmu, brho])


def _bmm(cfg: Config) -> Case:
    """Pre-sampled weights (outside the timing): the cost of S plain GEMMs with per-sample
    weight gradients, which is what a sampled layer without fused noise must at least pay."""
    x, mu, rho, bmu, brho = _params(cfg)
    with torch.no_grad():
        eps = torch.randn(cfg.S, cfg.N, cfg.K, device=cfg.device)
        w = reference.sample_weight(mu, rho, eps).to(cfg.dtype).requires_grad_()
        b = reference.sample_weight(bmu, brho, torch.randn(cfg.S, cfg.N, device=cfg.device))
        b = b.to(cfg.dtype).unsqueeze(1).requires_grad_()
    del eps

    def fwd():
        xs = x.expand(cfg.S, *x.shape) if cfg.shared else x.view(cfg.S, cfg.B, cfg.K)
        return torch.baddbmm(b, xs, w.transpose(1, 2)).flatten(0, 1)

    return Case(fwd, [x, w, b])


def _torch_ref(cfg: Config) -> Case:
    x, mu, rho, bmu, brho = _params(cfg)

    def fwd():
        eps_w = torch.randn(cfg.S, cfg.N, cfg.K, device=cfg.device)
        eps_b = torch.randn(cfg.S, cfg.N, device=cfg.device)
        return reference.linear_reparam(
            x, mu, rho, bmu, brho, eps_w, eps_b, shared_input=cfg.shared
        )

    return Case(fwd, [x, mu, rho, bmu, brho])


def _torch_blue(cfg: Config) -> Case:
    try:
        from torch_blue.vi import VILinear
    except Exception as e:  # noqa: BLE001 - any import failure means "not installed here"
        raise Skip(f"torch_blue does not import: {type(e).__name__}: {e}") from e
    layer = VILinear(cfg.K, cfg.N, return_log_probs=True).to(cfg.device, cfg.dtype)
    x = _params(cfg)[0]

    def fwd():
        if cfg.shared:
            return layer(x, samples=cfg.S).flatten(0, 1)
        return layer(x.view(cfg.S, cfg.B, cfg.K), sampled_input=True).flatten(0, 1)

    return Case(fwd, [x, *layer.parameters()], note="params in bench dtype; log-probs on")


def _bayesian_torch(cfg: Config) -> Case:
    try:
        from bayesian_torch.layers.variational_layers.linear_variational import (
            LinearReparameterization,
        )
    except Exception as e:  # noqa: BLE001 - any import failure means "not installed here"
        raise Skip(f"bayesian_torch does not import: {type(e).__name__}: {e}") from e
    layer = LinearReparameterization(cfg.K, cfg.N).to(cfg.device, cfg.dtype)
    x = _params(cfg)[0]

    def fwd():
        xs = [x] * cfg.S if cfg.shared else x.view(cfg.S, cfg.B, cfg.K).unbind(0)
        return torch.cat([layer(xi, return_kl=False) for xi in xs], dim=0)

    return Case(fwd, [x, *layer.parameters()], note="params in bench dtype; loop over S")


def make_case(provider: str, cfg: Config) -> Case:
    if provider == "spar_fused":
        return _spar(cfg, "fused")
    if provider == "spar_chunked":
        return _spar(cfg, "chunked")
    if provider == "spar_torch":
        return _spar(cfg, None)
    if provider == "bmm":
        return _bmm(cfg)
    if provider == "torch_ref":
        return _torch_ref(cfg)
    if provider == "torch_blue":
        return _torch_blue(cfg)
    if provider == "bayesian_torch":
        return _bayesian_torch(cfg)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def step_fn(case: Case, mode: str) -> Callable[[], object]:
    """The callable timed for ``mode``: ``fwd`` builds the autograd graph (a training
    forward), ``bwd`` re-runs the backward of one retained graph, ``full`` does both."""
    if mode == "fwd":
        return case.forward
    y = case.forward()
    dy = torch.randn_like(y)
    if mode == "bwd":
        return lambda: torch.autograd.grad(y, case.leaves, dy, retain_graph=True)
    if mode == "full":
        del y
        return lambda: torch.autograd.grad(case.forward(), case.leaves, dy)
    raise ValueError(f"unknown mode {mode!r}")


def time_ms(fn: Callable[[], object], device: torch.device) -> tuple[float, float, float]:
    """(median, 20 %, 80 %) milliseconds."""
    if device.type == "cuda":
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2])
    from torch.utils import benchmark

    fn()  # warm-up (first calls compile the CPU noise generator)
    m = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0)
    times = torch.tensor(m.times, dtype=torch.float64) * 1e3
    return float(times.median()), float(times.quantile(0.2)), float(times.quantile(0.8))


def _nbytes(out: object) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(_nbytes(t) for t in out)
    return 0


def peak_extra_mb(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(peak extra MB during one call, the part of it that is not the call's result)."""
    if device.type != "cuda":
        return math.nan, math.nan  # no allocator statistics on CPU
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    results = _nbytes(out)
    del out
    return peak / 2**20, (peak - results) / 2**20


def flops(cfg: Config, mode: str) -> float:
    """GEMM flops: forward 2*S*B*N*K; backward twice that (dx and dW)."""
    f = 2.0 * cfg.S * cfg.B * cfg.N * cfg.K
    return {"fwd": f, "bwd": 2 * f, "full": 3 * f}[mode]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def environment(device: torch.device) -> dict[str, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {
        "device": device.type, "device_name": name, "torch": torch.__version__,
        "triton": _version("triton"), "spar": _version("spar"),
        "torch_blue": _version("torch-blue"), "bayesian_torch": _version("bayesian-torch"),
        "python": platform.python_version(), "threads": str(torch.get_num_threads()),
    }  # fmt: skip


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    env = environment(device)
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    rows = []
    for S in args.samples:
        for B in args.batch:
            cfg = Config(S, B, args.features[0], args.features[1], dtype, args.shared, device)
            weight_mb = 2 * cfg.N * cfg.K * 4 / 2**20
            bmm_ms: dict[str, float] = {}
            for provider in args.providers:
                try:
                    case = make_case(provider, cfg)
                except Skip as e:
                    print(f"skip {provider}: {e}", file=sys.stderr)
                    continue
                for mode in args.modes:
                    fn = step_fn(case, mode)
                    # NVML sees what the allocator does not: context, cuBLAS workspaces
                    gpu = (device.index or 0) if device.type == "cuda" else None
                    with Telemetry(interval=0.05, gpu_index=gpu) as tel:
                        med, q20, q80 = time_ms(fn, device)
                    nvml = tel.summary()
                    mem, work = peak_extra_mb(fn, device)
                    if mode == "full":  # y (S*B, N) lives until the backward returns
                        work -= cfg.S * cfg.B * cfg.N * torch.finfo(dtype).bits / 8 / 2**20
                    del fn
                    if provider == "bmm":
                        bmm_ms[mode] = med
                    row = {
                        **env, "run_id": run_id,
                        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        "provider": provider, "mode": mode, "S": S, "B": B, "N": cfg.N,
                        "K": cfg.K, "dtype": args.dtype, "shared": int(args.shared),
                        "ms_median": f"{med:.4f}", "ms_q20": f"{q20:.4f}",
                        "ms_q80": f"{q80:.4f}",
                        "tflops": f"{flops(cfg, mode) / (med * 1e-3) / 1e12:.4f}",
                        "peak_extra_mb": "" if math.isnan(mem) else f"{mem:.2f}",
                        "workspace_mb": "" if math.isnan(work) else f"{work:.2f}",
                        "weight_mb": f"{weight_mb:.2f}",
                        "mem_ratio": "" if math.isnan(mem) else f"{mem / weight_mb:.3f}",
                        "workspace_ratio": "" if math.isnan(work) else f"{work / weight_mb:.3f}",
                        "ratio_to_bmm": "", "note": case.note,
                        "nvml_peak_mb": "" if nvml.peak_gpu_memory is None
                        else f"{nvml.peak_gpu_memory / 2**20:.1f}",
                        "gpu_util": "" if nvml.mean_gpu_util is None
                        else f"{nvml.mean_gpu_util:.1f}",
                    }  # fmt: skip
                    rows.append(row)
                    print(
                        f"{provider:>15} {mode:>4} S={S} B={B} {cfg.N}x{cfg.K} {args.dtype}: "
                        f"{med:9.3f} ms  {row['tflops']} TFLOP/s  extra {row['peak_extra_mb']} MB",
                        flush=True,
                    )
                del case
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            for row in rows:
                same = row["run_id"] == run_id and row["S"] == S and row["B"] == B
                if same and row["mode"] in bmm_ms:
                    row["ratio_to_bmm"] = f"{float(row['ms_median']) / bmm_ms[row['mode']]:.3f}"
    return rows


def write_csv(rows: list[dict], path: Path, overwrite: bool) -> None:
    """Append ``rows``; a file written with older columns is rewritten with the current
    ones (old rows keep their values, new columns stay empty)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old: list[dict] = []
    if path.exists() and not overwrite:
        with path.open(newline="") as f:
            old = list(csv.DictReader(f))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for row in [*old, *rows]:
            w.writerow({k: row.get(k, "") for k in FIELDS})


def plot(csv_path: Path, png_path: Path) -> None:
    """Bars of median time (log scale) per mode and provider for each config of the latest
    run in the CSV, and the peak-extra-memory ratio where it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    last = max(r["run_id"] for r in rows)
    rows = [r for r in rows if r["run_id"] == last]
    configs = sorted({(int(r["S"]), int(r["B"]), int(r["N"]), int(r["K"])) for r in rows})
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    has_mem = any(r["mem_ratio"] for r in rows)
    nrows = 2 if has_mem else 1
    fig, axes = plt.subplots(nrows, len(configs), figsize=(4.5 * len(configs), 3.6 * nrows),
                             squeeze=False)  # fmt: skip
    width = 0.8 / max(1, len(providers))
    for j, (S, B, N, K) in enumerate(configs):
        sel = [r for r in rows if (int(r["S"]), int(r["B"]), int(r["N"]), int(r["K"]))
               == (S, B, N, K)]  # fmt: skip
        for i, p in enumerate(providers):
            labelled = False
            for m_i, mode in enumerate(MODES):
                r = next((r for r in sel if r["provider"] == p and r["mode"] == mode), None)
                if r is None:
                    continue
                x = m_i + (i - (len(providers) - 1) / 2) * width
                label = None if labelled or j else p
                labelled = True
                axes[0][j].bar(x, float(r["ms_median"]), width, color=f"C{i}", label=label)
                if has_mem and r["mem_ratio"] and mode == "full":
                    axes[1][j].bar(i, float(r["mem_ratio"]), 0.8, color=f"C{i}")
                    if r["workspace_ratio"]:  # the part that is not the step's results
                        axes[1][j].bar(i, float(r["workspace_ratio"]), 0.4, color="k", alpha=0.35)
        ax = axes[0][j]
        ax.set_yscale("log")
        ax.set_xticks(range(len(MODES)), MODES)
        ax.set_title(f"S={S} B={B} {N}x{K} {sel[0]['dtype']}", fontsize=9)
        ax.set_ylabel("ms (median)")
        if has_mem:
            axes[1][j].set_xticks(range(len(providers)), providers, rotation=45, ha="right",
                                  fontsize=7)  # fmt: skip
            axes[1][j].set_ylabel("full step: extra (bar), workspace (grey)\n/ |mu, rho| fp32",
                                  fontsize=8)  # fmt: skip
            axes[1][j].axhline(2.0, color="k", lw=0.8, ls="--")
    axes[0][0].legend(fontsize=7)
    dev = rows[0]["device_name"]
    fig.suptitle(f"{dev}  torch {rows[0]['torch']}  triton {rows[0]['triton']}  {last}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--samples", type=int, nargs="+", help="S values")
    p.add_argument("--batch", type=int, nargs="+", help="rows per sample B")
    p.add_argument("--features", type=int, nargs=2, metavar=("N", "K"), help="out, in")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="input dtype")
    p.add_argument("--shared", action="store_true", help="one (B, K) input for all samples")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--csv", type=Path, help="default: bench/results/kernels_<device>.csv")
    p.add_argument("--png", type=Path, help="default: the CSV path with .png")
    p.add_argument("--overwrite", action="store_true", help="start a new CSV")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from the CSV")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    # defaults: the configuration on a GPU, a small one that runs in minutes on CPU
    args.samples = args.samples or ([16, 64] if gpu else [4, 16])
    args.batch = args.batch or ([128] if gpu else [32])
    args.features = args.features or ([4096, 4096] if gpu else [256, 256])
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    device_type = torch.device(args.device).type
    args.csv = args.csv or ROOT / "bench" / "results" / f"kernels_{device_type}.csv"
    args.png = args.png or args.csv.with_suffix(".png")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.plot_only:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
        os.environ.pop("TRITON_INTERPRET", None)  # a GPU run must compile the kernels
        rows = run(args)
        write_csv(rows, args.csv, args.overwrite)
        print(f"wrote {len(rows)} rows to {args.csv}")
    plot(args.csv, args.png)
    print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
