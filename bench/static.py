"""Static cost report: what every kernel costs on sm_80 and sm_90, measured without a GPU.

``python -m bench.static`` compiles each Triton kernel (Triton IR -> PTX -> cubin with the ptxas bundled in
triton) for sm_80 and sm_90 (sm_90a) at the tile sizes and launch options its launcher picks on a GPU, with
the alignment a GPU launch specialises on (16-byte aligned pointers, strides divisible by 16; see
:func:`alignment`), and the CUDA kernels of ``csrc/`` with nvcc (when nvcc is on PATH), then reads the
machine code. Per kernel:

* registers, spill store/load bytes and warnings from ``ptxas -v`` (its ``warning`` lines and its "Potential
  Performance Loss" lines, e.g. wgmma serialised, which ptxas 13.x prints as ``info``);
* shared memory per CTA (Triton: the compiled kernel's; CUDA: static plus the dynamic size its launch asks
  for, found by running the launch functions against CUDA runtime stand-ins, ``csrc_probe/``);
* counts over the whole SASS (``cuobjdump -sass``) and over each *main loop*: tensor-core instructions by
  opcode (``HMMA.16816.F32.BF16``, ``HGMMA.64x64x16.F32.BF16``; TF32 ones also counted apart), their
  multiply-adds per CTA, ``MUFU.EX2``, global loads (``LDG``, ``LDGSTS``, ``UTMALDG``) and their bytes per
  thread, global stores, atomics, local (spill) and shared memory accesses.

A loop is an address range closed by a backward branch; the main loops of a kernel are the loops holding
tensor-core instructions that hold no smaller such loop, in address order (the forward has two: key tiles
without and with the causal mask). Their counts are static counts of one pass through the body, i.e. per
main-loop iteration, per thread (HMMA per warp, HGMMA per warpgroup). Code after the function's last
``EXIT`` (TMA's mbarrier retry stubs) closes no loop, and ``@!PT`` instructions (never executed) are not
counted. Each main loop also gets warp-instructions per MFLOP of its tile (tensor-core and total) and a
cycle estimate per iteration for an H100 (sm_90) or A100 (sm_80), max(issue, tensor-core) cycles
(:func:`loop_costs`; an estimate from data-sheet rates, not a timing); :data:`LOOP_TARGETS` are the
targets tests/test_static_cost.py holds the attention kernels to.

Outputs ``bench/results/static-<date>.json`` and the "Static cost report" section of BENCHMARKS.md
(rendered by ``bench.report`` from the newest static file, next to the timed results). Options:
``--subset test`` (the CPU test's subset), ``--markdown`` (print the section, write nothing),
``--json PATH`` (write the results there, leave bench/results and BENCHMARKS.md alone), ``--no-csrc``,
``--workers N`` (default 2), ``--no-cache``. The tools' raw outputs (ptxas log, SASS, resource usage) are
cached in ``$EXCITOR_STATIC_CACHE`` (default ``~/.cache/excitor-kernels/static``) under a hash of the
kernel's source, its configuration and the tool versions, so a re-run only compiles what changed and a
change to the analysis here needs no recompile.
Run it without ``TRITON_INTERPRET=1`` (with it, ``triton.jit`` gives interpreted functions).

Adding or changing a kernel
---------------------------
* Jobs come from :func:`triton_jobs`, the one generator of (kernel, dtype, constexprs, launch options): the
  tiles are the launchers' own configuration functions (``_triton_attention.blocks``,
  ``_triton_prompt_keys.prompt_blocks``, ``_triton_decode.decode_blocks``). A new kernel is one
  ``found.append((layout, job(kernel, config, flags)))`` line there, next to the launch it belongs to. ``job`` passes a kernel only the constexprs it declares (extra keys in
  ``flags`` or ``config`` are ignored, a missing one is an error naming it), and splits ``num_warps``,
  ``num_stages`` (and any other :data:`LAUNCH_OPTIONS`) off as launch options.
* Argument types come from argument names through :data:`ARG_TYPES` (first matching rule wins; ``{dtype}``
  is the inputs' dtype). A name no rule matches is an error, so a new argument is one line there, e.g.
  ``KE`` (reconstructed keys, input dtype) falls under the capitalised-name rule, ``DKE`` under the float32
  pointer rule. Where a launch passes another type than the rule's (the Excitor's float32 ``DK`` sum), the
  job says so: ``job(..., types={"DK": "*fp32"})``.
* A new csrc kernel is found by itself (every ``__global__`` function of ``csrc/*.cu``).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import gzip
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
CSRC = ROOT / "csrc"
PROBE = Path(__file__).resolve().parent / "csrc_probe"  # CUDA runtime stand-ins: the csrc launches' shared memory
CACHE_DIR = Path(os.environ.get("EXCITOR_STATIC_CACHE", Path.home() / ".cache" / "excitor-kernels" / "static"))

TARGETS = (80, 90)  # compute capabilities; 90 compiles for sm_90a as triton does
# The triton the launchers' GPU tiles were chosen with and the committed figures measured with: an older one
# (setup.py's floor) compiles the same kernels with other register allocations, e.g. triton 3.8 spills 8 bytes in
# the sm_80 Adapter forward at d = 128; the tests hold it to compiling, not to these figures.
TUNED_TRITON = (3, 9)


def triton_older_than_tuned() -> bool:
    """Whether the installed triton is older than :data:`TUNED_TRITON` (False without triton)."""
    try:
        from importlib.metadata import version

        return tuple(int(x) for x in version("triton").split(".")[:2]) < TUNED_TRITON
    except Exception:  # noqa: BLE001 - not installed, or a version string of another form
        return False
DTYPES = ("fp16", "bf16", "fp32")
HEAD_DIMS = (64, 128)
OPERATORS = {"plain": 0, "excitor": 1, "adapter": 2}  # BYPASS; plain attention is the baseline
LAYOUTS = ("padded", "varlen")
SEQ = 4096  # M = N given to the configuration functions (on a GPU the tiles do not depend on it)
PROMPTS = 30  # P: the Excitor paper's prompt count (BLOCK_P = 32)
MAX_PROMPTS = 64  # the most prompts the launchers' tiles are checked for (the Adapter's forward, "prompts64")
DECODE_GROUPS, DECODE_QUERIES = 4, 1  # decode: GQA 4:1, one new token (R = 4 query rows per kv head)
# largest dynamic shared memory of one block (cudaDevAttrMaxSharedMemoryPerBlockOptin)
SHARED_LIMIT = {80: 166912, 90: 232448}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")

# argument name -> triton signature type; first full match wins
ARG_TYPES = (
    (r"stride_\w+|Hq|Hkv|M|N|P|GROUPS|NUM_SPLITS|member|ACC_HEAD_DIV", "i32"),
    (r"\w*scale\w*", "fp32"),
    (r"GATE|LSE|DELTA|DPK|DPV|DGATE\w*|DKE|WS_\w+", "*fp32"),
    (r"CU_\w+|SEQLENS", "*i32"),
    (r"AT|AT_LO", "*{pairs}"),  # the centred prompt weights: float16 pairs for half inputs (prompt_keys_forward)
    (r"[A-Z][A-Z0-9_]*", "*{dtype}"),  # tensors in the inputs' dtype: Q, K, V, S, PK, KE, O, DQ, ...
)
# integers a GPU launch finds divisible by 16: strides (0 or multiples of d = 64, 128) and M = N = SEQ
ALIGNED_INTS = r"stride_\w+|M|N"

# SASS opcode families
TENSOR_CORE = re.compile(r"(HMMA|HGMMA|IMMA|IGMMA|DMMA|QGMMA|UTC\w*MMA)\b")
GLOBAL_LOADS = {"LDG": "ldg", "LDGSTS": "ldgsts", "UTMALDG": "tma_load"}
GLOBAL_STORES = {"STG": "stg", "UTMASTG": "tma_store"}
ATOMICS = ("RED", "ATOM", "ATOMG", "REDG", "UTMAREDG")
COUNTED = {"MUFU.EX2": "exp2", "LDL": "local_loads", "STL": "local_stores", "LDS": "shared_loads",
           "LDSM": "shared_loads", "STS": "shared_stores"}


# ---------------------------------------------------------------- jobs

def _tool_dir() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def arg_type(name: str, dtype: str) -> str:
    for pattern, kind in ARG_TYPES:
        if re.fullmatch(pattern, name):
            return kind.format(dtype=dtype, pairs="fp32" if dtype == "fp32" else "fp16")
    raise ValueError(f"bench.static: no rule in ARG_TYPES gives argument {name!r} a type; add one")


def signature(kernel, dtype: str, constexprs: dict, types: dict | None = None) -> dict:
    """Triton signature: constexprs, then the job's own ``types`` (an argument whose type depends on the
    launch, e.g. a float32 buffer in place of an input-dtype one), then :data:`ARG_TYPES`."""
    types = types or {}
    return {name: "constexpr" if name in constexprs else types[name].format(dtype=dtype) if name in types
            else arg_type(name, dtype) for name in kernel.arg_names}


def alignment(kernel, sig: dict) -> dict:
    """The divisibility a GPU launch at the report's shapes gives triton (it specialises 16-byte aligned
    pointers and integers divisible by 16): every pointer, and the integers :data:`ALIGNED_INTS` names."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
            if sig[name].startswith("*") or (sig[name] == "i32" and re.fullmatch(ALIGNED_INTS, name))}


