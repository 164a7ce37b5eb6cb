"""PEFT AdaptionPrompt <-> ExcitorAttention(adapter mode), and the official LLaMA-Adapter formula."""
from __future__ import annotations

import pytest
import torch
from peft import AdaptionPromptConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from excitor_kernels._dispatch import triton_installed
from excitor_kernels.patch import apply_excitor, excitor_layers
from excitor_kernels.peft_interop import from_peft_adaption_prompt, to_peft_adaption_prompt
from tiny_models import DEVICES, HIDDEN, rel, tiny_model, tokens



def peft_base(device, kv_heads=2, layers=3):
    return tiny_model(device, num_key_value_heads=kv_heads, num_hidden_layers=layers).train()


def peft_model(device, kv_heads=2, adapter_len=5, adapter_layers=2):
    model = get_peft_model(peft_base(device, kv_heads),
                           AdaptionPromptConfig(adapter_len=adapter_len, adapter_layers=adapter_layers,
                                                task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # adaption_prompt (1, P, hidden) and adaption_gate (1,)
                p.copy_(torch.randn(p.shape, generator=gen).to(device))
    return model


def grads_by_layer(model, suffixes):
    """{(layer index, 'prompt'|'gate'): grad} for the trainable parameters."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            index = int(name.split("layers.")[1].split(".")[0])
            kind = "prompt" if name.endswith(suffixes[0]) else "gate"
            out[(index, kind)] = p.grad.reshape(-1)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_from_peft_matches_logits_and_gradients(device, kv_heads):
    x = tokens(device, L=10)
    peft = peft_model(device, kv_heads).train()
    out = peft(input_ids=x, labels=x)
    out.loss.backward()
    expected_logits = out.logits.detach()
    expected = grads_by_layer(peft, ("adaption_prompt", "adaption_gate"))

    model = from_peft_adaption_prompt(peft, backend="reference")
    assert isinstance(model, LlamaForCausalLM)
    assert len(excitor_layers(model)) == 2
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    got = grads_by_layer(model, ("prompts", "gate"))
    assert rel(out.logits, expected_logits) <= 1e-5
    assert set(got) == set(expected) == {(i, k) for i in (1, 2) for k in ("prompt", "gate")}
    for key, g in expected.items():
        assert rel(got[key], g) <= 1e-5, key
    assert rel(expected_logits, peft_base(device, kv_heads)(input_ids=x).logits) > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_round_trip_back_to_peft_and_save(device, tmp_path):
    x = tokens(device, L=10)
    peft = peft_model(device)
    with torch.no_grad():
        expected = peft(input_ids=x).logits
        model = from_peft_adaption_prompt(peft, backend="reference")
        back = to_peft_adaption_prompt(model)
        assert rel(back(input_ids=x).logits, expected) <= 1e-6
        back.save_pretrained(str(tmp_path))
        reloaded = PeftModel.from_pretrained(tiny_model(device), str(tmp_path))
        assert rel(reloaded(input_ids=x).logits, expected) <= 1e-6


def test_to_peft_rejects_incompatible_options():
    model = apply_excitor(tiny_model("cpu"), num_prompts=4, num_layers=2, mode="excitor")
    with pytest.raises(ValueError, match="mode='adapter'"):
        to_peft_adaption_prompt(model)
    model = apply_excitor(tiny_model("cpu"), num_prompts=4, num_layers=2, mode="adapter", gate_activation="tanh")
    with pytest.raises(ValueError, match="gate_activation='identity'"):
        to_peft_adaption_prompt(model)
    with pytest.raises(TypeError, match="AdaptionPromptConfig"):
        from_peft_adaption_prompt(tiny_model("cpu"))


def official_adapter_layer(layer, x, cos, sin):
    """LLaMA-Adapter's zero-init attention, written out: token softmax + tanh(gate) * separate prompt softmax."""
    B, M, _ = x.shape
    d = layer.head_dim
    groups = layer.num_heads // layer.num_kv_heads

    def heads(t, n):
        return t.view(*t.shape[:-1], n, d).transpose(-3, -2)

    q = heads(layer.q_proj(x), layer.num_heads)
    k = heads(layer.k_proj(x), layer.num_kv_heads)
    v = heads(layer.v_proj(x), layer.num_kv_heads)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    pk = heads(layer.k_proj(layer.prompts), layer.num_kv_heads).repeat_interleave(groups, 0)   # (Hq, P, d)
    pv = heads(layer.v_proj(layer.prompts), layer.num_kv_heads).repeat_interleave(groups, 0)
    scores = q @ k.transpose(-1, -2) / d ** 0.5
    scores = scores.masked_fill(torch.ones(M, M, dtype=torch.bool).triu(1), float("-inf"))
    prompt_scores = torch.softmax(q @ pk.transpose(-1, -2) / d ** 0.5, dim=-1)
    gate = torch.tanh(layer.gate).view(1, -1, 1, 1)
    o = torch.softmax(scores, dim=-1) @ v + gate * (prompt_scores @ pv)
    return layer.o_proj(o.transpose(1, 2).reshape(B, M, -1))


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_official_llama_adapter_formula(kv_heads):
    model = apply_excitor(peft_base("cpu", kv_heads), num_prompts=6, num_layers=1, mode="adapter",
                          backend="reference", init_std=1.0)
    layer = model.model.layers[-1].self_attn
    with torch.no_grad():
        layer.gate.normal_()
    x = torch.randn(2, 9, HIDDEN)
    cos, sin = model.model.rotary_emb(x, torch.arange(9)[None].expand(2, 9))
    got, _ = layer(x, position_embeddings=(cos, sin), attention_mask=None)
    assert rel(got, official_adapter_layer(layer, x, cos, sin)) <= 1e-5


@pytest.mark.skipif(not triton_installed(), reason="triton is not installed")
def test_from_peft_with_the_fused_backend():
    device = DEVICES[-1]
    x = tokens(device, L=8)
    peft = peft_model(device, adapter_len=4, adapter_layers=1)
    with torch.no_grad():
        expected = peft(input_ids=x).logits
        got = from_peft_adaption_prompt(peft, backend="triton")(input_ids=x).logits
    assert rel(got, expected) <= 1e-4
