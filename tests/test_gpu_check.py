"""``bench/gpu_check.sh``: its options, its per-step limits and budget, a failed step that
does not stop the later ones, and the ``--dry-run`` rehearsal end to end on this CPU
machine (the interpreter, tiny shapes, results in a temporary folder, bench/results
untouched)."""

from __future__ import annotations

import csv
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEPS = ("env", "tests", "train", "kernels", "conv", "layers")

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="needs bash and coreutils timeout",
)


def _run(*args: str, timeout: float = 60, env: dict | None = None):
    e = {**os.environ, **(env or {})}
    for name in ("SPAR_BACKEND", "SPAR_LINEAR_PATH", "SPAR_CHUNK_NUMEL", "SPAR_TEST_DEVICE"):
        e.pop(name, None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=ROOT)  # fmt: skip


def _steps(out: Path) -> dict[str, dict]:
    rows = list(csv.DictReader((out / "results" / "gpu_check_gpu.csv").open()))
    return {r["step"]: r for r in rows}


def _fake_python(tmp_path: Path, rules: str) -> Path:
    """An interpreter that applies ``rules`` (bash ``case`` arms on "$*") and otherwise
    runs this Python."""
    path = tmp_path / "fakepy"
    body = f'case "$*" in\n{rules}\nesac\nexec {sys.executable} "$@"\n'
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_usage_and_bad_options():
    r = _run("--help")
    assert r.returncode == 0 and "--dry-run" in r.stdout and "limit" in r.stdout
    for bad in (["--frobnicate"], ["--only", "nonsense"], ["--budget", "soon"]):
        r = _run(*bad)
        assert r.returncode == 2, (bad, r.stdout, r.stderr)


def test_budget_spent_skips_steps_and_still_summarizes(tmp_path):
    r = _run("--dry-run", "--out", str(tmp_path), "--budget", "5")
    assert r.returncode == 0, r.stdout + r.stderr
    steps = _steps(tmp_path)
    assert list(steps) == list(STEPS)
    assert all(s["status"] == "skipped" and "budget" in s["note"] for s in steps.values())
    assert "gpu_check summary" in (tmp_path / "summary.txt").read_text()


def test_failed_step_does_not_stop_later_ones_and_sets_exit_code(tmp_path):
    fake = _fake_python(
        tmp_path,
        '  *"spar info"*) echo "info broke" >&2; exit 3 ;;\n'
        "  *bench_kernels.py*) echo fake kernels; exit 0 ;;",
    )
    r = _run("--dry-run", "--out", str(tmp_path), "--python", str(fake), "--only", "env,kernels")
    assert r.returncode == 1, r.stdout + r.stderr
    steps = _steps(tmp_path)
    assert steps["env"]["status"] == "failed" and steps["kernels"]["status"] == "ok"
    assert "info broke" in (tmp_path / "env.log").read_text()
    assert "fake kernels" in (tmp_path / "kernels.log").read_text()


def test_a_step_past_its_limit_is_stopped(tmp_path):
    fake = _fake_python(tmp_path, "  *bench_kernels.py*) sleep 120 ;;")
    # budget 17 s: the step's limit is cut to what is left (about 12 s)
    r = _run("--dry-run", "--out", str(tmp_path), "--python", str(fake), "--only", "kernels",
             "--budget", "17", timeout=90)  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    k = _steps(tmp_path)["kernels"]
    assert k["status"] == "failed" and "timeout" in k["note"]
    assert int(k["seconds"]) <= 25


@pytest.mark.slow
def test_dry_run_passes_end_to_end(tmp_path):
    """The rehearsal the GPU run relies on: every step passes on this CPU machine (train may
    be skipped where scikit-learn is missing), results land in OUT/results, and nothing in
    bench/results changes."""
    results = ROOT / "bench" / "results"

    def gpu_files():  # what a GPU run writes there (other files: other scripts' business)
        return {p.name: p.stat().st_mtime_ns for p in results.glob("*_gpu*") if p.is_file()}

    before = gpu_files()
    r = _run("--dry-run", "--out", str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    steps = _steps(tmp_path)
    assert list(steps) == list(STEPS)
    for name, s in steps.items():
        ok = s["status"] == "ok" or (name == "train" and s["status"] == "skipped")
        assert ok, (name, s)
        assert s["device_name"] and s["device"] == "cpu"
    for name in STEPS:
        assert (tmp_path / f"{name}.log").is_file()
    for name in ("kernels_gpu.csv", "layers_gpu.csv", "gpu_check_gpu.csv"):
        rows = list(csv.DictReader((tmp_path / "results" / name).open()))
        assert rows and all(row.get("device_name") for row in rows), name
    ops = {row["op"] for row in csv.DictReader((tmp_path / "results" / "kernels_gpu.csv").open())}
    assert ops == {"linear", "conv"}
    assert "gpu_check summary" in r.stdout
    assert gpu_files() == before, "a dry run wrote into bench/results"
