"""spar: fast, memory-lean Bayesian deep learning on GPUs and clusters.

Fused sampling kernels, sampling parallelism over ``torch.distributed`` and drop-in
Bayesian layers; see README.md and docs/design.md.
"""

from spar import data, distributed, losses, metrics, nn
from spar.nn.sampling import sampling

__version__ = "0.1.0"
__all__ = ["data", "distributed", "losses", "metrics", "nn", "sampling", "__version__"]
