"""CPU noise generator: normals per second of each generator, and start-up time.

Question: how fast does spar draw its keyed Philox normals on CPU (native C library vs the
eager torch generator, torch.randn as the peers' yardstick), in the access patterns of the
layers, and what does the native library cost a fresh process?

Throughput, for one ``R x C`` weight at ``S`` samples (default 1024 x 1024, S = 16):

* ``normal``: ``rng.normal`` of all S samples (eps materialized in a new tensor);
* ``sample``: ``rng.sample`` of all S samples (``mu + sigma * eps`` written, eps never
  stored) into a new tensor: for 64 MB, fresh pages from the OS (page faults) every call;
* ``sample_ws``: the same into a preallocated workspace (``out=``): the generator itself;
* ``sample_chunked``: the torch backend's pattern: the S samples in chunks of at most
  ``SPAR_CHUNK_NUMEL`` weight elements (default 2 M: 2 samples of a 1 M weight) per call,
  each into the same chunk-sized workspace;
* ``eps_dot``: ``out += sum_s g_s * eps_s`` (the grad-rho reduction) over the S samples;
* ``small_sample``: a 64 x 128 weight at S = 8 per call: the per-call overhead.

for providers ``native`` (at torch's thread count and at 1 thread), ``eager``
(``SPAR_RNG=eager``) and ``torch_randn`` (``torch.randn`` of the same shape; ``normal``
only). ``--legacy FILE`` also times an older ``spar/rng.py`` (e.g. the removed
``torch.compile`` generator: ``git show a160627:spar/rng.py > /tmp/rng_compiled.py``) as
provider ``legacy`` (``normal``, ``sample``, ``small_sample``, timed after compiling); the
``legacy`` rows in ``results/rng_cpu.csv`` are that file.

Start-up (``--startup``): seconds from ``import spar`` to the first ``rng.sample`` result
(64 x 128, S = 8) in a fresh process, for ``eager``, ``native_cold`` (empty cache
directory: includes the C build) and ``native_warm`` (second process, same cache).

Rows go to ``bench/results/rng_cpu.csv`` (``normals_per_s`` in millions). The machine may
be shared: rounds wait for other processes to quiet down (``others`` records the share of
the CPUs they used anyway).

    python bench/bench_rng.py                 # throughput, 2 threads
    python bench/bench_rng.py --startup       # and start-up
    python bench/bench_rng.py --quick         # smaller, fewer rounds (a smoke test)
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import inspect
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, append_rows, env_info, environ, time_interleaved  # noqa: E402

from spar import _native, rng  # noqa: E402

SEED, STEP, PID = 1234, 77, rng.param_id("bench.weight")


def _chunk_numel() -> int:
    return int(os.environ.get("SPAR_CHUNK_NUMEL", 1 << 21))


def _cases(R: int, C: int, S: int, mod=rng) -> dict[str, tuple[int, object]]:
    """name -> (normals drawn per call, callable)."""
    mu, sig = torch.randn(R, C), torch.rand(R, C) + 0.01
    g = torch.randn(S, R, C)
    acc = torch.zeros(R, C)
    small_mu, small_sig = torch.randn(64, 128), torch.rand(64, 128)
    per = max(1, min(S, _chunk_numel() // (R * C)))
    has_out = "out" in inspect.signature(mod.sample).parameters
    full, workspace = torch.empty(S, R, C), torch.empty(per, R, C)

    def chunked():
        for lo in range(0, S, per):
            hi = min(S, lo + per)
            if has_out:
                mod.sample(SEED, STEP, PID, lo, hi - lo, mu, sig, out=workspace[: hi - lo])
            else:
                mod.sample(SEED, STEP, PID, lo, hi - lo, mu, sig)

    cases = {
        "normal": (S * R * C, lambda: mod.normal(SEED, STEP, PID, 0, S, (R, C))),
        "sample": (S * R * C, lambda: mod.sample(SEED, STEP, PID, 0, S, mu, sig)),
        "sample_chunked": (S * R * C, chunked),
        "small_sample": (8 * 64 * 128,
                         lambda: mod.sample(SEED, STEP, PID, 0, 8, small_mu, small_sig)),
    }  # fmt: skip
    if has_out:
        into_full = lambda: mod.sample(SEED, STEP, PID, 0, S, mu, sig, out=full)  # noqa: E731
        cases["sample_ws"] = (S * R * C, into_full)
    if hasattr(mod, "eps_dot"):
        cases["eps_dot"] = (S * R * C, lambda: mod.eps_dot(SEED, STEP, PID, 0, S, g, acc))
    return cases


def _load_legacy(path: str):
    spec = importlib.util.spec_from_file_location("spar_rng_legacy", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def throughput(args) -> list[dict]:
    R, C, S = args.rows, args.cols, args.samples
    threads = torch.get_num_threads()
    lib = _native.get()
    if lib is None:
        raise SystemExit(f"native generator unavailable: {_native.error()}")
    cases = _cases(R, C, S)
    fns, work = {}, {}

    def with_env(fn, env, nthreads):
        def call():
            torch.set_num_threads(nthreads)
            try:
                with environ(env):
                    fn()
            finally:
                torch.set_num_threads(threads)

        return call

    for name, (n, fn) in cases.items():
        for provider, env, nt in (("native", {"SPAR_RNG": "native"}, threads),
                                  ("native_1thread", {"SPAR_RNG": "native"}, 1),
                                  ("eager", {"SPAR_RNG": "eager"}, threads)):  # fmt: skip
            fns[(name, provider)] = with_env(fn, env, nt)
            work[(name, provider)] = n
    fns[("normal", "torch_randn")] = lambda: torch.randn(S, R, C)
    work[("normal", "torch_randn")] = S * R * C
    if args.legacy:
        legacy = _load_legacy(args.legacy)
        lcases = _cases(R, C, S, legacy)
        env = {"SPAR_RNG_COMPILE": "1"}
        for name in ("normal", "sample", "small_sample"):
            n, fn = lcases[name]
            for _ in range(2):  # compile (and specialize) before timing
                with environ(env):
                    fn()
            fns[(name, "legacy")] = with_env(fn, env, threads)
            work[(name, "legacy")] = n
    for fn in fns.values():  # warm up: the native build, allocator, caches
        fn()
    keys = list(fns)
    stats = time_interleaved({f"{k[0]}|{k[1]}": fns[k] for k in keys}, rounds=args.rounds,
                             busy_above=0.15, max_wait=args.max_wait)  # fmt: skip
    rows = []
    for k in keys:
        st = stats[f"{k[0]}|{k[1]}"]
        rows.append({
            "kind": "throughput", "case": k[0], "provider": k[1],
            "rows": R if k[0] != "small_sample" else 64,
            "cols": C if k[0] != "small_sample" else 128,
            "samples": S if k[0] != "small_sample" else 8,
            "threads_used": 1 if k[1] == "native_1thread" else threads,
            "median_ms": round(st.median, 3), "iqr_ms": round(st.iqr, 3),
            "min_ms": round(st.min, 3), "rounds": st.n, "dropped_rounds": st.dropped,
            "others_cpu": round(st.others, 2),
            "normals_per_s_M": round(work[k] / (st.median / 1e3) / 1e6, 1),
            "openmp": int(lib.openmp),
        })  # fmt: skip
    return rows


_STARTUP = """
import time
t0 = time.perf_counter()
import spar
t1 = time.perf_counter()
import torch
from spar import rng
w = rng.sample(1, 2, 3, 0, 8, torch.zeros(64, 128), torch.ones(64, 128))
t2 = time.perf_counter()
from spar import _native
lib = _native.get()
print(t1 - t0, t2 - t0, int(lib is not None and lib.built))
"""


def _fresh(env_extra: dict[str, str]) -> tuple[float, float, int]:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", _STARTUP], env=env, capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    return float(out[0]), float(out[1]), int(out[2])


def startup(args) -> list[dict]:
    from common import wait_for_quiet

    samples: dict[str, list[tuple[float, float, int]]] = {"eager": [], "native_cold": [],
                                                          "native_warm": []}  # fmt: skip
    for _ in range(args.startup_rounds):
        wait_for_quiet(0.15, timeout=args.max_wait / 4)
        samples["eager"].append(_fresh({"SPAR_RNG": "eager"}))
        with tempfile.TemporaryDirectory() as cache:
            env = {"SPAR_RNG": "native", "SPAR_CACHE_DIR": cache}
            wait_for_quiet(0.15, timeout=args.max_wait / 4)
            samples["native_cold"].append(_fresh(env))
            wait_for_quiet(0.15, timeout=args.max_wait / 4)
            samples["native_warm"].append(_fresh(env))
    rows = []
    for provider, runs in samples.items():
        rows.append({
            "kind": "startup", "case": "import_to_first_sample", "provider": provider,
            "rows": 64, "cols": 128, "samples": 8, "rounds": len(runs),
            "startup_s": round(statistics.median(r[1] for r in runs), 3),
            "import_s": round(statistics.median(r[0] for r in runs), 3),
            "built": max(r[2] for r in runs),
        })  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=1024)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--startup", action="store_true", help="also measure start-up")
    p.add_argument("--startup-rounds", type=int, default=3)
    p.add_argument("--legacy", help="an older spar/rng.py to time as provider 'legacy'")
    p.add_argument("--max-wait", type=float, default=120.0,
                   help="seconds to wait in all for a quiet machine")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="256 x 256, S=4, 3 rounds")
    p.add_argument("--out", default=str(RESULTS_DIR / "rng_cpu.csv"))
    args = p.parse_args()
    if args.quick:
        args.rows = args.cols = 256
        args.samples, args.rounds, args.startup_rounds = 4, 3, 1
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    rows = throughput(args)
    if args.startup:
        rows += startup(args)
    info = env_info()
    rows = [{"run_id": run_id, **info, "quick": int(args.quick), **r} for r in rows]
    append_rows(args.out, rows)
    for r in rows:
        if r["kind"] == "throughput":
            rate, others = r["normals_per_s_M"], r["others_cpu"]
            print(f"{r['case']:>15} {r['provider']:>15} {r['median_ms']:>10.2f} ms "
                  f"{rate:>8.1f} M normals/s  (others {others})")  # fmt: skip
        else:
            print(f"{'startup':>15} {r['provider']:>15} {r['startup_s']:>8.2f} s "
                  f"(import spar {r['import_s']:.2f} s)")  # fmt: skip
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