def job(kernel, config: dict, flags: dict, types: dict | None = None, **extra) -> dict:
    """One compile job: the kernel's constexprs picked from ``flags``, ``config`` (the launcher's tiles) and
    ``extra``; launch options split off ``config``; ``types`` overrides :data:`ARG_TYPES` for this launch.
    The result is completed by :func:`triton_jobs`."""
    merged = {**flags, **config, **extra}
    names = [p.name for p in kernel.params if p.is_constexpr]
    missing = [n for n in names if merged.get(n) is None]
    if missing:
        raise ValueError(f"bench.static: {kernel.__name__} needs constexpr(s) {missing}; give them in triton_jobs")
    return dict(kernel=kernel, constexprs={n: merged[n] for n in names if n in merged}, types=types or {},
                options={k: merged[k] for k in LAUNCH_OPTIONS if k in merged})


def in_test_subset(config: dict) -> bool:
    """What tests/test_static_cost.py checks in a few minutes: bf16, d = 128 (the largest tiles) on both
    targets, padded layout (and the GQA dk/dv launch, the Adapter's forward with 64 prompts, the forwards with the
    row sum on the tensor cores, the decode and sdpa backends' kernels): every kernel and operator at its GPU
    configuration; plus the Excitor's and the Adapter's float32 kernels at d = 128 but decode's (their own tiles:
    spills, and shared memory against sm_80's lower limit)."""
    sdpa = ("sdpa", "sdpa_concat", "sdpa_concat_bwd")
    if config["dtype"] == "fp32":
        return config["d"] == 128 and config["op"] in ("excitor", "adapter") and config["layout"] in ("padded",) + sdpa
    return config["dtype"] == "bf16" and config["d"] == 128 and config["layout"] in (
        "padded", "gqa", "decode", "prompts64", "tc_row_sum", "prompts64_tc_row_sum") + sdpa


def shape_flags(d: int, dtype: str) -> dict:
    """The constexprs every attention kernel takes from the head dim, the prompt count and the dtype."""
    from excitor_kernels.ops._triton_common import pow2

    from excitor_kernels.ops._triton_attention import q_chunk

    return dict(HEAD_DIM=d, BLOCK_D=pow2(d), BLOCK_P=pow2(PROMPTS), PREC="ieee" if dtype == "fp32" else "tf32",
                Q_CHUNK=q_chunk(4 if dtype == "fp32" else 2))


