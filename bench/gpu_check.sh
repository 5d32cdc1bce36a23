#!/usr/bin/env bash
# bench/gpu_check.sh - the one prepared script for the first minutes anyone has a GPU.
#
# What it runs, in order, each step with its own time limit (GPU run; the whole script is
# capped at --budget seconds, 540 by default, so it ends within 9 minutes on one GPU even
# if every step hits its limit):
#
#   step       limit  what
#   env          30 s `spar info`, the nvidia-smi line, python/torch/CUDA/triton versions,
#                     which optional packages import (pytest, sklearn, matplotlib, pynvml,
#                     torch-blue, bayesian-torch), and what Triton needs to build its kernel
#                     launcher on first use: a host C compiler found as Triton looks for one
#                     ($CC, else gcc, else clang), Python.h, a test compile of Python.h with
#                     that compiler, and (GPU run) libcuda.so.1; a missing one is a WARNING
#                     line in env.log and in the summary (Triton would fail to launch kernels)
#   tests       180 s pytest tests/gpu on CUDA tensors, Triton kernels compiled
#                     (TRITON_INTERPRET=0, SPAR_TEST_DEVICE=cuda): every Triton primitive and
#                     every estimator (linear, conv; fp32, bf16) against the torch backend and
#                     spar/ops/reference.py, Philox bit-exactness, a bayesianized CNN through
#                     MonteCarlo, torch.compile (inductor) of Bayesian layers
#   train        90 s `spar train --device cuda --nproc 1 --epochs 1` (digits CNN), `spar eval`
#                     of its checkpoint (the same metrics within 1e-4), and the real-timm
#                     test of tests/test_models.py where timm imports
#   kernels      75 s bench/bench_kernels.py --op linear: S=16,64, B=128, 4096x4096, bf16
#                     (providers: spar_fused, spar_chunked, spar_torch, spar_cuda, peers)
#   conv         60 s bench/bench_kernels.py --op conv: S=8,32, B=32, 64->64 ch, 32x32, 3x3
#   layers       60 s bench/bench_layers.py --device cuda --config mlp small cnn --quick
#                     --no-memory --budget-s 3: timing only (GPU memory is measured in the
#                     kernels and conv steps)
#   cuda         60 s the cuda backend (CuPy + NVRTC; NOT RUN without CuPy): pytest
#                     tests/gpu/test_gpu_cuda.py (Philox integers and normals bit for bit,
#                     every primitive and estimator against Triton, torch and the reference,
#                     determinism, stream, torch.compile), then the sampling kernel's GB/s
#                     (4096x4096 weight, 16 samples, fp32 and bf16 out; cuda and Triton)
#                     against the device's copy bandwidth, into RESULTS/cuda_gpu.csv. The
#                     full step against the Triton path is the spar_cuda row of the kernels
#                     and conv steps. Dry run: the Philox checks of the host build (tests/ops).
#
# Expected on one H100/H200 (estimates, not yet measured): env 10 s, tests 60-120 s (most
# of it compiling Triton kernels and the inductor graph), train 30-50 s, kernels 35-60 s,
# conv 20-40 s, layers 25-45 s, cuda 20-40 s (NVRTC compiles once, ~1 s per process
# without CuPy's cache): about 3.5-5.5 minutes in all, Python start-up included.
# layers, in detail: one process (import torch and spar, CUDA context: ~10 s); 4 timed
# S values (mlp S=1,4; small S=8; cnn S=8), each ~3 s of rounds (--budget-s 3; a round is
# one ~0.1 s call per provider) plus ~1 s of warm-up (2 steps and >= 0.3 s per provider,
# 2-4 providers: spar, bmm / deterministic, and torch-blue / bayesian-torch where they
# import): ~16 s; compiling the Triton kernels for the layer shapes on first use (those
# not already in the cache from the tests step): ~5-15 s. --no-memory leaves out the
# per-(provider, S) memory pass (on a GPU it is in-process, one rebuild and two steps
# each, up to 16 of them: a few seconds, more where the peers' builds are slow), which
# keeps a cold run clear of the 60 s limit.
# A step that hits its limit is "failed (timeout)"; when the budget left cannot hold a
# step's minimum (10 s, after a 5 s reserve for the summary) it is "skipped (budget)".
# A failed step never stops the later ones. A step that could not run because something
# it needs is missing (train without scikit-learn) is "SKIPPED", flagged in the summary
# and counted in the final line: the check it stands for did NOT happen.
#
# Output: every step's log goes to OUT/<step>.log (OUT: --out, default
# bench/results/gpu_check/), the summary table to OUT/summary.txt and, one row per step
# with the device name, to RESULTS/gpu_check_gpu.csv; the benchmarks append to
# RESULTS/kernels_gpu.csv and RESULTS/layers_gpu.csv (RESULTS: bench/results/), and every
# CSV/PNG/MD this run wrote is copied to OUT/results/ as well, so that OUT alone brings
# everything back from the machine. The last line counts the steps: ok, failed, NOT RUN
# ("SKIPPED": a package missing), skipped (not selected, no budget left) and the env
# WARNINGs. The exit code is 0 when at least one step ran and every step that ran passed
# (a NOT RUN step or a WARNING is flagged, but no failure), 1 when any failed, 2 for bad
# options (a --budget under 15 s, which could run no step, included), 3 when no step ran.
#
# Usage:
#   bash bench/gpu_check.sh                        # on the GPU machine, from anywhere
#   bash bench/gpu_check.sh --out "$OUT"           # logs and results into $OUT
#   bash bench/gpu_check.sh --only tests,kernels   # some steps (names as above)
#   bash bench/gpu_check.sh --skip layers          # all but some
#   bash bench/gpu_check.sh --dry-run              # CPU rehearsal: see below
#
# Flags:
#   --out DIR       logs and the summary (default bench/results/gpu_check; dry run: a new
#                   temporary folder)
#   --budget S      seconds for the whole script (default 540; dry run 900; at least 15,
#                   what one step's minimum needs)
#   --only LIST     comma-separated steps to run (the others: skipped)
#   --skip LIST     comma-separated steps not to run
#   --python PY     the interpreter (default: python, else python3)
#   --dry-run       rehearse on the CPU: TRITON_INTERPRET=1, CPU tensors, tiny shapes, a
#                   subset of tests/gpu, results into OUT/results (a temporary folder; never
#                   bench/results); must pass end to end on a machine without a GPU
#                   (tests/test_gpu_check.py runs it)
#   -h, --help      this text
#
# Requirements on the GPU machine: spar installed (pip install --no-deps -e .), torch with
# CUDA, triton, pytest. Optional: scikit-learn (train is skipped without it), matplotlib
# (no plots without it), nvidia-ml-py (no NVML telemetry without it), torch-blue and
# bayesian-torch (their benchmark rows are skipped with a note without them).

