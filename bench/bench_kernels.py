"""How fast and how lean is one Bayesian linear (or conv) layer over S Monte Carlo samples?

Times forward, backward and the full step of ``y[s] = x[s] @ W_s^T + b_s`` with
``W_s = mu + softplus(rho) * eps_s`` for each provider, and its peak extra memory:

``spar_fused``      ``spar.ops.bayes_linear`` on the Triton backend, fused path: noise
                    generated inside the GEMMs (CUDA only)
``spar_chunked``    the same, chunked path: the sampling kernel into a bounded workspace +
                    cuBLAS bmm (CUDA only)
``spar_torch``      the same on the torch backend (chunked, memory-lean autograd; any device)
``spar_cuda``       the same on the cuda backend (CUDA C++ sampling kernels compiled by
                    NVRTC + cuBLAS per chunk; CUDA and CuPy only, ``spar[cuda12]``/``[cuda13]``)
``bmm``             torch bmm on pre-sampled weights (no noise at all): the baseline, the
                    ``ratio_to_bmm`` column divides by its time in the same run
``torch_ref``       materialize ``W_s`` (``torch.randn`` noise) and matmul: spar.ops.reference
``torch_blue``      ``torch_blue.vi.VILinear`` (vmap over samples; its reparameterized path
                    also computes the log-probabilities it needs for the KL)
``bayesian_torch``  ``bayesian_torch`` ``LinearReparameterization``, a Python loop over
                    samples (one sample per call)

The spar providers call the public op (``estimator="reparam"``) with the backend and path
chosen the way a user chooses them, by ``SPAR_BACKEND`` and ``SPAR_LINEAR_PATH``, set for
all of the provider's calls, backward included (spar reads them per call); the
``spar_backend`` column records the backend that ran ``sampled_linear``. Other ``SPAR_*``
variables (``SPAR_CHUNK_NUMEL``) are left as the caller set them.

``--op conv`` asks the same of a Bayesian 2-D convolution (``--conv C O HW k``: in and out
channels, square image size, square kernel; padding ``k // 2``, stride 1), with the
providers ``spar_triton`` (``bayes_conv`` under ``SPAR_BACKEND=triton``: the Triton
``sampled_conv`` kernel where the backend implements it, else the torch backend's; the
``spar_backend`` column says which ran), ``spar_torch``, ``spar_cuda``, ``grouped`` (the
floor: weights sampled once outside the timing, the S samples folded into the groups of one
``F.conv2d``, the conv analogue of ``bmm``; ``ratio_to_bmm`` divides by it for conv rows),
``torch_ref`` (``reference.conv_reparam``: a loop over samples on materialized weights)
and ``bayesian_torch`` (``Conv2dReparameterization``, one call per sample). Rows carry an
``op`` column; ``N``/``K`` are the out/in channels and ``HW``/``k`` the geometry.

Peers keep their parameters in the benchmark dtype (``module.to(dtype)``); spar keeps
``mu``/``rho`` in fp32 and takes x in the benchmark dtype. Peak extra memory is the peak
during the measured call minus what was allocated before it (parameters, inputs, ``dy``
and, for ``bwd``, the forward graph): on CUDA from torch's caching allocator, on CPU from
the allocation events of ``torch.profiler`` (``common.cpu_tensor_peak_bytes``). Gradients
are returned by ``torch.autograd.grad``, so they count. ``workspace_mb`` subtracts from it
what the call returns and, for ``full``, the layer output ``y``: the memory an
implementation needs beyond its own results. ``weight_mb`` is the size of the layer's
variational parameters, ``mu`` and ``rho`` in fp32 (``2 * N * K * 4`` bytes);
``mem_ratio`` and ``workspace_ratio`` are the two memory figures in units of it. On CUDA,
``nvml_peak_mb`` and ``gpu_util`` (``spar.telemetry``, where NVML is present) see what the
allocator does not: the context, cuBLAS workspaces.

Timing: ``triton.testing.do_bench`` on CUDA (CUDA events around each call, L2 flushed,
median and 20/80 % quantiles; ``--rep`` ms of repetitions), ``torch.utils.benchmark`` on
CPU (``--min-run-time`` seconds per measurement), after waiting (``--max-wait`` seconds at
most) for the other processes to leave the CPUs; ``others_cpu`` is the share of the
machine's CPUs they used while a CPU measurement ran (a noisy row has a high one). Rows
carry the environment columns of every ``bench/`` script (``common.env_info``; rows of one
run share ``date``; ``device_name`` is the GPU's name on CUDA) and are appended to the
CSV (``common.append_rows``); the PNG is drawn from the CSV's latest run (``--plot-only``
redraws it).

Examples::

    python bench/bench_kernels.py --device cpu                 # small CPU run (default)
    python bench/bench_kernels.py --device cuda                # the issue's configuration
    python bench/bench_kernels.py --device cuda --samples 16 --batch 32 128 512 2048 \\
        --providers spar_fused spar_chunked bmm                # calibrate FUSED_MAX_ROWS
    python bench/bench_kernels.py --device cuda --op conv      # conv 64->64, 32x32, 3x3
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "bench"))  # bench/ is not a package

import common  # noqa: E402

from spar.ops import BackendUnavailable, backend_for, bayes_conv, bayes_linear, reference  # noqa: E402
from spar.rng import NoiseKey, param_id  # noqa: E402
from spar.telemetry import Telemetry  # noqa: E402

PROVIDERS = (
    "spar_fused", "spar_chunked", "spar_triton", "spar_torch", "spar_cuda", "bmm", "grouped",
    "torch_ref", "torch_blue", "bayesian_torch",
)  # fmt: skip
# the providers of each op (the defaults) and its floor, the denominator of ratio_to_bmm
OP_PROVIDERS = {
    "linear": ("spar_fused", "spar_chunked", "spar_torch", "spar_cuda", "bmm", "torch_ref",
               "torch_blue", "bayesian_torch"),
    "conv": ("spar_triton", "spar_torch", "spar_cuda", "grouped", "torch_ref", "bayesian_torch"),
}  # fmt: skip
FLOOR = {"linear": "bmm", "conv": "grouped"}
# the environment each spar provider runs under (None: unset, spar's default)
SPAR_ENV: dict[str, dict[str, str | None]] = {
    "spar_fused": {"SPAR_BACKEND": "triton", "SPAR_LINEAR_PATH": "fused"},
    "spar_chunked": {"SPAR_BACKEND": "triton", "SPAR_LINEAR_PATH": "chunked"},
    "spar_triton": {"SPAR_BACKEND": "triton", "SPAR_LINEAR_PATH": None},
    "spar_torch": {"SPAR_BACKEND": "torch", "SPAR_LINEAR_PATH": None},
    "spar_cuda": {"SPAR_BACKEND": "cuda", "SPAR_LINEAR_PATH": None},
}
PEERS = {"triton": "triton", "torch_blue": "torch-blue", "bayesian_torch": "bayesian-torch"}
MODES = ("fwd", "bwd", "full")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WID, BID = param_id("bench.weight"), param_id("bench.bias")
MB = 2**20


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
    op: str = "linear"
    HW: int = 0  # conv: image size (square)
    k: int = 0  # conv: kernel size (square, padding k // 2, stride 1)

    @property
    def rows(self) -> int:
        return self.B if self.shared else self.S * self.B

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.N, self.K) if self.op == "linear" else (self.N, self.K, self.k, self.k)

    @property
    def in_shape(self) -> tuple[int, ...]:
        """One example's input."""
        return (self.K,) if self.op == "linear" else (self.K, self.HW, self.HW)

    @property
    def out_numel(self) -> int:
        """Elements of the layer's output (all samples)."""
        per_example = self.N if self.op == "linear" else self.N * self.HW * self.HW
        return self.S * self.B * per_example

    @property
    def conv_kw(self) -> dict:
        p = self.k // 2
        return dict(stride=(1, 1), padding=(p, p), dilation=(1, 1), groups=1)


