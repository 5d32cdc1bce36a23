"""``bayesianize``: turn the Linear and Conv layers of any model into Bayesian ones."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from spar.nn.layers import (
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesLinear,
    _check_estimator,
    _check_init_sigma,
    assign_noise_names,
)
from spar.nn.prior import GaussianPrior, PriorSpec

_CONV = {nn.Conv1d: BayesConv1d, nn.Conv2d: BayesConv2d, nn.Conv3d: BayesConv3d}


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def _convert(
    name: str, m: nn.Module, prior: PriorSpec, init_sigma: float, estimator: str
) -> nn.Module:
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
) -> nn.Module:
    """Replace every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` of ``model`` in place by its
    Bayesian counterpart; the existing weights and biases become the posterior means and
    every posterior std starts at ``init_sigma``.

    prior: a :class:`GaussianPrior` for all layers, or ``f(qualified_name, module)``
        returning a prior (or a ``{"weight": ..., "bias": ...}`` dict) per layer, e.g.
        :func:`spar.nn.pretrained_prior`. Default ``N(0, 1)``.
    estimator: the gradient estimator of every new layer: ``"reparam"``, ``"lrt"`` (local
        reparameterisation) or ``"flipout"``; :class:`spar.nn.MonteCarlo` can change it
        later (``estimator=``), as can each layer's ``estimator`` attribute.
    skip: qualified names of modules to leave deterministic (a name skips its children).

    Subclasses of Linear/Conv are left alone (their forward may do more than the base
    layer). Returns ``model`` (replaced when ``model`` itself is a Linear or Conv).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_init_sigma(init_sigma)
    _check_estimator(estimator)
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    known = {name for name, _ in model.named_modules()}
    unknown = [s for s in skip if s not in known]
    if unknown:
        raise ValueError(f"skip names {unknown} are not modules of the model")
    targets = (nn.Linear, *_CONV)
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
    for pname, p in m.named_parameters(recurse=False):
        if not bool(torch.isfinite(p).all()):
            raise ValueError(
                f"{name}.{pname} has non-finite values; they cannot become posterior means"
            )
