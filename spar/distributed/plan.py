"""Cost model for sampling parallelism: rank every feasible ``sample x data`` grid.

:func:`plan` predicts, for each grid ``sample * data = gpus`` (``sample`` dividing S,
``data`` dividing the global batch B), the time of a training step and of an epoch, the
scaling efficiency and the memory each rank needs, and explains each figure in one line.

Model (per step, per rank; ``s = S / sample`` samples on ``b = B / data`` examples)
-----------------------------------------------------------------------------------
compute
    ``t_c = s * (weight_cost_s + sample_cost_s * b / cost_batch)``: ``sample_cost_s`` is the
    forward+backward time of one weight sample over ``cost_batch`` examples (a
    "sample-batch"); ``weight_cost_s`` (default 0) is the part of a weight sample that does
    not scale with the batch (drawing ``W_s`` in forward and again in backward), which a
    data split does not divide but a sample split does. A fraction
    ``backward_fraction`` of it is the backward, ``t_b``; the rest is the forward.
    ``step_overhead_s`` is paid once per step on every grid (data loading, optimizer, host
    launch overhead): it does not shrink with more GPUs.
communication (ring all-reduce, alpha-beta)
    All ``n = gpus`` ranks average the gradient (the reducer all-reduces over the world,
    both axes at once). Gradient bytes = trainable parameters x bytes of ``comm_dtype``; a
    Bayesian layer trains ``mu`` and ``rho``, so a Bayesian parameter counts twice. One
    bucket of ``m`` bytes costs ``2(n-1) * alpha + 2(n-1)/n * m / beta``: ``2(n-1)`` ring
    steps each paying ``alpha`` (``latency_us``), and the bus factor ``2(n-1)/n`` of the
    bytes at the ring's bandwidth ``beta``: ``intra_node_gb_s`` while the ring stays in one
    node, ``inter_node_gb_s`` as soon as it spans nodes (the slowest link sets the pace).
overlap
    Buckets are filled in the order backward produces gradients (first bucket
    ``first_bucket_mb``, then ``bucket_mb``, optionally a small last bucket, as
    :class:`~spar.distributed.Reducer` does). Bucket ``k`` is ready at ``t_b * r_k`` (``r_k``:
    the fraction of backward done when its last gradient exists; ``grad_profile`` or, by
    default, gradients produced at a constant rate). Buckets go out one after another; only
    the time the last one ends after the end of backward is exposed:
    ``step = step_overhead_s + t_c + exposed``.
memory per rank
    parameters (``mu`` and ``rho``) + gradients + optimizer state (Adam: 2 more copies,
    momentum SGD: 1, SGD: 0), all in ``param_dtype``; a communication buffer when
    ``comm_dtype`` differs; activations ``activation_bytes * s * b``; ``memory_overhead_gib``
    (CUDA context, allocator slack). A grid fits when this is at most ``device_memory_gib``.

The constants can be measured (:func:`measure_sample_cost`) or fitted to timings
(:func:`calibrate`); ``bench/validate_plan.py`` fits them to published scaling runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from spar.distributed.grid import MODES

__all__ = [
    "Calibration",
    "Observation",
    "PlanRow",
    "calibrate",
    "measure_sample_cost",
    "plan",
    "predict_step",
    "ring_allreduce_time",
]

_GIB = 2**30
_MIB = 2**20
_GB = 1e9
OPTIMIZERS = {"adam": 2, "adamw": 2, "sgd_momentum": 1, "sgd": 0}
_DTYPES = {
    "float32": 4,
    "fp32": 4,
    "float16": 2,
    "fp16": 2,
    "bfloat16": 2,
    "bf16": 2,
    "float64": 8,
}


# ---------------------------------------------------------------------------- results


@dataclass(frozen=True)
class PlanRow:
    """One grid as predicted by :func:`plan` (times in seconds, memory in bytes).

    Attributes:
        mode: ``local``, ``sp``, ``ddp`` or ``hybrid``.
        sample_axis, data_axis: the grid; ``sample_axis * data_axis == gpus``.
        samples_per_rank, batch_per_rank: the local S and the local batch.
        step_time_s: one training step (overhead + compute + exposed all-reduce).
        epoch_time_s: ``steps_per_epoch * step_time_s`` (``None`` without ``dataset_size``).
        steps_per_epoch: ``ceil(dataset_size / batch_size)`` (``None`` without it).
        compute_s, overhead_s, comm_s, exposed_comm_s: parts of one step; ``comm_s`` is the
            all-reduce time of all buckets, ``exposed_comm_s`` the part not hidden by backward.
        efficiency: ``t(1 GPU) / (gpus * t(grid))`` (1 = perfect scaling).
        memory_per_rank_bytes: the sum of the memory parts below.
        fits: whether ``memory_per_rank_bytes <= device memory``.
        reason: why it does not fit ("" when it fits).
        explanation: one line that says where the time and the memory go.
    """

    mode: str
    sample_axis: int
    data_axis: int
    gpus: int
    samples_per_rank: int
    batch_per_rank: int
    step_time_s: float
    epoch_time_s: float | None
    steps_per_epoch: int | None
    compute_s: float
    overhead_s: float
    comm_s: float
    exposed_comm_s: float
    num_buckets: int
    efficiency: float
    memory_per_rank_bytes: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    fits: bool
    reason: str
    explanation: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Config:
    """Validated inputs of :func:`plan` (all in SI units: bytes, seconds, bytes/s)."""

    trainable_params: int
    num_samples: int
    batch_size: int
    gpus: int
    dataset_size: int | None
    gpus_per_node: int
    device_memory: float
    intra_bw: float
    inter_bw: float
    latency: float
    sample_cost: float
    weight_cost: float
    cost_batch: int
    step_overhead: float
    activation_bytes: float | None
    comm_bytes: int
    param_bytes: int
    optimizer_copies: int
    memory_overhead: float
    bucket_bytes: float
    first_bucket_bytes: float
    small_last_bucket: bool
    backward_fraction: float
    segments: tuple[tuple[float, float], ...] | None  # (fraction of bytes, ready fraction)


# ---------------------------------------------------------------------------- formulas


def ring_allreduce_time(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """Seconds for a ring all-reduce of ``nbytes`` over ``n`` ranks (alpha-beta model).

    ``2(n-1) * latency + 2(n-1)/n * nbytes / bandwidth``; 0 for ``n == 1``.
    ``bandwidth`` in bytes/s, ``latency`` in seconds per ring step.
    """
    if n <= 1:
        return 0.0
    return 2 * (n - 1) * latency + 2 * (n - 1) / n * nbytes / bandwidth


def _buckets(cfg: _Config) -> list[tuple[float, float, int, float]]:
    """``[(bytes, ready fraction of backward, count, ready step)]`` in launch order.

    A row stands for ``count`` equal buckets of ``bytes``, the ``j``-th (from 0) ready at
    ``ready + j * step``: the full buckets of a constant-rate profile are one row, so the
    bucket count never costs a Python loop (a 1e12-parameter model has millions of them).
    """
    total = float(cfg.trainable_params * cfg.comm_bytes)
    first, cap = cfg.first_bucket_bytes, cfg.bucket_bytes
    if cfg.segments is None:  # gradients produced at a constant rate: split exactly
        out: list[tuple[float, float, int, float]] = []
        rest = total
        last = min(first, total) if cfg.small_last_bucket else 0.0
        rest -= last
        done = 0.0
        if rest > 0:
            head = min(first, rest)
            rest -= head
            done += head
            out.append((head, min(1.0, done / total), 1, 0.0))
        if rest > 1e-9 * total:
            full = int(rest // cap)  # k full buckets of cap, then what remains
            rem = rest - full * cap
            if rem <= 1e-9 * total:
                rem = 0.0
            if full:
                r0 = min(1.0, (done + cap) / total)
                out.append((cap, r0, full, cap / total))
                done += full * cap
            if rem > 0:
                done += rem
                out.append((rem, min(1.0, done / total), 1, 0.0))
        if last > 0:
            out.append((last, 1.0, 1, 0.0))
        return out
    segs = [(f * total, r) for f, r in cfg.segments]
    tail: list[tuple[float, float]] = []
    if cfg.small_last_bucket and len(segs) > 1:
        tail_bytes = 0.0
        while len(segs) > 1 and (not tail or tail_bytes + segs[-1][0] <= first):
            tail_bytes += segs[-1][0]
            tail.insert(0, segs.pop())
    out, cur, ready = [], 0.0, 0.0
    for b, r in segs:
        cur, ready = cur + b, max(ready, r)
        if cur >= (first if not out else cap):
            out.append((cur, ready, 1, 0.0))
            cur = 0.0
    if cur > 0:
        out.append((cur, ready, 1, 0.0))
    if tail:
        out.append((sum(b for b, _ in tail), max(r for _, r in tail), 1, 0.0))
    return out


def _num_buckets(buckets: list[tuple[float, float, int, float]]) -> int:
    return sum(count for _, _, count, _ in buckets)


def _pipeline(
    buckets: list[tuple[float, float, int, float]],
    t_backward: float,
    n: int,
    bw: float,
    lat: float,
) -> tuple[float, float]:
    """(all-reduce time of all buckets, time the last one ends after backward).

    Buckets go out one after another: ``end_j = max(end_{j-1}, ready_j) + t``. For ``k``
    equal buckets (time ``t``) ready at ``R_0 + j * d`` this unrolls to ``max(end + k t,
    max_j(R_j + (k - j) t))``, linear in ``j``, so its maximum is at ``j = 0`` or ``k - 1``.
    """
    end = total = 0.0
    for nbytes, ready, count, step in buckets:
        t = ring_allreduce_time(nbytes, n, bw, lat)
        if count == 1:
            end = max(end, ready * t_backward) + t
        else:
            r_last = min(1.0, ready + (count - 1) * step)
            end = max(end + count * t, ready * t_backward + count * t, r_last * t_backward + t)
        total += count * t
    return total, max(0.0, end - t_backward)


def _fmt_gib(nbytes: float) -> str:
    """GiB with one decimal, or 3 significant digits past 1e5 GiB (no 30-digit columns)."""
    g = nbytes / _GIB
    return f"{g:.1f}" if g < 1e5 else f"{g:.3g}"


def _check_finite(**values: float | None) -> None:
    """Raise a ValueError naming the inputs behind a result that overflowed."""
    culprits = {
        "compute": "sample_cost_s, weight_cost_s, num_samples or batch_size",
        "comm": "num_params, bucket_mb, intra_node_gb_s/inter_node_gb_s or latency_us",
        "step": "sample_cost_s, weight_cost_s, step_overhead_s or the all-reduce inputs",
        "epoch": "dataset_size or the step time's inputs",
        "t_one": "sample_cost_s, weight_cost_s, num_samples or batch_size",
    }
    for name, v in values.items():
        if v is not None and not math.isfinite(v):
            raise ValueError(f"the predicted {name} time overflowed ({v}): reduce {culprits[name]}")


def _mode(a: int, b: int) -> str:
    if a * b == 1:
        return "local"
    return "sp" if b == 1 else ("ddp" if a == 1 else "hybrid")


def _fmt_s(t: float) -> str:
    if t >= 1e6:
        return f"{t:.3g} s"
    if t >= 100:
        return f"{t:.0f} s"
    if t >= 0.1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3g} ms"
    return f"{t * 1e6:.1f} us"


def _timing(
    cfg: _Config,
    a: int,
    b: int,
    buckets: list[tuple[float, float, int, float]] | None = None,
    latency: float | None = None,
    inter_bw: float | None = None,
) -> tuple[float, float, float, float]:
    """(step, compute, all-reduce, exposed all-reduce) seconds of grid ``a x b``.

    ``latency`` and ``inter_bw`` override ``cfg``'s (the calibration's inner loop)."""
    n = a * b
    compute = (cfg.num_samples // a) * (
        cfg.weight_cost + cfg.sample_cost * (cfg.batch_size // b) / cfg.cost_batch
    )
    if n == 1:
        return cfg.step_overhead + compute, compute, 0.0, 0.0
    inter_bw = cfg.inter_bw if inter_bw is None else inter_bw
    bw = cfg.intra_bw if n <= cfg.gpus_per_node else inter_bw
    if buckets is None:
        buckets = _buckets(cfg)
    lat = cfg.latency if latency is None else latency
    comm, exposed = _pipeline(buckets, cfg.backward_fraction * compute, n, bw, lat)
    return cfg.step_overhead + compute + exposed, compute, comm, exposed


def _evaluate(cfg: _Config, a: int, b: int) -> PlanRow:
    n = a * b
    s_loc, b_loc = cfg.num_samples // a, cfg.batch_size // b
    nodes = math.ceil(n / cfg.gpus_per_node)
    bw = cfg.intra_bw if nodes == 1 else cfg.inter_bw
    buckets = _buckets(cfg) if n > 1 else []
    nb = _num_buckets(buckets)
    step, compute, comm, exposed = _timing(cfg, a, b, buckets)
    t_one = cfg.step_overhead + cfg.num_samples * (
        cfg.weight_cost + cfg.sample_cost * cfg.batch_size / cfg.cost_batch
    )
    steps = -(-cfg.dataset_size // cfg.batch_size) if cfg.dataset_size else None
    epoch = steps * step if steps else None
    _check_finite(step=step, compute=compute, comm=comm, epoch=epoch, t_one=t_one)

    p = cfg.trainable_params
    param_b = p * cfg.param_bytes
    grad_b = p * cfg.param_bytes
    opt_b = cfg.optimizer_copies * p * cfg.param_bytes
    buf_b = p * cfg.comm_bytes if (cfg.comm_bytes != cfg.param_bytes and n > 1) else 0
    act_b = int(round((cfg.activation_bytes or 0.0) * s_loc * b_loc))
    mem = int(param_b + grad_b + opt_b + buf_b + act_b + cfg.memory_overhead)
    fits = mem <= cfg.device_memory
    reason = ""
    if not fits:
        reason = (
            f"needs {_fmt_gib(mem)} GiB per rank > {_fmt_gib(cfg.device_memory)} GiB "
            f"(params+grads+optimizer {_fmt_gib(param_b + grad_b + opt_b + buf_b)} GiB, "
            f"activations {_fmt_gib(act_b)} GiB for {s_loc} sample{'s' if s_loc > 1 else ''} "
            f"x {b_loc} example{'s' if b_loc > 1 else ''})"
        )

    unit, scale = ("per epoch", steps) if steps else ("per step", 1)
    parts = f"compute {_fmt_s(compute * scale)}"
    if cfg.step_overhead > 0:
        parts += f" + overhead {_fmt_s(cfg.step_overhead * scale)}"
    if n > 1:
        where = "in 1 node" if nodes == 1 else f"across {nodes} nodes"
        parts += (
            f" + exposed all-reduce {_fmt_s(exposed * scale)} (of {_fmt_s(comm * scale)}; "
            f"{nb} bucket{'s' if nb > 1 else ''}, ring of {n} {where} "
            f"at {bw / _GB:g} GB/s)"
        )
    text = (
        f"{parts} {unit}; {s_loc} sample{'s' if s_loc > 1 else ''} x {b_loc} "
        f"example{'s' if b_loc > 1 else ''} per rank;"
        f" {_fmt_gib(mem)} GiB per rank"
    )
    if cfg.activation_bytes is None:
        text += " (activations not counted: give activation_bytes)"
    if not fits:
        text = f"does not fit: {reason}"
    return PlanRow(
        mode=_mode(a, b),
        sample_axis=a,
        data_axis=b,
        gpus=n,
        samples_per_rank=s_loc,
        batch_per_rank=b_loc,
        step_time_s=step,
        epoch_time_s=epoch,
        steps_per_epoch=steps,
        compute_s=compute,
        overhead_s=cfg.step_overhead,
        comm_s=comm,
        exposed_comm_s=exposed,
        num_buckets=nb,
        efficiency=t_one / (n * step),
        memory_per_rank_bytes=mem,
        param_bytes=int(param_b),
        grad_bytes=int(grad_b),
        optimizer_bytes=int(opt_b),
        activation_bytes=act_b,
        fits=fits,
        reason=reason,
        explanation=text,
    )


# ---------------------------------------------------------------------------- validation


# Sane ranges: beyond them the results overflow or stop meaning anything, and a huge GPU
# count would make the grid search slow. Counts are ints <= _MAX_COUNT, except these:
_MAX_COUNT = 10**15
_MAX_GPUS = 10**9
_MAX_SECONDS = 1e9  # per sample-batch, weight sample or step (31 years)
_MAX_GIB = 1e9
_BW_GB_S = (1e-6, 1e9)  # 1 kB/s .. 1 EB/s
_MIN_BUCKET_BYTES = 1024


def _short(value: int) -> str:
    """``1.23e+16`` for a big int; ints past a float's range by their bit length."""
    try:
        return f"{value:.3g}"
    except OverflowError:
        return f"about 2^{value.bit_length()}"


