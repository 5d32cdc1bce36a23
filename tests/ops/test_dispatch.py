"""The primitive registry: explicit requests raise with the reason, a backend that does not
serve a call (primitive or dtype) falls back to torch, SPAR_BACKEND is validated; and the
torch backend's noise generator per device type (Triton on CUDA, checked with a CUDA
``torch.device`` object, which needs no GPU, and by declaring CPU a Triton device)."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from spar.ops import dispatch
from spar.ops.backends.torch import generator
from tests.ops.tolerance import assert_close

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only its type is read: no GPU needed
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")


def test_auto_uses_torch_on_cpu(monkeypatch):
    monkeypatch.setenv("SPAR_BACKEND", "auto")
    for p in dispatch.PRIMITIVES:
        assert dispatch.backend_for(p, CPU) == "torch"
        assert callable(dispatch.resolve(p, CPU))


def test_torch_implements_every_primitive():
    assert dispatch.implemented("torch") == dispatch.PRIMITIVES


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("SPAR_BACKEND", "tpu")
    with pytest.raises(ValueError, match="SPAR_BACKEND must be one of auto, torch, triton, cuda"):
        dispatch.resolve("sampled_linear", CPU)


def test_unavailable_backend_raises_with_reason(monkeypatch):
    monkeypatch.setenv("SPAR_BACKEND", "cuda")
    with pytest.raises(dispatch.BackendUnavailable, match="SPAR_BACKEND=cuda cannot run"):
        dispatch.resolve("sampled_linear", CPU)


def _fake_backend(monkeypatch, primitive: str, dtypes) -> None:
    """Pretend that ``triton`` loads and serves ``primitive`` only for ``dtypes``."""
    monkeypatch.setitem(dispatch._LOAD_RESULTS, "triton", None)
    monkeypatch.setitem(dispatch._REGISTRY, (primitive, "triton"), lambda *a: None)
    monkeypatch.setitem(dispatch._DTYPES, (primitive, "triton"), dtypes)


def test_missing_primitive_falls_back_to_torch(monkeypatch):
    """A backend without a primitive: under SPAR_BACKEND=triton that primitive runs on
    torch, the others on Triton."""
    monkeypatch.setenv("SPAR_BACKEND", "triton")
    _fake_backend(monkeypatch, "sign_mul", None)
    monkeypatch.delitem(dispatch._REGISTRY, ("sampled_conv", "triton"), raising=False)
    assert dispatch.backend_for("sampled_conv", CPU) == "torch"
    assert dispatch.backend_for("sign_mul", CPU) == "triton"


def test_dtype_rule(monkeypatch):
    """A backend serves only its dtypes: ``auto`` on CUDA and an explicit backend both send
    other dtypes to torch; ``dtype=None`` does not filter."""
    _fake_backend(monkeypatch, "sampled_conv", frozenset({torch.float32}))
    _fake_backend(monkeypatch, "normal", None)
    for name in ("auto", "triton"):
        monkeypatch.setenv("SPAR_BACKEND", name)
        assert dispatch.backend_for("sampled_conv", CUDA, torch.float32) == "triton"
        assert dispatch.backend_for("sampled_conv", CUDA, None) == "triton"
        for dt in (torch.float64, torch.bfloat16, torch.float16):
            assert dispatch.backend_for("sampled_conv", CUDA, dt) == "torch", (name, dt)
            assert (
                dispatch.resolve("sampled_conv", CUDA, dt)
                is dispatch._REGISTRY[("sampled_conv", "torch")]
            )
        assert dispatch.backend_for("normal", CUDA, torch.float64) == "triton"
    monkeypatch.setenv("SPAR_BACKEND", "auto")
    assert dispatch.backend_for("sampled_conv", CPU, torch.float32) == "torch"


@needs_triton
def test_triton_backend_dtypes(monkeypatch):
    """What the Triton backend declares: fp32 parameters for the sampled primitives (its
    kernels refuse others), fp32/fp16/bf16 tensors for the per-example noise. An fp64
    model under ``auto`` on CUDA therefore runs on torch instead of failing in Triton."""
    fp = {torch.float32, torch.float16, torch.bfloat16}
    assert dispatch.served_dtypes("sampled_linear", "triton") == {torch.float32}
    assert dispatch.served_dtypes("sampled_conv", "triton") == {torch.float32}
    assert dispatch.served_dtypes("lrt_noise", "triton") == fp
    assert dispatch.served_dtypes("sign_mul", "triton") == fp
    assert dispatch.served_dtypes("normal", "triton") is None
    monkeypatch.setenv("SPAR_BACKEND", "auto")
    for p in ("sampled_linear", "sampled_conv", "lrt_noise", "sign_mul"):
        assert dispatch.backend_for(p, CUDA, torch.float32) == "triton", p
        assert dispatch.backend_for(p, CUDA, torch.float64) == "torch", p
    assert dispatch.backend_for("sampled_conv", CUDA, torch.bfloat16) == "torch"
    assert dispatch.backend_for("sign_mul", CUDA, torch.bfloat16) == "triton"


@needs_triton
def test_fp64_model_under_triton_runs_on_torch(monkeypatch):
    """An fp64 linear layer under SPAR_BACKEND=triton: no error, the torch backend's
    result (the Triton kernels take fp32 parameters only)."""
    from spar import ops, rng

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, generator=g)
    mu = torch.randn(4, 5, dtype=torch.float64, generator=g)
    rho = torch.full((4, 5), -2.0, dtype=torch.float64)
    key = rng.NoiseKey(seed=1, step=0, first_sample=0, num_samples=3)
    out = {}
    for name in ("triton", "torch"):
        monkeypatch.setenv("SPAR_BACKEND", name)
        for est in ("reparam", "lrt", "flipout"):
            out[name, est] = ops.bayes_linear(x, mu, rho, None, None, key, weight_id=3,
                                              bias_id=4, estimator=est)  # fmt: skip
    for est in ("reparam", "lrt", "flipout"):
        assert out["triton", est].dtype == torch.float64
        assert torch.equal(out["triton", est], out["torch", est]), est


# --- the torch backend's noise generator --------------------------------------------------


def test_torch_backend_generator_is_triton_on_cuda(monkeypatch):
    """On CUDA the torch backend's noise (sampler and per-example noise) comes from the
    Triton kernels, elsewhere from spar.rng."""
    assert generator.generator_for("cpu") == "rng"
    assert generator.sampler_for(CPU) is generator.RngSampler
    monkeypatch.setitem(dispatch._LOAD_RESULTS, "triton", None)
    assert generator.generator_for("cuda") == "triton"
    if HAS_TRITON:
        from spar.ops.backends.triton.sample import TritonSampler

        assert generator.sampler_for(CUDA) is TritonSampler
    # SPAR_RNG=eager: no Triton at all on CUDA (a machine where it imports but cannot launch)
    monkeypatch.setenv("SPAR_RNG", "eager")
    assert generator.generator_for("cuda") == "rng"
    assert generator.sampler_for(CUDA) is generator.RngSampler


def test_torch_backend_without_triton_warns_once_on_cuda(monkeypatch):
    """Where triton does not import, CUDA noise falls back to the eager spar.rng loop, with
    one warning that names the cost and the fix."""
    monkeypatch.setitem(dispatch._LOAD_RESULTS, "triton", "importing triton failed: gone")
    monkeypatch.setattr(generator, "_warned", False)
    with pytest.warns(RuntimeWarning, match=r"eager int64 Philox.*pip install triton"):
        assert generator.generator_for("cuda") == "rng"
    assert generator.sampler_for(CUDA) is generator.RngSampler
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert generator.generator_for("cuda") == "rng"  # once per process
    assert generator.generator_for("cpu") == "rng"


@needs_triton
def test_torch_backend_noise_routes_through_the_generator(monkeypatch):
    """The torch backend's per-example noise and keyed normals take the device's
    generator: with CPU declared a Triton device, the Triton kernel draws them."""
    from spar.ops.backends.torch import noise
    from spar.ops.backends.triton import noise as triton_noise
    from spar.rng import NoiseKey

    calls = []
    real = triton_noise.keyed_normal

    def spy(*args, **kw):
        calls.append(args[2])
        return real(*args, **kw)

    monkeypatch.setattr(triton_noise, "keyed_normal", spy)
    key = NoiseKey(seed=1, step=2, first_sample=0, num_samples=2, data_offset=3)
    x = torch.randn(4, 3, 5)
    eager = noise.sign_mul_forward(x, key, 9, 0), noise.normal_forward(x, key, 8, 6)
    assert calls == []
    monkeypatch.setattr(generator, "TRITON_DEVICE_TYPES", ("cuda", "cpu"))
    ours = noise.sign_mul_forward(x, key, 9, 0), noise.normal_forward(x, key, 8, 6)
    assert calls == [(2, 3, 5), (6,)]
    assert torch.equal(ours[0], eager[0])
    assert_close(ours[1], eager[1], msg="normals")


def test_register_rejects_unknown_names():
    with pytest.raises(ValueError, match="primitive must be one of"):
        dispatch.register("attention", "torch", lambda: None)
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.register("normal", "tpu", lambda: None)
