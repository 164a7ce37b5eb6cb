"""bench/sanitize.py, the calls the GPU session runs under compute-sanitizer, runs and checks here too."""
from bench import sanitize


def test_sanitize_decode_calls_match_float64(capsys):
    assert sanitize.main(["--backend", "triton", "--only", "decode"]) == 0
    out = capsys.readouterr().out
    assert out.count("  ok") == 8 and "0 failing call(s)" in out, out  # 2 operators x causal/full x 2 shapes


def test_sanitize_reports_a_call_out_of_budget(capsys, monkeypatch):
    monkeypatch.setattr(sanitize, "_rel", lambda x, ref: float("nan"))  # what a NaN the kernels left would give
    assert sanitize.main(["--backend", "triton", "--only", "decode"]) == 1
    assert "8 failing call(s)" in capsys.readouterr().out
