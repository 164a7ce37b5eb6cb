"""Error distribution of the Triton backend's bf16 gradients against float64, over random draws.

``python -m bench.gate_accuracy [draws]`` runs the case of README's accuracy table (B=1, Hq=4, Hkv=2,
M=N=48, d=128, P=64, causal, bf16) ``draws`` times (default 16, seeds 0..draws-1) and prints the median and
maximum relative error of the output and of every gradient. Without a GPU the kernels run interpreted
(about 5 s a draw on 2 cores).

``python -m bench.gate_accuracy --standard [draws]`` measures docs/contract.md's standard on the cases where the gate
gradient cancels most (one query head; README's "Accuracy"): per backend and case, the median and maximum relative
error of ``dgate``, the median error of the same formula evaluated by PyTorch in the input dtype (``e_pt``), how many
draws exceed the fixed budget, and the largest ``error / (budget + 2 e_pt)`` over the output and every gradient
(the standard holds while it is at most 1).

``python -m bench.gate_accuracy --one-head [draws]`` draws the two one-query-head cases of ``--standard`` ``draws``
times each (default 1000, seeds 0..draws-1) on the triton and sdpa backends and counts the draws whose ``dgate``
exceeds the fixed budget, with the median, 99.9th percentile and largest ``dgate`` error: the tail of the
cancellation (README's "Accuracy").

``python -m bench.gate_accuracy --random [draws]`` draws ``draws`` random one-query-head cases per backend (triton,
sdpa, and sdpa_concat with two query heads on one key/value head; bf16 and fp16, d in {96, 128, 256}, P 2 to 16,
M and N 4 to 64, causal or not; seeds 0..draws-1) and counts the draws that miss the standard and those whose
``dgate`` exceeds the fixed budget (README's "Accuracy").
"""
from __future__ import annotations

import os
import random
import statistics
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import (BUDGET, TRITON_DEVICE, Case, allowed_errors, exactly_zero_grads, in_dtype, make_inputs,  # noqa: E402
                     oracle, rel_err, run_with_grads)

CASE = Case(B=1, Hq=4, Hkv=2, M=48, N=48, d=128, P=64)
# the issue-25 cases (one query head: dgate is one cancelling sum), and CASE
STANDARD_CASES = [(Case(B=1, Hq=1, Hkv=1, M=48, N=48, d=256, P=4), torch.bfloat16),
                  (Case(B=1, Hq=1, Hkv=1, M=48, N=48, d=96, P=4), torch.float16),
                  (CASE, torch.bfloat16)]
STANDARD_BACKENDS = ("triton", "sdpa", "torch")


def _draw(case: Case, dtype, backend: str) -> tuple[dict, dict, float]:
    """One draw: (errors of the output and every gradient, what the standard allows each, dgate's e_pt)."""
    device = "cpu" if backend == "torch" else TRITON_DEVICE
    x = make_inputs(case, "excitor", dtype, device)
    do = torch.randn(case.B, case.Hq, case.M, case.d, dtype=dtype, device=device)
    o, grads = run_with_grads("excitor", x, backend, case.causal, do)
    o_ref, grads_ref = oracle("excitor", x, case.causal, do)
    zero = exactly_zero_grads("excitor", case)
    largest = max(g.norm().item() for g in grads_ref.values())
    allowed = allowed_errors("excitor", x, case.causal, do, o_ref, grads_ref, zero, largest)
    errs = {"o": rel_err(o, o_ref)}
    errs.update({n: rel_err(g, grads_ref[n], largest if n in zero else None) for n, g in grads.items()})
    return errs, allowed, rel_err(in_dtype("excitor", x, case.causal, do)[1]["gate"], grads_ref["gate"])


def standard(draws: int = 16) -> None:
    print("| backend | case | dtype | dgate error median / max | e_pt median | over the fixed budget | "
          "max error / (budget + 2 e_pt) |\n|---|---|---|---|---|---|---|")
    for case, dtype in STANDARD_CASES:
        for backend in STANDARD_BACKENDS:
            gate_err, gate_pt, worst, over = [], [], 0.0, 0
            for seed in range(draws):
                torch.manual_seed(seed)
                errs, allowed, e_pt = _draw(case, dtype, backend)
                worst = max(worst, max(errs[n] / allowed[n] for n in errs))
                over += any(e > BUDGET[dtype] for e in errs.values())
                gate_err.append(errs["gate"])
                gate_pt.append(e_pt)
            print(f"| {backend} | {str(case)} | {str(dtype)[6:]} | {statistics.median(gate_err):.1e} / "
                  f"{max(gate_err):.1e} | {statistics.median(gate_pt):.1e} | {over} of {draws} | {worst:.2f} |",
                  flush=True)


def one_head(draws: int = 1000) -> None:
    print("| backend | case | dtype | draws | `dgate` over the fixed budget | `dgate` error median / 99.9% / max |\n"
          "|---|---|---|---|---|---|")
    for case, dtype in STANDARD_CASES[:2]:
        for backend in ("triton", "sdpa"):
            errors = []
            for seed in range(draws):
                torch.manual_seed(seed)
                errors.append(_draw(case, dtype, backend)[0]["gate"])
            tail = torch.tensor(errors).quantile(0.999).item()
            over = sum(not e <= BUDGET[dtype] for e in errors)
            print(f"| {backend} | {str(case)} | {str(dtype)[6:]} | {draws} | {over} | {statistics.median(errors):.1e} / "
                  f"{tail:.1e} / {max(errors):.1e} |", flush=True)


def random_draws(draws: int = 100) -> None:
    print("| backend | draws | missed the standard | `dgate` over the fixed budget | largest `dgate` error |\n"
          "|---|---|---|---|---|")
    for backend in ("triton", "sdpa", "sdpa_concat"):
        missed = over = 0
        largest = 0.0
        for seed in range(draws):
            rng = random.Random(seed)
            dtype = rng.choice([torch.bfloat16, torch.float16])
            case = Case(B=1, Hq=2 if backend == "sdpa_concat" else 1, Hkv=1, M=rng.randint(4, 64),
                        N=rng.randint(4, 64), d=rng.choice([96, 128, 256]), P=rng.randint(2, 16),
                        causal=rng.random() < 0.5)
            torch.manual_seed(seed)
            errs, allowed, _ = _draw(case, dtype, backend)
            missed += any(errs[n] > allowed[n] or errs[n] != errs[n] for n in errs)
            over += errs["gate"] > BUDGET[dtype]
            largest = max(largest, errs["gate"])
        print(f"| {backend} | {draws} | {missed} | {over} | {largest:.1e} |", flush=True)


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
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    modes = {"--standard": standard, "--one-head": one_head, "--random": random_draws}
    mode = next((f for flag, f in modes.items() if flag in sys.argv), main)
    mode(*(int(a) for a in args))
