"""The main job: sampling-parallel training of a Bayesian network with uncertainty report.

Built-in default: scikit-learn's digits (8x8 images, shipped with the package) and a small
CNN, trained on the digits 0-7; the digits 8 and 9 are held out as out-of-distribution
inputs, so the report can say how well the model's uncertainty separates what it knows from
what it never saw (OOD AUROC by mutual information and by predictive entropy). ``dataset``
(digits, CIFAR-10 from its python batches, the user's own ``.npz`` arrays), ``model``
(:data:`spar.models.MODELS` or ``timm:NAME``) and the OOD set are options
(:mod:`spar.datasets`, :mod:`spar.models`); a checkpoint carries them in its config.

Every rank runs :func:`run`. The ``S`` Monte Carlo samples of a step are split over the
sample axis of the grid, the batch over the data axis (:class:`SampleParallel`,
:class:`GridSampler`); rank 0 prints progress and writes ``metrics.json``, the plots,
``history.csv`` (one row per epoch, with the validation split's metrics), ``training.png``
and the checkpoint. A checkpoint is written atomically at the end of every epoch and holds
model (with the step counter that keys the noise), optimizer, every rank's augmentation
generator and the config, so ``resume`` continues bit-identically on the same grid and
``spar eval`` (:mod:`spar.evaluation`) rebuilds the model and the data from it alone.

Faults (issue 14): :func:`preflight` checks, before any rank starts, everything that can
fail later (options, a writable ``out``, the checkpoint to resume against the model and the
experiment, the memory of a step); :func:`launch` locks ``out`` for the run; every output
is written by temp-and-rename; the ranks agree on one config at start-up; a
:class:`spar._watch.StallWatch` names a stalled rank and ends the job; an elastic restart
(``max_restarts``, or torchrun's) continues from the job's last checkpoint.

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

import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import re
import signal
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import spar
from spar import datasets
from spar import report as rep
from spar._fs import OutputBusyError, OutputLock, check_writable, remove_stale_temps
from spar._job import (
    SetupError,
    build_model,
    dist_backend,
    evaluate,
    format_classes,
    held_out_classes,
    load_data,
    print_report,
    public,
    validation,
    write_metrics,
    write_report,
)
from spar._job import all_gather_object as _all_gather_object
from spar._job import flag as _flag
from spar._job import peak_memory as _peak_memory
from spar._job import rank as _rank
from spar._job import reason_for_os_errors as _reason_for_os_errors
from spar._job import to_device as _to_device
from spar._watch import StallWatch, job_id, restart_count
from spar.checkpoint import CheckpointError, load_checkpoint, previous_path, save_checkpoint
from spar.data import GridSampler
from spar.distributed import SampleParallel
from spar.telemetry import Telemetry, gpu_free_bytes

MODES = ("sp", "ddp", "hybrid", "local")
LOSSES = ("mean_samples", "mixture")
AUGMENTS = ("independent", "shared", "none")
CHECKPOINT = "checkpoint.pt"
HISTORY = "history.csv"
# the options that define the experiment: a resumed run must keep them; epochs, the grid
# shape (nproc, mode, axes), the device, where the data lies and the output options may change
EXPERIMENT = (
    "seed", "samples", "batch_size", "lr", "kl_weight", "init_sigma", "loss", "augment",
    "dataset", "model", "ood_classes", "val_fraction",
)  # fmt: skip
DEFAULT_TIMEOUT = 300.0  # seconds the ranks wait for each other at start-up and epoch ends


@dataclass
class TrainConfig:
    """Every option of ``spar train`` (CLI flags and config-file keys use these names,
    with ``-`` for ``_`` on the command line)."""

    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "cnn"
    ood_classes: str | None = None
    ood: str | None = None
    val_fraction: float = 0.1
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
    timeout: float | None = None
    max_restarts: int = 0
    memory_check: bool = True

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
                raise ValueError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
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
        if self.timeout is not None and not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ValueError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        if self.dataset not in datasets.DATASETS:
            raise ValueError(
                f"--dataset must be one of {', '.join(datasets.DATASETS)}; got {self.dataset!r}"
            )
        if not (0 <= self.val_fraction <= 0.5):
            raise ValueError(f"--val-fraction must be in [0, 0.5], got {self.val_fraction}")
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts must be >= 0, got {self.max_restarts}")
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


# ----------------------------------------------------------------------------- the job


def _checkpoint_state(sp: SampleParallel, opt, epoch: int, cfg: TrainConfig) -> dict:
    gen = sp.augment_generator
    gens = _all_gather_object(None if gen is None else gen.get_state())
    return {
        "model": sp.module.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": epoch,
        "grid": [sp.grid.sample, sp.grid.data],
        "augment_states": gens,
        "config": stored_config(cfg),
        "job": job_id(),
    }


def stored_config(cfg: TrainConfig) -> dict:
    """The config a checkpoint records: the options set, with the held-out classes resolved
    (``"8,9"``, ``"none"``) and the data paths absolute, so that ``spar eval`` and
    ``--resume`` rebuild the same data from any folder."""
    config = {k: v for k, v in asdict(cfg).items() if v is not None}
    config["ood_classes"] = format_classes(held_out_classes(cfg))
    for name in ("data_dir", "ood"):
        if config.get(name):
            config[name] = str(Path(config[name]).expanduser().resolve())
    return config


def check_config_types(config: dict, where: str) -> None:
    """Raise :class:`SetupError` unless every entry of a stored ``config`` is an option of
    :class:`TrainConfig` with a value of its type (a checkpoint from another version or one
    edited by hand)."""
    types = {f.name: str(f.type).replace(" ", "").split("|") for f in fields(TrainConfig)}
    unknown = sorted(set(config) - set(types))
    if unknown:
        raise SetupError(
            f"{where}: its config has options this spar does not know ({', '.join(unknown)}); "
            "was it written by a newer version?"
        )
    for name, value in config.items():
        kinds = types[name]
        ok = (
            (value is None and "None" in kinds)
            or (isinstance(value, bool) and "bool" in kinds)
            or (type(value) is int and ("int" in kinds or "float" in kinds))
            or (type(value) is float and "float" in kinds)
            or (isinstance(value, str) and "str" in kinds)
        )
        if not ok:
            expected = " or ".join(k for k in kinds if k != "None")
            raise SetupError(f"{where}: its config has {name}={value!r}, expected {expected}")


# what a checkpoint written before --dataset/--model existed was trained with
_LEGACY_CONFIG = {"dataset": "digits", "model": "cnn", "ood_classes": "8,9", "val_fraction": 0.0}


def with_legacy_defaults(config: dict) -> dict:
    """A stored config with the values of the options it predates filled in."""
    return {**_LEGACY_CONFIG, **config} if "dataset" not in config else dict(config)


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


def _group_timeout(cfg: TrainConfig) -> float:
    """Seconds a collective of the process group waits: the start-up and epoch-end allowance
    (:data:`DEFAULT_TIMEOUT`), or ``--timeout`` when longer; a step's own, often shorter,
    limit is :class:`StallWatch`'s."""
    return max(DEFAULT_TIMEOUT, cfg.timeout or 0.0)


