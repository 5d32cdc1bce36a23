"""The main job: sampling-parallel training of a Bayesian CNN with uncertainty report.

Built-in default: scikit-learn's digits (8x8 images, shipped with the package), trained on
the digits 0-7; the digits 8 and 9 are held out as out-of-distribution inputs, so the
report can say how well the model's uncertainty separates what it knows from what it
never saw (OOD AUROC by mutual information and by predictive entropy).

Every rank runs :func:`run`. The ``S`` Monte Carlo samples of a step are split over the
sample axis of the grid, the batch over the data axis (:class:`SampleParallel`,
:class:`GridSampler`); rank 0 prints progress and writes ``metrics.json``, the plots and
the checkpoint. A checkpoint is written atomically at the end of every epoch and holds
model (with the step counter that keys the noise), optimizer and every rank's
augmentation generator, so ``resume`` continues bit-identically on the same grid.

Devices: ``device="cuda"`` binds one GPU per rank (``cuda:LOCAL_RANK``) and uses NCCL
between ranks, ``"cpu"`` uses gloo, whatever else the machine has. One process
(``nproc=1`` outside torchrun/SLURM, or ``mode="local"``) runs in the calling process
without a process group. On CUDA the batches go through pinned memory with asynchronous
copies, and the reported peak memory is the CUDA caching allocator's peak of each rank
(``torch.cuda.max_memory_allocated``; NVML's device-wide figure, where ``pynvml`` is
installed, goes to ``metrics.json`` as ``peak_gpu_memory_nvml_mib``); on the CPU it is the
peak resident set size.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import spar
from spar import metrics
from spar.checkpoint import load_checkpoint, save_checkpoint
from spar.data import GridSampler
from spar.distributed import SampleParallel
from spar.telemetry import Telemetry

MODES = ("sp", "ddp", "hybrid", "local")
LOSSES = ("mean_samples", "mixture")
AUGMENTS = ("independent", "shared", "none")
IN_CLASSES = 8  # digits 0-7 in distribution, 8-9 out of distribution


@dataclass
class TrainConfig:
    """Every option of ``spar train`` (CLI flags and config-file keys use these names,
    with ``-`` for ``_`` on the command line)."""

    nproc: int = 2
    mode: str = "sp"
    sample_axis: int | None = None
    data_axis: int | None = None
    samples: int = 8
    batch_size: int = 64
    epochs: int = 12
    lr: float = 3e-3
    kl_weight: float = 1.0
    init_sigma: float = 1e-2
    loss: str = "mean_samples"
    augment: str = "independent"
    device: str = "cpu"
    seed: int = 0
    out: str = "runs/spar-train"
    resume: bool = False
    progress: bool = True

    def grid_axes(self) -> tuple[int, int]:
        """``(sample, data)`` axis sizes for this config's mode and process count."""
        if self.mode == "local":
            return 1, 1
        n = self.nproc
        if self.mode == "sp":
            return n, 1
        if self.mode == "ddp":
            return 1, n
        a, b = self.sample_axis, self.data_axis
        if a is None and b is None:
            raise ValueError("--mode hybrid needs --sample-axis and/or --data-axis")
        a = a if a is not None else n // b
        b = b if b is not None else n // a
        return a, b

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line message for any inconsistent option."""
        for name in ("nproc", "samples", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        for name, allowed in (("mode", MODES), ("loss", LOSSES), ("augment", AUGMENTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"--{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}"
                )
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda; got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is available on this machine")
        if self.device == "cuda" and self.nproc > max(1, torch.cuda.device_count()):
            raise ValueError(
                f"--nproc {self.nproc} exceeds the {torch.cuda.device_count()} visible GPUs"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if not (self.kl_weight >= 0 and math.isfinite(self.kl_weight)):
            raise ValueError(f"--kl-weight must be >= 0, got {self.kl_weight}")
        if not (self.init_sigma > 0 and math.isfinite(self.init_sigma)):
            raise ValueError(f"--init-sigma must be > 0, got {self.init_sigma}")
        if self.mode != "hybrid" and (self.sample_axis or self.data_axis):
            raise ValueError("--sample-axis/--data-axis are only used with --mode hybrid")
        a, b = self.grid_axes()
        world = 1 if self.mode == "local" else self.nproc
        if a < 1 or b < 1 or a * b != world:
            raise ValueError(f"grid sample={a} x data={b} = {a * b} does not match --nproc {world}")
        if self.samples % a:
            raise ValueError(
                f"--samples {self.samples} is not divisible by the sample axis ({a}); "
                f"use a multiple of {a}"
            )
        if self.batch_size % b:
            raise ValueError(
                f"--batch-size {self.batch_size} (global) is not divisible by the data axis ({b})"
            )


# ----------------------------------------------------------------------------- data


def digits_splits(seed: int = 0, test_fraction: float = 0.2):
    """``(x_train, y_train), (x_test, y_test), x_ood`` as float ``(N, 1, 8, 8)`` in [0, 1].

    Digits 0-7 are split reproducibly (fixed by ``seed``) into train and test; every 8
    and 9 goes to the out-of-distribution set.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    ood = y >= IN_CLASSES
    x_in, y_in = x[~ood], y[~ood]
    perm = torch.randperm(len(x_in), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x_in) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return (x_in[train], y_in[train]), (x_in[test], y_in[test]), x[ood]


