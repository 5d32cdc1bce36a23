"""Registers the cuda backend's primitives; the module :mod:`spar.ops.dispatch` imports to
load the backend. Raises ``ImportError`` (which the dispatcher reports as "backend
unavailable", and ``SPAR_BACKEND=auto`` skips silently) where CuPy or a CUDA GPU is
missing, or CuPy cannot use the GPU (a build for a newer CUDA than the driver), naming the
extra that installs CuPy.

Every primitive is served: ``sampled_linear`` and ``sampled_conv`` for fp32 parameters
(fp32/fp16/bf16 activations), ``lrt_noise`` and ``sign_mul`` for fp32/fp16/bf16 tensors,
``normal`` for any; other dtypes run on the torch backend.
"""

import torch

from spar.ops.library import define

_INSTALL = "pip install 'spar[cuda12]' (CUDA 12) or 'spar[cuda13]' (CUDA 13)"

try:
    import cupy  # noqa: F401 - fail here, cleanly, when CuPy is missing or broken
except Exception as e:  # noqa: BLE001 - a broken CuPy install is "unavailable" too
    raise ImportError(f"the cuda backend needs CuPy ({type(e).__name__}: {e}); {_INSTALL}") from e
if not torch.cuda.is_available():
    raise ImportError(
        "the cuda backend needs a CUDA GPU and CuPy; torch sees no CUDA device "
        f"(CuPy is installed; without it: {_INSTALL})"
    )
try:  # a CuPy built for a newer CUDA than the driver fails here, not at the first launch
    cupy.cuda.runtime.getDeviceCount()
except Exception as e:  # noqa: BLE001
    raise ImportError(
        f"CuPy cannot use the GPU ({type(e).__name__}: {e}); install the CuPy build for your "
        f"driver's CUDA: {_INSTALL}"
    ) from e

from spar.ops.backends.cuda import noise, sample  # noqa: E402 - after the checks above

define("sampled_linear", "cuda", sample.sampled_linear_forward, sample.sampled_linear_backward,
       dtypes=sample.PARAM_DTYPES)  # fmt: skip
define("sampled_conv", "cuda", sample.sampled_conv_forward, sample.sampled_conv_backward,
       dtypes=sample.PARAM_DTYPES)  # fmt: skip
define("lrt_noise", "cuda", noise.lrt_noise_forward, noise.lrt_noise_backward,
       dtypes=sample.FLOAT_DTYPES)  # fmt: skip
define("sign_mul", "cuda", noise.sign_mul_forward, noise.sign_mul_backward,
       dtypes=sample.FLOAT_DTYPES)  # fmt: skip
define("normal", "cuda", sample.normal_forward)
