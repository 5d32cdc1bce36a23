"""The Triton kernels compile for the GPU (sm_90) with their default block sizes, and ptxas
reports no register spills, checked without a GPU: the interpreter runs the kernels'
math, this runs the compiler (frontend, TTGIR, LLVM, ptxas) that the interpreter skips.

The check runs in a subprocess because kernels imported under ``TRITON_INTERPRET=1`` are
interpreter objects that cannot be compiled.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

ARCH = 90


def _signature(fn, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    # noise keys are 64-bit; every other scalar (sizes, strides, counters) is i32
    def kind(n: str) -> str:
        if n in constexprs:
            return "constexpr"
        return pointers.get(n, "i64" if n.startswith("key") else "i32")

    return {n: kind(n) for n in fn.arg_names}


def _compile(fn, pointers, constexprs, num_warps, num_stages):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    src = ASTSource(fn, _signature(fn, pointers, constexprs), constexprs)
    opts = dict(num_warps=num_warps, num_stages=num_stages)
    k = triton.compile(src, target=GPUTarget("cuda", ARCH, 32), options=opts)
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        log = subprocess.run(
            [get_ptxas(ARCH).path, f"-arch=sm_{ARCH}a", "-v", ptx, "-o", ptx + ".o"],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    spills = re.search(r"(\d+) bytes spill stores", log)
    regs = re.search(r"Used (\d+) registers", log)
    return {"spills": int(spills.group(1)) if spills else 0,
            "regs": int(regs.group(1)) if regs else -1}  # fmt: skip


# --- the kernel variants: name -> (module, kernel, launch config, pointers, constexprs) ----
# Linear kernels: the block sizes of ``default_config(kernel, B, dtype)``; elementwise noise
# kernels: ``elementwise_block()``. Activations bf16 (tensor-core dot) and fp32 (ieee dot);
# parameters, gradients of parameters and partial sums fp32.

F32 = "*fp32"


def _variants() -> dict[str, tuple]:
    out = {}
    for t in ("bf16", "fp32"):
        a = "*" + t
        for B in (16, 128):
            out[f"fwd-{t}-B{B}"] = (
                "linear", "_bayes_linear_fwd_kernel", ("fwd", B, t),
                {"x_ptr": a, "mu_ptr": F32, "sig_ptr": F32, "y_ptr": a}, {"HAS_MU": True},
            )  # fmt: skip
            out[f"dx-{t}-B{B}"] = (
                "linear", "_bayes_linear_bwd_dx_kernel", ("dx", B, t),
                {"dy_ptr": a, "mu_ptr": F32, "sig_ptr": F32, "out_ptr": a}, {"HAS_MU": True},
            )  # fmt: skip
            if t == "bf16":  # shared input, several sample groups: fp32 partial sums
                out[f"dx-partial-{t}-B{B}"] = (
                    "linear", "_bayes_linear_bwd_dx_kernel", ("dx", B, t),
                    {"dy_ptr": a, "mu_ptr": F32, "sig_ptr": F32, "out_ptr": F32},
                    {"HAS_MU": True},
                )  # fmt: skip
        # dw's blocks do not depend on B
        out[f"dw-{t}"] = (
            "linear", "_bayes_linear_bwd_dw_kernel", ("dw", 128, t),
            {"x_ptr": a, "dy_ptr": a, "rho_ptr": F32, "gmu_ptr": F32, "grho_ptr": F32},
            {"HAS_MU": True, "APPLY_SIGMOID": True},
        )  # fmt: skip
    a = "*bf16"
    out["sample"] = ("sample", "_sample_weights_kernel", None,
                     {"mu_ptr": F32, "sig_ptr": F32, "out_ptr": a},
                     {"HAS_MU": True, "INTERPRET": False})  # fmt: skip
    out["sample-bwd"] = ("sample", "_sample_weights_bwd_kernel", None,
                         {"g_ptr": a, "rho_ptr": F32, "gmu_ptr": F32, "geps_ptr": F32},
                         {"HAS_MU": True, "ACCUMULATE": True, "APPLY_SIGMOID": True})  # fmt: skip
    for name, bwd, o in (("lrt-noise", False, a), ("lrt-noise-bwd", True, a),
                         ("lrt-noise-bwd-shared", True, F32)):  # fmt: skip
        # shared input: the backward writes fp32 per-sample terms, summed by the launcher
        out[name] = ("noise", "_lrt_noise_kernel", None,
                     {"var_ptr": a, "dy_ptr": a, "out_ptr": o},
                     {"BACKWARD": bwd, "VAR_FLOOR": None, "INTERPRET": False})  # fmt: skip
    out["sign-mul"] = ("noise", "_sign_mul_kernel", None, {"x_ptr": a, "out_ptr": a},
                       {"INTERPRET": False})  # fmt: skip
    return out


VARIANTS = _variants()
# variants that ptxas currently spills (bugs reported, see the xfail reasons), with the
# Triton versions where it was seen: (first spilling, last known clean)
KNOWN_SPILLS = {
    "lrt-noise-bwd-shared": (
        "bug in spar/ops/backends/triton/noise.py _lrt_noise_kernel: with BACKWARD=True, "
        "16-bit var/dy and an fp32 output (the shared-input backward) ptxas sm_90a reports "
        "8 bytes spill stores with triton 3.9 (80 registers, a 28-byte local depot from "
        "sin/cos range reduction); none with triton 3.6; the pre-redesign _lrt_bwd_kernel "
        "compiled to 106 registers, no spills",
        (3, 9),
        (3, 6),
    ),
}


def _triton_version() -> tuple[int, int]:
    import importlib.metadata

    try:
        major, minor = importlib.metadata.version("triton").split(".")[:2]
        return int(major), int(minor)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return (0, 0)


def _marks(name: str) -> list:
    """A strict xfail where the spill was seen, none where the variant is known clean, a
    lenient one for the versions between (not checked)."""
    if name not in KNOWN_SPILLS:
        return []
    reason, spills_from, clean_upto = KNOWN_SPILLS[name]
    version = _triton_version()
    if version <= clean_upto:
        return []
    return [pytest.mark.xfail(strict=version >= spills_from, reason=reason)]


def _main() -> None:
    import importlib

    import torch

    from spar.ops.backends.triton import linear as lt
    from spar.ops.backends.triton._utils import dot_precision, elementwise_block
    from spar.ops.library import VAR_FLOOR

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    br, bc = elementwise_block()
    results = {}
    for name, (module, kernel, config, pointers, consts) in VARIANTS.items():
        fn = getattr(importlib.import_module(f"spar.ops.backends.triton.{module}"), kernel)
        consts = {k: (VAR_FLOOR if k == "VAR_FLOOR" else v) for k, v in consts.items()}
        if config is None:
            consts.update(BLOCK_R=br, BLOCK_C=bc)
            warps, stages = 4, 3
        else:
            which, B, t = config
            cfg = lt.default_config(which, B, dtypes[t])
            consts.update(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                          PRECISION=dot_precision(dtypes[t]), INTERPRET=False)  # fmt: skip
            warps, stages = cfg.num_warps, cfg.num_stages
        try:
            results[name] = _compile(fn, pointers, consts, warps, stages)
        except Exception as e:  # noqa: BLE001 - reported per variant by the test
            results[name] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
    print(json.dumps(results))


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    """Every variant compiled once, in one subprocess."""
    pytest.importorskip("triton")
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(ARCH).path  # noqa: B018 - raises when the bundled ptxas is missing
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"triton's NVIDIA compiler is not available here: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence 3.9's default-change warning
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=_marks(n)) for n in VARIANTS],
)  # fmt: skip
def test_kernel_compiles_for_sm90_without_spills(compiled, name):
    result = compiled[name]
    assert "error" not in result, f"{name} does not compile: {result.get('error')}"
    assert result["spills"] == 0, f"{name}: register spills {result}"


if __name__ == "__main__":
    _main()
