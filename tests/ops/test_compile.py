"""torch.compile of Bayesian models: the ops are custom ops whose fake implementations agree
with the real ones (``torch.library.opcheck``); ``torch.compile(MonteCarlo(model, S),
fullgraph=True)`` traces one graph that gives eager's outputs and gradients, and advancing
the step does not recompile (the step reaches the ops as a tensor)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.library import opcheck

import spar
from tests.ops.tolerance import assert_close

ESTIMATORS = ("reparam", "lrt", "flipout")
TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    # the backend is picked at trace time, from SPAR_BACKEND: every test traces afresh
    monkeypatch.setenv("SPAR_BACKEND", "torch")
    monkeypatch.delenv("SPAR_LINEAR_PATH", raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile(module: nn.Module) -> tuple[nn.Module, CompileCounterWithBackend]:
    """``torch.compile(module, fullgraph=True)`` (inductor) and a counter of the graphs it
    traced (the noise generator's own compiled loop is not counted)."""
    counter = CompileCounterWithBackend("inductor")
    return torch.compile(module, fullgraph=True, backend=counter), counter


def _grads(out: torch.Tensor, module: nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out.square().sum(), list(module.parameters())))


def _assert_same(
    a: torch.Tensor | list, b: torch.Tensor | list, reduction: int | list[int]
) -> None:
    """Compiled ``a`` against eager ``b`` (tensors or lists of them), the policy's fp32
    tolerance for ``reduction`` terms per element (one count, or one per tensor). The ops
    run the same code eager and compiled; only inductor's fusion of the elementwise glue
    (bias add, lrt's sqrt, the loss) can round differently."""
    a, b = (list(t) if isinstance(t, list | tuple) else [t] for t in (a, b))
    terms = reduction if isinstance(reduction, list) else [reduction] * len(a)
    for i, (u, v, n) in enumerate(zip(a, b, terms, strict=True)):
        assert_close(u, v, reduction=n, msg=f"tensor {i}")


def _grad_terms(module: nn.Module, rows: int, positions: int = 1) -> list[int]:
    """Terms summed into one element of each parameter's gradient: every sample's and
    example's ``rows``, times the output ``positions`` for a convolution's parameters."""
    conv = {n for n, m in module.named_modules() if isinstance(m, spar.nn.BayesConv2d)}
    return [rows * (positions if n.rpartition(".")[0] in conv else 1)
            for n, _ in module.named_parameters()]  # fmt: skip


def _train_and_compare(
    eager: nn.Module, x: torch.Tensor, steps: int, *, out_terms: int, grad_terms: list[int]
) -> None:
    """Train ``eager`` and a compiled copy side by side (SGD): outputs and gradients agree
    at every step, and only the first step compiles. ``out_terms``: the terms summed into
    one output element (the last layer's K); ``grad_terms``: into one element of each
    parameter's gradient (:func:`_grad_terms`)."""
    twin = copy.deepcopy(eager)
    compiled, counter = _compile(twin)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (twin, eager)]
    for _ in range(steps):
        y_c, y_e = compiled(x), eager(x)
        _assert_same(y_c, y_e, out_terms)
        for model, y, opt in zip((twin, eager), (y_c, y_e), opts, strict=True):
            for p, g in zip(model.parameters(), _grads(y, model), strict=True):
                p.grad = g
            opt.step()
        grads = [p.grad for p in twin.parameters()], [p.grad for p in eager.parameters()]
        _assert_same(*grads, grad_terms)
    assert counter.frame_count == 1, "recompiled as the step advanced"


# --- torch backend (CPU) ----------------------------------------------------------------


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, est in enumerate(ESTIMATORS):
        layers += [
            spar.nn.BayesConv2d(3 if i == 0 else 4, 4, 3, padding=1, groups=1 if i == 0 else 2,
                                init_sigma=0.1, estimator=est),
            nn.ReLU(),
        ]  # fmt: skip
    layers.append(nn.Flatten())
    for i, est in enumerate(ESTIMATORS):
        layers += [spar.nn.BayesLinear(4 * 5 * 5 if i == 0 else 6, 6, init_sigma=0.1,
                                       estimator=est), nn.ReLU()]  # fmt: skip
    return nn.Sequential(*layers[:-1])


