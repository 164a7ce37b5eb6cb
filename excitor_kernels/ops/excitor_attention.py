"""``excitor_attention``: LLaMA-Excitor's reconstructed-key bypass (docs/contract.md), all backends.

The Triton backend is two ``torch.library`` custom ops (forward, backward) with fake implementations
and a registered autograd formula, so ``torch.compile`` traces models that call it without a graph
break. The reference backend is plain PyTorch and needs no registration.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._dispatch import select_backend, select_path
from .._validate import check_inputs, check_varlen_inputs, resolve_scales
from ..reference import excitor_attention_reference, per_sequence
from . import _torch

try:  # triton installs on Linux only; without it the torch and reference backends run (_dispatch says why not triton)
    from . import _sdpa
    from . import _triton_attention as tri
    from . import _triton_decode as dec
except ImportError:  # pragma: no cover - exercised by tests/test_layouts.py in a subprocess without triton
    _sdpa = tri = dec = None

OP = "excitor_attention"


# cu_seqlens_q/k None: padded (B, H, L, d) operands; else packed (total, H, d) ones (see excitor_attention_varlen).
@torch.library.custom_op("excitor_kernels::excitor_attention_fwd", mutates_args=())
def _fwd(q: Tensor, k: Tensor, v: Tensor, prompt_keys: Tensor, gate: Tensor, sim_keys: Optional[Tensor],
         cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
         causal: bool, softmax_scale: float, prompt_scale: float, deterministic: bool
         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(o, lse, ke, at): the pre-pass's reconstructed keys and centred prompt weights (hi, lo), saved for the
    backward (docs/design.md)."""
    rows = tri.RowLayout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return tri.attention_forward(tri.EXCITOR, q, k, v, prompt_keys, None, gate, sim_keys, causal, softmax_scale,
                                 prompt_scale, rows)[:4]


@_fwd.register_fake
def _(q, k, v, prompt_keys, gate, sim_keys, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
      softmax_scale, prompt_scale, deterministic):
    s = k if sim_keys is None else sim_keys
    at = (1 if s.dtype == torch.float32 else 2, *s.shape[:-1], tri.pow2(prompt_keys.shape[-2]))
    return (torch.empty_like(q), q.new_empty(tri.stats_shape(q, cu_seqlens_q), dtype=torch.float32),
            torch.empty_like(s), torch.empty(at, dtype=s.dtype, device=s.device))


@torch.library.custom_op("excitor_kernels::excitor_attention_bwd", mutates_args=())
def _bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, prompt_keys: Tensor, gate: Tensor, sim_keys: Optional[Tensor],
         ke: Tensor, at: Tensor, o: Tensor, lse: Tensor, cu_seqlens_q: Optional[Tensor],
         cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, causal: bool, softmax_scale: float,
         prompt_scale: float, deterministic: bool
         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    rows = tri.RowLayout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dq, dk, dv, dpk, _, dgate, dsim = tri.attention_backward(
        tri.EXCITOR, do, q, k, v, prompt_keys, None, gate, sim_keys, ke, at, o, lse, causal, softmax_scale, prompt_scale,
        deterministic, rows)
    return dq, dk, dv, dpk, dgate, (q.new_empty(0) if dsim is None else dsim)


@_bwd.register_fake
def _(do, q, k, v, prompt_keys, gate, sim_keys, ke, at, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      causal, softmax_scale, prompt_scale, deterministic):
    dsim = q.new_empty(0) if sim_keys is None else torch.empty_like(sim_keys)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(prompt_keys),
            torch.empty_like(gate), dsim)


def _setup_context(ctx, inputs, output):
    q, k, v, prompt_keys, gate, sim_keys, cu_q, cu_k, *args = inputs
    o, lse, ke, at = output
    ctx.save_for_backward(q, k, v, prompt_keys, gate, sim_keys, ke, at, o, lse, cu_q, cu_k)
    ctx.args = args  # max_seqlen_q, max_seqlen_k, causal, softmax_scale, prompt_scale, deterministic


def _backward(ctx, do, _dlse, _dke, _dat):
    q, k, v, prompt_keys, gate, sim_keys, ke, at, o, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv, dpk, dgate, dsim = _bwd(do, q, k, v, prompt_keys, gate, sim_keys, ke, at, o, lse, cu_q, cu_k,
                                        *ctx.args)
    return (dq, dk, dv, dpk, dgate, (dsim if sim_keys is not None else None)) + (None,) * 8


_fwd.register_autograd(_backward, setup_context=_setup_context)


