"""The KL term's fused closed-form gradients equal autograd through the plain formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spar.nn.prior import gaussian_kl, kl_from_rho
from tests.ops.tolerance import assert_close

F64 = dict(dtype=torch.float64)
PRIORS = {
    "scalar": lambda shape: (torch.tensor(0.1, **F64), torch.tensor(0.7, **F64)),
    "tensor": lambda shape: (torch.randn(shape, **F64), torch.rand(shape, **F64) + 0.5),
    "row": lambda shape: (torch.randn(shape[-1], **F64), torch.rand(shape[-1], **F64) + 0.5),
}


@pytest.mark.parametrize("prior", list(PRIORS))
@pytest.mark.parametrize("shape", [(5,), (4, 3), (2, 3, 2, 2)], ids=str)
def test_fused_kl_matches_autograd_and_gradcheck(prior, shape):
    torch.manual_seed(0)
    mu = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    rho = (torch.randn(shape, dtype=torch.float64) - 1.0).requires_grad_()
    pm, ps = PRIORS[prior](shape)
    kl = kl_from_rho(mu, rho, pm, ps)
    ref = gaussian_kl(mu, F.softplus(rho), pm, ps)
    n = mu.numel()
    assert_close(kl, ref, reduction=n)
    for a, b in zip(torch.autograd.grad(kl, (mu, rho)), torch.autograd.grad(ref, (mu, rho)),
                    strict=True):  # fmt: skip
        assert_close(a, b)
    assert torch.autograd.gradcheck(lambda m, r: kl_from_rho(m, r, pm, ps), (mu, rho))


def test_learned_prior_falls_back_to_autograd():
    mu = torch.randn(3, requires_grad=True)
    rho = torch.randn(3, requires_grad=True)
    pm = torch.zeros(3, requires_grad=True)
    kl = kl_from_rho(mu, rho, pm, torch.tensor(1.0))
    (g,) = torch.autograd.grad(kl, pm)
    assert_close(g, -(mu - pm).detach())
