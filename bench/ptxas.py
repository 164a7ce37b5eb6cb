"""Compile one Triton kernel for an NVIDIA target without a GPU and read its cost from ``ptxas -v``.

Triton IR -> PTX with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, then the
``ptxas-blackwell`` bundled with triton (the only bundled ptxas that reads the PTX version triton 3.9
emits) for registers and spill bytes. Run without ``TRITON_INTERPRET=1``. ``bench.static`` gives the full
report; this is the small piece ``bench.rank_configs --static`` and its test need.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

# largest dynamic shared memory of one block (cudaDevAttrMaxSharedMemoryPerBlockOptin)
SHARED_LIMIT = {80: 166912, 90: 232448}
# argument name -> signature type, first full match wins ({dtype}: the inputs' dtype)
ARG_TYPES = (
    (r"stride_\w+|Hq|Hkv|M|N|P|GROUPS|member", "i32"),
    (r"\w*scale\w*", "fp32"),
    (r"GATE|LSE|DELTA|DPK|DPV|DGATE\w*|DKE", "*fp32"),
    (r"CU_\w+", "*i32"),
    (r"[A-Z][A-Z0-9_]*", "*{dtype}"),
)


def _ptxas() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"


def signature(kernel, dtype: str, constexprs: dict, types: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        else:
            sig[name] = next(t for p, t in ARG_TYPES if re.fullmatch(p, name)).format(dtype=dtype)
    return sig


def compile_cost(kernel, cc: int, dtype: str, constexprs: dict, options: dict, types: dict | None = None) -> dict:
    """{registers, spill_stores, spill_loads, shared, limit} of ``kernel`` compiled for sm_<cc>
    (sm_90a for 90, as triton does)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(kernel, signature(kernel, dtype, constexprs, types or {}), constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        arch = "sm_90a" if cc == 90 else f"sm_{cc}"
        out = subprocess.run([str(_ptxas()), "-v", "--gpu-name", arch, str(ptx), "-o", str(ptx) + ".cubin"],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return dict(registers=int(regs.group(1)), spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
                shared=compiled.metadata.shared, limit=SHARED_LIMIT[cc])
