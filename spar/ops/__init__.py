"""Bayesian ops: one signature per layer type, each estimator written once.

:func:`bayes_linear` and :func:`bayes_conv` draw ``key.num_samples`` weight samples per
call. They validate their inputs (on every backend), then run the estimator, written here
once in terms of *primitives* that the backends supply (:mod:`spar.ops.dispatch` says
which backend runs each one, for the device and the dtype of the call;
:mod:`spar.ops.library` how a backend defines them):

``sampled_linear`` / ``sampled_conv``
    ``y_s = op(x_s, mu + softplus(rho) * eps_s)`` with the weights drawn from the noise key
    and never stored (``mu=None``: zero mean).
``lrt_noise``
    ``sqrt(var) * eps`` with per-example noise.
``sign_mul``
    ``x * sign(eps)`` with per-example noise (flipout's random signs).
``normal``
    keyed normals ``(S, *shape)`` (the per-sample biases).

The estimators (``d`` is the deterministic op, ``F.linear`` or ``F.convNd``):

* ``reparam``: ``sampled(x, mu, rho) + b_s``, one weight sample per Monte Carlo sample;
* ``lrt``: ``d(x, mu, b_mu) + lrt_noise(d(x^2, sigma^2, sigma_b^2))``, local
  reparameterization: the pre-activations are sampled, not the weights;
* ``flipout``: ``d(x, mu) + sign_mul(sampled(sign_mul(x, r), 0, rho), q) + b_s``, one
  weight perturbation per sample, decorrelated across examples by random signs.

Shapes: ``x`` is folded sample-major ``(S*B, ...)`` or, with ``shared_input``, one
``(B, ...)`` batch read by every sample (the first layer of a model): the deterministic
GEMMs then run on ``B`` rows only. The output is always ``(S*B, ...)``.

Under ``torch.compile`` every primitive is a custom op (namespace ``spar``) with a fake
implementation. ``key.step`` may be an int or a 0-d int64 tensor; a tensor step (what the
layers pass) is read when the op runs, so a new step does not recompile. The backend is
resolved when the model is traced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from spar.ops.dispatch import BackendUnavailable, available_backends, backend_for, resolve
from spar.rng import NoiseKey

__all__ = [
    "bayes_linear",
    "bayes_conv",
    "BackendUnavailable",
    "available_backends",
    "backend_for",
    "NoiseKey",
    "ESTIMATORS",
]

ESTIMATORS = ("reparam", "lrt", "flipout")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# --- validation ---------------------------------------------------------------------------


def _check_params(x: Tensor, weight_mu, weight_rho, bias_mu, bias_rho) -> None:
    """Dtypes, devices and shapes shared by every layer type (torch's dtype rules: the
    input has the parameters' dtype, or is fp16/bf16 with fp32 parameters, mixed
    precision)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"x must be a floating-point tensor, got {x.dtype} (Bayesian layers, like "
            "nn.Linear and nn.Conv, do not take integer input: convert it with x.float())"
        )
    if (bias_mu is None) != (bias_rho is None):
        raise ValueError("bias_mu and bias_rho must both be given or both be None")
    pdtype = weight_rho.dtype
    params = (("weight_mu", weight_mu), ("weight_rho", weight_rho), ("bias_mu", bias_mu),
              ("bias_rho", bias_rho))  # fmt: skip
    for name, t in params:
        if t is None:
            continue
        if t.dtype != pdtype or not t.dtype.is_floating_point:
            raise TypeError(f"{name} is {t.dtype}; all parameters must share one float dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if x.dtype != pdtype and not (x.dtype in _LOW_PRECISION and pdtype == torch.float32):
        raise TypeError(
            f"x is {x.dtype} but the layer's parameters are {pdtype}: convert the input "
            f"(x.to({pdtype})) or the layer (layer.to({x.dtype})); fp16/bf16 input with fp32 "
            "parameters is the one mixed case allowed"
        )
    if weight_mu.shape != weight_rho.shape:
        raise ValueError(
            f"weight_mu shape {tuple(weight_mu.shape)} != weight_rho shape "
            f"{tuple(weight_rho.shape)}"
        )
    N = weight_rho.shape[0]
    if bias_mu is not None and (bias_mu.shape != (N,) or bias_rho.shape != (N,)):
        raise ValueError(f"bias_mu and bias_rho must have shape ({N},)")


def _check_call(x: Tensor, key: NoiseKey, estimator: str, shared_input: bool, noise_ids) -> None:
    if not isinstance(key, NoiseKey):
        raise TypeError(f"key must be a spar.rng.NoiseKey, got {type(key).__name__}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if len(noise_ids) != 2:
        raise ValueError(f"noise_ids must be two parameter ids, got {noise_ids!r}")
    S = key.num_samples
    if not shared_input and x.shape[0] % S:
        raise ValueError(
            f"x has {x.shape[0]} rows, not divisible by num_samples={S}: pass the folded "
            "(S*B, ...) batch, or shared_input=True for one (B, ...) batch shared by all samples"
        )


# --- the estimators, written once -----------------------------------------------------------


def _fold_add(folded: Tensor, t: Tensor, S: int, shared: bool) -> Tensor:
    """``folded (S*B, ...) + t`` where ``t`` is folded too, or shared ``(B, ...)``."""
    if not shared:
        return folded + t
    return (folded.unflatten(0, (S, -1)) + t).flatten(0, 1)


def _add_bias(y: Tensor, bias_mu, bias_rho, key: NoiseKey, bias_id: int) -> Tensor:
    """``y (S*B, N, ...) + b_s`` with per-sample biases ``b_s = mu + sigma * eps_s`` (small:
    plain autograd through the keyed normals)."""
    if bias_mu is None:
        return y
    eps = resolve("normal", y.device, bias_rho.dtype)(bias_mu, key, bias_id, *bias_mu.shape)
    b = torch.addcmul(bias_mu, F.softplus(bias_rho), eps.to(bias_mu.dtype)).to(y.dtype)
    S, N = b.shape
    b = b.view(S, 1, N, *([1] * (y.dim() - 2)))
    return (y.unflatten(0, (S, -1)) + b).flatten(0, 1)


def _estimate(
    det: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    sampled: Callable,
    static: tuple[int, ...],
    x: Tensor,
    weight_mu: Tensor,
    weight_rho: Tensor,
    bias_mu: Tensor | None,
    bias_rho: Tensor | None,
    key: NoiseKey,
    weight_id: int,
    bias_id: int,
    estimator: str,
    shared: bool,
    noise_ids: Sequence[int],
) -> Tensor:
    """The three estimators for any layer type: ``det(x, w, b)`` is the deterministic op
    (parameters cast to x's dtype), ``sampled(x, mu, rho, key, pid, shared, *static)`` the
    layer's sampled primitive (resolved for the parameters' dtype)."""
    S, dt, dev = key.num_samples, x.dtype, x.device
    if estimator == "reparam":
        y = sampled(x, weight_mu, weight_rho, key, weight_id, int(shared), *static)
        return _add_bias(y, bias_mu, bias_rho, key, bias_id)
    if estimator == "lrt":
        var_b = None if bias_rho is None else F.softplus(bias_rho).square().to(dt)
        mean = det(x, weight_mu.to(dt), None if bias_mu is None else bias_mu.to(dt))
        var = det(x * x, F.softplus(weight_rho).square().to(dt), var_b)
        noise = resolve("lrt_noise", dev, var.dtype)(var, key, noise_ids[0], int(shared))
        return _fold_add(noise, mean, S, shared)
    # flipout
    sign_mul = resolve("sign_mul", dev, dt)
    x_in = sign_mul(x, key, noise_ids[0], int(shared))
    pert = sampled(x_in, None, weight_rho, key, weight_id, 0, *static)
    base = det(x, weight_mu.to(dt), None)
    y = _fold_add(sign_mul(pert, key, noise_ids[1], 0), base, S, shared)
    return _add_bias(y, bias_mu, bias_rho, key, bias_id)


# --- the public ops -----------------------------------------------------------------------


def bayes_linear(
    x: Tensor,
    weight_mu: Tensor,
    weight_rho: Tensor,
    bias_mu: Tensor | None,
    bias_rho: Tensor | None,
    key: NoiseKey,
    *,
    weight_id: int,
    bias_id: int,
    estimator: str = "reparam",
    shared_input: bool = False,
    noise_ids: tuple[int, int] = (0, 0),
) -> Tensor:
    """S samples of a Bayesian linear layer: x ``(S*B, K)`` (or ``(B, K)`` with
    ``shared_input``) -> ``(S*B, N)``. ``weight_id``/``bias_id`` are the parameters' noise
    ids; ``noise_ids`` those of the per-example noise (``lrt``: the first; ``flipout``: input
    and output signs)."""
    _check_params(x, weight_mu, weight_rho, bias_mu, bias_rho)
    if weight_rho.dim() != 2:
        raise ValueError(f"weight_rho must be 2-D (N, K), got shape {tuple(weight_rho.shape)}")
    if x.dim() != 2 or x.shape[1] != weight_rho.shape[1]:
        raise ValueError(
            f"x must be (S*B, {weight_rho.shape[1]}) or shared (B, {weight_rho.shape[1]}), "
            f"got shape {tuple(x.shape)}"
        )
    _check_call(x, key, estimator, shared_input, noise_ids)
    sampled = resolve("sampled_linear", x.device, weight_rho.dtype)
    return _estimate(
        F.linear, sampled, (), x, weight_mu, weight_rho, bias_mu, bias_rho, key, weight_id,
        bias_id, estimator, shared_input, noise_ids,
    )  # fmt: skip


def _conv_geometry(nd: int, stride, padding, dilation, groups) -> tuple[tuple[int, ...], ...]:
    out = []
    for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        v = tuple(v) if isinstance(v, Sequence) else (v,) * nd
        if len(v) != nd or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            raise ValueError(f"{name} must be {nd} ints (numeric, symmetric), got {v!r}")
        if any(i < (0 if name == "padding" else 1) for i in v):
            raise ValueError(f"{name} must be {'>= 0' if name == 'padding' else '>= 1'}: {v!r}")
        out.append(v)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    return tuple(out)


def bayes_conv(
    x: Tensor,
    weight_mu: Tensor,
    weight_rho: Tensor,
    bias_mu: Tensor | None,
    bias_rho: Tensor | None,
    key: NoiseKey,
    *,
    weight_id: int,
    bias_id: int,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    estimator: str = "reparam",
    shared_input: bool = False,
    noise_ids: tuple[int, int] = (0, 0),
) -> Tensor:
    """S samples of a Bayesian N-d convolution (N = 1, 2, 3): x ``(S*B, C, *spatial)`` (or
    ``(B, C, *spatial)`` with ``shared_input``) -> ``(S*B, O, *spatial_out)``; numeric,
    symmetric ``padding`` only (the layers apply padding modes and ``"same"`` first)."""
    _check_params(x, weight_mu, weight_rho, bias_mu, bias_rho)
    nd = weight_rho.dim() - 2
    if nd not in _CONV:
        raise ValueError(f"weight_rho must be (O, C/groups, *kernel) with 1-3 kernel dims, got "
                         f"shape {tuple(weight_rho.shape)}")  # fmt: skip
    geometry = _conv_geometry(nd, stride, padding, dilation, groups)
    out_channels, c_per_group = weight_rho.shape[:2]
    if out_channels % groups:
        raise ValueError(f"groups={groups} does not divide the {out_channels} output channels")
    if x.dim() != nd + 2 or x.shape[1] != c_per_group * groups:
        raise ValueError(
            f"x must be (S*B, {c_per_group * groups}, {nd} spatial dims), got shape "
            f"{tuple(x.shape)}"
        )
    _check_call(x, key, estimator, shared_input, noise_ids)
    stride, padding, dilation = geometry
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    conv = _CONV[nd]
    sampled = resolve("sampled_conv", x.device, weight_rho.dtype)
    return _estimate(
        lambda x_, w, b: conv(x_, w, b, **kw), sampled,
        (groups, *stride, *padding, *dilation), x, weight_mu, weight_rho, bias_mu, bias_rho,
        key, weight_id, bias_id, estimator, shared_input, noise_ids,
    )  # fmt: skip
