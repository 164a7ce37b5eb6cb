"""``backend="torch"``: both operators in PyTorch ops around ``F.scaled_dot_product_attention``; nothing but torch.

The path ``backend="auto"`` takes on devices without the fused kernels (the CPU, Apple's MPS, any non-CUDA device
torch supports). Memory is ``O(N)`` beyond SDPA's own: nothing ``M x N`` is written unless an input holds a
non-finite value (below). Forward and backward run through autograd (notation of docs/contract.md):

* **Excitor**: ``a = softmax(prompt_scale s pk^T)`` ``(B, Hkv, N, P)`` and the centred reconstruction
  ``ke = a pk - mean_n pk_n`` ``(B, Hkv, N, d)`` in float32; a constant added to every key of a head shifts each
  score row by a constant, which the softmax cannot see, and centring keeps ``ke`` small, so that ``k'`` rounds well
  and ``dgate`` does not add the rounding of a large mean (docs/design.md). Then ``k'[h] = k + gate[h] ke`` in
  float32 (as ``a (gate[h] (pk - mean pk))``: the gate scales the prompts, so no ``(B, Hkv, N, d)`` ``ke`` is kept),
  rounded once to the dtype SDPA runs in (float32 for half inputs on the CPU, where half precision buys no speed,
  and on any device when the gate's gradient is wanted, which float32 keeps float32-accurate; else the input
  dtype), ``(B, Hq, N, d)``, and SDPA on
  ``(q, k', v)``; under GQA the query heads of a key/value head are SDPA's head axis and ``v`` is broadcast over
  them with stride 0. Autograd takes SDPA's ``dk'`` back to float32 before the sums over the query heads:
  ``dk = sum_h dk'[h]``, ``dgate[h]`` (as ``<a^T dk'[h], pk - mean pk>``) and the chain rule through ``a`` run in
  float32.
* **Adapter**: ``SDPA(q, k, v) + gate[h] softmax(softmax_scale q pk^T) pv``, the prompt term ``(B, Hq, M, P)`` in
  float32.

Masks: bottom-right causal alignment (docs/contract.md) through :func:`attend`; ``cache_seqlens`` and
``cache_leftpad`` run SDPA per sample on its keys ``[s_b, L_b)`` (none: rows of no key); packed (varlen) sequences
run the padded operator per sequence (one SDPA call each, a host loop).

**Non-finite inputs.** PyTorch's CPU flash kernel gives a finite row where a score is NaN (pytorch/pytorch#141128),
and SDPA's math kernel (its fall-back on every device) adds the causal mask to the scores, so a NaN key makes rows
that do not see it NaN too. Off CUDA, :func:`attend` therefore looks at its operands first (``isfinite``, an
``O((M + N) d)`` read and one host sync per call): finite operands take SDPA's fused kernel, a call with a NaN or
Inf anywhere takes the exact path, the reference's masked softmax over the full score matrix (``O(M N)`` memory,
only in a run that has already diverged), so that NaN reaches exactly the rows the contract says.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._alloc import in_layout_of
from ..reference import _softmax_attention, visible_keys


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sdpa_dtype(t: torch.Tensor, exact_gate: bool = False) -> torch.dtype:
    """The dtype SDPA runs in: float32 for half-precision inputs on the CPU (PyTorch's CPU kernels are no faster in
    half precision without AMX) and, on any device, for the Excitor whose gate gradient is wanted (``exact_gate``:
    that sum cancels, and SDPA's half-precision backward rounds what it is made of; float32 keeps k' and SDPA's
    gradients unrounded, docs/design.md); else the input dtype (the fused kernels of CUDA, MPS, ...)."""
    half = t.dtype in (torch.float16, torch.bfloat16)
    return torch.float32 if half and (t.device.type == "cpu" or exact_gate) else t.dtype


def _finite(*tensors) -> bool:
    """Whether every element is finite: a float32 sum per tensor (NaN and Inf reach it; no bool tensor of the operand's
    size is allocated). A finite tensor whose sum overflows float32 (values near 1e38) counts as not finite: it
    then takes the exact path, which is correct, only slower."""
    return all(bool(torch.isfinite(t.sum(dtype=torch.float32))) for t in tensors)


def _exact(q, k, v, causal, scale, enable_gqa):
    """The reference's masked softmax on the full score matrix (float32 for half inputs)."""
    groups = q.shape[1] // k.shape[1]
    if enable_gqa and groups > 1:
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    ct = _compute_dtype(q.dtype)
    scores = scale * (q.to(ct) @ k.to(ct).transpose(-1, -2))
    return _softmax_attention(scores, v.to(ct), causal).to(q.dtype)


