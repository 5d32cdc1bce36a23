"""Smoke test of bench/bench_augment.py: the analysis on synthetic rows, and one tiny study
(1 seed per arm, 1 epoch, through the real ``spar train`` under torchrun)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_augment", BENCH / "bench_augment.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(mod, arm, seed, acc, nll):
    curve = [
        {"epoch": i + 1, "accuracy": a, "nll": n, "ece": 0.1, "brier": 0.2,
         "ood_auroc_mutual_information": 0.8}
        for i, (a, n) in enumerate(zip(acc, nll, strict=True))
    ]  # fmt: skip
    metrics = {k: curve[-1][k] for k in mod.CURVE_KEYS}
    metrics["seconds_per_epoch"] = 1.0
    result = {"curve": curve, "metrics": metrics, "wall_s": 10.0}
    return mod.make_row(arm, seed, result, {"date": "2026-01-01T00:00:00Z", "host": "test"})


def _ramp(start, step, n=16):
    return [min(0.999, start + step * i) for i in range(n)]


def test_analysis_on_synthetic_rows(tmp_path):
    mod = _load()
    pilot_acc = _ramp(0.80, 0.02, 12)  # target at epoch 8: 0.94
    rows = [_row(mod, "pilot", 0, pilot_acc, [1.0 / (i + 1) for i in range(12)])]
    for seed in range(1, 6):
        # independent reaches 0.94 at epoch 4 (+ seed jitter), shared at epoch 8
        rows.append(_row(mod, "independent", seed, _ramp(0.80 + 0.001 * seed, 0.047),
                         [0.9 / (i + 1) for i in range(16)]))  # fmt: skip
        rows.append(_row(mod, "shared", seed, _ramp(0.80 + 0.001 * seed, 0.02),
                         [1.1 / (i + 1) for i in range(16)]))  # fmt: skip
    csv_path = tmp_path / "augment_cpu.csv"
    mod.common.append_rows(csv_path, rows)
    md = tmp_path / "augment_cpu.md"
    png = tmp_path / "augment_cpu.png"
    res = mod.report(csv_path, md, png, {})
    assert res["targets"]["accuracy"] == pytest.approx(0.94)
    t = res["tests"]["epochs to target accuracy"]
    assert t["a"]["mean"] == 4 and t["b"]["mean"] == 8
    assert t["diff"]["mean"] == -4
    assert t["mannwhitney"]["p"] < 0.05 and math.isnan(t["welch"]["p"])  # zero variance
    text = md.read_text()
    assert "Independent augmentation reached the target accuracy in fewer epochs" in text
    assert "| 3 |" in text and png.stat().st_size > 0
    # --analyze-only redoes the report from the CSV alone
    assert mod.main(["--analyze-only", "--results", str(tmp_path)]) == 0


@pytest.mark.slow
def test_tiny_study_runs_spar_train(tmp_path):
    """One seed per arm, one epoch each, through the real CLI (~60 s on 2 idle cores)."""
    mod = _load()
    # a synthetic pilot row stands in for the 12-epoch pilot run (the target rule reads it)
    mod.common.append_rows(tmp_path / "augment_cpu.csv", [_row(mod, "pilot", 0, [0.5], [2.0])])
    argv = ["--results", str(tmp_path), "--runs-dir", str(tmp_path / "runs"), "--seeds", "1"]
    argv += ["--epochs", "1", "--target-epoch", "1", "--no-check-hook"]
    assert mod.main(argv) == 0
    runs = mod.read_runs(tmp_path / "augment_cpu.csv")
    study = {r["arm"]: r for r in runs if r["arm"] in mod.ARMS}
    assert set(study) == {"independent", "shared"}
    for r in study.values():
        assert r["seed"] == 1 and r["epochs"] == 1 and len(r["accuracy_curve"]) == 1
        assert 0.0 <= r["acc_final"] <= 1.0 and r["nll_final"] > 0
        assert r["acc_final"] == pytest.approx(r["accuracy_curve"][-1], rel=1e-5)
    meta = json.loads((tmp_path / "augment_cpu.meta.json").read_text())
    assert meta["wall_minutes"]
    assert (tmp_path / "augment_cpu.md").exists()
