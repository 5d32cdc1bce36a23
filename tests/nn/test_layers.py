"""Bayesian layers: exactness against the reference, gradients, statistics, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spar
from spar import rng
from spar.nn import BayesConv1d, BayesConv2d, BayesConv3d, BayesLinear
from spar.ops import reference as R
from tests.ops.tolerance import assert_close, assert_close_lowp

ESTIMATORS = ("reparam", "lrt", "flipout")


def _noise(layer, key, x_shape_per_example, out_shape_per_example, batch):
    """The noise a layer draws for ``key``, rebuilt from the documented layout."""
    ids = layer._ids()
    eps_w = key.normal(ids["weight_id"], layer.weight_mu.shape)
    eps_b = key.normal(ids["bias_id"], layer.bias_mu.shape) if layer.bias_mu is not None else None
    pe_in = key.normal(
        ids["noise_ids"][0], (batch, *x_shape_per_example), first_row=key.data_offset
    )
    pe_out = key.normal(
        ids["noise_ids"][1], (batch, *out_shape_per_example), first_row=key.data_offset
    )
    return eps_w, eps_b, pe_in.flatten(0, 1), pe_out.flatten(0, 1)


def _reference(layer, x, key, estimator, conv=None, **conv_kw):
    """The layer's output from the reference ops, in ``x``'s dtype (the noise too): the
    layer's parameters must have that dtype."""
    S = key.num_samples
    batch = x.shape[0] // S
    mu = layer.weight_mu
    with torch.no_grad():
        probe = R.conv_reparam(conv, x[:batch], mu, layer.weight_rho, None, None,
                               mu.new_zeros(1, *mu.shape), None, **conv_kw) \
            if conv else x[:batch, : 0].new_zeros(batch, layer.out_features)  # fmt: skip
    noise = _noise(layer, key, x.shape[1:], probe.shape[1:], batch)
    eps_w, eps_b, pe_in, pe_out = (None if t is None else t.to(x.dtype) for t in noise)
    args = (x, layer.weight_mu, layer.weight_rho, layer.bias_mu, layer.bias_rho)
    if estimator == "reparam":
        return R.conv_reparam(conv, *args, eps_w, eps_b, **conv_kw) if conv else \
            R.linear_reparam(*args, eps_w, eps_b)  # fmt: skip
    if estimator == "lrt":
        # lrt draws one normal per (sample, example, output unit) from its first stream
        eps_out = key.normal(layer._ids()["noise_ids"][0], (batch, *probe.shape[1:]),
                             first_row=key.data_offset).flatten(0, 1).to(x.dtype)  # fmt: skip
        return R.conv_lrt(conv, *args, eps_out, **conv_kw) if conv else R.linear_lrt(*args, eps_out)
    sign_in, sign_out = torch.sign(pe_in), torch.sign(pe_out)
    return R.conv_flipout(conv, *args, eps_w, eps_b, sign_in, sign_out, **conv_kw) if conv else \
        R.linear_flipout(*args, eps_w, eps_b, sign_in, sign_out)  # fmt: skip


GRAD_NAMES = ("x", "weight_mu", "weight_rho", "bias_mu", "bias_rho")


def _grads(y, x, layer, g):
    params = [x, layer.weight_mu, layer.weight_rho, layer.bias_mu, layer.bias_rho]
    return torch.autograd.grad(y, params, g)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("S,batch,K,N", [(1, 1, 1, 1), (2, 3, 17, 5), (7, 2, 9, 97)])