@dataclass
class Case:
    """One provider set up on one config: ``forward()`` runs the layer over all samples,
    ``leaves`` are what the backward differentiates; every call runs under ``env``."""

    forward: Callable[[], torch.Tensor]
    leaves: list[torch.Tensor]
    note: str = ""
    env: Mapping[str, str | None] = field(default_factory=dict)
    backend: str = ""


def _params(cfg: Config, dtype: torch.dtype = torch.float32):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *shape, scale=1.0, shift=0.0: (  # noqa: E731
        (torch.randn(*shape, generator=g) * scale + shift).to(cfg.device, dtype).requires_grad_()
    )
    fan_in = math.prod(cfg.weight_shape[1:])
    x = mk(cfg.rows, *cfg.in_shape).detach().to(cfg.dtype).requires_grad_()
    mu = mk(*cfg.weight_shape, scale=fan_in**-0.5)
    rho = mk(*cfg.weight_shape, scale=0.1, shift=-5.0)
    bmu = mk(cfg.N, scale=0.1)
    brho = mk(cfg.N, scale=0.1, shift=-5.0)
    return x, mu, rho, bmu, brho


def _spar(cfg: Config, provider: str) -> Case:
    env = SPAR_ENV[provider]
    if env["SPAR_BACKEND"] == "triton" and cfg.device.type != "cuda":
        raise Skip("needs CUDA (the Triton interpreter is a correctness tool, not a benchmark)")
    if env["SPAR_BACKEND"] == "cuda" and cfg.device.type != "cuda":
        raise Skip("needs CUDA (the cuda backend's kernels run on a GPU only)")
    primitive = "sampled_linear" if cfg.op == "linear" else "sampled_conv"
    with common.environ(env):
        try:
            backend = backend_for(primitive, cfg.device)
        except BackendUnavailable as e:
            raise Skip(str(e)) from e
    x, mu, rho, bmu, brho = _params(cfg)
    key = NoiseKey(seed=0, step=1, first_sample=0, num_samples=cfg.S)
    kw = dict(weight_id=WID, bias_id=BID, estimator="reparam", shared_input=cfg.shared)
    if cfg.op == "linear":
        fwd = lambda: bayes_linear(x, mu, rho, bmu, brho, key, **kw)  # noqa: E731
    else:
        fwd = lambda: bayes_conv(x, mu, rho, bmu, brho, key, **kw, **cfg.conv_kw)  # noqa: E731
    return Case(fwd, [x, mu, rho, bmu, brho], env=env, backend=backend)


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


