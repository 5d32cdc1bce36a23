"""Command line: ``spar train`` (the main job), ``spar eval`` (a checkpoint's predictive),
``spar plan`` (which grid) and ``spar info``.

``spar train`` with no options trains a Bayesian CNN on scikit-learn's digits 0-7 with
sampling parallelism over 2 local CPU processes (spar launches them itself through
PyTorch's elastic launcher unless it already runs under torchrun or SLURM), and reports
accuracy, calibration and how well its uncertainty flags the unseen digits 8 and 9.
``--dataset cifar10|npz`` and ``--model resnet20|vit-tiny|mlp|timm:NAME`` train other data
and models; ``spar eval --checkpoint OUT/checkpoint.pt`` evaluates a saved run.
Every option can also come from a TOML config file (``--config``; command-line flags
win; its values follow the same rules). Bad input, and everything that can be checked
before the ranks start (see :func:`spar.train.preflight`), ends with a one-line error and
exit code 2; an interrupt or a failed rank ends with one line that says where to resume.

``spar plan`` predicts, with the cost model of :func:`spar.distributed.plan`, the step and
epoch time, the scaling efficiency and the memory per GPU of every feasible ``sample x
data`` grid, and ranks them (fastest grid that fits first).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import fields
from pathlib import Path

from spar.datasets import DATASETS
from spar.distributed.plan import OPTIMIZERS
from spar.models import MODELS
from spar.train import AUGMENTS, DEFAULT_TIMEOUT, LOSSES, MODES, TrainConfig

_DEFAULTS = TrainConfig()


def _whole_number(text: str, minimum: int) -> int:
    """An integer >= ``minimum``, exactly (``12345678901234567``), also written as ``5.7e6``."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None:  # 5.7e6: a float form, exact when it is a whole number
        try:
            f = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(f) or not f.is_integer():
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        value = _exact_int(text, f)
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
    return value


def _count(text: str) -> int:
    """A positive integer (see :func:`_whole_number`)."""
    return _whole_number(text, 1)


def _count_or_zero(text: str) -> int:
    """An integer >= 0 (see :func:`_whole_number`)."""
    return _whole_number(text, 0)