def _init_restarted_group(cfg: TrainConfig) -> None:
    """In a rank that an elastic launcher restarted: initialize the default process group
    on a store namespace of this attempt. The launcher's store outlives the attempts and
    still holds the previous attempt's keys (the dead ranks' addresses), which the new ranks
    would otherwise read and fail to connect to."""
    attempt = restart_count()
    if not attempt or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    env = spar.distributed.detect_launch_env()
    timeout = datetime.timedelta(seconds=_group_timeout(cfg))
    store = dist.TCPStore(
        env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout
    )
    if cfg.device == "cuda":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(
        dist_backend(cfg.device), store=dist.PrefixStore(f"spar/attempt_{attempt}", store),
        rank=env.rank, world_size=env.world_size, timeout=timeout,
    )  # fmt: skip


def resume_checkpoint(out: str | os.PathLike) -> tuple[Path, dict, str | None]:
    """``(path, state, note)`` of the checkpoint to resume from: ``out/checkpoint.pt``, or,
    when that file is damaged, the previous one kept beside it (``note`` then says so; it
    is ``None`` otherwise). Raises :class:`CheckpointError` when neither is usable."""
    path = Path(out) / CHECKPOINT
    try:
        return path, load_checkpoint(path), None
    except CheckpointError as damaged:
        prev = previous_path(path)
        if not (path.is_file() and prev.is_file()):
            raise
        try:
            state = load_checkpoint(prev)
        except CheckpointError:
            raise damaged from None
        note = f"{damaged}; resuming from the previous checkpoint {prev} (epoch {state['epoch']})"
        return prev, state, note


_CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "grid", "augment_states", "config")


def check_model_state(state: dict, module: nn.Module, path: Path) -> None:
    """Raise :class:`SetupError` unless ``state["model"]`` loads into ``module``: the same
    keys, tensors of the same shapes, finite values."""
    expected, got = module.state_dict(), state.get("model")
    if not isinstance(got, dict):
        raise SetupError(f"{path}: 'model' is a {type(got).__name__}, not a state dict")
    for key in expected:
        if key not in got:
            raise SetupError(f"{path} is not a checkpoint of this model: it has no {key!r}")
        if not isinstance(got[key], torch.Tensor):
            raise SetupError(f"{path}: {key!r} is a {type(got[key]).__name__}, not a tensor")
        if tuple(got[key].shape) != tuple(expected[key].shape):
            raise SetupError(
                f"{path} is not a checkpoint of this model: {key!r} has shape "
                f"{tuple(got[key].shape)}, the model's is {tuple(expected[key].shape)}"
            )
    extra = sorted(set(got) - set(expected))
    if extra:
        raise SetupError(f"{path} is not a checkpoint of this model: unknown entry {extra[0]!r}")
    for key, value in got.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise SetupError(
                f"{path}: {key!r} holds {bad} non-finite values (nan/inf) of {value.numel()}; "
                f"it cannot be used (the previous checkpoint, if any: {previous_path(path)})"
            )


def check_resume(state: dict, cfg: TrainConfig, path: Path, model: nn.Module | None = None) -> None:
    """Raise :class:`SetupError` unless ``state`` is a ``spar train`` checkpoint of this
    experiment that this run can continue: every key present, the same experiment options
    (:data:`EXPERIMENT`), parameters and optimizer state that fit the model of ``cfg``
    (``model``, when the caller has built it already), finite values."""
    missing = [k for k in _CHECKPOINT_KEYS if k not in state]
    if missing:
        raise SetupError(f"{path} has no {', '.join(missing)}: not a checkpoint of spar train")
    if not isinstance(state["config"], dict):
        raise SetupError(f"{path}: 'config' is a {type(state['config']).__name__}, not a dict")
    stored = with_legacy_defaults(state["config"])
    check_config_types(stored, str(path))
    for name in EXPERIMENT:
        if name not in stored:
            continue
        before, now = stored[name], getattr(cfg, name)
        if name == "ood_classes":  # as resolved: "8,9" is the digits default, 9,8 is 8,9
            before = held_out_classes(replace(cfg, ood_classes=before))
            now = held_out_classes(cfg)
            same = before == now
            before, now = format_classes(before), format_classes(now)
        else:
            same = before == now
        if not same:
            raise SetupError(
                f"--resume: {path} was trained with {_flag(name)} {before}, this run "
                f"asks for {now}; a resumed run keeps "
                f"{', '.join(_flag(n) for n in EXPERIMENT)} (it may change --epochs and the grid)"
            )
    if model is None:
        model = build_model(cfg, load_data(cfg))
    sp = SampleParallel(model, cfg.samples, spar.distributed.Grid.local(), seed=cfg.seed)
    check_model_state(state, sp.module, path)
    opt = torch.optim.Adam(sp.parameters(), lr=cfg.lr)
    try:
        opt.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError) as e:
        reason = (str(e).splitlines() or [""])[0]
        raise SetupError(f"{path}: its optimizer state does not fit the model ({reason})") from None
    grid, gens = state["grid"], state["augment_states"]
    if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(v, int) for v in grid)):
        raise SetupError(f"{path}: 'grid' is {grid!r}, not [sample, data]")
    if not isinstance(gens, list) or len(gens) != grid[0] * grid[1]:
        raise SetupError(
            f"{path}: 'augment_states' holds {len(gens) if isinstance(gens, list) else gens!r} "
            f"states for a {grid[0]}x{grid[1]} grid"
        )
    if isinstance(state["epoch"], bool) or not isinstance(state["epoch"], int):
        raise SetupError(f"{path}: 'epoch' is {state['epoch']!r}, not a count")