def augment(x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Random shifts by up to one pixel (zero fill) and a slight intensity jitter, drawn
    from ``gen`` (each rank's own stream with ``augment="independent"``)."""
    if gen is None:
        return x
    B, _, H, W = x.shape
    shift = torch.randint(-1, 2, (B, 2), generator=gen)
    scale = 1.0 + 0.2 * (torch.rand(B, 1, 1, 1, generator=gen) - 0.5)
    padded = nn.functional.pad(x, (1, 1, 1, 1))  # (B, 1, H+2, W+2)
    # out[b, :, i, j] = padded[b, :, i + 1 - dr_b, j + 1 - dc_b]
    rows = (torch.arange(H) + 1 - shift[:, :1]).view(B, 1, H, 1).expand(B, 1, H, W + 2)
    cols = (torch.arange(W) + 1 - shift[:, 1:]).view(B, 1, 1, W).expand(B, 1, H, W)
    shifted = padded.gather(2, rows).gather(3, cols)
    return (shifted * scale).clamp(0, 1)


def digits_cnn(init_sigma: float) -> nn.Module:
    """A small CNN for 8x8 digits, made Bayesian by :func:`spar.nn.bayesianize`."""
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, IN_CLASSES),
    )
    return spar.nn.bayesianize(net, init_sigma=init_sigma)


# ----------------------------------------------------------------------------- progress


