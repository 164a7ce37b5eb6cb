"""Turn a transformers attention mask into what the causal-only operators can run.

The operators know one mask: bottom-right aligned causal (query ``i`` of ``M`` sees key ``j`` of ``N``
iff ``j <= i + N - M``). transformers hands an attention layer one of

* ``None`` -- plain causal, nothing to do;
* a 4-D ``(B, 1 | H, M, N)`` mask, boolean (True = visible, the sdpa format) or additive float
  (0 = visible, a large negative number = hidden, the eager format);
* a 2-D ``(B, N)`` padding mask of ones and zeros (the flash-attention format).

Padding makes the visible set ``causal(i, j) and valid[b, j]`` for the *real* queries, where a query is
real iff it sees its own key ``i + N - M``. Rows of padding queries are never read back, so

* if every real query sees exactly the causal set (no padding, or right padding: pads sit after all
  real tokens), one batched causal call is exact -> :func:`padding_plan` returns ``None``;
* otherwise (left padding, holes in a cache) each sample keeps only its valid keys and real queries.
  Removing a key is the same as hiding it, because both operators treat keys one at a time (the
  Excitor bypass reconstructs every key from that key alone), and causality stays bottom-right aligned
  on the kept tokens because every kept key inside the query window is a kept query. The plan is one
  ``(query_index, key_index)`` pair per sample.

Masks of any other form (packed sequences, sliding windows, prefix-LM, additive biases) are rejected
with a ``ValueError``: the operators cannot express them.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .reference import causal_mask

SamplePlan = Tuple[torch.Tensor, torch.Tensor]  # (indices of real queries, indices of valid keys)


def visibility(attention_mask, batch: int, q_len: int, kv_len: int) -> Optional[torch.Tensor]:
    """The boolean ``(B, M, N)`` visibility of ``attention_mask`` (True = query may see key), or None."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be None or a tensor (the 'sdpa', 'eager' or 'flash_attention_2' formats); got "
            f"{type(attention_mask).__name__}. Load the model with attn_implementation='sdpa' or 'eager'"
        )
    if attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (batch, kv_len):
            raise ValueError(f"a 2-D attention_mask must have shape (B={batch}, N={kv_len}); "
                             f"got {tuple(attention_mask.shape)}")
        valid = attention_mask.bool()
        return causal_mask(q_len, kv_len, valid.device)[None] & valid[:, None, :]
    if attention_mask.dim() != 4 or attention_mask.shape[0] != batch or tuple(attention_mask.shape[2:]) != (
            q_len, kv_len):
        raise ValueError(f"attention_mask must have shape (B={batch}, 1, M={q_len}, N={kv_len}) or "
                         f"(B={batch}, N={kv_len}); got {tuple(attention_mask.shape)}")
    if attention_mask.shape[1] != 1 and not bool((attention_mask == attention_mask[:, :1]).all()):
        raise ValueError("attention_mask must be the same for every head; got a per-head mask of shape "
                         f"{tuple(attention_mask.shape)}")
    mask = attention_mask[:, 0]
    return mask if mask.dtype == torch.bool else mask == 0


def padding_plan(allowed: torch.Tensor) -> Optional[List[SamplePlan]]:
    """None when one batched causal call is exact for ``allowed`` (B, M, N), else one plan per sample."""
    B, M, N = allowed.shape
    if M > N:
        raise ValueError(f"attention_mask has more queries (M={M}) than keys (N={N})")
    causal = causal_mask(M, N, allowed.device)
    rows = torch.arange(M, device=allowed.device)
    real = allowed[:, rows, rows + (N - M)]                              # (B, M): sees its own key
    if bool(((allowed == causal) | ~real[:, :, None]).all()):
        return None
    valid = (allowed & real[:, :, None]).any(dim=1)                      # (B, N): seen by a real query
    expected = causal[None] & valid[:, None, :]
    consistent = ((allowed == expected) | ~real[:, :, None]).all() & (valid[:, N - M:] == real).all()
    if not bool(consistent):
        raise ValueError(
            "attention_mask is not a causal mask with padding (e.g. packed sequences, a sliding window or a "
            "prefix-LM mask); excitor/adapter attention supports only causal attention with left or right padding"
        )
    return [(real[b].nonzero().squeeze(1), valid[b].nonzero().squeeze(1)) for b in range(B)]
