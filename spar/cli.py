"""Command line: ``spar train`` (the main job) and ``spar info`` (what works here).

``spar train`` with no options trains a Bayesian CNN on scikit-learn's digits 0-7 with
sampling parallelism over 2 local CPU processes (spar launches them itself through
PyTorch's elastic launcher unless it already runs under torchrun or SLURM), and reports
accuracy, calibration and how well its uncertainty flags the unseen digits 8 and 9.
Every option can also come from a TOML config file (``--config``; command-line flags
win). Bad input ends with a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from spar.train import AUGMENTS, LOSSES, MODES, TrainConfig

_DEFAULTS = TrainConfig()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """Bad input ends with one line (no usage block, no traceback) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spar", description="Fast, memory-lean Bayesian deep learning.")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{train,info}", parser_class=_Parser
    )
    t = sub.add_parser(
        "train",
        help="train a Bayesian CNN with sampling parallelism (default: digits, 2 CPU ranks)",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    d = _DEFAULTS
    t.add_argument("--config", type=Path, help="TOML file with any of the options below")
    t.add_argument("--nproc", type=_positive_int, help=f"processes (default {d.nproc})")
    t.add_argument("--mode", choices=MODES, help=f"parallelism (default {d.mode})")
    t.add_argument("--sample-axis", type=_positive_int, help="sample axis size (hybrid)")
    t.add_argument("--data-axis", type=_positive_int, help="data axis size (hybrid)")
    t.add_argument(
        "--samples", type=_positive_int, help=f"Monte Carlo samples S (default {d.samples})"
    )
    t.add_argument(
        "--batch-size", type=_positive_int, help=f"global batch (default {d.batch_size})"
    )
    t.add_argument("--epochs", type=_positive_int, help=f"(default {d.epochs})")
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
    sub.add_parser("info", help="versions, working backends, GPUs")
    return parser


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
    known = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"--config {path}: unknown keys {', '.join(unknown)}")
    return values


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
    if args.command == "info":
        from spar.info import collect, render

        print(render(collect()))
        return 0
    from spar.checkpoint import CheckpointError
    from spar.train import launch

    try:
        cfg = config_from_args(args)
        cfg.validate()
        if cfg.resume and not (Path(cfg.out) / "checkpoint.pt").is_file():
            raise ValueError(f"--resume: no checkpoint at {Path(cfg.out) / 'checkpoint.pt'}")
        if cfg.resume:
            from spar.checkpoint import load_checkpoint

            load_checkpoint(Path(cfg.out) / "checkpoint.pt")  # fail here, not in every rank
    except (ValueError, CheckpointError) as e:
        parser.exit(2, f"spar train: error: {e}\n")
    launch(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
