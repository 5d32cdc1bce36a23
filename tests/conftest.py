"""Shared test configuration: CPU only, deterministic, interpreter mode for Triton."""

import os

# Triton kernels run under the interpreter on CPU; this must be set before triton imports.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests' many tiny odd shapes would each compile their own fused noise loop; the eager
# generator draws the same numbers (tests/test_rng.py checks both paths, and the CLI tests
# run the default, compiled path in their subprocesses).
os.environ.setdefault("SPAR_RNG_COMPILE", "0")
