"""``spar.integrations.lightning.SamplingParallel`` on real gloo ranks.

One two-rank job (Lightning's import is the slow part) checks, on the grids 2x1 and 1x2:
two Lightning training steps equal two steps of spar's own loop (``SampleParallel`` +
``GridSampler``) on the same grid (I3's bound); a checkpoint written by Lightning and
resumed by a new Trainer continues the uninterrupted run bit for bit and holds the plain
module's keys with the noise step; ``trainer.predict`` returns all S samples, equal to the
module's own ``MonteCarlo`` prediction; a module without ``MonteCarlo``, or with a trainable
parameter outside it, gets a clear error.
"""

from __future__ import annotations

import os

import lightning.pytorch as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import spar
import spar.distributed as sd
import spar.nn as snn
from spar.data import GridSampler
from spar.integrations.lightning import SamplingParallel

S = 4  # Monte Carlo samples per step
B = 8  # global batch size
N = 16  # dataset size: two steps per epoch
SEED = 5
LR = 0.5


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        snn.BayesLinear(6, 16, init_sigma=0.2),
        nn.ReLU(),
        snn.BayesLinear(16, 3, init_sigma=0.2, estimator="flipout"),
    )


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    return TensorDataset(torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g))


class LitBNN(L.LightningModule):
    def __init__(self, reduction: str = "mean_samples") -> None:
        super().__init__()
        self.mc = snn.MonteCarlo(_net(), S, seed=SEED)
        self.reduction = reduction

    def training_step(self, batch, batch_idx):
        x, y = batch
        group = getattr(self.trainer.strategy, "sample_group", None)
        return spar.losses.elbo(
            self.mc(x), y, kl=snn.kl_divergence(self.mc), dataset_size=N,
            reduction=self.reduction, group=group,
        )  # fmt: skip

    def predict_step(self, batch, batch_idx):
        return self.mc(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class NoMonteCarlo(LitBNN):
    def __init__(self) -> None:
        super().__init__()
        self.mc = _net()


class ParameterOutside(LitBNN):
    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(()))  # the reducer would not average it


def _trainer(grid: tuple[int, int], **kwargs) -> L.Trainer:
    return L.Trainer(
        strategy=SamplingParallel(sample=grid[0], data=grid[1]), accelerator="cpu", devices=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **kwargs,
    )  # fmt: skip


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _spar_loop(grid, reduction: str, epochs: int) -> list[dict]:
    """spar's own loop: the parameters after every epoch."""
    model = _net()
    sp = sd.SampleParallel(model, S, grid, seed=SEED, augment=None)
    opt = torch.optim.SGD(sp.parameters(), lr=LR)
    data = _data()
    b_local = B // grid.data
    # Lightning's default sampler seed is 0, shuffled for training
    sampler = GridSampler(data, grid, shuffle=True, seed=0, batch_size=b_local)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        idx = list(sampler)
        for k in range(0, len(idx), b_local):
            x, y = data[idx[k : k + b_local]]
            loss = spar.losses.elbo(
                sp(x), y, kl=snn.kl_divergence(sp), dataset_size=N,
                reduction=reduction, group=grid.sample_group,
            )  # fmt: skip
            opt.zero_grad()
            loss.backward()
            opt.step()
        out.append(_params(model))
    return out


def lightning_job(ctx: dict) -> dict:
    os.environ["TORCHELASTIC_RUN_ID"] = "spar-test"  # what torchrun sets: no re-launch
    res: dict = {}
    for axes, reduction in (((2, 1), "mixture"), ((1, 2), "mean_samples")):
        grid = sd.init(sample=axes[0], data=axes[1])
        key = f"{axes[0]}x{axes[1]}"
        b_local = B // grid.data
        loader = DataLoader(_data(), batch_size=b_local, shuffle=True)
        res[key, "spar"] = _spar_loop(grid, reduction, epochs=2)

        ckpt = os.path.join(ctx["job_dir"], f"{key}.ckpt")
        first = LitBNN(reduction)
        trainer = _trainer(axes, max_epochs=1)
        trainer.fit(first, loader)
        trainer.save_checkpoint(ckpt)
        res[key, "lightning_1"] = _params(first.mc.model)
        resumed = LitBNN(reduction)
        _trainer(axes, max_epochs=2).fit(resumed, loader, ckpt_path=ckpt)
        straight = LitBNN(reduction)
        trainer = _trainer(axes, max_epochs=2)
        trainer.fit(straight, loader)
        res[key, "resumed"] = _params(resumed.mc.model)
        res[key, "straight"] = _params(straight.mc.model)
        res[key, "module_after_fit"] = (type(straight.mc).__name__, straight.mc.step)
        res[key, "ckpt_keys"] = sorted(torch.load(ckpt, weights_only=False)["state_dict"])

        if key == "2x1":
            x = torch.randn(10, 6, generator=torch.Generator().manual_seed(3))
            preds = trainer.predict(straight, DataLoader(TensorDataset(x), batch_size=5))
            res["predict"] = torch.cat(preds, dim=1)  # (S, 10, 3)
            res["predict_step_after"] = straight.mc.step
            straight.mc.eval()
            with torch.no_grad():
                res["predict_ref"] = torch.cat([straight.mc(x[:5]), straight.mc(x[5:])], dim=1)
    for name, bad in (("no_mc", NoMonteCarlo), ("outside", ParameterOutside)):
        try:
            _trainer((2, 1), max_steps=1).fit(bad(), DataLoader(_data(), batch_size=B))
            res[name] = "no error"
        except ValueError as err:
            res[name] = str(err)
    sd.shutdown()
    return res


@pytest.mark.slow
def test_lightning_step_resume_and_predict_equal_spar(run_workers):
    from tests.distributed.test_dist_sample_parallel import _check_rel

    results = run_workers("lightning_job", 2, launch="torchrun", timeout=240)
    for rank, res in enumerate(results):
        for key in ("2x1", "1x2"):
            after_1, after_2 = res[key, "spar"]
            for name, want in after_1.items():
                _check_rel(res[key, "lightning_1"][name], want, f"rank {rank} {key} {name}")
                _check_rel(res[key, "straight"][name], after_2[name], f"{key} 2 epochs {name}")
                # resuming from Lightning's checkpoint continues the run bit for bit
                assert torch.equal(res[key, "resumed"][name], res[key, "straight"][name])
            assert res[key, "module_after_fit"] == ("MonteCarlo", 4)
            keys = res[key, "ckpt_keys"]
            assert "mc._step" in keys and "mc.model.0.weight_mu" in keys
            assert not any(".module." in k for k in keys)
        assert res["predict"].shape == (S, 10, 3)
        assert res["predict_step_after"] == 4  # prediction does not move the noise step
        _check_rel(res["predict"], res["predict_ref"], f"rank {rank} predict")
        assert "SamplingParallel needs a spar.nn.MonteCarlo" in res["no_mc"]
        assert "would not be averaged over the ranks: temperature" in res["outside"]
    # the samples differ from each other (all S were gathered, not one repeated)
    assert not torch.allclose(results[0]["predict"][0], results[0]["predict"][1])


def test_strategy_rejects_bad_axes():
    with pytest.raises(ValueError, match="sample must be an int >= 1"):
        SamplingParallel(sample=0)
    with pytest.raises(ValueError, match="data must be an int >= 1"):
        SamplingParallel(sample=2, data=1.5)
