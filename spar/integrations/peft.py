"""Bayesian LoRA on Hugging Face ``transformers`` models, through ``peft`` (extra ``hf``).

:func:`bayesianize_lora` turns the LoRA adapters of a ``peft`` model into mean-field
Gaussian posteriors trained by variational inference, following BLoB (Y. Wang, H. Shi,
L. Han, D. Metaxas, H. Wang, "BLoB: Bayesian Low-Rank Adaptation by Backpropagation for
Large Language Models", NeurIPS 2024):

- **Only the adapters are Bayesian.** The base model stays frozen and deterministic: the
  posterior covers the LoRA weights only.
- **Only A is Bayesian, B is deterministic** (BLoB's "asymmetric Bayesianization"). The
  update ``dW = B A`` then has a Gaussian posterior whose covariance lives in the
  low-rank space of B; the only extra parameters are A's standard deviations. B keeps
  LoRA's zero initialisation, so training starts from the base model, as in LoRA.
- **Prior** ``N(0, prior_std^2)`` on every element of A, with BLoB's default
  ``prior_std = 0.2`` (their ``beta``).
- **Initialisation.** The posterior mean of A is peft's initialisation of A. BLoB
  parameterises the posterior std as ``sigma = G^2`` with ``G ~ U(eps / sqrt(2), eps)``,
  ``eps = 0.05``; spar's layers use ``sigma = softplus(rho)`` (one parameterisation for all
  of spar), so we draw the same initial ``sigma = G^2`` and store its ``rho``. The initial
  posterior is BLoB's; the gradient steps on ``rho`` differ from steps on ``G``.
- **Estimator.** BLoB samples with Flipout; so does ``estimator="flipout"`` (the
  default), with the random signs per token. ``"reparam"`` (one weight sample shared by
  the whole batch) and ``"lrt"`` work too.

Keep peft's ``lora_dropout=0`` (BLoB's setting): a dropout in the adapter draws its masks
from torch's global generator, so the result would depend on the grid.

Not taken from BLoB: its KL re-weighting schedule and its separate optimiser for the KL
term. Here the KL enters the usual ELBO (:func:`spar.losses.elbo` with ``kl_weight``), so
annealing is the caller's choice.

How the model runs. spar folds the ``S`` samples into the batch: the model sees ``S * B``
sequences, and attention, normalisation and the frozen projections run on them unchanged.
Only the adapter A of each LoRA layer draws weights, from spar's noise key (invariant I1),
so :class:`spar.distributed.SampleParallel` gives the same result on any ``sample x data``
grid. LoRA adds the adapter's output to the base layer's output, so the base layer must
see the folded batch too: wrap the model with ``fold_input=True``::

    lm = spar.integrations.peft.CausalLM(bayesianize_lora(get_peft_model(model, config)))
    sp = spar.distributed.SampleParallel(lm, num_samples=8, grid=grid, fold_input=True)
    logits = sp(input_ids, attention_mask=mask)               # (S_local, B, T, V)
    out, target = spar.integrations.peft.next_token(logits, input_ids, mask)
    loss = spar.losses.elbo(out, target, kl=spar.nn.kl_divergence(lm), dataset_size=n_tokens)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from spar.integrations import require
from spar.nn import BayesLinear, GaussianPrior, assign_noise_names, current_sampling, sampling
from spar.nn.prior import inverse_sigma

require("peft", integration="peft", extra="hf")
from peft.tuners.lora import Linear as _LoraLinear  # noqa: E402 (after the check above)

__all__ = ["BayesLoraA", "CausalLM", "bayesianize_lora", "next_token"]

BLOB_PRIOR_STD = 0.2  # BLoB's beta
BLOB_EPS = 0.05  # BLoB's epsilon: initial sigma = G^2, G ~ U(eps / sqrt(2), eps)


class BayesLoraA(BayesLinear):
    """The Bayesian A of a LoRA adapter: a bias-free :class:`spar.nn.BayesLinear` that
    takes inputs of any shape ``(S*B, ..., in_features) -> (S*B, ..., r)``.

    The inner dimensions (the tokens of a sequence) are flattened into rows. For the
    estimators with per-example noise (``flipout``, ``lrt``) each token is an example: its
    noise is keyed by its global token index (the sampling context's ``data_offset``,
    counted in sequences, times the tokens per sequence), so a data-parallel grid draws
    what one process draws.

    ``weight`` is the posterior mean: peft reads it for the adapter's dtype, and merging
    the adapter (``merge_and_unload``) merges the posterior mean.
    """

    @property
    def weight(self) -> Tensor:
        return self.weight_mu

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() <= 2:
            return super().forward(x)
        state = current_sampling()
        if state is not None and state.batch_size is not None:
            raise ValueError(
                "Bayesian LoRA needs the folded (S*B, ...) batch (LoRA adds the adapter's "
                "output to the base layer's): wrap the model with fold_input=True "
                "(spar.nn.MonteCarlo or spar.distributed.SampleParallel)"
            )
        per_row = math.prod(x.shape[1:-1])
        flat = x.reshape(-1, x.shape[-1])
        if state is None or per_row == 1:
            out = super().forward(flat)
        else:
            with sampling(
                state.num_samples, seed=state.seed, step=state.step_tensor,
                first_sample=state.first_sample, data_offset=state.data_offset * per_row,
            ):  # fmt: skip
                out = super().forward(flat)
        return out.reshape(*x.shape[:-1], self.out_features)


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def bayesianize_lora(
    model: nn.Module,
    *,
    prior_std: float = BLOB_PRIOR_STD,
    eps: float = BLOB_EPS,
    estimator: str = "flipout",
) -> nn.Module:
    """Make the A matrix of every LoRA ``Linear`` adapter of a ``peft`` model Bayesian
    (BLoB's choices, see the module docstring), in place.

    Args:
        model: a model with peft LoRA layers (``peft.get_peft_model(model, LoraConfig(...))``).
        prior_std: the std of the ``N(0, prior_std^2)`` prior on A (BLoB: 0.2).
        eps: initial posterior stds are ``G^2`` with ``G ~ U(eps / sqrt(2), eps)``
            (BLoB: 0.05, i.e. stds in ``[0.00125, 0.0025]``). Drawn from torch's global
            generator (``SampleParallel`` broadcasts rank 0's values).
        estimator: ``"flipout"`` (BLoB's), ``"reparam"`` or ``"lrt"``.

    Returns ``model``, with the noise names of the new layers set to their qualified names.
    The base model's parameters are left as peft set them (frozen). Raises ``ValueError``
    if the model has no LoRA ``Linear`` adapter, or one with a LoRA variant (DoRA, ...)
    whose forward reads A's weight directly.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    prior = GaussianPrior(0.0, _check_positive("prior_std", prior_std))
    eps = _check_positive("eps", eps)
    todo = []
    for name, layer in model.named_modules():
        if not isinstance(layer, _LoraLinear):
            continue
        for adapter, a in layer.lora_A.items():
            if adapter in getattr(layer, "lora_variant", {}):
                raise ValueError(
                    f"{name}: adapter {adapter!r} uses a LoRA variant "
                    f"({type(layer.lora_variant[adapter]).__name__}); Bayesian LoRA supports "
                    "plain LoRA adapters only"
                )
            if type(a) is nn.Linear:
                todo.append((layer, adapter, a))
    if not todo:
        if any(isinstance(m, BayesLoraA) for m in model.modules()):
            raise ValueError("the model's LoRA adapters are Bayesian already")
        raise ValueError(
            "the model has no LoRA Linear adapters to make Bayesian; create it with "
            "peft.get_peft_model(model, peft.LoraConfig(target_modules=[...]))"
        )
    for layer, adapter, a in todo:
        new = BayesLoraA(
            a.in_features, a.out_features, bias=False, prior=prior, estimator=estimator,
            device=a.weight.device, dtype=a.weight.dtype,
        )  # fmt: skip
        with torch.no_grad():
            new.weight_mu.copy_(a.weight)
            g = torch.empty_like(new.weight_rho).uniform_(eps / math.sqrt(2.0), eps)
            new.weight_rho.copy_(inverse_sigma(g.square()))
        new.requires_grad_(a.weight.requires_grad)
        new.train(a.training)
        layer.lora_A[adapter] = new
    assign_noise_names(model)
    return model


class CausalLM(nn.Module):
    """A Hugging Face causal language model in spar's convention: a tensor in, the logits
    tensor out, so that :class:`spar.nn.MonteCarlo` and
    :class:`spar.distributed.SampleParallel` can wrap it (with ``fold_input=True``).

    ``forward(input_ids, attention_mask=None)``: ``input_ids`` ``(N, T)`` (under a
    wrapper, the folded ``N = S*B`` sequences); ``attention_mask`` ``(N, T)``, or the
    ``(B, T)`` mask of the unfolded batch, which is repeated for every sample (the fold is
    sample-major). Returns the logits ``(N, T, vocab)``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if attention_mask is not None and attention_mask.shape[0] != input_ids.shape[0]:
            reps, rest = divmod(input_ids.shape[0], attention_mask.shape[0])
            if rest or attention_mask.shape[1:] != input_ids.shape[1:]:
                raise ValueError(
                    f"attention_mask of shape {tuple(attention_mask.shape)} fits neither the "
                    f"input_ids {tuple(input_ids.shape)} nor their unfolded batch"
                )
            attention_mask = attention_mask.repeat(reps, 1)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits


def next_token(
    logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Next-token prediction as a classification problem for :func:`spar.losses.elbo` and
    :mod:`spar.metrics`.

    Args:
        logits: ``(S, B, T, vocab)``, the model's outputs with the sample axis first.
        input_ids: ``(B, T)``.
        attention_mask: ``(B, T)`` (1 = token, 0 = padding), or ``None``.

    Returns:
        ``(outputs, target)``: ``outputs`` ``(S, N, vocab)``, the logits at every position
        ``t < T - 1`` where neither token ``t`` nor token ``t + 1`` is padding, and
        ``target`` ``(N,)``, the tokens ``t + 1``.

    ``elbo`` then averages over the ``N`` tokens of this rank. On a grid with a data axis
    the ranks' losses are averaged (as with DDP), so the result is the mean over all tokens
    only when every data shard holds as many tokens.
    """
    if logits.dim() != 4 or logits.shape[1:3] != input_ids.shape:
        raise ValueError(
            f"logits must have shape (S, B, T, vocab) matching input_ids (B, T) = "
            f"{tuple(input_ids.shape)}; got {tuple(logits.shape)}"
        )
    keep = torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        keep = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    return logits[:, :, :-1][:, keep], input_ids[:, 1:][keep]
