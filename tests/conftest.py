"""Shared test configuration: CPU only, deterministic, interpreter mode for Triton."""

import os

# Triton kernels run under the interpreter on CPU; this must be set before triton imports.
os.environ.setdefault("TRITON_INTERPRET", "1")