def _exact_int(text: str, approx: float) -> int:
    """The integer ``text`` (``5.7e6``) denotes, exactly (Decimal, not the nearest double)."""
    from decimal import Decimal, InvalidOperation

    try:
        d = Decimal(text.strip())
    except InvalidOperation:
        return int(approx)
    if d != d.to_integral_value():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    if d.adjusted() > 30:  # 1e300: beyond any count; keep it out of int(Decimal)
        return int(approx)
    return int(d)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _positive_float(text: str) -> float:
    value = _float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """Bad input ends with one line (no usage block, no traceback) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spar", description="Fast, memory-lean Bayesian deep learning.")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{train,eval,plan,info}", parser_class=_Parser
    )
    t = sub.add_parser(
        "train",
        help="train a Bayesian network with sampling parallelism (default: digits, 2 CPU ranks)",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    d = _DEFAULTS
    t.add_argument("--config", type=Path, help="TOML file with any of the options below")
    data = t.add_argument_group("data and model")
    data.add_argument(
        "--dataset", choices=DATASETS, help=f"(default {d.dataset}: scikit-learn's, built in)"
    )
    data.add_argument(
        "--data-dir",
        metavar="PATH",
        help="cifar10: the folder of its python batches (cifar-10-batches-py, or its parent); "
        "npz: the .npz file with x_train, y_train, x_test, y_test and optionally x_ood",
    )
    data.add_argument(
        "--model",
        type=_model_name,
        help=f"{', '.join(MODELS)} or timm:NAME (needs timm) (default {d.model})",
    )
    data.add_argument(
        "--ood-classes",
        metavar="IDS",
        help="classes held out of training and test as out-of-distribution inputs, e.g. 8,9; "
        "none for none (default: 8,9 for digits, none otherwise)",
    )
    data.add_argument(
        "--ood",
        metavar="PATH",
        help="a second dataset as OOD inputs: an .npz (its x_ood, else x_test) or a "
        "CIFAR-10 folder (its test batch)",
    )
    data.add_argument(
        "--val-fraction",
        type=_float,
        help="share of the training data held out for the per-epoch validation in "
        f"history.csv (default {d.val_fraction}; 0: none)",
    )
    t.add_argument("--nproc", type=_count, help=f"processes (default {d.nproc})")
    t.add_argument("--mode", choices=MODES, help=f"parallelism (default {d.mode})")
    t.add_argument("--sample-axis", type=_count, help="sample axis size (hybrid)")
    t.add_argument("--data-axis", type=_count, help="data axis size (hybrid)")
    t.add_argument("--samples", type=_count, help=f"Monte Carlo samples S (default {d.samples})")
    t.add_argument("--batch-size", type=_count, help=f"global batch (default {d.batch_size})")
    t.add_argument("--epochs", type=_count, help=f"(default {d.epochs})")
    t.add_argument("--lr", type=_float, help=f"Adam learning rate (default {d.lr})")
    t.add_argument("--kl-weight", type=_float, help=f"(default {d.kl_weight})")
    t.add_argument(
        "--init-sigma", type=_float, help=f"initial posterior std (default {d.init_sigma})"
    )
    t.add_argument("--loss", choices=LOSSES, help=f"ELBO reduction (default {d.loss})")
    t.add_argument(
        "--augment", choices=AUGMENTS, help=f"per-rank augmentation (default {d.augment})"
    )
    t.add_argument("--device", choices=("cpu", "cuda"), help=f"(default {d.device})")
    t.add_argument("--seed", type=int, help=f"(default {d.seed})")
    t.add_argument("--out", help=f"output folder (default {d.out})")
    t.add_argument(
        "--resume", action="store_true", default=None, help="continue from OUT/checkpoint.pt"
    )
    t.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    t.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SEC",
        help="how long a step may wait for a stalled rank before the job ends, naming it "
        "(default: 20x the slowest step so far, at least 60 s; the first step, start-up and "
        f"epoch ends get at least {DEFAULT_TIMEOUT:.0f} s)",
    )
    t.add_argument(
        "--max-restarts",
        type=_count_or_zero,
        metavar="N",
        help="restart all ranks from the last checkpoint when one fails, up to N times "
        f"(default {d.max_restarts})",
    )
    t.add_argument(
        "--no-memory-check",
        dest="memory_check",
        action="store_false",
        default=None,
        help="start even where the estimated memory of a step exceeds what is available",
    )
    _add_eval_parser(sub)
    _add_plan_parser(sub)
    sub.add_parser("info", help="versions, working backends, GPUs")
    return parser


def _model_name(text: str) -> str:
    if text in MODELS or (text.startswith("timm:") and len(text) > 5):
        return text
    raise argparse.ArgumentTypeError(
        f"unknown model {text!r}: choose {', '.join(MODELS)} or timm:NAME"
    )


def _add_eval_parser(sub) -> None:
    e = sub.add_parser(
        "eval",
        help="evaluate a checkpoint of spar train: metrics, plots, per-example predictions",
        description="Evaluate the full predictive (all S weight samples) of a spar train "
        "checkpoint on its test set (and OOD set): the checkpoint carries its config, so no "
        "other option is needed. Writes metrics.json, reliability.png, uncertainty.png and "
        "predictions.npz (predicted class, mean probabilities, predictive entropy and mutual "
        "information per example).",
    )
    e.add_argument("--checkpoint", required=True, metavar="PATH", help="OUT/checkpoint.pt")
    e.add_argument("--data-dir", metavar="PATH", help="where the data lies now (cifar10, npz)")
    e.add_argument("--ood", metavar="PATH", help="OOD inputs (see spar train --help)")
    e.add_argument("--samples", type=_count, help="weight samples S (default: the checkpoint's)")
    e.add_argument("--nproc", type=_count, default=1, help="processes (default 1)")
    e.add_argument("--mode", choices=MODES, help="parallelism (default: local for 1, else sp)")
    e.add_argument("--sample-axis", type=_count, help="sample axis size (hybrid)")
    e.add_argument("--data-axis", type=_count, help="data axis size (hybrid)")
    e.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(default cpu)")
    e.add_argument("--out", help="output folder (default: eval/ beside the checkpoint)")


def _run_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``spar eval``: anything wrong before the evaluation starts is one line and exit 2; an
    interrupt or a failed rank one line, exit 130/143/1 (as ``spar train``)."""
    from spar.evaluation import EvalConfig, launch

    values = {f.name: getattr(args, f.name) for f in fields(EvalConfig)}
    return _run_job("spar eval", lambda: launch(EvalConfig(**values)), lambda: "", parser)


