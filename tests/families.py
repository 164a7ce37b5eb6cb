"""Tiny decoder models of many transformers families, built from configs in code (nothing downloaded)."""
from __future__ import annotations

import torch
import transformers

VOCAB = 97
COMMON = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              vocab_size=VOCAB, max_position_embeddings=256, attention_dropout=0.0, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, tie_word_embeddings=False, initializer_range=0.15)
# family -> (config class, model class, overrides); every family here calls transformers' attention registry
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, attn_logit_softcapping=None,
                                                         query_pre_attn_scalar=24, sliding_window=128,
                                                         attn_implementation="eager")),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=128,
                                                             attn_logit_softcapping=None)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=None)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=2, num_experts_per_tok=1,
                                                            sliding_window=None)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(use_qk_norm=True)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(attention_multiplier=0.3)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(sliding_window=None)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(partial_rotary_factor=0.5, use_qkv_bias=True)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(partial_rotary_factor=0.5, qk_layernorm=True)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_experts=2, num_experts_per_tok=1,
                                                               moe_intermediate_size=32,
                                                               shared_expert_intermediate_size=32)),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(clip_qkv=0.5)),
    "glm": ("GlmConfig", "GlmForCausalLM", dict(head_dim=16)),
    "helium": ("HeliumConfig", "HeliumForCausalLM", dict(head_dim=16)),
}


def available(name: str) -> bool:
    config, model, _ = FAMILIES[name]
    return hasattr(transformers, config) and hasattr(transformers, model)


def calls_the_registry(model) -> bool:
    """Whether the installed release's attention layer of ``model`` calls transformers' attention registry
    (older releases of some families compute attention in per-implementation classes)."""
    import inspect

    attention = model.model.layers[0].self_attn
    return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(type(attention).forward)


def family_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, own = FAMILIES[name]
    kw = {**COMMON, **own, **overrides}
    config = getattr(transformers, config_cls)(**kw)
    config._attn_implementation = kw.get("attn_implementation", "sdpa")
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).eval()