def _grouped(cfg: Config) -> Case:
    """Conv floor: S pre-sampled kernels (outside the timing) as the groups of one conv over
    the input with its samples folded into channels, ``(B, S*C, H, W)``."""
    x, mu, rho, bmu, brho = _params(cfg)
    S, B = cfg.S, cfg.B
    with torch.no_grad():
        eps = torch.randn(S, *cfg.weight_shape, device=cfg.device)
        w = reference.sample_weight(mu, rho, eps).flatten(0, 1).to(cfg.dtype).requires_grad_()
        b = reference.sample_weight(bmu, brho, torch.randn(S, cfg.N, device=cfg.device))
        b = b.flatten().to(cfg.dtype).requires_grad_()
    del eps
    kw = dict(cfg.conv_kw, groups=S)

    def fwd():
        xs = x.expand(S, *x.shape) if cfg.shared else x.view(S, B, *cfg.in_shape)
        xg = xs.transpose(0, 1).reshape(B, S * cfg.K, cfg.HW, cfg.HW)
        y = torch.nn.functional.conv2d(xg, w, b, **kw)  # (B, S*N, H, W)
        return y.view(B, S, cfg.N, cfg.HW, cfg.HW).transpose(0, 1).flatten(0, 1)

    return Case(fwd, [x, w, b], note="weights pre-sampled; samples as groups")


