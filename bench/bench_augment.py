"""Does independent per-rank augmentation converge in fewer epochs than shared augmentation?

Question (issue 11, part 4): arXiv 2604.04736 reports that with sampling parallelism, letting
every rank of a sample group augment the shared mini-batch with its own random stream
(``--augment independent``) converges in fewer epochs than one augmentation shared by all
ranks (``--augment shared``). This script measures it on the built-in ``spar train`` job.

Setup: the default ``spar train`` job (Bayesian CNN on scikit-learn digits 0-7, 8-9 held out
as OOD; ``--mode sp`` over 2 gloo ranks, S=8, global batch 64, Adam lr 3e-3, KL weight 1,
init sigma 0.01, mean-over-samples ELBO) with only ``--augment``, ``--seed`` and ``--epochs``
changed. ``--epochs`` is raised from the default 12 to 16 (``--epochs``) only to leave
headroom for runs that reach the target late: the learning rate is constant (no schedule),
so the first 12 epochs of a 16-epoch run are the 12 epochs of the default run.

How the runs are driven: each run is the real ``spar train`` command line
(``spar.cli.main(["train", ...])``), launched under ``torchrun`` (2 processes), which the CLI
supports natively (it then runs one rank per process instead of launching its own). The
CLI only reports the metrics after the last epoch, so this script's worker adds one hook
before calling it: it wraps ``spar.train._checkpoint_state`` (called by every rank at the
end of every epoch) and, after the checkpoint state is taken, runs ``spar._job.evaluate``
(the job's own final evaluation: full predictive of all S samples on the held-out split of
digits 0-7 and the OOD digits) and appends the metrics to a JSON-lines curve file. Prediction
does not change training state (``SampleParallel.predict``: eval mode, the step counter and
later noise untouched), so the hooked run trains exactly like the plain one; ``--check-hook``
(on by default in a full study) runs the plain ``spar train`` default job once and checks
that its ``metrics.json`` equals the hooked pilot's bit for bit.

Target (fixed before the study runs, by rule): the validation accuracy and NLL that the
default ``spar train`` run (seed 0, ``--augment independent``, 12 epochs: the *pilot*)
reaches at epoch 8 (about 2/3 of its epochs). Seed 0 is then excluded from the study. The
primary endpoint is the number of epochs until a run's validation accuracy first reaches
the target (``>=``); the secondary endpoint the same for NLL (``<=``). A run that never
reaches it within ``--epochs`` is censored at ``epochs + 1`` (counted in the report).

Pairing: a seed fixes the data split, the initial weights, the batch order, the weight noise
of every step and rank 0's augmentation stream; the two arms of one seed differ only in
rank 1's augmentation stream (its own with ``independent``, rank 0's with ``shared``). The
paired tests by seed are therefore meaningful and reported next to the unpaired ones.

Output: ``bench/results/augment_cpu.csv`` (one row per run: arm, seed, epochs to target,
final metrics at epoch 12 and at the last epoch, per-epoch curves as ``;``-joined strings),
``augment_cpu.md`` (setup, target, table, tests, conclusion) and ``augment_cpu.png``
(validation curves, mean +/- sd per arm). ``--analyze-only`` (alias ``--plot-only``) redoes
the report from the CSV. The study is resumable: runs already in the CSV are skipped.

Usage::

    python bench/bench_augment.py                         # pilot + check + seeds 1..15
    python bench/bench_augment.py --seeds 16-20           # add seeds to the same CSV
    python bench/bench_augment.py --analyze-only          # report + plot from the CSV
    python bench/bench_augment.py --verify pilot:0,shared:1   # rerun runs, compare curves

The recorded study (2 cores shared with other jobs): 31 runs in 39 minutes (~40-95 s per
16-epoch run, most of it process start-up and imports), plus 9.5 minutes of ``--verify``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (bench/ is on sys.path when this file runs as a script)

ARMS = ("independent", "shared")
CURVE_KEYS = ("accuracy", "nll", "ece", "brier", "ood_auroc_mutual_information")
DEFAULT_EPOCHS = 12  # spar train's default
TARGET_EPOCH = 8  # ~2/3 of the default 12 epochs
CSV_NAME = "augment_cpu.csv"


# --------------------------------------------------------------------------- worker (rank)


def _worker(curve_path: str, train_argv: list[str]) -> int:
    """One rank under torchrun: the real ``spar train`` CLI with a per-epoch evaluation."""
    import torch.distributed as dist

    import spar.train as T
    from spar._job import evaluate, load_data
    from spar.cli import main

    original = T._checkpoint_state
    cache: dict = {}

    def hooked(sp, opt, epoch, cfg):
        state = original(sp, opt, epoch, cfg)  # taken before evaluating (nothing changes)
        if "data" not in cache:
            cache["data"] = load_data(cfg)
        was_training = sp.training
        t0 = time.perf_counter()
        report = evaluate(sp, cache["data"])
        sp.train(was_training)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            row = {"epoch": epoch, "eval_s": time.perf_counter() - t0, "t": time.time()}
            row.update({k: float(report[k]) for k in CURVE_KEYS})
            with open(curve_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return state

    T._checkpoint_state = hooked
    return main(train_argv)


# --------------------------------------------------------------------------- one run


def train_argv(arm: str, seed: int, epochs: int, out: Path) -> list[str]:
    return [
        "train",
        "--augment",
        arm,
        "--seed",
        str(seed),
        "--epochs",
        str(epochs),
        "--out",
        str(out),
        "--no-progress",
        # the recorded study trained on all of digits 0-7's training part (no validation
        # split was carved out then); this hook evaluates on the test split
        "--val-fraction",
        "0",
    ]


def run_one(arm: str, seed: int, epochs: int, out: Path, *, timeout: float = 900.0) -> dict:
    """Train one run (2 ranks under torchrun) and return its per-epoch curve and metrics."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    curve = out / "curve.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).resolve()),
        "_worker",
        "--curve",
        str(curve),
        "--",
        *train_argv(arm, seed, epochs, out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // 2)))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"run {arm} seed {seed} failed (rc {proc.returncode}):\n{tail}")
    rows = [json.loads(line) for line in curve.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["epoch"])
    if [r["epoch"] for r in rows] != list(range(1, epochs + 1)):
        raise RuntimeError(f"run {arm} seed {seed}: curve has epochs {[r['epoch'] for r in rows]}")
    final = json.loads((out / "metrics.json").read_text())
    for k in ("accuracy", "nll"):  # the hook's last evaluation is the job's own final one
        if final[k] != rows[-1][k]:
            raise RuntimeError(
                f"run {arm} seed {seed}: hook's last {k} {rows[-1][k]} != metrics.json {final[k]}"
            )
    return {"curve": rows, "metrics": final, "wall_s": wall}


def plain_default_run(out: Path, timeout: float = 900.0) -> dict:
    """``spar train --no-progress --out OUT`` as a user runs it (spar launches its ranks)."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "spar", "train", "--no-progress", "--val-fraction", "0"]
    cmd += ["--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"plain spar train failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads((out / "metrics.json").read_text())


# --------------------------------------------------------------------------- rows


def _join(values: list[float]) -> str:
    return ";".join(f"{v:.6g}" for v in values)


def _split(text: str) -> list[float]:
    return [float(v) for v in text.split(";")] if text else []


def epochs_to(curve: list[float], target: float, *, higher_is_better: bool) -> int | None:
    """First epoch (1-based) whose value reaches ``target``; ``None`` if none does."""
    for i, v in enumerate(curve):
        if (v >= target) if higher_is_better else (v <= target):
            return i + 1
    return None


def make_row(arm: str, seed: int, result: dict, env: dict) -> dict:
    curve = result["curve"]
    n = len(curve)
    at12 = curve[min(DEFAULT_EPOCHS, n) - 1]
    m = result["metrics"]
    row = {
        "arm": arm,
        "seed": seed,
        "epochs": n,
        f"acc_ep{DEFAULT_EPOCHS}": at12["accuracy"],
        f"nll_ep{DEFAULT_EPOCHS}": at12["nll"],
        "acc_final": m["accuracy"],
        "nll_final": m["nll"],
        "ece_final": m["ece"],
        "brier_final": m["brier"],
        "auroc_mi_final": m["ood_auroc_mutual_information"],
        "seconds_per_epoch": m.get("seconds_per_epoch"),
        "wall_s": round(result["wall_s"], 2),
    }
    for k in CURVE_KEYS:
        row[f"{k}_curve"] = _join([r[k] for r in curve])
    return row | env


def read_runs(path: Path) -> list[dict]:
    """Rows of the CSV with numbers parsed and curves split into lists."""
    runs = []
    for r in common.read_rows(path):
        run = dict(r)
        run["seed"] = int(r["seed"])
        run["epochs"] = int(r["epochs"])
        for k, v in r.items():
            if k.endswith("_curve"):
                run[k] = _split(v)
            elif k.startswith(("acc_", "nll_", "ece_", "brier_", "auroc_")) and v != "":
                run[k] = float(v)
        runs.append(run)
    return runs


# --------------------------------------------------------------------------- analysis


def targets_from_pilot(pilot: dict, epoch: int = TARGET_EPOCH) -> dict:
    """The target rule: the pilot's validation accuracy and NLL at ``epoch``."""
    return {
        "epoch": epoch,
        "accuracy": pilot["accuracy_curve"][epoch - 1],
        "nll": pilot["nll_curve"][epoch - 1],
    }


def _describe(values: list[float]) -> dict:
    return {
        "n": len(values),
        "mean": statistics.fmean(values) if values else math.nan,
        "sd": statistics.stdev(values) if len(values) > 1 else math.nan,
        "median": statistics.median(values) if values else math.nan,
    }


def compare(a: list[float], b: list[float], pairs: list[tuple[float, float]]) -> dict:
    """Welch's t, Mann-Whitney U (two-sided), and paired t / Wilcoxon on ``pairs``."""
    from scipy import stats

    out: dict = {"a": _describe(a), "b": _describe(b)}
    nan = {"statistic": math.nan, "p": math.nan}
    if len(a) > 1 and len(b) > 1 and (statistics.pvariance(a) + statistics.pvariance(b)) > 0:
        t = stats.ttest_ind(a, b, equal_var=False)
        out["welch"] = {"statistic": float(t.statistic), "p": float(t.pvalue)}
    else:
        out["welch"] = dict(nan)
    if a and b:
        u = stats.mannwhitneyu(a, b, alternative="two-sided")
        out["mannwhitney"] = {"statistic": float(u.statistic), "p": float(u.pvalue)}
    else:
        out["mannwhitney"] = dict(nan)
    # one-sided: a < b (for epochs to target: "a converges in fewer epochs")
    less = {}
    if len(a) > 1 and len(b) > 1 and (statistics.pvariance(a) + statistics.pvariance(b)) > 0:
        less["welch"] = float(stats.ttest_ind(a, b, equal_var=False, alternative="less").pvalue)
    if a and b:
        less["mannwhitney"] = float(stats.mannwhitneyu(a, b, alternative="less").pvalue)
    diffs = [x - y for x, y in pairs]
    out["diff"] = _describe(diffs)
    if len(diffs) > 1 and any(d != 0 for d in diffs) and statistics.pvariance(diffs) > 0:
        t = stats.ttest_rel([x for x, _ in pairs], [y for _, y in pairs])
        out["paired_t"] = {"statistic": float(t.statistic), "p": float(t.pvalue)}
        ci = t.confidence_interval(0.95)
        out["diff"]["ci95"] = (float(ci.low), float(ci.high))
        w = stats.wilcoxon(diffs, zero_method="pratt")
        out["wilcoxon"] = {"statistic": float(w.statistic), "p": float(w.pvalue)}
        xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
        less["paired_t"] = float(stats.ttest_rel(xs, ys, alternative="less").pvalue)
        less["wilcoxon"] = float(
            stats.wilcoxon(diffs, zero_method="pratt", alternative="less").pvalue
        )
    else:
        out["paired_t"] = dict(nan)
        out["wilcoxon"] = dict(nan)
    out["p_less"] = less
    return out


def _pairs(by_arm: dict, key) -> tuple[list, list, list]:
    ind = {r["seed"]: key(r) for r in by_arm["independent"]}
    sh = {r["seed"]: key(r) for r in by_arm["shared"]}
    pairs = [(ind[s], sh[s]) for s in sorted(set(ind) & set(sh))]
    return [ind[s] for s in sorted(ind)], [sh[s] for s in sorted(sh)], pairs


def _holm(ps: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and is not counted)."""
    idx = sorted((i for i, p in enumerate(ps) if not math.isnan(p)), key=lambda i: ps[i])
    out = [math.nan] * len(ps)
    running = 0.0
    for k, i in enumerate(idx):
        running = max(running, min(1.0, (len(idx) - k) * ps[i]))
        out[i] = running
    return out


def analyze(runs: list[dict], target_epoch: int = TARGET_EPOCH) -> dict:
    """Everything the report says, from the CSV rows alone."""
    pilots = [r for r in runs if r["arm"] == "pilot"]
    if not pilots:
        raise ValueError("no pilot row in the CSV: the target comes from the pilot run")
    targets = targets_from_pilot(pilots[-1], target_epoch)
    study = [r for r in runs if r["arm"] in ARMS]
    by_arm = {arm: sorted((r for r in study if r["arm"] == arm), key=lambda r: r["seed"])
              for arm in ARMS}  # fmt: skip
    max_ep = min((r["epochs"] for r in study), default=0)
    for r in study:
        acc, nll = r["accuracy_curve"][:max_ep], r["nll_curve"][:max_ep]
        ea = epochs_to(acc, targets["accuracy"], higher_is_better=True)
        en = epochs_to(nll, targets["nll"], higher_is_better=False)
        r["ett_acc"] = ea if ea is not None else max_ep + 1
        r["ett_nll"] = en if en is not None else max_ep + 1
        r["censored_acc"] = ea is None
        r["censored_nll"] = en is None
        r["acc_mean_1_12"] = statistics.fmean(acc[:DEFAULT_EPOCHS])
    endpoints = {
        "epochs to target accuracy": lambda r: r["ett_acc"],
        "epochs to target NLL": lambda r: r["ett_nll"],
        f"accuracy at epoch {DEFAULT_EPOCHS}": lambda r: r["accuracy_curve"][DEFAULT_EPOCHS - 1],
        f"NLL at epoch {DEFAULT_EPOCHS}": lambda r: r["nll_curve"][DEFAULT_EPOCHS - 1],
        f"accuracy at epoch {max_ep}": lambda r: r["accuracy_curve"][max_ep - 1],
        f"NLL at epoch {max_ep}": lambda r: r["nll_curve"][max_ep - 1],
        f"mean accuracy over epochs 1-{DEFAULT_EPOCHS}": lambda r: r["acc_mean_1_12"],
    }
    if max_ep < DEFAULT_EPOCHS:  # tiny runs: epoch-12 endpoints do not exist
        endpoints = {k: v for k, v in endpoints.items() if str(DEFAULT_EPOCHS) not in k}
    tests = {}
    for name, key in endpoints.items():
        a, b, pairs = _pairs(by_arm, key)
        tests[name] = compare(a, b, pairs) | {"per_seed": pairs}
    secondary = [n for n in tests if n != "epochs to target accuracy"]
    holm = _holm([tests[n]["paired_t"]["p"] for n in secondary])
    for n, ph in zip(secondary, holm, strict=True):
        tests[n]["paired_t_holm"] = ph
    tests["epochs to target accuracy"]["paired_t_holm"] = math.nan  # primary: not adjusted
    sensitivity = {}
    pilot = pilots[-1]
    for ep in sorted({max(1, target_epoch - 2), target_epoch, target_epoch + 2}):
        if ep > len(pilot["accuracy_curve"]):
            continue
        t = pilot["accuracy_curve"][ep - 1]
        key = lambda r, t=t: (epochs_to(r["accuracy_curve"][:max_ep], t, higher_is_better=True)
                              or max_ep + 1)  # fmt: skip
        a, b, pairs = _pairs(by_arm, key)
        sensitivity[ep] = {"target": t} | compare(a, b, pairs)
    curves = {}
    for arm in ARMS:
        for k in ("accuracy", "nll"):
            cols = list(zip(*[r[f"{k}_curve"][:max_ep] for r in by_arm[arm]], strict=False))
            curves[(arm, k)] = [
                (statistics.fmean(c), statistics.stdev(c) if len(c) > 1 else 0.0) for c in cols
            ]
    return {
        "targets": targets,
        "pilot": pilot,
        "by_arm": by_arm,
        "max_epochs": max_ep,
        "tests": tests,
        "sensitivity": sensitivity,
        "curves": curves,
    }


# --------------------------------------------------------------------------- report


def _f(x: float, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _p(x: float) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return f"{x:.3g}"


def _test_line(name: str, t: dict, nd: int = 3) -> str:
    ci = t["diff"].get("ci95")
    ci_s = f"[{_f(ci[0], nd)}, {_f(ci[1], nd)}]" if ci else "n/a"
    return (
        f"| {name} | {_f(t['a']['mean'], nd)} ± {_f(t['a']['sd'], nd)} "
        f"| {_f(t['b']['mean'], nd)} ± {_f(t['b']['sd'], nd)} "
        f"| {_f(t['diff']['mean'], nd)} {ci_s} "
        f"| {_p(t['welch']['p'])} | {_p(t['mannwhitney']['p'])} "
        f"| {_p(t['paired_t']['p'])} | {_p(t['wilcoxon']['p'])} "
        f"| {_p(t.get('paired_t_holm', math.nan))} |"
    )


def render_markdown(res: dict, meta: dict) -> str:
    tg = res["targets"]
    by_arm = res["by_arm"]
    n_ind, n_sh = len(by_arm["independent"]), len(by_arm["shared"])
    max_ep = res["max_epochs"]
    env = res["pilot"]
    lines = [
        "# Independent vs shared per-rank augmentation: epochs to a target (CPU)",
        "",
        f"Date {env.get('date', '?')}, host {env.get('host', '?')} ({env.get('cpu', '?')}), "
        f"torch {env.get('torch', '?')}, spar {env.get('spar', '?')} "
        f"(source digest {env.get('spar_src', '?')}). Produced by `bench/bench_augment.py`; "
        "redo the analysis with `python bench/bench_augment.py --analyze-only`.",
        "",
        "## Setup",
        "",
        "- Job: the default `spar train` (Bayesian CNN, scikit-learn digits 0-7 for training and "
        "validation, 8-9 as OOD), `--mode sp` on 2 gloo CPU ranks (sample axis 2, 4 of the S=8 "
        "Monte Carlo samples per rank), global batch 64, Adam lr 3e-3, KL weight 1, init sigma "
        "0.01, mean-over-samples ELBO. Only `--augment`, `--seed` and `--epochs` differ from the "
        "defaults.",
        f"- `--epochs {max_ep}` instead of 12: headroom for late runs; the learning rate is "
        "constant, so epochs 1-12 are those of a default-length run.",
        "- Driven through the real CLI: `spar.cli.main(['train', ...])` under `torchrun "
        "--nproc_per_node 2`, one process per rank, with one hook that evaluates the full "
        "predictive (`spar._job.evaluate`, all S samples gathered) on the validation split "
        "(20 % of digits 0-7, 288 images; OOD: 354 images of 8 and 9) after every epoch. "
        "The hook's last evaluation equals `metrics.json` in every run (checked). "
        + meta.get("hook_check", "Hook non-intrusiveness: not checked in this invocation."),
        _code_versions(res, meta),
        f"- Arms: `independent` ({n_ind} seeds), `shared` ({n_sh} seeds), seeds "
        f"{_seed_range(by_arm)}; the arms of a seed differ only in rank 1's augmentation "
        "stream (same split, init, batch order, weight noise and rank-0 augmentation), so the "
        "seed pairs the runs.",
        "",
        "## Target (fixed by rule before the study)",
        "",
        f"The validation metrics of the default `spar train` run (seed 0, `independent`, "
        f"12 epochs; seed 0 is not in the study) at epoch {tg['epoch']} (about 2/3 of its "
        f"epochs): **accuracy >= {tg['accuracy']:.4f}** (primary) and **NLL <= "
        f"{tg['nll']:.4f}** (secondary). Epochs to target = first epoch whose evaluation "
        f"reaches it; a run that never does is censored at {max_ep + 1}.",
        "",
        "## Results",
        "",
        "Per seed (epochs to target accuracy / NLL; accuracy and NLL at epoch 12 and at the "
        "last epoch):",
        "",
        "| seed | indep. ep→acc | shared ep→acc | indep. ep→NLL | shared ep→NLL "
        f"| indep. acc@12 | shared acc@12 | indep. NLL@12 | shared NLL@12 "
        f"| indep. acc@{max_ep} | shared acc@{max_ep} | indep. NLL@{max_ep} "
        f"| shared NLL@{max_ep} |",
        "|---:|" + "---:|" * 12,
    ]
    ind = {r["seed"]: r for r in by_arm["independent"]}
    sh = {r["seed"]: r for r in by_arm["shared"]}

    def cell(r, k, nd=4):
        if r is None:
            return "-"
        if k.startswith("ett"):
            return f"{r[k]}" + ("*" if r[k.replace("ett", "censored")] else "")
        curve, ep = k.split("@")
        return f"{r[curve + '_curve'][int(ep) - 1]:.{nd}f}"

    for s in sorted(set(ind) | set(sh)):
        a, b = ind.get(s), sh.get(s)
        cells = [cell(a, "ett_acc"), cell(b, "ett_acc"), cell(a, "ett_nll"), cell(b, "ett_nll")]
        if max_ep >= DEFAULT_EPOCHS:
            cells += [cell(a, "accuracy@12"), cell(b, "accuracy@12")]
            cells += [cell(a, "nll@12"), cell(b, "nll@12")]
        else:
            cells += ["-"] * 4
        cells += [cell(a, f"accuracy@{max_ep}"), cell(b, f"accuracy@{max_ep}")]
        cells += [cell(a, f"nll@{max_ep}"), cell(b, f"nll@{max_ep}")]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    cens = {
        arm: tuple(sum(r[f"censored_{k}"] for r in by_arm[arm]) for k in ("acc", "nll"))
        for arm in ARMS
    }
    lines += [
        "",
        f"`*` = censored (target not reached in {max_ep} epochs; counted as {max_ep + 1}). "
        f"Censored runs (acc / NLL): independent {cens['independent'][0]} / "
        f"{cens['independent'][1]}, shared {cens['shared'][0]} / {cens['shared'][1]}.",
        "",
        "Summary and tests (mean ± sd; difference = independent − shared, mean over seeds with "
        "the paired t 95 % CI; all p two-sided: Welch's t, Mann-Whitney U, paired t, Wilcoxon "
        "signed-rank by seed with Pratt's treatment of zero differences; the last column "
        "adjusts the paired t p of the secondary endpoints for their number, Holm's method):",
        "",
        "| endpoint | independent | shared | difference [95 % CI] | Welch p | Mann-Whitney p "
        "| paired t p | Wilcoxon p | paired t p, Holm |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in res["tests"].items():
        lines.append(_test_line(name, t, nd=2 if name.startswith("epochs") else 4))
    stat_lines = []
    for name in ("epochs to target accuracy", "epochs to target NLL"):
        t = res["tests"][name]
        stat_lines.append(
            f"- {name}: Welch t = {_f(t['welch']['statistic'], 3)} (p = {_p(t['welch']['p'])}); "
            f"Mann-Whitney U = {_f(t['mannwhitney']['statistic'], 1)} "
            f"(p = {_p(t['mannwhitney']['p'])}); paired t = {_f(t['paired_t']['statistic'], 3)} "
            f"(p = {_p(t['paired_t']['p'])}); Wilcoxon W = {_f(t['wilcoxon']['statistic'], 1)} "
            f"(p = {_p(t['wilcoxon']['p'])})."
        )
    for name in ("epochs to target accuracy", "epochs to target NLL"):
        pl = res["tests"][name]["p_less"]
        stat_lines.append(
            f"- {name}, one-sided (H1: independent needs fewer epochs, the paper's claim): "
            + ", ".join(f"{k} p = {_p(v)}" for k, v in pl.items())
            + "."
        )
    lines += ["", "Test statistics:", "", *stat_lines, ""]
    lines += [
        "Sensitivity of the primary endpoint to the target (the pilot's accuracy at other "
        "epochs; same tests):",
        "",
        "| pilot epoch | target acc | independent | shared | difference [95 % CI] | Welch p "
        "| Mann-Whitney p | paired t p | Wilcoxon p |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ep, t in res["sensitivity"].items():
        row = _test_line("x", t, nd=2).split("|", 2)[2].rsplit("|", 2)[0] + "|"  # no Holm
        lines.append(f"| {ep} | {t['target']:.4f} |{row}")
    lines += [
        "",
        "![validation curves](augment_cpu.png)",
        "",
        "## Conclusion",
        "",
        conclusion(res),
        "",
        "## Caveats",
        "",
        "- One small task (8x8 digits, 1155 training images, 19 steps per epoch) and one "
        "grid (2 sample ranks): with only 2 ranks, `independent` gives each step 2 augmented "
        "views of the batch instead of 1; the effect may grow with the sample axis, which this "
        "study does not test.",
        "- Validation accuracy moves in steps of 1/288 and is evaluated once per epoch, so "
        "epochs-to-target is coarse (integers, many ties); the rank tests use the normal "
        "approximation with tie correction.",
        "- The target comes from one pilot run (rule fixed in advance); the sensitivity table "
        "shows the answer at neighbouring targets.",
        _drops(res),
        "- Only the primary endpoint (epochs to the target accuracy) is confirmatory; the "
        "other rows are secondary: their p-values are nominal, and only the last column "
        "(paired t, Holm) accounts for their number.",
        "- CPU wall time on a shared 2-core machine with other jobs running: times per epoch "
        "are not comparable across runs, which is why the endpoint is epochs, not seconds.",
    ]
    if meta.get("wall"):
        lines += ["", meta["wall"]]
    if meta.get("verify_minutes"):
        lines += [
            f"Reruns of `--verify` (minutes): {' + '.join(map(str, meta['verify_minutes']))}."
        ]
    return "\n".join(lines) + "\n"


def _code_versions(res: dict, meta: dict) -> str:
    """One bullet on the code versions the runs used, and the rerun check (``--verify``)."""
    runs = [res["pilot"], *(r for arm in ARMS for r in res["by_arm"][arm])]
    srcs = sorted({r.get("spar_src", "") for r in runs})
    text = (
        f"- Code: other engineers edited spar while the study ran, so the runs carry "
        f"{len(srcs)} different `spar_src` digests (column `spar_src` of the CSV)."
    )
    checks = meta.get("verify", [])
    if checks:
        same = sum(c["identical"] for c in checks)
        now = sorted({c["new_src"] for c in checks})
        names = ", ".join(f"{c['arm']} {c['seed']}" for c in checks)
        text += (
            f" Check (`--verify`): {len(checks)} runs ({names}; every seed whose two arms ran "
            f"with different digests, the pilot and the last seed) were rerun with the code "
            f"at digest {', '.join(now)}: {same} of {len(checks)} reproduce their stored "
            "per-epoch accuracy and NLL curves exactly, so the edits did not change the "
            "numbers of this job."
            if same == len(checks)
            else f" {len(checks) - same} of them DIFFER: the code changes altered the numbers."
        )
    elif len(srcs) > 1:
        text += " Not checked with `--verify`."
    return text


def _drops(res: dict) -> str:
    """A caveat naming the runs whose accuracy fell by > 0.02 in their last epoch."""
    n = res["max_epochs"]
    drops = [
        f"{r['arm']} seed {r['seed']} ({r['accuracy_curve'][n - 2]:.3f} -> "
        f"{r['accuracy_curve'][n - 1]:.3f})"
        for arm in ARMS
        for r in res["by_arm"][arm]
        if n > 1 and r["accuracy_curve"][n - 2] - r["accuracy_curve"][n - 1] > 0.02
    ]
    if not drops:
        return f"- No run lost more than 0.02 accuracy in its last epoch ({n})."
    return (
        f"- Runs whose accuracy fell by more than 0.02 in the last epoch ({n}), a late instability "
        f"(constant learning rate) that inflates the spread of the epoch-{n} "
        f"endpoints: {'; '.join(drops)}."
    )


def _seed_range(by_arm: dict) -> str:
    seeds = sorted({r["seed"] for arm in ARMS for r in by_arm[arm]})
    if seeds and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def conclusion(res: dict) -> str:
    t = res["tests"]["epochs to target accuracy"]
    tn = res["tests"]["epochs to target NLL"]
    d, p_list = t["diff"]["mean"], [t["welch"]["p"], t["mannwhitney"]["p"]]
    p_list += [t["paired_t"]["p"], t["wilcoxon"]["p"]]
    p_min = min((p for p in p_list if not math.isnan(p)), default=math.nan)
    ma, mb = t["a"]["mean"], t["b"]["mean"]
    if not math.isnan(p_min) and p_min < 0.05 and d < 0:
        verdict = (
            f"Independent augmentation reached the target accuracy in fewer epochs "
            f"({ma:.2f} vs {mb:.2f} on average, {d:+.2f} epochs per paired seed, smallest "
            f"p = {p_min:.3g})."
        )
    elif not math.isnan(p_min) and p_min < 0.05 and d > 0:
        verdict = (
            f"Independent augmentation reached the target accuracy in *more* epochs "
            f"({ma:.2f} vs {mb:.2f}, {d:+.2f} epochs per paired seed, smallest p = {p_min:.3g})."
        )
    else:
        lo, hi = t["diff"].get("ci95", (math.nan, math.nan))
        verdict = (
            f"Primary endpoint: no significant difference in epochs to the target accuracy "
            f"(independent {ma:.2f} vs shared {mb:.2f} epochs on average, {d:+.2f} per paired "
            f"seed, 95 % CI [{lo:.2f}, {hi:.2f}]; all p >= {p_min:.2g}). On this endpoint the "
            f"paper's claim is not confirmed at this sample size; an effect smaller than about "
            f"{max(abs(lo), abs(hi)):.1f} epochs cannot be ruled out."
        )
    dn = tn["diff"]["mean"]
    pn = min(
        (p for p in (tn["welch"]["p"], tn["mannwhitney"]["p"], tn["paired_t"]["p"],
                     tn["wilcoxon"]["p"]) if not math.isnan(p)),
        default=math.nan,
    )  # fmt: skip
    verdict += (
        f" Epochs to the target NLL: independent {tn['a']['mean']:.2f} vs shared "
        f"{tn['b']['mean']:.2f} ({dn:+.2f} per paired seed, smallest p = {_p(pn)})."
    )
    nominal = [
        f"{name} (independent − shared = {t['diff']['mean']:+.4g}, paired t p = "
        f"{_p(t['paired_t']['p'])}, Holm-adjusted {_p(t.get('paired_t_holm', math.nan))})"
        for name, t in res["tests"].items()
        if not name.startswith("epochs to target accuracy")
        and min(
            (p for p in (t["welch"]["p"], t["mannwhitney"]["p"], t["paired_t"]["p"],
                         t["wilcoxon"]["p"]) if not math.isnan(p)),
            default=1.0,
        ) < 0.05
    ]  # fmt: skip
    better = [
        name
        for name, t in res["tests"].items()
        if name != "epochs to target accuracy"
        and (t["diff"]["mean"] > 0) == name.startswith(("accuracy", "mean accuracy"))
        and t["diff"]["mean"] != 0
    ]
    n_sec = len(res["tests"]) - 1
    verdict += (
        f" Direction: independent augmentation did better on {len(better)} of the {n_sec} "
        f"secondary endpoints by the sign of the mean difference ({', '.join(better) or 'none'})."
    )
    if nominal:
        verdict += (
            " Secondary endpoints with a nominal p < 0.05 in at least one test (uncorrected "
            "for multiple comparisons): " + "; ".join(nominal) + "."
        )
    else:
        verdict += " No secondary endpoint differs at nominal p < 0.05."
    return verdict


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = {"independent": "tab:blue", "shared": "tab:orange"}
    for ax, k, tgt in zip(axes[:2], ("accuracy", "nll"), ("accuracy", "nll"), strict=True):
        for arm in ARMS:
            ms = res["curves"][(arm, k)]
            if not ms:
                continue
            x = list(range(1, len(ms) + 1))
            m = [v[0] for v in ms]
            s = [v[1] for v in ms]
            n = len(res["by_arm"][arm])
            ax.plot(x, m, color=colors[arm], marker="o", ms=3, label=f"{arm} (n={n})")
            ax.fill_between(x, [a - b for a, b in zip(m, s, strict=True)],
                            [a + b for a, b in zip(m, s, strict=True)],
                            color=colors[arm], alpha=0.2)  # fmt: skip
        ax.axhline(res["targets"][tgt], color="k", ls="--", lw=1, label="target")
        ax.set(xlabel="epoch", ylabel=f"validation {'NLL' if k == 'nll' else k}")
        if k == "accuracy":
            ax.set_ylim(max(0.0, res["targets"]["accuracy"] - 0.15), 1.0)
        else:
            ax.set_yscale("log")
        ax.legend()
    # paired by seed: independent - shared validation accuracy, mean and 95 % t interval
    ind = {r["seed"]: r["accuracy_curve"] for r in res["by_arm"]["independent"]}
    sh = {r["seed"]: r["accuracy_curve"] for r in res["by_arm"]["shared"]}
    seeds = sorted(set(ind) & set(sh))
    ax = axes[2]
    if len(seeds) > 1:
        n_ep = res["max_epochs"]
        diffs = [[ind[s][e] - sh[s][e] for s in seeds] for e in range(n_ep)]
        x = list(range(1, n_ep + 1))
        m = [statistics.fmean(d) for d in diffs]
        q = stats.t.ppf(0.975, len(seeds) - 1)
        h = [q * statistics.stdev(d) / math.sqrt(len(d)) for d in diffs]
        ax.plot(x, m, color="k", marker="o", ms=3, label=f"mean over {len(seeds)} seeds")
        ax.fill_between(x, [a - b for a, b in zip(m, h, strict=True)],
                        [a + b for a, b in zip(m, h, strict=True)],
                        color="k", alpha=0.15, label="95 % CI")  # fmt: skip
        ax.axhline(0, color="k", lw=0.8)
        ax.legend()
    ax.set(xlabel="epoch", ylabel="accuracy, independent − shared")
    fig.suptitle("spar train (digits, sp over 2 ranks): mean ± sd over seeds; right: paired")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(
    csv_path: Path,
    md_path: Path,
    png_path: Path | None,
    meta: dict,
    target_epoch: int = TARGET_EPOCH,
) -> dict:
    res = analyze(read_runs(csv_path), target_epoch)
    md_path.write_text(render_markdown(res, meta))
    if png_path is not None:
        plot(res, png_path)
    return res


# --------------------------------------------------------------------------- verify


def verify(csv_path: Path, which: list[tuple[str, int]], runs_dir: Path) -> list[dict]:
    """Rerun ``(arm, seed)`` runs of the CSV with the code as it is now and compare their
    per-epoch curves with the stored ones (the stored precision, 6 significant digits).

    Other people edit spar while a study runs; this says whether the numbers of a run depend
    on the code version it ran with (the CSV's ``spar_src`` column)."""
    stored = {(r["arm"], r["seed"]): r for r in read_runs(csv_path)}
    out = []
    for arm, seed in which:
        old = stored[(arm, seed)]
        train_arm = "independent" if arm == "pilot" else arm
        res = run_one(train_arm, seed, old["epochs"], runs_dir / f"verify-{arm}-{seed}")
        new = make_row(arm, seed, res, common.env_info())
        same = all(_split(new[f"{k}_curve"]) == old[f"{k}_curve"] for k in ("accuracy", "nll"))
        out.append(
            {"arm": arm, "seed": seed, "identical": same, "old_src": old.get("spar_src", ""),
             "new_src": new["spar_src"]}
        )  # fmt: skip
        verdict = "identical" if same else "DIFFERENT"
        src = f"stored with spar_src {old.get('spar_src')}, now {new['spar_src']}"
        print(f"verify {arm} seed {seed}: {verdict} curves ({src})", flush=True)
    return out


# --------------------------------------------------------------------------- main


def _parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            seeds += list(range(int(lo), int(hi) + 1))
        elif part:
            seeds.append(int(part))
    return seeds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":  # one rank under torchrun (internal)
        curve = argv[argv.index("--curve") + 1]
        return _worker(curve, argv[argv.index("--") + 1 :]) or 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1-15", help="study seeds, e.g. 1-10 or 1,2,5 (not 0)")
    p.add_argument("--epochs", type=int, default=16, help="epochs per study run (default 16)")
    p.add_argument("--results", type=Path, default=common.RESULTS_DIR, help="output folder")
    p.add_argument("--runs-dir", type=Path, default=None, help="run folders (default: temp)")
    p.add_argument("--analyze-only", "--plot-only", action="store_true", dest="analyze_only")
    p.add_argument("--no-check-hook", dest="check_hook", action="store_false")
    p.add_argument(
        "--pilot-epochs", type=int, default=DEFAULT_EPOCHS, help="pilot length (default 12)"
    )
    p.add_argument("--budget-min", type=float, default=48.0, help="stop adding runs after this")
    p.add_argument(
        "--target-epoch",
        type=int,
        default=TARGET_EPOCH,
        help=f"pilot epoch that sets the target (default {TARGET_EPOCH}; smaller for smoke tests)",
    )
    p.add_argument(
        "--verify",
        default="",
        help="rerun runs of the CSV and compare curves: ARM:SEED,... (e.g. pilot:0,shared:1)",
    )
    args = p.parse_args(argv)
    csv_path = args.results / CSV_NAME
    md_path = csv_path.with_suffix(".md")
    png_path = csv_path.with_suffix(".png")
    meta_path = args.results / "augment_cpu.meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if args.verify:
        which = [(w.split(":")[0], int(w.split(":")[1])) for w in args.verify.split(",")]
        runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="spar-augment-"))
        t0 = time.perf_counter()
        checks = verify(csv_path, which, runs_dir)
        meta.setdefault("verify", []).extend(checks)
        meta.setdefault("verify_minutes", []).append(round((time.perf_counter() - t0) / 60, 1))
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        return 0 if all(c["identical"] for c in checks) else 1
    if not args.analyze_only:
        t_start = time.perf_counter()
        runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="spar-augment-"))
        seeds = _parse_seeds(args.seeds)
        if 0 in seeds:
            p.error("seed 0 is the pilot (it sets the target); use other study seeds")
        done = {(r["arm"], int(r["seed"])) for r in common.read_rows(csv_path)}
        env = common.env_info()
        if ("pilot", 0) not in done:
            print(f"pilot: spar train default (seed 0, independent, {args.pilot_epochs} epochs)")
            res = run_one("independent", 0, args.pilot_epochs, runs_dir / "pilot")
            common.append_rows(csv_path, [make_row("pilot", 0, res, env)])
            if args.check_hook:
                plain = plain_default_run(runs_dir / "plain")
                keys = ("accuracy", "nll", "ece", "brier", "ood_auroc_mutual_information")
                same = all(plain[k] == res["metrics"][k] for k in keys)
                meta["hook_check"] = (
                    "Hook non-intrusiveness: the plain `spar train` default run (spar's own "
                    "launcher, no hook) and the hooked pilot wrote "
                    + ("bit-identical" if same else "DIFFERENT")
                    + f" final metrics ({', '.join(keys)})."
                )
                if not same:
                    print("WARNING: hooked and plain runs differ:", plain, res["metrics"])
                meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        pilot = [r for r in read_runs(csv_path) if r["arm"] == "pilot"][-1]
        targets = targets_from_pilot(pilot, args.target_epoch)
        print(f"targets (pilot epoch {targets['epoch']}): acc >= {targets['accuracy']:.4f}, "
              f"NLL <= {targets['nll']:.4f}")  # fmt: skip
        for i, seed in enumerate(seeds):
            if (time.perf_counter() - t_start) / 60 > args.budget_min:
                print(f"budget of {args.budget_min} min reached: stopping before seed {seed}")
                break
            order = ARMS if i % 2 == 0 else ARMS[::-1]  # alternate to balance machine drift
            for arm in order:
                if (arm, seed) in done:
                    continue
                res = run_one(arm, seed, args.epochs, runs_dir / f"{arm}-{seed}")
                row = make_row(arm, seed, res, common.env_info())  # per row: code may change
                common.append_rows(csv_path, [row])
                acc = _split(row["accuracy_curve"])
                ett = epochs_to(acc, targets["accuracy"], higher_is_better=True)
                wall = res["wall_s"]
                print(f"{arm:>11} seed {seed:>3}: epochs to target acc {ett}, "
                      f"acc@{len(acc)} {acc[-1]:.4f}, {wall:.0f} s", flush=True)  # fmt: skip
        total = time.perf_counter() - t_start
        meta.setdefault("wall_minutes", []).append(round(total / 60, 1))
        meta["wall"] = (
            "Wall time of the study invocations (minutes): "
            + " + ".join(map(str, meta["wall_minutes"]))
            + (f" = {sum(meta['wall_minutes']):.1f}." if len(meta["wall_minutes"]) > 1 else ".")
        )
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    res = report(csv_path, md_path, png_path, meta, args.target_epoch)
    t = res["tests"]["epochs to target accuracy"]
    print(f"wrote {md_path}, {png_path}")
    print(conclusion(res))
    print(f"(Welch p {_p(t['welch']['p'])}, Mann-Whitney p {_p(t['mannwhitney']['p'])}, "
          f"paired t p {_p(t['paired_t']['p'])}, Wilcoxon p {_p(t['wilcoxon']['p'])})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
