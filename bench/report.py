"""Results files and the report built from them.

``write_run`` merges one pytest session's results into ``bench/results/<device>-<date>.json``
(results keyed by what was measured, so re-running or splitting a sweep over several commands on one
day fills one file). ``regenerate`` rebuilds ``BENCHMARKS.md`` from every timed results file there, draws a
TFLOP/s-against-N plot per file, and appends the static cost report of the newest
``bench/results/static-<date>.json`` (``bench.static``). ``python -m bench.report`` runs ``regenerate`` alone.
"""
from __future__ import annotations

import collections
import datetime
import itertools
import json
from pathlib import Path

from . import cpu_torch, static
from .providers import PLAIN_SDPA

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
MD_PATH = ROOT / "BENCHMARKS.md"
HEADLINE = dict(dtype="bf16", head_dim=128, causal=True, prompts=10)  # the configuration the plot prefers

TARGETS = (  # (target, where it is checked); the GPU issue's targets first, then the earlier ones
    ("Excitor forward, triton >= 0.85x SDPA-best", "excitor fwd, every GPU case"),
    ("Excitor forward, cuda >= 0.95x SDPA-best", "excitor fwd, every GPU case"),
    ("forward+backward >= 1.1x the composition", "fwd+bwd, both operators, triton and cuda, every GPU case"),
    ("decode within 10% of SDPA decode (x SDPA >= 0.91)", "triton, every decode case, both operators"),
    (">= 10x the eager implementations", "triton, every pass at N = 4k"),
    ("Triton forward >= 60% of the measured matmul rate", "bf16, d = 128, causal, N >= 4k"),
)


# ---------------------------------------------------------------- results files