def attend(q, k, v, causal, scale, enable_gqa=False):
    """``F.scaled_dot_product_attention`` with docs/contract.md's bottom-right causal alignment; rows that see no key
    output 0. Off CUDA, operands holding a non-finite value take the exact path (module docstring); under
    ``torch.compile``, which cannot branch on values without a graph break, the fused kernel runs and a non-finite
    operand makes the whole output NaN (never hidden, more rows than the contract's)."""
    if k.shape[-2] == 0:
        return _exact(q, k, v, causal, scale, enable_gqa)
    if q.device.type != "cuda":
        if torch.compiler.is_compiling():
            finite = torch.isfinite(q).all() & torch.isfinite(k).all() & torch.isfinite(v).all()
            return _attend(q, k, v, causal, scale, enable_gqa) + torch.where(finite, 0.0, float("nan")).to(q.dtype)
        if not _finite(q, k, v):
            return _exact(q, k, v, causal, scale, enable_gqa)
    return _attend(q, k, v, causal, scale, enable_gqa)


def _attend(q, k, v, causal, scale, enable_gqa):
    M, N = q.shape[-2], k.shape[-2]
    gqa = dict(enable_gqa=True) if enable_gqa else {}
    if not causal or M == N:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **gqa)
    if M > N:  # query i sees keys j <= i - (M - N): the first M - N rows see none
        tail = F.scaled_dot_product_attention(q[..., M - N:, :], k, v, is_causal=True, scale=scale, **gqa)
        return torch.cat([tail.new_zeros(*tail.shape[:-2], M - N, v.shape[-1]), tail], dim=-2)
    mask = torch.ones(M, N, dtype=torch.bool, device=q.device).tril(N - M)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)


def _per_batch(prompts: torch.Tensor, batch: int) -> torch.Tensor:
    return prompts.unsqueeze(0).expand(batch, *prompts.shape) if prompts.dim() == 3 else prompts


def _in_range(q, k, v, causal, scale, cache_seqlens, cache_leftpad, rows: int = 1, enable_gqa=False):
    """Attention of each sample on its keys ``[cache_leftpad[b], cache_seqlens[b])`` (either None: 0, N), the causal
    mask aligned to the last one (docs/contract.md); sample b owns the ``rows`` leading entries ``[b * rows, (b + 1)
    * rows)``. Outside a trace, SDPA per sample on its slice (the lengths read on the host); inside ``torch.compile``,
    which cannot slice by values, one SDPA call with the ``(B, 1, M, N)`` boolean mask of the ranges (rows that see
    no key: 0)."""
    if not torch.compiler.is_compiling():
        return _per_sample(lambda qb, kb, vb: attend(qb, kb, vb, causal, scale, enable_gqa), q, k, v, cache_seqlens,
                           cache_leftpad, rows)
    M, N = q.shape[-2], k.shape[-2]
    ends, starts = (None if t is None else t.repeat_interleave(rows) for t in (cache_seqlens, cache_leftpad))
    visible = visible_keys(M, N, causal, ends, q.device, starts)
    visible = visible.expand(len(q), *visible.shape[1:])
    gqa = dict(enable_gqa=True) if enable_gqa else {}
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, **gqa)
    o = o.masked_fill(~visible.any(-1, keepdim=True), 0.0)
    if q.device.type != "cuda":  # as attend() under a trace: a non-finite operand makes the output NaN
        finite = torch.isfinite(q).all() & torch.isfinite(k).all() & torch.isfinite(v).all()
        o = o + torch.where(finite, 0.0, float("nan")).to(o.dtype)
    return o


def _per_sample(attention, q, k, v, cache_seqlens, cache_leftpad, rows: int = 1):
    """``attention(q_b, k_b, v_b)`` for each sample on its keys ``[cache_leftpad[b], cache_seqlens[b])`` (either
    None: 0, N), concatenated; sample b owns the ``rows`` leading entries ``[b * rows, (b + 1) * rows)``. With the
    causal mask aligned to the last key, that is the visibility of docs/contract.md."""
    B, N = len(q) // rows, k.shape[-2]
    ends = [N] * B if cache_seqlens is None else cache_seqlens.tolist()
    starts = [0] * B if cache_leftpad is None else cache_leftpad.tolist()
    return torch.cat([attention(q[b * rows:(b + 1) * rows], k[b * rows:(b + 1) * rows, :, s:e],
                                v[b * rows:(b + 1) * rows, :, s:e]) for b, (s, e) in enumerate(zip(starts, ends))])


