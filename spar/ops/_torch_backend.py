"""Registers the torch implementations (CPU and GPU, always available)."""

from spar.ops.conv import conv_torch
from spar.ops.dispatch import register
from spar.ops.linear import linear_torch

register("linear", "torch", linear_torch)
register("conv", "torch", conv_torch)