# shellcheck disable=SC2329  # the step_* functions run through `bash -c` (export -f)
set -u -o pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

DRY=0
OUT=""
BUDGET=""
ONLY=""
SKIP=""
PY=""
STEPS=(env tests train kernels conv layers cuda)

usage() { sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="${2:?--out needs a folder}"; shift ;;
    --out=*) OUT="${1#*=}" ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    --budget=*) BUDGET="${1#*=}" ;;
    --only) ONLY="${2:?--only needs step names}"; shift ;;
    --only=*) ONLY="${1#*=}" ;;
    --skip) SKIP="${2:?--skip needs step names}"; shift ;;
    --skip=*) SKIP="${1#*=}" ;;
    --python) PY="${2:?--python needs an interpreter}"; shift ;;
    --python=*) PY="${1#*=}" ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

for name in ${ONLY//,/ } ${SKIP//,/ }; do
  case " ${STEPS[*]} " in
    *" $name "*) ;;
    *) echo "gpu_check.sh: unknown step '$name'; steps: ${STEPS[*]}" >&2; exit 2 ;;
  esac
done
MIN_STEP_S=10   # a step is started only with at least this many seconds left ...
RESERVE_S=5     # ... after this reserve for the summary
if [ -n "$BUDGET" ]; then
  if ! [[ "$BUDGET" =~ ^[0-9]+$ ]]; then
    echo "gpu_check.sh: --budget must be whole seconds, got '$BUDGET'" >&2; exit 2
  fi
  BUDGET=$((10#$BUDGET))  # no octal surprises from a leading zero
  if [ "$BUDGET" -lt $((MIN_STEP_S + RESERVE_S)) ]; then
    echo "gpu_check.sh: --budget $BUDGET s cannot run any step (each needs ${MIN_STEP_S} s plus a ${RESERVE_S} s reserve): give at least $((MIN_STEP_S + RESERVE_S))" >&2
    exit 2
  fi
fi
# a relative --out is relative to where the script was called from
if [ -n "$OUT" ] && [[ "$OUT" != /* ]]; then OUT="$PWD/$OUT"; fi
cd "$ROOT" || exit 2
if [ -z "$PY" ]; then
  if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
fi
command -v "$PY" >/dev/null 2>&1 || { echo "gpu_check.sh: no interpreter '$PY'" >&2; exit 2; }
if ! command -v timeout >/dev/null 2>&1; then
  echo "gpu_check.sh: needs coreutils 'timeout'" >&2; exit 2
fi

if [ "$DRY" = 1 ]; then
  OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/spar-gpu-check.XXXXXX")}"
  RESULTS="$OUT/results"          # never bench/results
  BUDGET="${BUDGET:-900}"
  DEVICE=cpu
  export TRITON_INTERPRET=1
  export CUDA_VISIBLE_DEVICES=""  # CPU tensors even where a GPU is visible
else
  OUT="${OUT:-$ROOT/bench/results/gpu_check}"
  RESULTS="$ROOT/bench/results"
  BUDGET="${BUDGET:-540}"
  DEVICE=cuda
  unset TRITON_INTERPRET          # the kernels are compiled
fi
mkdir -p "$OUT" "$RESULTS" || exit 2
OUT="$(cd "$OUT" && pwd)"
RESULTS="$(cd "$RESULTS" && pwd)"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, installed or not
unset SPAR_BACKEND SPAR_LINEAR_PATH SPAR_CHUNK_NUMEL RANK WORLD_SIZE LOCAL_RANK
T_START=$(date +%s)
STARTED_UTC=$(date -u +%Y-%m-%dT%H:%M:%SZ)
STATUS_FILE="$OUT/steps.tsv"
: > "$STATUS_FILE"

echo "gpu_check: $([ "$DRY" = 1 ] && echo 'DRY RUN (CPU, interpreter, tiny shapes)' || echo 'GPU run')," \
     "budget ${BUDGET} s, logs in $OUT, results in $RESULTS"

# --------------------------------------------------------------------------- runner

wanted() {  # is step $1 selected by --only/--skip?
  local name="$1"
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then return 1; fi
  if [ -n "$SKIP" ] && [[ ",$SKIP," == *",$name,"* ]]; then return 1; fi
  return 0
}

record() {  # step status seconds limit note
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$STATUS_FILE"
  printf '[gpu_check] %-8s %-8s %5ss (limit %ss) %s\n' "$1" "$2" "$3" "$4" "$5"
}

# run_step NAME LIMIT_S CMD...: the command under `timeout`, its output in OUT/NAME.log;
# the limit is cut to the budget left; exit 77 from a step means it could not run: status
# "SKIPPED" (not "skipped": the check did not happen), its log's "SKIP: " line says why
run_step() {
  local name="$1" limit="$2"; shift 2
  if ! wanted "$name"; then record "$name" skipped 0 "$limit" "not selected"; return 0; fi
  local now left
  now=$(date +%s)
  left=$((BUDGET - (now - T_START) - RESERVE_S))
  if [ "$left" -lt "$MIN_STEP_S" ]; then
    record "$name" skipped 0 "$limit" "budget: ${left} s left"; return 0
  fi
  [ "$left" -lt "$limit" ] && limit="$left"
  local log="$OUT/$name.log" t0 rc
  echo "[gpu_check] $name: $* (limit ${limit} s)" | tee "$log"
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ "$rc" = 0 ]; then
    record "$name" ok "$dt" "$limit" ""
  elif [ "$rc" = 77 ]; then
    record "$name" SKIPPED "$dt" "$limit" "$(grep -m1 '^SKIP:' "$log" | cut -c7-)"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    record "$name" failed "$dt" "$limit" "timeout (log: $name.log)"
  else
    record "$name" failed "$dt" "$limit" "exit $rc (log: $name.log)"
  fi
  tail -n 5 "$log" | sed "s/^/    $name| /"
  return 0
}

# --------------------------------------------------------------------------- steps

step_env() {
  date -u
  "$PY" -m spar info || return 1
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,temperature.gpu,power.draw,clocks.sm \
      --format=csv || true
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" - "$DEVICE" <<'EOF'
import importlib, platform, sys
import torch
print(f"python {platform.python_version()}  torch {torch.__version__}  CUDA build "
      f"{torch.version.cuda}  cudnn {torch.backends.cudnn.version()}")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as e:  # noqa: BLE001
    print(f"triton: does not import ({e})")
for mod in ("pytest", "numpy", "sklearn", "matplotlib", "pynvml", "torch_blue", "bayesian_torch"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod:<15} {getattr(m, '__version__', 'present')}")
    except Exception as e:  # noqa: BLE001
        print(f"{mod:<15} missing ({type(e).__name__})")
if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        sys.exit("torch sees no CUDA device: every GPU step would fail")
    d = torch.cuda.current_device()
    p = torch.cuda.get_device_properties(d)
    print(f"device {torch.cuda.get_device_name(d)}  sm_{p.major}{p.minor}  "
          f"{p.total_memory / 2**30:.1f} GiB  {p.multi_processor_count} SMs")
else:
    print("device cpu (dry run)")

# What Triton needs to build its launcher (a C file including Python.h, compiled on the
# first launch of a kernel), found the way triton/runtime/build.py finds it.
import os, shutil, subprocess, sysconfig, tempfile
cuda = sys.argv[1] == "cuda"
why = ": Triton will fail to launch kernels" + ("" if cuda else " (a GPU run; the dry run's interpreter needs none)")
cc_env = os.environ.get("CC")
if cc_env:
    cc, cc_from = shutil.which(cc_env), f"$CC={cc_env}"
else:
    cc = shutil.which("gcc") or shutil.which("clang")
    cc_from = "gcc" if shutil.which("gcc") else "clang"
if cc:
    print(f"host C compiler: {cc} ({cc_from}; Triton builds its kernel launcher with it)")
else:
    print(f"WARNING: no host C compiler ({'$CC=' + cc_env + ' not found' if cc_env else 'no $CC, gcc or clang on PATH'}){why}")
scheme = sysconfig.get_default_scheme()
inc = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
header = os.path.join(inc, "Python.h")
if os.path.exists(header):
    print(f"Python headers: {header}")
else:
    print(f"WARNING: no Python headers ({header} missing; e.g. apt install python3-dev){why}")
if cc and os.path.exists(header):
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "check.c")
        with open(src, "w") as f:
            f.write("#include <Python.h>\nint main(void) { return Py_IsInitialized(); }\n")
        try:
            r = subprocess.run([cc, "-fsyntax-only", f"-I{inc}", src], capture_output=True,
                               text=True, timeout=20)
            err = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[0] if r.returncode else ""
        except (OSError, subprocess.SubprocessError) as e:
            err = f"{type(e).__name__}: {e}"
    if err:
        print(f"WARNING: {cc} cannot compile Python.h ({err}){why}")
    else:
        print(f"C build check: ok ({os.path.basename(cc)} compiles Python.h)")
if cuda:
    try:
        from triton.backends.nvidia.driver import libcuda_dirs
        print(f"libcuda: {', '.join(libcuda_dirs())}")
    except ImportError as e:
        print(f"libcuda: not checked ({e})")
    except Exception as e:  # noqa: BLE001 - triton asserts when it finds none
        print(f"WARNING: Triton finds no libcuda.so.1 ({str(e).splitlines()[0]}){why}")
EOF
}

step_tests() {
  "$PY" -c "import pytest" 2>/dev/null || { echo "pytest is not installed"; return 1; }
  local args=(-q -rfEs -p no:cacheprovider --junitxml="$OUT/tests_gpu.xml" tests/gpu)
  if [ "$DRY" = 1 ]; then
    # a cross-section (the whole folder takes ~1 min on 2 CPU cores; CI runs it in full)
    TRITON_INTERPRET=1 SPAR_TEST_DEVICE=cpu "$PY" -m pytest "${args[@]}" \
      -k "device or (primitive and (sampled_linear or lrt_noise)) or (linear and reparam) or philox"
  else
    # -v: one line per test as it ends, so a log cut short by the limit still says which
    # checks passed (most of the time goes into compiling the kernels on first use)
    TRITON_INTERPRET=0 SPAR_TEST_DEVICE=cuda "$PY" -m pytest "${args[@]}" -v --durations=10
  fi
}

step_train() {
  if ! "$PY" -c "import sklearn" 2>/dev/null; then
    echo "SKIP: scikit-learn missing - the ${DEVICE^^} train check did not run (spar train loads its digits from it)"
    return 77
  fi
  local args=(train --device "$DEVICE" --nproc 1 --epochs 1 --no-progress --out "$OUT/train")
  [ "$DRY" = 1 ] && args+=(--samples 1 --batch-size 1024)
  "$PY" -m spar "${args[@]}" || return 1
  # the checkpoint evaluated again: the same metrics (spar eval), on the same device
  "$PY" -m spar eval --checkpoint "$OUT/train/checkpoint.pt" --device "$DEVICE" \
    --out "$OUT/train/eval" || return 1
  "$PY" - "$OUT/train" <<'PY' || return 1
import json, sys
a = json.load(open(f"{sys.argv[1]}/metrics.json"))
b = json.load(open(f"{sys.argv[1]}/eval/metrics.json"))
worst = max(abs(a[k] - b[k]) for k in ("accuracy", "nll", "ece", "brier"))
print(f"spar eval vs spar train: largest metric difference {worst:.2e}")
sys.exit(worst > 1e-4)
PY
  # --model timm:NAME with the real package, where the machine has it (CI cannot install it)
  if [ "$DRY" != 1 ] && "$PY" -c "import timm" 2>/dev/null; then
    "$PY" -m pytest -q -p no:cacheprovider tests/test_models.py -k real_timm || return 1
  fi
}

step_kernels() {
  local args=(bench/bench_kernels.py --device "$DEVICE" --op linear --csv "$RESULTS/kernels_gpu.csv"
              --png "$RESULTS/kernels_gpu.png")
  if [ "$DRY" = 1 ]; then
    args+=(--samples 2 --batch 4 --features 24 40 --dtype fp32 --modes full --min-run-time 0.02
           --max-wait 0)
  else
    args+=(--samples 16 64 --batch 128 --features 4096 4096 --dtype bf16 --rep 50)
  fi
  "$PY" "${args[@]}"
}

step_conv() {
  local args=(bench/bench_kernels.py --device "$DEVICE" --op conv --csv "$RESULTS/kernels_gpu.csv"
              --png "$RESULTS/kernels_conv_gpu.png")
  if [ "$DRY" = 1 ]; then
    args+=(--samples 2 --batch 2 --conv 3 4 6 3 --dtype fp32 --modes full --min-run-time 0.02
           --max-wait 0)
  else
    args+=(--samples 8 32 --batch 32 --conv 64 64 32 3 --dtype bf16 --rep 50)
  fi
  "$PY" "${args[@]}"
}

step_layers() {
  local args=(bench/bench_layers.py --device "$DEVICE" --csv "$RESULTS/layers_gpu.csv" --busy -1
              --max-wait 0 --quick)
  if [ "$DRY" = 1 ]; then
    args+=(--config small --samples 2 --providers spar deterministic --budget-s 0.5 --no-memory)
  else
    args+=(--config mlp small cnn --budget-s 3 --no-memory)  # timing: see the header
  fi
  "$PY" "${args[@]}"
}

step_cuda() {
  if [ "$DRY" = 1 ]; then
    # no GPU: a rehearsal of the step's plumbing on the kernels' device code built for the
    # CPU (the Philox checks; tests/ops/test_cuda_host.py runs all of them in the suite)
    "$PY" -m pytest -q -rfEs -p no:cacheprovider tests/ops/test_cuda_host.py -k philox
    return
  fi
  if ! "$PY" -c "import cupy" 2>/dev/null; then
    echo "SKIP: CuPy missing - the cuda backend check did not run (pip install 'spar[cuda13]' or 'spar[cuda12]')"
    return 77
  fi
  TRITON_INTERPRET=0 SPAR_TEST_DEVICE=cuda "$PY" -m pytest -q -rfEs -p no:cacheprovider -v \
    --junitxml="$OUT/tests_cuda.xml" tests/gpu/test_gpu_cuda.py || return 1
  "$PY" - "$RESULTS/cuda_gpu.csv" <<'EOF'
"""The sampling kernel's throughput (cuda and Triton) against the device's copy bandwidth."""
import csv, datetime, os, sys
import torch
from triton.testing import do_bench
from spar.ops.backends.cuda import sample as cuda_sample
from spar.ops.backends.triton import sample as triton_sample
from spar.rng import NoiseKey

dev = torch.device("cuda")
R, C, S = 4096, 4096, 16
g = torch.Generator(device=dev).manual_seed(0)
mu = torch.randn(R, C, device=dev, generator=g)
sig = torch.rand(R, C, device=dev, generator=g)
key = NoiseKey(seed=1, step=2, first_sample=0, num_samples=S)
src = torch.empty(1 << 28, device=dev)  # 1 GiB
dst = torch.empty_like(src)
copy_gbs = 2 * src.numel() * 4 / do_bench(lambda: dst.copy_(src), rep=200) / 1e6  # read + write
del src, dst
name = torch.cuda.get_device_name(dev)
date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
rows = []
for dtype in (torch.float32, torch.bfloat16):
    out = torch.empty((S, R, C), dtype=dtype, device=dev)
    # bytes: every weight written once, mu and sigma read once (the minimum of either kernel)
    nbytes = out.numel() * out.element_size() + 2 * R * C * 4
    for backend, mod in (("cuda", cuda_sample), ("triton", triton_sample)):
        ms = do_bench(lambda: mod.sample_weights(mu, sig, key, 7, dtype=dtype, out=out), rep=200)
        gbs = nbytes / ms / 1e6
        rows.append(dict(date=date, device_name=name, backend=backend, dtype=str(dtype)[6:],
                         shape=f"{S}x{R}x{C}", ms=f"{ms:.4f}", gb_per_s=f"{gbs:.0f}",
                         copy_gb_per_s=f"{copy_gbs:.0f}", of_copy=f"{gbs / copy_gbs:.3f}",
                         gelem_per_s=f"{out.numel() / ms / 1e6:.1f}"))
        print(f"{backend:>6} {rows[-1]['dtype']:>8}: {ms:.3f} ms, {gbs:.0f} GB/s "
              f"({gbs / copy_gbs:.2f} of copy {copy_gbs:.0f} GB/s), "
              f"{out.numel() / ms / 1e6:.1f} G weights/s")
path = sys.argv[1]
new = not os.path.exists(path)
with open(path, "a", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    if new:
        w.writeheader()
    w.writerows(rows)
EOF
}

# --------------------------------------------------------------------------- run

if [ "$DRY" = 1 ]; then
  L_ENV=120; L_TESTS=300; L_TRAIN=300; L_KERNELS=240; L_CONV=240; L_LAYERS=240; L_CUDA=240
else
  L_ENV=30; L_TESTS=180; L_TRAIN=90; L_KERNELS=75; L_CONV=60; L_LAYERS=60; L_CUDA=60
fi
export -f step_env step_tests step_train step_kernels step_conv step_layers step_cuda
export PY DEVICE DRY OUT RESULTS

run_step env "$L_ENV" bash -c step_env
if [ "$DRY" = 0 ] && ! grep -q $'^env\tok' "$STATUS_FILE" && wanted env; then
  echo "[gpu_check] the environment check failed (see env.log): the GPU steps would all fail"
fi
run_step tests "$L_TESTS" bash -c step_tests
run_step train "$L_TRAIN" bash -c step_train
run_step kernels "$L_KERNELS" bash -c step_kernels
run_step conv "$L_CONV" bash -c step_conv
run_step layers "$L_LAYERS" bash -c step_layers
run_step cuda "$L_CUDA" bash -c step_cuda

# --------------------------------------------------------------------------- summary

mkdir -p "$OUT/results"
for f in "$RESULTS"/kernels_gpu.csv "$RESULTS"/kernels_gpu.png "$RESULTS"/kernels_conv_gpu.png \
         "$RESULTS"/layers_gpu.csv "$RESULTS"/layers_gpu.md "$RESULTS"/layers_gpu.png \
         "$RESULTS"/cuda_gpu.csv; do
  [ -f "$f" ] && [ "$(dirname "$f")" != "$OUT/results" ] && cp -f "$f" "$OUT/results/"
done

"$PY" - "$OUT" "$RESULTS" "$STARTED_UTC" "$DEVICE" "$T_START" <<'EOF'
"""The summary: one line per step with its key numbers; gpu_check_gpu.csv rows."""
import csv, json, os, re, sys, time
from pathlib import Path

out, results, started, device, t_start = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])


def read(path):
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def log(name):
    try:
        return (out / f"{name}.log").read_text(errors="replace")
    except OSError:
        return ""


device_name = ""
m = re.search(r"^device (.+?)(  sm_|$)", log("env"), flags=re.MULTILINE)
if m:
    device_name = m.group(1).strip()
if device == "cpu" or not device_name:
    try:
        cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        device_name = device_name if device == "cuda" and device_name else (cpu.group(1).strip() if cpu else "cpu")
    except OSError:
        device_name = device_name or "cpu"


def key_numbers(step):
    text = log(step)
    if step == "env":
        v = re.search(r"^python (\S+)\s+torch (\S+)", text, re.M)
        t = re.search(r"^triton (\S+)", text, re.M)
        return f"{device_name}; torch {v.group(2) if v else '?'}; triton {t.group(1) if t else '?'}"
    if step == "cuda":
        m = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|errors|skipped|deselected)\b.*?) in "
                       r"[\d.]+s", text, re.M)
        rows = [r for r in read(results / "cuda_gpu.csv") if r.get("date", "") >= started]
        parts = [f"{r['backend']} {r['dtype']} {r['gb_per_s']} GB/s ({r['of_copy']} of copy)"
                 for r in rows]
        return "; ".join(([m[-1]] if m else []) + parts)
    if step == "tests":
        m = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|errors|skipped|deselected)\b.*?) in "
                       r"[\d.]+s", text, re.M)
        return m[-1] if m else ""
    if step == "train":
        try:
            r = json.loads((out / "train" / "metrics.json").read_text())
        except (OSError, ValueError):
            return ""
        spe = r.get("seconds_per_epoch")
        peak = r.get("peak_memory_mib") or [0]
        return (f"acc {r['accuracy']:.3f}, {spe:.2f} s/epoch, first {r['seconds_first_epoch']:.1f} s, "
                f"peak {max(peak):.0f} MiB ({r.get('peak_memory_source', '?')})")
    if step in ("kernels", "conv"):
        op = "linear" if step == "kernels" else "conv"
        rows = [r for r in read(results / "kernels_gpu.csv")
                if r.get("date", "") >= started and (r.get("op") or "linear") == op
                and r.get("mode") == "full" and r.get("provider", "").startswith("spar")]
        parts = [f"S={r['S']} {r['provider']} {r['ratio_to_bmm'] or '?'}x floor, "
                 f"mem {r['mem_ratio'] or '?'}x|W|" for r in rows]
        return "; ".join(parts)
    if step == "layers":
        rows = [r for r in read(results / "layers_gpu.csv") if r.get("run", "") >= started]
        parts = [f"{r['config']} S={r['samples']} {r['provider']} {r['median_ms']} ms"
                 + (f" ({r['time_vs_spar']}x spar)" if r["provider"] != "spar" else "")
                 for r in rows]
        return "; ".join(parts)
    return ""


steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, secs, limit, note = (line.split("\t") + [""] * 5)[:5]
    steps.append(dict(step=name, status=status, seconds=secs, limit=limit, note=note))
for s in steps:
    s["numbers"] = ""
    if s["status"] in ("ok", "failed"):  # the others left no log of this run
        try:
            s["numbers"] = key_numbers(s["step"])
        except Exception as e:  # noqa: BLE001 - a summary never fails the run
            s["numbers"] = f"(summary error: {type(e).__name__}: {e})"
# what needs a reader's eye although no step failed: checks that did not run, and the
# env step's warnings (a missing C compiler or Python.h: Triton cannot launch kernels)
flags = [f"!! {s['step']}: SKIPPED: {s['note'] or 'the check did not run'}"
         for s in steps if s["status"] == "SKIPPED"]
warnings = []
if any(s["step"] == "env" and s["status"] in ("ok", "failed") for s in steps):
    warnings = re.findall(r"^WARNING: (.+)$", log("env"), re.M)
    for s in steps:
        if s["step"] == "env" and warnings:
            s["note"] = "; ".join(x for x in (s["note"], f"{len(warnings)} WARNING(S)") if x)
flags += [f"!! WARNING (env): {w}" for w in warnings]

total = int(time.time()) - t_start
lines = [f"gpu_check summary: {device_name} ({device}), started {started}, {total} s in all",
         f"{'step':<8} {'status':<8} {'time':>6} {'limit':>6}  key numbers / note"]
for s in steps:
    info = "  ".join(x for x in (s["numbers"], s["note"]) if x)
    lines.append(f"{s['step']:<8} {s['status']:<8} {s['seconds']:>5}s {s['limit']:>5}s  {info}")
if flags:
    lines += ["", *flags]
text = "\n".join(lines)
print("\n" + text)
(out / "summary.txt").write_text(text + "\n")

rows = [dict(date=started, device=device, device_name=device_name, step=s["step"],
             status=s["status"], seconds=s["seconds"], limit_s=s["limit"],
             key_numbers=s["numbers"], note=s["note"]) for s in steps]
if warnings:  # the warnings' text travels with the env row
    for r in rows:
        if r["step"] == "env":
            r["note"] = "; ".join([r["note"], *warnings])
path = results / "gpu_check_gpu.csv"
new = not path.exists()
with open(path, "a", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    if new:
        w.writeheader()
    w.writerows(rows)
if path.parent != out / "results":
    import shutil
    shutil.copy(path, out / "results" / path.name)
EOF

count() { awk -F'\t' -v s="$1" '$2 == s' "$STATUS_FILE" | wc -l | tr -d ' '; }
N_OK=$(count ok); N_FAILED=$(count failed); N_SKIPPED=$(count skipped); N_NOTRUN=$(count SKIPPED)
NOTRUN=$(awk -F'\t' '$2 == "SKIPPED" { printf "%s%s", sep, $1; sep = "," }' "$STATUS_FILE")
N_WARN=0
if awk -F'\t' '$1 == "env" && ($2 == "ok" || $2 == "failed") { f = 1 } END { exit !f }' "$STATUS_FILE"; then
  N_WARN=$(grep -c '^WARNING: ' "$OUT/env.log" 2>/dev/null)
  N_WARN=${N_WARN:-0}
fi
COUNTS="$N_OK ok, $N_FAILED failed, $N_NOTRUN NOT RUN${NOTRUN:+ ($NOTRUN)}, $N_SKIPPED skipped, $N_WARN WARNING(S)"
if [ "$N_FAILED" -gt 0 ]; then
  echo "gpu_check: FAILED: $COUNTS (logs in $OUT)"
  exit 1
fi
if [ "$N_OK" = 0 ]; then
  echo "gpu_check: NO STEP RAN: $COUNTS (logs in $OUT)"
  exit 3
fi
if [ "$N_NOTRUN" -gt 0 ] || [ "$N_WARN" -gt 0 ]; then
  echo "gpu_check: every step that ran passed, BUT see the !! lines above: $COUNTS (logs in $OUT)"
else
  echo "gpu_check: every step that ran passed: $COUNTS (logs in $OUT)"
fi
exit 0
