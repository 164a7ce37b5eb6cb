"""Static costs of the Triton kernels at their GPU configurations, from their machine code (no GPU needed).

The ``static_cost_report`` fixture runs ``python -m bench.static --subset test``: bf16, d = 128 (the largest
tiles) on sm_80 and sm_90a, padded layout, every kernel and operator (plain attention, Excitor, Adapter),
plus the Excitor's float32 forward on sm_80: about 4 minutes on 2 busy cores with an empty cache, seconds
with a warm one. fp16, d = 64 and the varlen layout are in the full report only (``python -m bench.static``:
about 30 minutes). Each test names every offender with its figures.
"""
from __future__ import annotations

HALF = ("fp16", "bf16")


def _ok(report):
    return [r for r in report["results"].values() if "error" not in r]


def test_no_spills(static_cost_report):
    spills = {r["key"]: (r["spill_stores"], r["spill_loads"]) for r in _ok(static_cost_report)
              if r["spill_stores"] or r["spill_loads"]}
    assert not spills, f"spill store / load bytes per thread: {spills}"


def test_no_serialised_wgmma(static_cost_report):
    """ptxas warning C7512: wgmma serialised (e.g. for lack of registers), which costs Hopper its overlap."""
    serialised = {r["key"]: w for r in _ok(static_cost_report) for w in r["warnings"] if "C7512" in w}
    assert not serialised, serialised


def test_shared_memory_within_limit(static_cost_report):
    over = {r["key"]: (r["shared"], r["shared_limit"]) for r in _ok(static_cost_report)
            if r["shared"] > r["shared_limit"]}
    assert not over, f"shared memory bytes per CTA (used, limit): {over}"


def test_no_tf32_in_half_precision_main_loops(static_cost_report):
    tf32 = {r["key"]: [loop["tc"] for loop in r["main_loops"]] for r in _ok(static_cost_report)
            if r["config"]["dtype"] in HALF and any(loop["tf32"] for loop in r["main_loops"])}
    assert not tf32, f"tensor-core instructions per main-loop iteration: {tf32}"


def test_excitor_forward_main_loop_costs_what_plain_attention_does(static_cost_report):
    """The Excitor forward adds only ``gate[h] * ke`` to each key tile: its main loops issue the tensor-core
    instructions and exp2 of plain attention (BYPASS = 0), loop by loop."""
    loops = {}
    for r in _ok(static_cost_report):
        c = r["config"]
        if c["kernel"] == "attention_fwd_kernel" and c["dtype"] in HALF:
            loops[(c["target"], c["dtype"], c["d"], c["layout"], c["op"])] = [
                (loop["tc_total"], loop["exp2"]) for loop in r["main_loops"]]
    cases = sorted({k[:4] for k in loops})
    assert cases and all(case + ("plain",) in loops and case + ("excitor",) in loops for case in cases), loops
    differ = {"/".join(map(str, case)): dict(excitor=loops[case + ("excitor",)], plain=loops[case + ("plain",)])
              for case in cases if loops[case + ("excitor",)] != loops[case + ("plain",)]}
    assert not differ, f"(tensor-core instructions, exp2) per main-loop iteration, per loop: {differ}"
