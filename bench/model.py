"""Model-level subjects: a Llama-7B-shaped stack of decoder layers with random weights, adapted three ways.

* ``ours``: ``excitor_kernels.apply_excitor`` (the package's module; fused backend on a GPU).
* ``composition``: what a user writes without us, here as a transformers attention function: prompts
  projected by the frozen k/v projections, then :mod:`bench.baselines` compositions (SDPA inside).
* ``peft``: PEFT ``AdaptionPrompt`` (adapter mode only), on the model's default SDPA attention.
The base model is frozen; only prompts and gates train. Nothing is downloaded.
"""
from __future__ import annotations

import torch
from torch import nn

from . import baselines
from .timing import HAS_GPU

COMPOSITION_ATTENTION = "excitor_bench_composition"


def llama_config(*, tiny: bool, max_positions: int):
    """4 decoder layers of LLaMA-7B (hidden 4096, 32 heads, MLP 11008), or a tiny stand-in for the CPU smoke."""
    from transformers import LlamaConfig

    if tiny:
        sizes = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4,
                     vocab_size=1000)
    else:
        sizes = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                     vocab_size=32000)
    return LlamaConfig(num_hidden_layers=4, max_position_embeddings=max_positions, **sizes)


def build_base(config, dtype: torch.dtype, device) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.requires_grad_(False)


def _composition_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function; q (B, Hq, M, d), k/v (B, Hkv, N, d) after RoPE and the cache.
    Benchmark batches carry no padding, so the mask is causal (M == N) or none (decode, M == 1)."""
    causal = query.shape[2] > 1
    prompts = getattr(module, "bench_prompts", None)
    if prompts is None:
        o = baselines.sdpa(query, key, value, causal=causal, scale=scaling)
    else:
        kv_heads, head_dim = key.shape[1], key.shape[3]
        pk = module.k_proj(prompts).view(-1, kv_heads, head_dim).transpose(0, 1)      # (Hkv, P, d), no position
        gate = torch.tanh(module.bench_gate)
        if module.bench_mode == "excitor":
            o = baselines.excitor_composition(query, key, value, pk, gate, causal=causal, scale=scaling)
        else:
            pv = module.v_proj(prompts).view(-1, kv_heads, head_dim).transpose(0, 1)
            o = baselines.adapter_composition(query, key, value, pk, pv, gate, causal=causal, scale=scaling)
    return o.transpose(1, 2), None


def apply_composition(model: nn.Module, *, num_prompts: int, num_layers: int, mode: str) -> nn.Module:
    """Give the top ``num_layers`` attention modules trainable prompts and gates, computed by the composition."""
    from transformers import AttentionInterface

    AttentionInterface.register(COMPOSITION_ATTENTION, _composition_attention)
    model.set_attn_implementation(COMPOSITION_ATTENTION)
    layers = model.model.layers
    hidden = model.config.hidden_size
    for layer in layers[len(layers) - num_layers:]:
        attn = layer.self_attn
        weight = attn.k_proj.weight
        attn.bench_prompts = nn.Parameter(0.02 * torch.randn(num_prompts, hidden, device=weight.device,
                                                             dtype=weight.dtype))
        attn.bench_gate = nn.Parameter(0.1 * torch.randn(model.config.num_attention_heads, device=weight.device))
        attn.bench_mode = mode
    return model


def apply_peft(model: nn.Module, *, num_prompts: int, num_layers: int) -> nn.Module:
    from peft import AdaptionPromptConfig, get_peft_model

    return get_peft_model(model, AdaptionPromptConfig(adapter_len=num_prompts, adapter_layers=num_layers,
                                                      task_type="CAUSAL_LM"))


def apply_ours(model: nn.Module, *, num_prompts: int, num_layers: int, mode: str) -> nn.Module:
    import excitor_kernels

    return excitor_kernels.apply_excitor(model, num_prompts=num_prompts, num_layers=num_layers, mode=mode,
                                         backend="triton" if HAS_GPU else "reference")


def adapt(provider: str, model: nn.Module, *, num_prompts: int, num_layers: int, mode: str) -> nn.Module:
    if provider == "ours":
        return apply_ours(model, num_prompts=num_prompts, num_layers=num_layers, mode=mode)
    if provider == "composition":
        return apply_composition(model, num_prompts=num_prompts, num_layers=num_layers, mode=mode)
    return apply_peft(model, num_prompts=num_prompts, num_layers=num_layers)


def train_step(model: nn.Module, optimizer, input_ids: torch.Tensor):
    """One optimisation step: next-token loss over every position, backward, AdamW on the trainable parameters."""
    def step():
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def left_padding_mask(batch: int, context: int, device) -> torch.Tensor:
    """The attention mask of a left-padded batch as ``generate()`` gets it: sample b has ``b * context // (2 *
    batch)`` pads before its tokens (the longest none, the shortest about half the context)."""
    mask = torch.ones(batch, context, dtype=torch.long, device=device)
    for b in range(batch):
        mask[b, :b * context // (2 * batch)] = 0
    return mask


def decode_step(model: nn.Module, context_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Prefill ``context_ids`` into a cache (not timed), then return one greedy decode step per call (with
    ``attention_mask``, a padded batch: the mask grows by one real token per step, as in generation)."""
    from transformers import DynamicCache

    with torch.no_grad():
        out = model(input_ids=context_ids, attention_mask=attention_mask,
                    past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    state = dict(cache=out.past_key_values, next=out.logits[:, -1:].argmax(-1), mask=attention_mask)

    def step():
        mask = state["mask"]
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        with torch.no_grad():
            out = model(input_ids=state["next"], attention_mask=mask, past_key_values=state["cache"], use_cache=True)
        state["cache"], state["next"], state["mask"] = out.past_key_values, out.logits[:, -1:].argmax(-1), mask
    return step
