"""One-command validation of the CUDA backend on a GPU machine (run from anywhere):

    python csrc/gpu_check.py            # build (or load the cached) extension, then check
    python csrc/gpu_check.py --quick    # fewer shapes

Builds the extension just in time (ninja, cached per torch/CUDA/architecture: excitor_kernels/_cuda_build.py),
then compares o and every gradient of ``backend="cuda"`` with a float64 evaluation of the reference formulas
for a grid of shapes (both operators, fp16/bf16, d 64/128, causal or not, M != N, GQA, shared and
per-sample prompts, sim_keys, transposed (B, M, H, d) layouts, deterministic), outputs poisoned with NaN.
Error: ||out - ref|| / ||ref||; budget fp16 5e-3, bf16 2e-2 (docs/contract.md). Prints a table; exit status 1 on
any failure.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cases(quick: bool):
    """(op, dtype, d, B, Hq, Hkv, M, N, P, causal, per_sample, sim, transposed, deterministic)."""
    shapes = [  # B, Hq, Hkv, M, N, P
        (1, 1, 1, 1, 1, 1), (2, 4, 4, 64, 64, 8), (1, 4, 2, 100, 100, 30), (2, 8, 2, 37, 201, 64),
        (1, 2, 1, 200, 77, 3), (1, 4, 1, 1, 300, 16), (1, 2, 2, 129, 257, 64),
    ]
    if quick:
        shapes = shapes[:4]
    grid = itertools.product(("excitor", "adapter"), ("float16", "bfloat16"), (64, 128), shapes, (True, False))
    for i, (op, dtype, d, shape, causal) in enumerate(grid):  # the rarer options vary along the grid
        yield (op, dtype, d, *shape, causal, i // 2 % 2 == 0, op == "excitor" and i % 3 != 2, i // 3 % 2 == 1,
               i % 5 == 0)


def run_case(torch, ek, case):
    op, dtype, d, B, Hq, Hkv, M, N, P, causal, per_sample, with_sim, transposed, deterministic = case
    dt = getattr(torch, dtype)
    dev = "cuda"

    def heads(b, h, n):  # (b, h, n, d), optionally a transposed view of (b, n, h, d) memory
        if transposed:
            return torch.randn(b, n, h, d, device=dev).transpose(1, 2)
        return torch.randn(b, h, n, d, device=dev)

    q, k, v = heads(B, Hq, M), heads(B, Hkv, N), heads(B, Hkv, N)
    pk = torch.randn(*((B,) if per_sample else ()), Hkv, P, d, device=dev)
    pv = torch.randn_like(pk)
    sim = heads(B, Hkv, N) if with_sim else None
    gate = torch.rand(Hq, device=dev) * 2 - 1
    inputs = {"q": q, "k": k, "v": v, "pk": pk, "gate": gate}
    if op == "adapter":
        inputs["pv"] = pv
    if sim is not None:
        inputs["sim"] = sim
    low = {n: (t.to(dt) if n != "gate" else t).detach().requires_grad_() for n, t in inputs.items()}
    ref = {n: t.double().detach().requires_grad_() for n, t in low.items()}
    do = torch.randn(B, Hq, M, d, device=dev)

    def call(x, backend):
        if op == "excitor":
            fn = ek.excitor_attention if backend else ek.excitor_attention_reference
            kw = dict(sim_keys=x.get("sim"), causal=causal, softmax_scale=d ** -0.5)
            if backend:
                return fn(x["q"], x["k"], x["v"], x["pk"], x["gate"], backend="cuda", deterministic=deterministic, **kw)
            return fn(x["q"], x["k"], x["v"], x["pk"], x["gate"], prompt_scale=d ** -0.5, **kw)
        fn = ek.adapter_attention if backend else ek.adapter_attention_reference
        kw = dict(causal=causal, softmax_scale=d ** -0.5)
        if backend:
            return fn(x["q"], x["k"], x["v"], x["pk"], x["pv"], x["gate"], backend="cuda", deterministic=deterministic, **kw)
        return fn(x["q"], x["k"], x["v"], x["pk"], x["pv"], x["gate"], **kw)

    with ek.poisoned_outputs():
        o = call(low, True)
        o.backward(do.to(dt))
    torch.cuda.synchronize()
    o_ref = call(ref, False)
    o_ref.backward(do.double())

    def rel(x, y):
        x = x.double()
        if not torch.isfinite(x).all():
            return float("nan")
        return ((x - y).norm() / y.norm().clamp_min(1e-30)).item()

    errs = {"o": rel(o, o_ref)}
    errs.update({f"d{n}": rel(low[n].grad, ref[n].grad) for n in low})
    return errs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smaller grid of shapes")
    args = ap.parse_args()
    os.environ.setdefault("MAX_JOBS", "8")
    os.environ["EXCITOR_CUDA_EXPERIMENTAL"] = "1"  # the opt-in of excitor_kernels/_cuda.py
    sys.path.insert(0, str(ROOT))
    import torch

    import excitor_kernels as ek
    from excitor_kernels import _cuda
    from excitor_kernels.reference import ERROR_BUDGET

    if _cuda.cannot_build() is not None:
        print(f"the CUDA backend is not available: {_cuda.cannot_build()}")
        return 1
    _cuda._load()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    head = f"{'op':8} {'dtype':8} {'d':>3} {'B':>2} {'Hq':>2} {'Hkv':>3} {'M':>4} {'N':>4} {'P':>2} flags  worst  status"
    print(head)
    print("-" * len(head))
    failures = 0
    for case in cases(args.quick):
        op, dtype, d, B, Hq, Hkv, M, N, P, causal, per_sample, sim, transposed, det = case
        flags = "".join(c if on else "." for c, on in zip("cpstd", (causal, per_sample, sim, transposed, det)))
        try:
            errs = run_case(torch, ek, case)
            worst_name, worst = max(errs.items(), key=lambda kv: float("inf") if kv[1] != kv[1] else kv[1])
            ok = all(e == e and e <= ERROR_BUDGET[getattr(torch, dtype)] for e in errs.values())
            status = "ok" if ok else "FAIL " + " ".join(f"{n}={e:.1e}" for n, e in errs.items())
        except Exception as exc:  # report and keep going: one table for the whole grid
            worst_name, worst, ok, status = "-", float("nan"), False, f"ERROR {type(exc).__name__}: {exc}"
        failures += not ok
        print(f"{op:8} {dtype:8} {d:>3} {B:>2} {Hq:>2} {Hkv:>3} {M:>4} {N:>4} {P:>2} {flags}  "
              f"{worst:.1e} ({worst_name})  {status}", flush=True)
    print(f"flags: c causal, p per-sample prompts, s sim_keys, t transposed layout, d deterministic; "
          f"{failures} failing case(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
