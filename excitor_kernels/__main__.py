"""``python -m excitor_kernels``: an environment report to read, and to paste into a bug report.

Prints the versions that matter (Python, torch, triton, transformers, CUDA, cuDNN, the driver), the GPU and its
architecture, each backend and why it is not available when it is not (the dispatcher's own reasons), the state
of the CUDA extension (built ahead of time, cached, or built on first use), then runs a self-check of every
available backend against the float64 reference (both operators, forward and every gradient, a small case)
and ends with one line that sums it all up. Exit status 1 when a self-check fails.

Without a GPU the Triton kernels run interpreted, which needs ``TRITON_INTERPRET=1`` before triton is imported:
the report then runs the Triton check in a child process with it set (in parallel with the rest). Under 10 s
on a 2-core CPU.

``python -m excitor_kernels --self-check BACKEND`` runs one backend's check and prints it as JSON (used for
that child process).
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
from .reference import adapter_attention_reference, excitor_attention_reference

# docs/contract.md: ||out - ref|| / ||ref|| against float64
BUDGET = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}
CASE = dict(B=1, Hq=2, Hkv=1, M=20, N=20, d=64, P=4)  # GQA-free, small: seconds when interpreted


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


def _problem(device: torch.device, dtype: torch.dtype):
    x = _inputs("excitor", dtype, device)
    return check_inputs(x["q"], x["k"], x["v"], x["prompt_keys"], x["gate"])


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """The dispatcher's reason why ``backend`` cannot run the self-check case on ``device`` (None: it can)."""
    p = _problem(device, _case_dtype(backend, device))
    if backend == "triton":
        return _dispatch.triton_unsupported("excitor_attention", p, explicit=True)
    if backend == "cuda":
        why = _dispatch.cuda_unsupported("excitor_attention", p, explicit=True)
        build = _cuda.cannot_build()
        return why if why is None or build is None or build in why else f"{why}; the extension: {build}"
    return None


def self_check(backend: str) -> dict:
    """Both operators on ``backend``: the worst relative error of o and every gradient against float64."""
    device = torch.device("cuda" if backend != "reference" and torch.cuda.is_available() else "cpu")
    dtype = _case_dtype(backend, device)
    start, worst = time.perf_counter(), {}
    for op in ("excitor", "adapter"):
        x = {n: t.requires_grad_(True) for n, t in _inputs(op, dtype, device).items()}
        do = torch.randn(x["q"].shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        o = _attend(op, x, backend)
        grads = torch.autograd.grad(o, list(x.values()), do)
        x64 = {n: t.detach().double().cpu().requires_grad_(True) for n, t in x.items()}
        o64 = _attend(op, x64, None)
        grads64 = torch.autograd.grad(o64, list(x64.values()), do.double().cpu())
        errors = {"o": (o, o64), **{f"d{n}": pair for n, pair in zip(x, zip(grads, grads64))}}
        errs = {n: ((a.double().cpu() - b).norm() / b.norm()).item() for n, (a, b) in errors.items()}
        name, err = max(errs.items(), key=lambda kv: kv[1] if kv[1] == kv[1] else float("inf"))
        worst[op] = (name, err)
    budget = BUDGET[dtype]
    ok = all(e <= budget for _, e in worst.values())  # NaN fails
    return dict(backend=backend, device=device.type, dtype=str(dtype).replace("torch.", ""), ok=ok,
                budget=budget, worst={op: [n, e] for op, (n, e) in worst.items()},
                seconds=round(time.perf_counter() - start, 2),
                interpreted=_dispatch.triton_interpreted() if backend == "triton" else False)


def _triton_in_child() -> subprocess.Popen:
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.Popen([sys.executable, "-m", "excitor_kernels", "--self-check", "triton"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _from_child(child: subprocess.Popen) -> dict:
    out, err = child.communicate(timeout=600)
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return dict(backend="triton", ok=False, error=(err.strip().splitlines() or ["no output"])[-1])


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
    triton_reason = why_unavailable("triton", device)
    if not gpu and not _dispatch.triton_interpreted() and _dispatch._triton_importable():
        child, triton_reason = _triton_in_child(), None

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

    reasons = {"reference": None, "triton": triton_reason, "cuda": why_unavailable("cuda", device)}
    print("backends (what backend='auto' picks: cuda, then triton, on CUDA tensors; else the reference)")
    for name, why in reasons.items():
        note = "available" if why is None else f"unavailable: {why}"
        if name == "triton" and why is None and not gpu:
            note = "available on the CPU only interpreted (TRITON_INTERPRET=1), for testing"
        print(f"  {name:15} {note}")

    print(f"self-check against the float64 formulas (excitor and adapter, o and every gradient, "
          f"B={CASE['B']} H={CASE['Hq']} M=N={CASE['M']} d={CASE['d']} P={CASE['P']})")
    results = [self_check(name) for name, why in reasons.items() if why is None and name != "triton" or
               (name == "triton" and why is None and child is None)]
    if child is not None:
        results.append(_from_child(child))
    for r in results:
        print(f"  {r['backend']:15} {_describe(r)}")

    ok = all(r["ok"] for r in results)
    checked = ", ".join(f"{r['backend']} {'ok' if r['ok'] else 'FAIL'}" for r in results)
    skipped = ", ".join(n for n, why in reasons.items() if why is not None)
    print(f"excitor-kernels {__version__} | torch {torch.__version__} | triton {_version('triton')} | "
          f"transformers {_version('transformers')} | CUDA {torch.version.cuda or '-'} | "
          f"GPU {gpus[0] if gpus else '-'} | self-check: {checked}{f' ({skipped} unavailable)' if skipped else ''}"
          f" | {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m excitor_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--self-check", choices=("reference", "triton", "cuda"),
                        help="run one backend's self-check and print it as one JSON line")
    args = parser.parse_args(argv)
    if args.self_check:
        print(json.dumps(self_check(args.self_check)))
        return 0
    return report()


if __name__ == "__main__":
    sys.exit(main())
