"""Command line: ``spar train`` (a Monte Carlo trained Bayesian network on digits).

The built-in default trains a Bayesian MLP on scikit-learn's digits (shipped with the
package, no download) on the CPU and reports accuracy, NLL and ECE on a held-out split.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

import spar


def load_digits_split(seed: int, test_fraction: float = 0.25):
    """Digits as float tensors scaled to [0, 1], split reproducibly into train/test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def bayes_mlp(in_features: int, hidden: int, classes: int, init_sigma: float) -> nn.Module:
    return nn.Sequential(
        spar.nn.BayesLinear(in_features, hidden, init_sigma=init_sigma),
        nn.ReLU(),
        spar.nn.BayesLinear(hidden, hidden, init_sigma=init_sigma),
        nn.ReLU(),
        spar.nn.BayesLinear(hidden, classes, init_sigma=init_sigma),
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    (x_tr, y_tr), (x_te, y_te) = load_digits_split(args.seed)
    model = spar.nn.MonteCarlo(
        bayes_mlp(x_tr.shape[1], args.hidden, 10, args.init_sigma), args.samples, seed=args.seed
    )
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    n = len(x_tr)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, args.batch_size):
            idx = perm[i : i + args.batch_size]
            out = model(x_tr[idx])
            loss = spar.losses.elbo(
                out, y_tr[idx], kl=spar.nn.kl_divergence(model), dataset_size=n,
                kl_weight=args.kl_weight, reduction=args.loss,
            )  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss) * len(idx)
        print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {total / n:.4f}", flush=True)
    elapsed = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        logits = model(x_te)
    results = {
        "accuracy": float(spar.metrics.accuracy(logits, y_te)),
        "nll": float(spar.metrics.nll(logits, y_te)),
        "ece": float(spar.metrics.ece(logits, y_te)),
        "train_seconds": elapsed,
    }
    print(
        f"test: accuracy {results['accuracy']:.4f}  NLL {results['nll']:.4f}  "
        f"ECE {results['ece']:.4f}  ({elapsed:.1f} s, S={args.samples})"
    )
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spar", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a Bayesian network (default: MLP on digits)")
    t.add_argument("--samples", type=_positive_int, default=8, help="Monte Carlo samples S")
    t.add_argument("--epochs", type=_positive_int, default=30)
    t.add_argument("--batch-size", type=_positive_int, default=64)
    t.add_argument("--hidden", type=_positive_int, default=128)
    t.add_argument("--lr", type=_positive_float, default=3e-3)
    t.add_argument("--kl-weight", type=float, default=1.0)
    t.add_argument("--init-sigma", type=_positive_float, default=1e-2)
    t.add_argument("--loss", choices=("mean_samples", "mixture"), default="mean_samples")
    t.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