def excitor_attention(q, k, v, prompt_keys, gate, sim_keys, causal, softmax_scale, prompt_scale, cache_seqlens=None,
                      cache_leftpad=None):
    """docs/contract.md excitor_attention on validated padded inputs; differentiable in every tensor input."""
    B, Hq, M, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    ct = _compute_dtype(q.dtype)
    pk = _per_batch(prompt_keys.to(ct), B)                                          # (B, Hkv, P, d)
    s = (k if sim_keys is None else sim_keys).to(ct)
    a = torch.softmax(prompt_scale * (s @ pk.transpose(-1, -2)), -1)                # (B, Hkv, N, P)
    # gate[h] ke = a (gate[h] (pk - mean_n pk_n)) (sum_n a[j, n] = 1): the gate goes on the P prompts, not on the N
    # keys, and k' is one matrix product added to k, no (B, Hkv, N, d) ke kept
    pk_gated = gate.to(ct).view(1, Hkv, G, 1, 1) * (pk - pk.mean(-2, keepdim=True)).unsqueeze(2)  # (B, Hkv, G, P, d)
    sd = _sdpa_dtype(q, exact_gate=torch.is_grad_enabled() and gate.requires_grad)
    kp = (a.unsqueeze(2) @ pk_gated).add_(k.to(ct).unsqueeze(2)).to(sd)           # (B, Hkv, G, N, d)
    # SDPA's head axis: the G query heads of one key/value head; batch axis: (b, kv head)
    qg = q.to(sd).unflatten(1, (Hkv, G)).flatten(0, 1)                              # (B Hkv, G, M, d)
    kg = kp.flatten(0, 1)
    vg = v.to(sd).unsqueeze(2).expand(B, Hkv, G, *v.shape[2:]).flatten(0, 1)       # stride 0 over G

    def attention(qb, kb, vb):
        return attend(qb, kb, vb, causal, softmax_scale)

    if cache_seqlens is None and cache_leftpad is None:
        o = attention(qg, kg, vg)
    else:  # sample b owns the Hkv entries (b, kv head) of SDPA's batch axis
        o = _in_range(qg, kg, vg, causal, softmax_scale, cache_seqlens, cache_leftpad, rows=Hkv)
    return in_layout_of(o.unflatten(0, (B, Hkv)).flatten(1, 2).to(q.dtype), q)


def adapter_attention(q, k, v, prompt_keys, prompt_values, gate, causal, softmax_scale, cache_seqlens=None,
                      cache_leftpad=None):
    """docs/contract.md adapter_attention on validated padded inputs; differentiable in every tensor input."""
    B, Hq, M, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    ct = _compute_dtype(q.dtype)

    def attention(qb, kb, vb):
        return attend(qb, kb, vb, causal, softmax_scale, enable_gqa=G > 1)

    sd = _sdpa_dtype(q)
    qs, ks, vs = q.to(sd), k.to(sd), v.to(sd)
    o_tokens = (attention(qs, ks, vs) if cache_seqlens is None and cache_leftpad is None
                else _in_range(qs, ks, vs, causal, softmax_scale, cache_seqlens, cache_leftpad, enable_gqa=G > 1))
    pk = _per_batch(prompt_keys.to(ct), B).repeat_interleave(G, 1)                 # (B, Hq, P, d)
    pv = _per_batch(prompt_values.to(ct), B).repeat_interleave(G, 1)
    ap = torch.softmax(softmax_scale * (q.to(ct) @ pk.transpose(-1, -2)), -1)      # (B, Hq, M, P)
    # the gate multiplies the prompt term (an infinite gate makes each element +-inf, as the formula does)
    g, prompt = gate.to(ct).view(1, Hq, 1, 1), ap @ pv
    if torch.is_grad_enabled() and any(t.requires_grad for t in (o_tokens, g, prompt)):
        o = torch.addcmul(o_tokens.to(ct), g, prompt)
    else:  # inference: in place on the prompt term, one (B, Hq, M, d) buffer less
        o = prompt.mul_(g).add_(o_tokens)
    return in_layout_of(o.to(q.dtype), q)
