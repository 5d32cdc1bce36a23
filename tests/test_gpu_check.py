"""``bench/gpu_check.sh``: its options, its per-step limits and budget (one too small to run
any step is refused; a run in which no step ran exits nonzero), a failed step that does not
stop the later ones, a step that could not run (train without scikit-learn) flagged as NOT
RUN, the env step's warnings (no C compiler for Triton), the layers step's GPU command line,
and the ``--dry-run`` rehearsal end to end on this CPU machine (the interpreter, tiny
shapes, results in a temporary folder, bench/results untouched)."""

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
STEPS = ("env", "tests", "train", "kernels", "conv", "layers", "cuda")

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


def _last_line(r) -> str:
    return r.stdout.strip().splitlines()[-1]


def test_usage_and_bad_options():
    r = _run("--help")
    assert r.returncode == 0 and "--dry-run" in r.stdout and "limit" in r.stdout
    for bad in (["--frobnicate"], ["--only", "nonsense"], ["--budget", "soon"]):
        r = _run(*bad)
        assert r.returncode == 2, (bad, r.stdout, r.stderr)


@pytest.mark.parametrize("budget", ["0", "5", "14", "014"])
def test_a_budget_too_small_for_any_step_is_refused(tmp_path, budget):
    r = _run("--dry-run", "--out", str(tmp_path), "--budget", budget)
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "at least 15" in r.stderr, r.stderr
    assert not (tmp_path / "steps.tsv").exists()  # refused before anything ran


def test_budget_spent_skips_later_steps_and_still_summarizes(tmp_path):
    # budget 15: env gets its 10 s; it takes ~4 s, so the 6 s left hold no later step
    fake = _fake_python(
        tmp_path,
        '  *"spar info"*) sleep 4; exit 0 ;;\n'
        '  "- cpu") cat >/dev/null; echo "device cpu (dry run)"; exit 0 ;;',
    )
    r = _run("--dry-run", "--out", str(tmp_path), "--python", str(fake), "--budget", "15")
    assert r.returncode == 0, r.stdout + r.stderr
    steps = _steps(tmp_path)
    assert list(steps) == list(STEPS)
    assert steps["env"]["status"] == "ok"
    for name in STEPS[1:]:
        assert steps[name]["status"] == "skipped" and "budget" in steps[name]["note"], name
    assert "gpu_check summary" in (tmp_path / "summary.txt").read_text()
    assert "1 ok, 0 failed, 0 NOT RUN, 6 skipped" in _last_line(r)


def test_a_run_in_which_no_step_ran_exits_nonzero(tmp_path):
    r = _run("--dry-run", "--out", str(tmp_path), "--skip", ",".join(STEPS))
    assert r.returncode == 3, r.stdout + r.stderr
    assert "NO STEP RAN" in _last_line(r)
    assert all(s["status"] == "skipped" for s in _steps(tmp_path).values())


def _hide_sklearn(tmp_path: Path) -> dict:
    """An environment in which ``import sklearn`` fails, as on a ``pip --no-deps`` box."""
    pkg = tmp_path / "hide" / "sklearn"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('raise ImportError("scikit-learn hidden by the test")\n')
    old = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(pkg.parent) + (os.pathsep + old if old else "")}


def test_train_without_sklearn_is_flagged_as_not_run(tmp_path):
    fake = _fake_python(tmp_path, "  *bench_kernels.py*) echo fake kernels; exit 0 ;;")
    out = tmp_path / "out"
    r = _run("--dry-run", "--out", str(out), "--python", str(fake), "--only", "train,kernels",
             env=_hide_sklearn(tmp_path))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr  # flagged, not failed
    steps = _steps(out)
    assert steps["kernels"]["status"] == "ok"
    train = steps["train"]
    assert train["status"] == "SKIPPED", train
    assert "scikit-learn missing" in train["note"] and "train check did not run" in train["note"]
    summary = (out / "summary.txt").read_text()
    assert "!! train: SKIPPED: scikit-learn missing" in summary, summary
    last = _last_line(r)
    assert "1 ok, 0 failed, 1 NOT RUN (train)" in last and "BUT" in last, last

    # train alone: nothing ran, so no "every step that ran passed"
    out2 = tmp_path / "out2"
    r = _run("--dry-run", "--out", str(out2), "--python", str(fake), "--only", "train",
             env=_hide_sklearn(tmp_path / "again"))  # fmt: skip
    assert r.returncode == 3, r.stdout + r.stderr
    assert "NO STEP RAN" in _last_line(r) and "1 NOT RUN (train)" in _last_line(r)