def _activation_numel(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Numbers every layer of ``model`` outputs for one example and one weight sample."""
    mc = spar.nn.MonteCarlo(model, 1, seed=0)
    total = 0

    def count(_module, _inputs, output) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel()

    leaves = [m for m in mc.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    was_training = mc.training
    try:
        with torch.no_grad():
            mc.eval()(torch.zeros(1, *input_shape))
    finally:
        mc.train(was_training)
        for h in hooks:
            h.remove()
    return total


def memory_estimate(cfg: TrainConfig, splits: datasets.Splits, model: nn.Module) -> int:
    """Estimated peak bytes of one rank, from the model's shapes (fp32): parameters (mean
    and rho) with their gradients and Adam's two moments; the training step's activations
    (every layer's output kept for backward, its gradient and one transient) for the rank's
    ``S/sample x B/data`` sample-examples; the evaluation's activations for one chunk of
    the largest split (:func:`spar._job.predictive`) and the logits of all its samples;
    whichever of the two is larger."""
    from spar._job import EVAL_CHUNK

    a, b = cfg.grid_axes()
    s_local, b_local = cfg.samples // a, cfg.batch_size // b
    params = sum(p.numel() for p in model.parameters())
    act = _activation_numel(model, splits.input_shape)
    n_eval = max(len(x) for x in (splits.x_test, splits.x_val, splits.x_ood) if x is not None)
    chunk = min(n_eval, max(1, EVAL_CHUNK // s_local))
    train = 3 * s_local * b_local * act
    evaluation = s_local * chunk * act + cfg.samples * n_eval * splits.num_classes
    return 4 * (4 * params + max(train, evaluation))


def memory_limit(cfg: TrainConfig) -> tuple[int, str] | None:
    """``(bytes, what)`` one rank may use: free memory of a GPU, or the machine's available
    memory shared by its local ranks; ``None`` where it cannot be read."""
    if cfg.device == "cuda":  # this rank's GPU (the launcher: the first one's)
        index = int(os.environ.get("LOCAL_RANK", "0"))
        free = gpu_free_bytes(index)
        return None if free is None else (free, f"free on GPU {index}")
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    if cfg.mode == "local":
        ranks = 1
    elif spar.distributed.detect_launch_env().source == "local":
        ranks = cfg.nproc  # spar's own launcher: all on this machine
    else:
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return available // max(1, ranks), f"available on this machine / {ranks} rank(s)"


def preflight(cfg: TrainConfig, *, writer: bool = True) -> None:
    """Check, before any rank starts, everything that can fail later: the options, that
    the output folder is writable (``writer``: the process that writes it), the checkpoint
    to resume (structure, experiment options, finite values), the data and the model
    (they load and fit each other) and the memory a step needs (unless ``cfg.memory_check``
    is off). Raises :class:`SetupError`."""
    try:
        cfg.validate()
    except ValueError as e:
        raise SetupError(str(e)) from None
    if writer:
        try:
            check_writable(cfg.out)
        except OSError as e:
            raise SetupError(f"--out {e.strerror}") from None
        try:  # a file of another program would stop the run after its first epoch
            rep.read_history(Path(cfg.out) / HISTORY)
        except ValueError as e:
            raise SetupError(f"--out: {e}; move it away or choose another --out") from None
    state = None
    if cfg.resume:
        try:
            path, state, _ = resume_checkpoint(cfg.out)
        except CheckpointError as e:
            raise SetupError(f"--resume: {e}") from None
    splits = load_data(cfg)
    model = build_model(cfg, splits)
    if state is not None:
        check_resume(state, cfg, path, model)
    limit = memory_limit(cfg) if cfg.memory_check else None
    need = memory_estimate(cfg, splits, model) if limit is not None else 0
    if limit is not None and need > limit[0]:
        raise SetupError(
            f"--samples {cfg.samples} --batch-size {cfg.batch_size}: a step needs about "
            f"{need / 2**30:.1f} GiB per rank (estimated from the model's shapes), more than "
            f"the {limit[0] / 2**30:.1f} GiB {limit[1]}; lower them, use more ranks, or pass "
            "--no-memory-check"
        )


def _agree_across_ranks(cfg: TrainConfig) -> None:
    """All-gather a hash of the options; raise :class:`SetupError` naming the first option
    that differs between ranks (each rank of a torchrun job parses its own command line)."""
    mine = {k: v for k, v in asdict(cfg).items() if k not in ("out", "progress")}
    digest = hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()
    if len(set(_all_gather_object(digest))) == 1:
        return
    configs = _all_gather_object(mine)
    for name, value in mine.items():
        for r, other in enumerate(configs):
            if other[name] != configs[0][name]:
                raise SetupError(
                    f"the ranks were started with different options: {_flag(name)} is "
                    f"{configs[0][name]} on rank 0 but {other[name]} on rank {r} (this is rank "
                    f"{_rank()}, with {value}); start every rank with the same options"
                )


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


def init_grid(cfg: TrainConfig) -> spar.distributed.Grid:
    """This rank's grid for ``cfg``: a process group of ``cfg.nproc`` ranks (initialized
    here), or the one-process grid of ``mode="local"``."""
    a, b = cfg.grid_axes()
    if cfg.mode == "local":
        return spar.distributed.Grid.local(torch.device(cfg.device))
    _init_restarted_group(cfg)
    return spar.distributed.init(
        sample=a, data=b, timeout=_group_timeout(cfg), backend=dist_backend(cfg.device)
    )


def setup_rank(cfg: TrainConfig, grid: spar.distributed.Grid) -> None:
    """Set up this rank on ``grid``: threads or GPU, the seed; check that every rank runs
    the same options (:class:`SetupError`) and that the grid is on ``cfg.device``."""
    if cfg.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, grid.world_size)))
    torch.manual_seed(cfg.seed)
    _agree_across_ranks(cfg)
    if grid.device.type != cfg.device:  # e.g. a process group the caller initialized
        raise ValueError(f"--device {cfg.device}, but the process grid is on {grid.device}")
    if grid.device.type == "cuda":
        torch.cuda.set_device(grid.device)
        torch.cuda.reset_peak_memory_stats(grid.device)


def _epoch_row(sp, splits, epoch: int, seconds: float, sums: torch.Tensor, kl: float, tel) -> dict:
    """The ``history.csv`` row of an epoch (every rank calls it: the sums are all-reduced
    over the grid and the validation predictive is gathered over the sample group).

    ``loss`` and ``nll`` are the epoch's means per training example of the negative ELBO
    and of its likelihood term (each rank's local estimate, averaged over the grid), ``kl``
    the KL divergence of the posterior from the prior (nats, summed over all weights) at the
    epoch's end, ``samples_per_s`` training examples per second of the whole grid, and
    ``peak_memory_mib`` this (rank 0's) process's peak so far. The private ``_accuracy`` is
    the training accuracy of the local samples' average, for the progress line."""
    if dist.is_available() and dist.is_initialized():
        total = sums.to(sp.grid.device)
        dist.all_reduce(total)  # over every rank: data shards and sample shards
        sums = total.cpu() / sp.grid.sample  # each example was counted once per sample rank
    seen = float(sums[3])
    row = {
        "epoch": epoch,
        "loss": float(sums[0]) / seen,
        "nll": float(sums[1]) / seen,
        "kl": kl,
        **validation(sp, splits),
        "seconds": seconds,
        "samples_per_s": seen / seconds,
        "peak_memory_mib": _peak_memory(sp.grid.device, tel)[0] / 2**20,
    }
    row["_accuracy"] = float(sums[2]) / seen
    return row


def run(cfg: TrainConfig) -> dict | None:
    """Train on this rank (inside torchrun, SLURM, spar's own launcher, or alone for
    ``mode="local"``); return the report on rank 0, ``None`` elsewhere."""
    grid = init_grid(cfg)
    rank = _rank()
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT
    try:
        setup_rank(cfg, grid)
        splits = load_data(cfg)
        model = build_model(cfg, splits).to(grid.device)
        augment_mode = None if cfg.augment == "none" else cfg.augment
        sp = SampleParallel(model, cfg.samples, grid, seed=cfg.seed, augment=augment_mode)
        opt = torch.optim.Adam(sp.parameters(), lr=cfg.lr)
        start_epoch, keep_previous = 0, True
        if cfg.resume or _restarted_with_checkpoint(ckpt_path):
            path, state, note = resume_checkpoint(out)
            if rank == 0 and note:
                print(f"spar train: warning: {note}", file=sys.stderr, flush=True)
            if rank == 0 and restart_count():
                print(f"spar train: restart {restart_count()}: continuing from {path} "
                      f"(epoch {state['epoch']})", file=sys.stderr, flush=True)  # fmt: skip
            start_epoch = _restore(sp, opt, state)
            keep_previous = note is None  # never push the good previous file out
        if start_epoch >= cfg.epochs and rank == 0:
            print(f"spar train: {ckpt_path} already holds {start_epoch} epochs (--epochs "
                  f"{cfg.epochs}): nothing to train; evaluating it", flush=True)  # fmt: skip
        x_tr, y_tr = splits.x_train, splits.y_train
        local_batch = cfg.batch_size // grid.data
        sampler = GridSampler(x_tr, grid, shuffle=True, seed=cfg.seed, batch_size=local_batch)
        n_train = len(x_tr)
        epoch_times: list[float] = []  # wall time of each epoch's steps (no checkpointing)
        step_times: list[float] = []  # of the first epoch this process runs
        gpu_index = grid.device.index if grid.device.type == "cuda" else None
        allow = _group_timeout(cfg)
        progress = rep.EpochProgress(cfg.progress and rank == 0, cfg.epochs)
        with (
            Telemetry(gpu_index=gpu_index) as tel,
            StallWatch(rank, cfg.timeout, allow) as watch,
            progress,
        ):
            for epoch in range(start_epoch, cfg.epochs):
                watch.beat(epoch, -1, allow=allow)
                sp.train()
                sampler.set_epoch(epoch)
                order = torch.tensor(list(iter(sampler)))
                batches = [order[i : i + local_batch] for i in range(0, len(order), local_batch)]
                progress.start_epoch(epoch + 1, len(batches))
                t0 = time.perf_counter()
                # this rank's sums over the epoch: loss, NLL term, correct, examples
                sums = torch.zeros(4, dtype=torch.float64)
                for i, idx in enumerate(batches):
                    t_step = time.perf_counter()
                    watch.beat(epoch, i, 0)
                    xb = datasets.augment(x_tr[idx], sp.augment_generator, splits.augment)
                    x, y = _to_device(xb, grid.device), _to_device(y_tr[idx], grid.device)
                    watch.beat(epoch, i, 1)
                    outputs = sp(x)  # (S_local, B_local, classes)
                    kl = spar.nn.kl_divergence(sp)
                    loss = spar.losses.elbo(
                        outputs, y, kl=kl, dataset_size=n_train, kl_weight=cfg.kl_weight,
                        reduction=cfg.loss, group=grid.sample_group,
                    )  # fmt: skip
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    loss_value = float(loss.detach())
                    if not math.isfinite(loss_value):
                        raise FloatingPointError(
                            f"the loss became {loss_value} at epoch {epoch + 1}, step {i + 1}; "
                            "lower --lr or --init-sigma (the last checkpoint is intact)"
                        )
                    nll_value = loss_value - cfg.kl_weight * float(kl.detach()) / n_train
                    correct = int((outputs.softmax(-1).mean(0).argmax(-1) == y).sum())
                    sums += torch.tensor([loss_value * len(idx), nll_value * len(idx),
                                          correct, len(idx)], dtype=torch.float64)  # fmt: skip
                    if not epoch_times:
                        step_times.append(time.perf_counter() - t_step)
                    seen = float(sums[3])
                    rate = seen * grid.data / (time.perf_counter() - t0)
                    stats = {"loss": sums[0] / seen, "acc": sums[2] / seen, "rate": rate}
                    progress.step(i + 1, {k: float(v) for k, v in stats.items()})
                epoch_times.append(time.perf_counter() - t0)
                watch.beat(epoch + 1, -1, allow=allow)  # checkpoint, validation, next epoch
                with torch.no_grad():  # after the epoch's last update
                    kl_value = float(spar.nn.kl_divergence(sp))
                row = _epoch_row(sp, splits, epoch + 1, epoch_times[-1], sums, kl_value, tel)
                state = _checkpoint_state(sp, opt, epoch + 1, cfg)
                if rank == 0:
                    with _reason_for_os_errors(f"could not write {ckpt_path}"):
                        save_checkpoint(ckpt_path, state, keep_previous=keep_previous)
                        rep.append_history(
                            out / HISTORY, {k: v for k, v in row.items() if k[0] != "_"}
                        )
                    keep_previous = True
                    progress.end_epoch(
                        {"loss": row["loss"], "acc": row["_accuracy"], "seconds": row["seconds"],
                         "rate": row["samples_per_s"], "val_accuracy": row["val_accuracy"],
                         "val_ece": row["val_ece"]}
                    )  # fmt: skip
            watch.beat(cfg.epochs, -1, allow=allow)
            report = evaluate(sp, splits)
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
        result = public(report)
        with _reason_for_os_errors(f"could not write the report to {out}"):
            files = write_report(out, report, splits)
            if rep.plot_training(rep.read_history(out / HISTORY), out / "training.png"):
                files.append("training.png")
            if (out / HISTORY).is_file():
                files.append(HISTORY)
            result["files"] = [*files, *([CHECKPOINT] if epoch_times else []), "metrics.json"]
            write_metrics(out, result)
        print_report(report)
        print(f"wrote {', '.join(result['files'])} to {out}", flush=True)
        return result
    finally:
        if cfg.mode != "local":
            spar.distributed.shutdown()


def _restarted_with_checkpoint(path: Path) -> bool:
    """True in a rank that an elastic launcher restarted after a failure when this job
    (the same launcher job id) already wrote a checkpoint: training continues from it."""
    if not (restart_count() and path.is_file()):
        return False
    try:
        _, state, _ = resume_checkpoint(path.parent)  # a damaged file: the previous one
    except CheckpointError:
        return False
    return state.get("job") == job_id()


# how gloo and NCCL report a peer that died or stopped answering in a collective
_PEER_LOST = re.compile(r"closed by peer|reset by peer|[Tt]imed out|Broken pipe|NCCL.*abort")


def describe_failure(e: BaseException) -> str | None:
    """One line for an expected failure of a rank (a file that cannot be written, a diverged
    loss, a peer that died or timed out), ``None`` for anything else (a bug: keep its
    traceback)."""
    if isinstance(e, (OSError, FloatingPointError, SetupError, dist.DistError)):
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    if isinstance(e, RuntimeError) and _PEER_LOST.search(str(e)):
        return "stopped: another rank is gone"
    return None


def _worker(cfg: TrainConfig, job=None, command: str = "spar train") -> dict | None:
    """Entry point of each process started by :func:`start` (module level: picklable):
    runs ``job(cfg)`` (default :func:`run`).

    An expected failure (:func:`describe_failure`) is one line on stderr and exit code 1;
    anything else keeps its traceback. The launcher process then says where to resume
    (``spar train``'s ``main``)."""
    # ^C reaches the whole process group: the launcher says where to resume; a rank just
    # stops (a checkpoint being written stays a temporary file, deleted by the next run)
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))
    try:
        return (job or run)(cfg)
    except Exception as e:
        line = describe_failure(e)
        if line is None:
            traceback.print_exc()
            raise
        rank = os.environ.get("RANK", "0")
        print(f"{command}: rank {rank}: {line}", file=sys.stderr, flush=True)
        sys.exit(1)


