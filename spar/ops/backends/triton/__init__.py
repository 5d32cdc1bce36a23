"""The Triton backend: ``sampled_linear`` (fused or chunked), ``lrt_noise``, ``sign_mul``
and ``normal`` on CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``). ``sampled_conv``
has no Triton kernel yet and runs on the torch backend (:mod:`spar.ops.dispatch`).
Importing this package raises ``ImportError`` where triton is not installed, which the
dispatcher reports as "backend unavailable"."""

import triton  # noqa: F401 - fail here, cleanly, when triton is missing

from spar.ops.backends.triton import linear, noise
from spar.ops.library import define

define("sampled_linear", "triton", linear.sampled_linear_forward, linear.sampled_linear_backward)
define("lrt_noise", "triton", noise.lrt_noise_forward, noise.lrt_noise_backward)
define("sign_mul", "triton", noise.sign_mul_forward, noise.sign_mul_backward)
define("normal", "triton", noise.normal_forward)
