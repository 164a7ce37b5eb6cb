"""Compile the Triton kernels for NVIDIA targets without a GPU: ``python triton_gpu_compile.py [--all]``.

Each kernel is compiled (Triton IR -> PTX -> cubin with the ptxas bundled in triton) for sm_80 and
sm_90 with the tile sizes and launch options the launchers use on a GPU. This finds what the CPU
interpreter cannot: code the GPU compiler rejects, and tiles whose shared memory exceeds what one
block may use. Prints one JSON line per kernel; run by tests/test_triton_gpu_compile.py in a process
without TRITON_INTERPRET (with it set, ``triton.jit`` gives interpreted functions).
"""
from __future__ import annotations

import json
import os
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from excitor_kernels.ops import _triton_attention as tri
from excitor_kernels.ops import _triton_decode as dec

# largest dynamic shared memory of one block (cudaDevAttrMaxSharedMemoryPerBlockOptin)
SHARED_LIMIT = {80: 166912, 90: 232448}
FP32_POINTERS = {"GATE", "LSE", "DELTA", "DPK", "DPV", "DGATE_K", "DGATE_Q", "WS_ACC", "WS_M", "WS_L"}
INT_POINTERS = {"CU_Q", "CU_K", "SEQLENS"}
INTS = {"Hq", "Hkv", "M", "N", "P", "GROUPS", "NUM_SPLITS", "num_key_programs"}


def signature(kernel, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.startswith("stride_") or name in INTS:
            sig[name] = "i32"
        elif "scale" in name:
            sig[name] = "fp32"
        elif name in FP32_POINTERS:
            sig[name] = "*fp32"
        elif name in INT_POINTERS:
            sig[name] = "*i32"
        else:
            sig[name] = f"*{dtype}"
    return sig


def compile_one(label, kernel, cc, dtype, constexprs, options):
    start = time.time()
    # what _precision picks on a GPU: IEEE float32 dots (torch's default, no TF32); half types ignore it
    constexprs = dict(constexprs, PREC="ieee" if dtype == "fp32" else "tf32")
    src = ASTSource(kernel, signature(kernel, dtype, constexprs), constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    shared = compiled.metadata.shared
    return dict(kernel=label, cc=cc, dtype=dtype, shared=shared, limit=SHARED_LIMIT[cc],
                ok=shared <= SHARED_LIMIT[cc], seconds=round(time.time() - start, 1),
                constexprs={k: v for k, v in constexprs.items() if k != "PREC"})


def jobs(everything: bool):
    """bf16 kernels for sm_90 and sm_80 and the float32 forwards for sm_80 (d = 128, the largest tiles);
    ``everything`` adds every float32 kernel for both (several minutes of compiling)."""
    d, P = 128, 16
    common = dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_P=P)
    # float32 only for sm_80, whose shared memory limit is the lower one (what fits there fits sm_90)
    for cc, dtype in [(90, "bf16"), (80, "bf16"), (80, "fp32")] + ([(90, "fp32")] if everything else []):
        full = everything or dtype == "bf16"
        fwd, bwd = tri.blocks(True, 4096, 4096, d, 4 if dtype == "fp32" else 2)
        fwd_launch = {k: fwd.pop(k) for k in ("num_warps", "num_stages")}
        bwd_launch = {k: bwd.pop(k) for k in ("num_warps", "num_stages")}
        for bypass in (tri.EXCITOR, tri.ADAPTER):
            for varlen in (False, True):
                flags = dict(common, CAUSAL=True, BYPASS=bypass, SIM_IS_K=bypass == tri.ADAPTER, VARLEN=varlen)
                name = f"{'excitor' if bypass == tri.EXCITOR else 'adapter'}{'-varlen' if varlen else ''}"
                yield (f"fwd/{name}", tri.attention_fwd_kernel, cc, dtype, dict(flags, **fwd), fwd_launch)
                if full:
                    yield (f"bwd/{name}", tri.attention_bwd_kernel, cc, dtype, dict(flags, **bwd), bwd_launch)
            if not full:
                continue
            yield (f"bwd_preprocess/{bypass}", tri.attention_bwd_preprocess_kernel, cc, dtype,
                   dict(common, BYPASS=bypass, VARLEN=True, BLOCK_M=bwd["Q_BLOCK_M"]), bwd_launch)
            groups, M = 4, 1
            block_n, block_r, launch = dec.decode_blocks(True, groups * M, 4096, d)
            yield (f"decode_split/{bypass}", dec.decode_split_kernel, cc, dtype,
                   dict(common, CAUSAL=True, BYPASS=bypass, SIM_IS_K=False, HAS_SEQLENS=True, BLOCK_R=block_r,
                        BLOCK_N=block_n), launch)
            yield (f"decode_combine/{bypass}", dec.decode_combine_kernel, cc, dtype,
                   dict(common, BYPASS=bypass, BLOCK_R=block_r), launch)


def main():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run without TRITON_INTERPRET=1 (the kernels must be real triton.jit functions)")
    failed = 0
    for label, kernel, cc, dtype, constexprs, options in jobs("--all" in sys.argv):
        try:
            result = compile_one(label, kernel, cc, dtype, constexprs, options)
        except Exception as exc:  # noqa: BLE001 - reported per kernel, the caller fails on any
            result = dict(kernel=label, cc=cc, dtype=dtype, ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
        failed += not result["ok"]
        print(json.dumps(result), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