def _torch_ref(cfg: Config) -> Case:
    x, mu, rho, bmu, brho = _params(cfg)
    if cfg.op == "conv":

        def fwd_conv():
            eps_w = torch.randn(cfg.S, *cfg.weight_shape, device=cfg.device)
            eps_b = torch.randn(cfg.S, cfg.N, device=cfg.device)
            xs = x.repeat(cfg.S, 1, 1, 1) if cfg.shared else x
            return reference.conv_reparam(torch.nn.functional.conv2d, xs, mu, rho, bmu, brho,
                                          eps_w, eps_b, **cfg.conv_kw)  # fmt: skip

        return Case(fwd_conv, [x, mu, rho, bmu, brho], note="loop over S")

    def fwd():
        eps_w = torch.randn(cfg.S, cfg.N, cfg.K, device=cfg.device)
        eps_b = torch.randn(cfg.S, cfg.N, device=cfg.device)
        return reference.linear_reparam(
            x, mu, rho, bmu, brho, eps_w, eps_b, shared_input=cfg.shared
        )

    return Case(fwd, [x, mu, rho, bmu, brho])


def _torch_blue(cfg: Config) -> Case:
    if cfg.op != "linear":
        raise Skip("torch_blue is measured on the linear layer only")
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


def _bayesian_torch_conv(cfg: Config) -> Case:
    try:
        from bayesian_torch.layers import Conv2dReparameterization
    except Exception as e:  # noqa: BLE001 - any import failure means "not installed here"
        raise Skip(f"bayesian_torch does not import: {type(e).__name__}: {e}") from e
    layer = Conv2dReparameterization(cfg.K, cfg.N, cfg.k, padding=cfg.k // 2)
    layer = layer.to(cfg.device, cfg.dtype)
    x = _params(cfg)[0]

    def fwd():
        xs = [x] * cfg.S if cfg.shared else x.view(cfg.S, cfg.B, *cfg.in_shape).unbind(0)
        return torch.cat([layer(xi, return_kl=False) for xi in xs], dim=0)

    return Case(fwd, [x, *layer.parameters()], note="params in bench dtype; loop over S")


def _bayesian_torch(cfg: Config) -> Case:
    if cfg.op == "conv":
        return _bayesian_torch_conv(cfg)
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
    if provider not in OP_PROVIDERS[cfg.op]:
        raise Skip(f"no {provider} for --op {cfg.op}")
    if provider in SPAR_ENV:
        return _spar(cfg, provider)
    if provider == "bmm":
        return _bmm(cfg)
    if provider == "grouped":
        return _grouped(cfg)
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


def time_ms(
    fn: Callable[[], object], device: torch.device, *, rep_ms: float = 100.0,
    min_run_time: float = 1.0,
) -> tuple[float, float, float]:  # fmt: skip
    """(median, 20 %, 80 %) milliseconds. CUDA: ``triton.testing.do_bench`` (CUDA events
    around every call, the L2 cache flushed before each, ``rep_ms`` of repetitions after
    25 ms of warm-up); CPU: ``torch.utils.benchmark`` for ``min_run_time`` seconds."""
    if device.type == "cuda":
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2])
    from torch.utils import benchmark

    fn()  # warm-up (first calls compile the CPU noise generator)
    m = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
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
    out = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out.append(fn())
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    elif device.type == "cpu":
        peak = common.cpu_tensor_peak_bytes(lambda: out.append(fn()))
    else:
        return math.nan, math.nan
    return peak / MB, (peak - _nbytes(out)) / MB


def flops(cfg: Config, mode: str) -> float:
    """GEMM flops: forward 2*S*B*N*K (conv: times k*k*HW*HW); backward twice that (dx and
    dW)."""
    f = 2.0 * cfg.S * cfg.B * cfg.N * cfg.K
    if cfg.op == "conv":
        f *= cfg.k * cfg.k * cfg.HW * cfg.HW
    return {"fwd": f, "bwd": 2 * f, "full": 3 * f}[mode]


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None or math.isnan(value) else format(value, spec)


