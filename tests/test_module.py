"""ExcitorAttention inside tiny random Llama-family models (nothing downloaded)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import ddp_worker
from excitor_kernels import adapter_attention_reference, excitor_attention_reference
from excitor_kernels._dispatch import triton_installed
from excitor_kernels.patch import (apply_excitor, excitor_layers, load_excitor, prompt_context, save_excitor,
                                   set_backend, set_prompt_context)

from tiny_models import (DEVICES, HEADS, HIDDEN, KV_HEADS, LAYERS, VOCAB, adapted, masks_materialised_under_compile,
                         randomize, rel, tiny_model, tokens)

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = [("excitor", None), ("excitor", 4), ("adapter", None)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,sim_rank", VARIANTS)
def test_zero_gate_reproduces_original_model(device, mode, sim_rank):
    x = tokens(device)
    with torch.no_grad():
        expected = tiny_model(device)(input_ids=x).logits
        model = adapted(device, mode, sim_rank)
        for layer in excitor_layers(model):
            layer.gate.zero_()
        got = model(input_ids=x).logits
        randomize(model)
        moved = model(input_ids=x).logits
    assert rel(got, expected) <= 1e-5
    assert rel(moved, expected) > 1e-3, "nonzero gates must change the outputs"


def test_only_adapter_parameters_train_and_their_count():
    P, L, r = 5, 2, 4
    model = apply_excitor(tiny_model(), num_prompts=P, num_layers=L, sim_rank=r)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.split(".")[-1] in ("prompts", "gate") or ".sim_" in n for n in trainable), trainable
    assert {int(n.split("layers.")[1].split(".")[0]) for n in trainable} == {LAYERS - 2, LAYERS - 1}
    head_dim = HIDDEN // HEADS
    assert sum(trainable.values()) == L * (P * HIDDEN + HEADS + r * (HIDDEN + KV_HEADS * head_dim))


def test_paper_parameter_budget_llama_7b_on_meta():
    """30 layers x (30 prompts x 4096 + rank-16 bottleneck 2 x 16 x 4096) + 30 x 32 tanh gates = 7,619,520."""
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    apply_excitor(model, num_prompts=30, num_layers=30, sim_rank=16)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == 30 * (30 * 4096 + 2 * 16 * 4096) + 30 * 32 == 7_619_520


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,sim_rank", VARIANTS)
def test_optimizer_steps_lower_the_loss(device, mode, sim_rank):
    model = apply_excitor(tiny_model(device), num_prompts=6, num_layers=2, mode=mode, sim_rank=sim_rank,
                          backend="reference", init_std=1.0).train()
    x = tokens(device, B=2, L=16)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(8):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,sim_rank", VARIANTS)
def test_module_matches_direct_operator_call(device, mode, sim_rank):
    model = adapted(device, mode, sim_rank)
    layer = model.model.layers[-1].self_attn
    B, M, d = 2, 9, HIDDEN // HEADS
    x = torch.randn(B, M, HIDDEN, device=device)
    pos = torch.arange(M, device=device)[None].expand(B, M)
    cos, sin = model.model.rotary_emb(x, pos)
    got, weights = layer(x, position_embeddings=(cos, sin), attention_mask=None)
    assert weights is None

    def heads(t):
        return t.view(B, M, -1, d).transpose(1, 2)

    q, k = apply_rotary_pos_emb(heads(x @ layer.q_proj.weight.T), heads(x @ layer.k_proj.weight.T), cos, sin)
    v = heads(x @ layer.v_proj.weight.T)
    pk = (layer.prompts @ layer.k_proj.weight.T).view(5, KV_HEADS, d).transpose(0, 1)
    gate = torch.tanh(layer.gate)
    if mode == "excitor":
        sim = None if sim_rank is None else k + heads(x @ layer.sim_down.weight.T @ layer.sim_up.weight.T)
        o = excitor_attention_reference(q, k, v, pk, gate, sim_keys=sim, softmax_scale=d ** -0.5,
                                        prompt_scale=d ** -0.5)
    else:
        pv = (layer.prompts @ layer.v_proj.weight.T).view(5, KV_HEADS, d).transpose(0, 1)
        o = adapter_attention_reference(q, k, v, pk, pv, gate, softmax_scale=d ** -0.5)
    expected = o.transpose(1, 2).reshape(B, M, HIDDEN) @ layer.o_proj.weight.T
    assert rel(got, expected) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,sim_rank", VARIANTS)
def test_incremental_decoding_equals_full_forward(device, mode, sim_rank):
    model = adapted(device, mode, sim_rank)
    x = tokens(device, B=2, L=12)
    with torch.no_grad():
        full = model(input_ids=x).logits
        out = model(input_ids=x[:, :5], use_cache=True)
        pieces, cache = [out.logits], out.past_key_values
        for start, stop in [(5, 8), (8, 9), (9, 10), (10, 12)]:  # chunked prefill and single-token steps
            out = model(input_ids=x[:, start:stop], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
            cache = out.past_key_values
    assert rel(torch.cat(pieces, dim=1), full) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,sim_rank", [("excitor", 4), ("adapter", None)])
def test_greedy_generation_with_and_without_cache_agree(device, mode, sim_rank):
    model = adapted(device, mode, sim_rank)
    x = tokens(device, B=2, L=6)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x))
    with_cache = model.generate(x, use_cache=True, **kw)
    without = model.generate(x, use_cache=False, **kw)
    assert with_cache.shape == (2, 14)
    assert torch.equal(with_cache, without)


def _spy(monkeypatch, name: str) -> list:
    """The layers that call ``ExcitorAttention.<name>`` from now on, one entry per call (the method still runs)."""
    from excitor_kernels.module import ExcitorAttention

    calls, original = [], getattr(ExcitorAttention, name)
    monkeypatch.setattr(ExcitorAttention, name, lambda self, *a: calls.append(self) or original(self, *a))
    return calls


@pytest.mark.parametrize("mode,sim_rank", VARIANTS)
def test_generation_runs_the_prompt_pass_once_per_layer(mode, sim_rank, monkeypatch):
    """generate() makes the prompt keys and values once per layer (its prefill) and its decoding steps reuse them
    from the cache; tokens and logits equal generation without a cache, which makes them every forward."""
    model = adapted("cpu", mode, sim_rank)
    x = tokens("cpu", B=2, L=6)
    kw = dict(max_new_tokens=7, min_new_tokens=7, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True, attention_mask=torch.ones_like(x))
    passes = _spy(monkeypatch, "_prompt_projections")
    cached = model.generate(x, use_cache=True, **kw)
    assert len(passes) == len(excitor_layers(model))
    passes.clear()
    fresh = model.generate(x, use_cache=False, **kw)
    assert len(passes) == 7 * len(excitor_layers(model))
    assert torch.equal(cached.sequences, fresh.sequences)
    assert rel(torch.stack(cached.logits), torch.stack(fresh.logits)) <= 1e-5


@pytest.mark.parametrize("change", ["in place", "optimizer step", "replaced parameter", "new context",
                                    "context in place"])
def test_kept_prompt_keys_follow_every_change(change):
    """Prompt keys kept with a cache are made again when what they are made from changes: a parameter updated in
    place (its version) or replaced, the prompt context. The step after the change equals a model that never kept
    them (its cache filled and its step run with gradients on)."""
    model = adapted("cpu", "excitor", 4)
    x = tokens("cpu", B=2, L=9)
    ctx = torch.randn(2, 5, HIDDEN)

    def run(keep: bool):
        torch.manual_seed(3)
        m = copy.deepcopy(model)
        lay = excitor_layers(m)[-1]
        if change.startswith("context"):
            set_prompt_context(m, ctx.clone())
        with torch.set_grad_enabled(not keep):
            cache = m(input_ids=x[:, :6], use_cache=True).past_key_values
        with torch.no_grad():
            if change == "in place":  # (a shift of every prompt alike changes no Excitor output)
                lay.prompts.add_(torch.randn_like(lay.prompts))
            elif change == "optimizer step":
                lay.prompts.grad = torch.randn_like(lay.prompts)
                torch.optim.SGD([lay.prompts], lr=1.0).step()
            elif change == "replaced parameter":
                lay.k_proj.weight = torch.nn.Parameter(lay.k_proj.weight * 1.5, requires_grad=False)
            elif change == "new context":
                set_prompt_context(m, ctx * 2)
            elif change == "context in place":
                lay.prompt_context.mul_(2)
        with torch.set_grad_enabled(not keep):
            return m(input_ids=x[:, 6:], past_key_values=cache, use_cache=True).logits.detach().float()

    kept, made = run(keep=True), run(keep=False)
    assert torch.isfinite(kept).all()
    assert rel(kept, made) <= 1e-5, change


@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_a_cache_reset_and_used_again_makes_the_prompt_keys_again(grad_mode):
    """A static cache given to generate(), reset and given again (its tensors kept, their values zeroed): the prompt
    keys are made again for the second generation, even after a write through .data (which bumps no version), also
    when the cache's tensors are inference tensors (no version counter at all). The second generation equals a model
    that only ever had the new prompts."""
    from transformers import StaticCache

    model = adapted("cpu", "excitor", 4)
    x, kw = _left_padded_generation("cpu", max_new_tokens=5)
    new = [torch.randn_like(layer.prompts) for layer in excitor_layers(model)]
    fresh = copy.deepcopy(model)
    cache = StaticCache(config=model.config, max_cache_len=16)
    mode = torch.inference_mode if grad_mode == "inference_mode" else torch.no_grad
    with mode():
        first = model.generate(x, past_key_values=cache, **kw)
        cache.reset()
    for m in (model, fresh):
        for layer, p in zip(excitor_layers(m), new):
            layer.prompts.data.copy_(p)
    with mode():
        second = model.generate(x, past_key_values=cache, **kw)
    expected = fresh.generate(x, past_key_values=StaticCache(config=model.config, max_cache_len=16), **kw)
    assert rel(torch.stack(second.logits), torch.stack(first.logits)) > 1e-3
    assert torch.equal(second.sequences, expected.sequences)
    assert rel(torch.stack(second.logits), torch.stack(expected.logits)) <= 1e-5


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_generation_under_inference_mode(backend, monkeypatch):
    """Under torch.inference_mode every tensor is an inference tensor, without a version counter: a left-padded
    batch generates (before: the mask analysis read the mask's version and raised), with the dynamic and the static
    cache, the tokens and logits of generation under no_grad; a dynamic cache still makes the prompt pass once per
    layer (its key tensors are new at every update), a packed batch runs its varlen call."""
    model = adapted(DEVICES[0] if backend == "triton" else "cpu", "excitor", 4, backend=backend)
    device = next(model.parameters()).device
    x, kw = _left_padded_generation(device, max_new_tokens=5)
    expected = model.generate(x, **kw)
    passes = _spy(monkeypatch, "_prompt_projections")
    with torch.inference_mode():
        dynamic = model.generate(x, **kw)
        assert len(passes) == len(excitor_layers(model))
        static = model.generate(x, cache_implementation="static", **kw)
        packed_ids = torch.cat([x[1], x[1, :4]])[None]
        positions = torch.cat([torch.arange(6), torch.arange(4)])[None].to(device)
        packed = model(input_ids=packed_ids, position_ids=positions, use_cache=False).logits
    for out in (dynamic, static):
        assert torch.equal(out.sequences, expected.sequences)
        assert rel(torch.stack(out.logits), torch.stack(expected.logits)) <= 1e-5
    with torch.no_grad():
        alone = model(input_ids=x[1:, :4], use_cache=False).logits
    assert rel(packed[:, 6:], alone) <= 1e-5


@pytest.mark.parametrize("mode,sim_rank", [("excitor", 4), ("adapter", None)])
def test_beam_search_with_the_cache_equals_beam_search_without(mode, sim_rank):
    """Beam search reorders the cache between steps (its tensors replaced): the prompt keys are made again then,
    and the beams equal beam search without a cache (every forward makes them)."""
    model = adapted("cpu", mode, sim_rank)
    x, kw = _left_padded_generation("cpu", max_new_tokens=6)
    kw.update(num_beams=3, num_return_sequences=2, output_logits=False, return_dict_in_generate=False)
    assert torch.equal(model.generate(x, use_cache=True, **kw), model.generate(x, use_cache=False, **kw))


def test_prompt_pass_runs_every_forward_without_a_cache_or_with_gradients(monkeypatch):
    model = adapted("cpu", "adapter", None)
    x = tokens("cpu", B=2, L=5)
    passes = _spy(monkeypatch, "_prompt_projections")
    out = model(input_ids=x, use_cache=True)  # gradients on: made, not kept
    model(input_ids=x[:, :1], past_key_values=out.past_key_values, use_cache=True)
    with torch.no_grad():
        model(input_ids=x, use_cache=False)
        model(input_ids=x, use_cache=False)
    assert len(passes) == 4 * len(excitor_layers(model))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mode,sim_rank", VARIANTS)
def test_left_and_right_padding_match_unpadded(device, impl, mode, sim_rank):
    model = adapted(device, mode, sim_rank, attn_implementation=impl)
    L = 10
    x = tokens(device, B=3, L=L)
    lengths_pads = [(7, "left"), (6, "right"), (L, "none")]
    mask = torch.zeros(3, L, dtype=torch.long, device=device)
    for b, (n, side) in enumerate(lengths_pads):
        if side == "left":
            mask[b, L - n:] = 1
        else:
            mask[b, :n] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(input_ids=x, attention_mask=mask, position_ids=position_ids).logits
        for b in range(3):
            real = mask[b].bool()
            alone = model(input_ids=x[b:b + 1, real]).logits[0]
            assert rel(batched[b, real], alone) <= 1e-5, (b, lengths_pads[b])


@pytest.mark.parametrize("device", DEVICES)
def test_left_padded_batch_generation_matches_single_samples(device):
    model = adapted(device, "excitor", 4)
    x = tokens(device, B=2, L=8)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    out = model.generate(x, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    alone = model.generate(x[:1, 3:], attention_mask=mask[:1, 3:], max_new_tokens=5, do_sample=False,
                           pad_token_id=0)
    assert torch.equal(out[0, 8:], alone[0, 5:])


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("mode,sim_rank", VARIANTS)
def test_left_padded_generation_runs_one_call_per_layer(backend, mode, sim_rank, monkeypatch):
    """generate() on a left-padded batch: every step of every layer is one operator call with cache_leftpad (the
    decode kernel on triton; before: one call per sample, on copies of its keys), giving the per-sample path's
    tokens and logits."""
    from excitor_kernels.module import ExcitorAttention

    device = DEVICES[0] if backend == "triton" else "cpu"
    model = adapted(device, mode, sim_rank, backend=backend)
    x = tokens(device, B=3, L=7)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    mask[2, :1] = 0
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    per_sample = ExcitorAttention._attend_sample
    calls = []
    monkeypatch.setattr(ExcitorAttention, "_attend_sample", lambda *a: calls.append(1) or per_sample(*a))
    one_call = model.generate(x, **kw)
    assert not calls
    monkeypatch.setattr(ExcitorAttention, "_takes_leftpad", lambda *a: False)
    monkeypatch.setattr("excitor_kernels.module.takes_varlen", lambda backend: False)
    looped = model.generate(x, **kw)
    assert calls
    assert torch.equal(one_call.sequences, looped.sequences)
    assert rel(torch.stack(one_call.logits), torch.stack(looped.logits)) <= 1e-5


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("mode,sim_rank", VARIANTS)
def test_padding_the_decode_path_cannot_take_runs_as_one_varlen_call(backend, mode, sim_rank, monkeypatch):
    """Training on left padding (no decode path: triton; the torch and reference backends would take cache_leftpad,
    refused here to reach the same path) and a cache with holes (right padding, then a cached chunk): one varlen call
    per layer on the gathered real queries and valid keys, with the per-sample path's logits and gradients."""
    from excitor_kernels.module import ExcitorAttention

    device = DEVICES[0] if backend == "triton" else "cpu"
    x = tokens(device, B=3, L=9)
    mask = torch.ones_like(x)
    mask[0, :3] = 0    # left padding
    mask[1, 4:6] = 0   # right padding, then 3 real tokens: holes in the cache
    mask[2, :1] = 0
    per_sample = ExcitorAttention._attend_sample
    calls = []
    monkeypatch.setattr(ExcitorAttention, "_attend_sample", lambda *a: calls.append(1) or per_sample(*a))
    monkeypatch.setattr(ExcitorAttention, "_takes_leftpad", lambda *a: False)
    results = []
    for varlen in (True, False):
        monkeypatch.setattr("excitor_kernels.module.takes_varlen", lambda b, v=varlen: v)
        model = adapted(device, mode, sim_rank, backend=backend).train()
        out = model(input_ids=x[:, :6], attention_mask=mask[:, :6], labels=x[:, :6], use_cache=True)
        out.loss.backward()
        with torch.no_grad():  # 3 more tokens on the cache of the first 6 (sample 1: holes at keys 4, 5)
            more = model(input_ids=x[:, 6:], attention_mask=mask, past_key_values=out.past_key_values).logits
        results.append((out.logits, more, [p.grad for p in model.parameters() if p.requires_grad]))
        assert bool(calls) == (not varlen)
    (logits, more, grads), (ref_logits, ref_more, ref_grads) = results
    real = mask[:, :6].bool()
    assert rel(logits[real], ref_logits[real]) <= 1e-5
    assert rel(more[mask[:, 6:].bool()], ref_more[mask[:, 6:].bool()]) <= 1e-5
    for g, e in zip(grads, ref_grads):
        assert rel(g, e) <= 1e-4


def _left_padded_generation(device, max_new_tokens):
    """Two prompts of 6 tokens, the first left-padded by 2, and greedy generate() options returning the logits."""
    x = tokens(device, B=2, L=6)
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    return x, dict(attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                   output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mode,sim_rank", VARIANTS)
def test_static_cache_generation_matches_the_dynamic_cache(device, impl, mode, sim_rank):
    """cache_implementation="static" (the cache of compiled generation) hands the layer every slot, the unfilled
    ones after the filled ones, hidden by the mask or, in the sdpa prefill, by a None mask that means SDPA's
    upper-left causal mask: the adapted layer attends the filled keys only (before: the operators' bottom-right
    causal mask reached the empty slots, and every generated token after the first could be wrong). A
    left-padded batch; the same tokens and logits as with the dynamic cache."""
    model = adapted(device, mode, sim_rank, attn_implementation=impl)
    x, kw = _left_padded_generation(device, max_new_tokens=5)
    static = model.generate(x, cache_implementation="static", **kw)
    dynamic = model.generate(x, **kw)
    assert torch.equal(static.sequences, dynamic.sequences)
    assert rel(torch.stack(static.logits), torch.stack(dynamic.logits)) <= 1e-5


@pytest.mark.parametrize("impl", ["flash_attention_2", "hub_kernel"])
@pytest.mark.parametrize("mode,sim_rank", VARIANTS)
def test_flash_attention_masks_read_from_transformers_mask_registry(monkeypatch, impl, mode, sim_rank):
    """A model whose attention implementation makes flash-attention masks (2-D, None when every key is real) under
    any name: here a kernel registered as a hub kernel registers it, with transformers' flash mask function and no
    "flash" in its name. Every layer adapted (nothing calls a flash kernel on the CPU): a chunk of 3 tokens after 6
    cached ones (None mask, 3 queries over 9 keys: bottom-right, not SDPA's upper-left) equals the whole forward,
    and left-padded generation with the dynamic and static caches equals the sdpa model's (before: the convention
    was read from "flash" in the name, and the unnamed kernel's chunk attended its first 3 keys only)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, impl, flash_attention_mask)
    reference = adapted("cpu", mode, sim_rank, num_layers=LAYERS)
    model = adapted("cpu", mode, sim_rank, num_layers=LAYERS)
    model.config._attn_implementation_internal = impl
    x = tokens("cpu", B=2, L=9)
    with torch.no_grad():
        whole = model(input_ids=x).logits
        first = model(input_ids=x[:, :6], use_cache=True)
        rest = model(input_ids=x[:, 6:], past_key_values=first.past_key_values, use_cache=True).logits
    assert rel(rest, whole[:, 6:]) <= 1e-5
    assert rel(whole, reference(input_ids=x).logits.detach()) <= 1e-5
    x, kw = _left_padded_generation("cpu", max_new_tokens=4)
    expected = reference.generate(x, **kw)
    for cache in (None, "static"):
        got = model.generate(x, cache_implementation=cache, **kw)
        assert torch.equal(got.sequences, expected.sequences), cache
        assert rel(torch.stack(got.logits), torch.stack(expected.logits)) <= 1e-5, cache


def test_attention_implementation_without_masks_is_refused():
    """transformers passes no mask to the layers of a model whose attention implementation has no mask function
    (AttentionMaskInterface): padding would be invisible to the adapted layers. Refused when the layer is made,
    and at the forward if the model's implementation is changed after."""
    model = tiny_model()
    model.config._attn_implementation_internal = "unregistered_attention"
    with pytest.raises(ValueError, match="'unregistered_attention' has no mask function"):
        apply_excitor(model, num_prompts=3, num_layers=1)
    model = adapted("cpu", num_layers=LAYERS)
    model.config._attn_implementation_internal = "unregistered_attention"
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="'unregistered_attention' has no mask function"):
        model(input_ids=tokens("cpu", B=2, L=6), attention_mask=mask)


@pytest.mark.parametrize("form", ["2-D", "4-D"])
def test_filled_keys_cuts_only_a_static_caches_empty_slots(form):
    """filled_keys: a static cache's prefill (3 tokens in 5 slots, upper-left causal) keeps 3 keys; 3 new tokens
    after 2 cached ones, the last of them padding (right padding with a dynamic cache), keep all 5 (their
    alignment is the last key's; the padding plan handles the padding)."""
    from excitor_kernels.padding import filled_keys
    from excitor_kernels.reference import causal_mask

    static = torch.ones(1, 1, 3, 5, dtype=torch.bool).tril()                        # row i sees keys <= i
    right_padded = torch.tensor([[1, 1, 1, 1, 0]])
    if form == "4-D":
        right_padded = (causal_mask(3, 5, "cpu") & right_padded.bool()[:, None, :])[:, None]
        assert filled_keys(static, 1, 3, 5, False)[0] == 3
    assert filled_keys(right_padded, 1, 3, 5, False)[0] == 5
    assert filled_keys(None, 1, 3, 5, True)[0] == 3 and filled_keys(None, 1, 3, 5, False)[0] == 5
    assert filled_keys(None, 1, 1, 5, True)[0] == 5  # one query: every key (a dynamic cache's decode step)
    # transformers' flash-attention mask over a static cache: 2-D, as long as the filled slots
    assert filled_keys(torch.tensor([[0, 1, 1, 1]]), 1, 3, 6, False)[0] == 4


def test_short_flash_mask_inside_a_trace():
    """transformers' flash-attention mask over a static cache (2-D, as long as the filled slots) read where a
    compiled graph reads masks (padding.traced_ranges): each sample's keys end at its last filled slot, left
    padding starts them later, the rows that see nothing are dropped (before: refused as a 2-D mask of the wrong
    length, so a compiled graph broke there). A mask longer than the keys, or shorter than the queries, is refused."""
    from excitor_kernels.padding import traced_ranges, visibility

    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # 6 filled slots of 9, the first sample left-padded
    allowed = visibility(mask, 2, 4, 9)
    assert allowed.shape == (2, 4, 9) and not allowed[..., 6:].any()
    assert torch.equal(allowed[1, :, :6], torch.ones(4, 6, dtype=torch.bool).tril(2))
    starts, ends, keep, ok = traced_ranges(mask, 2, 4, 9)
    assert starts.tolist() == [2, 0] and ends.tolist() == [6, 6] and bool(ok)
    assert keep.all()
    for bad in (torch.ones(2, 10), torch.ones(2, 3)):
        with pytest.raises(ValueError, match="2-D attention_mask"):
            visibility(bad, 2, 4, 9)


def test_unsupported_masks_are_rejected():
    model = adapted()
    layer = model.model.layers[-1].self_attn
    x = torch.randn(1, 4, HIDDEN)
    pos = torch.arange(4)[None]
    pe = model.model.rotary_emb(x, pos)
    window = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)[None, None]
    with pytest.raises(ValueError, match="sliding window"):
        layer(x, position_embeddings=pe, attention_mask=window)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        layer(x, position_embeddings=pe, attention_mask=torch.ones(1, 1, 4, 5, dtype=torch.bool))


