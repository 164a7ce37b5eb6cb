"""Rank the attention kernels' configurations (excitor_kernels/ops/_triton_tuning.py): ``python -m bench.rank_configs``.

On a GPU: for each kernel (``fwd``, ``dkdv``, ``dq``) and operator, every configuration of ``CANDIDATES`` that
the inputs allow (tensor descriptors only on sm_90+) is forced in turn and the operator's forward (``fwd``)
or backward (``dkdv``, ``dq``; the other backward kernel at its fixed tiles) is timed with
``triton.testing.do_bench``; prints milliseconds, fastest first. ``--warp-spec`` also tries every
configuration with ``WARP_SPEC=True`` (most do not compile with triton 3.9); a configuration that fails to
compile is printed with its error. Options (defaults): ``--seq 4096 --batch 2 --heads 16 --kv-heads 16
--head-dim 128 --dtype bf16 --prompts 30 --ops excitor,adapter``.

``--static`` (no GPU needed): compiles every candidate for sm_90 (bf16, d = 128, causal, padded; Excitor and
Adapter) and prints registers, spill bytes and shared memory (``--json``: one JSON line each), exit status
1 when one spills or exceeds the shared memory limit.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

OPS = {"excitor": 1, "adapter": 2}


def static(as_json: bool) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("bench.rank_configs --static: run without TRITON_INTERPRET=1")
    from bench import static as cost
    from excitor_kernels.ops import _triton_attention as tri
    from excitor_kernels.ops._triton_tuning import CANDIDATES, candidates

    kernels = {"fwd": tri.attention_fwd_kernel, "dkdv": tri.attention_bwd_dkdv_kernel,
               "dq": tri.attention_bwd_dq_kernel}
    flags = dict(cost.shape_flags(128, "bf16"), CAUSAL=True, VARLEN=False, ACCUMULATE=True, POS_SCALE=True)
    failed = 0
    for name in CANDIDATES:
        for op, bypass in OPS.items():
            for config in candidates(name, bypass):
                row = dict(kernel=name, op=op, **config)
                # the dk/dv launches of GQA groups and of the Excitor add into float32 sums
                j = cost.job(kernels[name], config, dict(flags, BYPASS=bypass),
                             types={"DK": "*fp32", "DV": "*fp32"} if name == "dkdv" else None)
                j.update(cc=90, dtype="bf16", key=f"rank/sm90/bf16/d128/{name}/{op}/{_label(config)}",
                         config=dict(cc=90, dtype="bf16", d=128, kernel=name, op=op, **config))
                r = cost.compile_triton(j)
                if "error" in r:
                    row["error"] = r["error"][:500]
                    bad = True
                else:
                    row.update(registers=r["registers"], spill_stores=r["spill_stores"], spill_loads=r["spill_loads"],
                               shared=r["shared"], limit=r["shared_limit"])
                    bad = row["spill_stores"] or row["spill_loads"] or row["shared"] > row["limit"]
                failed += bool(bad)
                print(json.dumps(row) if as_json else
                      f"{name:5s} {op:8s} {_label(config):28s} " + (row.get("error") or
                      f"regs {row['registers']:3d} spills {row['spill_stores']}/{row['spill_loads']} "
                      f"shared {row['shared']}/{row['limit']}"), flush=True)
    return 1 if failed else 0


def _label(config: dict) -> str:
    return (f"{config['BLOCK_M']}x{config['BLOCK_N']} w{config['num_warps']} s{config['num_stages']}"
            f"{' desc' if config['DESC'] else ''}{' ws' if config['WARP_SPEC'] else ''}"
            f"{' tc-rowsum' if config.get('TC_ROW_SUM') else ''}")


def rank(args) -> None:
    import torch
    import triton

    if not torch.cuda.is_available():
        sys.exit("bench.rank_configs: no CUDA GPU here; the ranking times kernels on one "
                 "(python -m bench.rank_configs --static compiles them without one)")
    os.environ["EXCITOR_TRITON_AUTOTUNE"] = "0"  # the kernels not being ranked run their fixed tiles
    from excitor_kernels import adapter_attention, excitor_attention
    from excitor_kernels.ops import _triton_tuning as tuning

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    B, H, Hkv, L, d, P = args.batch, args.heads, args.kv_heads, args.seq, args.head_dim, args.prompts
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}, torch {torch.__version__}; "
          f"B={B} H={H}/{Hkv} L={L} d={d} P={P} {args.dtype} causal")
    for op in args.ops.split(","):
        g = torch.Generator(device="cuda").manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32).to(dtype).requires_grad_()

        q, k, v, pk, pv = rand(B, H, L, d), rand(B, Hkv, L, d), rand(B, Hkv, L, d), rand(Hkv, P, d), rand(Hkv, P, d)
        gate = (torch.rand(H, device="cuda") - 0.5).requires_grad_()
        if op == "excitor":
            forward = lambda: excitor_attention(q, k, v, pk, gate, causal=True, backend="triton")  # noqa: E731
        else:
            forward = lambda: adapter_attention(q, k, v, pk, pv, gate, causal=True, backend="triton")  # noqa: E731
        o = forward()
        do = torch.randn_like(o)
        inputs = [q, k, v, pk, gate] + ([pv] if op == "adapter" else [])
        desc_ok = tuning.descriptors_ok(q, k, v)
        for name in tuning.CANDIDATES:
            configs = tuning.candidates(name, OPS[op], desc_ok)
            default = configs[0]
            if args.warp_spec:
                configs += [dict(c, WARP_SPEC=True) for c in configs if not c["WARP_SPEC"]]

            def prepare(config, name=name):
                def step():
                    with tuning.forced(**{name: config}):
                        if name == "fwd":
                            with torch.no_grad():
                                forward()
                        else:
                            torch.autograd.grad(o, inputs, do, retain_graph=True)
                return step

            timed = []
            for config in configs:
                try:
                    timed.append((triton.testing.do_bench(prepare(config), warmup=10, rep=50), config))
                except Exception as exc:  # noqa: BLE001 - printed, the others still ranked
                    print(f"  {op} {name} {_label(config)}: failed: {type(exc).__name__}: {str(exc)[:200]}")
            timed.sort(key=lambda t: t[0])
            what = "forward" if name == "fwd" else "backward"
            print(f"{op} {name} ({what} time, ms; default = blocks()'s fixed tiles):")
            for ms, config in timed:
                print(f"  {ms:8.3f}  {_label(config)}{'  (default)' if config is default else ''}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--static", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--warp-spec", action="store_true")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--ops", default="excitor,adapter")
    args = parser.parse_args()
    if args.static:
        sys.exit(static(args.json))
    rank(args)


if __name__ == "__main__":
    main()