def measure(
    case: Case, cfg: Config, mode: str, max_wait: float, rep_ms: float = 100.0,
    min_run_time: float = 1.0,
) -> dict[str, str]:  # fmt: skip
    """One provider's columns for one mode: times, memory, others' CPU share or NVML."""
    fn = step_fn(case, mode)
    others = nvml_mb = util = None
    timing = dict(rep_ms=rep_ms, min_run_time=min_run_time)
    if cfg.device.type == "cuda":
        # NVML sees what the allocator does not: context, cuBLAS workspaces
        index = cfg.device.index if cfg.device.index is not None else torch.cuda.current_device()
        with Telemetry(interval=0.05, gpu_index=index) as tel:
            med, q20, q80 = time_ms(fn, cfg.device, **timing)
        nvml = tel.summary()
        nvml_mb = None if nvml.peak_gpu_memory is None else nvml.peak_gpu_memory / MB
        util = nvml.mean_gpu_util
    else:  # no telemetry thread competing with the measured call for the CPUs
        common.wait_for_quiet(0.1, timeout=max_wait)
        with common.others_cpu() as share:
            med, q20, q80 = time_ms(fn, cfg.device, **timing)
        others = share()
    mem, work = peak_extra_mb(fn, cfg.device)
    if mode == "full":  # y (S*B, N, ...) lives until the backward returns
        work -= cfg.out_numel * torch.finfo(cfg.dtype).bits / 8 / MB
    weight_mb = 2 * math.prod(cfg.weight_shape) * 4 / MB
    return {
        "ms_median": f"{med:.4f}", "ms_q20": f"{q20:.4f}", "ms_q80": f"{q80:.4f}",
        "tflops": f"{flops(cfg, mode) / (med * 1e-3) / 1e12:.4f}",
        "others_cpu": _fmt(others, ".2f"),
        "peak_extra_mb": _fmt(mem, ".2f"), "workspace_mb": _fmt(work, ".2f"),
        "weight_mb": f"{weight_mb:.2f}",
        "mem_ratio": _fmt(mem / weight_mb, ".3f"),
        "workspace_ratio": _fmt(work / weight_mb, ".3f"),
        "ratio_to_bmm": "",  # filled in once the config's bmm rows are measured
        "nvml_peak_mb": _fmt(nvml_mb, ".1f"), "gpu_util": _fmt(util, ".1f"),
    }  # fmt: skip


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    env = common.env_info(PEERS, device=device)
    rows = []
    if args.op == "conv":
        K, N, HW, k = args.conv  # in channels, out channels, image size, kernel size
    else:
        (N, K), HW, k = args.features, 0, 0
    floor = FLOOR[args.op]
    for S in args.samples:
        for B in args.batch:
            cfg = Config(S, B, N, K, dtype, args.shared, device, args.op, HW, k)
            config_rows = []
            for provider in args.providers:
                try:
                    case = make_case(provider, cfg)
                except Skip as e:
                    print(f"skip {provider}: {e}", file=sys.stderr)
                    continue
                with common.environ(case.env):  # spar reads it per call, backward included
                    for mode in args.modes:
                        row = {
                            **env, "device": device.type, "spar_backend": case.backend,
                            "op": args.op, "provider": provider, "mode": mode, "S": S, "B": B,
                            "N": cfg.N, "K": cfg.K, "HW": cfg.HW or "", "k": cfg.k or "",
                            "dtype": args.dtype, "shared": int(args.shared),
                            **measure(case, cfg, mode, args.max_wait, args.rep,
                                      args.min_run_time),
                            "note": case.note,
                        }  # fmt: skip
                        config_rows.append(row)
                        shape = f"{cfg.N}x{cfg.K}" + (f"x{k}x{k}@{HW}" if k else "")
                        print(
                            f"{provider:>15} {mode:>4} S={S} B={B} {shape} "
                            f"{args.dtype}: {float(row['ms_median']):9.3f} ms  "
                            f"{row['tflops']} TFLOP/s  extra {row['peak_extra_mb']} MB  "
                            f"others {row['others_cpu']}",
                            flush=True,
                        )
                del case
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            bmm_ms = {
                r["mode"]: float(r["ms_median"]) for r in config_rows if r["provider"] == floor
            }
            for row in config_rows:
                if row["mode"] in bmm_ms:
                    row["ratio_to_bmm"] = f"{float(row['ms_median']) / bmm_ms[row['mode']]:.3f}"
            rows += config_rows
    return rows