def _add_plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="rank the sample x data grids by predicted time and memory (cost model)",
        description=(
            "Predict step time, epoch time, scaling efficiency and memory per GPU of every "
            "grid sample x data = GPUs (sample dividing S, data dividing the global batch) "
            "and rank them: fastest grid that fits in memory first. Compute: local samples x "
            "(weight cost + sample cost x local batch / cost batch). Communication: ring "
            "all-reduce of the gradient (mu and rho: 2 values per Bayesian parameter), "
            "2(n-1) x latency + 2(n-1)/n x bytes / bandwidth per bucket, overlapped with "
            "backward. Memory: parameters, gradients, optimizer state, activations, overhead."
        ),
    )
    g = p.add_argument_group("model and job")
    g.add_argument(
        "--params",
        type=_count,
        required=True,
        metavar="N",
        help="deterministic parameters of the network (count; 5.7e6 is accepted); "
        "a Bayesian parameter trains mu and rho",
    )
    g.add_argument(
        "--bayesian-fraction",
        type=_float,
        default=1.0,
        metavar="F",
        help="fraction of the parameters that are Bayesian, 0..1 (default 1)",
    )
    g.add_argument(
        "--samples",
        type=_count,
        required=True,
        metavar="S",
        help="Monte Carlo weight samples per step (count)",
    )
    g.add_argument(
        "--batch-size",
        type=_count,
        required=True,
        metavar="B",
        help="global batch per step (examples)",
    )
    g.add_argument(
        "--dataset-size",
        type=_count,
        metavar="N",
        help="examples per epoch, >= B (for the epoch time; default: none)",
    )
    g.add_argument(
        "--sample-cost-s",
        type=_float,
        required=True,
        metavar="SEC",
        help="forward+backward time of one weight sample over --cost-batch "
        "examples on one GPU (seconds per sample-batch)",
    )
    g.add_argument(
        "--cost-batch",
        type=_count,
        metavar="B",
        help="examples over which --sample-cost-s was measured (default: B)",
    )
    g.add_argument(
        "--weight-cost-s",
        type=_float,
        default=0.0,
        metavar="SEC",
        help="part of one weight sample's cost that does not scale with the "
        "batch, e.g. drawing W_s (seconds per weight sample; default 0)",
    )
    g.add_argument(
        "--step-overhead-s",
        type=_float,
        default=0.0,
        metavar="SEC",
        help="fixed cost per step on every grid: data loading, optimizer, "
        "launches (seconds; default 0)",
    )
    g.add_argument(
        "--activation-bytes",
        type=_float,
        metavar="BYTES",
        help="activation memory per (weight sample, example) kept for backward "
        "(bytes; default: not counted)",
    )
    g.add_argument(
        "--backward-fraction",
        type=_float,
        default=2 / 3,
        metavar="F",
        help="share of the compute spent in backward, 0..1 (default 0.667)",
    )
    g.add_argument(
        "--optimizer",
        choices=sorted(OPTIMIZERS),
        default="adam",
        help="optimizer state: adam/adamw 2 copies, sgd_momentum 1, sgd 0 (default adam)",
    )
    g.add_argument(
        "--param-dtype",
        default="float32",
        metavar="DTYPE",
        help="dtype of parameters, gradients and optimizer state (default float32)",
    )
    g.add_argument(
        "--comm-dtype",
        default="float32",
        metavar="DTYPE",
        help="dtype of the gradient all-reduce: float32, bfloat16, float16 (default float32)",
    )
    h = p.add_argument_group("hardware")
    h.add_argument(
        "--gpus", type=_count, required=True, metavar="G", help="GPUs in the job (count)"
    )
    h.add_argument(
        "--gpus-per-node",
        type=_count,
        default=8,
        metavar="G",
        help="GPUs per node (count; default 8)",
    )
    h.add_argument(
        "--device-memory-gib",
        type=_float,
        default=80.0,
        metavar="GIB",
        help="memory of one GPU (GiB = 2^30 bytes; default 80)",
    )
    h.add_argument(
        "--memory-overhead-gib",
        type=_float,
        default=1.0,
        metavar="GIB",
        help="fixed memory per GPU: CUDA context, allocator slack (GiB; default 1)",
    )
    h.add_argument(
        "--intra-node-gb-s",
        type=_float,
        default=150.0,
        metavar="GB/S",
        help="bus bandwidth of an all-reduce ring inside a node, per GPU, as nccl-tests "
        "all_reduce_perf reports busbw (not the link rate: the model applies the "
        "2(n-1)/n bus factor itself; GB/s = 1e9 bytes/s; default 150)",
    )
    h.add_argument(
        "--inter-node-gb-s",
        type=_float,
        default=25.0,
        metavar="GB/S",
        help="bus bandwidth of an all-reduce ring that spans nodes, per GPU, as nccl-tests "
        "all_reduce_perf reports busbw across nodes (bounded by the network bandwidth per "
        "GPU; not the link rate; GB/s = 1e9 bytes/s; default 25)",
    )
    h.add_argument(
        "--latency-us",
        type=_float,
        default=10.0,
        metavar="US",
        help="latency per ring step (microseconds; default 10)",
    )
    r = p.add_argument_group("reducer and output")
    r.add_argument(
        "--bucket-mb",
        type=_float,
        default=25.0,
        metavar="MIB",
        help="gradient bucket size (MiB = 2^20 bytes; default 25)",
    )
    r.add_argument(
        "--first-bucket-mb",
        type=_float,
        default=1.0,
        metavar="MIB",
        help="first (and small last) bucket size (MiB; default 1)",
    )
    r.add_argument(
        "--no-small-last-bucket",
        dest="small_last_bucket",
        action="store_false",
        help="do not give the last-ready gradients a bucket of their own",
    )
    r.add_argument(
        "--mode",
        dest="modes",
        action="append",
        choices=MODES,
        help="keep only this mode (repeatable; default: all)",
    )
    r.add_argument("--json", action="store_true",
                   help="print a JSON list of rows (times in s, memory in bytes)")  # fmt: skip


