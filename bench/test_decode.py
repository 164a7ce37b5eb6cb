"""Decode attention (one new token per sequence against a KV cache), the split-KV kernel against peers.

Cases: batch {1, 16, 64} x cache length {1k, 8k, 32k}, Llama-3-8B-shaped heads (32 query heads, 8
key/value heads, d = 128), P = 10, bf16. Providers, all on the same q (B, 32, 1, 128) and cache:

* ``sdpa``: plain decode attention (``enable_gqa``), the frozen model's cost: the floor for ours;
* ``triton``: our operator (``backend="triton"``; without gradients and with at most 16 queries it
  takes the split-KV decode kernel);
* ``composition``: prompts through PyTorch ops around SDPA, what a user writes without us (the Excitor
  composition rebuilds every cached key per step).

Besides time, GB/s counts the bytes decode must read at least (the K and V cache, once), and "% copy"
relates it to the measured device copy rate (``test_ceilings.py``). On the CPU: a tiny smoke set.
"""
import pytest
import torch

import excitor_kernels
from bench import baselines, timing
from bench.providers import unavailable
from bench.timing import HAS_GPU

HEADS, KV_HEADS, PROMPTS = (32, 8, 10) if HAS_GPU else (4, 2, 10)
HEAD_DIM = 128 if HAS_GPU else 64
DTYPE = torch.bfloat16 if HAS_GPU else torch.float32
CASES = [(b, n) for b in (1, 16, 64) for n in (1024, 8192, 32768)] if HAS_GPU else [(1, 64), (2, 96)]
BUDGET = dict(round_s=0.02, budget_s=0.5, min_rounds=5, max_rounds=50) if HAS_GPU else \
    dict(round_s=0.0, budget_s=0.1, min_rounds=2, max_rounds=5)


def _inputs(batch, context, device):
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=DTYPE)

    return dict(q=randn(batch, HEADS, 1, HEAD_DIM), k=randn(batch, KV_HEADS, context, HEAD_DIM),
                v=randn(batch, KV_HEADS, context, HEAD_DIM), pk=randn(KV_HEADS, PROMPTS, HEAD_DIM),
                pv=randn(KV_HEADS, PROMPTS, HEAD_DIM), gate=torch.rand(HEADS, device=device) * 0.2)


def _call(provider, op, x, scale):
    if provider == "sdpa":
        return baselines.sdpa(x["q"], x["k"], x["v"], causal=False, scale=scale)
    if provider == "composition":
        if op == "excitor":
            return baselines.excitor_composition(x["q"], x["k"], x["v"], x["pk"], x["gate"], causal=True, scale=scale)
        return baselines.adapter_composition(x["q"], x["k"], x["v"], x["pk"], x["pv"], x["gate"], causal=True,
                                             scale=scale)
    if op == "excitor":
        return excitor_kernels.excitor_attention(x["q"], x["k"], x["v"], x["pk"], x["gate"], softmax_scale=scale,
                                                 backend=provider)
    return excitor_kernels.adapter_attention(x["q"], x["k"], x["v"], x["pk"], x["pv"], x["gate"],
                                             softmax_scale=scale, backend=provider)


PROVIDERS = ("sdpa", "triton", "composition") + (() if HAS_GPU else ("reference",))


@pytest.mark.parametrize("batch,context", CASES, ids=[f"B{b}-ctx{n}" for b, n in CASES])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", ["excitor", "adapter"])
def test_decode_attention(op, provider, batch, context, benchmark, record):
    if why := unavailable(provider):
        pytest.skip(f"{provider}: {why}")
    if provider == "sdpa" and op == "adapter":
        pytest.skip("plain SDPA decode is recorded once, under op=excitor")
    device = "cuda" if HAS_GPU else "cpu"
    base = dict(key=f"decode/{op}/{provider}/B{batch}-ctx{context}", kind="decode", op=op, provider=provider,
                batch=batch, context=context, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, prompts=PROMPTS,
                dtype=str(DTYPE).removeprefix("torch."))
    scale = HEAD_DIM ** -0.5
    cache_bytes = 2 * batch * KV_HEADS * context * HEAD_DIM * torch.finfo(DTYPE).bits // 8

    def factory():
        x = _inputs(batch, context, device)

        def step():
            with torch.no_grad():
                _call(provider, op, x, scale)
        return step

    seconds, peak = timing.measure(benchmark, record, base, factory, BUDGET)
    record(dict(base, status="ok", ms=seconds * 1e3, gbps=cache_bytes / seconds / 1e9, peak_mib=peak))