@pytest.mark.slow  # compiles a six-layer model twice (train, eval)
def test_montecarlo_compiles_one_graph_matching_eager():
    """BayesConv2d and BayesLinear with every estimator: three training steps, one graph;
    then eval-mode predictions (the step stays put) agree too."""
    mc = spar.nn.MonteCarlo(_convnet(), 3, seed=5)
    x = torch.randn(2, 3, 5, 5)
    # the last layer sums K=6; the gradients S*B=6 rows (times 5x5 positions in a conv)
    _train_and_compare(mc, x, steps=3, out_terms=6, grad_terms=_grad_terms(mc, 3 * 2, 5 * 5))
    assert mc.step == 3
    twin = copy.deepcopy(mc).eval()
    compiled, _ = _compile(twin)
    mc.eval()
    with torch.no_grad():
        _assert_same(compiled(x), mc(x), 6)
        _assert_same(compiled(x), mc(x), 6)
    assert twin.step == 3


def test_compiled_model_inside_sampling_context():
    """Without MonteCarlo: a compiled model run inside ``spar.sampling(step=i)`` with int
    steps is traced once; changing ``num_samples`` retraces (it fixes shapes) instead of
    reusing a graph specialized to the old value."""
    torch.manual_seed(1)
    model = nn.Sequential(
        spar.nn.BayesLinear(4, 5, init_sigma=0.2),
        nn.Tanh(),
        spar.nn.BayesLinear(5, 2, init_sigma=0.2, estimator="flipout"),
    )
    spar.nn.assign_noise_names(model)
    compiled, counter = _compile(model)
    x = torch.randn(2 * 3, 4)
    for step in range(3):
        with spar.sampling(2, seed=9, step=step, data_offset=4):
            y_c, y_e = compiled(x), model(x)
        _assert_same(y_c, y_e, 5)  # the last layer sums K=5
        _assert_same(_grads(y_c, model), _grads(y_e, model), 2 * 3)  # the S*B rows
    assert counter.frame_count == 1
    with spar.sampling(3, seed=9, step=0):
        _assert_same(compiled(x), model(x), 5)
    assert counter.frame_count == 2


def test_compiled_layer_outside_context_draws_fresh_noise_per_call():
    """Outside any context a layer steps its own call counter: compiled, every call still
    draws a new sample, the same as eager, from one graph."""
    layer = spar.nn.BayesConv2d(2, 3, 3, init_sigma=0.5)
    compiled, counter = _compile(copy.deepcopy(layer))
    x = torch.randn(2, 2, 4, 4)
    outs = []
    for _ in range(3):
        outs.append(compiled(x))
        _assert_same(outs[-1], layer(x), 2 * 3 * 3)  # a 2x3x3 window
    assert not torch.allclose(outs[0], outs[1])
    assert counter.frame_count == 1


@pytest.mark.parametrize("generator", ["native", "eager"])
def test_noise_generator_runs_inside_the_compiled_graph(monkeypatch, generator):
    """Inside a custom op the CPU generator (native C library or eager torch) runs when the
    outer graph runs, not while it is traced."""
    monkeypatch.setenv("SPAR_RNG", generator)
    torch.manual_seed(2)
    layer = spar.nn.BayesLinear(8, 4, bias=False, init_sigma=0.2)
    mc = spar.nn.MonteCarlo(layer, 2)
    _train_and_compare(
        mc, torch.randn(3, 8), steps=2, out_terms=8, grad_terms=_grad_terms(mc, 2 * 3)
    )


