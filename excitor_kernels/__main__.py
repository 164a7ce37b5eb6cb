"""``python -m excitor_kernels``: an environment report to read, and to paste into a bug report.

Prints the versions that matter (Python, torch, triton, transformers, CUDA, cuDNN, the driver), the GPU and its
architecture, each backend and why it is not available when it is not (the dispatcher's own reasons), the state
of the CUDA extension (built ahead of time, cached, or built on first use), then runs a self-check of every
available backend against the float64 reference (both operators, forward and every gradient, a small case)
and ends with one line that sums it all up. Exit status 1 when a self-check fails.

Without a GPU the Triton kernels run interpreted, which needs ``TRITON_INTERPRET=1`` before triton is imported:
the report then runs the checks of the Triton-based backends (triton, and sdpa with its Triton prompt passes)
in a child process with it set, in parallel with the rest. Under 10 s
on a 2-core CPU.

``python -m excitor_kernels --self-check BACKEND[,BACKEND...]`` runs those checks and prints one JSON line each
(used for that child process).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

import torch

from . import __version__, _cuda, _dispatch
from ._validate import check_inputs
from .ops import adapter_attention, excitor_attention
from .reference import ERROR_BUDGET, adapter_attention_reference, excitor_attention_reference

CASE = dict(B=1, Hq=2, Hkv=1, M=20, N=20, d=64, P=4)  # GQA, small: seconds when interpreted
BACKENDS = tuple(b for b in _dispatch.BACKENDS if b != "auto")
ON_TRITON = tuple(b for b in BACKENDS if b not in ("reference", "cuda", "torch"))  # Triton kernels (sdpa: its prompt passes)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "none (no nvidia-smi)"
    lines = out.stdout.strip().splitlines()
    return lines[0] if out.returncode == 0 and lines else "unknown"


def _gpus() -> list[str]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append(f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    return gpus


def _case_dtype(backend: str, device: torch.device) -> torch.dtype:
    if backend == "cuda" or (backend == "triton" and device.type == "cuda"):
        return torch.bfloat16  # what training runs in; the CUDA kernels take fp16/bf16 only
    return torch.float32


def _inputs(op: str, dtype: torch.dtype, device: torch.device) -> dict:
    c = CASE
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x = dict(q=randn(c["B"], c["Hq"], c["M"], c["d"]), k=randn(c["B"], c["Hkv"], c["N"], c["d"]),
             v=randn(c["B"], c["Hkv"], c["N"], c["d"]), prompt_keys=randn(c["Hkv"], c["P"], c["d"]))
    if op == "adapter":
        x["prompt_values"] = randn(c["Hkv"], c["P"], c["d"])
    x["gate"] = (torch.rand(c["Hq"], generator=g) * 2 - 1).to(device)
    return x


def _attend(op: str, x: dict, backend: str | None):
    args = (x["q"], x["k"], x["v"], x["prompt_keys"]) + ((x["prompt_values"],) if op == "adapter" else ())
    if backend is None:  # the formulas themselves, in float64
        scale = CASE["d"] ** -0.5
        if op == "adapter":
            return adapter_attention_reference(*args, x["gate"], softmax_scale=scale)
        return excitor_attention_reference(*args, x["gate"], softmax_scale=scale, prompt_scale=scale)
    fn = adapter_attention if op == "adapter" else excitor_attention
    return fn(*args, x["gate"], backend=backend)


def _problem(device: torch.device, dtype: torch.dtype, op: str = "excitor"):
    x = _inputs(op, dtype, device)
    return check_inputs(x["q"], x["k"], x["v"], x["prompt_keys"], x["gate"], prompt_values=x.get("prompt_values"),
                        needs_prompt_values=op == "adapter")


def why_unavailable(backend: str, device: torch.device, op: str = "excitor") -> str | None:
    """The dispatcher's reason why ``backend`` cannot run the self-check case of ``op`` on ``device``."""
    if backend == "reference":
        return None
    why = _dispatch.unsupported(backend, f"{op}_attention", _problem(device, _case_dtype(backend, device), op),
                                explicit=True)
    build = _cuda.cannot_build() if backend == "cuda" else None
    return why if why is None or build is None or build in why else f"{why}; the extension: {build}"