@pytest.mark.parametrize("device", DEVICES)
def test_mha_and_qwen2_models(device):
    """MHA (Hkv == Hq) Llama and a Qwen2 (biased q/k/v projections) adapt and keep zero-gate equivalence."""
    x = tokens(device)
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=HEADS,
                                        num_key_value_heads=1, num_hidden_layers=2, vocab_size=VOCAB,
                                        initializer_range=0.15)).to(device)
    for base in (tiny_model(device, num_key_value_heads=HEADS), qwen.eval()):
        with torch.no_grad():
            for name, p in base.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
            expected = base(input_ids=x).logits
            apply_excitor(base, num_prompts=3, backend="reference")
            randomize(base)
            for layer in excitor_layers(base):
                layer.gate.zero_()
            assert rel(base(input_ids=x).logits, expected) <= 1e-5
            randomize(base)
            assert rel(base(input_ids=x).logits, expected) > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_per_sample_prompt_context(device):
    """Context (B, P, hidden) added to the prompts equals running each sample with its own prompts."""
    model = adapted(device, "excitor", 4)
    x = tokens(device, B=2, L=7)
    ctx = torch.randn(2, 5, HIDDEN, device=device)
    with torch.no_grad():
        with prompt_context(model, ctx):
            batched = model(input_ids=x).logits
        shared = model(input_ids=x).logits
        for b in range(2):
            saved = [layer.prompts.clone() for layer in excitor_layers(model)]
            for layer in excitor_layers(model):
                layer.prompts.add_(ctx[b])
            alone = model(input_ids=x[b:b + 1]).logits
            for layer, p in zip(excitor_layers(model), saved):
                layer.prompts.copy_(p)
            assert rel(batched[b:b + 1], alone) <= 1e-5
    assert rel(batched, shared) > 1e-3
    assert all(layer.prompt_context is None for layer in excitor_layers(model))