class Progress:
    """One progress line per epoch on rank 0: redrawn in place on a terminal, printed once
    at the end of the epoch otherwise (logs stay readable)."""

    def __init__(self, enabled: bool, stream=None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def update(self, epoch: int, epochs: int, done: int, total: int, stats: dict) -> None:
        if not self.enabled or (not self.tty and done < total):
            return
        width = 20
        filled = width * done // total
        bar = "#" * filled + "-" * (width - filled)
        line = (
            f"epoch {epoch:>3}/{epochs} [{bar}] {done:>3}/{total} "
            f"loss {stats['loss']:.4f}  acc {stats['acc']:.3f}  {stats['rate']:,.0f} ex/s"
        )
        end = "\n" if done == total else ""
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()


# ----------------------------------------------------------------------------- the job


def dist_backend(device: str) -> str:
    """The ``torch.distributed`` backend for ranks on ``device``: NCCL for CUDA, gloo for the
    CPU (not "NCCL whenever CUDA is available": a CPU run on a GPU machine stays on the CPU)."""
    return "nccl" if device == "cuda" else "gloo"


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch on ``device``: through pinned memory, asynchronously, on CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _peak_memory(device: torch.device, tel: Telemetry) -> tuple[float, str]:
    """(peak bytes of this rank, what was measured)."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), "cuda allocator"
    return float(tel.summary().peak_rss), "resident set"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _all_gather_object(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _checkpoint_state(sp: SampleParallel, opt, epoch: int, cfg: TrainConfig) -> dict:
    gen = sp.augment_generator
    gens = _all_gather_object(None if gen is None else gen.get_state())
    return {
        "model": sp.module.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": epoch,
        "grid": [sp.grid.sample, sp.grid.data],
        "augment_states": gens,
        "config": {k: v for k, v in asdict(cfg).items() if v is not None},
    }


def _restore(sp: SampleParallel, opt, state: dict) -> int:
    sp.module.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    gens = state.get("augment_states") or []
    same_grid = list(state.get("grid", [])) == [sp.grid.sample, sp.grid.data]
    if sp.augment_generator is not None and same_grid and gens[_rank()] is not None:
        sp.augment_generator.set_state(gens[_rank()])
    elif sp.augment_generator is not None:
        # another grid shape: parameters are replicated, so they load; the augmentation
        # streams are per rank and restart from a seed derived from the epoch
        sp.augment_generator.manual_seed(sp.augment_seed + int(state["epoch"]))
    return int(state["epoch"])


def evaluate(sp: SampleParallel, x_test, y_test, x_ood) -> dict:
    """Metrics of the full predictive (all S samples gathered) on the test and OOD sets."""
    sp.eval()
    with torch.no_grad():
        logits = sp.predict(x_test.to(sp.grid.device)).float().cpu()
        logits_ood = sp.predict(x_ood.to(sp.grid.device)).float().cpu()
    mi_in, mi_out = metrics.mutual_information(logits), metrics.mutual_information(logits_ood)
    pe_in, pe_out = metrics.predictive_entropy(logits), metrics.predictive_entropy(logits_ood)
    rel = metrics.reliability(logits, y_test)
    return {
        "accuracy": float(metrics.accuracy(logits, y_test)),
        "nll": float(metrics.nll(logits, y_test)),
        "ece": float(rel.ece),
        "brier": float(metrics.brier(logits, y_test)),
        "ood_auroc_mutual_information": float(metrics.ood_auroc(mi_in, mi_out)),
        "ood_auroc_predictive_entropy": float(metrics.ood_auroc(pe_in, pe_out)),
        "_reliability": rel,
        "_mi": (mi_in, mi_out),
    }


def _plots(out: Path, report: dict) -> list[str]:
    """The reliability and uncertainty figures; none (a note on stderr) where matplotlib is
    not installed (a machine set up with ``pip install --no-deps``)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rel = report["_reliability"]
    edges = rel.bin_edges.tolist()
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(centers, rel.bin_accuracy.nan_to_num(0).tolist(), width=edges[1] - edges[0],
           edgecolor="k", alpha=0.7, label="accuracy")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability (ECE {report['ece']:.3f})")  # fmt: skip
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=120)
    plt.close(fig)

    mi_in, mi_out = report["_mi"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    top = float(max(mi_in.max(), mi_out.max())) or 1e-6
    bins = torch.linspace(0, top, 31).tolist()
    ax.hist(mi_in.tolist(), bins=bins, alpha=0.6, density=True, label="digits 0-7 (test)")
    ax.hist(mi_out.tolist(), bins=bins, alpha=0.6, density=True, label="digits 8-9 (OOD)")
    auroc = report["ood_auroc_mutual_information"]
    ax.set(xlabel="mutual information (nats)", ylabel="density",
           title=f"Epistemic uncertainty (OOD AUROC {auroc:.3f})")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "uncertainty.png", dpi=120)
    plt.close(fig)
    return ["reliability.png", "uncertainty.png"]