def under_launcher() -> bool:
    """True inside torchrun or a SLURM task (then this process is one rank already)."""
    return spar.distributed.detect_launch_env().source != "local"


def launch(cfg: TrainConfig) -> dict | None:
    """Run the job: in this process when already launched (torchrun/SLURM), local, or one
    process (no launcher, no process group: nothing to communicate), otherwise on
    ``cfg.nproc`` local processes through PyTorch's elastic launcher, which restarts them
    all (from the last checkpoint) up to ``cfg.max_restarts`` times when one fails.

    First :func:`preflight`; then the process that writes the output (this one, or rank 0
    under a launcher) takes the folder's lock for the whole run and deletes the temporary
    files a killed run left there. Raises :class:`SetupError` for anything found before
    training starts."""
    writer = spar.distributed.detect_launch_env().rank == 0
    preflight(cfg, writer=writer)
    with contextlib.ExitStack() as stack:
        if writer:
            try:
                stack.enter_context(OutputLock(cfg.out))
            except OutputBusyError as e:
                raise SetupError(str(e)) from None
            remove_stale_temps(cfg.out)
        return start(cfg)


def start(cfg: TrainConfig, job=None, command: str = "spar train") -> dict | None:
    """Run ``job(cfg)`` (default :func:`run`) on every rank of ``cfg``'s grid: in this
    process when already launched, local or one process, otherwise on ``cfg.nproc`` local
    processes (see :func:`launch`); returns rank 0's result."""
    job = job or run
    if cfg.mode == "local" or cfg.nproc == 1 or under_launcher():
        return job(cfg)
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = spar.distributed.free_port()
    # one BLAS thread pool per rank sized to its share of the cores; setting it here also
    # silences the launcher's warning about OMP_NUM_THREADS
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.nproc)))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=cfg.nproc,
        run_id=f"spar-{port}-{os.getpid()}-{time.time_ns()}",  # unique: see spar._watch.job_id
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}",
        max_restarts=cfg.max_restarts,
        start_method="spawn",
    )
    with _quiet_launcher_logs():
        results = elastic_launch(config, _worker)(cfg, job, command)
    return results.get(0)


@contextlib.contextmanager
def _quiet_launcher_logs():
    """Silence the elastic launcher's own logs for the run (it logs every failed worker with
    its traceback, and every signal it sends); the workers and ``spar train`` report
    failures themselves, in one line each."""
    loggers = [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name.startswith(("torch.distributed.elastic", "torch.multiprocessing"))
    ]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)
