"""CPU benchmark of ``backend="torch"`` against plain SDPA (a benchmark, not a timed test).

``python -m bench.cpu_torch [--seq 4096] [--reps 5] [--json PATH]``: B = 1, H = 8, d = 64, P = 10, causal, float32,
forward (and forward+backward), one fresh subprocess per (provider, pass) so that each peak is its own:

* time: median of ``--reps`` calls after one warm-up call;
* peak memory: the growth of the process's peak resident set over one call, the first one in that process
  (``/proc/self/clear_refs`` resets the peak, ``VmHWM`` in ``/proc/self/status`` reads it), beyond the inputs.
  The first call also pays one-time allocations (thread pools), which plain SDPA pays the same way.

Providers: ``sdpa`` (plain attention on the same q, k, v: the target), ``torch`` (``excitor_attention`` and
``adapter_attention`` with ``backend="torch"``), ``composition`` (keys rebuilt with torch ops, then SDPA, the issue's
comparison), ``reference`` (the quadratic oracle, forward only). Writes ``bench/results/cpu-torch-<date>.json``; the
figures go to BENCHMARKS.md ("CPU: the torch backend") by hand. The targets (issue 25): torch forward within 1.5x of
plain SDPA's time and 3x its peak memory at N = 4096.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASE = dict(batch=1, heads=8, head_dim=64, prompts=10, causal=True, dtype="fp32")
PROVIDERS = {"sdpa": ("plain",), "torch": ("excitor", "adapter"), "composition": ("excitor", "adapter"),
             "reference": ("excitor", "adapter")}


def _rss_peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(provider: str, op: str, pass_: str, seq: int, reps: int) -> dict:
    """Runs in the child process: peak MiB of the first call, then the median ms of ``reps`` calls."""
    import torch
    import torch.nn.functional as F

    import excitor_kernels
    from bench import baselines

    torch.manual_seed(0)
    B, H, d, P = CASE["batch"], CASE["heads"], CASE["head_dim"], CASE["prompts"]
    grad = pass_ == "fwd+bwd"
    q, k, v = (torch.randn(B, H, seq, d, requires_grad=grad) for _ in range(3))
    pk, pv = (torch.randn(H, P, d, requires_grad=grad) for _ in range(2))
    gate = (torch.rand(H) - 0.5).requires_grad_(grad)
    scale = d ** -0.5

    def forward():
        if provider == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        if provider == "composition":
            if op == "excitor":
                return baselines.excitor_composition(q, k, v, pk, gate, causal=True, scale=scale)
            return baselines.adapter_composition(q, k, v, pk, pv, gate, causal=True, scale=scale)
        if op == "excitor":
            return excitor_kernels.excitor_attention(q, k, v, pk, gate, backend=provider)
        return excitor_kernels.adapter_attention(q, k, v, pk, pv, gate, backend=provider)

    do = torch.randn(B, H, seq, d)

    def step():
        with torch.set_grad_enabled(grad):
            o = forward()
            if grad:
                torch.autograd.grad(o, [q, k, v, pk, gate] if provider != "sdpa" else [q, k, v], do)

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set to the current one
    before = _rss_kib()
    step()
    peak_mib = (_rss_peak_kib() - before) / 1024
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return dict(provider=provider, op=op, pass_=pass_, seq=seq, ms=sorted(times)[len(times) // 2] * 1e3,
                peak_mib=peak_mib, threads=torch.get_num_threads())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--passes", default="fwd,fwd+bwd")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--note", default="", help="a remark on the machine, kept in the results file")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # provider op pass
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child, seq=args.seq, reps=args.reps)))
        return 0
    rows = []
    for pass_ in args.passes.split(","):
        for provider in args.providers.split(","):
            if provider == "reference" and pass_ != "fwd":
                continue  # quadratic: the forward shows it
            for op in PROVIDERS[provider]:
                run = subprocess.run([sys.executable, "-m", "bench.cpu_torch", "--seq", str(args.seq), "--reps",
                                      str(args.reps), "--child", provider, op, pass_], cwd=ROOT, capture_output=True,
                                     text=True)
                if run.returncode != 0:
                    raise SystemExit(run.stderr[-3000:])
                rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"{pass_:8s} {provider:12s} {op:8s} N={args.seq}: {r['ms']:9.1f} ms  {r['peak_mib']:8.1f} MiB",
                      flush=True)
    import torch

    date = datetime.date.today().isoformat()
    out = args.json or ROOT / "bench" / "results" / f"cpu-torch-{date}.json"
    env = dict(date=date, device=f"CPU ({platform.machine()})", torch=torch.__version__, python=platform.python_version(),
               threads=rows[0]["threads"] if rows else None, case=dict(CASE, seq=args.seq), reps=args.reps,
               note=args.note)
    data = dict(environment=env, results=rows)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print("\n".join(markdown(data)))
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}; python -m bench.report puts the "
          f"newest such file in BENCHMARKS.md")
    return 0


def latest() -> dict | None:
    """The newest ``bench/results/cpu-torch-<date>.json``, or None."""
    files = sorted((ROOT / "bench" / "results").glob("cpu-torch-*.json"))
    return json.loads(files[-1].read_text()) if files else None


def markdown(data: dict) -> list[str]:
    """BENCHMARKS.md's section of one results file: each provider against plain SDPA's time and peak."""
    env, rows = data["environment"], data["results"]
    c = env["case"]
    base = {r["pass_"]: r for r in rows if r["provider"] == "sdpa"}
    lines = ["", f"## CPU: the torch backend ({env['device']}, {env['threads']} threads), {env['date']}", "",
             f"`python -m bench.cpu_torch`: B = {c['batch']}, H = {c['heads']}, d = {c['head_dim']}, "
             f"P = {c['prompts']}, causal, {c['dtype']}, N = {c['seq']}; median of {env['reps']} calls; peak = growth "
             f"of the peak resident set over the first call in a fresh process, inputs excluded. Targets (issue 25): "
             f"torch forward <= 1.5x plain SDPA's time and <= 3x its peak." + (f" {env['note']}" if env.get("note") else ""),
             "",
             "| pass | provider | op | ms | x SDPA time | peak MiB | x SDPA peak |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base[r["pass_"]]
        lines.append(f"| {r['pass_']} | {r['provider']} | {r['op']} | {r['ms']:.0f} | {r['ms'] / b['ms']:.2f} | "
                     f"{r['peak_mib']:.1f} | {r['peak_mib'] / b['peak_mib']:.2f} |")
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