def plot(csv_path: Path, png_path: Path) -> None:
    """Bars of median time (log scale) per mode and provider for each config of the latest
    run in the CSV, and the peak-extra-memory ratio where it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = common.read_rows(csv_path)
    if not rows:
        return
    last = max(r["date"] for r in rows)
    rows = [r for r in rows if r["date"] == last]

    def key(r):
        return (r.get("op") or "linear", int(r["S"]), int(r["B"]), int(r["N"]), int(r["K"]))

    configs = sorted({key(r) for r in rows})
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    has_mem = any(r["mem_ratio"] for r in rows)
    nrows = 2 if has_mem else 1
    fig, axes = plt.subplots(nrows, len(configs), figsize=(4.5 * len(configs), 3.6 * nrows),
                             squeeze=False)  # fmt: skip
    width = 0.8 / max(1, len(providers))
    for j, (op, S, B, N, K) in enumerate(configs):
        sel = [r for r in rows if key(r) == (op, S, B, N, K)]
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
        ax.set_title(f"{op} S={S} B={B} {N}x{K} {sel[0]['dtype']}", fontsize=9)
        ax.set_ylabel("ms (median)")
        if has_mem:
            axes[1][j].set_xticks(range(len(providers)), providers, rotation=45, ha="right",
                                  fontsize=7)  # fmt: skip
            axes[1][j].set_ylabel("full step: extra (bar), workspace (grey)\n/ |mu, rho| fp32",
                                  fontsize=8)  # fmt: skip
            axes[1][j].axhline(2.0, color="k", lw=0.8, ls="--")
    axes[0][0].legend(fontsize=7)
    r0 = rows[0]
    dev = r0["gpu"] if r0["device"] == "cuda" else r0["cpu"]
    fig.suptitle(f"{dev}, {r0['threads']} threads  torch {r0['torch']}  triton {r0['triton']}  "
                 f"spar {r0['spar']} ({r0['spar_src']})  {last}", fontsize=9)  # fmt: skip
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
    p.add_argument("--op", choices=sorted(OP_PROVIDERS), default="linear", help="layer type")
    p.add_argument("--conv", type=int, nargs=4, metavar=("C", "O", "HW", "k"),
                   help="--op conv: in/out channels, image size, kernel size")  # fmt: skip
    p.add_argument("--providers", nargs="+", choices=PROVIDERS,
                   help="default: every provider of --op")  # fmt: skip
    p.add_argument("--rep", type=float, default=100.0,
                   help="CUDA: ms of timed repetitions per measurement (do_bench)")  # fmt: skip
    p.add_argument("--min-run-time", type=float, default=1.0,
                   help="CPU: seconds per measurement (torch.utils.benchmark)")  # fmt: skip
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument(
        "--max-wait", type=float, default=3.0,
        help="CPU: at most this many seconds waited for a quiet machine before each timing",
    )  # fmt: skip
    p.add_argument("--csv", type=Path, help="default: bench/results/kernels_{cpu,gpu}.csv")
    p.add_argument("--png", type=Path, help="default: the CSV path with .png")
    p.add_argument("--overwrite", action="store_true", help="start a new CSV")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from the CSV")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    # defaults: the configuration on a GPU, a small one that runs in minutes on CPU
    conv = args.op == "conv"
    args.providers = args.providers or list(OP_PROVIDERS[args.op])
    args.samples = args.samples or ([16, 64] if gpu and not conv else [4, 16] if not conv
                                    else [8, 32] if gpu else [4])  # fmt: skip
    args.batch = args.batch or ([128] if gpu and not conv else [32] if gpu or not conv
                                else [8])  # fmt: skip
    args.conv = args.conv or ([64, 64, 32, 3] if gpu else [16, 16, 16, 3])
    args.features = args.features or ([4096, 4096] if gpu else [256, 256])
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    suffix = "gpu" if torch.device(args.device).type == "cuda" else "cpu"
    args.csv = args.csv or common.RESULTS_DIR / f"kernels_{suffix}.csv"
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
        if args.overwrite:
            args.csv.unlink(missing_ok=True)
        common.append_rows(args.csv, rows)
        print(f"wrote {len(rows)} rows to {args.csv}")
    try:
        plot(args.csv, args.png)
        print(f"plot: {args.png}")
    except ImportError as e:  # matplotlib is optional (the GPU machine may lack it)
        print(f"no plot: {e}", file=sys.stderr)


if __name__ == "__main__":
    main()
