"""Packed against padded fine-tuning on an instruction-data length distribution (issue 8).

The same sequences train in one optimisation step two ways:

* padded: micro-batches of 8 sequences in sampling order, each right-padded to its longest, gradients
  accumulated (what a padding collator does);
* packed: all sequences in one row from ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``,
  which ``ExcitorAttention`` runs with the varlen kernels.

tokens/s counts real tokens only. Lengths are drawn (seeded) from a log-normal shaped like Alpaca's
prompt+response lengths: median 180 tokens, a long tail clipped at 1024, 16k tokens per step; nothing
is downloaded, so this is the shape of that distribution, not the dataset. All 4 decoder layers of a
Llama-7B-shaped model are adapted (P = 10), so every attention layer sees the packing itself.
On the CPU a tiny model and short lengths make it a smoke test.
"""
import math

import pytest
import torch

from bench import model as subjects
from bench import timing
from bench.timing import HAS_GPU

DEVICE = "cuda" if HAS_GPU else "cpu"
DTYPE = torch.bfloat16 if HAS_GPU else torch.float32
PROMPTS, LAYERS, MICRO_BATCH = 10, 4, 8
LENGTHS = dict(median=180, sigma=0.6, lo=24, hi=1024, tokens=16 * 1024) if HAS_GPU else \
    dict(median=24, sigma=0.6, lo=4, hi=96, tokens=256)
BUDGET = dict(round_s=0.0, budget_s=2.0, min_rounds=3, max_rounds=10) if HAS_GPU else \
    dict(round_s=0.0, budget_s=0.2, min_rounds=2, max_rounds=3)


def alpaca_like_lengths(median, sigma, lo, hi, tokens, seed=0) -> list[int]:
    """Log-normal lengths (clipped to [lo, hi]) until the next one would pass ``tokens`` in total."""
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    while True:
        n = min(hi, max(lo, round(median * math.exp(sigma * torch.randn((), generator=gen).item()))))
        if sum(lengths) + n > tokens:
            return lengths
        lengths.append(n)


def padded_step(model, optimizer, seqs):
    batches = []
    for i in range(0, len(seqs), MICRO_BATCH):
        group = seqs[i:i + MICRO_BATCH]
        L = max(len(s) for s in group)
        ids = torch.zeros(len(group), L, dtype=torch.long, device=DEVICE)
        mask = torch.zeros_like(ids)
        for b, s in enumerate(group):
            ids[b, :len(s)], mask[b, :len(s)] = s, 1
        batches.append((ids, mask, ids.masked_fill(mask == 0, -100)))

    def step():
        for ids, mask, labels in batches:
            (model(input_ids=ids, attention_mask=mask, labels=labels).loss / len(batches)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    slots = sum(ids.numel() for ids, _, _ in batches)
    return step, slots


def packed_step(model, optimizer, seqs):
    from transformers import DataCollatorWithFlattening

    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": s.tolist()} for s in seqs])
    batch = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, batch["input_ids"].numel()


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("mode", ["excitor", "adapter"])
def test_packed_vs_padded_training(mode, layout, benchmark, record):
    pytest.importorskip("transformers")
    lengths = alpaca_like_lengths(**LENGTHS)
    real = sum(lengths)
    base = dict(key=f"packed/train/{mode}/{layout}", kind="packed", mode=mode, layout=layout,
                sequences=len(lengths), real_tokens=real, max_len=max(lengths), micro_batch=MICRO_BATCH,
                length_model=f"lognormal median {LENGTHS['median']} sigma {LENGTHS['sigma']} "
                             f"clipped [{LENGTHS['lo']}, {LENGTHS['hi']}]")
    config = subjects.llama_config(tiny=not HAS_GPU, max_positions=LENGTHS["hi"] + 1)
    model = subjects.apply_ours(subjects.build_base(config, DTYPE, DEVICE), num_prompts=PROMPTS, num_layers=LAYERS,
                                mode=mode).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, config.vocab_size, (n,), generator=gen).to(DEVICE) for n in lengths]
    step, slots = (packed_step if layout == "packed" else padded_step)(model, optimizer, seqs)
    seconds, peak = timing.measure(benchmark, record, base, lambda: step, BUDGET)
    record(dict(base, status="ok", ms=seconds * 1e3, tokens_per_s=real / seconds, slot_tokens=slots,
                peak_mib=peak))