def epoch_timing(epoch_times: list[float], first_epoch_steps: list[float]) -> dict:
    """Time per epoch without the warm-up of the first step.

    The first step of a process pays one-off costs that say nothing about the speed of
    training: loading (the first time on a machine, building) the native noise generator, the
    allocator's first growth, the first collectives' connection set-up. The reported
    ``seconds_per_epoch`` therefore leaves them out:

    - the median wall time of the epochs after the first one this process ran, when there
      are any (the median also shrugs off an epoch slowed by other jobs on the machine);
    - with a single epoch, that epoch with its first step replaced by the mean of its
      other steps;
    - with a single epoch of a single step, that step as measured (warm-up included).

    ``timing`` says in words which rule applied.

    Args:
        epoch_times: wall seconds of the steps of each epoch run (checkpointing excluded).
        first_epoch_steps: wall seconds of each step of the first epoch run.

    Returns:
        ``{"seconds_per_epoch", "seconds_first_epoch", "timing"}``; the times are ``None``
        when no epoch ran (a resume of a finished run).
    """
    if not epoch_times:
        return {"seconds_per_epoch": None, "seconds_first_epoch": None, "timing": "no epoch ran"}
    first = epoch_times[0]
    if len(epoch_times) > 1:
        value = statistics.median(epoch_times[1:])
        how = f"median of the {len(epoch_times) - 1} epochs after the first"
    elif len(first_epoch_steps) > 1:
        rest = first_epoch_steps[1:]
        value = first - first_epoch_steps[0] + sum(rest) / len(rest)
        how = "the only epoch, its first step replaced by the mean of the others"
    else:
        value = first
        how = "the only step, warm-up included"
    return {"seconds_per_epoch": value, "seconds_first_epoch": first, "timing": how}


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def _table(report: dict) -> str:
    rows = [
        ("test accuracy", f"{report['accuracy']:.4f}"),
        ("test NLL", f"{report['nll']:.4f}"),
        ("test ECE", f"{report['ece']:.4f}"),
        ("test Brier", f"{report['brier']:.4f}"),
        ("OOD AUROC (mutual information)", f"{report['ood_auroc_mutual_information']:.4f}"),
        ("OOD AUROC (predictive entropy)", f"{report['ood_auroc_predictive_entropy']:.4f}"),
        ("time per epoch (excl. warm-up)", _seconds(report["seconds_per_epoch"])),
        ("first epoch (incl. warm-up)", _seconds(report["seconds_first_epoch"])),
    ]
    rows += [
        (f"peak memory rank {r}", f"{mb:.0f} MiB") for r, mb in enumerate(report["peak_memory_mib"])
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v:>12}" for k, v in rows]
    rule = "-" * len(lines[0])
    return "\n".join([rule, *lines, rule])


