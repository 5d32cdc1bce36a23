"""The public op layer: validation once for every backend (torch's dtype rules), the
estimators over primitives, and the shared-input path (the first layer reads B rows)
equal to the folded path."""

from __future__ import annotations

import pytest
import torch

from spar import ops, rng
from spar.rng import NoiseKey
from tests.ops.tolerance import assert_close

ESTIMATORS = ("reparam", "lrt", "flipout")
IDS = dict(weight_id=rng.param_id("l.weight"), bias_id=rng.param_id("l.bias"),
           noise_ids=(rng.param_id("l#in"), rng.param_id("l#out")))  # fmt: skip
KEY = NoiseKey(seed=11, step=3, first_sample=2, num_samples=3, data_offset=4)


def _params(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=dtype)
    rho = torch.randn(shape, generator=g, dtype=dtype) * 0.3 - 1.0
    bmu = torch.randn(shape[0], generator=g, dtype=dtype)
    brho = torch.randn(shape[0], generator=g, dtype=dtype) * 0.3 - 1.0
    return [t.requires_grad_() for t in (mu, rho, bmu, brho)]


def _call(layer, x, params, estimator, shared):
    if layer == "linear":
        return ops.bayes_linear(x, *params, KEY, estimator=estimator, shared_input=shared, **IDS)
    return ops.bayes_conv(x, *params, KEY, stride=(2, 1), padding=(1, 0), dilation=(1, 2),
                          groups=2, estimator=estimator, shared_input=shared, **IDS)  # fmt: skip


@pytest.mark.parametrize("layer", ["linear", "conv"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_shared_input_equals_the_folded_copy(layer, estimator):
    """``shared_input=True`` on ``(B, ...)`` gives the outputs and gradients of the same call
    on the input copied S times (fp64, so only summation order differs)."""
    S, B = KEY.num_samples, 2
    shape = (6, 5) if layer == "linear" else (4, 3, 3, 2)
    x_shape = (B, 5) if layer == "linear" else (B, 6, 5, 6)
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    params = _params(shape)
    y_shared = _call(layer, x, params, estimator, True)
    folded = x.unsqueeze(0).expand(S, *x.shape).flatten(0, 1)
    y_folded = _call(layer, folded, params, estimator, False)
    assert_close(y_shared, y_folded, msg="output")
    dy = torch.randn_like(y_folded)
    g_shared = torch.autograd.grad(y_shared, [x, *params], dy)
    g_folded = torch.autograd.grad(y_folded, [x, *params], dy)
    for name, a, b in zip(("x", "mu", "rho", "bias_mu", "bias_rho"), g_shared, g_folded,
                          strict=True):  # fmt: skip
        assert_close(a, b, reduction=S * B * 8, msg=name)


@pytest.mark.parametrize("layer", ["linear", "conv"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradcheck_every_estimator(layer, estimator):
    """fp64 gradcheck of the estimator composed from the torch primitives, folded and
    shared input."""
    shape = (3, 4) if layer == "linear" else (4, 2, 2, 2)
    for shared in (False, True):
        rows = 2 if shared else 2 * KEY.num_samples
        x_shape = (rows, 4) if layer == "linear" else (rows, 4, 4, 5)
        x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
        params = _params(shape, seed=1)
        assert torch.autograd.gradcheck(
            lambda *a, s=shared: _call(layer, a[0], a[1:], estimator, s), (x, *params)
        )


def test_integer_input_is_refused():
    mu, rho, bmu, brho = _params((3, 4), torch.float32)
    with pytest.raises(TypeError, match="floating-point.*int64"):
        ops.bayes_linear(torch.ones(3, 4, dtype=torch.int64), mu, rho, bmu, brho, KEY, **IDS)


def test_float64_input_into_float32_parameters_is_refused():
    """As ``nn.Linear`` refuses it, instead of returning float64."""
    mu, rho, bmu, brho = _params((3, 4), torch.float32)
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="x is torch.float64 but the layer's parameters are"):
        ops.bayes_linear(x, mu, rho, bmu, brho, KEY, **IDS)
    with pytest.raises(TypeError, match="x is torch.float64"):
        ops.bayes_conv(x.view(3, 4, 1), mu.view(3, 4, 1), rho.view(3, 4, 1), bmu, brho, KEY,
                       stride=1, padding=0, dilation=1, groups=1, **IDS)  # fmt: skip


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_low_precision_input_with_fp32_parameters_is_mixed_precision(estimator):
    mu, rho, bmu, brho = _params((3, 4), torch.float32)
    x = torch.randn(6, 4, dtype=torch.bfloat16)
    y = ops.bayes_linear(x, mu, rho, bmu, brho, KEY, estimator=estimator, **IDS)
    assert y.dtype == torch.bfloat16 and y.shape == (6, 3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(estimator="vi"), ValueError, "estimator must be one of"),
        (dict(noise_ids=(1,)), ValueError, "noise_ids must be two"),
        (dict(x=torch.randn(4, 4)), ValueError, "not divisible by num_samples=3"),
        (dict(x=torch.randn(6, 5)), ValueError, r"x must be \(S\*B, 4\)"),
        (dict(bias_rho=None), ValueError, "both be given"),
        (dict(weight_mu=torch.randn(4, 3)), ValueError, "weight_mu shape"),
        (dict(key=(11, 3, 2, 3)), TypeError, "key must be a spar.rng.NoiseKey"),
    ],
)
def test_bad_linear_calls_name_the_argument(kwargs, error, match):
    mu, rho, bmu, brho = _params((3, 4), torch.float32)
    args = dict(x=torch.randn(6, 4), weight_mu=mu, weight_rho=rho, bias_mu=bmu, bias_rho=brho,
                key=KEY, **IDS)  # fmt: skip
    args.update(kwargs)
    x, key = args.pop("x"), args.pop("key")
    p = [args.pop(k) for k in ("weight_mu", "weight_rho", "bias_mu", "bias_rho")]
    with pytest.raises(error, match=match):
        ops.bayes_linear(x, *p, key, **args)


def test_bad_conv_geometry():
    mu, rho, bmu, brho = _params((4, 2, 3, 3), torch.float32)
    x = torch.randn(6, 4, 5, 5)
    common = dict(padding=0, dilation=1, **IDS)
    with pytest.raises(ValueError, match="stride must be 2 ints"):
        ops.bayes_conv(x, mu, rho, bmu, brho, KEY, stride=(1, 1, 1), groups=2, **common)
    with pytest.raises(ValueError, match="groups=3 does not divide"):
        ops.bayes_conv(x, mu, rho, bmu, brho, KEY, stride=1, groups=3, **common)
    with pytest.raises(ValueError, match=r"x must be \(S\*B, 2"):
        ops.bayes_conv(x, mu, rho, bmu, brho, KEY, stride=1, groups=1, **common)