def _fixed(x: float, digits: int) -> str:
    """``x`` with ``digits`` decimals, or 3 significant digits from 1e6 on (short columns)."""
    return f"{x:.{digits}f}" if x < 1e6 else f"{x:.3g}"


def _plan_table(rows) -> str:
    epoch = rows[0].epoch_time_s is not None
    head = ["#", "mode", "grid", "S/rank", "B/rank", "step", "epoch" if epoch else "",
            "eff.", "GiB/rank", "fits"]  # fmt: skip
    lines = []
    for i, r in enumerate(rows, 1):
        lines.append([
            str(i), r.mode, f"{r.sample_axis}x{r.data_axis}", str(r.samples_per_rank),
            str(r.batch_per_rank), f"{_fixed(r.step_time_s * 1e3, 2)} ms",
            f"{_fixed(r.epoch_time_s, 2)} s" if epoch else "", f"{r.efficiency:.2f}",
            _fixed(r.memory_per_rank_bytes / 2**30, 1), "yes" if r.fits else "NO",
        ])  # fmt: skip
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    for i, (line, r) in enumerate(zip(lines, rows, strict=True), 1):
        out.append("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())
        out.append(f"{' ' * (len(str(i)) + 2)}{r.explanation}")
    return "\n".join(out)


_PLAN_FLAGS = {
    "num_params": "--params",
    "num_samples": "--samples",
    "batch_size": "--batch-size",
    "gpus": "--gpus",
    "gpus_per_node": "--gpus-per-node",
    "dataset_size": "--dataset-size",
    "cost_batch": "--cost-batch",
    "bayesian_fraction": "--bayesian-fraction",
    "sample_cost_s": "--sample-cost-s",
    "weight_cost_s": "--weight-cost-s",
    "step_overhead_s": "--step-overhead-s",
    "activation_bytes": "--activation-bytes",
    "backward_fraction": "--backward-fraction",
    "param_dtype": "--param-dtype",
    "comm_dtype": "--comm-dtype",
    "device_memory_gib": "--device-memory-gib",
    "memory_overhead_gib": "--memory-overhead-gib",
    "intra_node_gb_s": "--intra-node-gb-s",
    "inter_node_gb_s": "--inter-node-gb-s",
    "latency_us": "--latency-us",
    "bucket_mb": "--bucket-mb",
    "first_bucket_mb": "--first-bucket-mb",
}


_PLAN_NAMES = re.compile(r"\b(" + "|".join(sorted(_PLAN_FLAGS, key=len, reverse=True)) + r")\b")


def _plan_ties(rows) -> str:
    """One line when the grids that fit tie in step time (within 0.1%), else ""."""
    fit = [r for r in rows if r.fits]
    times = [r.step_time_s for r in fit]
    if len(fit) < 2 or max(times) > min(times) * 1.001:
        return ""
    same = all(math.isclose(r.compute_s, fit[0].compute_s, rel_tol=1e-9) for r in fit)
    why = "compute (S/sample) x (B/data) x cost is the same on every grid" if same else ""
    return (
        f"note: the {len(fit)} grids that fit tie in step time (within 0.1%"
        f"{'; ' + why if why else ''}), so the "
        "order is only the tie-break (fewer data ranks first); give --weight-cost-s, the "
        "batch-independent cost per weight sample (measure it), to separate them; a rank's "
        "efficiency at a smaller local batch is not modelled"
    )


def _run_plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from spar.distributed import plan

    try:
        rows = plan(
            num_params=args.params,
            bayesian_fraction=args.bayesian_fraction,
            num_samples=args.samples,
            batch_size=args.batch_size,
            gpus=args.gpus,
            dataset_size=args.dataset_size,
            gpus_per_node=args.gpus_per_node,
            device_memory_gib=args.device_memory_gib,
            intra_node_gb_s=args.intra_node_gb_s,
            inter_node_gb_s=args.inter_node_gb_s,
            latency_us=args.latency_us,
            sample_cost_s=args.sample_cost_s,
            weight_cost_s=args.weight_cost_s,
            cost_batch=args.cost_batch,
            step_overhead_s=args.step_overhead_s,
            activation_bytes=args.activation_bytes,
            comm_dtype=args.comm_dtype,
            param_dtype=args.param_dtype,
            optimizer=args.optimizer,
            memory_overhead_gib=args.memory_overhead_gib,
            bucket_mb=args.bucket_mb,
            first_bucket_mb=args.first_bucket_mb,
            small_last_bucket=args.small_last_bucket,
            backward_fraction=args.backward_fraction,
            modes=args.modes,
        )
    except (ValueError, TypeError) as e:
        message = _PLAN_NAMES.sub(lambda m: _PLAN_FLAGS[m.group(0)], str(e))  # flags typed
        parser.exit(2, f"spar plan: error: {message}\n")
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=1))
    else:
        print("predicted by spar's cost model (spar plan --help); fastest grid that fits first")
        print(_plan_table(rows))
        ties = _plan_ties(rows)
        if ties:
            print(ties)
    return 0


