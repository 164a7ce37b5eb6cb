"""Error distribution of the Triton backend's bf16 gradients against float64, over random draws.

``python -m bench.gate_accuracy [draws]`` runs the case of README's accuracy table (B=1, Hq=4, Hkv=2,
M=N=48, d=128, P=64, causal, bf16) ``draws`` times (default 16, seeds 0..draws-1) and prints the median and
maximum relative error of the output and of every gradient. Without a GPU the kernels run interpreted
(about 5 s a draw on 2 cores).
"""
from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import TRITON_DEVICE, Case, make_inputs, oracle, rel_err, run_with_grads  # noqa: E402

CASE = Case(B=1, Hq=4, Hkv=2, M=48, N=48, d=128, P=64)


def main(draws: int = 16) -> None:
    errors: dict[str, list[float]] = {}
    for seed in range(draws):
        torch.manual_seed(seed)
        x = make_inputs(CASE, "excitor", torch.bfloat16, TRITON_DEVICE)
        do = torch.randn(CASE.B, CASE.Hq, CASE.M, CASE.d, dtype=torch.bfloat16, device=TRITON_DEVICE)
        o, grads = run_with_grads("excitor", x, "triton", CASE.causal, do)
        o_ref, grads_ref = oracle("excitor", x, CASE.causal, do)
        errors.setdefault("o", []).append(rel_err(o, o_ref))
        for name, g in grads.items():
            errors.setdefault(name, []).append(rel_err(g, grads_ref[name]))
    print(f"{CASE} bf16, {draws} draws on {TRITON_DEVICE}: relative error vs float64")
    for name, e in errors.items():
        print(f"  {name:12s} median {statistics.median(e):.1e}  max {max(e):.1e}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16)
