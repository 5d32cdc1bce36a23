"""Bayesian layers, priors, the KL term, sample-wise BatchNorm and Dropout, the model
converter and Monte Carlo evaluation."""

from spar.nn.convert import bayesianize
from spar.nn.dropout import Dropout
from spar.nn.layers import (
    ESTIMATORS,
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesLinear,
    BayesModule,
    assign_noise_names,
    is_bayesian,
    kl_divergence,
)
from spar.nn.montecarlo import MonteCarlo
from spar.nn.norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from spar.nn.prior import GaussianPrior, pretrained_prior
from spar.nn.sampling import SamplingState, current_sampling, sampling

__all__ = [
    "ESTIMATORS",
    "BayesConv1d",
    "BayesConv2d",
    "BayesConv3d",
    "BayesLinear",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BayesModule",
    "Dropout",
    "GaussianPrior",
    "MonteCarlo",
    "SamplingState",
    "assign_noise_names",
    "bayesianize",
    "current_sampling",
    "is_bayesian",
    "kl_divergence",
    "pretrained_prior",
    "sampling",
]
