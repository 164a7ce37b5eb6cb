"""``python -m bench.sanitize``: small calls of every kernel path, for running under compute-sanitizer.

    compute-sanitizer --tool memcheck  python -m bench.sanitize --backend triton
    compute-sanitizer --tool memcheck  python -m bench.sanitize --backend cuda
    compute-sanitizer --tool racecheck python -m bench.sanitize --backend cuda --only backward

Paths (both operators, fp16 by default): the padded forward and backward, causal and not, ``M == N`` and
``M != N`` (sizes that are no multiple of any tile), GQA; decode (1 and 3 queries against a longer cache, no
gradient: the Triton split-KV kernel; the CUDA backend's forward at M <= 3); varlen with an empty sequence
(triton only: the CUDA kernels take padded batches). Every output is poisoned with NaN before the kernels write
it and compared with a float64 evaluation of the reference formulas (budget: docs/contract.md), so a run that
the sanitizer passes is also a correct one. Prints one line per call; exit status 1 when any call is out of
budget or raises.

Set ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` under memcheck: PyTorch's caching allocator hands out blocks of larger
pools, so an access past a tensor's end would land in memory the sanitizer sees as allocated (``.ci/gpu_session
sanitize`` does). Without a GPU the Triton kernels run interpreted (seconds; the sanitizer is not involved).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():  # read when triton decorates the kernels, so before the package is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import excitor_kernels as ek  # noqa: E402
from excitor_kernels.reference import ERROR_BUDGET  # noqa: E402

B, HQ, HKV, D, P = 2, 4, 2, 64, 5
PADDED = [(70, 70), (37, 101)]  # (M, N)
DECODE = [(1, 300), (3, 300)]
CU_SEQLENS = [0, 30, 30, 95]  # three sequences, the second empty


def _rand(*shape, device, dtype):
    return torch.randn(*shape, device=device, dtype=dtype)


def _operands(op: str, M: int, N: int, device, dtype, grad: bool, lead=(B,), heads_first=True) -> dict:
    def heads(h, n):
        return _rand(*lead, h, n, D, device=device, dtype=dtype) if heads_first else \
            _rand(*lead, n, h, D, device=device, dtype=dtype)

    x = dict(q=heads(HQ, M), k=heads(HKV, N), v=heads(HKV, N), prompt_keys=_rand(HKV, P, D, device=device, dtype=dtype),
             gate=torch.rand(HQ, device=device) * 2 - 1)
    if op == "adapter":
        x["prompt_values"] = _rand(HKV, P, D, device=device, dtype=dtype)
    return {n: t.requires_grad_(grad) for n, t in x.items()}


def _call(op: str, x: dict, backend: str, causal: bool, cu=None):
    args = [x["q"], x["k"], x["v"], x["prompt_keys"]] + ([x["prompt_values"]] if op == "adapter" else []) + [x["gate"]]
    if cu is None:
        fn = ek.excitor_attention if op == "excitor" else ek.adapter_attention
        return fn(*args, causal=causal, backend=backend)
    fn = ek.excitor_attention_varlen if op == "excitor" else ek.adapter_attention_varlen
    lengths = cu[1:] - cu[:-1]
    return fn(*args, cu, cu, int(lengths.max()), int(lengths.max()), causal=causal, backend=backend)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(x).all():
        return float("nan")
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(op: str, backend: str, M: int, N: int, causal: bool, grad: bool, varlen: bool, device, dtype) -> dict:
    """Relative errors of the output (and, with ``grad``, of every gradient) against float64."""
    if varlen:
        cu = torch.tensor(CU_SEQLENS, device=device, dtype=torch.int32)
        x = _operands(op, CU_SEQLENS[-1], CU_SEQLENS[-1], device, dtype, grad, lead=(), heads_first=False)
    else:
        cu = None
        x = _operands(op, M, N, device, dtype, grad)
    ref_x = {n: t.detach().double().requires_grad_(grad) for n, t in x.items()}
    with ek.poisoned_outputs():
        o = _call(op, x, backend, causal, cu)
        do = torch.randn_like(o)
        grads = torch.autograd.grad(o, list(x.values()), do) if grad else ()
    o_ref = _call(op, ref_x, "reference", causal, cu)
    errors = {"o": _rel(o, o_ref)}
    if grad:
        ref_grads = torch.autograd.grad(o_ref, list(ref_x.values()), do.double())
        errors.update({f"d{n}": _rel(g, r) for n, g, r in zip(x, grads, ref_grads)})
    return errors


def cases(backend: str, only: str | None):
    """(label, kwargs of :func:`check`)."""
    for op in ("excitor", "adapter"):
        for causal in (True, False):
            for M, N in PADDED:
                if only in (None, "backward"):
                    yield f"{op} padded fwd+bwd M{M} N{N} {'causal' if causal else 'full'}", \
                        dict(op=op, M=M, N=N, causal=causal, grad=True, varlen=False)
                if only in (None, "forward"):
                    yield f"{op} padded fwd M{M} N{N} {'causal' if causal else 'full'}", \
                        dict(op=op, M=M, N=N, causal=causal, grad=False, varlen=False)
            if only in (None, "decode"):
                for M, N in DECODE:
                    yield f"{op} decode M{M} N{N} {'causal' if causal else 'full'}", \
                        dict(op=op, M=M, N=N, causal=causal, grad=False, varlen=False)
            if backend == "triton" and only in (None, "varlen"):
                yield f"{op} varlen fwd+bwd {CU_SEQLENS} {'causal' if causal else 'full'}", \
                    dict(op=op, M=0, N=0, causal=causal, grad=True, varlen=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sanitize", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("triton", "cuda"), default="triton")
    parser.add_argument("--only", choices=("forward", "backward", "decode", "varlen"),
                        help="one kind of call (racecheck on the backward: --only backward)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    args = parser.parse_args(argv)
    if args.backend == "cuda":
        os.environ.setdefault("EXCITOR_CUDA_EXPERIMENTAL", "1")  # the opt-in of excitor_kernels/_cuda.py
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    budget = ERROR_BUDGET[dtype]
    failures = 0
    for label, kw in cases(args.backend, args.only):
        try:
            errors = check(backend=args.backend, device=device, dtype=dtype, **kw)
            bad = {n: e for n, e in errors.items() if not e <= budget}
            status = "ok" if not bad else "FAIL " + " ".join(f"{n}={e:.1e}" for n, e in bad.items())
            worst = max(errors.values(), key=lambda e: float("inf") if e != e else e)
        except Exception as exc:  # report and go on: one line per call
            bad, worst, status = True, float("nan"), f"ERROR {type(exc).__name__}: {exc}"[:300]
        failures += bool(bad)
        print(f"{args.backend:6} {label:44} worst {worst:.1e}  {status}", flush=True)
    print(f"{failures} failing call(s) of backend {args.backend!r} on {device.type} ({args.dtype}, budget {budget:g})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