def excitor_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prompt_keys: Tensor,
    gate: Tensor,
    *,
    sim_keys: Optional[Tensor] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    prompt_scale: Optional[float] = None,
    backend: str = "auto",
    deterministic: bool = False,
    cache_seqlens: Optional[Tensor] = None,
    cache_leftpad: Optional[Tensor] = None,
) -> Tensor:
    """Causal attention whose keys carry LLaMA-Excitor's gated, prompt-reconstructed bypass.

    Shapes (docs/contract.md): ``q (B, Hq, M, d)``; ``k, v, sim_keys (B, Hkv, N, d)`` with ``Hq % Hkv == 0``;
    ``prompt_keys (Hkv, P, d)`` shared or ``(B, Hkv, P, d)`` per sample; ``gate (Hq,)`` used as is.
    Any strides with a contiguous last dimension (``x.view(B, M, H, d).transpose(1, 2)`` is taken
    without a copy). Causal masking is bottom-right aligned: query ``i`` sees keys ``j <= i + N - M``.

    ``backend``: ``"reference"`` (PyTorch, the full score matrix: the oracle), ``"torch"`` (PyTorch ops around
    ``F.scaled_dot_product_attention``, O(N) memory, any device, no Triton), ``"triton"`` (fused kernels), ``"cuda"`` (the compiled
    extension), ``"sdpa"`` (O(N) fused Triton passes around ``F.scaled_dot_product_attention``; GQA with
    values seen per query head), ``"sdpa_concat"`` (the same, GQA through the exact rewrite
    ``<q, k + g ke> = <[q, g q], [k, ke]>``) or ``"auto"`` (see :func:`excitor_kernels.explain_backend`). ``deterministic=True`` makes the fused backward sum the prompt and gate
    gradients in a fixed order (one float32 slice per key tile, summed afterwards) instead of atomics.

    ``cache_seqlens`` and ``cache_leftpad`` (int32 ``(B,)`` or None; FlashAttention's ``flash_attn_with_kvcache``
    names): sample ``b``'s keys are ``[cache_leftpad[b], cache_seqlens[b])`` of ``k, v`` (a partly filled cache, a
    left-padded batch), the causal mask aligned to ``cache_seqlens[b]``; served by the split-KV decode kernel (at
    most 16 queries, no gradient) and by the torch and reference backends at any ``M``.

    Returns ``o`` with ``q``'s shape, dtype and memory layout. Differentiable in ``q, k, v,
    prompt_keys, gate`` and ``sim_keys``.
    """
    p = check_inputs(q, k, v, prompt_keys, gate, sim_keys=sim_keys, softmax_scale=softmax_scale,
                     prompt_scale=prompt_scale)
    softmax_scale, prompt_scale = resolve_scales(p, causal, softmax_scale, prompt_scale, deterministic=deterministic)
    backend, decode = select_path(OP, backend, p, cache_seqlens, cache_leftpad)
    gate = gate.contiguous()  # (Hq,): kernels index gate[h] with unit stride; the copy passes its gradient back
    if backend == "reference":
        return excitor_attention_reference(q, k, v, prompt_keys, gate, sim_keys=sim_keys, causal=causal,
                                           softmax_scale=softmax_scale, prompt_scale=prompt_scale,
                                           cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad)
    if backend == "torch":
        return _torch.excitor_attention(q, k, v, prompt_keys, gate, sim_keys, causal, softmax_scale, prompt_scale,
                                        cache_seqlens, cache_leftpad)
    if decode:
        return dec.attention_decode(tri.EXCITOR, q, k, v, prompt_keys, None, gate, sim_keys, cache_seqlens,
                                    cache_leftpad, causal, softmax_scale, prompt_scale)
    if backend == "cuda":
        from .. import _cuda

        return _cuda.excitor_attention(q, k, v, prompt_keys, gate, sim_keys, causal, softmax_scale, prompt_scale,
                                       deterministic)
    if backend in _sdpa.BACKENDS:
        return _sdpa.excitor_attention(q, k, v, prompt_keys, gate, sim_keys, causal, softmax_scale, prompt_scale,
                                       deterministic, _sdpa.BACKENDS[backend])
    return _fwd(q, k, v, prompt_keys, gate, sim_keys, None, None, 0, 0, causal, softmax_scale, prompt_scale,
                deterministic)[0]


def excitor_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prompt_keys: Tensor,
    gate: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    sim_keys: Optional[Tensor] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    prompt_scale: Optional[float] = None,
    backend: str = "auto",
    deterministic: bool = False,
) -> Tensor:
    """:func:`excitor_attention` on packed variable-length sequences (flash-attention's varlen layout).

    ``q (total_q, Hq, d)``, ``k, v, sim_keys (total_k, Hkv, d)``: sequence ``b`` owns rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of ``q`` and ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of ``k, v``
    (int32 or int64, ``(S + 1,)``, starting at 0, non-decreasing, ending at ``total``; empty sequences are
    allowed). ``max_seqlen_q/k`` bound the sequence lengths. ``prompt_keys`` is ``(Hkv, P, d)`` shared or
    ``(S, Hkv, P, d)`` per sequence. Each sequence is attended alone, causal bottom-right aligned within it;
    the result equals :func:`excitor_attention` on each sequence by itself. Backends: reference, triton, torch
    (the padded operator per sequence); ``cuda`` and the sdpa backends have no varlen path: they raise, ``auto``
    skips them.
    """
    p = check_varlen_inputs(q, k, v, prompt_keys, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            sim_keys=sim_keys, softmax_scale=softmax_scale, prompt_scale=prompt_scale)
    softmax_scale, prompt_scale = resolve_scales(p, causal, softmax_scale, prompt_scale, deterministic=deterministic)
    backend = select_backend(OP + "_varlen", backend, p)
    # tiny operands the kernels read with unit stride: copied when strided (gradients reach the originals)
    gate, cu_seqlens_q, cu_seqlens_k = gate.contiguous(), cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    if backend in ("reference", "torch"):
        def attend(qb, kb, vb, prompts, sb):
            if backend == "torch":
                return _torch.excitor_attention(qb, kb, vb, prompts[0], gate, sb, causal, softmax_scale, prompt_scale)
            return excitor_attention_reference(qb, kb, vb, prompts[0], gate, sim_keys=sb, causal=causal,
                                               softmax_scale=softmax_scale, prompt_scale=prompt_scale)

        return per_sequence(attend, q, k, v, (prompt_keys,), sim_keys, cu_seqlens_q, cu_seqlens_k)
    return _fwd(q, k, v, prompt_keys, gate, sim_keys, cu_seqlens_q, cu_seqlens_k, p.q_len, p.kv_len, causal,
                softmax_scale, prompt_scale, deterministic)[0]