@pytest.mark.parametrize("chunk", [None, 1])
def test_linear_matches_reference(monkeypatch, estimator, S, batch, K, N, chunk):
    if chunk is not None:  # force one sample per chunk: the chunk loop must not matter
        monkeypatch.setenv("SPAR_CHUNK_NUMEL", str(chunk))
    torch.manual_seed(0)
    layer = BayesLinear(K, N, init_sigma=0.2, estimator=estimator)
    spar.nn.assign_noise_names(layer, prefix="net.fc")
    key = rng.NoiseKey(seed=7, step=3, first_sample=5, num_samples=S, data_offset=4)
    x = torch.randn(S * batch, K, requires_grad=True)
    with spar.sampling(S, seed=7, step=3, first_sample=5, data_offset=4):
        y = layer(x)
    y_ref = _reference(layer, x, key, estimator)
    assert_close(y, y_ref, reduction=K, msg="output")
    g = torch.randn_like(y)
    # terms per element: dx sums the N outputs, a parameter's gradient the S*batch rows
    red = (N, *[S * batch] * 4)
    for name, a, b, n in zip(GRAD_NAMES, _grads(y, x, layer, g), _grads(y_ref, x, layer, g),
                             red, strict=True):  # fmt: skip
        assert_close(a, b, reduction=n, msg=name)


