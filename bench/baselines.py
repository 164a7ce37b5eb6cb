"""Attention as users compute it without excitor-kernels, written here from the operator formulas.

All take ``q (B, Hq, M, d)``, ``k, v (B, Hkv, N, d)``, prompts ``(Hkv, P, d)`` and a gate ``(Hq,)``,
and return ``(B, Hq, M, d)``; autograd provides every backward. M == N in the benchmarks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand(t: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """Key/value heads -> query heads (GQA), as eager model code does it: a copy."""
    return t.repeat_interleave(groups, dim=dim) if groups > 1 else t


def sdpa(q, k, v, *, causal, scale):
    """Plain attention: what the frozen model runs (no prompts)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def flash_attn(q, k, v, *, causal, scale):
    """Plain attention through the flash-attn package (layout (B, N, H, d), taken as a transposed view)."""
    from flash_attn import flash_attn_func

    o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, softmax_scale=scale)
    return o.transpose(1, 2)


def flash_attn4(q, k, v, *, causal, scale):
    """Plain attention through flash-attn-4 (FlashAttention's CuTe DSL kernels for Hopper and Blackwell; layout
    (B, N, H, d), GQA native). On the device machine it is carried as wheels: ``.ci/fa4_carry``."""
    from flash_attn.cute import flash_attn_func

    o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, softmax_scale=scale)
    return (o[0] if isinstance(o, tuple) else o).transpose(1, 2)


def reconstructed_keys(k, prompt_keys, gate, groups, prompt_scale):
    """k'[h, j] = k_j + gate[h] * softmax(prompt_scale * k_j pk^T) pk, materialised per query head.
    The P-way softmax runs in float32."""
    a = torch.softmax(prompt_scale * (k @ prompt_keys.transpose(-1, -2)), dim=-1, dtype=torch.float32)
    ke = (a.to(k.dtype) @ prompt_keys)                                    # (B, Hkv, N, d)
    return _expand(k, groups, 1) + gate.view(1, -1, 1, 1).to(k.dtype) * _expand(ke, groups, 1)


def excitor_composition(q, k, v, prompt_keys, gate, *, causal, scale):
    """What a careful user writes: k' with torch ops (B, Hq, N, d), then SDPA with the original values."""
    k_prime = reconstructed_keys(k, prompt_keys, gate, q.shape[1] // k.shape[1], scale)
    return F.scaled_dot_product_attention(q, k_prime, v, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def adapter_composition(q, k, v, prompt_keys, prompt_values, gate, *, causal, scale):
    """SDPA over the tokens plus a separate, unmasked SDPA over the prompts, gated per head."""
    groups = q.shape[1] // k.shape[1]
    batch = q.shape[0]
    pk = _expand(prompt_keys, groups, 0).expand(batch, -1, -1, -1)
    pv = _expand(prompt_values, groups, 0).expand(batch, -1, -1, -1)
    tokens = sdpa(q, k, v, causal=causal, scale=scale)
    prompts = F.scaled_dot_product_attention(q, pk, pv, scale=scale)
    return tokens + gate.view(1, -1, 1, 1).to(q.dtype) * prompts


def _eager_attention(q, k, v, *, causal, scale, mask_value):
    """Materialised (M, N) scores, additive causal mask, softmax in float32 cast back, then P @ V."""
    scores = (q @ _expand(k, q.shape[1] // k.shape[1], 1).transpose(-1, -2)) * scale
    if causal:
        m, n = scores.shape[-2:]
        hidden = torch.ones(m, n, dtype=torch.bool, device=q.device).triu(n - m + 1)
        scores = scores + torch.zeros(m, n, dtype=q.dtype, device=q.device).masked_fill(hidden, mask_value)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ _expand(v, q.shape[1] // v.shape[1], 1)


def _eager_prompt_attention(q, prompt_keys, prompt_values, scale):
    groups = q.shape[1] // prompt_keys.shape[0]
    scores = (q @ _expand(prompt_keys, groups, 0).transpose(-1, -2)) * scale
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ _expand(prompt_values, groups, 0)


def excitor_eager(q, k, v, prompt_keys, gate, *, causal, scale):
    """Official LLaMA-Excitor style: k' materialised per head, then eager attention with float32 softmax."""
    k_prime = reconstructed_keys(k, prompt_keys, gate, q.shape[1] // k.shape[1], scale)
    return _eager_attention(q, k_prime, v, causal=causal, scale=scale, mask_value=float("-inf"))


def adapter_eager_official(q, k, v, prompt_keys, prompt_values, gate, *, causal, scale):
    """Official LLaMA-Adapter style: eager attention (-inf mask) plus tanh(gate) * prompt attention."""
    tokens = _eager_attention(q, k, v, causal=causal, scale=scale, mask_value=float("-inf"))
    prompts = _eager_prompt_attention(q, prompt_keys, prompt_values, scale)
    return tokens + torch.tanh(gate).view(1, -1, 1, 1).to(q.dtype) * prompts


def adapter_eager_peft(q, k, v, prompt_keys, prompt_values, gate, *, causal, scale):
    """PEFT AdaptionPrompt on a model run with attn_implementation="eager": transformers' eager attention
    (mask of the dtype's minimum, float32 softmax) plus the adapter branch with a raw scalar gate."""
    tokens = _eager_attention(q, k, v, causal=causal, scale=scale, mask_value=torch.finfo(q.dtype).min)
    prompts = _eager_prompt_attention(q, prompt_keys, prompt_values, scale)
    return tokens + gate.view(1, -1, 1, 1).to(q.dtype) * prompts
