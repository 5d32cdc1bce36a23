"""Drop-in Bayesian layers: mean-field Gaussian posteriors over weights and biases.

Each parameter ``p`` has a posterior ``N(p_mu, softplus(p_rho)^2)``. A layer reads the
number of samples ``S`` and the noise key from the active :func:`spar.sampling` context,
takes the folded input ``(S*B, ...)`` and returns ``(S*B, ...)`` (a tensor, never a
tuple; the KL term is :meth:`BayesModule.kl` / :func:`spar.nn.kl_divergence`). When the
context carries a per-sample ``batch_size`` B (:class:`spar.nn.MonteCarlo` sets it), an
input of exactly B rows is shared by all S samples: the op runs with ``shared_input=True``
(the GEMMs of ``lrt``/``flipout`` run on B rows) and the output is folded ``(S*B, ...)``.

Noise names. A layer's noise is a function of the sampling key and of its
:attr:`~BayesModule.noise_name` only. :class:`spar.nn.MonteCarlo`, :func:`spar.nn.bayesianize`,
``SampleParallel`` and :func:`assign_noise_names` set it to the layer's qualified name in
the model, so distinct layers draw independent noise. A layer nobody named uses the fixed
name ``""`` (the name :func:`assign_noise_names` gives a bare layer), whatever was built
before it; two *different* unnamed layers running in one sampling context would therefore
draw the same noise, and the second one raises a ``ValueError`` that says how to name them.

Outside any sampling context a layer draws one sample (``S = 1``) with seed 0 and a
per-layer call counter as the step, so plain ``model(x)`` stays stochastic and
reproducible; use :class:`spar.nn.MonteCarlo` for real work (there is no shared context
to check names in, so unnamed layers of one model are correlated there).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _ntuple, _reverse_repeat_tuple

from spar import ops, rng
from spar.nn.prior import GaussianPrior, inverse_sigma, kl_from_rho
from spar.nn.sampling import SamplingState, current_sampling

ESTIMATORS = ("reparam", "lrt", "flipout")


def _check_init_sigma(init_sigma: float) -> float:
    if isinstance(init_sigma, bool) or not isinstance(init_sigma, (int, float)):
        raise TypeError(f"init_sigma must be a float, got {type(init_sigma).__name__}")
    if not (init_sigma > 0 and math.isfinite(init_sigma)):
        raise ValueError(f"init_sigma must be finite and > 0, got {init_sigma}")
    return float(init_sigma)


def _check_estimator(estimator: str) -> str:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return estimator


class NoiseModule:
    """Mixin of the modules whose randomness comes from the noise key (invariant I1): the
    Bayesian layers and :class:`spar.nn.Dropout`. It holds the module's noise name, reads
    the active sampling context, checks the folded layout of the input and builds the
    call's :class:`~spar.rng.NoiseKey`. Subclasses define :meth:`_compute_ids` (the noise
    ids their draws use, hashed from the name)."""

    def _init_noise(self) -> None:
        # set from the qualified name by MonteCarlo / bayesianize / SampleParallel; until
        # then a fixed name, so the noise never depends on what was built before the module
        self._named = False
        self._noise_name = ""
        self._id_kw = self._compute_ids()
        # the step outside any sampling context: a CPU tensor (not a buffer, not in
        # state_dict), so that a compiled module reads it as data
        self._calls = torch.zeros((), dtype=torch.int64)

    def _compute_ids(self) -> dict:
        raise NotImplementedError

    @property
    def noise_name(self) -> str:
        """The name the noise key's parameter ids derive from: the qualified name in the
        model (set by :class:`~spar.nn.MonteCarlo`, :func:`~spar.nn.bayesianize`,
        ``SampleParallel`` or :func:`assign_noise_names`), ``""`` until it is set."""
        return self._noise_name

    @noise_name.setter
    def noise_name(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"noise_name must be a str, got {type(value).__name__}")
        self._noise_name = value
        self._named = True
        self._id_kw = self._compute_ids()

    def _ids(self) -> dict:
        """The parameter ids of this module's noise, computed when the name (or a Bayesian
        layer's estimator) is set (hashing strings is not traceable by torch.compile)."""
        return self._id_kw

    def _state(self) -> SamplingState:
        state = current_sampling()
        if state is None:
            state = SamplingState(1, 0, self._calls)  # the ops take the step modulo 2**32
            # a new tensor, not an in-place add: inductor (torch 2.13) may recompute the
            # state's copy of the step from this tensor for backward, after the add
            self._calls = self._calls + 1
        return state

    def _key(self, x: Tensor) -> tuple[rng.NoiseKey, bool]:
        """The noise key of this call and whether ``x`` is a shared (un-expanded) input."""
        state = self._state()
        if not self._named and not torch.compiler.is_compiling():
            self._claim_unnamed(state)
        shared = _shared_input(x, state, type(self).__name__)
        if state.batch_size is not None and not state.folded and not torch.compiler.is_compiling():
            state.folded.append(True)
        key = rng.NoiseKey(
            state.seed,
            state.step_tensor,
            state.first_sample,
            state.num_samples,
            state.data_offset,
        )
        return key, shared

    def _claim_unnamed(self, state: SamplingState) -> None:
        unnamed = state.unnamed
        unnamed.add(id(self))
        if len(unnamed) > 1:
            raise ValueError(
                f"two different unnamed Bayesian layers (or spar.nn.Dropout modules) ran in "
                f"one sampling context (this one: {type(self).__name__}); they would draw the "
                "same noise. Name them after their place in the model: wrap it in "
                "spar.nn.MonteCarlo, convert it with spar.nn.bayesianize, or call "
                "spar.nn.assign_noise_names(model) once (or set each module's noise_name)"
            )