def _opcheck_primitives(backend: str, device: torch.device) -> None:
    """Schema, fake implementation (shapes, dtypes, strides) and AOT dispatch of each of
    ``backend``'s primitives, forward and backward, fp32 and bf16 inputs."""
    ops = torch.ops.spar
    rand = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
    step, key = torch.tensor(7), [3, 1, 3, 5]  # seed, first_sample, num_samples, data_offset
    x, mu, rho, dy = rand(6, 5), rand(4, 5), rand(4, 5) - 1.0, rand(6, 4)

    def check(name, inputs, static, dy_, needs):
        opcheck(getattr(ops, f"{backend}_{name}").default, (inputs, step, key, static))
        bwd = getattr(ops, f"{backend}_{name}_backward").default
        opcheck(bwd, (dy_, inputs, step, key, static, needs))

    for xx, m, shared in ((x, mu, 0), (x[:2], mu, 1), (x, None, 0), (x.bfloat16(), mu, 0)):
        check("sampled_linear", [xx, m, rho], [11, shared], dy.to(xx.dtype), [True, True, True])
    check("sampled_linear", [x, mu, rho], [11, 0], dy, [False, False, True])
    v = rand(6, 3, 2).abs()
    for t, shared in ((v, 0), (v[:2], 1), (v.bfloat16(), 0)):
        dy_ = rand(6, 3, 2).to(t.dtype)
        check("lrt_noise", [t], [11, shared], dy_, [True])
        check("sign_mul", [t], [11, shared], dy_, [True])
    opcheck(getattr(ops, f"{backend}_normal").default, ([mu], step, key, [11, 2, 5]))


def test_torch_ops_pass_opcheck():
    import spar.ops.backends.torch  # noqa: F401 - registers the primitives

    _opcheck_primitives("torch", torch.device("cpu"))
    ops = torch.ops.spar
    step, key = torch.tensor(7), [3, 1, 3, 0]
    xc, wc, rc = torch.randn(6, 4, 5, 5), torch.randn(6, 2, 3, 3), torch.randn(6, 2, 3, 3) - 1.0
    for xx, shared in ((xc, 0), (xc[:2], 1)):
        static = [11, shared, 2, 2, 1, 1, 1, 1, 2]  # pid, shared, groups, stride, pad, dil
        opcheck(ops.torch_sampled_conv.default, ([xx, wc, rc], step, key, static))
        dyc = torch.randn(6, 6, 3, 3)
        assert ops.torch_sampled_conv([xx, wc, rc], step, key, static).shape == dyc.shape
        needs = [True, shared == 0, True]
        opcheck(ops.torch_sampled_conv_backward.default, (dyc, [xx, wc, rc], step, key, static,
                                                          needs))  # fmt: skip


# --- triton backend (CUDA; CPU tensors under TRITON_INTERPRET=1) --------------------------


def _triton_device() -> torch.device:
    from spar.ops.backends.triton._utils import interpret

    if interpret():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("the triton backend needs a GPU or TRITON_INTERPRET=1")
    return torch.device("cuda")


@pytest.mark.skipif(not TRITON, reason="triton is not installed")
@pytest.mark.parametrize("path", ["fused", "chunked"])
def test_triton_montecarlo_compiles_one_graph_matching_eager(monkeypatch, path):
    """The triton backend's ops (both reparam paths, lrt, flipout) in a compiled
    MonteCarlo: eager's outputs and gradients, one graph."""
    monkeypatch.setenv("SPAR_BACKEND", "triton")
    monkeypatch.setenv("SPAR_LINEAR_PATH", path)
    dev = _triton_device()
    torch.manual_seed(3)
    model = nn.Sequential(
        spar.nn.BayesLinear(5, 8, init_sigma=0.1, estimator="reparam"),
        nn.ReLU(),
        spar.nn.BayesLinear(8, 8, init_sigma=0.1, estimator="lrt"),
        nn.ReLU(),
        spar.nn.BayesLinear(8, 3, init_sigma=0.1, estimator="flipout"),
    ).to(dev)
    mc = spar.nn.MonteCarlo(model, 3, seed=5)
    x = torch.randn(2, 5, device=dev)
    _train_and_compare(mc, x, 2, out_terms=8, grad_terms=_grad_terms(mc, 3 * 2))  # K=8


@pytest.mark.skipif(not TRITON, reason="triton is not installed")
def test_triton_ops_pass_opcheck():
    """As for the torch primitives (sampled_conv falls back to torch)."""
    import spar.ops.backends.triton  # noqa: F401 - registers the primitives

    _opcheck_primitives("triton", _triton_device())
