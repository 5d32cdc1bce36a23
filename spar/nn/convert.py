"""``bayesianize``: turn the Linear and Conv layers of any model into Bayesian ones, and its
BatchNorm and Dropout into their sample-wise versions."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from spar.nn.dropout import Dropout
from spar.nn.layers import (
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesLinear,
    _check_estimator,
    _check_init_sigma,
    assign_noise_names,
)
from spar.nn.norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from spar.nn.prior import GaussianPrior, PriorSpec

_CONV = {nn.Conv1d: BayesConv1d, nn.Conv2d: BayesConv2d, nn.Conv3d: BayesConv3d}
_SAMPLE_WISE = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.Dropout: Dropout,
}


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def _sample_wise(m: nn.Module) -> nn.Module:
    """The sample-wise version of a torch BatchNorm or Dropout, with its state."""
    if type(m) is nn.Dropout:
        new = Dropout(m.p, m.inplace)
    else:
        ref = next((t for t in m.state_dict().values() if t.is_floating_point()), None)
        new = _SAMPLE_WISE[type(m)](
            m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
            device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype,
        )  # fmt: skip
        new.load_state_dict(m.state_dict())
    new.train(m.training)
    return new


def _convert(
    name: str, m: nn.Module, prior: PriorSpec, init_sigma: float, estimator: str
) -> nn.Module:
    if type(m) in _SAMPLE_WISE:
        return _sample_wise(m)
    layer_prior = (
        prior(name, m) if callable(prior) and not isinstance(prior, GaussianPrior) else prior
    )
    common = dict(
        prior=layer_prior, init_sigma=init_sigma, estimator=estimator, device=m.weight.device
    )
    if type(m) is nn.Linear:
        new = BayesLinear(m.in_features, m.out_features, m.bias is not None, **common)
    else:
        padding = m.padding if isinstance(m.padding, str) else tuple(m.padding)
        new = _CONV[type(m)](
            m.in_channels, m.out_channels, m.kernel_size, m.stride, padding, m.dilation,
            m.groups, m.bias is not None, m.padding_mode, **common,
        )  # fmt: skip
    with torch.no_grad():
        new.weight_mu.copy_(m.weight)
        if m.bias is not None:
            new.bias_mu.copy_(m.bias)
    new.train(m.training)
    return new


def bayesianize(
    model: nn.Module,
    *,
    prior: PriorSpec = None,
    init_sigma: float = 1e-2,
    estimator: str = "reparam",
    skip: Iterable[str] = (),
    sample_wise: bool = True,
) -> nn.Module:
    """Replace every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` of ``model`` in place by its
    Bayesian counterpart; the existing weights and biases become the posterior means and
    every posterior std starts at ``init_sigma``. With ``sample_wise`` (the default), also
    replace every ``nn.BatchNorm1d/2d/3d`` by :class:`spar.nn.BatchNorm1d` (``2d``, ``3d``)
    and every ``nn.Dropout`` by :class:`spar.nn.Dropout`, keeping their arguments and state
    (parameters, running statistics, train/eval flag): each Monte Carlo sample then has its
    own batch statistics and dropout masks, keyed like the weight noise (invariant I3).

    prior: a :class:`GaussianPrior` for all layers, or ``f(qualified_name, module)``
        returning a prior (or a ``{"weight": ..., "bias": ...}`` dict) per layer, e.g.
        :func:`spar.nn.pretrained_prior`. Default ``N(0, 1)``.
    estimator: the gradient estimator of every new layer: ``"reparam"``, ``"lrt"`` (local
        reparameterisation) or ``"flipout"``; :class:`spar.nn.MonteCarlo` can change it
        later (``estimator=``), as can each layer's ``estimator`` attribute.
    skip: qualified names of modules to leave as they are (a name skips its children).
    sample_wise: ``False`` leaves BatchNorm and Dropout modules as they are.

    Subclasses of these layers are left alone (their forward may do more than the base
    layer). Returns ``model`` (replaced when ``model`` itself is one of these layers).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_init_sigma(init_sigma)
    _check_estimator(estimator)
    if not isinstance(sample_wise, bool):
        raise TypeError(f"sample_wise must be a bool, got {type(sample_wise).__name__}")
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    known = {name for name, _ in model.named_modules()}
    unknown = [s for s in skip if s not in known]
    if unknown:
        raise ValueError(f"skip names {unknown} are not modules of the model")
    targets = (nn.Linear, *_CONV, *(_SAMPLE_WISE if sample_wise else ()))
    if type(model) in targets:
        _check_finite(type(model).__name__, model)
        new = _convert("", model, prior, init_sigma, estimator)
        assign_noise_names(new)
        return new
    todo = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if type(child) in targets and not _skipped(full, skip):
                todo.append((module, child_name, full, child))
    # check everything before replacing anything: a refused model stays as it was
    for _, _, full, child in todo:
        _check_finite(full, child)
    for module, child_name, full, child in todo:
        setattr(module, child_name, _convert(full, child, prior, init_sigma, estimator))
    assign_noise_names(model)
    return model


def _check_finite(name: str, m: nn.Module) -> None:
    if type(m) in _SAMPLE_WISE:
        return
    for pname, p in m.named_parameters(recurse=False):
        if not bool(torch.isfinite(p).all()):
            raise ValueError(
                f"{name}.{pname} has non-finite values; they cannot become posterior means"
            )
