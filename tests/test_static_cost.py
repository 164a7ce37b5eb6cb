"""Static costs of the Triton kernels at their GPU configurations, from their machine code (no GPU needed).

The ``static_cost_report`` fixture runs ``python -m bench.static --subset test``: bf16, d = 128 (the largest
tiles) on sm_80 and sm_90a, padded layout, every kernel and operator (plain attention, Excitor, Adapter),
plus the Excitor's and the Adapter's float32 kernels: about 5 minutes on 2 busy cores with an empty cache, seconds
with a warm one. fp16, d = 64 and the varlen layout are in the full report only (``python -m bench.static``:
about 30 minutes). Each test names every offender with its figures.
"""
from __future__ import annotations

import re

import pytest

from bench.static import TILE_PRODUCTS, TUNED_TRITON, loop_limits, plain_layout, triton_older_than_tuned

HALF = ("fp16", "bf16")
# the figures hold for the triton the tiles were chosen with (and newer, where a change must show here);
# tests/test_triton_gpu_compile.py compiles every kernel with any triton setup.py admits
pytestmark = pytest.mark.skipif(triton_older_than_tuned(), reason=f"the GPU tiles are chosen, and their static "
                                f"figures held, for triton {'.'.join(map(str, TUNED_TRITON))}; this one is older")


def _ok(report):
    return [r for r in report["results"].values() if "error" not in r]


def test_no_spills(static_cost_report):
    """No kernel spills: the half-precision ones (the training dtypes) and the float32 ones (the forward's
    scores by head-dim chunks, narrow backward tiles; docs/design.md)."""
    spills = {r["key"]: (r["spill_stores"], r["spill_loads"]) for r in _ok(static_cost_report)
              if r["spill_stores"] or r["spill_loads"]}
    assert not spills, f"spill store / load bytes per thread: {spills}"


def test_no_serialised_wgmma(static_cost_report):
    """ptxas's wgmma serialisation (C75xx "Potential Performance Loss: wgmma.mma_async instructions are
    serialized", a warning or, with ptxas 13.x, an info line), which costs Hopper its overlap."""
    serialised = {r["key"]: w for r in _ok(static_cost_report) for w in r["warnings"]
                  if "wgmma" in w or "serializ" in w or "C7512" in w}
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
    cases = sorted({k[:4] for k in loops if k[4] == "excitor"})
    assert cases and all(case + ("plain",) in loops for case in cases), loops
    differ = {"/".join(map(str, case)): dict(excitor=loops[case + ("excitor",)], plain=loops[case + ("plain",)])
              for case in cases if loops[case + ("excitor",)] != loops[case + ("plain",)]}
    assert not differ, f"(tensor-core instructions, exp2) per main-loop iteration, per loop: {differ}"


def _attention(report):
    return [r for r in _ok(report) if r["config"]["backend"] == "triton" and r["config"]["kernel"] in TILE_PRODUCTS
            and r["config"]["dtype"] in HALF]


def test_main_loops_within_their_targets(static_cost_report):
    """Warp-instructions per MFLOP of each main loop (unmasked, masked) at most bench.static.LOOP_TARGETS (or,
    where KNOWN_MISSES proves a target out of reach, the measured best it records)."""
    over = {}
    for r in _attention(static_cost_report):
        limits = loop_limits(r["config"])
        if not limits:
            continue
        for loop in r["main_loops"]:
            limit = limits[1] if loop["masked"] else limits[0]
            if limit is not None and loop["warp_instr_per_mflop"] > limit:
                over[(r["key"], "masked" if loop["masked"] else "unmasked")] = (loop["warp_instr_per_mflop"], limit)
    assert not over, f"(warp-instructions per MFLOP, limit): {over}"


def test_operator_loops_within_ratio_of_plain_attention(static_cost_report):
    """The Excitor's and the Adapter's main loops cost at most RATIO times plain attention's, loop by loop."""
    rows = {(r["config"]["cc"], r["config"]["kernel"], r["config"]["dtype"], r["config"]["d"], r["config"]["layout"],
             r["config"]["op"]): r for r in _attention(static_cost_report)}
    over, compared = {}, 0
    for key, r in rows.items():
        plain = rows.get(key[:-2] + (plain_layout(key[-2]), "plain"))
        limits = loop_limits(r["config"])
        if key[-1] == "plain" or not plain or not limits or limits[2] is None:
            continue
        compared += 1
        for loop, base in zip(r["main_loops"], plain["main_loops"]):
            ratio = loop["warp_instr_per_mflop"] / base["warp_instr_per_mflop"]
            if ratio > limits[2]:
                over[(r["key"], "masked" if loop["masked"] else "unmasked")] = (round(ratio, 3), limits[2])
    assert compared and not over, f"(ratio to plain attention, limit): {over}"


def test_hopper_main_loops_run_wgmma(static_cost_report):
    """sm_90: every tensor-core instruction of the attention main loops is a wgmma (HGMMA), none mma.sync; the
    forward's products are at least 64 keys (and d) wide per instruction (with TC_ROW_SUM, but for the row sum's
    8 columns of ones)."""
    bad = {}
    for r in _attention(static_cost_report):
        if r["config"]["cc"] != 90:
            continue
        kinds = {op for loop in r["main_loops"] for op in loop["tc"]}
        row_sum = 8 if r["config"]["constexprs"].get("TC_ROW_SUM") else None
        narrow = {op for op in kinds
                  if (m := re.search(r"x(\d+)x", op)) and int(m.group(1)) < 64 and int(m.group(1)) != row_sum}
        if not r["main_loops"] or any(not op.startswith("HGMMA") for op in kinds) or (
                r["config"]["kernel"] == "attention_fwd_kernel" and narrow):
            bad[r["key"]] = sorted(kinds)
    assert not bad, f"tensor-core opcodes of the main loops: {bad}"


def test_ampere_main_loops_do_not_duplicate_mma(static_cost_report):
    """sm_80: the tensor-core work of each main loop is what its tile needs (mma.sync split over the warps with
    no warp repeating another's product): the plain products of the tile, and for the Excitor's dq the three
    products of its bypass scores (hi + lo pairs of P columns), and for a forward with TC_ROW_SUM its row sum's
    product with 8 columns of ones."""
    bad = {}
    for r in _attention(static_cost_report):
        c = r["config"]
        if c["cc"] != 80:
            continue
        cx = c["constexprs"]
        needed = TILE_PRODUCTS[c["kernel"]] * cx["BLOCK_M"] * cx["BLOCK_N"] * cx["HEAD_DIM"]
        if c["kernel"] == "attention_bwd_dq_kernel" and c["op"] == "excitor":
            needed += 3 * cx["BLOCK_M"] * cx["BLOCK_N"] * cx["BLOCK_P"]
        if cx.get("TC_ROW_SUM"):
            needed += cx["BLOCK_M"] * cx["BLOCK_N"] * 8
        macs = [loop["tc_macs"] for loop in r["main_loops"]]
        if not macs or any(m != needed for m in macs):
            bad[r["key"]] = (macs, needed)
    assert not bad, f"(multiply-adds per main-loop iteration, what the tile needs): {bad}"
