"""A small ResNet made Bayesian with ``bayesianize`` runs on the Triton backend (every
primitive: sampled convolutions, per-example noise, the linear head) and gives the outputs
and parameter gradients of the torch backend, for every estimator; a few optimizer steps
train it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("triton")

import spar  # noqa: E402
from spar.ops import dispatch  # noqa: E402
from tests.ops.tolerance import assert_close  # noqa: E402

S, B, HW, CLASSES = 3, 2, 6, 3


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (a strided 1x1 conv where the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


def _resnet(estimator: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=True),  # the stem reads the shared input
        nn.BatchNorm2d(4),
        nn.ReLU(),
        Block(4, 4, 1),
        Block(4, 5, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, CLASSES),
    )
    return spar.nn.bayesianize(model, init_sigma=0.1, estimator=estimator)


def _step(mc, x, target):
    out = mc(x)  # (S, B, classes)
    loss = F.cross_entropy(out.flatten(0, 1), target.repeat(S)) + 1e-3 * spar.nn.kl_divergence(mc)
    grads = torch.autograd.grad(loss, [p for p in mc.parameters()])
    return out.detach(), loss.detach(), grads


def _spy_backends(monkeypatch) -> list[tuple[str, str]]:
    """Record ``(primitive, backend)`` of every dispatch (until ``monkeypatch`` undoes)."""
    used = []
    real = dispatch.backend_for

    def spy(primitive, device, dtype=None):
        backend = real(primitive, device, dtype)
        used.append((primitive, backend))
        return backend

    monkeypatch.setattr(dispatch, "backend_for", spy)
    return used


@pytest.mark.parametrize("estimator", ["reparam", "lrt", "flipout"])
def test_bayesian_resnet_triton_matches_torch(monkeypatch, estimator):
    """The same model, key and batch under SPAR_BACKEND=triton and =torch: outputs, loss
    and every parameter gradient (BatchNorm's included) agree; nothing of the fp32 model
    falls back to torch under triton."""
    # two chunks of samples in the widest convolution (5x5x3x3 weights), one elsewhere
    monkeypatch.setenv("SPAR_CHUNK_NUMEL", str(2 * 5 * 5 * 3 * 3))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, HW, HW, generator=gen)
    target = torch.randint(0, CLASSES, (B,), generator=gen)
    model = _resnet(estimator)
    runs, used_by = {}, {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("SPAR_BACKEND", backend)
        with monkeypatch.context() as m:
            used = _spy_backends(m)
            mc = spar.nn.MonteCarlo(copy.deepcopy(model), S, seed=7)
            runs[backend] = _step(mc, x, target)
        assert {b for _, b in used} == {backend}, used
        used_by[backend] = {p for p, _ in used}
    expected = {"sampled_conv", "sampled_linear"}
    expected |= {"lrt_noise"} if estimator == "lrt" else set()
    expected |= {"sign_mul"} if estimator == "flipout" else set()
    assert used_by["triton"] >= expected
    names = [n for n, _ in mc.named_parameters()]
    (out, loss, grads), (out_t, loss_t, grads_t) = runs["triton"], runs["torch"]
    # an output sums a 3x3 window of 5 channels per layer; a parameter's gradient sums the
    # S*B*HW*HW output positions of its layer
    assert_close(out, out_t, reduction=9 * 5, msg="output")
    assert_close(loss, loss_t, reduction=9 * 5, msg="loss")
    assert len(grads) == len(names)
    for name, a, e in zip(names, grads, grads_t, strict=True):
        assert_close(a, e, reduction=S * B * HW * HW, msg=f"{estimator}: grad {name}")


def test_bayesian_resnet_trains_on_triton(monkeypatch):
    monkeypatch.setenv("SPAR_BACKEND", "triton")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, 3, HW, HW, generator=gen)
    target = torch.randint(0, CLASSES, (B,), generator=gen)
    mc = spar.nn.MonteCarlo(_resnet("reparam"), S, seed=3)
    before = [p.detach().clone() for p in mc.parameters()]
    opt = torch.optim.Adam(mc.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        out = mc(x)
        loss = F.cross_entropy(out.flatten(0, 1), target.repeat(S))
        loss = loss + 1e-3 * spar.nn.kl_divergence(mc)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert mc.step == 2
    changed = [not torch.equal(a, p) for a, p in zip(before, mc.parameters(), strict=True)]
    assert all(changed)
