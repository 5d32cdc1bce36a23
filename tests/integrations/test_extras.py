"""The integrations are optional extras: ``import spar`` imports none of their frameworks,
and importing an integration without its extra raises one line naming the extra."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


def test_import_spar_imports_no_framework():
    code = (
        "import sys, spar, spar.integrations; "
        "print(sorted(m for m in ('lightning', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("integration", "missing", "extra"),
    [("lightning", "lightning", "lightning"), ("peft", "peft", "hf")],
)
def test_missing_extra_is_one_clear_line(monkeypatch, integration, missing, extra):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import missing` fail
    monkeypatch.delitem(sys.modules, f"spar.integrations.{integration}", raising=False)
    with pytest.raises(ImportError) as info:
        importlib.import_module(f"spar.integrations.{integration}")
    msg = str(info.value)
    assert "\n" not in msg
    assert f"pip install 'spar[{extra}]'" in msg and f"spar.integrations.{integration}" in msg