def _shared_input(x: Tensor, state: SamplingState | None, who: str) -> bool:
    """Whether ``x`` is the shared ``(B, ...)`` batch of all samples of ``state`` (True)
    or the folded ``(S*B, ...)`` one (False); raises a ``ValueError`` for any other
    leading dimension. Outside a sampling context (``state=None``) every input is one
    sample's batch (False)."""
    if state is None:
        return False
    S, B = state.num_samples, state.batch_size
    rows = x.shape[0] if x.dim() else None
    shared = S > 1 and B is not None and rows == B
    # before any noise module has folded the batch, an input that is not the B shared
    # rows means the model changed the batch axis (e.g. a reshape): treating it as folded
    # would give S identical samples, silently
    unfolded = B is not None and not state.folded and not torch.compiler.is_compiling()
    if not shared and (rows is None or rows % S != 0 or (unfolded and rows != B)):
        msg = (
            f"{who}: input's leading dimension ({'scalar' if rows is None else rows}) must "
            f"be divisible by num_samples={S}: inside a sampling context layers take the "
            "folded (S*B, ...) batch"
        )
        if B is not None:
            msg += (
                f", or the B={B} rows of the input shared by all samples; if the model "
                "changes the batch axis before this layer, use "
                "MonteCarlo(..., fold_input=True)"
            )
        raise ValueError(msg)
    return shared


class BayesModule(NoiseModule, nn.Module):
    """Base of spar's Bayesian layers: parameters ``{name}_mu`` / ``{name}_rho`` for each
    name in ``bayes_names``, priors as buffers, a stable noise name, and the KL term."""

    bayes_names: tuple[str, ...] = ()

    def _init_bayes(self, prior, init_sigma: float, estimator: str) -> None:
        self.init_sigma = _check_init_sigma(init_sigma)
        self._estimator = _check_estimator(estimator)
        self._init_noise()
        self._set_priors(prior)

    @property
    def estimator(self) -> str:
        return self._estimator

    @estimator.setter
    def estimator(self, value: str) -> None:
        self._estimator = _check_estimator(value)
        self._id_kw = self._compute_ids()

    def _set_priors(self, prior) -> None:
        priors = prior if isinstance(prior, dict) else {}
        if prior is None:
            prior = GaussianPrior()
        for name in self.bayes_names:
            p = priors.get(name, GaussianPrior()) if isinstance(prior, dict) else prior
            if not isinstance(p, GaussianPrior):
                raise TypeError(f"prior must be a GaussianPrior or a dict of them, got {p!r}")
            shape = getattr(self, f"{name}_mu").shape
            for part in ("mean", "std"):
                value = getattr(p, part)
                try:
                    torch.broadcast_shapes(value.shape, shape)
                except RuntimeError:
                    raise ValueError(
                        f"prior {part} of shape {tuple(value.shape)} does not broadcast to "
                        f"{name} of shape {tuple(shape)}"
                    ) from None
                self.register_buffer(f"{name}_prior_{part}", value.clone())

    def sigma(self, name: str = "weight") -> Tensor:
        """Posterior std ``softplus(rho)`` of parameter ``name`` ("weight" or "bias")."""
        if name not in self.bayes_names:
            raise ValueError(f"name must be one of {self.bayes_names}, got {name!r}")
        return F.softplus(getattr(self, f"{name}_rho"))

    def kl(self) -> Tensor:
        """Closed-form ``KL(q || prior)`` summed over this layer's Bayesian parameters."""
        total = 0.0
        for name in self.bayes_names:
            total = total + kl_from_rho(
                getattr(self, f"{name}_mu"),
                getattr(self, f"{name}_rho"),
                getattr(self, f"{name}_prior_mean"),
                getattr(self, f"{name}_prior_std"),
            )
        return total

    def _reset_bayes(self, weight_fan_in: int) -> None:
        # posterior means as torch initializes the deterministic layer; sigmas at init_sigma
        nn.init.kaiming_uniform_(self.weight_mu, a=math.sqrt(5))
        if "bias" in self.bayes_names:
            bound = 1 / math.sqrt(weight_fan_in) if weight_fan_in > 0 else 0.0
            nn.init.uniform_(self.bias_mu, -bound, bound)
        rho = float(inverse_sigma(self.init_sigma))
        for name in self.bayes_names:
            nn.init.constant_(getattr(self, f"{name}_rho"), rho)

    def _compute_ids(self) -> dict:
        n = self.noise_name
        return dict(
            weight_id=rng.param_id(f"{n}.weight"),
            bias_id=rng.param_id(f"{n}.bias"),
            noise_ids=(rng.param_id(f"{n}#{self.estimator}.in"), rng.param_id(f"{n}#out")),
        )

    def _bias(self) -> tuple[Tensor | None, Tensor | None]:
        if "bias" in self.bayes_names:
            return self.bias_mu, self.bias_rho
        return None, None

    def extra_repr(self) -> str:
        return f"init_sigma={self.init_sigma:g}, estimator={self.estimator!r}"


