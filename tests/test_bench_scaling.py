"""bench/bench_scaling.py: the configuration arithmetic, and one ``--quick`` run with 1 and 2
gloo ranks on a tiny model whose CSV must have every column and sane values."""

from __future__ import annotations

import csv
import functools
import importlib.util
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "bench_scaling.py"

COLUMNS = {
    # environment (bench/common.py env_info) and machine load
    "date", "host", "cpu", "gpu", "threads", "python", "torch", "spar", "spar_src", "run_id",
    "cores", "oversubscribed", "loadavg_before", "loadavg_after", "others_cpu",
    # configuration
    "model", "params", "mode", "scaling", "ranks", "sample_axis", "data_axis", "samples",
    "local_samples", "batch", "local_batch", "device", "backend", "steps", "dataset_size",
    # measurements
    "step_ms", "iqr_ms", "min_ms", "max_ms", "epoch_s", "steps_per_epoch", "samples_per_s",
    "examples_per_s", "speedup", "efficiency", "efficiency_min", "exposed_comm_ms",
    "comm_overhead_ms", "compute_only_ms", "comm_ms", "comm_mib", "peak_mem_mib",
    "peak_mem_mib_ranks", "base_mem_mib", "mem_growth_mib", "mem_kind", "plan_step_ms", "plan_note",
}  # fmt: skip


@functools.cache
def _load_module():
    name = "bench_scaling_under_test"
    spec = importlib.util.spec_from_file_location(name, _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while it executes
    spec.loader.exec_module(mod)
    return mod


def test_grid_arithmetic():
    bs = _load_module()
    assert bs.hybrid_axes(2) is None and bs.hybrid_axes(3) is None
    assert bs.hybrid_axes(4) == (2, 2)
    assert bs.hybrid_axes(6) == (3, 2)
    assert bs.hybrid_axes(8) == (4, 2)
    assert bs.grid_axes("sp", 4) == (4, 1) and bs.grid_axes("ddp", 4) == (1, 4)
    assert bs.grid_axes("sp", 1) is None  # one rank is the local baseline of every mode
    configs, skipped = bs.plan_configs(
        "mlp-tiny", list(bs.MODES), [1, 2, 3, 4], ["weak", "strong"], 8, 16, 1
    )
    assert configs[0].mode == "local" and configs[0].scaling == "baseline"
    got = {(c.scaling, c.mode, c.ranks): (c.sample_axis, c.data_axis, c.samples) for c in configs}
    assert got[("weak", "sp", 4)] == (4, 1, 32)  # S grows with the ranks
    assert got[("strong", "sp", 4)] == (4, 1, 8)
    assert got[("strong", "hybrid", 4)] == (2, 2, 8)
    assert got[("weak", "sp", 3)] == (3, 1, 24)
    # strong scaling cannot split S=8 over 3 sample ranks, nor B=16 over 3 data ranks
    assert ("strong", "sp", 3) not in got and ("strong", "ddp", 3) not in got
    assert any("strong sp at 3 ranks" in s for s in skipped)
    assert any("hybrid at 2 ranks" in s for s in skipped)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    csv_path, png_path = out / "scaling.csv", out / "scaling.png"
    cmd = [sys.executable, str(_SCRIPT), "--quick", "--model", "mlp-tiny", "--ranks", "1", "2",
           "--csv", str(csv_path), "--png", str(png_path)]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ))
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {"rows": rows, "png": png_path, "csv": csv_path, "stdout": proc.stdout, "s": elapsed}


@pytest.mark.slow
def test_quick_run_rows_and_columns(quick_run):
    rows = quick_run["rows"]
    missing = COLUMNS - set(rows[0])
    assert not missing, f"missing columns: {sorted(missing)}"
    kinds = sorted((r["scaling"], r["mode"], int(r["ranks"])) for r in rows)
    assert kinds == [
        ("baseline", "local", 1),
        ("strong", "ddp", 2),
        ("strong", "sp", 2),
        ("weak", "ddp", 2),
        ("weak", "sp", 2),
    ]
    assert "skipped hybrid at 2 ranks" in quick_run["stdout"]
    assert len({r["run_id"] for r in rows}) == 1