@pytest.mark.parametrize("mode,sim_rank", [("excitor", 4), ("adapter", None)])
def test_save_load_round_trip(mode, sim_rank, tmp_path):
    x = tokens("cpu")
    model = adapted("cpu", mode, sim_rank)
    path = str(tmp_path / "excitor.safetensors")
    save_excitor(model, path)
    with torch.no_grad():
        expected = model(input_ids=x).logits
        fresh = load_excitor(tiny_model(), path, backend="reference")
        assert torch.equal(fresh(input_ids=x).logits, expected)
        already = apply_excitor(tiny_model(), num_prompts=5, num_layers=2, mode=mode, sim_rank=sim_rank,
                                backend="reference")
        assert torch.equal(load_excitor(already, path)(input_ids=x).logits, expected)
    other = apply_excitor(tiny_model(), num_prompts=4, num_layers=2, mode=mode, sim_rank=sim_rank)
    with pytest.raises(ValueError, match="adapted with"):
        load_excitor(other, path)


def test_ddp_gradients_equal_single_process(tmp_path):
    # Two fresh interpreters run tests/ddp_worker.py (reference backend, gloo), each with a time limit, so a
    # stuck rendezvous fails this test instead of hanging the suite; nothing of pytest's state is inherited.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    # Output goes to files, not pipes: an undrained pipe could block one rank while the other waits for it.
    init_file, out = tmp_path / "init", tmp_path / "grads.pt"
    logs = [tmp_path / f"rank{rank}.log" for rank in range(2)]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "ddp_worker.py"), str(rank), "2", str(init_file),
                               str(out)], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
             for rank, log in enumerate(logs)]
    deadline = time.monotonic() + 300
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):  # one rank failed: the other would wait forever
            break
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(f"rank {r} (exit {p.returncode}):\n{log.read_text()}"
                                                          for r, (p, log) in enumerate(zip(procs, logs)))
    model, batch = ddp_worker.setup()
    model(input_ids=batch, labels=batch).loss.backward()
    ddp_grads = torch.load(out)
    expected = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(ddp_grads) == set(expected) and len(expected) == 8
    for name, g in expected.items():
        assert rel(ddp_grads[name], g) <= 1e-5, name


