"""``Dropout`` whose masks come from the noise key, so that they do not depend on the grid.

torch's ``nn.Dropout`` draws its masks from the process's global generator: under sampling
parallelism each rank draws other masks than one process would for the same samples and
examples, and the result of a step depends on the ``sample x data`` grid (invariant I3
breaks). :class:`Dropout` keys its mask like the per-example noise of the ``lrt`` and
``flipout`` estimators: element ``j`` of example ``b`` under global sample ``s`` is kept
when the keyed normal ``eps[seed, step, param_id, s, data_offset + b, j]`` is at least
``Phi^-1(p)`` (the standard normal quantile), which happens with probability ``1 - p``.
Any rank, chunk or grid that evaluates that sample and example draws the same mask.
"""

from __future__ import annotations

from statistics import NormalDist

import torch
from torch import Tensor, nn

from spar import ops, rng
from spar.nn.layers import NoiseModule


class Dropout(NoiseModule, nn.Dropout):
    """``nn.Dropout`` with keyed masks (see the module docstring); a subclass of
    ``nn.Dropout``, so code that looks for dropout modules finds it.

    ``forward(x)``: in training mode, zeroes each element with probability ``p`` and scales
    the others by ``1 / (1 - p)``; in eval mode (or with ``p = 0``) it returns ``x``. Inside
    a sampling context ``x`` is the folded ``(S*B, ...)`` batch and every sample gets its
    own mask; the shared ``(B, ...)`` input of a layer in front of the first Bayesian layer
    (see :class:`spar.nn.MonteCarlo`) is expanded to the folded ``(S*B, ...)`` output, one
    mask per sample, as with ``fold_input=True``. Outside any context it draws one sample,
    with seed 0 and a per-module call counter as the step (like a Bayesian layer).

    The noise id is the hash of ``f"{noise_name}#dropout"``; the noise name is set like a
    Bayesian layer's (:func:`spar.nn.assign_noise_names`). ``inplace=True`` overwrites a
    folded input (a shared input is never overwritten: the output is larger). Autograd keeps
    the boolean mask, as torch's dropout does.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__(p, inplace)
        self._init_noise()

    @property
    def p(self) -> float:
        """The drop probability, in ``[0, 1]``."""
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {value!r}")
        self._p = float(value)
        # keep where eps >= threshold: P(eps < Phi^-1(p)) = p
        if value == 0:
            self._threshold = float("-inf")
        elif value == 1:
            self._threshold = float("inf")
        else:
            self._threshold = NormalDist().inv_cdf(value)

    def _compute_ids(self) -> dict:
        return dict(noise_id=rng.param_id(f"{self.noise_name}#dropout"))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self._p == 0:
            return x
        if not x.dtype.is_floating_point:
            raise TypeError(f"Dropout expects a floating-point tensor, got {x.dtype}")
        key, shared = self._key(x)
        ones = torch.ones(x.shape, dtype=torch.float32, device=x.device)
        # lrt_noise of a unit variance is the keyed per-example normal itself
        eps = ops.resolve("lrt_noise", x.device, torch.float32)(
            ones, key, self._ids()["noise_id"], int(shared)
        )
        keep = (eps >= self._threshold).unflatten(0, (key.num_samples, -1))
        scale = 0.0 if self._p == 1 else 1.0 / (1.0 - self._p)
        xs = x.unsqueeze(0) if shared else x.unflatten(0, (key.num_samples, -1))
        if self.inplace and not shared:
            return xs.mul_(scale).masked_fill_(~keep, 0).flatten(0, 1)
        return torch.where(keep, xs * scale, 0).flatten(0, 1)
