"""Registers the Triton implementations (CUDA tensors; CPU tensors under
``TRITON_INTERPRET=1``). Importing this module raises ``ImportError`` where triton is not
installed, which the dispatcher reports as "backend unavailable"."""

from __future__ import annotations

import triton  # noqa: F401 - fail here, cleanly, when triton is missing
from torch import Tensor

from spar.ops.dispatch import register
from spar.ops.linear_triton import bayes_linear_reparam
from spar.ops.lrt_flipout import linear_flipout, linear_lrt
from spar.rng import NoiseKey

ESTIMATORS = ("reparam", "lrt", "flipout")


def linear_triton(
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
    """Bayesian linear layer over ``key.num_samples`` samples, same contract (and same
    noise) as :func:`spar.ops.linear.linear_torch`: x ``(S*B, K)`` or shared ``(B, K)`` ->
    ``(S*B, N)``. ``reparam`` takes the fused or chunked path by
    :func:`spar.ops.linear_triton.choose_path` (``SPAR_LINEAR_PATH``)."""
    if estimator == "reparam":
        return bayes_linear_reparam(
            x, weight_mu, weight_rho, bias_mu, bias_rho, key, weight_id=weight_id,
            bias_id=bias_id, shared_input=shared_input,
        )  # fmt: skip
    if estimator == "lrt":
        return linear_lrt(
            x, weight_mu, weight_rho, bias_mu, bias_rho, key, noise_id=noise_ids[0],
            shared_input=shared_input,
        )  # fmt: skip
    if estimator == "flipout":
        return linear_flipout(
            x, weight_mu, weight_rho, bias_mu, bias_rho, key, weight_id=weight_id,
            bias_id=bias_id, noise_ids=noise_ids, shared_input=shared_input,
        )  # fmt: skip
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


register("linear", "triton", linear_triton)