def run(cfg: TrainConfig) -> dict | None:
    """Train on this rank (inside torchrun, SLURM, spar's own launcher, or alone for
    ``mode="local"``); return the report on rank 0, ``None`` elsewhere."""
    a, b = cfg.grid_axes()
    if cfg.mode == "local":
        grid = spar.distributed.Grid.local(torch.device(cfg.device))
    else:
        grid = spar.distributed.init(
            sample=a, data=b, timeout=300, backend=dist_backend(cfg.device)
        )
    rank = _rank()
    if cfg.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, grid.world_size)))
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    try:
        if grid.device.type != cfg.device:  # e.g. a process group the caller initialized
            raise ValueError(f"--device {cfg.device}, but the process grid is on {grid.device}")
        if grid.device.type == "cuda":
            torch.cuda.set_device(grid.device)
            torch.cuda.reset_peak_memory_stats(grid.device)
        (x_tr, y_tr), (x_te, y_te), x_ood = digits_splits(cfg.seed)
        model = digits_cnn(cfg.init_sigma).to(grid.device)
        augment_mode = None if cfg.augment == "none" else cfg.augment
        sp = SampleParallel(model, cfg.samples, grid, seed=cfg.seed, augment=augment_mode)
        opt = torch.optim.Adam(sp.parameters(), lr=cfg.lr)
        start_epoch = 0
        if cfg.resume:
            start_epoch = _restore(sp, opt, load_checkpoint(ckpt_path, map_location=grid.device))
        local_batch = cfg.batch_size // grid.data
        sampler = GridSampler(x_tr, grid, shuffle=True, seed=cfg.seed, batch_size=local_batch)
        n_train = len(x_tr)
        progress = Progress(cfg.progress and rank == 0)
        epoch_times: list[float] = []  # wall time of each epoch's steps (no checkpointing)
        step_times: list[float] = []  # of the first epoch this process runs
        with Telemetry(gpu_index=grid.device.index if grid.device.type == "cuda" else None) as tel:
            for epoch in range(start_epoch, cfg.epochs):
                sp.train()
                sampler.set_epoch(epoch)
                order = torch.tensor(list(iter(sampler)))
                batches = [order[i : i + local_batch] for i in range(0, len(order), local_batch)]
                t0 = time.perf_counter()
                seen = correct = 0
                loss_sum = 0.0
                for i, idx in enumerate(batches):
                    t_step = time.perf_counter()
                    x = _to_device(augment(x_tr[idx], sp.augment_generator), grid.device)
                    y = _to_device(y_tr[idx], grid.device)
                    outputs = sp(x)  # (S_local, B_local, classes)
                    loss = spar.losses.elbo(
                        outputs, y, kl=spar.nn.kl_divergence(sp), dataset_size=n_train,
                        kl_weight=cfg.kl_weight, reduction=cfg.loss, group=grid.sample_group,
                    )  # fmt: skip
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    seen += len(idx)
                    loss_value = float(loss.detach())
                    if not math.isfinite(loss_value):
                        raise FloatingPointError(
                            f"the loss became {loss_value} at epoch {epoch + 1}, step {i + 1}; "
                            "lower --lr or --init-sigma (the last checkpoint is intact)"
                        )
                    loss_sum += loss_value * len(idx)
                    correct += int((outputs.softmax(-1).mean(0).argmax(-1) == y).sum())
                    if not epoch_times:
                        step_times.append(time.perf_counter() - t_step)
                    rate = seen * grid.data / (time.perf_counter() - t0)
                    stats = {"loss": loss_sum / seen, "acc": correct / seen, "rate": rate}
                    progress.update(epoch + 1, cfg.epochs, i + 1, len(batches), stats)
                epoch_times.append(time.perf_counter() - t0)
                state = _checkpoint_state(sp, opt, epoch + 1, cfg)
                if rank == 0:
                    save_checkpoint(ckpt_path, state)
            report = evaluate(sp, x_te, y_te, x_ood)
        peak, peak_source = _peak_memory(grid.device, tel)
        peaks = _all_gather_object(peak)
        nvml = _all_gather_object(tel.summary().peak_gpu_memory)
        if rank != 0:
            return None
        report.update(epoch_timing(epoch_times, step_times))
        report["peak_memory_mib"] = [p / 2**20 for p in peaks]
        report["peak_memory_source"] = peak_source
        if grid.device.type == "cuda":
            report["device_name"] = torch.cuda.get_device_name(grid.device)
            if all(v is not None for v in nvml):
                report["peak_gpu_memory_nvml_mib"] = [v / 2**20 for v in nvml]
        report["epochs_run"] = len(epoch_times)
        report["grid"] = {"sample": grid.sample, "data": grid.data, "mode": grid.mode}
        report["config"] = asdict(cfg)
        files = _plots(out, report)
        public = {k: v for k, v in report.items() if not k.startswith("_")}
        public["files"] = [*files, "checkpoint.pt", "metrics.json"]
        (out / "metrics.json").write_text(json.dumps(public, indent=2) + "\n")
        print(_table(report), flush=True)
        print(f"wrote {', '.join(public['files'])} to {out}", flush=True)
        return public
    finally:
        if cfg.mode != "local":
            spar.distributed.shutdown()


def _worker(cfg: TrainConfig) -> dict | None:
    """Entry point of each process started by :func:`launch` (module level: picklable)."""
    return run(cfg)


def under_launcher() -> bool:
    """True inside torchrun or a SLURM task (then this process is one rank already)."""
    return spar.distributed.detect_launch_env().source != "local"


def launch(cfg: TrainConfig) -> dict | None:
    """Run the job: in this process when already launched (torchrun/SLURM), local, or one
    process (no launcher, no process group: nothing to communicate), otherwise on
    ``cfg.nproc`` local processes through PyTorch's elastic launcher."""
    cfg.validate()
    if cfg.mode == "local" or cfg.nproc == 1 or under_launcher():
        return run(cfg)
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = spar.distributed.free_port()
    # one BLAS thread pool per rank sized to its share of the cores; setting it here also
    # silences the launcher's warning about OMP_NUM_THREADS
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.nproc)))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=cfg.nproc,
        run_id=f"spar-{port}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}",
        max_restarts=0,
        start_method="spawn",
    )
    results = elastic_launch(config, _worker)(cfg)
    return results.get(0)