def _int(name: str, value: Any, minimum: int = 1, maximum: int = _MAX_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be an int <= {maximum:.0e}, got {_short(value)}")
    return value


def _num(
    name: str,
    value: Any,
    *,
    minimum: float = 0.0,
    strict: bool = True,
    maximum: float = math.inf,
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int past 1.8e308
        raise ValueError(f"{name} must be a number <= {maximum:g}, got {_short(value)}") from None
    bad = not math.isfinite(value) or (value <= minimum if strict else value < minimum)
    if bad:
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {op} {minimum:g}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be a number <= {maximum:g}, got {value:g}")
    return value


def _dtype_bytes(name: str, value: Any) -> int:
    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise ValueError(f"{name} must be a floating dtype, got {value}")
        return torch.empty((), dtype=value).element_size()
    if isinstance(value, str) and value.lower() in _DTYPES:
        return _DTYPES[value.lower()]
    raise ValueError(
        f"{name} must be one of {sorted(set(_DTYPES))} or a torch dtype, got {value!r}"
    )


def _count_model(model: nn.Module, bayesian_fraction: float) -> tuple[int, list[int]]:
    """(trainable parameters, their numels in backward order) of ``model``.

    A model with Bayesian layers (parameters named ``*_rho``) is counted as it is: its
    ``mu`` and ``rho`` are both parameters. A deterministic model is counted as it would be
    after :func:`spar.nn.bayesianize`: each parameter becomes ``1 + bayesian_fraction``.
    """
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no trainable parameters")
    bayesian = any(k.endswith("_rho") for k, _ in named)
    scale = 1.0 if bayesian else 1.0 + bayesian_fraction
    numels = [int(round(p.numel() * scale)) for _, p in reversed(named)]
    return sum(numels), numels


def measure_sample_cost(
    model: nn.Module, example_input: Tensor, *, num_samples: int = 2, repeats: int = 3
) -> tuple[float, float]:
    """Measure (seconds per sample-batch, activation bytes per sample-example) here.

    Runs forward+backward of ``spar.nn.MonteCarlo(model, num_samples)`` on ``example_input``
    (``(B, ...)``) on its device, ``repeats`` times after one warm-up, and returns the
    median time divided by ``num_samples`` (a "sample-batch" is one weight sample over the
    B examples of ``example_input``), and the bytes of all module outputs of one sample
    divided by B (a proxy for the activations autograd keeps).
    """
    from spar.nn import MonteCarlo

    if not isinstance(example_input, Tensor) or example_input.dim() < 1:
        raise TypeError("example_input must be a tensor of shape (B, ...)")
    _int("num_samples", num_samples)
    _int("repeats", repeats)
    mc = MonteCarlo(model, num_samples)
    sync = torch.cuda.synchronize if example_input.is_cuda else (lambda: None)

    def once() -> float:
        sync()
        t = time.perf_counter()
        out = mc(example_input)
        out.float().square().mean().backward()
        sync()
        dt = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        return dt

    once()
    times = sorted(once() for _ in range(repeats))
    total = [0]

    def hook(_m, _i, out):
        if isinstance(out, Tensor):
            total[0] += out.numel() * out.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            MonteCarlo(model, 1)(example_input)
    finally:
        for h in handles:
            h.remove()
    return times[len(times) // 2] / num_samples, total[0] / example_input.shape[0]


def _config(
    model: nn.Module | None,
    *,
    num_params: int | None,
    bayesian_fraction: float,
    num_samples: int,
    batch_size: int,
    gpus: int,
    dataset_size: int | None,
    gpus_per_node: int,
    device_memory_gib: float,
    intra_node_gb_s: float,
    inter_node_gb_s: float,
    latency_us: float,
    sample_cost_s: float | None,
    weight_cost_s: float,
    cost_batch: int | None,
    step_overhead_s: float,
    activation_bytes: float | None,
    example_input: Tensor | None,
    comm_dtype: Any,
    param_dtype: Any,
    optimizer: str,
    memory_overhead_gib: float,
    bucket_mb: float,
    first_bucket_mb: float,
    small_last_bucket: bool,
    backward_fraction: float,
    grad_profile: Sequence[tuple[float, float]] | None,
) -> _Config:
    bayesian_fraction = _num("bayesian_fraction", bayesian_fraction, strict=False)
    if bayesian_fraction > 1:
        raise ValueError(f"bayesian_fraction must be in [0, 1], got {bayesian_fraction}")
    segments = None
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        if num_params is not None:
            raise ValueError("give either model or num_params, not both")
        trainable, numels = _count_model(model, bayesian_fraction)
        done = 0
        segs = []
        for k in numels:  # gradients assumed produced at a constant rate, in reverse order
            done += k
            segs.append((k / trainable, done / trainable))
        segments = tuple(segs)
    elif num_params is None:
        raise ValueError("give model (an nn.Module) or num_params (deterministic parameters)")
    else:
        if isinstance(num_params, float) and num_params.is_integer():
            num_params = int(num_params)
        trainable = int(round(_int("num_params", num_params) * (1 + bayesian_fraction)))
    if trainable > 2 * _MAX_COUNT:
        raise ValueError(f"model has {_short(trainable)} trainable values: at most 2e+15")
    if grad_profile is not None:
        segments = _check_profile(grad_profile)

    num_samples = _int("num_samples", num_samples)
    batch_size = _int("batch_size", batch_size)
    gpus = _int("gpus", gpus, maximum=_MAX_GPUS)
    if dataset_size is not None:
        dataset_size = _int("dataset_size", dataset_size, maximum=10**18)  # tokens, say
        if dataset_size < batch_size:
            raise ValueError(
                f"dataset_size must be >= batch_size (one step), got {dataset_size} < {batch_size}"
            )
    if sample_cost_s is None:
        if model is None or example_input is None:
            raise ValueError(
                "sample_cost_s (seconds of forward+backward of one weight sample over "
                "cost_batch examples) is required, or pass model and example_input to measure it"
            )
        sample_cost_s, measured_act = measure_sample_cost(model, example_input)
        cost_batch = int(example_input.shape[0])
        if activation_bytes is None:
            activation_bytes = measured_act
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    if not isinstance(small_last_bucket, bool):
        raise TypeError(f"small_last_bucket must be a bool, got {type(small_last_bucket).__name__}")
    bf = _num("backward_fraction", backward_fraction, strict=False)
    if bf > 1:
        raise ValueError(f"backward_fraction must be in [0, 1], got {bf}")
    return _Config(
        trainable_params=trainable,
        num_samples=num_samples,
        batch_size=batch_size,
        gpus=gpus,
        dataset_size=dataset_size,
        gpus_per_node=_int("gpus_per_node", gpus_per_node, maximum=_MAX_GPUS),
        device_memory=_num("device_memory_gib", device_memory_gib, maximum=_MAX_GIB) * _GIB,
        intra_bw=_bandwidth("intra_node_gb_s", intra_node_gb_s),
        inter_bw=_bandwidth("inter_node_gb_s", inter_node_gb_s),
        latency=_num("latency_us", latency_us, strict=False, maximum=_MAX_SECONDS) * 1e-6,
        sample_cost=_num("sample_cost_s", sample_cost_s, maximum=_MAX_SECONDS),
        weight_cost=_num("weight_cost_s", weight_cost_s, strict=False, maximum=_MAX_SECONDS),
        cost_batch=_int("cost_batch", cost_batch) if cost_batch is not None else batch_size,
        step_overhead=_num("step_overhead_s", step_overhead_s, strict=False, maximum=_MAX_SECONDS),
        activation_bytes=(
            None
            if activation_bytes is None
            else _num("activation_bytes", activation_bytes, strict=False, maximum=_MIB * _GIB)
        ),
        comm_bytes=_dtype_bytes("comm_dtype", comm_dtype),
        param_bytes=_dtype_bytes("param_dtype", param_dtype),
        optimizer_copies=OPTIMIZERS[optimizer],
        memory_overhead=_num(
            "memory_overhead_gib", memory_overhead_gib, strict=False, maximum=_MAX_GIB
        )
        * _GIB,
        bucket_bytes=_bucket("bucket_mb", bucket_mb),
        first_bucket_bytes=_bucket("first_bucket_mb", first_bucket_mb),
        small_last_bucket=small_last_bucket,
        backward_fraction=bf,
        segments=segments,
    )


def _bandwidth(name: str, value: Any) -> float:
    """GB/s -> bytes/s, within :data:`_BW_GB_S`."""
    lo, hi = _BW_GB_S
    gb_s = _num(name, value, maximum=hi)
    if gb_s < lo:
        raise ValueError(f"{name} must be >= {lo:g} GB/s (1 kB/s), got {gb_s:g}")
    return gb_s * _GB


def _bucket(name: str, value: Any) -> float:
    """MiB -> bytes, at least 1 KiB (smaller buckets would only model launch overhead)."""
    nbytes = _num(name, value, maximum=_MAX_GIB * 1024) * _MIB
    if nbytes < _MIN_BUCKET_BYTES:
        raise ValueError(f"{name} must be >= 1 KiB ({1 / 1024:g} MiB), got {value:g} MiB")
    return nbytes


def _check_profile(profile: Sequence[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    try:
        pairs = [(float(f), float(r)) for f, r in profile]
    except (TypeError, ValueError):
        raise TypeError(
            "grad_profile must be a sequence of (fraction of gradient bytes, fraction of "
            "backward done when they are ready) pairs"
        ) from None
    if not pairs:
        raise ValueError("grad_profile must not be empty")
    total = sum(f for f, _ in pairs)
    last = 0.0
    for f, r in pairs:
        if not (f >= 0 and 0 <= r <= 1) or r < last:
            raise ValueError(
                "grad_profile: byte fractions must be >= 0 and ready fractions in [0, 1], "
                f"non-decreasing (backward order); got {pairs}"
            )
        last = r
    if not math.isclose(total, 1.0, rel_tol=1e-3):
        raise ValueError(f"grad_profile: byte fractions must sum to 1, got {total:.6g}")
    return tuple((f / total, r) for f, r in pairs)


def _divisors(n: int) -> list[int]:
    """Divisors of ``n`` in increasing order, by trial division up to ``sqrt(n)``."""
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


# ---------------------------------------------------------------------------- public API


def plan(
    model: nn.Module | None = None,
    *,
    num_params: int | None = None,
    num_samples: int,
    batch_size: int,
    gpus: int,
    dataset_size: int | None = None,
    gpus_per_node: int = 8,
    device_memory_gib: float = 80.0,
    intra_node_gb_s: float = 150.0,
    inter_node_gb_s: float = 25.0,
    latency_us: float = 10.0,
    sample_cost_s: float | None = None,
    weight_cost_s: float = 0.0,
    cost_batch: int | None = None,
    step_overhead_s: float = 0.0,
    activation_bytes: float | None = None,
    example_input: Tensor | None = None,
    comm_dtype: str | torch.dtype = "float32",
    param_dtype: str | torch.dtype = "float32",
    optimizer: str = "adam",
    memory_overhead_gib: float = 1.0,
    bucket_mb: float = 25.0,
    first_bucket_mb: float = 1.0,
    small_last_bucket: bool = True,
    backward_fraction: float = 2 / 3,
    bayesian_fraction: float = 1.0,
    grad_profile: Sequence[tuple[float, float]] | None = None,
    modes: Sequence[str] | None = None,
) -> list[PlanRow]:
    """Rank every feasible ``sample x data`` grid on ``gpus`` GPUs (see the module docstring).

    Args:
        model: the network (``nn.Module``); Bayesian layers count ``mu`` and ``rho``; a
            deterministic model is counted as after ``bayesianize``. Or give ``num_params``.
        num_params: deterministic parameters of the network (each Bayesian one trains
            ``mu`` and ``rho``: ``1 + bayesian_fraction`` per parameter).
        num_samples: Monte Carlo samples S per step.  batch_size: global batch B (examples).
        gpus: GPUs in the job.  gpus_per_node: GPUs per node.
        dataset_size: examples per epoch (for ``epoch_time_s``).
        device_memory_gib: memory of one GPU (GiB).
        intra_node_gb_s, inter_node_gb_s: ring all-reduce bandwidth (GB/s = 1e9 bytes/s)
            inside a node and across nodes.  latency_us: latency per ring step (us).
        sample_cost_s: seconds of forward+backward for one weight sample over
            ``cost_batch`` examples (default ``batch_size``); measured when ``None`` and
            ``model`` and ``example_input`` are given.
        weight_cost_s: seconds per weight sample that do not scale with the batch.
        step_overhead_s: seconds per step paid on every grid (data loading, optimizer).
        activation_bytes: activation bytes per (sample, example) kept for backward.
        comm_dtype, param_dtype: dtypes of the all-reduce and of parameters/gradients.
        optimizer: ``adam``/``adamw`` (2 state copies), ``sgd_momentum`` (1), ``sgd`` (0).
        memory_overhead_gib: fixed memory per rank (CUDA context, allocator slack).
        bucket_mb, first_bucket_mb, small_last_bucket: the reducer's bucketing (MiB).
        backward_fraction: the share of ``sample_cost_s`` spent in backward.
        grad_profile: ``[(fraction of gradient bytes, fraction of backward done when they
            are ready)]`` in backward order; default: produced at a constant rate.
        modes: keep only these modes (``local``, ``sp``, ``ddp``, ``hybrid``).

    Returns:
        :class:`PlanRow` s, grids that fit first, then by predicted time (fastest first),
        then fewer data ranks first.

    Ties:
        With ``weight_cost_s=0`` (the default) compute is ``(S/a) * (B/b) * sample_cost_s /
        cost_batch``, the same for every grid ``a * b = gpus``: only the all-reduce (the same
        world size on every grid too, so the same unless the bucketing's overlap differs) and
        memory can separate them, and the rows usually tie in step time, so the ranking is
        only the tie-break. What would separate them is ``weight_cost_s``, the
        batch-independent cost per weight sample (measure it: the time of one sample at a
        tiny batch), which a sample split divides and a data split does not. A rank's
        efficiency at a smaller local batch (GPU utilisation) is not modelled. ``spar plan``
        says so when the fitting rows tie within 0.1%.

    Raises:
        ValueError/TypeError naming the argument and what it expects (counts are ints up to
        1e15, ``dataset_size`` up to 1e18 and at least ``batch_size``, ``gpus`` up to 1e9,
        times up to 1e9 s, bandwidths 1e-6..1e9 GB/s, buckets at least 1 KiB); ValueError
        when no grid satisfies ``sample | S`` and ``data | B``, or when a prediction
        overflows.
    """
    cfg = _config(
        model,
        num_params=num_params,
        bayesian_fraction=bayesian_fraction,
        num_samples=num_samples,
        batch_size=batch_size,
        gpus=gpus,
        dataset_size=dataset_size,
        gpus_per_node=gpus_per_node,
        device_memory_gib=device_memory_gib,
        intra_node_gb_s=intra_node_gb_s,
        inter_node_gb_s=inter_node_gb_s,
        latency_us=latency_us,
        sample_cost_s=sample_cost_s,
        weight_cost_s=weight_cost_s,
        cost_batch=cost_batch,
        step_overhead_s=step_overhead_s,
        activation_bytes=activation_bytes,
        example_input=example_input,
        comm_dtype=comm_dtype,
        param_dtype=param_dtype,
        optimizer=optimizer,
        memory_overhead_gib=memory_overhead_gib,
        bucket_mb=bucket_mb,
        first_bucket_mb=first_bucket_mb,
        small_last_bucket=small_last_bucket,
        backward_fraction=backward_fraction,
        grad_profile=grad_profile,
    )
    if modes is not None:
        if isinstance(modes, str):
            modes = (modes,)
        unknown = [m for m in modes if m not in MODES]
        if unknown:
            raise ValueError(f"modes must be a subset of {MODES}, got {list(modes)}")
    rows = []
    # the sample axis divides both S and gpus: only the divisors of their gcd (<= sqrt steps)
    for a in _divisors(math.gcd(cfg.num_samples, cfg.gpus)):
        b = cfg.gpus // a
        if cfg.num_samples % a or cfg.batch_size % b:
            continue
        if modes is not None and _mode(a, b) not in modes:
            continue
        rows.append(_evaluate(cfg, a, b))
    if not rows:
        raise ValueError(
            f"no grid sample x data = {cfg.gpus} GPUs with sample dividing num_samples="
            f"{cfg.num_samples} and data dividing batch_size={cfg.batch_size}"
            + (f" in modes {list(modes)}" if modes is not None else "")
            + ": choose num_samples or batch_size with a common factor with gpus"
        )
    rows.sort(key=lambda r: (not r.fits, r.step_time_s, r.data_axis))
    return rows


@dataclass(frozen=True)
class Observation:
    """A measured step: S samples on global batch B over a ``sample x data`` grid."""

    num_samples: int
    batch_size: int
    sample_axis: int
    data_axis: int
    step_time_s: float


@dataclass(frozen=True)
class Calibration:
    """Constants fitted by :func:`calibrate` and the fit's residuals (relative errors)."""

    sample_cost_s: float
    step_overhead_s: float
    latency_us: float
    inter_node_gb_s: float
    rms_rel_error: float
    max_abs_rel_error: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def plan_kwargs(self) -> dict[str, float]:
        """The fitted constants as :func:`plan` keyword arguments."""
        return {
            "sample_cost_s": self.sample_cost_s,
            "step_overhead_s": self.step_overhead_s,
            "latency_us": self.latency_us,
            "inter_node_gb_s": self.inter_node_gb_s,
        }


def predict_step(obs: Observation, **plan_kwargs: Any) -> float:
    """Predicted step time (s) of ``obs``'s grid, given :func:`plan`'s keyword arguments."""
    cfg = _config_for(obs, plan_kwargs)
    return _evaluate(cfg, obs.sample_axis, obs.data_axis).step_time_s


def _config_for(obs: Observation, kw: dict[str, Any]) -> _Config:
    full = {
        "num_params": None,
        "bayesian_fraction": 1.0,
        "dataset_size": None,
        "gpus_per_node": 8,
        "device_memory_gib": 80.0,
        "intra_node_gb_s": 150.0,
        "inter_node_gb_s": 25.0,
        "latency_us": 10.0,
        "sample_cost_s": None,
        "weight_cost_s": 0.0,
        "cost_batch": None,
        "step_overhead_s": 0.0,
        "activation_bytes": None,
        "example_input": None,
        "comm_dtype": "float32",
        "param_dtype": "float32",
        "optimizer": "adam",
        "memory_overhead_gib": 1.0,
        "bucket_mb": 25.0,
        "first_bucket_mb": 1.0,
        "small_last_bucket": True,
        "backward_fraction": 2 / 3,
        "grad_profile": None,
    }
    unknown = set(kw) - set(full) - {"model"}
    if unknown:
        raise TypeError(f"unknown plan arguments: {sorted(unknown)}")
    full.update(kw)
    model = full.pop("model", None)
    _int("sample_axis", obs.sample_axis)
    _int("data_axis", obs.data_axis)
    return _config(
        model,
        num_samples=obs.num_samples,
        batch_size=obs.batch_size,
        gpus=obs.sample_axis * obs.data_axis,
        **full,
    )


def calibrate(
    observations: Sequence[Observation], *, cost_batch: int, **plan_kwargs: Any
) -> Calibration:
    """Fit the model's constants to measured steps.

    1. The one-GPU observations give ``sample_cost_s`` and ``step_overhead_s`` by least
       squares on ``step = overhead + cost * S * B / cost_batch`` (at least two distinct
       ``S * B`` are needed).
    2. The multi-GPU observations give ``latency_us`` and ``inter_node_gb_s``: the pair that
       minimises the RMS of ``log(predicted / measured)``, found by a coarse log-spaced grid
       search refined three times (the model has a max() in it, so no gradients).

    ``plan_kwargs`` are the other :func:`plan` arguments (model or num_params, hardware,
    bucketing); ``cost_batch`` sets the unit of ``sample_cost_s``.
    """
    obs = list(observations)
    if not obs or not all(isinstance(o, Observation) for o in obs):
        raise TypeError("observations must be a non-empty sequence of Observation")
    cost_batch = _int("cost_batch", cost_batch)
    for name in ("sample_cost_s", "step_overhead_s", "latency_us", "inter_node_gb_s"):
        if name in plan_kwargs:
            raise ValueError(f"{name} is fitted by calibrate; do not pass it")
    for o in obs:
        _num("step_time_s", o.step_time_s)
    one = [o for o in obs if o.sample_axis * o.data_axis == 1]
    multi = [o for o in obs if o.sample_axis * o.data_axis > 1]
    x = torch.tensor([o.num_samples * o.batch_size / cost_batch for o in one], dtype=torch.float64)
    if len(set(x.tolist())) < 2:
        raise ValueError("calibrate needs one-GPU observations at >= 2 distinct S * B")
    weight_cost = float(plan_kwargs.get("weight_cost_s", 0.0))
    y = torch.tensor(
        [o.step_time_s - o.num_samples * weight_cost for o in one], dtype=torch.float64
    )
    design = torch.stack([torch.ones_like(x), x], dim=1)
    t0, cost = torch.linalg.lstsq(design, y[:, None]).solution[:, 0].tolist()
    if cost <= 0:
        raise ValueError("one-GPU observations give a non-positive cost per sample-batch")
    t0 = max(t0, 0.0)
    base = {**plan_kwargs, "cost_batch": cost_batch, "sample_cost_s": cost, "step_overhead_s": t0}
    cfgs = []
    for o in multi:
        c = _config_for(o, base)
        cfgs.append((c, o, _buckets(c)))

    def loss(lat_us: float, bw_gb: float) -> float:
        total = 0.0
        for c, o, buckets in cfgs:
            step = _timing(c, o.sample_axis, o.data_axis, buckets, lat_us * 1e-6, bw_gb * _GB)[0]
            total += math.log(step / o.step_time_s) ** 2
        return total / max(1, len(cfgs))

    lat = float(plan_kwargs.get("latency_us", 10.0))
    bw = float(plan_kwargs.get("inter_node_gb_s", 25.0))
    if cfgs:
        lo_l, hi_l, lo_b, hi_b = math.log(0.01), math.log(1e4), math.log(0.01), math.log(1e4)
        for points in (33, 11, 11, 11):
            best = None
            for i in range(points):
                ll = lo_l + (hi_l - lo_l) * i / (points - 1)
                for j in range(points):
                    lb = lo_b + (hi_b - lo_b) * j / (points - 1)
                    v = loss(math.exp(ll), math.exp(lb))
                    if best is None or v < best[0]:
                        best = (v, ll, lb)
            _, ll, lb = best
            dl, db = (hi_l - lo_l) / (points - 1), (hi_b - lo_b) / (points - 1)
            lo_l, hi_l, lo_b, hi_b = ll - dl, ll + dl, lb - db, lb + db
        lat, bw = math.exp(ll), math.exp(lb)
    fitted = {**base, "latency_us": lat, "inter_node_gb_s": bw}
    rel = [predict_step(o, **fitted) / o.step_time_s - 1 for o in obs]
    return Calibration(
        sample_cost_s=cost,
        step_overhead_s=t0,
        latency_us=lat,
        inter_node_gb_s=bw,
        rms_rel_error=math.sqrt(sum(r * r for r in rel) / len(rel)),
        max_abs_rel_error=max(abs(r) for r in rel),
    )