class BayesLinear(BayesModule):
    """Bayesian ``nn.Linear``: x ``(S*B, in_features)`` -> ``(S*B, out_features)``; inside
    :class:`~spar.nn.MonteCarlo` also a shared ``(B, in_features)`` (see the module doc)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        prior: GaussianPrior | dict | None = None,
        init_sigma: float = 1e-2,
        estimator: str = "reparam",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for arg, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{arg} must be an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{arg} must be >= 1, got {v}")
        self.in_features, self.out_features = in_features, out_features
        fk = dict(device=device, dtype=dtype or torch.float32)
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features, **fk))
        self.weight_rho = nn.Parameter(torch.empty(out_features, in_features, **fk))
        if bias:
            self.bias_mu = nn.Parameter(torch.empty(out_features, **fk))
            self.bias_rho = nn.Parameter(torch.empty(out_features, **fk))
            self.bayes_names = ("weight", "bias")
        else:
            self.bayes_names = ("weight",)
        self._init_bayes(prior, init_sigma, estimator)
        self._reset_bayes(in_features)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(S*B, in_features)``, or ``(S*B, ..., in_features)`` like ``nn.Linear``
        (e.g. tokens ``(S*B, N, D)``); the shared ``(B, ...)`` batch where it is the first
        noise layer's input. Extra dimensions are flattened into rows around the op: each
        row keeps its sample's weights (rows stay sample-major), and the per-example noise
        of ``lrt``/``flipout`` is per row, keyed by the row's global index (the example's
        global index times the rows per example), so it is the same on any grid."""
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"BayesLinear expects input of shape (S*B, {self.in_features}) or "
                f"(S*B, ..., {self.in_features}), got {tuple(x.shape)}"
            )
        key, shared = self._key(x)
        lead = x.shape[:-1]
        if x.dim() > 2:
            rows_per_example = math.prod(lead[1:])
            key = dataclasses.replace(key, data_offset=key.data_offset * rows_per_example)
            x = x.reshape(-1, self.in_features)
        out = ops.bayes_linear(
            x, self.weight_mu, self.weight_rho, *self._bias(), key,
            estimator=self.estimator, shared_input=shared, **self._ids(),
        )  # fmt: skip
        return out if len(lead) == 1 else out.reshape(-1, *lead[1:], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={'bias' in self.bayes_names}, " + super().extra_repr()
        )


