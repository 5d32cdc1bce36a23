"""Does ``spar.distributed.plan`` predict published scaling runs? (and what does it advise)

Reference data: the sampling-parallelism prototype of the paper's authors (torch_blue,
branch ``parallel-sampling``, ``experiments/outputs/scaling.csv`` at commit c8c7260): a
Bayesian CNN on CIFAR-10 on JUWELS Booster (4 A100 per node), seconds per epoch, for
sample parallelism (SP), DDP and a hybrid, S = 128...2048 on 1...16 GPUs. The numbers are
copied below (published, not measured here). How the runs were set up, read from their
scripts (``scripts/new_par_sample/``):

* model: conv 3->32, 32->64, 64->128 (3x3, each followed by 2x2 max-pool), fc 2048->256,
  256->10; every weight and bias Bayesian (mean-field normal: mean and log-std), 620,362
  deterministic parameters, 1,240,724 trained. Loss: cross-entropy of the sample-mean
  output (no KL term), Adam, no augmentation, 50,000 training images.
* samples are vectorised (``torch.vmap`` over the sample axis); gradients averaged by
  PyTorch DDP over all ranks (25 MiB buckets, first bucket 1 MiB, no small last bucket).
* SP: every rank runs S/G samples on the same 64 examples: 782 steps per epoch on any G.
* DDP: every rank runs all S samples on its own 64 examples: the global batch is 64 G, so
  an epoch has ceil(50000 / 64 G) steps (this is how they ran it, and why DDP "wins").
* hybrid: the 4 GPUs of a node split the samples (S/4 each) on the same 64 examples; the
  nodes split the data: batch 64 x nodes.

Calibration: the 1-GPU points (SP and DDP, S = 128/256/512) give the cost of one weight
sample over 64 examples and the per-step overhead (least squares); two communication
constants, the latency per ring step and the inter-node bandwidth, are fitted to the
multi-GPU points (RMS of log error). A hold-out fit on the SP S=128 curve alone checks that
two constants fitted on 4 points predict the other 30. The intra-node bandwidth is not
fitted (150 GB/s, a nominal NVLink-3 ring; it hardly matters for 5 MB of gradients).

Writes bench/results/plan_validation.csv, plan_validation.png and plan.md.
Run: ``python bench/validate_plan.py`` (CPU, a few seconds).
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

from spar.distributed import plan
from spar.distributed.plan import Observation, calibrate, predict_step

RESULTS = Path(__file__).resolve().parent / "results"
DATASET = 50_000
PER_GPU_BATCH = 64
GPUS_PER_NODE = 4
SOURCE = "RAI-SCC/torch_blue@c8c7260 experiments/outputs/scaling.csv"

# (strategy, S, GPUs, seconds per epoch), published
PUBLISHED = [
    ("sp", 128, 1, 48.041880), ("sp", 128, 2, 25.804370), ("sp", 128, 4, 14.436790),
    ("sp", 128, 8, 11.586321), ("sp", 128, 16, 10.969079),
    ("sp", 256, 1, 93.764225), ("sp", 256, 2, 48.425880), ("sp", 256, 4, 25.875178),
    ("sp", 256, 8, 14.724789), ("sp", 256, 16, 11.574444),
    ("sp", 512, 1, 184.813379), ("sp", 512, 2, 94.042498), ("sp", 512, 4, 48.456854),
    ("sp", 512, 8, 26.098330), ("sp", 512, 16, 15.628888),
    ("sp", 1024, 2, 185.157802), ("sp", 1024, 4, 94.286507), ("sp", 1024, 8, 48.621760),
    ("sp", 1024, 16, 27.019297), ("sp", 2048, 16, 49.569193),
    ("ddp", 128, 1, 47.954939), ("ddp", 128, 2, 24.214074), ("ddp", 128, 4, 12.118907),
    ("ddp", 128, 8, 6.076994), ("ddp", 128, 16, 3.092568),
    ("ddp", 256, 1, 93.880916), ("ddp", 256, 2, 46.954126), ("ddp", 256, 4, 23.572765),
    ("ddp", 256, 8, 11.799556), ("ddp", 256, 16, 5.955994),
    ("ddp", 512, 1, 184.497663), ("ddp", 512, 2, 92.548402), ("ddp", 512, 4, 46.401529),
    ("ddp", 512, 8, 23.199627), ("ddp", 512, 16, 11.653472),
    ("hybrid", 256, 8, 13.057520), ("hybrid", 256, 16, 6.759008),
    ("hybrid", 512, 8, 24.311142), ("hybrid", 512, 16, 12.377388),
    ("hybrid", 1024, 8, 47.231365), ("hybrid", 1024, 16, 23.818503),
]  # fmt: skip

# (layer, deterministic weight+bias parameters, forward multiply-adds per example)
LAYERS = [
    ("conv1", 3 * 32 * 9 + 32, 32 * 32 * 32 * 3 * 9),
    ("conv2", 32 * 64 * 9 + 64, 16 * 16 * 64 * 32 * 9),
    ("conv3", 64 * 128 * 9 + 128, 8 * 8 * 128 * 64 * 9),
    ("fc1", 2048 * 256 + 256, 2048 * 256),
    ("fc2", 256 * 10 + 10, 256 * 10),
]


def grad_profile() -> list[tuple[float, float]]:
    """(fraction of gradient bytes, fraction of backward done when ready), backward order.

    Backward runs fc2, fc1, conv3, conv2, conv1; a layer's time is taken proportional to its
    multiply-adds (x2 for input and weight gradients; conv1 needs no input gradient). Each
    layer contributes four tensors (weight mean/log-std, bias mean/log-std): DDP buckets
    whole tensors, so they are kept apart.
    """
    order = list(reversed(LAYERS))
    work = [(2 if name != "conv1" else 1) * macs for name, _, macs in order]
    total_params = 2 * sum(p for _, p, _ in LAYERS)
    out, done = [], 0.0
    for (name, params, _), w in zip(order, work, strict=True):
        done += w
        ready = done / sum(work)
        bias = {"conv1": 32, "conv2": 64, "conv3": 128, "fc1": 256, "fc2": 10}[name]
        for numel in (bias, bias, params - bias, params - bias):
            out.append((numel / total_params, ready))
    return out


COMMON = dict(
    num_params=sum(p for _, p, _ in LAYERS),
    gpus_per_node=GPUS_PER_NODE,
    device_memory_gib=40.0,
    intra_node_gb_s=150.0,
    cost_batch=PER_GPU_BATCH,
    bucket_mb=25.0,
    first_bucket_mb=1.0,
    small_last_bucket=False,
    grad_profile=grad_profile(),
)


def as_run(strategy: str, s: int, gpus: int) -> tuple[int, int, int]:
    """(global batch, sample axis, data axis) of a published run."""
    if strategy == "sp":
        return PER_GPU_BATCH, gpus, 1
    if strategy == "ddp":
        return PER_GPU_BATCH * gpus, 1, gpus
    nodes = max(1, gpus // GPUS_PER_NODE)
    return PER_GPU_BATCH * nodes, gpus // nodes, nodes


def steps_per_epoch(batch: int) -> int:
    return math.ceil(DATASET / batch)


def observation(strategy: str, s: int, gpus: int, epoch_s: float) -> Observation:
    batch, a, b = as_run(strategy, s, gpus)
    return Observation(s, batch, a, b, epoch_s / steps_per_epoch(batch))


def predict_epoch(strategy: str, s: int, gpus: int, constants: dict) -> float:
    batch, a, b = as_run(strategy, s, gpus)
    step = predict_step(Observation(s, batch, a, b, 1.0), **COMMON, **constants)
    return step * steps_per_epoch(batch)


def validate() -> tuple[dict, list[dict], dict]:
    obs = [observation(*row) for row in PUBLISHED]
    cal = calibrate(obs, **COMMON)
    constants = cal.plan_kwargs()
    rows = []
    for strategy, s, gpus, measured in PUBLISHED:
        if gpus == 1:
            continue  # calibration points
        pred = predict_epoch(strategy, s, gpus, constants)
        rows.append(
            dict(strategy=strategy, S=s, gpus=gpus, measured_s=round(measured, 3),
                 predicted_s=round(pred, 3), rel_error=round(pred / measured - 1, 4))
        )  # fmt: skip
    # hold-out: comm constants from the SP S=128 curve only (+ the 1-GPU points)
    train = [o for o, r in zip(obs, PUBLISHED, strict=True) if r[2] == 1 or r[:2] == ("sp", 128)]
    hold = calibrate(train, **COMMON)
    hold_err = [
        predict_epoch(st, s, g, hold.plan_kwargs()) / m - 1
        for st, s, g, m in PUBLISHED
        if g > 1 and (st, s) != ("sp", 128)
    ]
    holdout = dict(cal=hold, max_abs=max(abs(e) for e in hold_err),
                   max_abs_8_16=max(abs(e) for e, r in zip(hold_err, [r for r in PUBLISHED
                                    if r[2] > 1 and r[:2] != ("sp", 128)], strict=True)
                                    if r[2] >= 8))  # fmt: skip
    return cal, rows, holdout


def write_csv(rows: list[dict]) -> Path:
    path = RESULTS / "plan_validation.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def plot(rows: list[dict]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, strategy in zip(axes, ("sp", "ddp", "hybrid"), strict=True):
        for s in sorted({r["S"] for r in rows if r["strategy"] == strategy}):
            pts = sorted(
                [r for r in rows if r["strategy"] == strategy and r["S"] == s],
                key=lambda r: r["gpus"],
            )
            one = [m for st, ss, g, m in PUBLISHED if st == strategy and ss == s and g == 1]
            g = [1] * bool(one) + [r["gpus"] for r in pts]
            meas = one + [r["measured_s"] for r in pts]
            (line,) = ax.plot(g, meas, "o", label=f"S={s} published")
            pred = [predict_epoch(strategy, s, x, _CONST) for x in g]
            ax.plot(g, pred, "-x", color=line.get_color(), label=f"S={s} predicted")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{strategy} (as run by the prototype)")
        ax.set_xlabel("GPUs (4 A100 per node)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("seconds per epoch")
    fig.suptitle("spar plan vs published torch_blue scaling (Bayesian CNN, CIFAR-10)")
    fig.tight_layout()
    path = RESULTS / "plan_validation.png"
    fig.savefig(path, dpi=110)
    return path


_CONST: dict = {}

# --------------------------------------------------------------------------- advice

# Assumed hardware for the advice (not measured): H100 80 GB, 8 per node, NVLink ring
# 200 GB/s, 400 Gb/s InfiniBand per GPU (ring ~40 GB/s), 10 us per ring step, bf16 comm.
H100 = dict(gpus_per_node=8, device_memory_gib=80.0, intra_node_gb_s=200.0,
            inter_node_gb_s=40.0, latency_us=10.0)  # fmt: skip


def vit_tiny_rows() -> list[str]:
    """ViT-Tiny (5.7 M parameters, patch 4 on 32x32: 65 tokens) on CIFAR-10, B = 256.

    Assumed (predicted, not measured): forward+backward of one weight sample over 256
    images = 6 x 5.7e6 x 65 x 256 FLOP = 0.57 TFLOP at 400 TFLOP/s bf16 = 1.4 ms; drawing
    the 5.7 M weights twice (forward and backward) at 6e11 elements/s = 19 us per sample;
    activations 12 layers x 0.55 MB = 6.6 MB per (sample, image) in bf16; 5 ms per step of
    data loading and optimizer.
    """
    out = ["| S | GPUs | best grid | predicted s/epoch | efficiency | runner-up | why |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in (16, 64, 256, 512):
        for gpus in (1, 4, 8, 16, 32, 64):
            rows = plan(num_params=5_700_000, num_samples=s, batch_size=256, gpus=gpus,
                        dataset_size=50_000, sample_cost_s=1.4e-3, weight_cost_s=1.9e-5,
                        step_overhead_s=5e-3, activation_bytes=6.6e6, comm_dtype="bf16",
                        **H100)  # fmt: skip
            best = rows[0]
            grid = f"{best.mode} {best.sample_axis}x{best.data_axis}"
            if not best.fits:
                out.append(f"| {s} | {gpus} | none fits | - | - | - | {best.reason} |")
                continue
            other = next((r for r in rows[1:] if r.fits), None)
            runner = (
                f"{other.mode} {other.sample_axis}x{other.data_axis} ({other.epoch_time_s:.1f} s)"
                if other
                else "-"
            )
            out.append(
                f"| {s} | {gpus} | {grid} | {best.epoch_time_s:.1f} | {best.efficiency:.2f} "
                f"| {runner} | {best.explanation} |"
            )
    return out


def billion_rows() -> list[str]:
    """A 1 B-parameter transformer (all of it Bayesian: 2 B trained) where memory decides.

    Assumed (predicted): fp32 parameters, gradients and Adam state (16 bytes per trained
    parameter: 32 GB per rank, every grid: none of them shards parameters), sequence 512,
    activations 0.8 GB per (sample, sequence) in bf16, 6 x 1e9 x 512 FLOP per sample and
    sequence at 400 TFLOP/s = 7.7 ms, S = 8, global batch 64 sequences, 1e6 sequences.
    """
    out = ["| GPUs | device | fits | best grid | per rank | predicted h/epoch | note |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for mem in (80.0, 141.0):
        for gpus in (8, 16, 32, 64, 128):
            hw = {**H100, "device_memory_gib": mem}
            rows = plan(num_params=1_000_000_000, num_samples=8, batch_size=64, gpus=gpus,
                        dataset_size=1_000_000, sample_cost_s=7.7e-3, cost_batch=1,
                        weight_cost_s=3.3e-3, step_overhead_s=5e-3, activation_bytes=0.8e9,
                        comm_dtype="bf16", **hw)  # fmt: skip
            best = rows[0]
            note = best.reason if not best.fits else best.explanation
            hours = f"{best.epoch_time_s / 3600:.1f}" if best.fits else "-"
            out.append(
                f"| {gpus} | {mem:g} GiB | {best.fits} | {best.mode} {best.sample_axis}x"
                f"{best.data_axis} | {best.memory_per_rank_bytes / 2**30:.1f} GiB | {hours} "
                f"| {note} |"
            )
    return out


def floor_lines(cal) -> list[str]:
    """The predicted decomposition of an SP step at 16 GPUs: where the floor comes from."""
    parts = []
    for s in (128, 512, 2048):
        row = plan(num_samples=s, batch_size=PER_GPU_BATCH, gpus=16, dataset_size=DATASET,
                   modes=["sp"], **COMMON, **cal.plan_kwargs())[0]  # fmt: skip
        ms = 1e3
        parts.append(
            f"S={s} ({row.samples_per_rank}/GPU): {row.step_time_s * ms:.1f} ms = overhead "
            f"{row.overhead_s * ms:.1f} + compute {row.compute_s * ms:.1f} + exposed "
            f"all-reduce {row.exposed_comm_s * ms:.1f} (of {row.comm_s * ms:.1f}, "
            f"{row.num_buckets} buckets)"
        )
    lat16 = 2 * 15 * cal.latency_us * 1e-3
    return [
        "* **The SP floor (about 10-11 s/epoch at 16 GPUs for every S).** SP keeps the batch "
        "at 64, so an epoch is 782 steps on any number of GPUs, and every step pays costs "
        "that more GPUs do not divide: the host overhead "
        f"({cal.step_overhead_s * 1e3:.1f} ms) and an all-reduce of the whole 5 MB gradient "
        "across nodes. On 16 GPUs each of the two DDP buckets pays 30 ring steps of "
        f"{cal.latency_us:.0f} us ({lat16:.1f} ms) plus its bytes at "
        f"{cal.inter_node_gb_s:.1f} GB/s. The first bucket (fc1, 85% of the bytes) is ready "
        "early in backward and hides behind the conv backward only when a rank has enough "
        "samples; the last bucket (the conv layers) is always exposed. Predicted steps on 16 "
        "GPUs: " + "; ".join(parts) + ". With 8 samples per GPU the step cannot drop below "
        "overhead + the all-reduce chain, about 13-14 ms, i.e. 10-11 s per epoch.",
        f"* The fitted {cal.latency_us:.0f} us per ring step is far above NCCL's wire latency "
        "(a few us): it is an effective figure that also absorbs what each bucket costs the "
        "host (DDP hooks, NCCL launch, stream waits), and the data do not separate it well "
        "from the bandwidth (the hold-out fit trades a lower latency for a lower bandwidth "
        "with similar errors). The exposed time growing with the ring length, about 1 ms on "
        "8 GPUs and 2 ms on 16 at large S, is what pins the per-ring-step latency form.",
    ]


def miss_lines(rows: list[dict]) -> list[str]:
    big = sorted((r for r in rows if r["gpus"] >= 8), key=lambda r: -abs(r["rel_error"]))[:3]
    worst = ", ".join(
        f"{r['strategy']} S={r['S']} on {r['gpus']} GPUs {r['rel_error']:+.1%}" for r in big
    )
    return [
        f"* **Largest misses** ({worst}). All are SP points where the exposed all-reduce "
        "matters. The model's overlap is too coarse: at large S it leaves the whole last "
        "bucket (conv gradients) plus its latency exposed (about 4 ms per step on 16 GPUs) "
        "where the runs show about 2 ms, and at 16 samples per GPU on 8 GPUs it hides more "
        "than the runs did. What it lacks is the asynchrony of the GPU: NCCL waits stall the "
        "GPU's stream, not the host, so part of the last bucket overlaps the host's work on "
        "the optimizer and the next batch, which the model counts only when backward covers "
        "it. Every 8- and 16-GPU point is still within 20%.",
    ]


def write_md(cal, rows: list[dict], holdout: dict) -> Path:
    big = [r for r in rows if r["gpus"] >= 8]
    worst = max(big, key=lambda r: abs(r["rel_error"]))
    h = holdout["cal"]
    lines = [
        "# `spar plan`: calibration against published scaling, and advice",
        "",
        "Generated by `python bench/validate_plan.py`. **Published** = numbers from the "
        f"paper authors' prototype ({SOURCE}: Bayesian CNN, CIFAR-10, JUWELS Booster, 4 A100 "
        "per node). **Predicted** = `spar.distributed.plan`. Nothing here was measured on "
        "this machine.",
        "",
        "## Calibrated constants (fitted to published data)",
        "",
        "| constant | value | fitted on |",
        "|---|---|---|",
        f"| sample_cost_s (1 weight sample x 64 images, fwd+bwd) | {cal.sample_cost_s * 1e3:.4f}"
        " ms | 6 one-GPU points |",
        f"| step_overhead_s (per step, every grid) | {cal.step_overhead_s * 1e3:.3f} ms | "
        "6 one-GPU points |",
        f"| latency_us (per ring step) | {cal.latency_us:.1f} us | 35 multi-GPU points |",
        f"| inter_node_gb_s (ring bandwidth across nodes) | {cal.inter_node_gb_s:.2f} GB/s | "
        "35 multi-GPU points |",
        "| intra_node_gb_s | 150 GB/s | not fitted (nominal NVLink-3) |",
        "",
        f"Fit over all 41 points: RMS relative error {cal.rms_rel_error:.1%}, max "
        f"{cal.max_abs_rel_error:.1%}. Hold-out: fitting the two communication constants on "
        f"the SP S=128 curve alone (4 points) gives latency {h.latency_us:.1f} us, inter-node "
        f"{h.inter_node_gb_s:.2f} GB/s and predicts the other 30 multi-GPU points within "
        f"{holdout['max_abs']:.1%} (8/16-GPU points: {holdout['max_abs_8_16']:.1%}).",
        "",
        "## Validation (every point that was not a 1-GPU calibration point)",
        "",
        "| strategy | S | GPUs | published s/epoch | predicted s/epoch | rel. error |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['S']} | {r['gpus']} | {r['measured_s']:.2f} | "
            f"{r['predicted_s']:.2f} | {r['rel_error']:+.1%} |"
        )
    lines += [
        "",
        f"Max |rel. error| on the 8- and 16-GPU points: **{abs(worst['rel_error']):.1%}** "
        f"({worst['strategy']} S={worst['S']} on {worst['gpus']} GPUs). "
        "![measured vs predicted](plan_validation.png)",
        "",
        "### What the model says about the prototype",
        "",
        *floor_lines(cal),
        *miss_lines(rows),
        "* **DDP looks better because it ran a different problem**: 64 images per GPU, so its "
        "global batch grows with G and an epoch has G times fewer steps (49 on 16 GPUs); the "
        "per-step floor is paid 16 times less often. At equal global batch SP and DDP do the "
        "same work per rank and the same all-reduce.",
        "* Not modelled: no KL term and no augmentation in those runs (the model is for the "
        "step as run); GPU efficiency at small local batches (every point here has 64 images "
        "per sample-batch, so the linear cost holds); hierarchical (intra-node first) "
        "all-reduce; stragglers.",
        "",
        "## What the planner recommends (predicted; assumed hardware and costs)",
        "",
        "Hardware assumed: H100 80 GB, 8 per node, NVLink ring 200 GB/s, 40 GB/s across "
        "nodes, 10 us per ring step, bf16 all-reduce.",
        "",
        "### ViT-Tiny (5.7 M parameters, 11.4 M trained) on CIFAR-10, global batch 256",
        "",
        vit_tiny_rows.__doc__.split("\n\n")[1].replace("\n    ", " ").strip(),
        "",
        *vit_tiny_rows(),
        "",
        "Reading: at a fixed global batch every grid does the same FLOPs per rank and the "
        "same world all-reduce; the sample axis wins because it also divides the weight "
        "draws (a data split does not). Not modelled, and in the same direction: a sample "
        "split keeps each sample's GEMMs at the full batch, which a GPU runs more "
        "efficiently. The data axis is used only when S has no factor large enough. With "
        "S x B large the activations decide how many GPUs are needed at all (or use "
        "MonteCarlo's sample chunking on fewer GPUs); with S = 16 the 5 ms per-step overhead "
        "and the all-reduce across nodes stop the scaling beyond one node of 8 GPUs.",
        "",
        "### A 1 B-parameter Bayesian transformer: memory decides",
        "",
        billion_rows.__doc__.split("\n\n")[1].replace("\n    ", " ").strip(),
        "",
        *billion_rows(),
        "",
        "Reading: parameters, gradients and Adam state of 2 B trained values take 32 GB on "
        "every rank whatever the grid (sampling parallelism replicates the model); only the "
        "activations shrink with more GPUs, so the smallest job that fits is set by "
        "S x B x 0.8 GB / GPUs + about 34 GiB (fp32 parameters, gradients and Adam state, "
        "a bf16 communication buffer, 1 GiB overhead) <= device memory. Past that, more GPUs "
        "make an epoch slower: every step all-reduces 4 GB of bf16 gradients across nodes, "
        "and the compute per rank shrinks below it. Advice: the smallest job that fits "
        "(16 x 80 GiB, or one node of 8 x 141 GiB), not the largest.",
        "",
    ]
    path = RESULTS / "plan.md"
    path.write_text("\n".join(lines))
    return path


def main() -> int:
    cal, rows, holdout = validate()
    _CONST.update(cal.plan_kwargs())
    print(f"calibrated on {SOURCE}:")
    print(f"  sample_cost_s   = {cal.sample_cost_s:.6e} s per (weight sample x 64 images)")
    print(f"  step_overhead_s = {cal.step_overhead_s:.6e} s per step")
    print(f"  latency_us      = {cal.latency_us:.2f} us per ring step   (fitted)")
    print(f"  inter_node_gb_s = {cal.inter_node_gb_s:.3f} GB/s            (fitted)")
    print(f"  rms rel error {cal.rms_rel_error:.2%}, max {cal.max_abs_rel_error:.2%}")
    print(
        f"  hold-out (comm fitted on SP S=128 only): max |err| {holdout['max_abs']:.2%}, "
        f"8/16 GPUs {holdout['max_abs_8_16']:.2%}"
    )
    print(f"{'strategy':8s} {'S':>5s} {'gpus':>4s} {'published':>10s} {'predicted':>10s}  err")
    for r in rows:
        print(
            f"{r['strategy']:8s} {r['S']:5d} {r['gpus']:4d} {r['measured_s']:10.2f} "
            f"{r['predicted_s']:10.2f} {r['rel_error']:+6.1%}"
        )
    big = max(abs(r["rel_error"]) for r in rows if r["gpus"] >= 8)
    print(f"max |rel_error| on 8/16-GPU points: {big:.2%}")
    RESULTS.mkdir(exist_ok=True)
    for p in (write_csv(rows), plot(rows), write_md(cal, rows, holdout)):
        if p is not None:
            print("wrote", p)
    return 0 if big <= 0.20 else 1


if __name__ == "__main__":
    sys.exit(main())