def test_torch_compile_runs_the_adapted_model():
    torch._dynamo.reset()
    model = adapted("cpu", "excitor", 4).train()
    x = tokens("cpu", B=2, L=8)
    eager = model(input_ids=x, labels=x)
    eager.loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(input_ids=x, labels=x)
    out.loss.backward()
    assert rel(out.logits, eager.logits) <= 1e-5
    for g, e in zip([p.grad for p in model.parameters() if p.requires_grad], eager_grads):
        assert rel(g, e) <= 1e-4


def test_bf16_autocast_runs_and_stays_close():
    model = adapted("cpu", "excitor", 4).train()
    x = tokens("cpu", B=2, L=8)
    expected = model(input_ids=x).logits.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=x, labels=x)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert rel(out.logits.float(), expected) <= 5e-2
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    x = tokens("cpu", B=2, L=8)
    grads = []
    for checkpointing in (False, True):
        model = adapted("cpu", "excitor", 4).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            if use_reentrant:
                model.enable_input_require_grads()
        model(input_ids=x, labels=x).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert len(grads[1]) == 8
    for g, e in zip(grads[1], grads[0]):
        assert rel(g, e) <= 1e-5


def _snapshot(model):
    return [(type(layer.self_attn), [p.requires_grad for p in layer.parameters()]) for layer in model.model.layers]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_layers=LAYERS + 1), ValueError, "num_layers"),
    (dict(num_layers=0), ValueError, "num_layers"),
    (dict(mode="lora"), ValueError, "mode"),
    (dict(num_prompts=0), ValueError, "num_prompts"),
    (dict(backend="cudnn"), ValueError, "backend"),
    (dict(gate_activation="sigmoid"), ValueError, "gate_activation"),
    (dict(mode="adapter", sim_rank=4), ValueError, "sim_rank"),
])
def test_bad_configuration_raises_before_modifying(kwargs, error, match):
    model = tiny_model()
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        apply_excitor(model, **kwargs)
    assert _snapshot(model) == before