def _train_actions() -> dict[str, argparse.Action]:
    """The options of ``spar train`` by destination name (``samples``, ``progress``, ...)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices["train"]._actions if a.dest != "help"}


def _config_value(action: argparse.Action, key: str, value, path: Path):
    """``value`` of config-file key ``key`` checked with the command line's rules for the
    same option: its type function, its choices; a switch needs true or false."""
    where = f"--config {path}: {key}"
    if action.nargs == 0:  # a switch (--resume, --no-progress)
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: expected a single value, got {value!r}")
    if action.type is not None:
        try:
            value = action.type(str(value))
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{where}: {e}") from None
        except ValueError:
            raise ValueError(f"{where}: expected an integer, got {value!r}") from None
    elif action.choices is None and not isinstance(value, str):  # a path, a name
        raise ValueError(f"{where}: expected a string, got {value!r}")
    if action.choices is not None and value not in action.choices:
        allowed = ", ".join(map(str, action.choices))
        raise ValueError(f"{where} must be one of {allowed}; got {value!r}")
    return value


def _load_config_file(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise ValueError("--config needs Python 3.11+ (tomllib)") from None
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {path}: not valid TOML ({e})") from None
    values = {k.replace("-", "_"): v for k, v in values.items()}
    actions = _train_actions()
    known = {f.name for f in fields(TrainConfig)} & set(actions)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown keys {', '.join(unknown)}")
    held = values.get("ood_classes")
    if isinstance(held, list) and all(type(c) is int for c in held):  # ood_classes = [8, 9]
        values["ood_classes"] = ",".join(map(str, held)) or "none"
    return {k: _config_value(actions[k], k, v, path) for k, v in values.items()}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict = {}
    if args.config is not None:
        values.update(_load_config_file(args.config))
    for f in fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ValueError(f"bad config value: {e}") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "plan":
        return _run_plan(args, parser)
    if args.command == "eval":
        return _run_eval(args, parser)
    if args.command == "info":
        from spar.info import collect, render

        print(render(collect()))
        return 0
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.exit(2, f"spar train: error: {e}\n")
    return _run_train(cfg, parser)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the run unwinds (and unlocks) as for ^C.
    A ``BaseException``, like ``KeyboardInterrupt``: no ``except Exception`` on the way
    (a monitoring call, a checkpoint load) may swallow it or turn it into another error."""