class _BayesConvNd(BayesModule):
    _dims = 0

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        prior: GaussianPrior | dict | None = None,
        init_sigma: float = 1e-2,
        estimator: str = "reparam",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        d = self._dims
        tup = _ntuple(d)
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must be >= 1 and divide in_channels={in_channels} and "
                f"out_channels={out_channels}"
            )
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(
                "padding_mode must be one of 'zeros', 'reflect', 'replicate', 'circular', "
                f"got {padding_mode!r}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = tup(kernel_size), tup(stride), tup(dilation)
        self.groups, self.padding_mode = groups, padding_mode
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid' or ints, got {padding!r}")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError("padding='same' needs stride=1")
            self.padding = padding
            totals = [
                0 if padding == "valid" else dil * (k - 1)
                for dil, k in zip(self.dilation, self.kernel_size, strict=True)
            ]
            # F.pad order: last dim first, (left, right) each
            lr = [(t // 2, t - t // 2) for t in totals]
            self._pad = tuple(v for pair in reversed(lr) for v in pair)
        else:
            self.padding = tup(padding)
            self._pad = _reverse_repeat_tuple(self.padding, 2)
        # symmetric zero padding runs inside the conv; anything else is an explicit F.pad
        symmetric = all(self._pad[2 * i] == self._pad[2 * i + 1] for i in range(d))
        if padding_mode == "zeros" and symmetric:
            self._op_padding = tuple(self._pad[2 * i] for i in reversed(range(d)))
            self._pre_pad = None
        else:
            self._op_padding = (0,) * d
            self._pre_pad = self._pad
        fk = dict(device=device, dtype=dtype or torch.float32)
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.weight_mu = nn.Parameter(torch.empty(shape, **fk))
        self.weight_rho = nn.Parameter(torch.empty(shape, **fk))
        if bias:
            self.bias_mu = nn.Parameter(torch.empty(out_channels, **fk))
            self.bias_rho = nn.Parameter(torch.empty(out_channels, **fk))
            self.bayes_names = ("weight", "bias")
        else:
            self.bayes_names = ("weight",)
        self._init_bayes(prior, init_sigma, estimator)
        self._reset_bayes(math.prod(shape[1:]))

    def forward(self, x: Tensor) -> Tensor:
        d = self._dims
        if x.dim() != d + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (S*B, {self.in_channels}, "
                f"{d} spatial dims), got {tuple(x.shape)}"
            )
        key, shared = self._key(x)
        if self._pre_pad is not None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._pre_pad, mode=mode)
        return ops.bayes_conv(
            x, self.weight_mu, self.weight_rho, *self._bias(), key,
            stride=self.stride, padding=self._op_padding, dilation=self.dilation,
            groups=self.groups, estimator=self.estimator, shared_input=shared, **self._ids(),
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, padding_mode={self.padding_mode!r}, " + super().extra_repr()
        )


class BayesConv1d(_BayesConvNd):
    """Bayesian ``nn.Conv1d`` (same arguments): ``(S*B, C, L) -> (S*B, O, L')``."""

    _dims = 1


class BayesConv2d(_BayesConvNd):
    """Bayesian ``nn.Conv2d`` (same arguments): ``(S*B, C, H, W) -> (S*B, O, H', W')``."""

    _dims = 2


class BayesConv3d(_BayesConvNd):
    """Bayesian ``nn.Conv3d`` (same arguments): ``(S*B, C, D, H, W) -> (S*B, O, ...)``."""

    _dims = 3


def is_bayesian(module: nn.Module) -> bool:
    return isinstance(module, BayesModule)


def kl_divergence(model: nn.Module) -> Tensor:
    """Closed-form KL of the posterior to the prior, summed over all Bayesian layers.

    A model without Bayesian layers gets a ``UserWarning`` (its ELBO would silently be a
    plain likelihood) and a zero tensor on the device of its parameters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    total = None
    for m in model.modules():
        if isinstance(m, BayesModule):
            total = m.kl() if total is None else total + m.kl()
    if total is None:
        warnings.warn(
            "kl_divergence of a model without Bayesian layers is 0 (use spar.nn.bayesianize "
            "or spar.nn.Bayes* layers)",
            UserWarning,
            stacklevel=2,
        )
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return total


def assign_noise_names(model: nn.Module, prefix: str = "") -> None:
    """Name the noise stream of every noise module (Bayesian layer, :class:`spar.nn.Dropout`)
    after its qualified name (``prefix`` + the name in ``model``; a bare layer gets
    ``prefix``), so the noise key's ``param_id`` is stable across processes and runs and
    distinct modules draw independent noise."""
    for name, m in model.named_modules(prefix=prefix):
        if isinstance(m, NoiseModule):
            m.noise_name = name
