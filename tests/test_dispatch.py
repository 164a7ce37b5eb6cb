"""backend="auto": the measured table, the rule without one, explain_backend and the debug log line.

Auto never takes the fused backends for CPU tensors (the interpreter is for tests); to exercise the choice on
the CPU these tests declare Triton runnable there (``_dispatch.triton_unsupported``), so the table section
"cpu" plays the part of a GPU architecture (on a GPU they run on it, under its architecture). Tables are
written under the test's temporary directory only.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch

import excitor_kernels
from excitor_kernels import _dispatch, _tuning
from excitor_kernels.ops import _sdpa
from helpers import BUDGET, INTERPRETED, TRITON_DEVICE, Case, call, make_inputs, oracle, rel_err

GPU = _tuning.arch(torch.device(TRITON_DEVICE)) if TRITON_DEVICE == "cuda" else "cpu"  # the table section

TRAIN = Case(B=1, Hq=4, Hkv=2, M=40, N=40, d=16, P=4)


@pytest.fixture
def fused_on_cpu(monkeypatch, tmp_path):
    """Triton (hence sdpa) counts as runnable on CPU tensors; the table lives at ``tmp_path / "table.json"``."""
    monkeypatch.setattr(_dispatch, "triton_unsupported", lambda op, p, explicit: None)
    path = tmp_path / "table.json"
    monkeypatch.setenv("EXCITOR_AUTO_TABLE", str(path))
    _dispatch._logged.clear()
    return path


def _entry(op, mode, gqa, seq, **ms):
    return dict(op=op, mode=mode, dtype="fp32", head_dim=16, gqa=gqa, seq=seq,
                ms=dict(dict(cuda=None, triton=None, sdpa=None, sdpa_concat=None), **ms))


def _explain(case, op="excitor", **kw):
    x = make_inputs(case, op, torch.float32, TRITON_DEVICE)
    pv = dict(prompt_values=x["prompt_values"]) if op == "adapter" else {}
    return excitor_kernels.explain_backend(op, x["q"], x["k"], x["v"], x["prompt_keys"], x["gate"], **pv, **kw)


def test_without_a_table_the_rule_takes_triton(fused_on_cpu):
    choice = _explain(TRAIN)
    assert choice.backend == "triton" and f"no measured entry for {GPU}" in choice.reason
    assert "rule cuda > triton > sdpa" in choice.reason


def test_the_table_picks_the_fastest_backend_of_the_nearest_entry(fused_on_cpu):
    entries = [_entry("excitor", "training", 2, 32, triton=2.0, sdpa=1.0, sdpa_concat=1.5),
               _entry("excitor", "training", 2, 4096, triton=1.0, sdpa=3.0, sdpa_concat=2.0),
               _entry("excitor", "inference", 2, 32, triton=1.0, sdpa=2.0)]
    _tuning.write(_tuning.merge(None, GPU, dict(device="test"), entries), fused_on_cpu)
    choice = _explain(TRAIN)                                              # N = 40: nearest seq 32
    assert choice.backend == "sdpa" and f"measured on {GPU}" in choice.reason and "N 32)" in choice.reason
    assert _explain(Case(B=1, Hq=4, Hkv=2, M=3000, N=3000, d=16, P=4)).backend == "triton"   # nearest 4096
    with torch.no_grad():
        assert _explain(Case(B=1, Hq=4, Hkv=2, M=40, N=40, d=16, P=4)).backend == "triton"   # inference entry
    # a backend the call cannot take is never chosen, whatever its time: concat is pointless for MHA
    assert _explain(Case(B=1, Hq=2, Hkv=2, M=40, N=40, d=16, P=4)).backend == "sdpa"
    assert _explain(TRAIN, op="adapter").backend == "triton"             # no adapter entry: the rule


def test_auto_runs_the_backend_the_table_names_and_logs_it_once(fused_on_cpu, caplog, monkeypatch):
    _tuning.write(_tuning.merge(None, GPU, {}, [_entry("excitor", "training", 2, 32, triton=9.0, sdpa_concat=1.0)]),
                  fused_on_cpu)
    ran, sdpa_excitor = [], _sdpa.excitor_attention
    monkeypatch.setattr(_sdpa, "excitor_attention", lambda *a: ran.append(a[-1]) or sdpa_excitor(*a))
    x = make_inputs(TRAIN, "excitor", torch.float32, TRITON_DEVICE)
    with caplog.at_level(logging.DEBUG, logger="excitor_kernels"):
        o = call("excitor", x, "auto", True)
        call("excitor", x, "auto", True)
    assert ran == ["concat", "concat"]
    lines = [r.getMessage() for r in caplog.records if "backend='auto' -> sdpa_concat" in r.getMessage()]
    assert len(lines) == 1 and f"measured on {GPU}" in lines[0]
    assert rel_err(o, oracle("excitor", x, True, None)[0]) <= BUDGET[torch.float32]


def test_decode_shaped_calls_take_the_decode_kernel(fused_on_cpu):
    _tuning.write(_tuning.merge(None, GPU, {}, [_entry("excitor", "inference", 2, 32, triton=9.0, sdpa=1.0)]),
                  fused_on_cpu)
    with torch.no_grad():
        choice = _explain(Case(B=1, Hq=4, Hkv=2, M=1, N=40, d=16, P=4))
    assert choice.backend == "triton" and "decode" in choice.reason


def test_explain_names_what_a_backend_cannot_do():
    x = make_inputs(TRAIN, "adapter", torch.float32, "cpu")
    args = (x["q"], x["k"], x["v"], x["prompt_keys"], x["gate"])
    with pytest.raises(ValueError, match="backend='sdpa_concat' cannot run adapter_attention"):
        excitor_kernels.explain_backend("adapter", *args, prompt_values=x["prompt_values"], backend="sdpa_concat")
    choice = excitor_kernels.explain_backend("adapter", *args, prompt_values=x["prompt_values"])
    assert choice.backend == "torch" and "rule cuda > triton > sdpa > torch picks torch" in choice.reason
    with pytest.raises(ValueError, match="op must be 'excitor' or 'adapter'"):
        excitor_kernels.explain_backend("lora", *args)


def test_a_table_of_another_format_is_refused(fused_on_cpu):
    fused_on_cpu.write_text(json.dumps({"format": 99, "gpus": {}}))
    with pytest.raises(ValueError, match="table format 99"):
        _explain(TRAIN)


@pytest.mark.skipif(not INTERPRETED, reason="the --smoke run is CPU-only (interpreted Triton); a GPU runs the real one")
def test_bench_tune_smoke_writes_a_table_auto_reads(fused_on_cpu):
    """python -m bench.tune --smoke: every backend really runs on tiny CPU cases, the table merges by
    architecture and auto then reads its choice from it."""
    from bench import tune

    assert tune.main(["--smoke", "--out", str(fused_on_cpu)]) == 0
    table = json.loads(fused_on_cpu.read_text())
    entries = table["gpus"]["cpu"]["entries"]
    assert len(entries) == len(tune.grid(False, True)) == 4
    for e in entries:
        assert e["ms"]["triton"] > 0 and e["ms"]["sdpa"] > 0 and e["ms"]["cuda"] is None
        assert (e["ms"]["sdpa_concat"] is None) == (e["op"] == "adapter")
    assert "measured on cpu" in _explain(Case(B=1, Hq=4, Hkv=2, M=24, N=24, d=16, P=4)).reason


def test_auto_under_torch_compile_reads_the_table_without_a_graph_break(fused_on_cpu):
    """fullgraph=True: the table lookup runs at trace time as a constant, not as traced file reads."""
    _tuning.write(_tuning.merge(None, GPU, {}, [_entry("excitor", "training", 2, 32, triton=9.0, sdpa=1.0)]),
                  fused_on_cpu)
    x = make_inputs(TRAIN, "excitor", torch.float32, TRITON_DEVICE)

    def step(q, k, v, pk, gate):
        return (excitor_kernels.excitor_attention(q, k, v, pk, gate, backend="auto") ** 2).sum()

    args = [x[n] for n in ("q", "k", "v", "prompt_keys", "gate")]
    loss = torch.compile(step, backend="aot_eager", fullgraph=True)(*args)
    torch.testing.assert_close(loss, step(*args))