def _on_sigterm(signum, frame):
    raise _Terminated


def _where_to_resume(cfg) -> str:
    from spar.checkpoint import CheckpointError
    from spar.train import resume_checkpoint

    try:  # what --resume would take: checkpoint.pt, or the previous one if it is damaged
        path, state, _ = resume_checkpoint(cfg.out)
        epoch = state["epoch"]
    except (CheckpointError, KeyError):
        return "no checkpoint was written yet"
    return f"the last checkpoint is {path} (epoch {epoch}); to continue, add --resume"


def _run_train(cfg, parser: argparse.ArgumentParser) -> int:
    """``spar train``: problems found before training are one line and exit 2; an interrupt
    (^C, SIGTERM) or a failed rank is one line that says where to resume, exit 130, 143, 1."""
    from spar.train import launch

    return _run_job("spar train", lambda: launch(cfg), lambda: "; " + _where_to_resume(cfg), parser)


def _run_job(command: str, job, where, parser: argparse.ArgumentParser) -> int:
    """Run ``job()`` (a launch of ``spar train`` or ``spar eval``) and turn its expected
    failures into one line on stderr: a :class:`~spar.train.SetupError` exits 2, ^C and
    SIGTERM 130 and 143, a failed rank 1; ``where()`` adds where to resume (or nothing).
    Anything else is a bug and keeps its traceback."""
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from spar.train import SetupError, describe_failure

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        job()
    except SetupError as e:
        parser.exit(2, f"{command}: error: {e}\n")
    except (KeyboardInterrupt, _Terminated, SignalException) as e:
        if isinstance(e, SignalException):  # the elastic launcher's handler caught it
            signum = signal.Signals(e.sigval)
        else:
            signum = signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT
        parser.exit(128 + signum, f"{command}: stopped by {signum.name}{where()}\n")
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode < 0:
            how = f"killed by {failure.signal_name()}"
        elif failure.exitcode == 124:  # StallWatch ended a stalled job (its line is above)
            how = "it stopped a stalled job"
        else:
            how = f"exit code {failure.exitcode}"
        parser.exit(1, f"{command}: error: rank {rank} failed ({how}){where()}\n")
    except Exception as e:  # this process is a rank (torchrun, SLURM, --mode local)
        line = describe_failure(e)
        if line is None:
            raise
        rank = os.environ.get("RANK", "0")
        parser.exit(1, f"{command}: rank {rank}: {line}{where()}\n")
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