def write_run(records: list[dict], env: dict, options: dict) -> Path:
    """Merge ``records`` into today's file for this device; return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{env['slug']}-{env['date']}.json"
    data = json.loads(path.read_text()) if path.exists() else dict(runs=[], results={})
    data["environment"] = env
    finished = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    data["runs"].append(dict(options, finished=finished, results=len(records)))
    for r in records:
        data["results"][r["key"]] = r
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


def load_all() -> list[tuple[Path, dict]]:
    """Every timed results file, GPU runs first, newest first within each kind (static-*.json, the static
    cost report of ``bench.static``, has its own section)."""
    files = [(p, json.loads(p.read_text())) for p in RESULTS_DIR.glob("*.json")
             if not p.name.startswith(("static-", "cpu-torch-"))]  # those two have their own sections
    files.sort(key=lambda f: f[1]["environment"]["date"], reverse=True)
    files.sort(key=lambda f: f[1]["environment"]["run_type"] != "gpu")
    return files


# ---------------------------------------------------------------- derived figures

def _config(case: dict) -> tuple:
    return (case["op"], case["pass"], case["dtype"], case["head_dim"], case["causal"], case["heads"],
            case["kv_heads"], case["prompts"], case["seq"], case["batch"])


def _by_case(results: dict) -> dict:
    """config tuple -> provider -> record, for attention results."""
    table = collections.defaultdict(dict)
    for r in results.values():
        if r["kind"] == "attention":
            table[_config(r["case"])][r["provider"]] = r
    return table


def _matmul_tflops(results: dict) -> float | None:
    r = results.get("ceiling/matmul")
    return r["tflops"] if r else None


def _sdpa_best(rows: dict) -> dict | None:
    """The fastest plain-SDPA record of one case (over the SDPA kernels timed one by one), or None."""
    timed = [rows[n] for n in PLAIN_SDPA if n in rows and rows[n]["status"] == "ok"]
    return min(timed, key=lambda r: r["ms"]) if timed else None


def _speedup(rows: dict, provider: str, other: str) -> float | None:
    """How many times faster ``provider`` is than ``other`` on one case (other's ms / provider's ms);
    ``other="sdpa-best"``: the fastest plain SDPA kernel."""
    a = rows.get(provider)
    b = _sdpa_best(rows) if other == "sdpa-best" else rows.get(other)
    if a and b and a["status"] == "ok" and b["status"] == "ok":
        return b["ms"] / a["ms"]
    return None


def target_status(gpu_files: list[dict]) -> list[str]:
    """One status string per target of ``TARGETS``, from the GPU results ("not yet measured" without any)."""
    checks = [[] for _ in TARGETS]  # (value, threshold, case label) per target
    for data in gpu_files:
        results = data["results"]
        matmul = _matmul_tflops(results)
        for cfg, rows in _by_case(results).items():
            op, pass_, dtype, d, causal, _, _, _, seq, _ = cfg
            label = "/".join(str(c) for c in cfg)
            if op == "excitor" and pass_ == "fwd":
                for i, name, bar in ((0, "triton", 0.85), (1, "cuda", 0.95)):
                    if (s := _speedup(rows, name, "sdpa-best")) is not None:
                        checks[i].append((s, bar, label))
            if pass_ == "fwd+bwd":
                for name in ("triton", "cuda"):
                    if (s := _speedup(rows, name, "composition")) is not None:
                        checks[2].append((s, 1.1, f"{label} {name}"))
            if seq == 4096:
                for eager in ("eager_official", "eager_peft"):
                    if rows.get(eager, {}).get("status") == "oom" and rows.get("triton", {}).get("status") == "ok":
                        checks[4].append((float("inf"), 10.0, label + f" ({eager} out of memory)"))
                    elif (s := _speedup(rows, "triton", eager)) is not None:
                        checks[4].append((s, 10.0, label + f" vs {eager}"))
            t = rows.get("triton")
            if (matmul and t and t["status"] == "ok" and pass_ == "fwd" and dtype == "bf16" and d == 128 and causal
                    and seq >= 4096):
                checks[5].append((t["tflops"] / matmul, 0.60, label))
        decode = [r for r in results.values() if r["kind"] == "decode" and r["status"] == "ok"]
        plain = {(r["batch"], r["context"]): r for r in decode if r["provider"] == "sdpa"}
        for r in decode:
            peer = plain.get((r["batch"], r["context"]))
            if r["provider"] == "triton" and peer:
                checks[3].append((peer["ms"] / r["ms"], 1 / 1.1, f"{r['op']} B{r['batch']} ctx{r['context']}"))
    out = []
    for values in checks:
        if not values:
            out.append("not yet measured")
            continue
        worst = min(values, key=lambda v: v[0] / v[1])
        verdict = "met" if worst[0] >= worst[1] else "missed"
        out.append(f"{verdict} on {sum(v[0] >= v[1] for v in values)}/{len(values)} cases; worst {worst[0]:.2f} "
                   f"({worst[2]})")
    return out


# ---------------------------------------------------------------- markdown

def _fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def _ceiling_lines(results: dict) -> list[str]:
    mm, cp = results.get("ceiling/matmul"), results.get("ceiling/copy")
    lines = ["| ceiling | measured |", "|---|---|"]
    if mm:
        lines.append(f"| matmul {mm['dtype']} {mm['n']}^3 | {mm['tflops']:.3g} TFLOP/s |")
    if cp:
        lines.append(f"| device copy {cp['bytes'] / 2**20:.0f} MiB (read + write) | {cp['gbps']:.1f} GB/s |")
    return lines if len(lines) > 2 else []


def _attention_lines(results: dict) -> list[str]:
    matmul = _matmul_tflops(results)
    table = _by_case(results)
    lines = []
    groups = collections.defaultdict(list)
    for cfg in sorted(table, key=lambda c: tuple(str(x) for x in c[2:8]) + (c[8],)):
        groups[cfg[:2]].append(cfg)
    for (op, pass_) in sorted(groups):
        lines += ["", f"#### {op}_attention, {pass_}", "",
                  "| dtype | d | mask | H/Hkv | P | N | B | provider | ms | TFLOP/s | % matmul | peak MiB "
                  "| x SDPA-best | x composition |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for cfg in groups[(op, pass_)]:
            _, _, dtype, d, causal, h, kv, p, seq, b = cfg
            rows = table[cfg]
            for name in sorted(rows):
                r = rows[name]
                head = f"| {dtype} | {d} | {'causal' if causal else 'full'} | {h}/{kv} | {p} | {seq} | {b} | {name} |"
                if r["status"] != "ok":
                    lines.append(head + f" {r['status']} | | | | | |")
                    continue
                pct = 100 * r["tflops"] / matmul if matmul else None
                lines.append(head + f" {r['ms']:.3f} | {r['tflops']:.3g} | {_fmt(pct, '.0f')} | "
                             f"{_fmt(r.get('peak_mib'), '.0f')} | {_fmt(_speedup(rows, name, 'sdpa-best'))} | "
                             f"{_fmt(_speedup(rows, name, 'composition'))} |")
    return lines


def _model_lines(results: dict) -> list[str]:
    rows = sorted((r for r in results.values() if r["kind"] == "model"),
                  key=lambda r: (r["phase"], r.get("padded", False), r["mode"], r["seq"], r["batch"], r["provider"]))
    if not rows:
        return []
    lines = ["", "| phase | mode | provider | B | N (context) | tokens/s | peak MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        figures = (f"{r['tokens_per_s']:.0f} | {_fmt(r.get('peak_mib'), '.0f')}" if r["status"] == "ok"
                   else f"{r['status']} |")
        phase = r["phase"] + (" (left-padded)" if r.get("padded") else "")
        lines.append(f"| {phase} | {r['mode']} | {r['provider']} | {r['batch']} | {r['seq']} | {figures} |")
    return lines


def _packed_lines(results: dict) -> list[str]:
    rows = {(r["mode"], r["layout"]): r for r in results.values() if r["kind"] == "packed"}
    if not rows:
        return []
    lines = ["", "| mode | layout | sequences | real tokens | token slots | tokens/s (real) | peak MiB | x padded |",
             "|---|---|---|---|---|---|---|---|"]
    for (mode, layout), r in sorted(rows.items()):
        padded = rows.get((mode, "padded"))
        ok = r["status"] == "ok"
        ratio = (r["tokens_per_s"] / padded["tokens_per_s"]
                 if ok and padded is not None and padded["status"] == "ok" else None)
        lines.append(f"| {mode} | {layout} | {r['sequences']} | {r['real_tokens']} | "
                     f"{_fmt(r.get('slot_tokens'), 'd')} | "
                     f"{_fmt(r.get('tokens_per_s'), '.0f') if ok else r['status']} | "
                     f"{_fmt(r.get('peak_mib'), '.0f')} | {_fmt(ratio)} |")
    return lines


def _decode_lines(results: dict) -> list[str]:
    rows = sorted((r for r in results.values() if r["kind"] == "decode"),
                  key=lambda r: (r["op"], r["batch"], r["context"], r["provider"]))
    if not rows:
        return []
    copy = results.get("ceiling/copy")
    sdpa = {(r["batch"], r["context"]): r for r in rows if r["provider"] == "sdpa" and r["status"] == "ok"}
    lines = ["", "| op | B | context | provider | ms | GB/s (K+V once) | % copy | x SDPA |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['op']} | {r['batch']} | {r['context']} | {r['provider']} | {r['status']} | | | |")
            continue
        peer = sdpa.get((r["batch"], r["context"]))
        lines.append(f"| {r['op']} | {r['batch']} | {r['context']} | {r['provider']} | {r['ms']:.3f} | "
                     f"{r['gbps']:.1f} | {_fmt(100 * r['gbps'] / copy['gbps'] if copy else None, '.0f')} | "
                     f"{_fmt(peer['ms'] / r['ms'] if peer else None)} |")
    return lines


def _long_context_lines(results: dict) -> list[str]:
    rows = sorted((r for r in results.values() if r["kind"] == "long_context"), key=lambda r: (r["op"], r["provider"]))
    if not rows:
        return []
    lines = ["", "| op | provider | largest N (fwd+bwd, B=1) | stopped by | ms at largest N | peak MiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['provider']} | {_fmt(r['max_n'], 'd')} | {r['stopped_by']} | "
                     f"{_fmt(r.get('ms'), '.1f')} | {_fmt(r.get('peak_mib'), '.0f')} |")
    return lines


def _file_section(path: Path, data: dict, plot: Path | None) -> list[str]:
    env, results = data["environment"], data["results"]
    smoke = env["run_type"] == "cpu-smoke"
    lines = ["", f"## {env['device']}, {env['date']}{' (CPU smoke run)' if smoke else ''}", ""]
    if smoke:
        lines += ["> CPU smoke run: tiny shapes, the reference backend and Triton *interpreted*. It shows that the",
                  "> benchmark code runs; its figures are **not a performance claim**.", ""]
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "cuda", "cudnn", "triton", "driver", "transformers", "peft",
                                                    "flash_attn", "flash_attn_4") if env.get(k))
    lines += [f"File `{path.relative_to(ROOT)}`; {versions}; runs: "
              + "; ".join(f"{r['finished']} ({'smoke' if smoke else 'quick' if r.get('quick') else 'full'}, "
                          f"{r['results']} results)"
                          for r in data["runs"])]
    if ceil := _ceiling_lines(results):
        lines += ["", "### Ceilings", ""] + ceil
    if att := _attention_lines(results):
        lines += ["", "### Operators", "",
                  "Median time per call; TFLOP/s counts 4·B·H·M·N·d per forward (halved when causal), backward 2.5x "
                  "forward; % matmul is TFLOP/s over the measured matmul rate; peak MiB includes the inputs; "
                  "x SDPA-best / x composition: how many times faster than the fastest plain SDPA kernel (sdpa_flash, "
                  "sdpa_cudnn, sdpa_efficient, each timed alone; sdpa on the CPU) or the composition on the same case "
                  "(>1: faster); unsupported: that SDPA kernel refuses the case."]
        lines += att
    if plot:
        lines += ["", f"![TFLOP/s against N]({plot.relative_to(ROOT)})"]
    if model := _model_lines(results):
        size = "a tiny Llama (hidden 256)" if smoke else "Llama-7B-shaped (hidden 4096, 32 heads)"
        lines += ["", f"### Model level: 4 decoder layers of {size}, top 2 adapted, P = 10", "",
                  "train: tokens/s of one optimisation step; decode: generated tokens/s after the context."] + model
    if decode := _decode_lines(results):
        first = next(r for r in results.values() if r["kind"] == "decode")
        lines += ["", "### Decode attention (one query per sequence against the KV cache)", "",
                  f"{first['heads']} query / {first['kv_heads']} key-value heads, d = {first['head_dim']}, "
                  f"P = {first['prompts']}, {first['dtype']}, no gradient; GB/s counts the K and V cache read "
                  f"once; % copy relates it to the device copy rate; x SDPA: plain decode time over this "
                  f"provider's (1.0 = no cost for the prompts)."] + decode
    if packed := _packed_lines(results):
        first = next(r for r in results.values() if r["kind"] == "packed")
        lines += ["", "### Packed against padded training (one optimisation step)", "",
                  f"Lengths: {first['length_model']} (Alpaca-shaped); padded: micro-batches of {first['micro_batch']} "
                  f"right-padded to their longest; packed: one row from DataCollatorWithFlattening. All 4 layers "
                  f"adapted, P = 10; x padded: real tokens/s over the padded layout's."] + packed
    if long := _long_context_lines(results):
        lines += ["", "### Longest context per provider"] + long
    return lines


def render(files: list[tuple[Path, dict]], plots: dict) -> str:
    gpu = [data for _, data in files if data["environment"]["run_type"] == "gpu"]
    lines = ["# Benchmarks", "",
             "Generated by `python -m bench.report` (and by every `pytest bench/` run) from `bench/results/*.json`; "
             "do not edit by hand. How to run: `bench/README.md`.", ""]
    if not gpu:
        lines += ["**No GPU numbers exist yet.** The benchmarks have so far only run as a CPU smoke run (no GPU was "
                  "available); those figures check that the code runs and are not performance claims.", ""]
    lines += ["## Targets", "", "| target | where | status |", "|---|---|---|"]
    for (target, where), status in zip(TARGETS, target_status(gpu)):
        lines.append(f"| {target} | {where} | {status} |")
    for path, data in files:
        lines += _file_section(path, data, plots.get(path))
    if torch_run := cpu_torch.latest():
        lines += cpu_torch.markdown(torch_run)
    if static_report := static.latest():
        lines += static.markdown(*static_report)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plot

def _plot_config(results: dict) -> dict | None:
    """The attention configuration to plot: HEADLINE with MHA if measured, else the most measured one."""
    keys = ("dtype", "head_dim", "causal", "heads", "kv_heads", "prompts")
    counts = collections.Counter(tuple(r["case"][k] for k in keys) for r in results.values()
                                 if r["kind"] == "attention" and r["status"] == "ok")
    if not counts:
        return None
    for cfg in counts:
        c = dict(zip(keys, cfg))
        if all(c[k] == v for k, v in HEADLINE.items()) and c["heads"] == c["kv_heads"]:
            return c
    return dict(zip(keys, counts.most_common(1)[0][0]))


def plot(path: Path, data: dict) -> Path | None:
    """TFLOP/s against N per provider, one panel per operator and pass; None when nothing to plot."""
    results = data["results"]
    cfg = _plot_config(results)
    if cfg is None:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench.report: matplotlib is not installed; no plot drawn")
        return None
    series = collections.defaultdict(list)
    for r in results.values():
        c = r.get("case", {})
        if r["kind"] == "attention" and r["status"] == "ok" and all(c[k] == v for k, v in cfg.items()):
            series[(c["op"], c["pass"], r["provider"])].append((c["seq"], r["tflops"]))
    ops = sorted({k[0] for k in series})
    passes = sorted({k[1] for k in series})
    providers = sorted({k[2] for k in series})
    colors = dict(zip(providers, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(len(ops), len(passes), figsize=(4.5 * len(passes), 3.6 * len(ops)), squeeze=False)
    for (row, op), (col, pass_) in itertools.product(enumerate(ops), enumerate(passes)):
        ax = axes[row][col]
        for (o, p, provider), points in sorted(series.items()):
            if (o, p) == (op, pass_):
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=provider, color=colors[provider])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (B·N fixed)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{op}, {pass_}")
        ax.legend(fontsize=7)
    env = data["environment"]
    smoke = " — CPU smoke, not a performance claim" if env["run_type"] == "cpu-smoke" else ""
    fig.suptitle(f"{env['device']} {env['date']}: {cfg['dtype']} d={cfg['head_dim']} "
                 f"{'causal' if cfg['causal'] else 'full'} H={cfg['heads']}/{cfg['kv_heads']} P={cfg['prompts']}{smoke}",
                 fontsize=9)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def regenerate() -> list[Path]:
    """Rebuild BENCHMARKS.md and the plots from every results file; return the paths written."""
    files = load_all()
    plots = {path: p for path, data in files if (p := plot(path, data)) is not None}
    MD_PATH.write_text(render(files, plots))
    return [MD_PATH, *plots.values()]


if __name__ == "__main__":
    for written in regenerate():
        print(written)
