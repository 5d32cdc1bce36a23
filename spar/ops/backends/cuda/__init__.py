"""The cuda backend: spar's primitives as CUDA C++ kernels (``csrc/spar_cuda.cu``) compiled
at first use by NVRTC through CuPy, for users who cannot or will not run Triton and as an
independent second implementation of the Triton kernels' numbers.

* :mod:`.source`: the sources, the one translation unit NVRTC compiles (``#line``
  directives), the options and the kernels' argument lists; no CuPy needed.
* :mod:`.kernels`: one compiled module per device, launches on torch's current stream,
  tensors passed by device pointer.
* :mod:`.sample`: weight sampling and its backward, :class:`~.sample.CudaSampler` in the
  torch backend's chunk loops (GEMMs and convolutions in cuBLAS/cuDNN), ``normal``.
* :mod:`.noise`: ``lrt_noise`` and ``sign_mul``.
* :mod:`.register`: the dispatcher's entry point (``spar.ops.dispatch``): importing it
  checks for CuPy and a GPU, with an error naming the extra to install, and registers the
  primitives.

Importing this package itself imports no CuPy: tests and benchmarks use :mod:`.source` and
the host build of the kernels on machines without CUDA.
"""
