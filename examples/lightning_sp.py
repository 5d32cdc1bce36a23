"""Sampling parallelism in PyTorch Lightning: a Bayesian MLP on scikit-learn's digits.

    torchrun --nproc_per_node 2 examples/lightning_sp.py     # 2 ranks split the samples
    python examples/lightning_sp.py                           # Lightning starts the 2 ranks

The LightningModule is written for one process: the Bayesian model sits in
``spar.nn.MonteCarlo`` and ``training_step`` returns ``spar.losses.elbo``. The strategy
``SamplingParallel(sample=2, data=1)`` splits the S Monte Carlo samples of every step over
the two ranks (each runs S/2 on the same batch) and averages the gradients;
``trainer.predict`` returns all S samples, from which ``spar.metrics`` scores the predictive.
Needs ``pip install 'spar[lightning]'``; runs on CPU in well under a minute.
"""

from __future__ import annotations

import os

import lightning.pytorch as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import spar
from spar.integrations.lightning import SamplingParallel

SAMPLES = 8
BATCH = 64
EPOCHS = 8


def digits() -> tuple[TensorDataset, TensorDataset]:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test, train = perm[:360], perm[360:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


class BayesianMLP(L.LightningModule):
    def __init__(self, dataset_size: int) -> None:
        super().__init__()
        net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        self.mc = spar.nn.MonteCarlo(spar.nn.bayesianize(net, init_sigma=1e-3), SAMPLES)
        self.dataset_size = dataset_size

    def training_step(self, batch, batch_idx):
        x, y = batch
        outputs = self.mc(x)  # (S_local, B, 10): this rank's share of the samples
        kl = spar.nn.kl_divergence(self.mc)
        loss = spar.losses.elbo(outputs, y, kl=kl, dataset_size=self.dataset_size)
        self.log("loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def predict_step(self, batch, batch_idx):
        return self.mc(batch[0])  # (S, B, 10): all samples, gathered over the sample axis

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def main() -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    train, test = digits()
    model = BayesianMLP(len(train))
    trainer = L.Trainer(
        strategy=SamplingParallel(sample=2, data=1),
        accelerator="cpu",
        devices=int(os.environ.get("WORLD_SIZE", 2)),
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, DataLoader(train, batch_size=BATCH, shuffle=True))
    logits = torch.cat(trainer.predict(model, DataLoader(test, batch_size=120)), dim=1)
    if trainer.is_global_zero:
        y = test.tensors[1]
        acc, nll = spar.metrics.accuracy(logits, y), spar.metrics.nll(logits, y)
        print(
            f"S={SAMPLES} samples on {trainer.world_size} ranks: test accuracy {float(acc):.3f}, "
            f"NLL {float(nll):.3f}, ECE {float(spar.metrics.ece(logits, y)):.3f}"
        )


if __name__ == "__main__":
    main()