def triton_jobs(subset: str = "full"):
    """Every Triton kernel at the configuration its launcher uses on a GPU, as dicts with ``key`` (unique),
    ``kernel``, ``cc``, ``dtype``, ``constexprs``, ``types``, ``options`` and ``config`` (what the report
    shows). ``subset="test"`` keeps those :func:`in_test_subset` accepts."""
    from excitor_kernels.ops import _sdpa as sdpa
    from excitor_kernels.ops import _triton_attention as tri
    from excitor_kernels.ops import _triton_decode as dec
    from excitor_kernels.ops import _triton_prompt_keys as pkeys
    from excitor_kernels.ops._triton_common import pow2

    for cc, dtype, d in itertools.product(TARGETS, DTYPES, HEAD_DIMS):
        itemsize = 4 if dtype == "fp32" else 2
        prompt = pkeys.prompt_blocks(True, SEQ, itemsize)
        shape = shape_flags(d, dtype)
        for op, bypass in OPERATORS.items():
            excitor = bypass == tri.EXCITOR
            # the Excitor with sim_keys given (the paper's low-rank similarity), so ds is its own output
            common = dict(shape, CAUSAL=True, BYPASS=bypass, SIM_IS_K=not excitor, POS_SCALE=True)
            found = []
            for layout in LAYOUTS:
                fwd, dkdv, dq = tri.blocks(True, SEQ, SEQ, d, itemsize, bypass=bypass, arch=cc,
                                           varlen=layout == "varlen", prompts=PROMPTS)
                flags = dict(common, VARLEN=layout == "varlen")
                if excitor:
                    found.append((layout, job(pkeys.prompt_keys_fwd_kernel, prompt, flags)))
                found.append((layout, job(tri.attention_fwd_kernel, fwd, flags)))
                if bypass == tri.ADAPTER and layout == "padded" and dtype != "fp32":
                    # the most prompts blocks() provides for: the Adapter's prompt tile after the key loop
                    wide = tri.blocks(True, SEQ, SEQ, d, itemsize, bypass=bypass, arch=cc, prompts=MAX_PROMPTS)[0]
                    found.append(("prompts64", job(tri.attention_fwd_kernel, wide, flags,
                                                   BLOCK_P=pow2(MAX_PROMPTS))))
                    # and with the row sum on the tensor cores (a tuning candidate, not the fixed one)
                    found.append(("prompts64_tc_row_sum", job(tri.attention_fwd_kernel, wide, flags, TC_ROW_SUM=True,
                                                              BLOCK_P=pow2(MAX_PROMPTS))))
                if op == "plain" and layout == "padded" and dtype != "fp32":
                    # the forward's row sum on the tensor cores (docs/design.md, "The softmax's row sum")
                    found.append(("tc_row_sum", job(tri.attention_fwd_kernel, fwd, flags, TC_ROW_SUM=True)))
                # launched with its own BLOCK_M (at most the dq tiles') and launch options
                found.append((layout, job(tri.attention_bwd_preprocess_kernel, tri.PREPROCESS_LAUNCH, flags,
                                          BLOCK_M=min(tri.PREPROCESS_BLOCK_M, dq["BLOCK_M"]))))
                # MHA: one launch (a group's later members ACCUMULATE into float32 dk, dv under GQA); the
                # Excitor's dk is a float32 sum finished by the post-pass; elsewhere DKE is dk, unused
                found.append((layout, job(tri.attention_bwd_dkdv_kernel, dkdv, flags, ACCUMULATE=False,
                                          types={"DK": "*fp32"} if excitor else {"DKE": "*{dtype}"})))
                if layout == "padded":  # GQA: the later members' launches add into float32 dk, dv
                    found.append(("gqa", job(tri.attention_bwd_dkdv_kernel, dkdv, flags, ACCUMULATE=True,
                                             types={"DK": "*fp32", "DV": "*fp32", "DKE": "*fp32"})))
                # the Excitor's dq reads k, its k' and the centred weights and makes the gate gradient;
                # excitor_gate_grad_kernel makes it alone for the sdpa and CUDA backends (padded batches)
                found.append((layout, job(tri.attention_bwd_dq_kernel, dq, flags)))
                if excitor and layout == "padded":
                    found.append((layout, job(tri.excitor_gate_grad_kernel, tri.GATE_BLOCKS[itemsize], flags)))
                if excitor:
                    found.append((layout, job(pkeys.prompt_keys_bwd_kernel, prompt, flags, ADD_DS=flags["SIM_IS_K"],
                                              types={"DK": "*fp32"} if flags["SIM_IS_K"] else {})))
            block_n, block_r, launch = dec.decode_blocks(True, DECODE_GROUPS * DECODE_QUERIES, SEQ, d, itemsize)
            flags = dict(common, HAS_SEQLENS=True, HAS_LEFTPAD=False, BLOCK_N=block_n, BLOCK_R=block_r)
            found.append(("decode", job(dec.decode_split_kernel, launch, flags)))
            found.append(("decode", job(dec.decode_combine_kernel, launch, flags)))
            # the sdpa backends' own kernels around SDPA's attention (padded batches)
            block, launch = sdpa._rows_block(True, SEQ, itemsize)
            rows = dict(launch, BLOCK_M=block, BLOCK_N=block)
            if excitor:
                for layout, concat in (("sdpa", False), ("sdpa_concat", True)):
                    found.append((layout, job(sdpa.excitor_keys_fwd_kernel, rows, common, CONCAT=concat)))
                    found.append((layout, job(sdpa.excitor_keys_bwd_kernel, rows, common, CONCAT=concat)))
                found.append(("sdpa_concat", job(sdpa.gated_queries_kernel, rows, common, BACKWARD=False)))
                found.append(("sdpa_concat_bwd", job(sdpa.gated_queries_kernel, rows, common, BACKWARD=True)))
            elif bypass == tri.ADAPTER:
                found.append(("sdpa", job(sdpa.adapter_prompts_fwd_kernel, rows, common)))
                found.append(("sdpa", job(sdpa.adapter_prompts_bwd_kernel, rows, common)))
            for layout, j in found:
                name = j["kernel"].__name__
                j.update(cc=cc, dtype=dtype,
                         key=f"triton/sm{cc}/{dtype}/d{d}/{name}/{op}/{layout}",
                         config=dict(backend="triton", target=_arch(cc), cc=cc, dtype=dtype, d=d, kernel=name,
                                     op=op, layout=layout, **j["options"],
                                     prompts=MAX_PROMPTS if layout.startswith("prompts64") else PROMPTS,
                                     constexprs={k: v for k, v in j["constexprs"].items() if k != "PREC"}))
                if subset == "full" or in_test_subset(j["config"]):
                    yield j


def _arch(cc: int) -> str:
    return f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"


# ---------------------------------------------------------------- machine code analysis

_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_HEX = re.compile(r"0x([0-9a-f]+)")


def parse_sass(text: str) -> dict:
    """``cuobjdump -sass`` output -> {function name: [(address, opcode, operands, guard)]}; ``guard`` is the
    predicate (``@P0``, ``@!UP1``) or "". Instructions guarded by ``@!PT`` (never executed: ptxas's padding,
    e.g. ``@!PT LDS RZ, [RZ]`` on sm_90) are left out."""
    functions, current = {}, None
    for line in text.splitlines():
        if m := re.match(r"\s+Function : (\S+)", line):
            current = functions.setdefault(m.group(1), [])
        elif current is not None and (m := _SASS_LINE.match(line)):
            guard = (m.group(2) or "").strip()
            if guard != "@!PT":
                current.append((int(m.group(1), 16), m.group(3), m.group(4).strip(), guard))
    return functions


