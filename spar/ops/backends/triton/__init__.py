"""The Triton backend: ``sampled_linear`` (fused or chunked), ``sampled_conv`` (Triton
sampling into a bounded workspace + cuDNN), ``lrt_noise``, ``sign_mul`` and ``normal`` on
CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``). The sampled primitives serve fp32
parameters (fp16/bf16/fp32 activations), the per-example noise fp32/fp16/bf16 tensors;
other dtypes run on the torch backend (:mod:`spar.ops.dispatch`). Importing this package
raises ``ImportError`` where triton is not installed, which the dispatcher reports as
"backend unavailable"."""

import triton  # noqa: F401 - fail here, cleanly, when triton is missing

from spar.ops.backends.triton import conv, linear, noise
from spar.ops.backends.triton._utils import FLOAT_DTYPES, PARAM_DTYPES
from spar.ops.library import define

define("sampled_linear", "triton", linear.sampled_linear_forward, linear.sampled_linear_backward,
       dtypes=PARAM_DTYPES)  # fmt: skip
define("sampled_conv", "triton", conv.sampled_conv_forward, conv.sampled_conv_backward,
       dtypes=PARAM_DTYPES)  # fmt: skip
define("lrt_noise", "triton", noise.lrt_noise_forward, noise.lrt_noise_backward,
       dtypes=FLOAT_DTYPES)  # fmt: skip
define("sign_mul", "triton", noise.sign_mul_forward, noise.sign_mul_backward,
       dtypes=FLOAT_DTYPES)  # fmt: skip
define("normal", "triton", noise.normal_forward)
