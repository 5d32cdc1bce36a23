"""Integrations with other frameworks, each an optional extra.

- :mod:`spar.integrations.lightning`: ``SamplingParallel``, a PyTorch Lightning strategy
  that trains a ``LightningModule`` with sampling parallelism (extra ``lightning``).
- :mod:`spar.integrations.peft`: Bayesian LoRA on Hugging Face ``transformers`` models
  through ``peft`` (extra ``hf``).

This package imports neither framework: ``import spar`` works without the extras, and
importing an integration without its extra raises one ``ImportError`` line naming the
extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, *, integration: str, extra: str) -> ModuleType:
    """Import ``module`` for ``spar.integrations.<integration>``, or raise an
    ``ImportError`` whose one line says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"spar.integrations.{integration} needs the package {module!r} ({err.msg}); "
            f"install it with: pip install 'spar[{extra}]'"
        ) from None
