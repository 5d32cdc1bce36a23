"""Bayesian ops: reference math, backends and the dispatcher that picks between them.

``bayes_linear`` and ``bayes_conv`` draw ``key.num_samples`` weight samples per call and
take the folded ``(S*B, ...)`` input; see :mod:`spar.ops.linear` and :mod:`spar.ops.conv`
for the memory-lean torch backend and :mod:`spar.ops.reference` for the math.

Under ``torch.compile`` each backend's work is a set of custom ops (namespace ``spar``,
:mod:`spar.ops.library`) with fake implementations: the compiled graph calls them as
opaque nodes. ``key.step`` may be an int or a 0-d int64 tensor; a tensor step (what the
layers pass) is read when the op runs, so a new step does not recompile. The backend is
resolved when the model is traced.
"""

from __future__ import annotations

from torch import Tensor

from spar.ops.dispatch import BackendUnavailable, available_backends, resolve
from spar.rng import NoiseKey

__all__ = ["bayes_linear", "bayes_conv", "BackendUnavailable", "available_backends", "NoiseKey"]


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
    ``shared_input``) -> ``(S*B, N)``. ``noise_ids`` are the param ids of the per-example
    noise of ``lrt`` (first) and ``flipout`` (input and output signs)."""
    _, fn = resolve("linear", x.device)
    return fn(
        x, weight_mu, weight_rho, bias_mu, bias_rho, key, weight_id=weight_id, bias_id=bias_id,
        estimator=estimator, shared_input=shared_input, noise_ids=noise_ids,
    )  # fmt: skip


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
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    estimator: str = "reparam",
    noise_ids: tuple[int, int] = (0, 0),
) -> Tensor:
    """S samples of a Bayesian N-d convolution: x ``(S*B, C, *spatial)`` ->
    ``(S*B, O, *spatial_out)``; numeric symmetric ``padding`` only."""
    _, fn = resolve("conv", x.device)
    return fn(
        x, weight_mu, weight_rho, bias_mu, bias_rho, key, weight_id=weight_id, bias_id=bias_id,
        stride=stride, padding=padding, dilation=dilation, groups=groups, estimator=estimator,
        noise_ids=noise_ids,
    )  # fmt: skip
