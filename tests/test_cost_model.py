"""bench/cost_model.py counts the compiled kernels' instructions plausibly.

The parser is checked on small hand-written SASS/PTX (no compiler needed); one real kernel,
the fused linear forward (bf16, B=128), is compiled for sm_90 in a subprocess (the Triton
compiler cannot run under ``TRITON_INTERPRET=1``, which the test session sets) and its
counts are checked: Philox integer work, the Box-Muller FP32 work, one MUFU.SQRT per pair
of normals, a tensor-core MMA whose multiply-adds match the tile, no local memory in the
hot loop. Skipped when ptxas/cuobjdump are missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import cost_model as cm  # noqa: E402

SASS = """
--:-:-:-:1\tS2R R0, SR_CTAID.X;
LBB1:
--:-:-:-:1\tIMAD.WIDE.U32 R2, R4, -0x2d4bd5b5, RZ;
--:-:-:-:1\tLOP3.LUT R5, R3, R6, R7, 0x96, !PT;
--:-:-:-:1\tFSETP.GE.AND P0, PT, R8, 105615, PT;
--:-:-:-:1\tFFMA.FTZ R9, R8, R10, R11;
--:-:-:-:5\t@!P0 BRA LBB2;
--:-:-:-:1\tIMAD.SHL.U32 R12, R8, 0x100, RZ;
--:-:-:-:1\tSTL [R1], R12;
--:-:-:-:1\tDMUL R14, R12, UR12;
LBB2:
--:-:-:-:1\tMUFU.SQRT R15, R15;
--:-:-:-:3\tHGMMA.64x128x16.F32.BF16 R24, gdesc[UR12], R24, gsb0;
--:-:-:-:1\tISETP.NE.AND P1, PT, R0, RZ, PT;
--:-:-:-:5\t@P1 BRA LBB1;
--:-:-:-:5\tEXIT;
LBB3:
--:-:-:-:0\tBRA LBB3;
"""


def test_sass_segments_skip_the_sincos_slow_path():
    seg = cm.segments_sass(SASS, num_warps=8)
    loop = seg["loop1"]
    # the slow path (SHL, STL, DMUL) is not counted; the idle `BRA self` is no loop
    assert loop["local"] == 0 and loop["fp64"] == 0
    assert loop["int_mad"] == 1 and loop["int_alu"] == 2  # IMAD.WIDE; LOP3 + ISETP
    assert loop["fp32"] == 1 and loop["fp_alu"] == 1 and loop["mufu"] == 1
    assert loop["mma"] == 1 and loop["macs"] == 64 * 128 * 16 * 2  # two warpgroups
    assert set(seg) == {"outer", "loop1"}
    assert seg["outer"]["total"] == 3  # S2R, EXIT, BRA self


def test_ptx_classes():
    assert cm.ptx_class("mul.hi.u32") == "int_mad"
    assert cm.ptx_class("xor.b32") == "int_alu"
    assert cm.ptx_class("fma.rn.ftz.f32") == "fp32"
    assert cm.ptx_class("sqrt.approx.ftz.f32") == "mufu"
    assert cm.ptx_class("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16") == "mma"
    assert cm.ptx_class("wgmma.fence.sync.aligned") == "other"
    assert cm.ptx_class("cp.async.cg.shared.global") == "gmem_ld"
    assert cm.ptx_class("ld.shared.v4.b32") == "smem"


def test_fused_forward_counts_on_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cost_model.py"), "--arch", "90",
         "--only", "fwd-bf16-B128", "--print"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if proc.returncode == 2 and "cannot count" in proc.stderr:  # no ptxas / cuobjdump
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    loop = next(r for r in rows if r["source"] == "sass" and r["segment"] == "loop1")
    assert loop["spill_bytes"] == 0 and 0 < loop["regs"] <= 255
    # Philox + Box-Muller per weight element: tens of integer and FP32 instructions
    assert 10 < loop["integer_per_elem"] < 100
    assert 5 < loop["fp32_per_elem"] < 60
    assert loop["mufu_per_elem"] == pytest.approx(0.5)  # one MUFU.SQRT per pair
    assert loop["local"] == 0 and loop["fp64"] == 0  # slow path excluded
    # the tile's tensor-core work: BLOCK_M * BLOCK_N * BLOCK_K multiply-adds per iteration
    assert loop["mma"] >= 1 and loop["macs"] == loop["seg_macs_expected"] > 0
    ptx = next(r for r in rows if r["source"] == "ptx" and r["segment"] == "loop1")
    assert ptx["mma"] >= 1 and ptx["integer_per_elem"] > 10


@pytest.mark.parametrize(
    "line",
    [
        "FADD R1, R2, R3 ;",
        "/*0010*/ DADD R4, R6, R8 ;",
        "--:-:-:-:1 FADD R1, R2, R3;",
        "0010: FADD R1, R2, R3 ;",
    ],
)
def test_all_hex_opcode_is_not_an_address(line):
    # FADD and DADD are spelled with hex digits only: the optional address token must not
    # swallow them (they were counted as "other" with an operand as the opcode)
    ((kind, op, *_),) = cm.parse_sass(line)
    assert kind == "ins" and op in ("FADD", "DADD")