def test_non_llama_models_are_rejected_before_modifying():
    with pytest.raises(TypeError, match="model must be a transformers decoder"):
        apply_excitor(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    model = tiny_model()
    model.model.layers[-1].self_attn.forward = lambda *a, **k: None   # a patched forward (hooks)
    before = _snapshot(model)
    with pytest.raises(TypeError, match=r"layers\[2\].self_attn must be a transformers decoder self-attention"):
        apply_excitor(model)
    assert _snapshot(model) == before
    adapted_model = apply_excitor(tiny_model(), num_layers=1)
    with pytest.raises(ValueError, match="already adapted"):
        apply_excitor(adapted_model)


@pytest.mark.skipif(not triton_installed(), reason="triton is not installed")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,sim_rank", [("excitor", 4), ("adapter", None)])
@pytest.mark.parametrize("fused", ["triton", "sdpa"])
def test_fused_backends_in_the_module(device, mode, sim_rank, fused):
    """The fused kernels (interpreted on a CPU) give the reference's logits and gradients, padding included."""
    x = tokens(device, B=2, L=8)
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    results = []
    for backend in ("reference", fused):
        model = adapted(device, mode, sim_rank, num_layers=1, num_prompts=4).train()
        set_backend(model, backend)
        out = model(input_ids=x, attention_mask=mask, labels=x)
        out.loss.backward()
        results.append((out.logits, [p.grad for p in model.parameters() if p.requires_grad]))
    (ref_logits, ref_grads), (logits, grads) = results
    assert rel(logits, ref_logits) <= 1e-4
    for g, e in zip(grads, ref_grads):
        assert rel(g, e) <= 1e-3


@pytest.mark.parametrize("mode,sim_rank", VARIANTS)
def test_save_pretrained_round_trips_in_one_call(mode, sim_rank, tmp_path):
    """save_pretrained writes the adapted tensors and the options; from_pretrained restores the adapted model."""
    from transformers import AutoModelForCausalLM

    from excitor_kernels import from_pretrained
    from excitor_kernels.patch import excitor_config

    model = adapted("cpu", mode, sim_rank)
    x = tokens("cpu")
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(str(tmp_path), backend="reference")
    assert excitor_config(loaded) == excitor_config(model)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)
    assert sorted(n for n, p in loaded.named_parameters() if p.requires_grad) == \
        sorted(n for n, p in model.named_parameters() if p.requires_grad)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # a plain load keeps the options on the config
    assert not excitor_layers(plain) and plain.config.excitor == excitor_config(model)
    tiny_model().save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="no 'excitor' entry"):
        from_pretrained(str(tmp_path / "base"))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("mode,sim_rank", [("excitor", 4), ("adapter", None)])
