"""bench/report.py's derived figures on hand-made GPU results: SDPA-best and the targets' verdicts."""
from bench import report
from bench.cases import Case


def _attention(provider, ms, op="excitor", pass_="fwd", status="ok"):
    case = Case(op, pass_, "bf16", 128, True, 4, 4096, 32, 8, 30)
    return dict(key=f"attention/{case.id}/{provider}", kind="attention", provider=provider, case=case.as_dict(),
                status=status, ms=ms, tflops=case.flops() / ms / 1e9)


def _decode(provider, ms, op="excitor"):
    return dict(key=f"decode/{op}/{provider}/B1-ctx8192", kind="decode", op=op, provider=provider, batch=1,
                context=8192, status="ok", ms=ms)


def _status(records):
    return report.target_status([dict(results={r["key"]: r for r in records})])


def test_sdpa_best_is_the_fastest_plain_kernel_that_ran():
    rows = {r["provider"]: r for r in (_attention("sdpa_flash", 2.0), _attention("sdpa_cudnn", 1.6),
                                       _attention("sdpa_efficient", 0.1, status="unsupported"),
                                       _attention("triton", 2.0))}
    assert report._sdpa_best(rows)["provider"] == "sdpa_cudnn"
    assert report._speedup(rows, "triton", "sdpa-best") == 1.6 / 2.0


def test_targets_met_and_missed():
    status = _status([_attention("sdpa_flash", 1.0), _attention("sdpa_cudnn", 1.2), _attention("triton", 1.1),
                      _attention("cuda", 1.1),
                      _attention("composition", 3.0, pass_="fwd+bwd"), _attention("triton", 2.5, pass_="fwd+bwd"),
                      _decode("sdpa", 1.0), _decode("triton", 1.05), _decode("triton", 1.2, op="adapter")])
    assert status[0].startswith("met on 1/1") and "0.91" in status[0]      # 1.0 / 1.1 >= 0.85
    assert status[1].startswith("missed on 0/1")                            # 0.91 < 0.95
    assert status[2].startswith("met on 1/1") and "1.20" in status[2]      # 3.0 / 2.5 >= 1.1
    assert status[3].startswith("missed on 1/2") and "adapter" in status[3]  # 1.2 ms is 20% over SDPA's
    assert status[5] == "not yet measured"  # no matmul ceiling recorded
