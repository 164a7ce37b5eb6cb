"""``adapter_attention``: LLaMA-Adapter's zero-init gated prompt attention (docs/contract.md), all backends.

The fused forward computes the prompt softmax once per query tile beside the online softmax over the
keys; the backward takes the prompt-side gradients in the query-tile programs of the same launch.
Registered as ``torch.library`` custom ops with fake implementations and autograd, like
``excitor_attention``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._dispatch import select_backend, select_path
from .._validate import check_inputs, check_varlen_inputs, resolve_scales
from ..reference import adapter_attention_reference, per_sequence
from . import _torch

try:  # triton installs on Linux only; without it the torch and reference backends run (_dispatch says why not triton)
    from . import _sdpa
    from . import _triton_attention as tri
    from . import _triton_decode as dec
except ImportError:  # pragma: no cover - exercised by tests/test_layouts.py in a subprocess without triton
    _sdpa = tri = dec = None

OP = "adapter_attention"


# cu_seqlens_q/k None: padded (B, H, L, d) operands; else packed (total, H, d) ones (see adapter_attention_varlen).
@torch.library.custom_op("excitor_kernels::adapter_attention_fwd", mutates_args=())
def _fwd(q: Tensor, k: Tensor, v: Tensor, prompt_keys: Tensor, prompt_values: Tensor, gate: Tensor,
         cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
         causal: bool, softmax_scale: float, deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(o, lse, ot): ot is the token attention's output without the prompt term, saved for the backward's delta."""
    rows = tri.RowLayout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    o, lse, _, _, ot = tri.attention_forward(tri.ADAPTER, q, k, v, prompt_keys, prompt_values, gate, None, causal,
                                             softmax_scale, softmax_scale, rows)
    return o, lse, ot


@_fwd.register_fake
def _(q, k, v, prompt_keys, prompt_values, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
      softmax_scale, deterministic):
    return (torch.empty_like(q), q.new_empty(tri.stats_shape(q, cu_seqlens_q), dtype=torch.float32),
            torch.empty_like(q))


@torch.library.custom_op("excitor_kernels::adapter_attention_bwd", mutates_args=())
def _bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, prompt_keys: Tensor, prompt_values: Tensor, gate: Tensor,
         ot: Tensor, lse: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
         max_seqlen_k: int, causal: bool, softmax_scale: float, deterministic: bool
         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    rows = tri.RowLayout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dq, dk, dv, dpk, dpv, dgate, _ = tri.attention_backward(
        tri.ADAPTER, do, q, k, v, prompt_keys, prompt_values, gate, None, None, None, ot, lse, causal, softmax_scale,
        softmax_scale, deterministic, rows)
    return dq, dk, dv, dpk, dpv, dgate


@_bwd.register_fake
def _(do, q, k, v, prompt_keys, prompt_values, gate, ot, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, causal, softmax_scale, deterministic):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(prompt_keys),
            torch.empty_like(prompt_values), torch.empty_like(gate))


def _setup_context(ctx, inputs, output):
    q, k, v, prompt_keys, prompt_values, gate, cu_q, cu_k, *args = inputs
    _, lse, ot = output
    ctx.save_for_backward(q, k, v, prompt_keys, prompt_values, gate, ot, lse, cu_q, cu_k)
    ctx.args = args  # max_seqlen_q, max_seqlen_k, causal, softmax_scale, deterministic


def _backward(ctx, do, _dlse, _dot):
    q, k, v, prompt_keys, prompt_values, gate, ot, lse, cu_q, cu_k = ctx.saved_tensors
    grads = _bwd(do, q, k, v, prompt_keys, prompt_values, gate, ot, lse, cu_q, cu_k, *ctx.args)
    return (*grads,) + (None,) * 7


_fwd.register_autograd(_backward, setup_context=_setup_context)