def _tc_macs(opcode: str, num_warps: int) -> int:
    """Multiply-adds one tensor-core instruction does for the whole CTA (HMMA: each warp issues it,
    shape m16 n8 kK; HGMMA: each warpgroup, shape MxNxK)."""
    if m := re.search(r"(\d+)x(\d+)x(\d+)", opcode):
        return int(m.group(1)) * int(m.group(2)) * int(m.group(3)) * max(1, num_warps // 4)
    if m := re.match(r"[A-Z]MMA\.168(\d+)", opcode):
        return 16 * 8 * int(m.group(1)) * num_warps
    return 0


def _width(opcode: str) -> int:
    """Bytes one thread moves with a load/store opcode (.128 -> 16; .U16 -> 2; default 4)."""
    for suffix, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in opcode:
            return size
    return 4


def count(instructions: list, num_warps: int) -> dict:
    """Instruction counts of one region (whole kernel or loop body), per thread."""
    c = dict(instructions=len(instructions), tc={}, tc_total=0, tf32=0, tc_macs=0, exp2=0, ldg=0, ldgsts=0,
             tma_load=0, global_loads=0, global_load_bytes=0, stg=0, tma_store=0, global_stores=0, atomics=0,
             local_loads=0, local_stores=0, shared_loads=0, shared_stores=0)
    for _, opcode, *_ in instructions:
        base = opcode.split(".")[0]
        if TENSOR_CORE.match(opcode):
            c["tc"][opcode] = c["tc"].get(opcode, 0) + 1
            c["tc_total"] += 1
            c["tf32"] += "TF32" in opcode
            c["tc_macs"] += _tc_macs(opcode, num_warps)
        elif base in GLOBAL_LOADS:
            c[GLOBAL_LOADS[base]] += 1
            c["global_loads"] += 1
            c["global_load_bytes"] += 0 if base == "UTMALDG" else _width(opcode)
        elif base in GLOBAL_STORES:
            c[GLOBAL_STORES[base]] += 1
            c["global_stores"] += 1
        elif base in ATOMICS:
            c["atomics"] += 1
        elif opcode in COUNTED or base in COUNTED:
            c[COUNTED.get(opcode) or COUNTED[base]] += 1
    return c


def main_loops(instructions: list) -> list[tuple[int, int]]:
    """(first, last) address of each main loop: the ranges closed by backward branches (a loop with several
    back edges ends at its last) that hold tensor-core instructions and no smaller such range. Code after the
    function's last unconditional ``EXIT`` is out-of-line stubs (TMA code's mbarrier retry: ``TRYWAIT``, branch
    to itself, branch back into the body), never a loop end: their branches back are left out."""
    exits = [addr for addr, opcode, _, guard in instructions if opcode == "EXIT" and not guard]
    end = max(exits) if exits else float("inf")
    heads = {}
    for addr, opcode, operands, _ in instructions:
        if opcode.split(".")[0] in ("BRA", "JMP") and addr < end and (targets := _HEX.findall(operands)):
            target = int(targets[-1], 16)
            if target < addr:  # the end-of-function `BRA self` is no loop
                heads[target] = max(heads.get(target, 0), addr)
    tc_addrs = [a for a, op, *_ in instructions if TENSOR_CORE.match(op)]
    loops = [(lo, hi) for lo, hi in heads.items() if any(lo <= a <= hi for a in tc_addrs)]
    inner = [(lo, hi) for lo, hi in loops
             if not any((lo2, hi2) != (lo, hi) and lo <= lo2 and hi2 <= hi for lo2, hi2 in loops)]
    return sorted(inner)


def analyse_sass(instructions: list, num_warps: int) -> dict:
    loops = []
    for lo, hi in main_loops(instructions):
        body = [i for i in instructions if lo <= i[0] <= hi]
        loops.append(dict(first=hex(lo), last=hex(hi), **count(body, num_warps)))
    return dict(kernel=count(instructions, num_warps), main_loops=loops)


# ---------------------------------------------------------------- per-FLOP figures and the cycle estimate

# Products per main-loop iteration of the attention kernels' tile (BLOCK_M x BLOCK_N x HEAD_DIM each): the
# work plain attention needs; an operator's extra products (the Excitor's bypass scores in dq) are overhead.
TILE_PRODUCTS = {"attention_fwd_kernel": 2, "attention_bwd_dkdv_kernel": 4, "attention_bwd_dq_kernel": 3}
# Loops of a causal attention kernel in address order (source order): masked (diagonal) or not.
LOOP_MASKS = {"attention_fwd_kernel": (False, True), "attention_bwd_dq_kernel": (False, True),
              "attention_bwd_dkdv_kernel": (True, False)}
# The cycle estimate's machine (an estimate from data-sheet rates, not a measurement): warp-instructions an SM
# issues per cycle (4 schedulers, one each) and dense half-precision tensor-core FLOPs per SM per cycle
# (H100 SXM: 989 TFLOP/s / (132 SMs x 1.83 GHz); A100: 312 TFLOP/s / (108 SMs x 1.41 GHz)). HMMA (mma.sync)
# on an H100 is counted at the wgmma rate, which flatters it.
MACHINES = {90: dict(name="H100", issue_per_cycle=4, tc_flops_per_cycle=4096),
            80: dict(name="A100", issue_per_cycle=4, tc_flops_per_cycle=2048)}


# Targets of the Triton attention kernels' main loops in half precision (issue 24), warp-instructions per MFLOP
# (see loop_costs): (cc, kernel) -> (unmasked loop, masked loop) limits, None where no limit applies; RATIO: an
# operator's loop at most this many times plain attention's (same target, dtype, d, layout, loop). Figures
# proven out of reach with triton 3.9 are in KNOWN_MISSES, with the measured best as the limit held instead.
LOOP_TARGETS = {
    (90, "attention_fwd_kernel"): (600, 800),
    (90, "attention_bwd_dkdv_kernel"): (760, None),
    (90, "attention_bwd_dq_kernel"): (614, None),
    (80, "attention_fwd_kernel"): (1100, None),
}
RATIO = {(90, "attention_fwd_kernel"): 1.1, (90, "attention_bwd_dkdv_kernel"): 1.15,
         (90, "attention_bwd_dq_kernel"): 1.15}
_SOFTMAX_FLOOR = ("with the row sum in float32 (FlashAttention's), a score costs at least 4.5 warp-instructions of "
                  "softmax whatever the tile (FFMA scale and shift, MUFU.EX2, FMNMX row max, FADD row sum, half an "
                  "F2FP pack) against 4 d FLOPs")
_TC_ROW_SUM = ("the one change found that goes under the target takes the row sum (its FADD per score) on the tensor "
               "cores, as the product of the rounded weights with a column of ones (TC_ROW_SUM, a tuning candidate; "
               "docs/design.md, 'The softmax's row sum'; the report's tc_row_sum rows), and adds tensor-core "
               "products to a loop that the estimate puts tensor-bound")
# (cc, kernel, d, op, layout), "*" for any -> ((unmasked, masked, ratio) limits held instead, None: the target's;
# why the target is out of reach)
KNOWN_MISSES = {
    (90, "attention_fwd_kernel", 64, "*", "*"): (
        (885, 1205, None), f"d = 64: {_SOFTMAX_FLOOR}, and the rescale of the 128 x 64 accumulator is one FMUL per "
        "element and key tile: at least (64 x 4.5 + 32) x 8 warps / 4.19 MFLOP = 611 per MFLOP at 128 x 128, over "
        "600 before any address or wgmma set-up, and the masked loop's comparison and select per score make its floor "
        "(64 x 6.5 + 32) x 8 / 4.19 = 855, over 800; 128 x 256 (fewer set-ups per score) spills. Measured 879 (the "
        f"row sum's shuffles already deferred past the loop). Without the FADD, {_TC_ROW_SUM}: 807, with eight "
        "64 x 8 wgmma per warpgroup and tile beside 939 issue and 1024 tensor cycles per iteration"),
    (90, "attention_bwd_dq_kernel", 64, "excitor", "*"): (
        (1460, 1670, 2.7), "d = 64: as at d = 128 (below), with twice the floor per FLOP (5 / (32 x 6 x 64) "
        "warp-instructions per FLOP: 407 per MFLOP over plain attention's 548) and 128 x 64 tiles (128 x 128 "
        "spills): 1457"),
    (90, "attention_bwd_dq_kernel", "*", "excitor", "*"): (
        (775, 885, 2.0), "the gate gradient's float32 sums: the Excitor's dq loop also makes the gate gradient from "
        "float32-grade terms (issue 25, docs/design.md), the scores' bypass part from three products of P columns "
        "and four float32 row sums, at least 5 float32 operations per score beyond plain attention's, "
        "5 / (32 x 6 d) warp-instructions per FLOP: 203 per MFLOP at d = 128 over plain's 390, a ratio of at least "
        "1.52 against the 1.15 asked; measured 772 against that floor of 593 (614 asked): triton reduces each sum "
        "as a tree, a multiply and an add per product where a chain of multiply-adds would do, and two of the four "
        "sums (c, e) still shuffle across the row's 4 threads per key tile (as deferred parts, like r and l, they "
        "spill at d = 128)"),
}


def plain_layout(layout: str) -> str:
    """The layout of the plain-attention record an operator's loops are compared with (the Adapter's forward with
    64 prompts: padded; with the row sum on the tensor cores too: plain's tc_row_sum)."""
    return {"prompts64": "padded", "prompts64_tc_row_sum": "tc_row_sum"}.get(layout, layout)


def loop_limits(config: dict) -> tuple | None:
    """(unmasked, masked, ratio) limits of a Triton attention kernel's half-precision main loops (None: no
    target) and the reason where a target is out of reach (KNOWN_MISSES), or None."""
    kernel, cc = config.get("kernel"), config.get("cc")
    if (cc, kernel) not in LOOP_TARGETS or config.get("dtype") not in ("fp16", "bf16"):
        return None
    limits, why = LOOP_TARGETS[(cc, kernel)] + (RATIO.get((cc, kernel)),), None
    facts = (cc, kernel, config.get("d"), config.get("op"), config.get("layout"))
    for key, (held, reason) in KNOWN_MISSES.items():
        if all(k == "*" or k == f for k, f in zip(key, facts)):
            limits, why = tuple(h if h is not None else t for h, t in zip(held, limits)), reason
            break
    return limits + (why,)


def tile_flops(config: dict) -> int | None:
    """FLOPs of one main-loop iteration of an attention kernel's tile (what plain attention needs), else None."""
    products, cx = TILE_PRODUCTS.get(config.get("kernel")), config.get("constexprs", {})
    if products is None or not {"BLOCK_M", "BLOCK_N", "HEAD_DIM"} <= set(cx):
        return None
    return 2 * products * cx["BLOCK_M"] * cx["BLOCK_N"] * cx["HEAD_DIM"]


def loop_costs(record: dict) -> None:
    """Adds to each main loop of ``record``: ``masked`` (attention kernels: the causal diagonal's loop, None
    where unknown), ``flops`` (the tile's FLOPs for attention kernels, else the tensor-core work 2 x MACs;
    ``flops_basis`` says which), warp-instructions per MFLOP, total (``warp_instr_per_mflop``) and tensor-core
    (``tc_warp_instr_per_mflop``): per-thread counts x warps (HGMMA too: every warp issues it) / MFLOP; and
    ``estimate``: cycles per iteration on the target's machine (:data:`MACHINES`), issue = warp-instructions /
    issue rate, tensor = tensor-core FLOPs actually run (2 x MACs, duplicated or extra products included) /
    tensor rate, cycles = max of the two (perfect overlap, one CTA per SM: a lower bound, not a timing)."""
    config, loops = record["config"], record["main_loops"]
    warps = config.get("num_warps") or 4
    flops = tile_flops(config)
    masks = LOOP_MASKS.get(config.get("kernel"), ()) if config.get("backend") == "triton" else ()
    cx = config.get("constexprs", {})
    if cx.get("WARP_SPEC") or not cx.get("CAUSAL", True):
        masks = (bool(cx.get("CAUSAL")),) * len(loops)
    machine = MACHINES.get(config.get("cc"))
    for i, loop in enumerate(loops):
        f = flops or 2 * loop["tc_macs"]
        loop.update(masked=masks[i] if len(masks) == len(loops) else None, flops=f,
                    flops_basis="tile" if flops else "tensor")
        if not f:
            continue
        loop["warp_instr_per_mflop"] = round(loop["instructions"] * warps / f * 1e6, 1)
        loop["tc_warp_instr_per_mflop"] = round(loop["tc_total"] * warps / f * 1e6, 1)
        if machine:
            issue = loop["instructions"] * warps / machine["issue_per_cycle"]
            tensor = 2 * loop["tc_macs"] / machine["tc_flops_per_cycle"]
            loop["estimate"] = dict(machine=machine["name"], issue_cycles=round(issue), tc_cycles=round(tensor),
                                    cycles=round(max(issue, tensor)), bound="issue" if issue > tensor else "tensor")


def parse_ptxas(log: str) -> dict:
    """``ptxas -v`` output -> {function: {registers, spill_stores, spill_loads, stack, static_shared, warnings}}."""
    out, current, props = {}, None, None

    def entry(name):
        return out.setdefault(name, dict(registers=None, spill_stores=0, spill_loads=0, stack=0, static_shared=0,
                                         warnings=[]))

    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            current = m.group(1)
            entry(current)
        elif m := re.search(r"Function properties for (\S+)", line):
            props = m.group(1)
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            if props in out or props == current:
                e = entry(props)
                e.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif (m := re.search(r"Used (\d+) registers", line)) and current:
            e = entry(current)
            e["registers"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                e["static_shared"] = int(s.group(1))
        elif "warning" in line or "Performance Loss" in line:
            # e.g. C7512; ptxas 13.x reports wgmma serialisation (C75xx) as an info line; a line may name its
            # function, or come before any
            named = re.search(r"function '([^']+)'", line)
            entry(named.group(1) if named else current or "")["warnings"].append(line.split(":", 1)[-1].strip())
    return out


def _error(exc: BaseException) -> str:
    """The exception and its root cause (a triton CompilationError's own text is only the source location)."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    text = f"{type(exc).__name__}: {exc}"[-3000:]
    return text if root is exc else f"{type(root).__name__}: {root}"[-1000:] + " -- in -- " + text


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    run = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({run.returncode}):\n{run.stdout}{run.stderr}"[-4000:])
    return run


# ---------------------------------------------------------------- Triton kernels

def _ptxas(cc: int) -> Path:
    """The ptxas triton itself uses for this target (3.9 bundles a newer one for sm_90+)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return Path(get_ptxas(cc).path)
    except ImportError:  # older triton: one bundled ptxas
        return _tool_dir() / "ptxas"


def _ptxas_flags(cc: int, fp_fusion: bool) -> list:
    """ptxas options matching triton's own cubin build (CUDABackend.make_cubin)."""
    import inspect

    from triton.backends.nvidia.compiler import CUDABackend

    flags = ["-lineinfo", "-v", f"--gpu-name={_arch(cc)}"] + ([] if fp_fusion else ["--fmad=false"])
    if "--regAllocOptLevel=2" in inspect.getsource(CUDABackend.make_cubin):
        flags.append("--regAllocOptLevel=2")
    return flags


def _cached(parts: tuple, use_cache: bool, make) -> dict:
    """``make()``'s (JSON-able) result, cached under a hash of ``parts`` (what determines it). The cache holds
    the tools' raw outputs, so changing the analysis below needs no recompile."""
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
    path = CACHE_DIR / f"{key}.json.gz"
    if use_cache and path.exists():
        return dict(json.loads(gzip.decompress(path.read_bytes())), from_cache=True)
    result = make()
    if use_cache:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(gzip.compress(json.dumps(result).encode()))
        tmp.replace(path)
    return result


def _sass(cubin: Path) -> str:
    """``cuobjdump -sass`` without the encoding comments (what parse_sass reads, a third of the text)."""
    text = _run([_tool_dir() / "cuobjdump", "-sass", cubin]).stdout
    return "\n".join(line.split(" /* 0x")[0].rstrip() for line in text.splitlines()
                     if "Function :" in line or _SASS_LINE.match(line))


def _record(key: str, config: dict, ptxas: dict, registers, shared: int, instructions: list, num_warps: int,
            seconds: float, **extra) -> dict:
    record = dict(key=key, config=config, registers=registers if registers is not None else ptxas.get("registers"),
                  ptxas_registers=ptxas.get("registers"), spill_stores=ptxas.get("spill_stores"),
                  spill_loads=ptxas.get("spill_loads"), stack=ptxas.get("stack"), warnings=ptxas.get("warnings", []),
                  shared=shared, shared_limit=SHARED_LIMIT[config["cc"]], **extra,
                  **analyse_sass(instructions, num_warps), seconds=seconds)
    loop_costs(record)
    return record


def compile_triton(j: dict, use_cache: bool = True) -> dict:
    """Compile one job and measure it; errors are recorded (``error``), not raised."""
    import triton

    parts = ("triton", j["key"], j["kernel"].cache_key, j["constexprs"], j["options"], triton.__version__,
             _ptxas(j["cc"]).name) + ((j["types"],) if j["types"] else ())
    try:
        raw = _cached(parts, use_cache, lambda: _compile_triton(j))
        logged = parse_ptxas(raw["ptxas_log"])
        ptxas = dict(logged.get(raw["name"], {}))
        ptxas["warnings"] = ptxas.get("warnings", []) + logged.get("", {}).get("warnings", [])  # one kernel a log
        res = re.search(r"REG:(\d+)", raw["usage"])
        config = dict(j["config"], num_warps=raw["num_warps"], num_stages=raw.get("num_stages"))  # with defaults
        return _record(j["key"], config, ptxas, int(res.group(1)) if res else None, raw["shared"],
                       parse_sass(raw["sass"])[raw["name"]], raw["num_warps"], raw["seconds"],
                       from_cache=raw.get("from_cache", False))
    except Exception as exc:  # noqa: BLE001 - reported per kernel; the report and the tests fail on any
        return dict(key=j["key"], config=j["config"], error=_error(exc))


def _compile_triton(j: dict) -> dict:
    """Triton's cubin, its SASS and resource usage, and the log of ptxas -v re-run as triton runs it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.time()
    sig = signature(j["kernel"], j["dtype"], j["constexprs"], j["types"])
    src = ASTSource(j["kernel"], sig, j["constexprs"], alignment(j["kernel"], sig))
    compiled = triton.compile(src, target=GPUTarget("cuda", j["cc"], 32), options=j["options"])
    meta = compiled.metadata
    with tempfile.TemporaryDirectory(prefix="ek_static_") as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(compiled.asm["ptx"])
        cubin.write_bytes(compiled.asm["cubin"])
        log = _run([_ptxas(j["cc"]), *_ptxas_flags(j["cc"], meta.enable_fp_fusion), ptx, "-o", Path(tmp) / "v.o"])
        usage = _run([_tool_dir() / "cuobjdump", "-res-usage", cubin]).stdout
        sass = _sass(cubin)
    return dict(name=meta.name, shared=meta.shared, num_warps=meta.num_warps, num_stages=meta.num_stages,
                ptxas_log=log.stdout + log.stderr,
                usage=usage, sass=sass, seconds=round(time.time() - start, 1))


# ---------------------------------------------------------------- CUDA kernels (csrc)

_CUDA_TYPES = {"__half": "fp16", "__nv_bfloat16": "bf16", "float": "fp32"}


def csrc_units() -> list[Path]:
    return sorted(CSRC.glob("*.cu"))


def compile_csrc(unit: Path, cc: int, use_cache: bool = True) -> list[dict]:
    """Compile one translation unit for one target and measure every kernel in it."""
    nvcc = shutil.which(os.environ.get("NVCC", "nvcc"))
    sources = [*sorted(CSRC.glob("*.cu*")), *sorted(CSRC.glob("*.h")), *sorted(PROBE.iterdir())]
    parts = ("csrc", unit.name, cc, [p.read_text() for p in sources], _nvcc_version(nvcc))
    try:
        raw = _cached(parts, use_cache, lambda: _compile_csrc(nvcc, unit, cc))
    except Exception as exc:  # noqa: BLE001 - reported per unit
        return [dict(key=f"csrc/sm{cc}/{unit.name}", config=dict(backend="cuda", target=_arch(cc), cc=cc,
                                                                 kernel=unit.name),
                     error=_error(exc))]
    ptxas = parse_ptxas(raw["ptxas_log"])
    functions = parse_sass(raw["sass"])
    num_warps = raw["threads"] // 32
    out = []
    for mangled, instructions in functions.items():
        demangled = raw["names"][mangled]
        m = re.search(r"(\w+)<([^>]*)>", demangled)
        name, targs = (m.group(1), [a.strip() for a in m.group(2).split(",")]) if m else (demangled, [])
        dtype = next((_CUDA_TYPES[a] for a in targs if a in _CUDA_TYPES), None)
        d = next((int(a) for a in targs if a.isdigit() and int(a) >= 16), None)
        bypass = int(targs[2]) if len(targs) > 2 and targs[2].isdigit() else 1  # no BYPASS: the Excitor's own
        op = {v: k for k, v in OPERATORS.items()}.get(bypass, str(bypass))
        p = ptxas.get(mangled, {})
        config = dict(backend="cuda", target=_arch(cc), cc=cc, dtype=dtype, d=d, kernel=name, op=op, layout="any",
                      num_warps=num_warps, unit=unit.name, function=demangled)
        out.append(_record(f"csrc/sm{cc}/{dtype}/d{d}/{name}/{op}/any", config, p, None,
                           p.get("static_shared", 0) + raw["dynamic_shared"].get(mangled, 0), instructions,
                           num_warps, round(raw["seconds"] / len(functions), 1),
                           from_cache=raw.get("from_cache", False), static_shared=p.get("static_shared", 0),
                           dynamic_shared=raw["dynamic_shared"].get(mangled)))
    return out


def _compile_csrc(nvcc: str, unit: Path, cc: int) -> dict:
    """nvcc's ptxas log and SASS of one unit, and the dynamic shared memory each of its launches asks for:
    the object is linked with ``csrc_probe/`` (CUDA runtime stand-ins) and its launch functions run."""
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="ek_static_") as tmp:
        obj, exe = Path(tmp) / "unit.o", Path(tmp) / "probe"
        log = _run([nvcc, "-std=c++17", "-O3", f"-arch={_arch(cc)}", "-Xptxas", "-v", "-c", unit, "-o", obj])
        _run([nvcc, "-x", "c", "-c", PROBE / "runtime_stubs.c", "-o", Path(tmp) / "stubs.o"])
        _run([nvcc, "-std=c++17", "-x", "c++", f"-I{CSRC}", "-c", PROBE / "probe.cpp", "-o", Path(tmp) / "probe.o"])
        _run([nvcc, "-cudart", "none", Path(tmp) / "probe.o", Path(tmp) / "stubs.o", obj, "-o", exe])
        smem = dict(line.split()[1:] for line in _run([exe]).stdout.splitlines() if line.startswith("smem "))
        sass = _sass(obj)
    functions = list(parse_sass(sass))
    names = dict(zip(functions, _run(["c++filt"], input="\n".join(functions)).stdout.splitlines()))
    m = re.search(r"kThreads\s*=\s*(\d+)", (CSRC / "common.cuh").read_text())
    return dict(ptxas_log=log.stdout + log.stderr, sass=sass, names=names, threads=int(m.group(1)),
                dynamic_shared={k: int(v) for k, v in smem.items()}, seconds=round(time.time() - start, 1))


def _nvcc_version(nvcc: str | None) -> str | None:
    if not nvcc:
        return None
    m = re.search(r"release ([\d.]+), V([\d.]+)", _run([nvcc, "--version"]).stdout)
    return m.group(2) if m else None


# ---------------------------------------------------------------- run

_JOBS: list = []  # the Triton jobs of this run, read by forked workers by index


def _triton_worker(args):
    index, use_cache = args
    return [compile_triton(_JOBS[index], use_cache)]


def _csrc_worker(args):
    unit, cc, use_cache = args
    return compile_csrc(Path(unit), cc, use_cache)


def run(subset: str = "full", csrc: bool = True, workers: int = 2, use_cache: bool = True, log=None) -> dict:
    """Measure every kernel; returns the results document (see :func:`write`)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("bench.static: run without TRITON_INTERPRET=1 (the kernels must be real triton.jit functions)")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import torch
    import triton

    start = time.time()
    _JOBS[:] = list(triton_jobs(subset))
    tasks = [(_triton_worker, (i, use_cache)) for i in range(len(_JOBS))]
    nvcc = shutil.which(os.environ.get("NVCC", "nvcc")) if csrc else None
    if nvcc:
        tasks = [(_csrc_worker, (str(u), cc, use_cache)) for u in csrc_units() for cc in TARGETS] + tasks
    results = {}
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(fn, a) for fn, a in tasks]
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            for r in future.result():
                results[r["key"]] = r
                if log:
                    status = r.get("error", "").splitlines()[0] if "error" in r else "ok"
                    log(f"[{done}/{len(tasks)}] {r['key']}: {status} ({r.get('seconds', '-')} s)")
    now = datetime.datetime.now(datetime.timezone.utc)
    return dict(environment=dict(device="static, no GPU", run_type="static", date=now.date().isoformat(),
                                 finished=now.isoformat(timespec="seconds"), subset=subset,
                                 triton=triton.__version__, torch=torch.__version__, nvcc=_nvcc_version(nvcc),
                                 ptxas={cc: _ptxas(cc).name + " " + _tool_version(_ptxas(cc)) for cc in TARGETS},
                                 commit=_commit(), seconds=round(time.time() - start), workers=workers,
                                 from_cache=sum(r.get("from_cache", False) for r in results.values()),
                                 compile_seconds=round(sum(r.get("seconds", 0) for r in results.values())),
                                 csrc="compiled" if nvcc else "skipped (nvcc not found)" if csrc else "skipped"),
                results=dict(sorted(results.items())))


def _commit() -> str | None:
    """The checkout's commit, with "+changes" when the kernels differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        return None
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "excitor_kernels", "csrc"], cwd=ROOT).returncode
    return head.stdout.strip() + ("+changes" if dirty else "")


def _tool_version(path: Path) -> str:
    m = re.search(r"V([\d.]+)", _run([path, "--version"]).stdout)
    return m.group(1) if m else "?"


def write(doc: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"static-{doc['environment']['date']}.json"
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


# ---------------------------------------------------------------- report

def latest() -> tuple[Path, dict] | None:
    files = sorted(RESULTS_DIR.glob("static-*.json"))
    return (files[-1], json.loads(files[-1].read_text())) if files else None


def _loops(r: dict, field: str) -> str:
    return " / ".join(str(loop[field]) for loop in r["main_loops"]) or "-"


def _target_lines(results: dict) -> list[str]:
    """The main-loop targets (LOOP_TARGETS, RATIO) against the worst figure over dtypes, layouts and operators."""
    worst = {}
    plain = {(c["cc"], c["kernel"], c["dtype"], c["d"], c["layout"]): r for r in results.values()
             if "error" not in r and (c := r["config"])["backend"] == "triton" and c.get("op") == "plain"}
    for r in results.values():
        c = r["config"]
        if "error" in r or c["backend"] != "triton" or not (limits := loop_limits(c)):
            continue
        w = worst.setdefault((c["cc"], c["kernel"], c["d"]), dict(unmasked=0, masked=0, ratio=0, limits=set()))
        w["limits"].add(limits)
        base = plain.get((c["cc"], c["kernel"], c["dtype"], c["d"], plain_layout(c["layout"])))
        for i, loop in enumerate(r["main_loops"]):
            kind = "masked" if loop["masked"] else "unmasked"
            w[kind] = max(w[kind], loop["warp_instr_per_mflop"])
            if base and c["op"] != "plain" and i < len(base["main_loops"]):
                w["ratio"] = max(w["ratio"], loop["warp_instr_per_mflop"] / base["main_loops"][i]["warp_instr_per_mflop"])
    if not worst:
        return []
    lines = ["", "Main-loop targets (issue 24; half precision, worst over fp16/bf16, padded/varlen and the operators; "
             "warp-instructions per MFLOP; ratio: operator over plain attention, same loop). Where a target is out "
             "of reach with triton 3.9, `bench/static.py` KNOWN_MISSES gives the reason and the limit held instead:",
             "", "| target | kernel | d | unmasked (target) | masked (target) | operator / plain (target) | status |",
             "|---|---|---|---|---|---|---|"]
    for (cc, kernel, d), w in sorted(worst.items()):
        target = LOOP_TARGETS[(cc, kernel)] + (RATIO.get((cc, kernel)),)
        missed = [why for *_, why in w["limits"] if why]
        met = (w["unmasked"] <= target[0] and (target[1] is None or w["masked"] <= target[1])
               and (target[2] is None or w["ratio"] <= target[2]))
        cells = [_arch(cc), kernel, d, f"{w['unmasked']:.0f} ({target[0]})",
                 f"{w['masked']:.0f} ({target[1] or '-'})", f"{w['ratio']:.2f} ({target[2] or '-'})",
                 "met" if met else "not met: " + "; ".join(sorted(set(m.split(":")[0] for m in missed)))]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def _per_mflop(r: dict) -> str:
    return " / ".join(("m " if loop.get("masked") else "") + f"{loop.get('tc_warp_instr_per_mflop', '-')}, "
                      f"{loop.get('warp_instr_per_mflop', '-')}" for loop in r["main_loops"]) or "-"


def _estimates(r: dict) -> str:
    return " / ".join(f"{e['cycles']} ({e['issue_cycles']}\\|{e['tc_cycles']})" if (e := loop.get("estimate")) else "-"
                      for loop in r["main_loops"]) or "-"


def _tc_kinds(r: dict) -> str:
    kinds = {}
    for loop in r["main_loops"]:
        for opcode, n in loop["tc"].items():
            kinds[opcode] = kinds.get(opcode, 0) + n
    return ", ".join(f"{op} x{n}" for op, n in sorted(kinds.items())) or "-"


def markdown(path: Path, doc: dict) -> list[str]:
    """The "Static cost report" section of BENCHMARKS.md."""
    env, results = doc["environment"], doc["results"]
    ptxas = ", ".join(f"sm_{k}: {v}" for k, v in env["ptxas"].items())
    lines = ["", f"## Static cost report ({env['device']}), {env['date']}", "",
             f"File `{path.relative_to(ROOT)}`, written by `python -m bench.static` ({env['subset']} set of "
             f"{len(results)} kernels: {env['seconds']} s with {env['workers']} workers, {env.get('from_cache', 0)} "
             f"of them from the cache; compiling them took {env.get('compile_seconds', '-')} s in all); triton "
             f"{env['triton']} (ptxas {ptxas}), torch {env['torch']}, nvcc {env['nvcc'] or '-'}; kernels of commit "
             f"{env.get('commit') or '-'}; CUDA kernels: {env['csrc']}.", "",
             "Compiled for each target at the launchers' GPU tiles, causal, P = 30, 16-byte aligned pointers and "
             "strides; counts are SASS instructions per thread. *main-loop* columns count one pass through each "
             "main loop (loops holding tensor-core instructions; the forward has two: key tiles without and with "
             "the mask), `a / b` per loop. tc: tensor-core instructions (tf32: how many are TF32), MACs: their "
             "multiply-adds per CTA in thousands, exp2: MUFU.EX2, ld: global loads (LDG + LDGSTS + TMA), spill: "
             "bytes stored / loaded per thread, smem: shared memory per CTA in bytes. The plain rows (BYPASS = 0) "
             "are the baseline the operators add to.", "",
             "*warp-instr / MFLOP* (per main loop, `a / b`; the masked loop marked `m`): tensor-core and total "
             "warp-instructions of one iteration (count per thread x warps) per MFLOP of the tile's work "
             "(attention kernels: the products plain attention needs, forward 2, dk/dv 4, dq 3 of BLOCK_M x "
             "BLOCK_N x d; other kernels: their tensor-core work). *est. cycles / iter* is a **static estimate, "
             "not a measurement** (no GPU ran): per iteration of one CTA on an SM, max(issue cycles = "
             "warp-instructions / 4, tensor-core cycles = tensor FLOPs run / (4096 per cycle on an H100 for "
             "sm_90, 2048 on an A100 for sm_80)), shown as `issue|tensor`; which of the two bounds it "
             "(bench/static.py, `MACHINES`). Never-executed `@!PT` padding is not counted."]
    earlier = [f"`{f.relative_to(ROOT)}`" for f in sorted(RESULTS_DIR.glob("static-*.json")) if f != path]
    if earlier:
        lines += ["", "Earlier static reports (same format): " + ", ".join(earlier) + "."]
    lines += _target_lines(results)
    errors = [r for r in results.values() if "error" in r]
    if errors:
        lines += ["", f"**{len(errors)} kernel(s) failed to compile:**", ""]
        lines += [f"* `{r['key']}`: {r['error'].splitlines()[0][:200]}" for r in errors]
    groups = {}
    for r in results.values():
        if "error" not in r:
            c = r["config"]
            groups.setdefault((c["backend"], c["target"], c["dtype"], c["d"]), []).append(r)
    order = {op: i for i, op in enumerate(OPERATORS)}
    header = ["kernel", "op", "layout", "tile", "warps/stages", "regs", "spill", "smem", "main-loop tc (tf32)",
              "main-loop MACs (k)", "main-loop exp2", "main-loop ld", "warp-instr / MFLOP tc, total",
              "est. cycles / iter issue\\|tensor", "tc kinds (main loops together)", "kernel tc / exp2 / ld",
              "warnings"]
    for (backend, target, dtype, d), rows in sorted(groups.items(), key=lambda g: tuple(map(str, g[0]))):
        lines += ["", f"### {backend}, {target}, {dtype}, d = {d}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        rows.sort(key=lambda r: (r["config"]["kernel"], r["config"]["layout"], order.get(r["config"]["op"], 9)))
        for r in rows:
            c, k, loops = r["config"], r["kernel"], r["main_loops"]
            tf32 = sum(loop["tf32"] for loop in loops)
            cx = c.get("constexprs", {})
            tile = f"{cx['BLOCK_M']}x{cx['BLOCK_N']}" if "BLOCK_M" in cx and "BLOCK_N" in cx else "-"
            if cx.get("DESC"):
                tile += " desc"
            cells = [c["kernel"], c["op"], c["layout"], tile,
                     f"{c.get('num_warps', '-')}/{c.get('num_stages') or '-'}",
                     r["registers"], f"{r['spill_stores']} / {r['spill_loads']}",
                     f"{r['shared']}" + (f" **> {r['shared_limit']}**" if r["shared"] > r["shared_limit"] else ""),
                     _loops(r, "tc_total") + (f" ({tf32})" if tf32 else ""),
                     " / ".join(str(loop["tc_macs"] // 1000) for loop in loops) or "-",
                     _loops(r, "exp2"), _loops(r, "global_loads"), _per_mflop(r), _estimates(r), _tc_kinds(r),
                     f"{k['tc_total']} / {k['exp2']} / {k['global_loads']}",
                     "; ".join(sorted({w[:80] for w in r["warnings"]})) or "-"]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.static", description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", choices=("full", "test"), default="full")
    parser.add_argument("--markdown", action="store_true", help="print the report section of the newest "
                        "static results file and exit")
    parser.add_argument("--no-csrc", action="store_true")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results here instead of bench/results/ and do not "
                        "touch BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.markdown:
        found = latest()
        if not found:
            sys.exit("bench.static: no bench/results/static-*.json yet")
        print("\n".join(markdown(*found)))
        return
    doc = run(args.subset, not args.no_csrc, args.workers, not args.no_cache,
              log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        print(args.json)
    else:
        from . import report

        print(write(doc))
        for written in report.regenerate():
            print(written)
    failed = [k for k, r in doc["results"].items() if "error" in r]
    if failed:
        sys.exit(f"bench.static: {len(failed)} kernel(s) failed: {failed}")


if __name__ == "__main__":
    main()
