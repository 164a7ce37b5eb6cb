"""Model-level benchmarks on 4 Llama-7B-shaped decoder layers (random weights), top 2 adapted, P = 10.

* train: one optimisation step (forward, backward, AdamW on prompts and gates) over B*N = 16k tokens,
  N in {2k, 8k}; tokens/s = B*N / median step time; peak memory of one step.
* decode: one greedy token per sequence after a 4k-token prefill, batch 1 and 16; tokens/s = batch /
  median step time (the cache grows by one token per step, as in generation); batch 16 also left-padded as
  ``generate()`` pads a batch (``bench.model.left_padding_mask``: sample b has b/32 of the context as pads).
On the CPU the same code runs on a tiny model (hidden 256) as a smoke test.
"""
import importlib.util

import pytest
import torch

import excitor_kernels
from bench import model as subjects
from bench import timing
from bench.timing import HAS_GPU

DEVICE = "cuda" if HAS_GPU else "cpu"
DTYPE = torch.bfloat16 if HAS_GPU else torch.float32
PROMPTS, ADAPTED_LAYERS = 10, 2
SUBJECTS = [("ours", "excitor"), ("ours", "adapter"), ("composition", "excitor"), ("composition", "adapter"),
            ("peft", "adapter")]
TRAIN = [(8, 2048), (2, 8192)] if HAS_GPU else [(2, 64)]          # (B, N), B * N = 16k on a GPU
DECODE = [(1, 4096), (16, 4096)] if HAS_GPU else [(1, 32), (2, 32)]  # (batch, context)
BUDGET = dict(round_s=0.0, budget_s=1.0, min_rounds=3, max_rounds=10) if HAS_GPU else \
    dict(round_s=0.0, budget_s=0.2, min_rounds=2, max_rounds=3)


def _unavailable(provider: str) -> str | None:
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed"
    if provider == "ours" and not hasattr(excitor_kernels, "apply_excitor"):
        return "excitor_kernels.apply_excitor does not exist yet (excitor_kernels/patch.py is being written)"
    if provider == "peft" and importlib.util.find_spec("peft") is None:
        return "peft is not installed"
    return None


def _subject(provider, mode, max_positions):
    config = subjects.llama_config(tiny=not HAS_GPU, max_positions=max_positions)
    base = subjects.build_base(config, DTYPE, DEVICE)
    return subjects.adapt(provider, base, num_prompts=PROMPTS, num_layers=ADAPTED_LAYERS, mode=mode)


def _run(benchmark, record, base, step_factory, tokens_per_step):
    """Time the step from ``step_factory()``; record tokens/s and peak MiB, or "oom"."""
    seconds, peak = timing.measure(benchmark, record, base, step_factory, BUDGET)
    record(dict(base, status="ok", ms=seconds * 1e3, tokens_per_s=tokens_per_step / seconds, peak_mib=peak))


@pytest.mark.parametrize("batch,seq", TRAIN, ids=[f"B{b}-N{n}" for b, n in TRAIN])
@pytest.mark.parametrize("provider,mode", SUBJECTS, ids=[f"{p}-{m}" for p, m in SUBJECTS])
def test_train_step(provider, mode, batch, seq, benchmark, record):
    if why := _unavailable(provider):
        pytest.skip(f"{provider}: {why}")
    base = dict(key=f"model/train/{mode}/{provider}/B{batch}-N{seq}", kind="model", phase="train", mode=mode,
                provider=provider, batch=batch, seq=seq)

    def factory():
        model = _subject(provider, mode, seq)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=DEVICE)
        return subjects.train_step(model, optimizer, ids)

    _run(benchmark, record, base, factory, batch * seq)


DECODE_CASES = [(b, n, False) for b, n in DECODE] + [(b, n, True) for b, n in DECODE if b > 1]


@pytest.mark.parametrize("batch,context,padded", DECODE_CASES,
                         ids=[f"B{b}-ctx{n}" + ("-leftpad" if p else "") for b, n, p in DECODE_CASES])
@pytest.mark.parametrize("provider,mode", SUBJECTS, ids=[f"{p}-{m}" for p, m in SUBJECTS])
def test_decode(provider, mode, batch, context, padded, benchmark, record):
    if why := _unavailable(provider):
        pytest.skip(f"{provider}: {why}")
    pad = "-leftpad" if padded else ""
    base = dict(key=f"model/decode/{mode}/{provider}/B{batch}-ctx{context}{pad}", kind="model", phase="decode",
                mode=mode, provider=provider, batch=batch, seq=context, padded=padded)

    def factory():
        model = _subject(provider, mode, context + 256)
        ids = torch.randint(0, model.config.vocab_size, (batch, context), device=DEVICE)
        mask = subjects.left_padding_mask(batch, context, DEVICE) if padded else None
        return subjects.decode_step(model, ids, mask)

    _run(benchmark, record, base, factory, batch)
