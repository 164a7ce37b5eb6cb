"""Packed sequences through adapted models: the varlen operators behind ``ExcitorAttention``.

A packed batch (one row, sequences back to back, positions restarting) must give the padded batch's
logits at the real tokens and the same loss and adapter gradients, however transformers tells the
layer about the packing: restarting ``position_ids``, the block-diagonal mask it builds from them
(sdpa/eager with ``use_cache=False``), or ``DataCollatorWithFlattening``'s ``cu_seq_lens_*`` arguments.
"""
from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorWithFlattening

from excitor_kernels.padding import sequence_packing
from helpers import TRITON_DEVICE
from tiny_models import DEVICES, HIDDEN, VOCAB, adapted, masks_materialised_under_compile, rel

LENGTHS = (1, 7, 40, 4)  # 1, odd, longer than an interpreted block (32)
VARIANTS = [("excitor", 4), ("adapter", None)]


def sequences(device, lengths=LENGTHS, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).to(device) for n in lengths]


def padded_batch(seqs):
    """Right-padded ids, attention mask and labels (-100 on padding)."""
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long, device=seqs[0].device)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], mask[b, :len(s)] = s, 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def packed_inputs(seqs, how):
    """The packed row as ``model(**inputs)`` takes it, with the loss labels of DataCollatorWithFlattening."""
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=how == "cu_seq_lens")(
        [{"input_ids": s.tolist()} for s in seqs])
    device = seqs[0].device
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    if how == "block_mask":  # transformers builds the block-diagonal mask from the positions without a cache
        inputs["use_cache"] = False
    return inputs


def real_rows(padded, seqs):
    return torch.cat([padded[b, :len(s)] for b, s in enumerate(seqs)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["position_ids", "block_mask", "cu_seq_lens"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("mode,sim_rank", VARIANTS)
def test_packed_equals_padded(device, how, backend, mode, sim_rank):
    seqs = sequences(device)
    results = []
    for packed in (False, True):
        # every layer adapted, so that no frozen layer depends on transformers' own packing support
        model = adapted(device, mode, sim_rank, num_layers=None, backend=backend).train()
        if packed:
            out = model(**packed_inputs(seqs, how))
            logits = out.logits[0]
        else:
            ids, mask, labels = padded_batch(seqs)
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            logits = real_rows(out.logits, seqs)
        out.loss.backward()
        results.append((logits, out.loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (logits, loss, grads), (p_logits, p_loss, p_grads) = results
    assert rel(p_logits, logits) <= 1e-5
    assert rel(p_loss, loss) <= 1e-5
    assert grads.keys() == p_grads.keys() and len(grads) > 0
    for name, g in grads.items():
        assert rel(p_grads[name], g) <= 1e-4, name


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_layers_need_no_cache_to_keep_sequences_apart(device):
    """With frozen (not adapted) sdpa layers, transformers keeps packed sequences apart when use_cache=False."""
    seqs = sequences(device, (5, 9))
    model = adapted(device, "excitor", 4, num_layers=2)
    with torch.no_grad():
        ids, mask, _ = padded_batch(seqs)
        expected = real_rows(model(input_ids=ids, attention_mask=mask).logits, seqs)
        got = model(**packed_inputs(seqs, "block_mask")).logits[0]
    assert rel(got, expected) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_per_sequence_prompt_context(device):
    """A prompt context of one entry per packed sequence acts like the per-sample context of a padded batch."""
    from excitor_kernels.patch import prompt_context

    seqs = sequences(device, (3, 8, 6))
    ctx = torch.randn(3, 5, HIDDEN, device=device)
    model = adapted(device, "excitor", 4, num_layers=None)
    with torch.no_grad(), prompt_context(model, ctx):
        ids, mask, _ = padded_batch(seqs)
        expected = real_rows(model(input_ids=ids, attention_mask=mask).logits, seqs)
        got = model(**packed_inputs(seqs, "cu_seq_lens")).logits[0]
        with pytest.raises(ValueError, match="packed sequences"):
            model(**packed_inputs(seqs[:2], "cu_seq_lens"))
    assert rel(got, expected) <= 1e-5


def test_packing_detection():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    p = sequence_packing(None, pos, {}, 1, 9, 9)
    assert p.cu_seqlens_q.tolist() == [0, 3, 5, 9] and p.max_seqlen_q == 4
    assert sequence_packing(None, torch.arange(9)[None] + 4, {}, 1, 9, 9) is None      # one sequence
    assert sequence_packing(None, pos, {}, 1, 9, 12) is None                          # cached keys: not packed
    assert sequence_packing(None, pos.expand(2, -1), {}, 2, 9, 9) is None             # batches are not packed
    with pytest.raises(ValueError, match="need all of"):
        sequence_packing(None, pos, {"cu_seq_lens_q": p.cu_seqlens_q}, 1, 9, 9)
    with pytest.raises(ValueError, match="batch of one row"):
        sequence_packing(None, None, {"cu_seq_lens_q": p.cu_seqlens_q, "cu_seq_lens_k": p.cu_seqlens_k,
                                      "max_length_q": 4, "max_length_k": 4}, 2, 9, 9)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()[None]
    with pytest.raises(ValueError, match="attention_mask does not keep attention within"):
        sequence_packing(causal, None, {"cu_seq_lens_q": p.cu_seqlens_q, "cu_seq_lens_k": p.cu_seqlens_k,
                                        "max_length_q": 4, "max_length_k": 4}, 1, 9, 9)


def test_packed_training_under_torch_compile():
    """A packed batch through a compiled adapted model (Triton backend) gives the eager loss and gradients."""
    inputs = packed_inputs(sequences(TRITON_DEVICE, (3, 9, 5)), "cu_seq_lens")
    model = adapted(TRITON_DEVICE, "excitor", 4, num_layers=None, backend="triton").train()
    eager = model(**inputs)
    eager.loss.backward()
    expected = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    torch._dynamo.reset()
    if masks_materialised_under_compile():  # the materialised mask is causal across the sequences: refused
        with pytest.raises(ValueError, match="does not keep attention within the sequences"):
            torch.compile(model, backend="aot_eager")(**inputs)
        return
    out = torch.compile(model, backend="aot_eager")(**inputs)
    out.loss.backward()
    assert rel(out.logits, eager.logits) <= 1e-5
    for g, e in zip([p.grad for p in model.parameters() if p.requires_grad], expected):
        assert rel(g, e) <= 1e-4