def test_cuda_step_without_cupy_is_not_run(tmp_path):
    """The GPU run's cuda step where CuPy does not import: exit 77 (NOT RUN) with a SKIP line
    naming the extra, before anything touches a GPU: the script's own step_cuda, run with
    a CuPy that fails to import (a GPU run of the script would write into bench/results)."""
    body = subprocess.run(["sed", "-n", "/^step_cuda() {/,/^}/p", str(SCRIPT)],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert body.strip().endswith("}"), body
    pkg = tmp_path / "hide" / "cupy"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('raise ImportError("CuPy hidden by the test")\n')
    old = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PY": sys.executable, "DEVICE": "cuda", "DRY": "0",
           "OUT": str(tmp_path), "RESULTS": str(tmp_path),
           "PYTHONPATH": str(pkg.parent) + (os.pathsep + old if old else "")}  # fmt: skip
    r = subprocess.run(["bash", "-c", body + "\nstep_cuda"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=120)  # fmt: skip
    assert r.returncode == 77, r.stdout + r.stderr
    skip = [line for line in r.stdout.splitlines() if line.startswith("SKIP: ")]
    assert skip and "CuPy missing" in skip[0] and "spar[cuda13]" in skip[0], r.stdout
    assert not (tmp_path / "cuda_gpu.csv").exists()


def test_env_warns_when_triton_has_no_c_compiler(tmp_path):
    # Triton takes $CC as its compiler when set: one that does not exist is none at all
    fake = _fake_python(tmp_path, '  *"spar info"*) echo "fake info"; exit 0 ;;')
    out = tmp_path / "out"
    r = _run("--dry-run", "--out", str(out), "--python", str(fake), "--only", "env",
             env={"CC": str(tmp_path / "no-such-cc")}, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    log = (out / "env.log").read_text()
    assert "WARNING: no host C compiler" in log and "Triton will fail to launch kernels" in log
    assert "Python headers: " in log or "WARNING: no Python headers" in log, log
    summary = (out / "summary.txt").read_text()
    assert "!! WARNING (env): no host C compiler" in summary, summary
    assert "no host C compiler" in _steps(out)["env"]["note"]
    last = _last_line(r)
    assert "1 WARNING(S)" in last and "BUT" in last, last


def test_layers_gpu_command_skips_the_memory_pass(tmp_path):
    """The GPU layers step times only (its 60 s limit holds no memory pass): its command
    line, from the script's own step_layers with ``echo`` as the interpreter."""
    body = subprocess.run(["sed", "-n", "/^step_layers() {/,/^}/p", str(SCRIPT)],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert body.strip().endswith("}"), body
    env = {**os.environ, "PY": "echo", "DEVICE": "cuda", "DRY": "0", "RESULTS": str(tmp_path)}
    r = subprocess.run(["bash", "-c", body + "\nstep_layers"], capture_output=True, text=True,
                       env=env, check=True)  # fmt: skip
    args = r.stdout.split()
    assert args[0] == "bench/bench_layers.py" and "--no-memory" in args and "--quick" in args
    assert args[args.index("--device") + 1] == "cuda"


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
    be SKIPPED, and flagged, where scikit-learn is missing), results land in OUT/results,
    the env step reports what Triton needs to build its launcher, and nothing in
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
        ok = s["status"] == "ok" or (name == "train" and s["status"] == "SKIPPED")
        assert ok, (name, s)
        assert s["device_name"] and s["device"] == "cpu"
    for name in STEPS:
        assert (tmp_path / f"{name}.log").is_file()
    if steps["train"]["status"] == "SKIPPED":
        assert "1 NOT RUN (train)" in _last_line(r), _last_line(r)
    env_log = (tmp_path / "env.log").read_text()
    assert "host C compiler: " in env_log or "WARNING: no host C compiler" in env_log, env_log
    assert "Python headers: " in env_log or "WARNING: no Python headers" in env_log, env_log
    for name in ("kernels_gpu.csv", "layers_gpu.csv", "gpu_check_gpu.csv"):
        rows = list(csv.DictReader((tmp_path / "results" / name).open()))
        assert rows and all(row.get("device_name") for row in rows), name
    ops = {row["op"] for row in csv.DictReader((tmp_path / "results" / "kernels_gpu.csv").open())}
    assert ops == {"linear", "conv"}
    assert "gpu_check summary" in r.stdout
    assert gpu_files() == before, "a dry run wrote into bench/results"