@pytest.mark.slow
def test_quick_run_values_are_sane(quick_run):
    rows = quick_run["rows"]
    base = next(r for r in rows if r["scaling"] == "baseline")
    for r in rows:
        n, S, B = int(r["ranks"]), int(r["samples"]), int(r["batch"])
        a, b = int(r["sample_axis"]), int(r["data_axis"])
        assert a * b == n and int(r["local_samples"]) * a == S and int(r["local_batch"]) * b == B
        assert S == (int(base["samples"]) * n if r["scaling"] == "weak" else int(base["samples"]))
        assert int(r["steps"]) == 3 and r["quick"] == "True"
        step = float(r["step_ms"])
        assert math.isfinite(step) and step > 0
        assert float(r["min_ms"]) <= step <= float(r["max_ms"]) and float(r["iqr_ms"]) >= 0
        assert float(r["samples_per_s"]) == pytest.approx(S * B / step * 1e3, rel=1e-3)
        assert float(r["epoch_s"]) == pytest.approx(int(r["steps_per_epoch"]) * step / 1e3, 1e-3)
        assert int(r["steps_per_epoch"]) == math.ceil(int(r["dataset_size"]) / B)
        speedup = float(r["samples_per_s"]) / float(base["samples_per_s"])
        assert float(r["speedup"]) == pytest.approx(speedup, rel=1e-3)
        assert float(r["efficiency"]) == pytest.approx(speedup / n, rel=1e-3)
        assert 0 < float(r["efficiency"]) < 5  # loose: the machine is shared and noisy
        for key in ("exposed_comm_ms", "comm_ms", "compute_only_ms", "comm_mib"):
            assert float(r[key]) >= 0, key
        threads, cores = int(r["threads"]), int(r["cores"])
        assert r["oversubscribed"] == str(n * threads > cores)
        peaks = [float(m) for m in r["peak_mem_mib_ranks"].split(";")]
        assert len(peaks) == n and max(peaks) == pytest.approx(float(r["peak_mem_mib"]), abs=0.1)
        assert 20 < float(r["peak_mem_mib"]) < 8192
        assert float(r["peak_mem_mib"]) >= float(r["base_mem_mib"]) - 0.1
        assert 0 <= float(r["mem_growth_mib"]) <= float(r["peak_mem_mib"])
        assert len(r["loadavg_before"].split()) == 3 and r["mem_kind"] == "rss_hwm"
        if n == 1:
            assert r["backend"] == "local" and float(r["comm_mib"]) == 0
        else:
            # gradients of mu and rho (params counts both) went through the reducer
            assert r["backend"] == "gloo" and int(r["num_buckets"]) >= 1
            assert float(r["comm_mib"]) == pytest.approx(int(r["params"]) * 4 / 2**20, rel=1e-3)
    assert float(base["efficiency"]) == 1.0 and float(base["exposed_comm_ms"]) == 0


@pytest.mark.slow
def test_quick_run_plot_and_plan(quick_run):
    assert quick_run["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = quick_run["rows"]
    base = next(r for r in rows if r["scaling"] == "baseline")
    # plan's compute constant is the measured 1-rank step / S: it must give that step back
    assert float(base["plan_step_ms"]) == pytest.approx(float(base["step_ms"]), rel=1e-3)
    assert all(float(r["plan_step_ms"]) > 0 for r in rows)
    # --plot-only redraws from the CSV without measuring (in this process: no start-up cost)
    png2 = quick_run["png"].with_name("again.png")
    _load_module().main(["--plot-only", "--csv", str(quick_run["csv"]), "--png", str(png2)])
    assert png2.read_bytes()[:4] == b"\x89PNG"