def test_torch_compile_fullgraph_with_auto(mode, sim_rank, batch):
    """No graph break from the package: the module, the registry call and backend='auto' (its fall-back
    warning is given outside traces only), a batch of one row included (its position_ids, which may mark packed
    sequences, are not read on the host under compile: position_restarts). Padded batches still break the graph
    (per-sample calls), and so does a mask that transformers materialises under compile (older releases): then
    without fullgraph."""
    torch._dynamo.reset()
    model = adapted("cpu", mode, sim_rank, backend="auto").train()
    x = tokens("cpu", B=batch, L=8)
    eager = model(input_ids=x, labels=x)
    eager.loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=not masks_materialised_under_compile())
    out = compiled(input_ids=x, labels=x)
    out.loss.backward()
    assert rel(out.logits, eager.logits) <= 1e-5
    for g, e in zip([p.grad for p in model.parameters() if p.requires_grad], eager_grads):
        assert rel(g, e) <= 1e-4


def test_packed_position_ids_under_compile_give_nan_not_crossed_sequences():
    """Restarting position_ids with no mask and a cache (transformers then builds no block mask): eager runs the
    packed sequences apart (varlen); a compiled graph cannot branch on the positions, and its output is NaN rather
    than the sequences attending across each other."""
    torch._dynamo.reset()
    model = adapted("cpu", "excitor", 4, num_layers=None, backend="auto")  # no frozen layer mixes the sequences
    x = tokens("cpu", B=1, L=9)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    with torch.no_grad():
        eager = model(input_ids=x, position_ids=positions, use_cache=True).logits
        alone = model(input_ids=x[:, 4:7]).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        traced = compiled(input_ids=x, position_ids=positions, use_cache=True).logits
        plain = compiled(input_ids=x, position_ids=torch.arange(9)[None], use_cache=True).logits
    assert rel(eager[:, 4:7], alone) <= 1e-5
    assert rel(plain, model(input_ids=x).logits) <= 1e-5
    if masks_materialised_under_compile():
        pytest.skip("this transformers release materialises a causal mask under compile: the mask decides, as it "
                    "does for a forward given that mask (the positions are not packing then)")
    assert torch.isnan(traced).all()


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_compiled_right_padded_prefill_into_a_static_cache(backend):
    """A right-padded batch's prefill into a static cache under torch.compile(fullgraph=True): the sample's keys end
    after its new tokens' last slot, not at the cache's end (padding.traced_ranges; before: its real rows were read
    as padding and attended the unfilled slots, 0.7 relative error in the logits). Real tokens' logits equal eager."""
    from transformers import StaticCache

    torch._dynamo.reset()
    model = adapted("cpu", "excitor", 4, backend=backend)
    x = tokens("cpu", B=2, L=6)
    mask = torch.ones_like(x)
    mask[0, 4:] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def run(m):
        with torch.no_grad():
            return m(input_ids=x, attention_mask=mask, position_ids=positions, use_cache=True,
                     past_key_values=StaticCache(config=model.config, max_cache_len=10)).logits

    eager = run(model)
    compiled = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    real = mask.bool()
    assert rel(compiled[real], eager[real]) <= 1e-5


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("mode,sim_rank", VARIANTS)
def test_compiled_static_cache_generation_is_one_graph(backend, mode, sim_rank):
    """transformers' fast-generation recipe: a static cache and torch.compile(model.forward, fullgraph=True). Its
    masks (a left-padded prefill, the unfilled slots of every step) cannot be analysed on the host inside the graph:
    each sample's key range is found on the device (padding.traced_ranges) and served by cache_leftpad and
    cache_seqlens. Before: a data-dependent guard error under fullgraph, a graph break per layer without it. The
    dynamic cache's eager tokens and logits."""
    torch._dynamo.reset()
    device = DEVICES[0] if backend == "triton" else "cpu"
    model = adapted(device, mode, sim_rank, backend=backend)
    x, kw = _left_padded_generation(device, max_new_tokens=4)
    eager = model.generate(x, **kw)
    model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    compiled = model.generate(x, cache_implementation="static", **kw)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert rel(torch.stack(compiled.logits), torch.stack(eager.logits)) <= 1e-5