def adapter_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prompt_keys: Tensor,
    prompt_values: Tensor,
    gate: Tensor,
    *,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
    deterministic: bool = False,
    cache_seqlens: Optional[Tensor] = None,
    cache_leftpad: Optional[Tensor] = None,
) -> Tensor:
    """Causal attention plus LLaMA-Adapter's gated prompt attention, in one pass.

    ``o_i = sum_j softmax_j(s_ij) v_j + gate[h] sum_n softmax_n(softmax_scale <q_i, pk_n>) pv_n``.
    Shapes as :func:`excitor_attention`, with ``prompt_values`` shaped like ``prompt_keys``. Prompts are
    visible to every query and carry no position. ``gate`` is used as is: pass ``tanh(raw)`` for the
    official LLaMA-Adapter formulation or PEFT's plain scalar broadcast to ``(Hq,)``. Inference calls
    (at most 16 queries, no gradient) take the split-KV decode kernel and accept ``cache_seqlens`` and
    ``cache_leftpad`` as :func:`excitor_attention` does.
    """
    p = check_inputs(q, k, v, prompt_keys, gate, prompt_values=prompt_values, softmax_scale=softmax_scale,
                     needs_prompt_values=True)
    softmax_scale, _ = resolve_scales(p, causal, softmax_scale, deterministic=deterministic)
    backend, decode = select_path(OP, backend, p, cache_seqlens, cache_leftpad)
    gate = gate.contiguous()  # (Hq,): kernels index gate[h] with unit stride; the copy passes its gradient back
    if backend == "reference":
        return adapter_attention_reference(q, k, v, prompt_keys, prompt_values, gate, causal=causal,
                                           softmax_scale=softmax_scale, cache_seqlens=cache_seqlens,
                                           cache_leftpad=cache_leftpad)
    if backend == "torch":
        return _torch.adapter_attention(q, k, v, prompt_keys, prompt_values, gate, causal, softmax_scale,
                                        cache_seqlens, cache_leftpad)
    if decode:
        return dec.attention_decode(tri.ADAPTER, q, k, v, prompt_keys, prompt_values, gate, None, cache_seqlens,
                                    cache_leftpad, causal, softmax_scale, softmax_scale)
    if backend == "cuda":
        from .. import _cuda

        return _cuda.adapter_attention(q, k, v, prompt_keys, prompt_values, gate, causal, softmax_scale,
                                       deterministic)
    if backend == "sdpa":
        return _sdpa.adapter_attention(q, k, v, prompt_keys, prompt_values, gate, causal, softmax_scale, deterministic)
    return _fwd(q, k, v, prompt_keys, prompt_values, gate, None, None, 0, 0, causal, softmax_scale,
                deterministic)[0]


def adapter_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prompt_keys: Tensor,
    prompt_values: Tensor,
    gate: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
    deterministic: bool = False,
) -> Tensor:
    """:func:`adapter_attention` on packed variable-length sequences; layout, prompts (``(S, Hkv, P, d)``
    per sequence) and backends as :func:`excitor_attention_varlen`."""
    p = check_varlen_inputs(q, k, v, prompt_keys, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            prompt_values=prompt_values, softmax_scale=softmax_scale, needs_prompt_values=True)
    softmax_scale, _ = resolve_scales(p, causal, softmax_scale, deterministic=deterministic)
    backend = select_backend(OP + "_varlen", backend, p)
    # tiny operands the kernels read with unit stride: copied when strided (gradients reach the originals)
    gate, cu_seqlens_q, cu_seqlens_k = gate.contiguous(), cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    if backend in ("reference", "torch"):
        def attend(qb, kb, vb, prompts, _sim):
            if backend == "torch":
                return _torch.adapter_attention(qb, kb, vb, *prompts, gate, causal, softmax_scale)
            return adapter_attention_reference(qb, kb, vb, *prompts, gate, causal=causal, softmax_scale=softmax_scale)

        return per_sequence(attend, q, k, v, (prompt_keys, prompt_values), None, cu_seqlens_q, cu_seqlens_k)
    return _fwd(q, k, v, prompt_keys, prompt_values, gate, cu_seqlens_q, cu_seqlens_k, p.q_len, p.kv_len, causal,
                softmax_scale, deterministic)[0]