def self_check(backend: str) -> dict:
    """Both operators (those ``backend`` runs) on ``backend``: the worst relative error of o and every gradient
    against float64."""
    device = torch.device("cuda" if backend != "reference" and torch.cuda.is_available() else "cpu")
    dtype = _case_dtype(backend, device)
    start, worst = time.perf_counter(), {}
    for op in ("excitor", "adapter"):
        if op == "adapter" and why_unavailable(backend, device, op) is not None:
            continue  # e.g. sdpa_concat: the Excitor keys' rewrite only
        x = {n: t.requires_grad_(True) for n, t in _inputs(op, dtype, device).items()}
        do = torch.randn(x["q"].shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        try:
            o = _attend(op, x, backend)
            grads = torch.autograd.grad(o, list(x.values()), do)
        except Exception as exc:  # a report reports: the failing backend, not a traceback
            return dict(backend=backend, ok=False, error=f"{op}: {type(exc).__name__}: {exc}")
        x64 = {n: t.detach().double().cpu().requires_grad_(True) for n, t in x.items()}
        o64 = _attend(op, x64, None)
        grads64 = torch.autograd.grad(o64, list(x64.values()), do.double().cpu())
        errors = {"o": (o, o64), **{f"d{n}": pair for n, pair in zip(x, zip(grads, grads64))}}
        errs = {n: ((a.double().cpu() - b).norm() / b.norm()).item() for n, (a, b) in errors.items()}
        name, err = max(errs.items(), key=lambda kv: kv[1] if kv[1] == kv[1] else float("inf"))
        worst[op] = (name, err)
    budget = ERROR_BUDGET[dtype]
    ok = all(e <= budget for _, e in worst.values())  # NaN fails
    return dict(backend=backend, device=device.type, dtype=str(dtype).replace("torch.", ""), ok=ok,
                budget=budget, worst={op: [n, e] for op, (n, e) in worst.items()},
                seconds=round(time.perf_counter() - start, 2),
                interpreted=_dispatch.triton_interpreted() and backend in ON_TRITON)


def _interpreted_in_child() -> subprocess.Popen:
    """The Triton-based backends' checks in a child process with TRITON_INTERPRET=1 (no GPU here)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.Popen([sys.executable, "-m", "excitor_kernels", "--self-check", ",".join(ON_TRITON)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _from_child(child: subprocess.Popen) -> tuple[dict, list]:
    """({backend: reason it cannot run} and [self-check results]) from the child's JSON lines."""
    out, err = child.communicate(timeout=600)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if not lines:
        error = (err.strip().splitlines() or ["no output"])[-1]
        return {}, [dict(backend=b, ok=False, error=error) for b in ON_TRITON]
    reasons = {r["backend"]: r["unavailable"] for r in lines if "unavailable" in r}
    return reasons, [r for r in lines if "unavailable" not in r]


def _describe(result: dict) -> str:
    if "error" in result:
        return f"ERROR {result['error']}"
    worst = ", ".join(f"{op} {n} {e:.1e}" for op, (n, e) in result["worst"].items())
    where = f"{result['device']}{', interpreted' if result.get('interpreted') else ''}"
    verdict = "ok" if result["ok"] else f"FAIL (budget {result['budget']:g})"
    return f"{verdict}  {result['dtype']} on {where}, worst error {worst}  ({result['seconds']:.1f} s)"


def report() -> int:
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    # Triton without a GPU: interpreted, which needs TRITON_INTERPRET=1 before triton is imported.
    child = None
    if not gpu and not _dispatch.triton_interpreted():
        child = _interpreted_in_child()

    gpus = _gpus()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    print(f"excitor-kernels {__version__} environment report")
    rows = [
        ("python", f"{platform.python_version()} ({platform.system()} {platform.machine()})"),
        ("torch", torch.__version__),
        ("triton", _version("triton")),
        ("transformers", _version("transformers")),
        ("CUDA (torch)", torch.version.cuda or "none (CPU build of torch)"),
        ("cuDNN", str(cudnn) if cudnn else "none"),
        ("driver", _driver()),
        ("GPU", "; ".join(gpus) if gpus else "none visible"),
        ("CUDA extension", _cuda.status()),
    ]
    for name, value in rows:
        print(f"  {name:15} {value}")

    in_child = ON_TRITON if child is not None else ()
    reasons = {name: None if name in in_child else why_unavailable(name, device) for name in BACKENDS}
    results = [self_check(name) for name, why in reasons.items() if why is None and name not in in_child]
    if child is not None:
        child_reasons, child_results = _from_child(child)
        reasons.update(child_reasons)
        results += child_results
    results.sort(key=lambda r: BACKENDS.index(r["backend"]))

    print("backends (backend='auto' chooses among the O(N) ones per call: torch where no fused one runs; the reference "
          "for float64)")
    for name, why in reasons.items():
        note = "available" if why is None else f"unavailable: {why}"
        if why is None and name in in_child:
            note = "available on the CPU only interpreted (TRITON_INTERPRET=1), for testing"
        print(f"  {name:15} {note}")

    print(f"self-check against the float64 formulas (o and every gradient, "
          f"B={CASE['B']} Hq={CASE['Hq']} Hkv={CASE['Hkv']} M=N={CASE['M']} d={CASE['d']} P={CASE['P']})")
    for r in results:
        print(f"  {r['backend']:15} {_describe(r)}")

    ok = bool(results) and all(r["ok"] for r in results)
    checked = ", ".join(f"{r['backend']} {'ok' if r['ok'] else 'FAIL'}" for r in results)
    skipped = ", ".join(n for n, why in reasons.items() if why is not None)
    print(f"excitor-kernels {__version__} | torch {torch.__version__} | triton {_version('triton')} | "
          f"transformers {_version('transformers')} | CUDA {torch.version.cuda or '-'} | "
          f"GPU {gpus[0] if gpus else '-'} | self-check: {checked}{f' ({skipped} unavailable)' if skipped else ''}"
          f" | {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m excitor_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--self-check", metavar="BACKEND[,BACKEND...]",
                        help="run these backends' self-checks, one JSON line each (or why a backend cannot run)")
    args = parser.parse_args(argv)
    if args.self_check:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for name in args.self_check.split(","):
            why = why_unavailable(name, device)
            print(json.dumps(dict(backend=name, unavailable=why) if why else self_check(name)), flush=True)
        return 0
    return report()


if __name__ == "__main__":
    sys.exit(main())