PADDED_TRACES = [("triton", "excitor", None), ("triton", "excitor", 4), ("triton", "adapter", None),
                 ("torch", "excitor", 4), ("reference", "adapter", None)]


@pytest.mark.parametrize("backend,mode,sim_rank", PADDED_TRACES)
def test_compiled_padded_forward_with_a_cache_is_one_graph(backend, mode, sim_rank, monkeypatch):
    """A padded forward given a KV cache (transformers' default, a prefill) of more than 16 queries, with gradients,
    under torch.compile(fullgraph=True): each sample's key range is found on the device and served in one graph,
    by cache_leftpad / cache_seqlens where the path serves them (reference, torch) and otherwise (triton's training
    kernels) by one varlen call over three sequences per sample. Samples padded on the left, the right, both sides
    and not at all: logits at the real tokens and every adapter gradient equal eager mode (the host's mask
    analysis); before: a graph break per layer, fullgraph failed."""
    torch._dynamo.reset()
    device = DEVICES[0] if backend == "triton" else "cpu"
    model = adapted(device, mode, sim_rank, backend=backend).train()
    x = tokens(device, B=4, L=20)
    mask = torch.ones_like(x)
    mask[0, :5] = 0   # left padding
    mask[1, 17:] = 0  # right padding
    mask[2, :3] = 0   # both
    mask[2, 16:] = 0
    real = mask.bool()

    def run(forward):
        model.zero_grad()
        logits = forward(input_ids=x, attention_mask=mask, use_cache=True).logits
        (logits[real] ** 2).mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    eager_logits, eager_grads = run(model)
    varlen = _spy(monkeypatch, "_attend_ranges_varlen")
    logits, grads = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert len(varlen) == (len(excitor_layers(model)) if backend == "triton" else 0)
    assert rel(logits[real], eager_logits[real]) <= 1e-5
    for g, e in zip(grads, eager_grads):
        assert rel(g, e) <= 1e-4


