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


def _main() -> None:
    import torch

    from spar.ops import linear_triton as lt
    from spar.ops import lrt_flipout as lf
    from spar.ops import sample as sm

    results = {}
    for dtype, tname in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        p = "*" + tname
        w = "*fp32"
        for B in (16, 128):
            for kernel, fn, ptrs, extra in (
                ("fwd", lt._bayes_linear_fwd_kernel,
                 {"x_ptr": p, "mu_ptr": w, "sig_ptr": w, "bmu_ptr": w, "bsig_ptr": w,
                  "y_ptr": p}, {"HAS_BIAS": True}),
                ("dx", lt._bayes_linear_bwd_dx_kernel,
                 {"dy_ptr": p, "mu_ptr": w, "sig_ptr": w, "out_ptr": p}, {}),
                ("dw", lt._bayes_linear_bwd_dw_kernel,
                 {"x_ptr": p, "dy_ptr": p, "rho_ptr": w, "brho_ptr": w, "gmu_ptr": w,
                  "grho_ptr": w, "gbmu_ptr": w, "gbrho_ptr": w},
                 {"HAS_BIAS": True, "APPLY_SIGMOID": True}),
            ):  # fmt: skip
                if kernel == "dw" and B != 128:
                    continue  # dw's blocks do not depend on B
                cfg = lt.default_config(kernel, B, dtype)
                consts = dict(HAS_MU=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                              BLOCK_K=cfg.block_k, PRECISION=lt.dot_precision(dtype),
                              INTERPRET=False, **extra)  # fmt: skip
                results[f"{kernel}-{tname}-B{B}"] = _compile(
                    fn, ptrs, consts, cfg.num_warps, cfg.num_stages
                )
    br, bc = sm._block(1024, 1024, None)
    p = "*bf16"
    elementwise = (
        ("sample", sm._sample_weights_kernel,
         {"mu_ptr": "*fp32", "sig_ptr": "*fp32", "out_ptr": p},
         {"HAS_MU": True, "INTERPRET": False}),
        ("sample_bwd", sm._sample_weights_bwd_kernel,
         {"g_ptr": p, "rho_ptr": "*fp32", "gmu_ptr": "*fp32", "geps_ptr": "*fp32"},
         {"HAS_MU": True, "ACCUMULATE": True, "APPLY_SIGMOID": True}),
    )  # fmt: skip
    for name, fn, ptrs, consts in elementwise:
        results[name] = _compile(fn, ptrs, dict(BLOCK_R=br, BLOCK_C=bc, **consts), 4, 3)
    br, bc = lf._block()
    for name, fn, ptrs, consts in (
        ("lrt_fwd", lf._lrt_fwd_kernel, {"mean_ptr": p, "var_ptr": p, "y_ptr": p}, {}),
        ("lrt_bwd", lf._lrt_bwd_kernel, {"dy_ptr": p, "var_ptr": p, "dvar_ptr": "*fp32"}, {}),
        ("sign_mul", lf._sign_mul_kernel, {"x_ptr": p, "out_ptr": p}, {}),
        ("flipout_out", lf._flipout_out_kernel,
         {"base_ptr": p, "pert_ptr": p, "bias_ptr": p, "y_ptr": p}, {"HAS_BIAS": True}),
    ):  # fmt: skip
        results[name] = _compile(fn, ptrs, dict(BLOCK_R=br, BLOCK_C=bc, INTERPRET=False,
                                                **consts), 4, 3)  # fmt: skip
    print(json.dumps(results))


def test_kernels_compile_for_sm90_without_spills():
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
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    spilling = {k: v for k, v in results.items() if v["spills"]}
    assert not spilling, f"register spills: {spilling}"


if __name__ == "__main__":
    _main()
