"""Longest context per provider: the largest N at which one forward+backward runs on the card.

B = 1, H = 32 (MHA), d = 128, P = 10, bf16, causal. N starts at 4k and doubles until the provider runs
out of device memory or N passes the bound (256k; 64k with --bench-quick). For the largest N reached
the record holds the time of that one call (CUDA events) and its peak memory. GPU only.
"""
import pytest
import torch

from bench import timing
from bench.cases import Case
from bench.providers import PROVIDERS, make_inputs, unavailable
from bench.steps import make_step

SUBJECTS = [("excitor", p) for p in ("sdpa", "composition", "eager_official", "triton", "cuda", "ours_sdpa")] + \
           [("adapter", p) for p in ("composition", "eager_official", "eager_peft", "triton", "cuda", "ours_sdpa")]


def _try(op, provider, seq):
    """(ms, peak MiB) for one forward+backward at length ``seq``, or None when it runs out of memory."""
    case = Case(op, "fwd+bwd", "bf16", 128, True, 1, seq, 32, 32, 10)
    x = make_inputs(case, "cuda", requires_grad=True)
    fn = PROVIDERS[provider][op]
    step = make_step(lambda: fn(x, True, 128 ** -0.5), x, "fwd+bwd")
    step()  # warm-up and compilation
    return timing.once_s(step) * 1e3, timing.peak_mib(step)


@pytest.mark.gpu
@pytest.mark.parametrize("op,provider", SUBJECTS, ids=[f"{o}-{p}" for o, p in SUBJECTS])
def test_longest_context(op, provider, quick, record):
    if why := unavailable(provider):
        pytest.skip(f"{provider}: {why}")
    bound = 65536 if quick else 262144
    best, stopped_by, seq = None, "bound", 4096
    while seq <= bound:
        try:
            ms, peak = _try(op, provider, seq)
        except torch.cuda.OutOfMemoryError:
            stopped_by = "oom"
        timing.free_memory()
        if stopped_by == "oom":
            break
        best = dict(max_n=seq, ms=ms, peak_mib=peak)
        seq *= 2
    record(dict(key=f"long_context/{op}/{provider}", kind="long_context", op=op, provider=provider, bound=bound,
                stopped_by=stopped_by, **(best or dict(max_n=None))))
