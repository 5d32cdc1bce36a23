"""The integration tests reuse the multi-process harness of ``tests/distributed`` (its
``run_workers`` fixture), loaded by path: conftest files are not importable as modules."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_spar_distributed_conftest", Path(__file__).parents[1] / "distributed" / "conftest.py"
)
_harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_harness)

run_workers = _harness.run_workers
