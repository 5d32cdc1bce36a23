"""What would spar's Triton kernels cost on an H100/H200? A cost model from the compiled
kernels, built without a GPU.

Step 1, counting (``--count``): every Triton kernel of ``spar/ops/backends/triton`` is
compiled for sm_90 (and sm_80) with the constexpr configurations its launcher uses (fp32
and bf16 inputs; ``default_config`` / ``elementwise_block`` block sizes). From the PTX and
from the SASS (the cubin that ptxas makes, disassembled with the ``cuobjdump`` that Triton
bundles) the instructions of each loop body are counted by class, and ptxas ``-v`` gives
registers and spills. Cold paths are left out: the Payne-Hanek argument reduction of the
precise ``sinf``/``cosf`` (taken only for ``|x| >= 105615``, never for Box-Muller's
``2*pi*u``) is recognised as a forward branch over code that touches local memory. Counts
are static per loop body; a loop body runs once per iteration, so multiplying by trip
counts gives the dynamic counts of a launch. Rows go to ``bench/results/
cost_model_kernels.csv`` (per segment, and normalised per weight or output element).

Step 2, the throughput model (``--model``): published peak rates (see ``HARDWARE`` and
``bench/results/cost_model.md``) turn the dynamic counts into time per SIMT pipe, tensor
core and HBM; a kernel takes the longest of them (perfect overlap: a lower bound for a
kernel, and the figures are **predictions**, nothing is measured). cuBLAS and cuDNN are
modelled as tensor/HBM roofline at a stated efficiency. Predictions for the issue's
configurations go to ``bench/results/cost_model_predictions.csv`` and the write-up to
``cost_model.md``.

Examples::

    python bench/cost_model.py                      # count (sm_90, sm_80), model, write all
    python bench/cost_model.py --arch 90 --only fwd-bf16-B128 --print
    python bench/cost_model.py --model-only         # re-run the model on the saved counts

The counting runs the Triton compiler, so ``TRITON_INTERPRET`` must be unset (the script
re-executes itself without it).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
KERNELS_CSV = RESULTS / "cost_model_kernels.csv"
PRED_CSV = RESULTS / "cost_model_predictions.csv"
REPORT_MD = RESULTS / "cost_model.md"

# =======================================================================================
# kernel variants: what the launchers compile
# =======================================================================================

F32 = "*fp32"


@dataclass
class Variant:
    """One compiled configuration of a kernel.

    ``work`` says what one execution of each loop segment does, for normalisation:
    ``fwd``/``dx``: a ``(BLOCK_N, BLOCK_K)`` weight tile times ``BLOCK_M`` rows per
    iteration of the innermost loop; ``dw``: the inner loop is one ``BLOCK_M``-row slice of
    ``dW`` for a ``(BLOCK_N, BLOCK_K)`` tile, the loop around it one sample (noise + update);
    ``elem``: the whole program is one ``(BLOCK_R, BLOCK_C)`` tile; ``elem_loop``: the loop
    body is one tile of one sample.
    """

    name: str
    module: str
    kernel: str
    pointers: dict[str, str]
    consts: dict
    work: str
    dtype: str
    num_warps: int = 4
    num_stages: int = 3
    blocks: dict = field(default_factory=dict)

    def tile_elems(self) -> int:
        b = self.blocks
        if self.work in ("fwd", "dx", "dw"):
            return b["BLOCK_N"] * b["BLOCK_K"]
        return b["BLOCK_R"] * b["BLOCK_C"]


def variants(rows: tuple[int, ...] = (16, 128)) -> list[Variant]:
    """The configurations the launchers use: linear kernels with ``default_config`` for
    ``rows`` rows per sample, the elementwise kernels with ``elementwise_block()``."""
    import torch

    from spar.ops.backends.triton import linear as lt
    from spar.ops.backends.triton._utils import dot_precision, elementwise_block
    from spar.ops.library import VAR_FLOOR

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}
    out: list[Variant] = []

    def lin(name, kernel, which, B, t, pointers, consts, work):
        cfg = lt.default_config(which, B, dt[t])
        blocks = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
        c = dict(consts, **blocks, PRECISION=dot_precision(dt[t]), INTERPRET=False)
        out.append(
            Variant(
                name, "linear", kernel, pointers, c, work, t, cfg.num_warps, cfg.num_stages, blocks
            )
        )

    for t in ("bf16", "fp32"):
        a = "*" + t
        for B in rows:
            lin(
                f"fwd-{t}-B{B}",
                "_bayes_linear_fwd_kernel",
                "fwd",
                B,
                t,
                {"x_ptr": a, "mu_ptr": F32, "sig_ptr": F32, "y_ptr": a},
                {"HAS_MU": True},
                "fwd",
            )
            lin(
                f"dx-{t}-B{B}",
                "_bayes_linear_bwd_dx_kernel",
                "dx",
                B,
                t,
                {"dy_ptr": a, "mu_ptr": F32, "sig_ptr": F32, "out_ptr": a},
                {"HAS_MU": True},
                "dx",
            )
        lin(
            f"dw-{t}",
            "_bayes_linear_bwd_dw_kernel",
            "dw",
            128,
            t,
            {"x_ptr": a, "dy_ptr": a, "rho_ptr": F32, "gmu_ptr": F32, "grho_ptr": F32},
            {"HAS_MU": True, "APPLY_SIGMOID": True},
            "dw",
        )
    br, bc = elementwise_block()
    eb = dict(BLOCK_R=br, BLOCK_C=bc)
    for t in ("bf16", "fp32"):
        out.append(
            Variant(
                f"sample-{t}",
                "sample",
                "_sample_weights_kernel",
                {"mu_ptr": F32, "sig_ptr": F32, "out_ptr": "*" + t},
                {"HAS_MU": True, "INTERPRET": False, **eb},
                "elem",
                t,
                blocks=eb,
            )
        )
    out.append(
        Variant(
            "sample-bwd-bf16",
            "sample",
            "_sample_weights_bwd_kernel",
            {"g_ptr": "*bf16", "rho_ptr": F32, "gmu_ptr": F32, "geps_ptr": F32},
            {"HAS_MU": True, "ACCUMULATE": True, "APPLY_SIGMOID": True, **eb},
            "elem_loop",
            "bf16",
            blocks=eb,
        )
    )
    a = "*bf16"
    for name, bwd in (("lrt-noise-bf16", False), ("lrt-noise-bwd-bf16", True)):
        out.append(
            Variant(
                name,
                "noise",
                "_lrt_noise_kernel",
                {"var_ptr": a, "dy_ptr": a, "out_ptr": a},
                {"BACKWARD": bwd, "VAR_FLOOR": VAR_FLOOR, "INTERPRET": False, **eb},
                "elem",
                "bf16",
                blocks=eb,
            )
        )
    out.append(
        Variant(
            "sign-mul-bf16",
            "noise",
            "_sign_mul_kernel",
            {"x_ptr": a, "out_ptr": a},
            {"INTERPRET": False, **eb},
            "elem",
            "bf16",
            blocks=eb,
        )
    )
    # kernels a future version adds elsewhere are not listed; ones that disappear drop out
    present = []
    for v in out:
        mod = importlib.import_module(f"spar.ops.backends.triton.{v.module}")
        if hasattr(mod, v.kernel):
            present.append(v)
    return present


# Probes: the noise generator alone, to split a kernel's count into Philox, Box-Muller and
# the rest. Each program makes a (BLOCK_R, BLOCK_C) tile and stores it unit-stride.
_PROBES: dict = {}


def _probes() -> dict:
    if _PROBES:
        return _PROBES
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import libdevice

    from spar.ops.backends.triton._utils import normal_tile, philox_tile

    @triton.jit
    def _probe_philox_kernel(out_ptr, key, step, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """Philox lanes only (xor of the four lanes stored: +3 ops per 4 elements)."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        st = step.to(tl.uint32, bitcast=True)
        i0, i1, i2, i3 = philox_tile(key, rows.to(tl.uint32), st, 0, st, BLOCK_R, BLOCK_C)
        G: tl.constexpr = BLOCK_C // 4
        offs = rows[:, None] * G + tl.arange(0, G)[None, :]
        tl.store(out_ptr + offs, i0 ^ i1 ^ i2 ^ i3)

    @triton.jit
    def _probe_normal_kernel(out_ptr, key, step, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """``normal_tile`` stored as fp32."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        st = step.to(tl.uint32, bitcast=True)
        eps = normal_tile(key, rows.to(tl.uint32), st, 0, st, BLOCK_R, BLOCK_C)
        offs = rows[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
        tl.store(out_ptr + offs, eps)

    @triton.jit
    def _probe_normal_alt_kernel(
        out_ptr, key, step, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, FAST: tl.constexpr
    ):
        """Candidate Box-Muller variants on the same Philox lanes (same integers, I1):
        ``FAST=False``: ``cospi/sinpi(2u)`` (exact argument reduction, no Cody-Waite or
        Payne-Hanek); ``FAST=True``: the MUFU approximations ``__logf/__cosf/__sinf``."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        st = step.to(tl.uint32, bitcast=True)
        i0, i1, i2, i3 = philox_tile(key, rows.to(tl.uint32), st, 0, st, BLOCK_R, BLOCK_C)
        u0 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(i0))
        u2 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(i2))
        v1 = tl.uint_to_uniform_float(i1)
        v3 = tl.uint_to_uniform_float(i3)
        if FAST:
            r0 = tl.sqrt(-2.0 * libdevice.fast_logf(u0))
            r2 = tl.sqrt(-2.0 * libdevice.fast_logf(u2))
            t1 = 6.283185307179586 * v1
            t3 = 6.283185307179586 * v3
            n0, n1 = r0 * libdevice.fast_cosf(t1), r0 * libdevice.fast_sinf(t1)
            n2, n3 = r2 * libdevice.fast_cosf(t3), r2 * libdevice.fast_sinf(t3)
        else:
            r0 = tl.sqrt(-2.0 * tl.log(u0))
            r2 = tl.sqrt(-2.0 * tl.log(u2))
            n0, n1 = r0 * libdevice.cospi(2.0 * v1), r0 * libdevice.sinpi(2.0 * v1)
            n2, n3 = r2 * libdevice.cospi(2.0 * v3), r2 * libdevice.sinpi(2.0 * v3)
        eps = tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))
        offs = rows[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
        tl.store(out_ptr + offs, eps)

    _PROBES.update(
        _probe_philox_kernel=_probe_philox_kernel,
        _probe_normal_kernel=_probe_normal_kernel,
        _probe_normal_alt_kernel=_probe_normal_alt_kernel,
    )
    return _PROBES


def probe_variants() -> list[Variant]:
    from spar.ops.backends.triton._utils import elementwise_block

    br, bc = elementwise_block()
    eb = dict(BLOCK_R=br, BLOCK_C=bc)
    return [
        Variant(
            "probe-philox",
            "probe",
            "_probe_philox_kernel",
            {"out_ptr": "*u32"},
            dict(eb),
            "elem",
            "-",
            blocks=eb,
        ),
        Variant(
            "probe-normal",
            "probe",
            "_probe_normal_kernel",
            {"out_ptr": F32},
            dict(eb),
            "elem",
            "-",
            blocks=eb,
        ),
        Variant(
            "probe-normal-sincospi",
            "probe",
            "_probe_normal_alt_kernel",
            {"out_ptr": F32},
            dict(eb, FAST=False),
            "elem",
            "-",
            blocks=eb,
        ),
        Variant(
            "probe-normal-fastmath",
            "probe",
            "_probe_normal_alt_kernel",
            {"out_ptr": F32},
            dict(eb, FAST=True),
            "elem",
            "-",
            blocks=eb,
        ),
    ]


# =======================================================================================
# compiling
# =======================================================================================


def _signature(fn, pointers: dict[str, str], consts: dict) -> dict[str, str]:
    """Kernel signature: noise keys are 64-bit, every other scalar is i32."""

    def kind(n: str) -> str:
        if n in consts:
            return "constexpr"
        return pointers.get(n, "i64" if n.startswith("key") else "i32")

    return {n: kind(n) for n in fn.arg_names}


# Arguments the launchers pass as 1 for contiguous tensors: Triton's JIT turns an int
# argument equal to 1 into a constant, so the kernel that runs has unit-stride addressing.
UNIT_STRIDES = frozenset(
    "stride_xk stride_muk stride_sk stride_yn stride_dyn stride_ok stride_rk stride_muc "
    "stride_sc stride_oc stride_gc stride_rc stride_ac stride_vc stride_dc stride_xc".split()
)
# never specialised: the noise counters (do_not_specialize) and sample counts that may be 1
NOT_ALIGNED = frozenset(
    "first_sample step data_offset first_row num_samples SAMPLES_PER_PROGRAM".split()
)


def _specialise(fn, sig: dict[str, str], consts: dict) -> tuple[dict, dict, dict]:
    """What the JIT would compile for contiguous tensors whose sizes are multiples of 16 (the
    modelled shapes): unit strides become constants 1, pointers and the other integers get
    ``tt.divisibility = 16``."""
    sig, consts, attrs = dict(sig), dict(consts), {}
    for i, n in enumerate(fn.arg_names):
        if n in UNIT_STRIDES:
            sig[n] = "constexpr"
            consts[n] = 1
        elif sig[n].startswith("*") or (sig[n] == "i32" and n not in NOT_ALIGNED):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def compile_variant(v: Variant, arch: int, specialise: bool = True, reload: bool = False) -> dict:
    """PTX, SASS, registers and spill bytes of ``v`` for ``sm_<arch>``; ``specialise``: as
    the JIT compiles it for contiguous tensors with sizes divisible by 16 (else generic
    integer arguments, as ``tests/ops/test_triton_compile.py`` compiles)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    if v.module == "probe":
        fn = _probes()[v.kernel]
    else:
        mod = importlib.import_module(f"spar.ops.backends.triton.{v.module}")
        if reload:  # the source changed since the import (Triton re-reads it for locations)
            mod = importlib.reload(mod)
        fn = getattr(mod, v.kernel)
    sig, consts, attrs = _signature(fn, v.pointers, v.consts), v.consts, {}
    if specialise:
        sig, consts, attrs = _specialise(fn, sig, consts)
    src = ASTSource(fn, sig, consts, attrs)
    k = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=v.num_warps, num_stages=v.num_stages),
    )
    ptx = k.asm["ptx"]
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        Path(p).write_text(ptx)
        log = subprocess.run(
            [get_ptxas(arch).path, f"-arch=sm_{arch}{suffix}", "-v", p, "-o", p + ".cubin"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        sass = _sass(Path(p + ".cubin").read_bytes())
    spills = re.search(r"(\d+) bytes spill stores", log)
    regs = re.search(r"Used (\d+) registers", log)
    return {
        "ptx": ptx,
        "sass": sass,
        "regs": int(regs.group(1)) if regs else -1,
        "spill_bytes": int(spills.group(1)) if spills else 0,
    }


def _sass(cubin: bytes) -> str:
    """SASS with labels for branch targets (Triton's wrapper around ``cuobjdump -sass``)."""
    from triton.tools.disasm import get_sass

    return get_sass(cubin)


def _cuobjdump() -> str:
    from triton import knobs

    return knobs.nvidia.cuobjdump.path


def tools_available(arch: int = 90) -> str | None:
    """``None`` when ptxas and cuobjdump are usable, else why not."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        for path in (get_ptxas(arch).path, _cuobjdump()):
            if not path or not os.path.exists(path):
                return f"missing tool {path!r}"
    except Exception as e:  # noqa: BLE001 - any failure means "cannot count here"
        return f"{type(e).__name__}: {e}"
    return None


# =======================================================================================
# counting
# =======================================================================================

# SASS opcode -> class. Pipes (sm_80/sm_90): int_alu, fp_alu, conv_alu on the ALU pipe;
# fp32 on the FMA pipe; int_mad on the FMA-heavy half; mufu and conv_xu on the XU (16
# lanes/clk/SM); mma on the tensor cores; gmem/smem/local through the LSU.
SASS_CLASSES = {
    "int_alu": "IADD3 IADD IADD32I LOP3 LOP LOP32I SHF SHL SHR ISETP LEA SEL PRMT IABS IMNMX "
    "VIADD VIADDMNMX VIMNMX SGXT BMSK BFE BFI FLO POPC BREV P2R R2P PLOP3 ISCADD IDP "
    "LEPC",
    "int_mad": "IMAD IMUL IMADSP IMUL32I IMAD32I",
    "fp32": "FFMA FADD FMUL FFMA32I FADD32I FMUL32I HFMA2 HADD2 HMUL2 FSWZADD",
    "fp_alu": "FSETP FSEL FMNMX FSET FCHK HSETP2 HMNMX2 HSET2",
    "conv_alu": "I2FP F2IP F2FP",
    "conv_xu": "F2I I2F F2F FRND",
    "fp64": "DMUL DADD DFMA DSETP DMNMX",
    "mufu": "MUFU",
    "gmem_ld": "LDG LDGSTS UTMALDG LDGDEPBAR",
    "gmem_st": "STG RED ATOM ATOMG UTMASTG REDG",
    "smem": "LDS STS LDSM STSM ATOMS",
    "local": "LDL STL",
}
_SASS_OP = {op: c for c, ops in SASS_CLASSES.items() for op in ops.split()}
CLASSES = [*SASS_CLASSES, "mma", "uniform", "other"]
# the issue's summary classes
INTEGER = ("int_alu", "int_mad")


def sass_class(op: str) -> str:
    if "MMA" in op:  # HGMMA, HMMA, IMMA, ...
        return "mma"
    if op in _SASS_OP:
        return _SASS_OP[op]
    if op.startswith("U") or op in ("R2UR", "S2UR"):
        return "uniform"
    return "other"


def _mma_macs(op: str, mods: str, num_warps: int) -> int:
    """Multiply-adds one SASS MMA instruction does, summed over the warps of a program
    (a warpgroup MMA is issued by 4 warps together)."""
    m = re.search(r"(\d+)x(\d+)x(\d+)", mods)
    if op == "HGMMA" and m:
        a, b, c = map(int, m.groups())
        return a * b * c * num_warps // 4
    m = re.search(r"\.(\d)(\d)(\d+)\b", mods)  # HMMA.16816 / HMMA.1688
    if op == "HMMA" and m:
        shapes = {"16816": 16 * 8 * 16, "1688": 16 * 8 * 8, "884": 8 * 8 * 4}
        return shapes.get("".join(m.groups()), 0) * num_warps
    return 0


_SASS_INSTR = re.compile(
    # an optional address or control token ("0010:", "--:-:-:-:1": it has a colon, so an
    # all-hex opcode such as FADD is never taken for one), the /*address*/ comment, a
    # predicate, then the opcode
    r"^(?:[0-9a-fA-FY\-]*:[0-9a-fA-FY:\-]*\s+)?(?:/\*[0-9a-f]+\*/\s*)?(?:@!?U?P[T0-9]+\s+)?"
    r"([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)\s*([^;]*);"
)
_SASS_LABEL = re.compile(r"^\s*\.?(L[\w.]+|LBB\w+):\s*$")


def parse_sass(text: str) -> list[tuple]:
    """``[("label", name) | ("ins", op, mods, operands, predicated)]`` of one function."""
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("//", "Function", "code for", ".", "-----")):
            m = _SASS_LABEL.match(line)
            if m:
                out.append(("label", m.group(1)))
            continue
        m = _SASS_LABEL.match(line)
        if m:
            out.append(("label", m.group(1)))
            continue
        line = re.sub(r"/\*[^*]*\*/", " ", line).strip()
        if "\t" in raw and re.match(r"^[0-9a-fA-FY:\-]+$", line.split()[0] if line else ""):
            line = line.split(None, 1)[1] if len(line.split(None, 1)) > 1 else ""
        m = _SASS_INSTR.match(line)
        if m:
            op, mods, operands = m.groups()
            out.append(("ins", op, mods, operands.strip(), line.startswith("@"), line))
    return out


_PTX_LABEL = re.compile(r"^(\$L__BB\w+|// %bb\.\d+):")
_PTX_TYPES_FP = ("f32", "f16", "bf16", "f16x2", "bf16x2", "ftz")


def ptx_class(op: str) -> str:
    parts = op.split(".")
    head = parts[0]
    if (
        head in ("mma", "wgmma")
        and "mma" in op
        and "fence" not in op
        and "commit" not in op
        and "wait" not in op
    ):
        return "mma"
    if head in ("wgmma",):
        return "other"
    if head in ("ld", "st", "red", "atom", "cp", "ldmatrix", "stmatrix", "ldu"):
        if "local" in parts:
            return "local"
        if "shared" in parts[:2] or head in ("ldmatrix", "stmatrix"):
            return "smem"
        if "global" in parts or head == "cp":
            return "gmem_st" if head in ("st", "red") or (head == "atom") else "gmem_ld"
        return "other"
    if head in ("sqrt", "rsqrt", "lg2", "ex2", "sin", "cos", "tanh") or (
        head in ("rcp", "div") and "approx" in parts
    ):
        return "mufu"
    if head == "cvt":
        return (
            "conv_xu" if any(p in ("f32", "f64", "f16", "bf16") for p in parts[1:]) else "int_alu"
        )
    if "f64" in parts:
        return "fp64"
    fp = any(p in _PTX_TYPES_FP for p in parts[1:])
    if head in ("fma", "add", "sub", "mul", "mad", "neg", "abs", "div", "rcp") and fp:
        return "fp32"
    if head in ("setp", "selp", "min", "max", "testp", "copysign") and fp:
        return "fp_alu"
    if head in ("mul", "mad", "madc", "mul24", "mad24"):
        return "int_mad"
    if head in (
        "add",
        "addc",
        "sub",
        "subc",
        "xor",
        "and",
        "or",
        "not",
        "shl",
        "shr",
        "shf",
        "bfe",
        "bfi",
        "prmt",
        "neg",
        "abs",
        "min",
        "max",
        "setp",
        "selp",
        "popc",
        "clz",
        "brev",
        "lop3",
        "div",
        "rem",
        "sad",
    ):
        return "int_alu"
    return "other"


def _ptx_macs(op: str, num_warps: int) -> int:
    m = re.search(r"m(\d+)n(\d+)k(\d+)", op)
    if not m:
        return 0
    a, b, c = map(int, m.groups())
    return a * b * c * (num_warps // 4 if op.startswith("wgmma") else num_warps)


def parse_ptx(text: str) -> list[tuple]:
    """``[("label", name, loop_header, depth) | ("ins", op, operands, predicate)]``; the loop
    of a block comes from LLVM's ``Loop Header``/``in Loop`` comments."""
    out = []
    lines = text.splitlines()
    i = 0
    current = None
    while i < len(lines):
        line = lines[i].strip()
        m = _PTX_LABEL.match(line)
        if m:
            name = m.group(1).replace("$L__", "").replace("// %bb.", "bb")
            comment = line
            j = i + 1
            while j < len(lines) and lines[j].strip().startswith("//"):
                comment += " " + lines[j].strip()
                j += 1
            header, depth = None, 0
            h = re.search(r"This (?:Inner )?Loop Header: Depth=(\d+)", comment)
            if h:
                header, depth = name, int(h.group(1))
            else:
                h = re.search(r"in Loop: Header=(\S+) Depth=(\d+)", comment)
                if h:
                    header, depth = h.group(1), int(h.group(2))
            current = ("label", name, header, depth)
            out.append(current)
            i = j
            continue
        i += 1
        if not line or line.startswith(("//", ".", "{", "}", ")", "(", "$")):
            continue
        pred = None
        if line.startswith("@"):
            pred, _, line = line.partition(" ")
            line = line.strip()
        op, _, rest = line.replace("\t", " ").partition(" ")
        op = op.rstrip(";")
        if not re.match(r"^[a-z][\w.:]*$", op):
            continue
        out.append(("ins", op, rest.strip().rstrip(";"), pred))
    return out


def _cold_intervals(items, guard_of, target_of) -> list[tuple[int, int]]:
    """The Payne-Hanek slow path of the precise ``sinf``/``cosf``: code skipped by a
    conditional forward branch whose predicate compares ``|x|`` with 105615 (the libdevice
    threshold; Box-Muller's angle ``2*pi*u`` never reaches it). ``guard_of(i)`` says
    whether branch item ``i`` is such a branch. Returns ``[(start, end)]`` item indices."""
    labels = {it[1]: i for i, it in enumerate(items) if it[0] == "label"}
    cold = []
    for i, it in enumerate(items):
        if it[0] != "ins" or not guard_of(i):
            continue
        j = labels.get(target_of(it))
        if j is not None and j > i:
            cold.append((i + 1, j))
    return cold


def _in(intervals, k) -> bool:
    return any(a <= k < b for a, b in intervals)


def segments_sass(text: str, num_warps: int) -> dict[str, dict]:
    """Class counts per loop segment of a SASS function: ``outer`` (no loop), ``loop1``
    (depth 1, exclusive of inner loops), ``loop2``..."""
    items = parse_sass(text)

    def target(it):
        m = re.search(r"`?\(?\.?(L[\w.]+|LBB\w+)\)?", it[3])
        return m.group(1) if m else None

    def is_bra(it):
        return it[1] == "BRA"

    labels = {it[1]: i for i, it in enumerate(items) if it[0] == "label"}

    def guard(i: int) -> bool:
        # ptxas may keep the |x| >= 105615 comparison in a register, so the slow path is
        # found by what it skips: fp64 (the reduced argument times pi/2 in double) or local
        # memory (the reduction's table), and no comparison with 105615 itself (a branch
        # around a whole loop of noise contains those)
        it = items[i]
        j = labels.get(target(it)) if is_bra(it) and it[4] else None
        if j is None or j <= i:
            return False
        body = [items[k] for k in range(i + 1, j) if items[k][0] == "ins"]
        return any(sass_class(x[1]) in ("local", "fp64") for x in body) and not any(
            "105615" in x[3] for x in body
        )

    cold = _cold_intervals(items, guard, target)
    labels = {it[1]: i for i, it in enumerate(items) if it[0] == "label"}
    loops = []
    for i, it in enumerate(items):
        if it[0] == "ins" and is_bra(it) and not _in(cold, i):
            j = labels.get(target(it))
            body = [k for k in range(j + 1, i) if items[k][0] == "ins"] if j is not None else []
            if j is not None and j <= i and body:  # not the idle `BRA self` after EXIT
                loops.append((j, i + 1))
    return _count(
        items, loops, cold, lambda it: (sass_class(it[1]), _mma_macs(it[1], it[2], num_warps))
    )


def segments_ptx(text: str, num_warps: int) -> dict[str, dict]:
    items = parse_ptx(text)
    # predicates set by a comparison with 105615 (0f47CE4780): PTX registers are SSA
    slow = {
        it[2].split(",")[0].strip()
        for it in items
        if it[0] == "ins" and it[1].startswith("setp") and "0f47CE4780" in it[2]
    }

    def guard(i: int) -> bool:
        it = items[i]
        return it[1].startswith("bra") and it[3] is not None and it[3].lstrip("@") in slow

    cold = _cold_intervals(
        items, guard, lambda it: it[2].strip().split(",")[-1].strip().replace("$L__", "")
    )
    # depth per item from the block comments (LLVM's loop info)
    depth_of, header_of = [], []
    d, h = 0, None
    for it in items:
        if it[0] == "label":
            h, d = it[2], it[3]
        depth_of.append(d)
        header_of.append(h)
    counts: dict[str, dict] = {}
    for k, it in enumerate(items):
        if it[0] != "ins" or _in(cold, k):
            continue
        seg = "outer" if depth_of[k] == 0 else f"loop{depth_of[k]}"
        _add(
            counts,
            seg,
            ptx_class(it[1]),
            _ptx_macs(it[1], num_warps) if ptx_class(it[1]) == "mma" else 0,
        )
    return counts


def _add(counts, seg, cls, macs) -> None:
    c = counts.setdefault(seg, dict.fromkeys(CLASSES, 0) | {"macs": 0, "total": 0})
    c[cls] += 1
    c["total"] += 1
    c["macs"] += macs


def _count(items, loops, cold, classify) -> dict[str, dict]:
    counts: dict[str, dict] = {}
    for k, it in enumerate(items):
        if it[0] != "ins" or _in(cold, k):
            continue
        depth = sum(1 for a, b in loops if a <= k < b)
        cls, macs = classify(it)
        _add(counts, "outer" if depth == 0 else f"loop{depth}", cls, macs)
    return counts


# work per execution of a segment: (weight/output elements whose noise it generates,
# multiply-adds of its dot) -- used to normalise and, in the model, as trip counts
def segment_work(v: Variant) -> dict[str, tuple[int, int]]:
    b = v.blocks
    if v.work in ("fwd",):
        return {"loop1": (b["BLOCK_N"] * b["BLOCK_K"], b["BLOCK_M"] * b["BLOCK_N"] * b["BLOCK_K"])}
    if v.work == "dx":
        return {"loop2": (b["BLOCK_N"] * b["BLOCK_K"], b["BLOCK_M"] * b["BLOCK_N"] * b["BLOCK_K"])}
    if v.work == "dw":
        t = b["BLOCK_N"] * b["BLOCK_K"]
        return {"loop1": (t, 0), "loop2": (0, b["BLOCK_M"] * t)}
    if v.work == "elem_loop":
        return {"loop1": (v.tile_elems(), 0)}
    return {"outer": (v.tile_elems(), 0)}


def count_all(vs: list[Variant], archs: list[int], log=print, specialise=True) -> list[dict]:
    rows = []
    for arch in archs:
        for v in vs:
            try:
                try:
                    c = compile_variant(v, arch, specialise)
                except Exception:  # noqa: BLE001 - once more with the module re-imported
                    c = compile_variant(v, arch, specialise, reload=True)
            except Exception as e:  # noqa: BLE001 - reported, the others still count
                log(f"sm_{arch} {v.name}: compile failed: {type(e).__name__}: {e}"[:400])
                continue
            work = segment_work(v)
            for source, segs in (
                ("sass", segments_sass(c["sass"], v.num_warps)),
                ("ptx", segments_ptx(c["ptx"], v.num_warps)),
            ):
                for seg, cnt in sorted(segs.items()):
                    elems, macs = work.get(seg, (0, 0))
                    row = {
                        "arch": f"sm_{arch}",
                        "variant": v.name,
                        "kernel": v.kernel,
                        "dtype": v.dtype,
                        "blocks": "x".join(str(x) for x in v.blocks.values()),
                        "num_warps": v.num_warps,
                        "num_stages": v.num_stages,
                        "specialised": int(specialise),
                        "regs": c["regs"],
                        "spill_bytes": c["spill_bytes"],
                        "source": source,
                        "segment": seg,
                        "seg_elems": elems,
                        "seg_macs_expected": macs,
                        **{k: cnt[k] for k in [*CLASSES, "macs", "total"]},
                    }
                    # per element: warp instructions x 32 lanes = thread instructions
                    lanes = v.num_warps * 32
                    for k in ("integer", "fp32", "mufu", "total"):
                        n = sum(cnt[x] for x in INTEGER) if k == "integer" else cnt[k]
                        row[f"{k}_per_elem"] = round(n * lanes / elems, 3) if elems else ""
                    rows.append(row)
            log(f"sm_{arch} {v.name}: regs {c['regs']} spills {c['spill_bytes']} B")
    return rows


# =======================================================================================
# the throughput model
# =======================================================================================


@dataclass(frozen=True)
class Hardware:
    name: str
    arch: int
    sms: int
    clock_ghz: float  # SIMT clock of the published FP32 rate
    fp32_lanes: int  # per SM per clock
    int_lanes: int  # ALU pipe: IADD3/LOP3/SHF/ISETP..., per SM per clock
    imad_lanes: int  # IMAD (FMA-heavy half) per SM per clock
    xu_lanes: int  # MUFU and F2I/I2F conversions per SM per clock
    lsu_lanes: int  # load/store instructions, per SM per clock
    fp64_lanes: int
    tensor_tflops: float  # dense bf16
    hbm_tbs: float
    l2_mb: float
    source: str


HARDWARE = {
    "H100-SXM": Hardware(
        "H100-SXM",
        90,
        132,
        1.98,
        128,
        64,
        64,
        16,
        32,
        64,
        989.4,
        3.35,
        50,
        "NVIDIA H100 Tensor Core GPU datasheet and Hopper architecture whitepaper (H100 SXM5: "
        "132 SMs, 128 FP32 / 64 INT32 / 16 SFU lanes per SM per clock, 66.9 TFLOPS FP32 = "
        "132*128*2*1.98 GHz, 989.4 TFLOPS dense BF16 = 132 SMs * 4096 FLOP/clk * 1.83 GHz, "
        "HBM3 3.35 TB/s, 50 MB L2); per-instruction rates: CUDA C++ Programming Guide, "
        "'Throughput of Native Arithmetic Instructions' (cc 9.0)",
    ),
    "H200-SXM": Hardware(
        "H200-SXM",
        90,
        132,
        1.98,
        128,
        64,
        64,
        16,
        32,
        64,
        989.4,
        4.8,
        50,
        "NVIDIA H200 datasheet (same GH100 SMs and clocks as H100 SXM: 989 TFLOPS dense "
        "BF16, 67 TFLOPS FP32; 141 GB HBM3e at 4.8 TB/s)",
    ),
    "A100-SXM-80GB": Hardware(
        "A100-SXM-80GB",
        80,
        108,
        1.41,
        64,
        64,
        64,
        16,
        32,
        32,
        312.0,
        2.039,
        40,
        "NVIDIA A100 datasheet / Ampere whitepaper (108 SMs, 1.41 GHz, 64 FP32 / 64 INT32 / "
        "16 SFU lanes per SM per clock, 19.5 TFLOPS FP32, 312 TFLOPS dense BF16, 2.039 TB/s)",
    ),
}

# assumptions, each stated in the report
ISSUE_PER_SM = 4  # warp instructions per clock per SM (4 schedulers)
HBM_EFF = 0.90  # achievable fraction of peak HBM bandwidth for streaming kernels
CUBLAS_TC_EFF = 0.70  # cuBLAS bf16 GEMM/bmm: fraction of dense tensor peak reached
CUDNN_TC_EFF = 0.60  # cuDNN bf16 grouped conv (implicit GEMM): fraction of dense peak


def pipe_time(counts: dict[str, float], macs: float, hw: Hardware) -> dict[str, float]:
    """Seconds per pipe for dynamic warp-instruction counts summed over the whole GPU."""
    f = hw.clock_ghz * 1e9 * hw.sms
    warp = lambda lanes: lanes / 32  # noqa: E731 - warp instructions per clock per SM
    total = sum(counts.get(c, 0) for c in CLASSES)
    t = {
        "issue": total / (ISSUE_PER_SM * f),
        "alu": sum(counts.get(c, 0) for c in ("int_alu", "fp_alu", "conv_alu"))
        / (warp(hw.int_lanes) * f),
        "fma": (counts.get("fp32", 0) + counts.get("int_mad", 0)) / (warp(hw.fp32_lanes) * f),
        "fma_heavy": counts.get("int_mad", 0) / (warp(hw.imad_lanes) * f),
        "xu": (counts.get("mufu", 0) + counts.get("conv_xu", 0)) / (warp(hw.xu_lanes) * f),
        "fp64": counts.get("fp64", 0) / (warp(hw.fp64_lanes) * f),
        "lsu": sum(counts.get(c, 0) for c in ("gmem_ld", "gmem_st", "smem", "local"))
        / (warp(hw.lsu_lanes) * f),
        "tensor": 2 * macs / (hw.tensor_tflops * 1e12),
    }
    return t


@dataclass
class Launch:
    """One kernel launch of the model: dynamic warp-instruction counts by class, tensor
    multiply-adds and HBM bytes (Triton kernels), or a library call (``eff`` set: cuBLAS /
    cuDNN at that fraction of the dense tensor peak, or HBM-bound)."""

    name: str
    counts: dict[str, float] = field(default_factory=dict)
    macs: float = 0.0
    hbm_bytes: float = 0.0
    eff: float | None = None
    noise_elems: float = 0.0  # normals generated

    def time(self, hw: Hardware) -> tuple[float, str]:
        """Predicted seconds and the bound (pipe, ``tensor`` or ``hbm``)."""
        t_mem = self.hbm_bytes / (hw.hbm_tbs * 1e12 * HBM_EFF)
        if self.eff is not None:
            t_tc = 2 * self.macs / (hw.tensor_tflops * 1e12 * self.eff)
            return (t_tc, "tensor") if t_tc >= t_mem else (t_mem, "hbm")
        t = pipe_time(self.counts, self.macs, hw)
        t["hbm"] = t_mem
        bound = max(t, key=t.get)
        return t[bound], bound


class Counts:
    """The per-segment SASS counts of the CSV, by (arch, variant)."""

    def __init__(self, rows: list[dict]):
        self.seg: dict[tuple[str, str], dict[str, dict]] = {}
        self.meta: dict[tuple[str, str], dict] = {}
        for r in rows:
            if r["source"] != "sass":
                continue
            key = (r["arch"], r["variant"])
            self.seg.setdefault(key, {})[r["segment"]] = {
                k: float(r[k]) for k in [*CLASSES, "macs"]
            }
            self.meta[key] = r

    def launch(
        self,
        hw: Hardware,
        variant: str,
        execs: dict[str, float],
        name: str,
        hbm_bytes: float,
        noise_elems: float = 0.0,
    ) -> Launch:
        """Dynamic counts: each segment's counts x num_warps x its executions."""
        key = (f"sm_{hw.arch}", variant)
        segs = self.seg[key]
        warps = int(self.meta[key]["num_warps"])
        counts: dict[str, float] = {}
        macs = 0.0
        for seg, n in execs.items():
            c = segs.get(seg)
            if c is None:
                continue
            for k in CLASSES:
                counts[k] = counts.get(k, 0.0) + c[k] * warps * n
            macs += c["macs"] * n
        return Launch(name, counts, macs, hbm_bytes, noise_elems=noise_elems)

    def blocks(self, hw: Hardware, variant: str) -> list[int]:
        return [int(x) for x in self.meta[(f"sm_{hw.arch}", variant)]["blocks"].split("x")]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemm(
    name: str, m: float, n: float, k: float, batch: float, bytes_: float, eff: float = CUBLAS_TC_EFF
) -> Launch:
    """A cuBLAS/cuDNN call: tensor roofline at ``eff`` or HBM, whichever is longer."""
    return Launch(name, macs=m * n * k * batch, hbm_bytes=bytes_, eff=eff)


def elementwise(name: str, bytes_: float) -> Launch:
    """A torch elementwise kernel (softplus): HBM-bound."""
    return Launch(name, hbm_bytes=bytes_)


# --------------------------------------------------------------------------- linear


CHUNK_NUMEL = 1 << 21  # SPAR_CHUNK_NUMEL's default


def linear_plan(
    c: Counts, hw: Hardware, S: int, B: int, N: int, K: int, chunk_numel: int = CHUNK_NUMEL
) -> dict[str, dict[str, list[Launch]]]:
    """Launches of each path and phase for ``y[s] = x[s] @ W_s^T`` (bf16 activations, fp32
    mu/rho, per-sample input); the chunked path materialises ``chunk_numel`` weight
    elements at a time (at least one sample)."""
    a = 2  # bf16 bytes
    W = N * K
    xb, yb = S * B * K * a, S * B * N * a
    rowsB = 128 if B > 16 else 16
    fwd_v, dx_v = f"fwd-bf16-B{rowsB}", f"dx-bf16-B{rowsB}"
    bm, bn, bk = c.blocks(hw, fwd_v)
    mt = cdiv(B, bm)
    sp = elementwise("softplus(rho)", W * 4 * 2)
    fwd = c.launch(
        hw,
        fwd_v,
        {"outer": S * mt * cdiv(N, bn), "loop1": S * mt * cdiv(N, bn) * cdiv(K, bk)},
        "fused fwd kernel",
        xb + yb + 2 * W * 4,
        S * W * mt,
    )
    dbm, dbn, dbk = c.blocks(hw, dx_v)
    dmt = cdiv(B, dbm)
    progs = S * dmt * cdiv(K, dbk)
    dx = c.launch(
        hw,
        dx_v,
        {"outer": progs, "loop1": progs, "loop2": progs * cdiv(N, dbn)},
        "fused dx kernel",
        yb + xb + 2 * W * 4,
        S * W * dmt,
    )
    wbm, wbn, wbk = c.blocks(hw, "dw-bf16")
    wp = cdiv(N, wbn) * cdiv(K, wbk)
    dw = c.launch(
        hw,
        "dw-bf16",
        {"outer": wp, "loop1": wp * S, "loop2": wp * S * cdiv(B, wbm)},
        "fused dW kernel (grad_mu, grad_rho)",
        xb + yb + 3 * W * 4,
        S * W,
    )
    fused = {"fwd": [sp, fwd], "bwd": [elementwise("softplus(rho)", W * 8), dx, dw]}

    # chunked: SPAR_CHUNK_NUMEL = 2 M elements -> chunk of c samples
    cs = max(1, min(S, chunk_numel // W))
    nchunks = cdiv(S, cs)
    sbr, sbc = c.blocks(hw, "sample-bf16")
    tiles = cdiv(N, sbr) * cdiv(K, sbc)

    def sample(tag: str) -> Launch:
        # each chunk's launch reads mu and sigma (fp32) and writes c bf16 weight samples
        return c.launch(
            hw,
            "sample-bf16",
            {"outer": S * tiles},
            f"sampling kernel ({tag})",
            nchunks * 2 * W * 4 + S * W * a,
            S * W,
        )

    ws = S * W * a  # workspace bytes written + read over the chunks
    chunked_fwd = [sp, sample("fwd"), gemm("cuBLAS matmul x @ W^T", B, N, K, S, ws + xb + yb)]
    red = c.launch(
        hw,
        "sample-bwd-bf16",
        {"outer": tiles, "loop1": S * tiles},
        "sampling backward (reduce dW, eps regenerated)",
        ws + nchunks * 2 * W * 4 * 2 + W * 4,
        S * W,
    )
    chunked_bwd = [
        elementwise("softplus(rho)", W * 8),
        sample("bwd, for dx"),
        gemm("cuBLAS matmul dy @ W", B, K, N, S, ws + yb + xb),
        gemm("cuBLAS matmul dy^T @ x (per-sample dW)", N, K, B, S, ws + yb + xb),
        red,
    ]
    chunked = {"fwd": chunked_fwd, "bwd": chunked_bwd}

    bmm = {
        "fwd": [gemm("cuBLAS bmm x @ W_s^T", B, N, K, S, S * W * a + xb + yb)],
        "bwd": [
            gemm("cuBLAS bmm dy @ W_s", B, K, N, S, S * W * a + xb + yb),
            gemm("cuBLAS bmm dy^T @ x (dW_s)", N, K, B, S, S * W * a + xb + yb),
        ],
    }
    return {"fused": fused, "chunked": chunked, "bmm": bmm}


def conv_plan(
    c: Counts, hw: Hardware, S: int, B: int, cin: int, cout: int, ksz: int, hw_out: int
) -> dict[str, dict[str, list[Launch]]]:
    """Sampling kernel + cuDNN grouped conv + reduction kernel for one conv layer (stride 1,
    'same' padding: output spatial = input spatial)."""
    a = 2
    W = cout * cin * ksz * ksz
    R, C = cout, cin * ksz * ksz
    P = hw_out * hw_out
    macs = S * B * P * cout * cin * ksz * ksz
    act_in, act_out = S * B * cin * P * a, S * B * cout * P * a
    cs = max(1, min(S, CHUNK_NUMEL // W))
    nchunks = cdiv(S, cs)
    sbr, sbc = c.blocks(hw, "sample-bf16")
    tiles = cdiv(R, sbr) * cdiv(C, sbc)
    samp = lambda tag: c.launch(
        hw,
        "sample-bf16",
        {"outer": S * tiles},  # noqa: E731
        f"sampling kernel ({tag})",
        nchunks * 2 * W * 4 + S * W * a,
        S * W,
    )
    conv = lambda name, extra: gemm(
        name,
        macs,
        1,
        1,
        1,
        act_in + act_out + S * W * a + extra,  # noqa: E731
        CUDNN_TC_EFF,
    )
    red = c.launch(
        hw,
        "sample-bwd-bf16",
        {"outer": tiles, "loop1": S * tiles},
        "sampling backward (reduce dW, eps regenerated)",
        S * W * a + nchunks * 2 * W * 4 * 2 + W * 4,
        S * W,
    )
    sp = elementwise("softplus(rho)", W * 8)
    spar_ = {
        "fwd": [sp, samp("fwd"), conv("cuDNN grouped conv fwd", 0)],
        "bwd": [
            sp,
            samp("bwd, for dgrad"),
            conv("cuDNN grouped conv dgrad", 0),
            conv("cuDNN grouped conv wgrad (per-sample dW)", 0),
            red,
        ],
    }
    base = {
        "fwd": [conv("cuDNN grouped conv fwd", 0)],
        "bwd": [conv("cuDNN grouped conv dgrad", 0), conv("cuDNN grouped conv wgrad", 0)],
    }
    return {"sampled+cuDNN": spar_, "cuDNN on pre-sampled W": base}


def evaluate(plan, hw: Hardware, transform=None) -> list[dict]:
    """Predicted time of each path and phase (``step = fwd + bwd``); ``transform(launch)``
    may return a modified launch (a candidate change)."""
    rows = []
    for path, phases in plan.items():
        total = {}
        for phase in ("fwd", "bwd"):
            t_sum, noise, parts = 0.0, 0.0, []
            for lc in phases[phase]:
                if transform is not None:
                    lc = transform(lc)
                t, bound = lc.time(hw)
                t_sum += t
                noise += lc.noise_elems
                parts.append(f"{lc.name}: {t * 1e6:.1f} us ({bound})")
            total[phase] = (t_sum, noise, parts)
        f, b = total["fwd"], total["bwd"]
        total["step"] = (f[0] + b[0], f[1] + b[1], [])
        for phase, (t, noise, parts) in total.items():
            rows.append(
                {
                    "path": path,
                    "phase": phase,
                    "us": t * 1e6,
                    "normals": noise,
                    "breakdown": "; ".join(parts),
                }
            )
    return rows


def per_elem(c: Counts, hw: Hardware, variant: str, seg: str = "outer") -> dict[str, float]:
    """Warp instructions per element by class of an ``elem`` kernel (the probes)."""
    key = (f"sm_{hw.arch}", variant)
    cnt = c.seg[key][seg]
    warps = int(c.meta[key]["num_warps"])
    elems = int(c.meta[key]["blocks"].split("x")[0]) * int(c.meta[key]["blocks"].split("x")[1])
    return {k: cnt[k] * warps / elems for k in CLASSES}


def swap_noise(base: dict[str, float], alt: dict[str, float] | None, only=None):
    """A transform replacing each generated normal's counts ``base`` by ``alt`` (``None``:
    the noise is free) in the launches named in ``only`` (default: all)."""

    def f(lc: Launch) -> Launch:
        if not lc.noise_elems or lc.eff is not None or (only and lc.name not in only):
            return lc
        counts = dict(lc.counts)
        for k in CLASSES:
            d = (alt or {}).get(k, 0.0) - base.get(k, 0.0)
            counts[k] = max(0.0, counts.get(k, 0.0) + d * lc.noise_elems)
        return Launch(
            lc.name, counts, lc.macs, lc.hbm_bytes, None, lc.noise_elems if alt is not None else 0.0
        )

    return f


SWEEP_SHAPES = ((4096, 4096), (1024, 1024), (4096, 1024))


def compose(*fs):
    """Apply launch transforms right to left."""

    def f(lc: Launch) -> Launch:
        for g in reversed(fs):
            lc = g(lc)
        return lc

    return f


def predictions(c: Counts) -> dict:
    """Every predicted figure of the report."""
    out: dict = {"linear": [], "sweep": [], "conv": [], "noise": [], "candidates": []}
    S, N, K, B = 16, 4096, 4096, 128
    for name in ("H100-SXM", "H200-SXM"):
        hw = HARDWARE[name]
        for r in evaluate(linear_plan(c, hw, S, B, N, K), hw):
            out["linear"].append({"device": name, "case": f"linear S={S} B={B} {N}x{K} bf16", **r})
        for n, k in SWEEP_SHAPES:
            for b in (16, 128, 256, 512, 1024, 2048):
                rows = evaluate(linear_plan(c, hw, S, b, n, k), hw)
                step = {r["path"]: r["us"] for r in rows if r["phase"] == "step"}
                whole = evaluate(linear_plan(c, hw, S, b, n, k, chunk_numel=S * n * k), hw)
                step["chunked_all"] = next(
                    r["us"] for r in whole if r["phase"] == "step" and r["path"] == "chunked"
                )
                out["sweep"].append({"device": name, "shape": f"{n}x{k}", "B": b, **step})
        conv = conv_plan(c, hw, S, 128, 256, 256, 3, 14)
        for r in evaluate(conv, hw):
            out["conv"].append(
                {"device": name, "case": "conv 256->256 3x3 14x14 S=16 B=128 bf16", **r}
            )
        # noise generator alone
        for v in ("probe-philox", "probe-normal", "probe-normal-sincospi", "probe-normal-fastmath"):
            if (f"sm_{hw.arch}", v) not in c.seg:
                continue
            pe = per_elem(c, hw, v)
            t = pipe_time(pe, 0.0, hw)
            bound = max(t, key=t.get)
            out["noise"].append(
                {
                    "device": name,
                    "probe": v,
                    "thread_instr_per_normal": 32 * sum(pe.values()),
                    "integer": 32 * (pe["int_alu"] + pe["int_mad"]),
                    "fp32": 32 * pe["fp32"],
                    "mufu": 32 * pe["mufu"],
                    "normals_per_s": 1 / t[bound],
                    "bound": bound,
                }
            )
        # candidate changes to the noise (fused step, B = 128)
        plan = linear_plan(c, hw, S, B, N, K)
        base = per_elem(c, hw, "probe-normal")
        ref = {r["path"] + r["phase"]: r["us"] for r in evaluate(plan, hw)}
        bmm = ref["bmmstep"]
        phil = per_elem(c, hw, "probe-philox")

        scaled = {f: {k: base[k] - f * phil[k] for k in CLASSES} for f in (0.3, 0.5)}
        once = swap_noise(base, None, only={"fused dx kernel"})
        cands = [
            ("today (3 generations per step: fwd, dx, dW)", None),
            ("regenerate once per backward (dx noise free; merge cost ignored)", once),
            (
                "Philox4x32-7 (7 rounds instead of 10; changes I1's function)",
                swap_noise(base, scaled[0.3]),
            ),
            (
                "8 normals per Philox call (16-bit uniforms; changes I1's function)",
                swap_noise(base, scaled[0.5]),
            ),
        ]
        labels = {
            "probe-normal-sincospi": "Box-Muller with cospi/sinpi(2u) (same integers; "
            "normals move by ~1 ulp of the angle)",
            "probe-normal-fastmath": "Box-Muller with MUFU __logf/__cosf/__sinf (same "
            "integers; normals within ~1e-6 abs., not a few ulp)",
        }
        for alt, label in labels.items():
            if (f"sm_{hw.arch}", alt) in c.seg:
                cands.append((label, swap_noise(base, per_elem(c, hw, alt))))
        if (f"sm_{hw.arch}", "probe-normal-fastmath") in c.seg:
            fast = per_elem(c, hw, "probe-normal-fastmath")
            fast8 = {k: fast[k] - 0.5 * phil[k] for k in CLASSES}
            cands.append(
                ("once per backward + MUFU Box-Muller", compose(swap_noise(base, fast), once))
            )
            cands.append(
                (
                    "once per backward + MUFU Box-Muller + 8 normals per Philox call",
                    compose(swap_noise(base, fast8), once),
                )
            )
        cands.append(("noise free (lower bound of any generator change)", swap_noise(base, None)))
        for label, tr in cands:
            rows = evaluate({"fused": plan["fused"]}, hw, tr)
            step = next(r["us"] for r in rows if r["phase"] == "step")
            out["candidates"].append(
                {
                    "device": name,
                    "change": label,
                    "fused_step_us": step,
                    "saving_us": ref["fusedstep"] - step,
                    "ratio_to_bmm": step / bmm,
                }
            )
    return out


def _md_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(h for h, _, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = []
    for r in rows:
        cells = []
        for _, k, fmt in cols:
            v = r.get(k, "")
            cells.append(format(v, fmt) if fmt and v != "" else str(v))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def kernel_table(rows: list[dict], arch: str) -> list[dict]:
    """One line per variant: the segment that generates the noise, per element."""
    out = []
    for r in rows:
        if r["arch"] != arch or r["source"] != "sass" or r["seg_elems"] in ("", "0", 0):
            continue
        pt = next(
            (
                x
                for x in rows
                if x["arch"] == arch
                and x["source"] == "ptx"
                and x["variant"] == r["variant"]
                and x["segment"] == r["segment"]
            ),
            {},
        )
        warps = int(r["num_warps"])
        el = int(r["seg_elems"])
        mma = int(r["mma"])
        out.append(
            {
                "variant": r["variant"],
                "blocks": r["blocks"],
                "warps": warps,
                "regs": r["regs"],
                "spill": r["spill_bytes"],
                "segment": r["segment"],
                "int": float(r["integer_per_elem"]),
                "fp32": float(r["fp32_per_elem"]),
                "mufu": float(r["mufu_per_elem"]),
                "total": float(r["total_per_elem"]),
                "mma": mma,
                "ptx_int": float(pt.get("integer_per_elem") or 0),
                "ptx_total": float(pt.get("total_per_elem") or 0),
                "gmem": (int(r["gmem_ld"]) + int(r["gmem_st"])) * warps * 32 / el,
                "smem": int(r["smem"]) * warps * 32 / el,
            }
        )
    return out


def write_report(rows: list[dict]) -> None:
    c = Counts(rows)
    pr = predictions(c)
    pred_rows = []
    for sect in ("linear", "conv"):
        for r in pr[sect]:
            pred_rows.append({"status": "predicted", **r})
    for r in pr["sweep"]:
        for path in ("fused", "chunked", "bmm"):
            pred_rows.append(
                {
                    "status": "predicted",
                    "device": r["device"],
                    "case": f"linear S=16 B={r['B']} {r['shape']} bf16",
                    "path": path,
                    "phase": "step",
                    "us": r[path],
                }
            )
    for r in pr["candidates"]:
        pred_rows.append(
            {
                "status": "predicted",
                "device": r["device"],
                "case": "linear S=16 B=128 4096x4096 bf16",
                "path": "fused",
                "phase": "step",
                "us": r["fused_step_us"],
                "breakdown": "candidate: " + r["change"],
            }
        )
    for r in pred_rows:
        r["us"] = round(r["us"], 1)
    _write_csv(PRED_CSV, pred_rows)
    REPORT_MD.write_text(report_text(rows, pr))


def report_text(rows: list[dict], pr: dict) -> str:
    ktab = kernel_table(rows, "sm_90")
    k80 = kernel_table(rows, "sm_80")
    lin = {(r["device"], r["path"], r["phase"]): r for r in pr["linear"]}
    conv = {(r["device"], r["path"], r["phase"]): r for r in pr["conv"]}

    def ptab(d, paths, dev):
        out = []
        base = d[(dev, paths[-1], "step")]["us"]
        for path in paths:
            out.append(
                {
                    "path": path,
                    **{ph: d[(dev, path, ph)]["us"] for ph in ("fwd", "bwd", "step")},
                    "ratio": d[(dev, path, "step")]["us"] / base,
                    "normals": d[(dev, path, "step")]["normals"] / (16 * 4096 * 4096)
                    if "linear" in d[(dev, path, "step")]["case"]
                    else d[(dev, path, "step")]["normals"] / (16 * 256 * 256 * 9),
                }
            )
        return out

    hw_rows = [
        {
            "name": h.name,
            "sms": h.sms,
            "clk": h.clock_ghz,
            "fp32": h.fp32_lanes,
            "int": h.int_lanes,
            "xu": h.xu_lanes,
            "tc": h.tensor_tflops,
            "hbm": h.hbm_tbs,
            "src": h.source,
        }
        for h in HARDWARE.values()
    ]
    kcols = [
        ("variant", "variant", ""),
        ("blocks", "blocks", ""),
        ("warps", "warps", ""),
        ("regs", "regs", ""),
        ("spill B", "spill", ""),
        ("loop", "segment", ""),
        ("int/elem", "int", ".1f"),
        ("fp32/elem", "fp32", ".1f"),
        ("MUFU/elem", "mufu", ".2f"),
        ("gmem/elem", "gmem", ".2f"),
        ("smem/elem", "smem", ".2f"),
        ("all SASS/elem", "total", ".1f"),
        ("MMA instr", "mma", ""),
        ("PTX int/elem", "ptx_int", ".1f"),
        ("PTX all/elem", "ptx_total", ".1f"),
    ]
    pcols = [
        ("path", "path", ""),
        ("fwd us", "fwd", ".0f"),
        ("bwd us", "bwd", ".0f"),
        ("step us", "step", ".0f"),
        ("step / baseline", "ratio", ".2f"),
        ("normals per step (x S*|W|)", "normals", ".0f"),
    ]
    ncols = [
        ("device", "device", ""),
        ("probe", "probe", ""),
        ("SASS instr/normal", "thread_instr_per_normal", ".1f"),
        ("integer", "integer", ".1f"),
        ("fp32", "fp32", ".1f"),
        ("MUFU", "mufu", ".2f"),
        ("normals/s (predicted)", "normals_per_s", ".3g"),
        ("bound", "bound", ""),
    ]
    ccols = [
        ("device", "device", ""),
        ("change", "change", ""),
        ("fused step us", "fused_step_us", ".0f"),
        ("saving us", "saving_us", ".0f"),
        ("step / bmm", "ratio_to_bmm", ".2f"),
    ]
    scols = [
        ("device", "device", ""),
        ("N x K", "shape", ""),
        ("B rows/sample", "B", ""),
        ("fused step us", "fused", ".0f"),
        ("chunked step us", "chunked", ".0f"),
        ("chunked, one chunk of S samples", "chunked_all", ".0f"),
        ("bmm step us", "bmm", ".0f"),
    ]
    parts = [REPORT_HEAD]
    parts.append("## Inputs: hardware (published peak rates)\n")
    parts.append(
        _md_table(
            hw_rows,
            [
                ("GPU", "name", ""),
                ("SMs", "sms", ""),
                ("SIMT clock GHz", "clk", ""),
                ("FP32 lanes/SM/clk", "fp32", ""),
                ("INT32 lanes/SM/clk", "int", ""),
                ("MUFU lanes/SM/clk", "xu", ""),
                ("dense BF16 TFLOP/s", "tc", ""),
                ("HBM TB/s", "hbm", ""),
                ("source", "src", ""),
            ],
        )
    )
    parts.append(
        REPORT_ASSUMPTIONS.format(
            issue=ISSUE_PER_SM, hbm=HBM_EFF, cublas=CUBLAS_TC_EFF, cudnn=CUDNN_TC_EFF
        )
    )
    parts.append(
        "## Per-kernel counts (SASS, sm_90a; thread instructions per generated "
        "element of the loop that makes the noise)\n"
    )
    parts.append(_md_table(ktab, kcols))
    parts.append("\nsm_80 (A100) for comparison:\n")
    parts.append(_md_table(k80, kcols))
    parts.append(REPORT_COUNTS_NOTE)
    parts.append("## The noise generator alone (probes)\n")
    parts.append(_md_table(pr["noise"], ncols))
    parts.append(REPORT_NOISE_NOTE)
    for dev in ("H100-SXM", "H200-SXM"):
        parts.append(
            f"## Linear, S=16, B=128 rows/sample, 4096x4096, bf16 -- {dev} (**predicted**)\n"
        )
        parts.append(_md_table(ptab(lin, ["fused", "chunked", "bmm"], dev), pcols))
        parts.append("\nPer launch (step = fwd + bwd):\n")
        for path in ("fused", "chunked", "bmm"):
            for ph in ("fwd", "bwd"):
                parts.append(f"- {path} {ph}: {lin[(dev, path, ph)]['breakdown']}")
        parts.append("")
    for dev in ("H100-SXM", "H200-SXM"):
        parts.append(
            f"## Conv 256->256, 3x3, 14x14, S=16, B=128/sample, bf16 -- {dev} (**predicted**)\n"
        )
        parts.append(_md_table(ptab(conv, ["sampled+cuDNN", "cuDNN on pre-sampled W"], dev), pcols))
        for path in ("sampled+cuDNN", "cuDNN on pre-sampled W"):
            for ph in ("fwd", "bwd"):
                parts.append(f"- {path} {ph}: {conv[(dev, path, ph)]['breakdown']}")
        parts.append("")
    parts.append("## Fused vs chunked by rows per sample (step, **predicted**)\n")
    parts.append(_md_table(pr["sweep"], scols))
    parts.append(REPORT_DISPATCH)
    parts.append(decision_text(pr))
    parts.append("## Noise-cost changes (fused step, B=128, **predicted**)\n")
    parts.append(_md_table(pr["candidates"], ccols))
    parts.append(REPORT_TAIL)
    return "\n".join(parts) + "\n"


REPORT_HEAD = """# GPU cost model of spar's Triton kernels (no GPU: all times are **predicted**)

Made by `python bench/cost_model.py` (see its docstring). Nothing in this file was measured
on a GPU: the instruction counts come from the compiler (Triton 3.9 -> PTX -> ptxas ->
SASS, for sm_90a and sm_80), the times from those counts and published peak rates. The
first GPU run of `bench/bench_kernels.py` should be compared with these figures and the
model corrected where it is wrong.

Method: each kernel is compiled with the block sizes its launcher uses and specialised as
the JIT specialises it for contiguous tensors whose sizes are multiples of 16 (unit strides
constant, 16-divisible pointers and sizes). Its SASS is split into loop bodies (backward
branches); the precise `sinf`/`cosf` slow path (Payne-Hanek, only for |x| >= 105615,
never taken for Box-Muller's angle) is left out. A loop body's counts times its trip count
times the warps of a program give the dynamic warp instructions of a launch, by class.
Each class has a pipe (issue: 4 warp instr/clk/SM; ALU: integer logic/add/compare, 64
lanes; FMA: FP32 + IMAD, 128 lanes on sm_90 with IMAD on its 64-lane heavy half; XU: MUFU
and F2I/I2F, 16 lanes; LSU: 32 lanes) and the tensor cores run the MMA multiply-adds; a
kernel takes the longest of its pipes, its tensor time and its compulsory HBM traffic
(perfect overlap, no occupancy or latency effects: optimistic for our kernels).
cuBLAS and cuDNN are a roofline at a stated efficiency.
"""

REPORT_ASSUMPTIONS = """
Assumptions (each one a knob in `bench/cost_model.py`):

- issue: {issue} warp instructions per clock per SM; the SIMT pipes run at the clock of the
  published FP32 rate (1.98 GHz on H100/H200), the tensor cores at the published dense
  BF16 rate (989.4 TFLOP/s, i.e. 1.83 GHz);
- per-instruction rates from the CUDA C++ Programming Guide's throughput table (cc 8.0 and
  9.0: FP32 FMA 64/128 lanes per SM per clock, 32-bit integer add/logic/shift/compare 64,
  integer multiply-add 64, MUFU and FP32<->INT conversions 16);
- HBM: {hbm:.0%} of the peak is reached by streaming kernels; only compulsory traffic
  counts (mu/sigma tiles re-read by the S samples of a weight tile hit L2: the launchers
  order programs sample-fastest for that; the chunked workspace is written and read
  through HBM although at 33.5 MB it may partly stay in the 50 MB L2);
- cuBLAS bf16 GEMM/bmm at {cublas:.0%} of the dense tensor peak, cuDNN bf16 grouped
  conv at {cudnn:.0%}, or HBM-bound if that takes longer;
- launch overheads (a few us per launch; the chunked path launches 3 kernels per sample)
  and `softplus(rho)` recomputations are included only as HBM traffic (softplus) or not at
  all (launch latency).
"""

REPORT_COUNTS_NOTE = """
`int` counts the ALU integer instructions (IADD3, LOP3, SHF, ISETP, LEA, SEL, PRMT, ...)
plus IMAD (multiply-adds, also the `IMAD.MOV`/`IMAD.SHL` ptxas uses as moves to balance
pipes); `fp32` counts FFMA/FADD/FMUL; MUFU is one `MUFU.SQRT` per pair of normals (the
precise `logf`/`sinf`/`cosf` of libdevice are FMA polynomials, not MUFU). Per element of
the weight tile (linear kernels: per weight element per `BLOCK_M` rows of one sample;
`dw`: the sample loop that regenerates eps; elementwise kernels: per output element).
"MMA instr" is per loop iteration per warp; the MMA multiply-adds it implies equal
`BLOCK_M*BLOCK_N*BLOCK_K` per iteration (checked in the CSV: `macs` vs
`seg_macs_expected`). fp32 variants use the `ieee` dot (FFMA, no tensor cores). The dW
kernels' row is their sample loop (noise + accumulation); their MMA sits in the inner loop
over `BLOCK_M` rows (`loop2` in the CSV, 4 HGMMA per warp per iteration on sm_90).
The A100 row of the hardware table serves only to read the sm_80 counts; the predictions
are for the H100 and H200.
"""

REPORT_NOISE_NOTE = """
The issue's premise ("about 40 integer operations per normal") does not match the SASS:
Philox4x32-10 is about 60 instructions per call, i.e. about 15 per normal, since all four
32-bit outputs of every call are used (`normal_tile` turns lanes 0-3 into 4 normals with
two Box-Muller pairs, both cos and sin). The larger share is Box-Muller: libdevice's
precise `logf`, `cosf` and `sinf` are software (Cody-Waite reduction + polynomials), about
45 SASS instructions per normal, so one normal costs about 60 thread instructions and the
generator is issue-bound at about 2 normals per SM per clock. The premise's conclusion
holds: at B=128 a weight element's noise (60 instructions) costs several times its share
of tensor-core work (2*128 FLOP at 4096 FLOP/clk/SM = 1/16 clock per SM).
"""

REPORT_DISPATCH = """
### FUSED_MAX_ROWS and block sizes

The fused kernels regenerate each weight tile once per `BLOCK_M` (128) rows of a sample, so
the fused step grows in steps of `ceil(B/128)`; the chunked path generates each weight once
per sample per pass (3 passes) whatever B is, but with the default `SPAR_CHUNK_NUMEL`
(2 M elements: one 4096x4096 sample per chunk) every chunk re-reads mu and sigma in fp32
(134 MB for 4096x4096), writes and reads a bf16 workspace and read-modify-writes the fp32
gradient accumulators, so it is HBM-bound. "One chunk of S samples" is the chunked path
with `SPAR_CHUNK_NUMEL = S*|W|` (mu/sigma read once per pass; workspace S*|W|).
"""


def decision_text(pr: dict) -> str:
    sw = {(r["device"], r["shape"], r["B"]): r for r in pr["sweep"]}

    def ratio(dev, shape, b):
        r = sw[(dev, shape, b)]
        return r["fused"] / r["chunked"]

    lines = [
        "",
        "**Decision: `FUSED_MAX_ROWS` stays 128.** Fused over chunked step time "
        "(< 1: fused faster), **predicted**:",
        "",
    ]
    lines.append("| device | N x K | B=128 | B=256 | B=512 |")
    lines.append("|---|---|---|---|---|")
    for dev in ("H100-SXM", "H200-SXM"):
        for n, k in SWEEP_SHAPES:
            sh = f"{n}x{k}"
            lines.append(
                f"| {dev} | {sh} | "
                + " | ".join(f"{ratio(dev, sh, b):.2f}" for b in (128, 256, 512))
                + " |"
            )
    lines.append(DECISION_PROSE)
    return "\n".join(lines)


DECISION_PROSE = """
At B <= 128 the fused path wins on every shape and both GPUs (it generates the minimum,
one tile per sample per pass, and moves no workspace). At B = 256 it wins only on the
H100 with large layers and loses on the H200 (faster HBM helps the chunked path) and on
small layers; at B >= 512 it loses everywhere. The crossover therefore sits between 128
and 256 rows, and 128 is the threshold that is never predicted to be wrong by more than
the model's own error; moving it to 256 would gain up to 1.3x on one GPU and lose up to
1.3x on the other. The threshold stays at 128 (comment in `linear.py` cites this table).

**Block sizes stay** (`default_config`, `elementwise_block()`):

- bf16 fused kernels: `BLOCK_M` = 128 already covers a whole B <= 128 sample, so each tile
  is generated once per kernel: the minimum. All sm_90 variants compile without spills.
- fp32 fused kernels (`ieee` dot on FMA): fwd uses `BLOCK_M` 64 and dx 32, so at B = 128
  the fused step generates each weight 2 + 4 + 1 = 7 times. Compiled alternatives
  (sm_90a, specialised): fwd 128x64x16 / 8 warps costs 1.61 SASS instructions per weight
  element per row against 2.15 today (-25 %), dx 128x16x64 / 8 warps 1.63 against 3.23
  (-50 %). They are not adopted: they need 221-238 registers (one 8-warp program per SM,
  which the model cannot judge) and, compiled with generic integer arguments (sizes not
  multiples of 16, as `tests/ops/test_triton_compile.py` compiles), both reach 255
  registers and spill (64 and 36 bytes). A GPU measurement should decide.
- `elementwise_block()` (16, 128): (32, 128) or (16, 256) save 7 % of the sampling
  kernel's instructions per element (66.7 vs 71.9) at 105 instead of 62 registers; the
  sampling kernel is HBM-bound on the chunked linear path and under 3 % of the conv step,
  and the shared-input lrt backward already spills at the current size (generic compile,
  a known xfail), so it stays.
- sm_80 (A100): the bf16 fwd and dx tiles for B = 128 spill on sm_80 (24 and 72 bytes;
  none on sm_90). `default_config` is tuned for Hopper; an sm_80 table is future work.
"""

REPORT_TAIL = """
Reading the table: *today* is the fused path as it is; each other row changes one thing
(or the listed combination), keeping the rest. Savings are of the fused step on that GPU.

### What the kernels do today

- `normal_tile` uses all four 32-bit outputs of every Philox call: lanes 0-3 of call
  `(col // 4, row, sample, step)` become the normals of columns 4g..4g+3 through two
  Box-Muller pairs, each pair using both its cos and its sin. Nothing to gain there.
- Tiles generated per step (bf16, B <= 128): fused = 3 (forward, dx kernel, dW kernel);
  chunked = 3 (sampling for the forward, sampling again for dx, the reduction kernel).
  fp32 fused at B = 128: 7 (see block sizes above). At B > 128 the fused forward and dx
  generate `ceil(B/128)` times each, which is why the chunked path takes over.
- Per generated normal (probe, sm_90a): Philox 15 SASS instructions (60 per call),
  Box-Muller about 45 (precise `logf`/`cosf`/`sinf` in software, one `MUFU.SQRT` per pair);
  the fused kernels add 5-12 per element for loads, conversion and shared-memory staging.

### Candidate changes, predicted savings (H100, fused step 4096x4096, S=16, B=128)

1. **Regenerate once per backward** (I1 kept). Saves the dx kernel's noise: about 25 % of
   the step (table). Not implemented: the dx tile `(s, m, k)` sums over all n-tiles while
   the dW tile `(n, k)` sums over all samples, so one kernel that generates a tile once
   must reduce one of the two across programs. Deterministically that needs fp32 partial
   sums of dx per n-block, `N/BLOCK_N * S*B*K*4` bytes (1.07 GB at BLOCK_N = 128, about
   0.7 ms of HBM traffic on an H100, more than the 0.48 ms saved); with atomics it is
   non-deterministic; keeping per-sample `dW` instead breaks I4. Predicted net loss as
   things stand, so not done.
2. **Use all four Philox outputs**: already the case (above).
3. **Amortise a tile over more rows**: at B <= 128 a tile already serves all rows of its
   sample (`BLOCK_M` = 128); beyond 128 the chunked path takes over. A `BLOCK_M` of 256
   for bf16 would halve the fused forward's noise at B = 256 but needs a 256x128 fp32
   accumulator (128 registers per thread at 8 warps): not attempted.
4. **Box-Muller with MUFU** (`__logf/__cosf/__sinf`): the largest single saving (about
   42 %), and the Philox integers (I1) are unchanged, but the normals then differ from
   `spar.rng`'s by up to about 1e-6 absolute, not "a few ulp" (I2), and MUFU results are
   not specified bit for bit across GPU generations. Needs a decision on I2's tolerance;
   not done here.
5. **cospi/sinpi(2u)** instead of cos/sin(2*pi*u): exact argument reduction, same
   integers, about 6 % saved; the normals move by the rounding of `2*pi*u` (sub-ulp of the
   angle), which the reference would have to follow. Too small to be worth the I2 change.
6. **8 normals per call (16-bit uniforms)** or **Philox4x32-7**: 12 % and 7 % of the step;
   both redefine the noise function of I1 (new reference in `spar.rng` and every backend).

Combined (1 + 4 + 6) the fused step is predicted at about 1.3x bmm on the H100, the
issue's goal; the noise-free lower bound there is below bmm (the fused path moves no S*|W|
weights), so the generator is the whole gap. On the H200 the bmm baseline is faster (HBM
4.8 TB/s) while the fused path is compute-bound: the same changes reach about 1.8x, and
even free noise stays about 1.2x.

### Caveats

- Static counts times trip counts: no caches, no occupancy, no latency, no warp
  divergence (the sin/cos slow path is never taken), perfect overlap of pipes, tensor and
  memory. For the issue-bound fused kernels the error is mostly in issue efficiency
  (real kernels reach perhaps 60-80 % of 4 warp instructions per clock).
- cuBLAS/cuDNN efficiencies and HBM efficiency are assumptions; the chunked path's time is
  dominated by its HBM traffic, which is counted, not guessed.
- Counts are of the kernels specialised for contiguous tensors with 16-divisible sizes;
  unspecialised compiles (other shapes) cost more (fused forward, bf16, B=128: 90 instead
  of 72 SASS instructions per weight element; `--generic` counts them).
- Spilled kernels (sm_80 fwd/dx bf16 B=128) are counted less reliably: spill code is local
  memory, which the slow-path detection also looks for.
"""


# =======================================================================================
# the cuda backend's kernels (csrc/spar_cuda.cu)
# =======================================================================================

CUDA_CSV = RESULTS / "cuda_kernels.csv"
CUDA_MD = RESULTS / "cuda_kernels.md"
# bytes per output element of the sampling kernel: the element written, plus mu and sigma
# (8 B) read once per thread for its ``spt`` samples (spt = 16: a large weight, S >= 16)
CUDA_SAMPLE_SPT = 16
CUDA_OUT_BYTES = {"f32": 4, "f16": 2, "bf16": 2}


def _sass_labelled(raw: str) -> str:
    """One function's ``cuobjdump -sass`` text with ``LBB<n>:`` labels at branch targets
    and ``BRA LBB<n>``, the form :func:`segments_sass` reads (what Triton's ``get_sass``
    gives its own cubins; its parser expects one ``.headerflags`` line, and cubins of nvcc
    13's ptxas carry two)."""
    ins = re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*;)", raw)
    targets = sorted({int(t, 16) for _, a in ins for t in re.findall(r"BRA[^;]*?0x([0-9a-f]+)", a)})
    label = {t: f"LBB{i}" for i, t in enumerate(targets)}
    out = []
    for addr, asm in ins:
        if int(addr, 16) in label:
            out.append(f"{label[int(addr, 16)]}:")
        asm = re.sub(r"(BRA[^;]*?)0x([0-9a-f]+)", lambda m: m.group(1) + label[int(m.group(2), 16)],
                     asm)  # fmt: skip
        out.append(asm)
    return "\n".join(out) + "\n"


def compile_cuda(arch: int) -> dict[str, dict]:
    """``{kernel: {regs, spill_bytes, sass}}`` of every kernel of the cuda backend for
    ``sm_<arch>``: the translation unit NVRTC gets (``source.assemble()``, with its options)
    compiled to PTX by nvcc, then nvcc's ptxas ``-v`` (registers, spills), and the SASS
    disassembled by the cuobjdump used for the Triton kernels above."""
    import shutil

    from spar.ops.backends.cuda import source

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc is not on PATH")
    ptxas = shutil.which("ptxas", path=os.path.dirname(os.path.realpath(nvcc))) or "ptxas"
    with tempfile.TemporaryDirectory() as d:
        unit, ptx, cubin = (os.path.join(d, n) for n in ("unit.cu", "k.ptx", "k.cubin"))
        Path(unit).write_text(source.assemble())
        subprocess.run([nvcc, "-ptx", f"-arch=sm_{arch}", *source.NVRTC_OPTIONS, unit, "-o", ptx],
                       capture_output=True, text=True, check=True)  # fmt: skip
        log = subprocess.run([ptxas, f"-arch=sm_{arch}", "-v", ptx, "-o", cubin],
                             capture_output=True, text=True, check=True).stderr  # fmt: skip
        sass = subprocess.run([_cuobjdump(), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    # one disassembly, split per function
    parts = re.split(r"^\s*Function : (\w+)\s*$", sass, flags=re.M)
    bodies = dict(zip(parts[1::2], parts[2::2], strict=True))
    out = {}
    # ptxas -v: "Compiling entry function 'name'" then its spill and register lines
    for m in re.finditer(r"entry function '(\w+)'(.*?)(?=entry function|\Z)", log, re.S):
        name, info = m.groups()
        regs = re.search(r"Used (\d+) registers", info)
        spills = re.search(r"(\d+) bytes spill stores", info)
        out[name] = {
            "regs": int(regs.group(1)) if regs else -1,
            "spill_bytes": int(spills.group(1)) if spills else 0,
            "sass": _sass_labelled(bodies[name]),
        }
    return out


def cuda_rows(arch: int, compiled: dict[str, dict]) -> list[dict]:
    """One row per kernel of :func:`compile_cuda`'s result: registers, spills and the SASS
    instructions per element of its per-element segment (the loop over samples of the
    sampling kernels, else the whole thread: a thread handles 4 elements, one Philox call,
    per execution)."""
    rows = []
    for name, c in sorted(compiled.items()):
        segs = segments_sass(c["sass"], 1)
        seg = "loop1" if "loop1" in segs else "outer"
        cnt = segs.get(seg, dict.fromkeys(CLASSES, 0) | {"total": 0})
        row = {"arch": f"sm_{arch}", "kernel": name, "regs": c["regs"],
               "spill_bytes": c["spill_bytes"], "segment": seg}  # fmt: skip
        row.update({f"{k}_per_elem": cnt[k] / 4 for k in [*CLASSES, "total"]})
        row["integer_per_elem"] = sum(cnt[k] for k in INTEGER) / 4
        rows.append(row)
    return rows


def cuda_counts(archs: list[int], log=print) -> list[dict]:
    """:func:`cuda_rows` for each of ``archs``."""
    rows = []
    for arch in archs:
        for row in cuda_rows(arch, compile_cuda(arch)):
            rows.append(row)
            log(f"{row['arch']} {row['kernel']}: regs {row['regs']} spills {row['spill_bytes']} B, "
                f"{row['total_per_elem']:.1f} instructions per element")  # fmt: skip
    return rows


def cuda_sampling_prediction(row: dict, hw: Hardware, dtype: str) -> dict:
    """PREDICTED throughput of a sampling kernel from its SASS per element and its bytes
    per element: the slowest SIMT pipe (issue included) against HBM."""
    n = 1e9  # elements
    counts = {k: float(row[f"{k}_per_elem"]) * n / 32 for k in CLASSES}  # warp instructions
    t = pipe_time(counts, 0.0, hw)
    bytes_per = CUDA_OUT_BYTES[dtype] + 8 / CUDA_SAMPLE_SPT
    t["hbm"] = n * bytes_per / (hw.hbm_tbs * 1e12 * HBM_EFF)
    bound = max(t, key=t.get)
    return {
        "device": hw.name, "kernel": row["kernel"], "bytes_per_elem": bytes_per,
        "instr_per_elem": float(row["total_per_elem"]), "bound": bound,
        "gelem_per_s": n / t[bound] / 1e9, "gb_per_s": n * bytes_per / t[bound] / 1e9,
        "hbm_peak_gb_per_s": hw.hbm_tbs * 1e3,
        "fraction_of_hbm_peak": n * bytes_per / t[bound] / (hw.hbm_tbs * 1e12),
    }  # fmt: skip


def cuda_report(rows: list[dict]) -> str:
    """``cuda_kernels.md``: the counts per kernel and arch, and the predicted GB/s."""
    from spar.ops.backends.cuda.source import NVRTC_OPTIONS

    cols = [("arch", "arch", ""), ("kernel", "kernel", ""), ("regs", "regs", ""),
            ("spill B", "spill_bytes", ""), ("segment", "segment", ""),
            ("SASS / elem", "total_per_elem", ".2f"), ("int", "integer_per_elem", ".2f"),
            ("fp32", "fp32_per_elem", ".2f"), ("mufu", "mufu_per_elem", ".2f"),
            ("gmem ld", "gmem_ld_per_elem", ".2f"), ("gmem st", "gmem_st_per_elem", ".2f"),
            ("local", "local_per_elem", ".2f")]  # fmt: skip
    by = {(r["arch"], r["kernel"]): r for r in rows}
    preds = [
        cuda_sampling_prediction(by[("sm_90", f"spar_sample_{dt}")], HARDWARE[hw], dt)
        for hw in ("H200-SXM", "H100-SXM") for dt in ("f32", "bf16")
        if ("sm_90", f"spar_sample_{dt}") in by
    ]  # fmt: skip
    pcols = [("device", "device", ""), ("kernel", "kernel", ""),
             ("B / elem", "bytes_per_elem", ".2f"), ("SASS / elem", "instr_per_elem", ".1f"),
             ("bound", "bound", ""),
             ("G elem/s", "gelem_per_s", ".0f"), ("GB/s", "gb_per_s", ".0f"),
             ("HBM peak GB/s", "hbm_peak_gb_per_s", ".0f"),
             ("of peak", "fraction_of_hbm_peak", ".2f")]  # fmt: skip
    return "\n".join(
        [
            "# The cuda backend's kernels: registers, instructions, predicted throughput",
            "",
            "Written by `python bench/cost_model.py --cuda` (no GPU needed). Each kernel of",
            "`csrc/spar_cuda.cu` is compiled as users get it (the one translation unit of",
            f"`spar.ops.backends.cuda.source.assemble()`, options `{' '.join(NVRTC_OPTIONS)}`)",
            "to PTX by nvcc, then by ptxas `-v` (registers, spills) for sm_90 and sm_80; the SASS",
            "is counted per element (a thread handles a group of 4 elements per execution of",
            "the segment: the loop over samples of the sampling kernels, the whole thread",
            "otherwise). Static counts of one execution: the slow paths of IEEE division and",
            "square root are subroutines outside the loop (not counted); the whole-thread",
            "segments include both the 32-bit and the rarely taken 64-bit index division, so",
            "they overstate what a thread runs.",
            "",
            _md_table(rows, cols),
            "",
            "## PREDICTED throughput of the sampling kernel (not measured)",
            "",
            "Bytes per element: the element written plus mu and sigma (8 B) read once per",
            f"{CUDA_SAMPLE_SPT} samples. Time: the slowest of the SIMT pipes (warp instructions",
            f"per class at the rates of `HARDWARE`, {ISSUE_PER_SM} issues per clock per SM) and",
            f"HBM at {HBM_EFF:.0%} of peak; perfect overlap, so a lower bound on time. A GPU run",
            "(`bench/gpu_check.sh`, step `cuda`) measures it against the device's copy bandwidth.",
            "",
            _md_table(preds, pcols),
            "",
        ]
    )


# =======================================================================================
# main
# =======================================================================================


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    p.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[16, 128],
        help="rows per sample whose linear block sizes are compiled",
    )
    p.add_argument("--only", nargs="*", help="variant names to count")
    p.add_argument("--print", action="store_true", help="print the rows as JSON, write nothing")
    p.add_argument(
        "--generic",
        action="store_true",
        help="compile with generic integer arguments (no unit-stride/alignment "
        "specialisation), as tests/ops/test_triton_compile.py does",
    )
    p.add_argument("--model-only", action="store_true", help="model the saved counts")
    p.add_argument("--cuda", action="store_true",
                   help="count the cuda backend's kernels (csrc/spar_cuda.cu) instead: writes "
                   "bench/results/cuda_kernels.{csv,md}")  # fmt: skip
    args = p.parse_args(argv)
    if args.cuda:
        why = tools_available(args.arch[0])
        if why:
            print(f"cannot count: {why}", file=sys.stderr)
            return 2
        rows = cuda_counts(args.arch, log=lambda s: print(s, file=sys.stderr))
        if args.print:
            print(json.dumps(rows))
            return 0
        _write_csv(CUDA_CSV, rows)
        CUDA_MD.write_text(cuda_report(rows))
        return 0
    if not args.model_only:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            return subprocess.call([sys.executable, __file__, *(argv or sys.argv[1:])], env=env)
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        why = tools_available(args.arch[0])
        if why:
            print(f"cannot count: {why}", file=sys.stderr)
            return 2
        vs = [
            v
            for v in variants(tuple(args.rows)) + probe_variants()
            if not args.only or v.name in args.only
        ]
        rows = count_all(
            vs, args.arch, log=lambda s: print(s, file=sys.stderr), specialise=not args.generic
        )
        if args.print:
            print(json.dumps(rows))
            return 0
        _write_csv(KERNELS_CSV, rows)
    write_report(_read_csv(KERNELS_CSV))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main())
