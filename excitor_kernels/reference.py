"""Plain PyTorch statements of the operators (``backend="reference"``).

These are the readable form of ``docs/contract.md``: any device, any float dtype, autograd for the backward,
memory O(M * N) per head. Half-precision inputs are computed in float32 and the result cast back;
float64 inputs stay float64, which is how the tests evaluate the formulas exactly. ``compute_dtype`` evaluates the
formulas in another dtype: the input dtype itself gives the comparison of the half-precision standard
(docs/contract.md, "Accuracy": the same formula evaluated by PyTorch in the input dtype).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._alloc import in_layout_of

# docs/contract.md: the largest ||out - ref|| / ||ref|| (output and every gradient) of a fused backend against a
# float64 evaluation of the formulas, per input dtype
ERROR_BUDGET = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _compute_dtype(dtype: torch.dtype, compute_dtype: Optional[torch.dtype] = None) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand_kv_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, ...) -> (B, Hq, ...): query head h reads key/value head h // groups."""
    return t.repeat_interleave(groups, dim=1) if groups > 1 else t


def _per_batch(prompts: torch.Tensor, batch: int) -> torch.Tensor:
    """(Hkv, P, d) shared prompts or (B, Hkv, P, d) per-sample prompts -> (B, Hkv, P, d)."""
    return prompts.unsqueeze(0).expand(batch, *prompts.shape) if prompts.dim() == 3 else prompts


def causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """(M, N) bottom-right aligned: query i sees key j iff j <= i + kv_len - q_len."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    return j <= i + (kv_len - q_len)


def visible_keys(q_len: int, kv_len: int, causal: bool, cache_seqlens=None, device=None,
                 cache_leftpad=None) -> torch.Tensor | None:
    """Boolean (B or 1, 1, M, N) mask of the keys each query sees, or None when it sees all of them.

    Sample b holds the keys [s_b, L_b), L_b = cache_seqlens[b] (N without cache_seqlens) and s_b =
    cache_leftpad[b] (0 without it); key j is visible to query i iff s_b <= j < L_b and, when causal,
    j <= i + L_b - M (bottom-right aligned to the last key).
    """
    if not causal and cache_seqlens is None and cache_leftpad is None:
        return None
    lengths = (torch.tensor([kv_len], device=device) if cache_seqlens is None
               else cache_seqlens.to(device=device, dtype=torch.long))
    i = torch.arange(q_len, device=device).view(1, 1, -1, 1)
    j = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
    L = lengths.view(-1, 1, 1, 1)
    visible = j < L
    if cache_leftpad is not None:
        visible = visible & (j >= cache_leftpad.to(device=device, dtype=torch.long).view(-1, 1, 1, 1))
    if causal:
        visible = visible & (j <= i + L - q_len)
    return visible


def _softmax_attention(scores: torch.Tensor, v: torch.Tensor, causal: bool, cache_seqlens=None,
                       cache_leftpad=None) -> torch.Tensor:
    """softmax_j(scores) @ v over the visible keys; rows with no visible key give 0.

    Non-finite values propagate as in ``scaled_dot_product_attention``: a NaN score, or a +inf one, makes
    its row NaN. Only a row that sees no key is set to 0 (its softmax over nothing is 0/0), chosen by the
    mask and never by looking at the values, so a NaN from the inputs is never hidden.
    """
    visible = visible_keys(scores.shape[-2], scores.shape[-1], causal, cache_seqlens, scores.device, cache_leftpad)
    if visible is None:
        return torch.softmax(scores, dim=-1) @ v
    empty = ~visible.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).masked_fill(empty, 0.0)
    return (probs @ v).masked_fill(empty, 0.0)  # 0 * a NaN value it does not see must not reach the row


def excitor_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_keys: torch.Tensor,
    gate: torch.Tensor,
    *,
    sim_keys: Optional[torch.Tensor] = None,
    causal: bool = True,
    softmax_scale: float,
    prompt_scale: float,
    cache_seqlens: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """LLaMA-Excitor attention, exactly as docs/contract.md writes it.

    a[j, n]  = softmax_n(prompt_scale * <s_j, pk_n>),  s = sim_keys or k
    ke[j]    = sum_n a[j, n] pk_n
    k'[h, j] = k_j + gate[h] ke[j]
    o_i      = sum_j softmax_j(softmax_scale <q_i, k'[h, j]>) v_j
    """
    ct = _compute_dtype(q.dtype, compute_dtype)
    B, Hq, M, _ = q.shape
    groups = Hq // k.shape[1]
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    pk = _per_batch(prompt_keys.to(ct), B)                              # (B, Hkv, P, d)
    s = kc if sim_keys is None else sim_keys.to(ct)                     # (B, Hkv, N, d)
    a = torch.softmax(prompt_scale * (s @ pk.transpose(-1, -2)), -1)    # (B, Hkv, N, P)
    ke = a @ pk                                                         # (B, Hkv, N, d)
    g = gate.to(ct).view(1, Hq, 1, 1)
    k_prime = _expand_kv_heads(kc, groups) + g * _expand_kv_heads(ke, groups)  # (B, Hq, N, d)
    scores = softmax_scale * (qc @ k_prime.transpose(-1, -2))
    o = _softmax_attention(scores, _expand_kv_heads(vc, groups), causal, cache_seqlens, cache_leftpad)
    return in_layout_of(o.to(q.dtype), q)  # q's layout: (B, M, H, d) buffers stay so


def adapter_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_keys: torch.Tensor,
    prompt_values: torch.Tensor,
    gate: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float,
    cache_seqlens: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """LLaMA-Adapter zero-init attention, exactly as docs/contract.md writes it.

    o_i = sum_j softmax_j(s_ij) v_j + gate[h] sum_n softmax_n(softmax_scale <q_i, pk_n>) pv_n
    """
    ct = _compute_dtype(q.dtype, compute_dtype)
    B, Hq, M, _ = q.shape
    groups = Hq // k.shape[1]
    qc = q.to(ct)
    kc = _expand_kv_heads(k.to(ct), groups)
    vc = _expand_kv_heads(v.to(ct), groups)
    pk = _expand_kv_heads(_per_batch(prompt_keys.to(ct), B), groups)   # (B, Hq, P, d)
    pv = _expand_kv_heads(_per_batch(prompt_values.to(ct), B), groups)
    o_tokens = _softmax_attention(softmax_scale * (qc @ kc.transpose(-1, -2)), vc, causal, cache_seqlens,
                                  cache_leftpad)
    o_prompts = torch.softmax(softmax_scale * (qc @ pk.transpose(-1, -2)), -1) @ pv
    o = o_tokens + gate.to(ct).view(1, Hq, 1, 1) * o_prompts
    return in_layout_of(o.to(q.dtype), q)  # q's layout: (B, M, H, d) buffers stay so


def per_sequence(attend, q, k, v, prompts: tuple, sim_keys, cu_seqlens_q, cu_seqlens_k) -> torch.Tensor:
    """A padded-batch operator applied to each packed sequence alone (the varlen reference).

    ``q (total_q, Hq, d)``, ``k, v, sim_keys (total_k, Hkv, d)``; sequence ``b`` owns rows
    ``cu_seqlens_*[b]:cu_seqlens_*[b + 1]``. ``attend(q_b, k_b, v_b, prompts_b, sim_b)`` gets ``(1, H, L, d)``
    views and each of ``prompts`` as shared ``(Hkv, P, d)`` or this sequence's ``(1, Hkv, P, d)``.
    """
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = []
    for b in range(len(cq) - 1):
        def rows(t, cu):
            return None if t is None else t[cu[b]:cu[b + 1]].transpose(0, 1).unsqueeze(0)

        prompts_b = tuple(p if p.dim() == 3 else p[b:b + 1] for p in prompts)
        o = attend(rows(q, cq), rows(k, ck), rows(v, ck), prompts_b, rows(sim_keys, ck))
        out.append(o[0].transpose(0, 1))
    return in_layout_of(torch.cat(out), q) if out else q.new_empty(q.shape)
