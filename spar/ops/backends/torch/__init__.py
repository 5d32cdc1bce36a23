"""The torch backend: every primitive, on every device and for every dtype, in plain torch
ops. Its noise comes from :mod:`spar.rng`, except on CUDA tensors, where the Triton kernels
draw it (:mod:`spar.ops.backends.torch.generator`). It is the fallback of every other
backend (see :mod:`spar.ops.dispatch`)."""

from spar.ops.backends.torch import noise, sampled
from spar.ops.library import define

define("sampled_linear", "torch", sampled.linear_forward, sampled.linear_backward)
define("sampled_conv", "torch", sampled.conv_forward, sampled.conv_backward)
define("lrt_noise", "torch", noise.lrt_noise_forward, noise.lrt_noise_backward)
define("sign_mul", "torch", noise.sign_mul_forward, noise.sign_mul_backward)
define("normal", "torch", noise.normal_forward)
