"""The variants of the attention kernels (tensor-descriptor loads, warp-specialised loops, the forward's row sum
on the tensor cores) and the tuned configuration set (excitor_kernels/ops/_triton_tuning.py).

* Correctness: each switch of the same kernels, forced through ``_triton_tuning.forced``, against the float64
  oracle on a few cases of the support grid, padded and packed (the CPU interpreter emulates descriptor
  loads and ignores warp specialisation; on a GPU they run compiled).
* Cost: every configuration of ``CANDIDATES`` compiles for sm_90 (Excitor and Adapter, bf16, d = 128) with no
  register spills and shared memory within one block's limit (``bench.static``'s compile path; no GPU needed).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import static
from excitor_kernels.ops import _triton_attention as tri
from excitor_kernels.ops import _triton_tuning as tuning
from helpers import DEVICES, SUPPORT_GRID, check_against_oracle, param_cases
from test_varlen import CASES as VARLEN_CASES
from test_varlen import check as check_varlen

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent

_DESC = dict(DESC=True)
_WS = dict(DESC=True, WARP_SPEC=True)  # one masked loop per kernel; needs descriptor loads
VARIANTS = {  # kernel -> the switches forced on it
    "descriptors": dict(fwd=_DESC, dkdv=_DESC, dq=_DESC),
    "warp_specialised": dict(fwd=_WS, dkdv=_WS, dq=_WS),
    "tc_row_sum": dict(fwd=dict(TC_ROW_SUM=True)),  # the forward's row sum on the tensor cores
}


def _forced(variant):
    return tuning.forced(**VARIANTS[variant])


def _skip_unsupported(variant, op, device):
    if device == "cuda" and VARIANTS[variant]["fwd"].get("DESC") and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("tensor descriptors need sm_90")
    if device == "cuda" and variant == "warp_specialised" and op == "adapter":
        pytest.skip("triton's sm_90 warp specialisation does not compile the Adapter kernels")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("op", ["excitor", "adapter"])
@param_cases([SUPPORT_GRID[1], SUPPORT_GRID[5]])
def test_variant_matches_float64(case, op, variant, device):
    _skip_unsupported(variant, op, device)
    with _forced(variant):
        check_against_oracle(op, case, torch.float16, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["excitor", "adapter"])
@param_cases([SUPPORT_GRID[1], SUPPORT_GRID[5]])
def test_tc_row_sum_matches_float64_in_bfloat16(case, op, device):
    """bfloat16 rounds the weights the tensor-core row sum adds most coarsely: still within the budgets."""
    with _forced("tc_row_sum"):
        check_against_oracle(op, case, torch.bfloat16, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["descriptors", "tc_row_sum"])
@pytest.mark.parametrize("op", ["excitor", "adapter"])
def test_variant_packed_sequences(op, variant, device):
    _skip_unsupported(variant, op, device)
    with _forced(variant):
        check_varlen(op, VARLEN_CASES[0], torch.float16, device, "triton")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("op", ["excitor", "adapter"])
@param_cases([SUPPORT_GRID[5]])
def test_gpu_tiles_match_float64(case, op, dtype, arch, device):
    """The tiles the launchers pick on an sm_80 or sm_90 GPU (``blocks(on_gpu=True)``; pointer loads), forced
    where the interpreter otherwise runs tiles no larger than the problem: float32's narrow backward tiles and
    the half types' wide ones, with lengths that are no multiple of them."""
    bypass = {"excitor": tri.EXCITOR, "adapter": tri.ADAPTER}[op]
    tiles = tri.blocks(True, case.M, case.N, case.d, dtype.itemsize, bypass, arch, False, case.P)
    shape = [{k: t[k] for k in ("BLOCK_M", "BLOCK_N")} for t in tiles]
    with tuning.forced(fwd=shape[0], dkdv=shape[1], dq=shape[2]):
        check_against_oracle(op, case, dtype, device)


def test_forced_descriptors_refused_where_unsupported():
    """Odd strides (not 16-byte multiples) cannot be read by descriptors: forcing them names the reason."""
    q = torch.randn(1, 2, 5, 7)
    assert not tuning.descriptors_ok(q)
    with tuning.forced(fwd=dict(DESC=True)), pytest.raises(ValueError, match="DESC=True"):
        tuning.pick("fwd", 1, (), dict(DESC=False), False, False, None)


@pytest.mark.skipif(static.triton_older_than_tuned(), reason="the candidates are kept for compiling without "
                    "spills with the triton the tiles were chosen with (bench.static.TUNED_TRITON); this one is older")
def test_candidates_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-m", "bench.rank_configs", "--static", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=3000)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert rows, run.stderr[-3000:]
    expected = {(kernel, op) for kernel in tuning.CANDIDATES for op in ("excitor", "adapter")}
    assert {(r["kernel"], r["op"]) for r in rows} == expected
    assert len(rows) == sum(len(tuning.candidates(k, b)) for k in tuning.CANDIDATES for b in (1, 2))
    bad = [r for r in rows if r.get("error") or r["spill_stores"] or r["spill_loads"] or r["shared"] > r["limit"]]
    assert not bad, bad  # the rows that made the ranking fail (it exits 1 on any of them)
    assert run.returncode == 0, run.stderr[-3000:]