CONVS = [
    (BayesConv1d, F.conv1d, dict(kernel_size=3, stride=2, padding=1), (5,)),
    (
        BayesConv2d,
        F.conv2d,
        dict(kernel_size=(3, 2), padding=(1, 0), dilation=(2, 1), groups=2),
        (6, 5),
    ),
    (BayesConv3d, F.conv3d, dict(kernel_size=2, stride=1), (3, 3, 3)),
]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("cls,conv,kw,spatial", CONVS)
def test_conv_matches_reference(monkeypatch, estimator, cls, conv, kw, spatial):
    monkeypatch.setenv("SPAR_CHUNK_NUMEL", "100")  # several chunks
    torch.manual_seed(1)
    S, batch, C, out_ch = 3, 2, 4, 6
    layer = cls(C, out_ch, **kw, init_sigma=0.3, estimator=estimator)
    spar.nn.assign_noise_names(layer, prefix="conv")
    key = rng.NoiseKey(seed=1, step=2, first_sample=0, num_samples=S, data_offset=8)
    x = torch.randn(S * batch, C, *spatial, requires_grad=True)
    with spar.sampling(S, seed=1, step=2, data_offset=8):
        y = layer(x)
    conv_kw = dict(stride=layer.stride, padding=layer._op_padding, dilation=layer.dilation,
                   groups=layer.groups)  # fmt: skip
    y_ref = _reference(layer, x, key, estimator, conv, **conv_kw)
    # terms per element: y sums a kernel window of C/groups channels, dx the windows of the
    # out_ch/groups output channels, a parameter's gradient every sample's and example's
    # output positions
    kernel = layer.weight_mu[0, 0].numel()
    red = ((out_ch // layer.groups) * kernel, *[S * batch * y[0, 0].numel()] * 4)
    assert_close(y, y_ref, reduction=(C // layer.groups) * kernel, msg="output")
    g = torch.randn_like(y)
    for name, a, b, n in zip(GRAD_NAMES, _grads(y, x, layer, g), _grads(y_ref, x, layer, g),
                             red, strict=True):  # fmt: skip
        assert_close(a, b, reduction=n, msg=name)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_gradcheck_float64(estimator, kind):
    torch.manual_seed(2)
    if kind == "linear":
        layer, x = BayesLinear(3, 4, init_sigma=0.5, estimator=estimator), torch.randn(6, 3)
    elif kind == "conv1d":
        layer = BayesConv1d(2, 2, 3, padding=1, init_sigma=0.5, estimator=estimator)
        x = torch.randn(4, 2, 4)
    else:
        layer = BayesConv2d(2, 2, 2, groups=2, init_sigma=0.5, estimator=estimator)
        x = torch.randn(4, 2, 3, 3)
    layer = layer.double()
    x = x.double().requires_grad_()
    params = (layer.weight_mu, layer.weight_rho, layer.bias_mu, layer.bias_rho)

    def f(x, *p):
        with spar.sampling(2, seed=3, step=1):
            return torch.func.functional_call(
                layer,
                dict(zip(("weight_mu", "weight_rho", "bias_mu", "bias_rho"), p, strict=True)),
                (x,),
            )

    assert torch.autograd.gradcheck(f, (x, *params))  # gradcheck's own fp64 defaults


def test_shared_input_equals_expanded():
    torch.manual_seed(3)
    layer = BayesLinear(6, 4, init_sigma=0.3)
    key = rng.NoiseKey(1, 1, 0, 5)
    ids = layer._ids()
    x = torch.randn(3, 6, requires_grad=True)
    y_shared = spar.ops.bayes_linear(x, layer.weight_mu, layer.weight_rho, layer.bias_mu,
                                     layer.bias_rho, key, shared_input=True, **ids)  # fmt: skip
    x_rep = x.unsqueeze(0).expand(5, 3, 6).reshape(15, 6)
    y_rep = spar.ops.bayes_linear(x_rep, layer.weight_mu, layer.weight_rho, layer.bias_mu,
                                  layer.bias_rho, key, **ids)  # fmt: skip
    torch.testing.assert_close(y_shared, y_rep)
    g = torch.randn_like(y_rep)
    # terms per element: the shared dx sums the N=4 outputs of all S=5 samples, a
    # parameter's gradient the S*B=15 rows
    red = (5 * 4, *[15] * 4)
    for name, a, b, n in zip(GRAD_NAMES, _grads(y_shared, x, layer, g),
                             _grads(y_rep, x, layer, g), red, strict=True):  # fmt: skip
        assert_close(a, b, reduction=n, msg=name)


def test_backward_saves_no_noise_or_weights():
    """I4 for the torch backend: what autograd keeps does not grow with S."""
    layer = BayesLinear(64, 64)
    sizes = {}
    for S in (1, 16):
        saved = []

        def pack(t, saved=saved):
            saved.append(t.numel())
            return t

        x = torch.randn(S * 2, 64)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with spar.sampling(S, seed=0, step=0):
                layer(x)
        sizes[S] = sum(saved) - x.numel()  # x itself is S-folded input, not noise
    # only the per-sample bias noise (S, N) is kept: vector-sized, never (S, N, K)
    assert sizes[16] - sizes[1] <= (16 - 1) * 64
    assert max(sizes.values()) <= 2 * 64 * 64 + 2 * 64 + 16 * 64  # params + bias noise


def test_sampled_weight_moments():
    """Columns of W_s read through identity inputs have mean mu and std sigma."""
    S, K, N = 4000, 4, 3
    layer = BayesLinear(K, N, bias=False, init_sigma=0.5)
    with torch.no_grad():
        layer.weight_rho.copy_(torch.linspace(-2, 1, K * N).view(N, K))
    x = torch.eye(K).repeat(S, 1)
    with torch.no_grad(), spar.sampling(S, seed=4, step=0):
        w = layer(x).view(S, K, N).transpose(1, 2)  # (S, N, K)
    mu, sig = layer.weight_mu.detach(), layer.sigma("weight").detach()
    # 5 standard errors: se(mean) = sigma/sqrt(S); se(std) ~ sigma/sqrt(2S)
    assert ((w.mean(0) - mu).abs() < 5 * sig / S**0.5).all()
    assert ((w.std(0) - sig).abs() < 5 * sig / (2 * S) ** 0.5).all()


@pytest.mark.parametrize("estimator", ["lrt", "flipout"])
def test_output_moments_match_reparam(estimator):
    """LRT and flipout outputs have the per-example mean and variance of reparam:
    mean x mu + b_mu, var x^2 sigma^2 + sigma_b^2."""
    torch.manual_seed(5)
    S, batch, K, N = 3000, 2, 5, 3
    layer = BayesLinear(K, N, init_sigma=0.4, estimator=estimator)
    x = torch.randn(batch, K)
    with torch.no_grad(), spar.sampling(S, seed=5, step=0):
        y = layer(x.repeat(S, 1)).view(S, batch, N)
    with torch.no_grad():
        mean = F.linear(x, layer.weight_mu, layer.bias_mu)
        var = F.linear(x * x, layer.sigma("weight") ** 2, layer.sigma("bias") ** 2)
    sd = var.sqrt()
    assert ((y.mean(0) - mean).abs() < 5 * sd / S**0.5).all()
    assert ((y.std(0) - sd).abs() < 5 * sd / (2 * S) ** 0.5 + 1e-6).all()


def test_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(6)
    prior = spar.nn.GaussianPrior(mean=0.1, std=0.7)
    layer = BayesLinear(4, 3, init_sigma=0.3, prior=prior)
    n = 20000
    with torch.no_grad():
        kl = float(layer.kl())
        mus = torch.cat([layer.weight_mu.flatten(), layer.bias_mu.flatten()]).double()
        sig = torch.cat([layer.sigma("weight").flatten(), layer.sigma("bias").flatten()]).double()
        w = mus + sig * torch.randn(n, mus.numel(), dtype=torch.float64)
        q = torch.distributions.Normal(mus, sig)
        p = torch.distributions.Normal(torch.tensor(0.1, dtype=torch.float64), 0.7)
        est = (q.log_prob(w) - p.log_prob(w)).sum(1)
    se = float(est.std()) / n**0.5
    assert abs(float(est.mean()) - kl) < 5 * se


def test_kl_divergence_sums_layers_and_tensor_prior():
    net = torch.nn.Sequential(BayesLinear(3, 4), torch.nn.ReLU(), BayesLinear(4, 2))
    total = spar.nn.kl_divergence(net)
    torch.testing.assert_close(total, net[0].kl() + net[2].kl())
    with pytest.warns(UserWarning, match="without Bayesian layers"):
        assert spar.nn.kl_divergence(torch.nn.Linear(2, 2)).item() == 0.0
    mean = torch.randn(2, 3)
    layer = BayesLinear(3, 2, prior={"weight": spar.nn.GaussianPrior(mean, 1.0)})
    with torch.no_grad():
        layer.weight_mu.copy_(mean)
        layer.bias_mu.zero_()
    # posterior centred on the prior: only the variance mismatch remains
    s = layer.init_sigma
    per = 0.5 * (s**2 - 1) - torch.log(torch.tensor(s))
    assert_close(layer.kl(), per * 8, reduction=8)  # a sum over the 8 parameters


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, "same", (2, 0)])
def test_conv_padding_modes_match_torch_when_sigma_vanishes(padding_mode, padding):
    torch.manual_seed(7)
    ref = torch.nn.Conv2d(3, 4, (2, 3), padding=padding, padding_mode=padding_mode)
    bayes = spar.nn.bayesianize(torch.nn.Sequential(ref), init_sigma=1e-12)[0]
    x = torch.randn(2, 3, 6, 7)
    with spar.sampling(2, seed=0, step=0):
        y = bayes(x.repeat(2, 1, 1, 1))
    expected = ref(x)
    window = 3 * 2 * 3  # terms per element: in_channels x kernel
    assert_close(y[:2], expected, reduction=window, msg="sample 0")
    assert_close(y[2:], expected, reduction=window, msg="sample 1")


def test_outside_sampling_context_draws_one_sample():
    layer = BayesLinear(3, 2, init_sigma=0.5)
    x = torch.randn(4, 3)
    a, b = layer(x), layer(x)
    assert a.shape == (4, 2)
    assert not torch.allclose(a, b)  # a fresh sample per call


def test_bad_input_errors():
    with pytest.raises(ValueError, match="init_sigma"):
        BayesLinear(2, 3, init_sigma=0.0)
    with pytest.raises(ValueError, match="init_sigma"):
        BayesConv2d(2, 3, 3, init_sigma=-1.0)
    with pytest.raises(TypeError, match="init_sigma"):
        BayesLinear(2, 3, init_sigma="big")
    with pytest.raises(ValueError, match="estimator"):
        BayesLinear(2, 3, estimator="vmap")
    with pytest.raises(ValueError, match="in_features"):
        BayesLinear(0, 3)
    with pytest.raises(ValueError, match="groups"):
        BayesConv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode"):
        BayesConv1d(3, 4, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="num_samples"):
        with spar.sampling(0, seed=0, step=0):
            pass
    with pytest.raises(ValueError, match=r"\(S\*B, 3\)"):
        BayesLinear(3, 2)(torch.randn(4, 5))
    with pytest.raises(ValueError, match="divisible by num_samples=3"):
        with spar.sampling(3, seed=0, step=0):
            BayesLinear(3, 2)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="does not broadcast"):
        BayesLinear(3, 2, prior=spar.nn.GaussianPrior(torch.zeros(5), 1.0))
    with pytest.raises(ValueError, match="std"):
        spar.nn.GaussianPrior(0.0, 0.0)
    with pytest.raises(ValueError, match="name"):
        BayesLinear(3, 2).sigma("gamma")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_integer_input_raises_type_error(estimator):
    """torch's dtype rule for nn.Linear / nn.Conv: a non-floating input is refused (a cast
    of the sampled weights to int64 would give all-zero outputs), in every estimator, folded
    or shared, and under MonteCarlo; a float input of another dtype than the parameters
    too (fp16/bf16 into fp32 is the one mixed case allowed)."""
    layers = (
        (BayesLinear(4, 3, estimator=estimator), (6, 4)),
        (BayesConv1d(2, 3, 3, estimator=estimator), (6, 2, 5)),
        (BayesConv2d(2, 3, 3, estimator=estimator), (6, 2, 5, 5)),
        (BayesConv3d(2, 3, 3, estimator=estimator), (6, 2, 4, 4, 4)),
    )
    for layer, shape in layers:
        spar.nn.assign_noise_names(layer)
        name = type(layer).__name__
        for dtype in (torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64):
            x = torch.ones(shape, dtype=dtype)
            with pytest.raises(TypeError, match=f"floating-point.*{dtype}.*x.float()"):
                layer(x)
            with pytest.raises(TypeError, match="floating-point"), spar.sampling(3, seed=0, step=0):
                layer(x)  # folded: S=3, B=2
            with pytest.raises(TypeError, match="floating-point"):
                spar.nn.MonteCarlo(layer, 3)(x)  # shared input
            assert layer.weight_mu.dtype == torch.float32, name
        with pytest.raises(TypeError, match="float64 but the layer's parameters are"):
            layer(torch.ones(shape, dtype=torch.float64))


def test_sigma_is_stable_for_extreme_rho():
    layer = BayesLinear(2, 2)
    with torch.no_grad():
        layer.weight_rho.copy_(torch.tensor([[-200.0, -30.0], [30.0, 200.0]]))
    s = layer.sigma("weight").detach()
    assert torch.isfinite(s).all() and (s >= 0).all()
    assert float(s[1, 1]) == 200.0
    rho = R.inverse_sigma(torch.tensor([1e-8, 1e-2, 1.0, 50.0]))
    torch.testing.assert_close(
        F.softplus(rho), torch.tensor([1e-8, 1e-2, 1.0, 50.0], dtype=torch.float64)
    )


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_keep_fp32_parameters(estimator, dtype):
    """fp16/bf16 inputs into fp32 layers: the outputs keep the input's dtype, the gradients
    the parameters'; both are at most twice as far from fp64 as torch's evaluation of the
    same math with every operand in that dtype (the policy's low-precision rule). Outputs
    of thousands of elements: the rule compares maximum errors, and among a few dozen
    elements one element's unlucky roundings (lrt: mean, noise and their sum, each
    rounded to bf16) can decide them."""
    torch.manual_seed(8)
    lin = BayesLinear(16, 64, init_sigma=0.1, estimator=estimator)
    conv = BayesConv2d(2, 8, 3, padding=1, init_sigma=0.1, estimator=estimator)
    lin.noise_name, conv.noise_name = "lin", "conv"  # two layers in one context: named
    x, z = torch.randn(32, 16).to(dtype), torch.randn(32, 2, 8, 8).to(dtype)  # S=2, B=16
    with spar.sampling(2, seed=1, step=0):
        y, w = lin(x), conv(z)
    assert y.dtype == dtype and w.dtype == dtype
    (y.float().square().sum() + w.float().square().sum()).backward()
    assert lin.weight_rho.grad.dtype == conv.weight_mu.grad.dtype == torch.float32
    ours = [y.detach(), w.detach(), lin.weight_rho.grad, conv.weight_mu.grad]

    key = rng.NoiseKey(seed=1, step=0, first_sample=0, num_samples=2)
    conv_kw = dict(stride=conv.stride, padding=conv._op_padding, dilation=conv.dilation,
                   groups=conv.groups)  # fmt: skip

    results = {}
    for dt in (torch.float64, dtype):
        lin_, conv_ = copy.deepcopy(lin).to(dt), copy.deepcopy(conv).to(dt)
        y_ = _reference(lin_, x.to(dt), key, estimator)
        w_ = _reference(conv_, z.to(dt), key, estimator, F.conv2d, **conv_kw)
        up = torch.float64 if dt == torch.float64 else torch.float32  # the loss, as above
        loss = y_.to(up).square().sum() + w_.to(up).square().sum()
        grads = torch.autograd.grad(loss, [lin_.weight_rho, conv_.weight_mu])
        results[dt] = [y_.detach(), w_.detach(), *grads]
    # terms per element: y sums K=16, w a 2x3x3 window, the gradients the S*B=32 rows (and
    # the conv's 8x8 output positions)
    reductions = (16, 2 * 3 * 3, 32, 32 * 8 * 8)
    names = ("linear output", "conv output", "linear grad rho", "conv grad mu")
    for name, a, ref64, lowp, n in zip(names, ours, results[torch.float64], results[dtype],
                                       reductions, strict=True):  # fmt: skip
        assert_close_lowp(a, ref64, lowp, dtype=dtype, reduction=n, msg=name)


def test_inverse_sigma_lives_in_nn():
    from spar.nn.prior import inverse_sigma

    s = torch.tensor([1e-8, 1e-2, 1.0, 50.0], dtype=torch.float64)
    torch.testing.assert_close(F.softplus(inverse_sigma(s)), s, rtol=1e-12, atol=0)
    torch.testing.assert_close(inverse_sigma(s), R.inverse_sigma(s))
    for v in (1e-6, 0.01, 3.0, 80.0):
        assert abs(float(F.softplus(torch.tensor(inverse_sigma(v), dtype=torch.float64))) - v) <= (
            1e-12 * v
        )
    with pytest.raises(ValueError, match="sigma must be > 0"):
        inverse_sigma(0.0)
    with pytest.raises(TypeError, match="sigma must be a float"):
        inverse_sigma("1")
    layer = BayesLinear(3, 2, init_sigma=0.03)
    torch.testing.assert_close(layer.sigma("bias"), torch.full((2,), 0.03))


def test_nn_takes_nothing_from_the_reference_ops():
    """spar.ops.reference is the test truth: the layers must not share code with it."""
    import ast
    import pathlib

    import spar.nn

    for path in pathlib.Path(spar.nn.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any("reference" in n for n in names), f"{path.name} imports {names}"


@pytest.mark.parametrize("estimator", ["reparam", "lrt", "flipout"])
def test_linear_takes_tokens_keyed_by_global_row(estimator):
    """(B, N, K) token inputs, like nn.Linear: the same as the (B*N, K) rows, and a data
    shard (examples 2-3 with data_offset 2) draws the rows' noise of the full batch."""
    torch.manual_seed(0)
    net = nn.Sequential(
        spar.nn.BayesLinear(6, 5, estimator=estimator, init_sigma=0.3),
        nn.Tanh(),
        spar.nn.BayesLinear(5, 4, estimator=estimator, init_sigma=0.3),
    )
    mc = spar.nn.MonteCarlo(net, num_samples=3, seed=1).eval()
    x = torch.randn(4, 7, 6)  # 4 examples of 7 tokens
    full = mc(x)
    assert full.shape == (3, 4, 7, 4)
    torch.testing.assert_close(full.reshape(3, 28, 4), mc(x.reshape(28, 6)))
    mc.data_offset = 2
    torch.testing.assert_close(mc(x[2:]), full[:, 2:])
    mc.data_offset = 0
    if estimator != "reparam":  # per-row noise: another offset gives other rows
        mc.data_offset = 1
        assert not torch.allclose(mc(x[2:]), full[:, 2:])