def test_compiled_long_left_padded_prefill_on_triton():
    """transformers' fast-generation recipe with a left-padded prompt longer than the decode kernel's 16 queries:
    the prefill runs triton's training kernels through the traced varlen call, in the same graph; the tokens and
    logits of eager dynamic-cache generation."""
    torch._dynamo.reset()
    model = adapted(DEVICES[0], "excitor", 4, backend="triton")
    x = tokens(DEVICES[0], B=2, L=21)
    mask = torch.ones_like(x)
    mask[0, :7] = 0
    kw = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    eager = model.generate(x, **kw)
    model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    compiled = model.generate(x, cache_implementation="static", **kw)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert rel(torch.stack(compiled.logits), torch.stack(eager.logits)) <= 1e-5


def test_traced_varlen_call_with_holes_gives_nan():
    """A traced padded forward with a cache whose mask fits no key range (a hole in a sample) makes the output NaN
    on the varlen path too (the host analysis, outside a trace, runs it exactly)."""
    torch._dynamo.reset()
    model = adapted(DEVICES[0], "adapter", None, backend="triton")
    x = tokens(DEVICES[0], B=2, L=18)
    mask = torch.ones_like(x)
    mask[1, 4:6] = 0
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager = model(input_ids=x, attention_mask=mask, use_cache=True).logits
        traced = compiled(input_ids=x, attention_mask=mask, use_cache=True).logits
    assert torch.isfinite(eager).all()
    assert torch.isnan(traced).all()


def test_traced_masks_right_padding_and_holes():
    """Inside torch.compile, inference calls of at most 16 queries: right padding runs causal over every key (the
    eager logits at the real tokens); a cache with holes (right padding, then real tokens) fits no key range, and the
    traced call's output is NaN, never silently wrong."""
    torch._dynamo.reset()
    model = adapted("cpu", "excitor", 4, backend="auto")
    x = tokens("cpu", B=2, L=9)
    mask = torch.ones_like(x)
    mask[1, 4:6] = 0
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager = model(input_ids=x[:, :6], attention_mask=mask[:, :6]).logits
        traced = compiled(input_ids=x[:, :6], attention_mask=mask[:, :6]).logits
        assert rel(traced[mask[:, :6].bool()], eager[mask[:, :6].bool()]) <= 1e-5
        cache = model(input_ids=x[:, :6], attention_mask=mask[:, :6], use_cache=True).past_key_values
        holes = compiled(input_ids=x[:, 6:], attention_mask=mask, past_key_values=cache).logits
    assert torch.isnan(holes).all()


def test_deepcopy_and_pickle_keep_the_adapted_layers(tmp_path):
    import copy

    model = adapted("cpu", "excitor", 4)
    x = tokens("cpu")
    torch.save(model, tmp_path / "model.pt")
    with torch.no_grad():
        expected = model(input_ids=x).logits
        for other in (copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False)):
            assert len(excitor_layers(other)) == 2
            assert torch.equal(other(input_ids=x).logits, expected)


def test_fsdp2_fully_sharded_model_gives_the_same_loss_and_gradients():
    """torch.distributed.fsdp.fully_shard (FSDP2) over each decoder layer and the model (one gloo rank, in a
    subprocess): the adapted layers shard and run, logits and every trainable gradient as unsharded."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = f"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {str(ROOT / 'tests')!r})
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}", RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
from torch.distributed.fsdp import fully_shard
from tiny_models import adapted, tokens, rel
x = tokens("cpu")
ref = adapted("cpu", "excitor", 4).train()
expected = ref(input_ids=x, labels=x)
expected.loss.backward()
model = adapted("cpu", "excitor", 4).train()
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
out = model(input_ids=x, labels=x)
out.loss.backward()
assert rel(out.logits, expected.logits) <= 1e-6
grads = {{n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}}
want = {{n: p.grad for n, p in ref.named_parameters() if p.requires_grad}}
assert sorted(grads) == sorted(want) and len(want) == 8
assert all(rel(grads[n], want[n]) <= 1e-6 for n in want)
dist.destroy_process_group()
print("fsdp2 ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "fsdp2 ok" in out.stdout, out.stderr[-3000:]
