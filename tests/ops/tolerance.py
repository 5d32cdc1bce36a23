"""The tolerance policy of spar's op tests, in one place.

* fp32 / fp64 results: ``|actual - expected| <= atol + rtol * |expected|`` elementwise,
  with ``rtol`` torch's default for the dtype and ``atol`` torch's default grown with the
  reduction length ``n`` of the quantity (the number of terms summed into one element):
  the rounding error of a sum of ``n`` terms of size ~1 is bounded by ``n`` unit
  roundoffs, so ``atol = default_atol * n``. An inequality that holds in exact arithmetic
  (an entropy at most ``log C``) gets the same slack, one-sided (:func:`assert_at_most`).
* fp16 / bf16 results: the error of the result against an fp64 evaluation of the same math
  must be at most twice the error of the same torch math computed in that dtype, plus the
  default ``atol`` grown as above (flash-attention's rule): a kernel may round
  differently from torch, but not worse.
* Exact results (the same computation twice, bit for bit) are compared exactly
  (``torch.equal`` or ``rtol=0, atol=0``): exactness is stronger than any tolerance.
* Statistical checks (moments, Monte Carlo estimates) bound sampling error, not rounding:
  their ``n``-dependent bounds are part of the test, not of this policy.
* Grid invariance (design contract I3): a SampleParallel run on any grid equals the
  single-process MonteCarlo run with relative error ``|a - b| / |b|`` (norms over the whole
  tensor) at most :data:`GRID_INVARIANCE_RTOL`.
"""

from __future__ import annotations

import torch
from torch import Tensor

# torch.testing.assert_close defaults
RTOL = {torch.float64: 1e-7, torch.float32: 1.3e-6, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}
ATOL = {torch.float64: 1e-7, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
LOW_PRECISION = (torch.float16, torch.bfloat16)
LOWP_FACTOR = 2.0
# I3: "fp32 rel. error <= 1e-5" (norm of the difference over the norm of the reference)
# for parameters, gradients and predictions after training on any sample x data grid.
GRID_INVARIANCE_RTOL = 1e-5


def tolerances(dtype: torch.dtype, reduction: int = 1) -> tuple[float, float]:
    """``(rtol, atol)`` for results of ``dtype`` reduced over ``reduction`` terms."""
    return RTOL[dtype], ATOL[dtype] * max(1, int(reduction))


def assert_close(
    actual: Tensor, expected: Tensor, *, reduction: int = 1, dtype: torch.dtype | None = None,
    msg: str = "",
) -> None:  # fmt: skip
    """fp32/fp64 check (``dtype`` defaults to ``actual.dtype``)."""
    dtype = dtype or actual.dtype
    if dtype in LOW_PRECISION:
        raise ValueError("low-precision results need assert_close_lowp (an fp64 reference)")
    rtol, atol = tolerances(dtype, reduction)
    assert actual.shape == expected.shape, f"{msg}: shape {actual.shape} != {expected.shape}"
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol,
        msg=lambda m: f"{msg}: {m}" if msg else m,
    )  # fmt: skip


def assert_at_most(
    actual: Tensor, bound: Tensor | float, *, reduction: int = 1,
    dtype: torch.dtype | None = None, msg: str = "",
) -> None:  # fmt: skip
    """One-sided fp32/fp64 check of an inequality that holds in exact arithmetic (an entropy
    at most ``log C``, Jensen's): ``actual <= bound + atol + rtol * |bound|`` elementwise,
    the slack :func:`assert_close` allows."""
    dtype = dtype or actual.dtype
    if dtype in LOW_PRECISION:
        raise ValueError("low-precision results need assert_close_lowp (an fp64 reference)")
    rtol, atol = tolerances(dtype, reduction)
    bound = torch.as_tensor(bound, dtype=torch.float64)
    excess = actual.double() - (bound + atol + rtol * bound.abs())
    assert bool((excess <= 0).all()), f"{msg}: exceeds its bound by {float(excess.max()):.3g}"


def max_error(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def assert_close_lowp(
    actual: Tensor, ref64: Tensor, torch_lowp: Tensor, *, dtype: torch.dtype,
    reduction: int = 1, msg: str = "",
) -> None:  # fmt: skip
    """fp16/bf16 check: ``err(actual) <= 2 * err(torch_lowp) + atol(dtype, reduction)``,
    both errors max-abs against the fp64 reference ``ref64``."""
    assert actual.shape == ref64.shape, f"{msg}: shape {actual.shape} != {ref64.shape}"
    err = max_error(actual, ref64)
    base = max_error(torch_lowp, ref64)
    _, atol = tolerances(dtype, reduction)
    bound = LOWP_FACTOR * base + atol
    assert err <= bound, (
        f"{msg}: error {err:.3g} vs fp64 exceeds {LOWP_FACTOR:g} x torch {dtype} error "
        f"{base:.3g} + atol {atol:.3g}"
    )
