"""Shared test configuration: CPU only, deterministic, interpreter mode for Triton."""

import os

# Triton kernels run under the interpreter on CPU; this must be set before triton imports.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The noise generator is the user's default (SPAR_RNG=auto: the native C generator, built
# once into the cache); tests/test_rng.py and tests/test_native.py compare it with the
# eager torch generator.
