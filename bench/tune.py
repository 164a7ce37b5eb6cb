"""``python -m bench.tune``: measure which backend is fastest per kind of call and write ``backend="auto"``'s table.

On a GPU: for every case of the grid (operator x inference/training x dtype x head dim x GQA ratio x sequence
length; 16k tokens per case, 32 query heads, 30 prompts, causal, ``M == N``) every backend that supports it
(cuda, triton, sdpa, sdpa_concat) is timed, the median of 10 calls after a warm-up on CUDA events
(``bench.timing``): inference is the forward under ``torch.no_grad()``, training the forward and the backward
of every input. SDPA runs the kernel PyTorch picks for it, as in a user's call. The results are merged into
``excitor_kernels/auto_table.json`` (format: ``excitor_kernels._tuning``) under the GPU's architecture, or
into ``--out``. A backend that cannot run a case, or runs out of memory, gets ``null``.

Each run merges into the existing table, so ``--op`` / ``--dtype`` split the full grid over several commands.
``--quick`` trims the grid to bf16, d=128, GQA 1 and 4, N 1k/4k/16k (a few minutes). ``--smoke`` runs tiny
float32 cases on the CPU with Triton interpreted, recorded under the architecture "cpu" into ``--out``
(required): it checks the machinery, and its times say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # triton reads it when the kernels are decorated, so before the package
    os.environ.setdefault("TRITON_INTERPRET", "1")

from excitor_kernels import _dispatch, _tuning  # noqa: E402
from excitor_kernels._validate import check_inputs  # noqa: E402

from . import timing  # noqa: E402
from .cases import Case  # noqa: E402
from .providers import PROVIDERS, make_inputs  # noqa: E402
from .steps import make_step  # noqa: E402

CANDIDATES = ("cuda", "triton", "sdpa", "sdpa_concat")
OURS = {"cuda": "cuda", "triton": "triton", "sdpa": "ours_sdpa", "sdpa_concat": "ours_sdpa_concat"}  # bench providers
TOKENS, HEADS, PROMPTS = 16 * 1024, 32, 30


def grid(quick: bool, smoke: bool) -> list[dict]:
    """The measured cases, as ``_tuning.case_of`` describes calls (``seq`` = M = N)."""
    if smoke:
        axes = dict(dtype=["fp32"], head_dim=[16], gqa=[2], seq=[24])
    elif quick:
        axes = dict(dtype=["bf16"], head_dim=[128], gqa=[1, 4], seq=[1024, 4096, 16384])
    else:
        axes = dict(dtype=["bf16", "fp16"], head_dim=[64, 128], gqa=[1, 4, 8],
                    seq=[512, 1024, 2048, 4096, 8192, 16384])
    return [dict(op=op, mode=mode, dtype=dt, head_dim=d, gqa=g, seq=n)
            for op, mode, dt, d, g, n in itertools.product(("excitor", "adapter"), ("inference", "training"),
                                                           axes["dtype"], axes["head_dim"], axes["gqa"], axes["seq"])]


def _bench_case(case: dict, smoke: bool) -> Case:
    """The benchmark's description of a grid case (``bench.cases.Case``; causal, ``M == N``)."""
    heads = 4 if smoke else HEADS
    return Case(case["op"], "fwd" if case["mode"] == "inference" else "fwd+bwd", case["dtype"], case["head_dim"],
                True, 1 if smoke else max(1, TOKENS // case["seq"]), case["seq"], heads, heads // case["gqa"],
                4 if smoke else PROMPTS)


def measure(case: dict, device, smoke: bool) -> dict:
    """Median ms per candidate backend on ``case`` (None where it cannot run or runs out of memory)."""
    c = _bench_case(case, smoke)
    x = make_inputs(c, device, requires_grad=c.pass_ != "fwd")
    with torch.set_grad_enabled(c.pass_ != "fwd"):
        p = check_inputs(x["q"], x["k"], x["v"], x["pk"], x["gate"], prompt_values=x["pv"] if c.op == "adapter" else None,
                         needs_prompt_values=c.op == "adapter")
    ms = {}
    for backend in CANDIDATES:
        if _dispatch.unsupported(backend, f"{c.op}_attention", p, explicit=True) or _dispatch.redundant(backend, p):
            ms[backend] = None
            continue
        call = functools.partial(PROVIDERS[OURS[backend]][c.op], x, c.causal, c.head_dim ** -0.5)
        step = make_step(call, x, c.pass_)
        try:
            ms[backend] = round(timing.median_ms(step, reps=1 if smoke else 10), 4)
        except torch.cuda.OutOfMemoryError:
            ms[backend] = None
        step = None
        timing.free_memory()
    return ms


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="bf16, d=128, GQA 1/4, N 1k/4k/16k")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU cases (interpreted Triton) into --out")
    parser.add_argument("--out", help=f"table to merge into (default {_tuning.TABLE_PATH})")
    parser.add_argument("--op", choices=("excitor", "adapter"), help="measure one operator only")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), help="measure one dtype only")
    args = parser.parse_args(argv)
    if args.smoke and not args.out:
        parser.error("--smoke writes CPU times, never into the shipped table: give --out")
    if not args.smoke and not torch.cuda.is_available():
        print("bench.tune measures on a CUDA GPU and none is present (--smoke checks the machinery on the CPU)",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    gpu = "cpu" if args.smoke else _tuning.arch(device)
    info = dict(device="cpu" if args.smoke else torch.cuda.get_device_name(device), torch=torch.__version__,
                triton=__import__("triton").__version__, date=datetime.date.today().isoformat())
    out = Path(args.out) if args.out else _tuning.TABLE_PATH
    for case in grid(args.quick, args.smoke):
        if (args.op or case["op"]) != case["op"] or (args.dtype or case["dtype"]) != case["dtype"]:
            continue
        entry = dict(case, ms=measure(case, device, args.smoke))
        print(entry, flush=True)
        _tuning.write(_tuning.merge(_tuning.load_file(out), gpu, info, [entry]), out)  # a cut-off run keeps its cases
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
