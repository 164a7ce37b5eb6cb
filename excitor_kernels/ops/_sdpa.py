"""``backend="sdpa"``: both operators as small fused Triton passes around ``F.scaled_dot_product_attention``.

The token attention runs on PyTorch's SDPA (cuDNN, FlashAttention-2 or memory-efficient attention on a GPU;
its CPU kernels or math backend on the CPU); what the prompts add is computed by O(N) Triton kernels
registered as ``torch.library`` custom ops with fake implementations and autograd (notation of docs/contract.md):

* **Excitor** (``excitor_keys``): one program per key tile of one key/value head computes the prompt mixture
  ``a = softmax(prompt_scale s pk^T)`` and the centred reconstruction ``ke = a pk - mean_n pk_n`` (a constant
  added to every key of a head shifts each score row by a constant, which the softmax cannot see; centring keeps
  ``dgate`` free of cancellation) and writes the keys SDPA attends with:

  - ``"expand"`` (MHA, and GQA with values seen per query head): ``k'[h] = k + gate[h] ke``, ``(B, Hq, N, d)``.
    Under GQA the query heads of a key/value head become SDPA's head axis and the batch axis runs over
    ``(b, kv head)``: ``q`` and ``v`` are then views (``v`` broadcast with head stride 0) when their batch and
    head axes merge, which they do for ``(B, H, L, d)``-contiguous tensors; other layouts are copied.
  - ``"concat"`` (GQA only, the exact rewrite ``<q, k + g ke> = <[q, (g / t) q], [k, t ke]>``, t a power of two
    per key/value head, _group_scale): ``[k, t ke]``, ``(B, Hkv, N, 2d)``, with queries ``[q, (gate[h] / t) q]``
    (one more small kernel, whose backward gives ``dq = dq2[:d] + (gate[h] / t) dq2[d:]``) and SDPA's ``enable_gqa``: keys and values stay per key/value head, at
    twice the q/k head dim (SDPA backends that take a q/k head dim different from v's: README, "The sdpa
    backend").

  The backward takes SDPA's ``dk'`` (or ``d[k, t ke]``) through one program per key tile: ``dk = sum_h dk'[h]`` and
  ``dke = sum_h gate[h] dk'[h]`` in float32 registers, then the prompt chain rule (``a`` and ``ke`` recomputed from
  ``s`` and the prompts, nothing saved) gives ``dpk`` and ``dsim``. Those passes take the gate detached and
  make no gate sums: its gradient comes from ``_GateTap`` on the output, whose backward runs
  ``excitor_gate_grad_kernel`` (the sum ``dgate`` cancels, and SDPA's half-precision backward rounds what it is
  made of; docs/design.md).
  The prompt products use the helpers of ``_triton_prompt_keys`` (input-dtype tensor cores, float32 sums).
* **Adapter** (``adapter_prompts``): ``o = SDPA(q, k, v) + gate[h] softmax(softmax_scale q pk^T) pv``; one
  program per query tile computes the prompt softmax, the gate and the sum. The two terms' gradients separate:
  SDPA's backward gives the token part, one program per query tile the prompt part (``dq`` of the prompt term,
  ``dpk``, ``dpv``, ``dgate``).

Causal masks are bottom-right aligned (docs/contract.md) while SDPA's ``is_causal`` is top-left aligned
(``_torch.attend``, shared with the torch backend): equal lengths use ``is_causal``; ``M > N`` attends the last ``N``
queries with ``is_causal`` (the first ``M - N`` see no key: output 0, no gradient); ``M < N`` passes an explicit ``(M, N)`` boolean mask (one per call, not per head; SDPA
then runs its memory-efficient or cuDNN kernel, FlashAttention takes no mask; SDPA keeps it for its backward).
Otherwise nothing ``M x N`` is kept, and no float32 ``(B, H, N, d)`` tensor; SDPA keeps its inputs (``k'`` or
``[k, ke]``) for its backward. Prompt and gate gradients are summed with float32 atomics, or per tile in a fixed
order with ``deterministic=True``. Packed (varlen) sequences are not covered (README, "The sdpa backend"). Off
CUDA a call whose operands hold a NaN or Inf takes ``_torch.attend``'s exact path (PyTorch's CPU flash kernel hides
NaN). The output has ``q``'s layout.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._alloc import in_layout_of, new_output
from ._triton_common import (LOG2E, GradSums, load_rows, pow2, precision, prompt_attention,
                             prompt_attention_backward, prompt_softmax, prompt_strides, store_rows)
from . import _triton_attention as tri
from ._torch import attend
from ._triton_prompt_keys import _tile_and_prompts, prompt_chain_rule, prompt_mixture

BACKENDS = {"sdpa": "expand", "sdpa_concat": "concat"}  # backend name -> GQA form


@triton.jit
def _program(H, BLOCK: tl.constexpr):
    """(row tile, its row offsets, batch entry, head) of this program; grid (row tiles, batch * H heads)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    return tile, tile * BLOCK + tl.arange(0, BLOCK), (bh // H).to(tl.int64), bh % H


@triton.jit
def _group_scale(GATE, g, GROUPS):
    """t = 2^floor(log2 max_h |gate[h]|) over the finite gates of the query heads of key/value head ``g`` (1 when
    they are all 0): the concat form attends with [q, (gate[h] / t) q] and [k, t ke], the same scores, with
    |gate[h] / t| < 2, so that small gates (LLaMA-Excitor's start at 0) do not put the queries' second half in
    float16's subnormal range. A NaN or inf gate reaches its own head only, as in k + gate[h] ke."""
    top = tl.zeros([], tl.float32)
    for hh in range(0, GROUPS):
        size = tl.abs(tl.load(GATE + g * GROUPS + hh).to(tl.float32))
        top = tl.maximum(top, tl.where(size < float("inf"), size, 0.0))
    t = (top.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.where(t == 0.0, 1.0, t)


@triton.jit
def excitor_keys_fwd_kernel(
    K, S, PK, GATE, KP,
    stride_kb, stride_kh, stride_kn, stride_sb, stride_sh, stride_sn, stride_pkb, stride_pkh, stride_pkp,
    stride_ob, stride_oh, stride_on,
    Hkv, N, P, GROUPS, prompt_scale_log2,
    CONCAT: tl.constexpr, SIM_IS_K: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (key tile, batch * key/value head): writes k'[h] = k + gate[h] ke for the GROUPS query
    heads of the key/value head, or [k, t ke] (CONCAT; t = _group_scale). Products on the input dtype's tensor
    cores (PREC), float32 accumulation, as in the prompt-keys pre-pass."""
    _, offs_n, b, g = _program(Hkv, BLOCK_N)
    st, pk, offs_d, offs_p = _tile_and_prompts(S, PK, b, g, 0, N, offs_n, stride_sb, stride_sh, stride_sn, stride_pkb,
                                               stride_pkh, stride_pkp, P, HEAD_DIM, BLOCK_D, BLOCK_P)  # S: sim_keys, or k
    if SIM_IS_K:  # the host passes k as S: its tile is loaded once
        kt = st
    else:
        kt = load_rows(K + b * stride_kb + g * stride_kh, offs_n, stride_kn, offs_d, N, HEAD_DIM, True)
    _, ke = prompt_mixture(st, pk, offs_p, P, prompt_scale_log2, PREC, True)
    if CONCAT:
        out = KP + b * stride_ob + g * stride_oh
        store_rows(out, kt, offs_n, stride_on, offs_d, N, HEAD_DIM)
        store_rows(out + HEAD_DIM, _group_scale(GATE, g, GROUPS) * ke, offs_n, stride_on, offs_d, N, HEAD_DIM)
    else:
        k32 = kt.to(tl.float32)
        for hh in range(0, GROUPS):
            h = g * GROUPS + hh
            gate_h = tl.load(GATE + h).to(tl.float32)
            store_rows(KP + b * stride_ob + h * stride_oh, k32 + gate_h * ke, offs_n, stride_on, offs_d, N, HEAD_DIM)


@triton.jit
def excitor_keys_bwd_kernel(
    DKP, S, PK, GATE, DK, DS, DPK,
    stride_gb, stride_gh, stride_gn, stride_sb, stride_sh, stride_sn,
    stride_pkb, stride_pkh, stride_pkp, stride_dkb, stride_dkh, stride_dkn, stride_dsb, stride_dsh, stride_dsn,
    stride_dpk_t, stride_dpk_b, stride_dpk_h, stride_dpk_p,
    Hkv, N, P, GROUPS, prompt_scale, prompt_scale_log2,
    CONCAT: tl.constexpr, SIM_IS_K: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (key tile, batch * key/value head): from SDPA's gradient of the keys it attended with
    (dk'[h], or d[k, t ke] when CONCAT) to dk, dsim (or dk += dsim), and the prompt gradient (the gate's is
    _GateTap's)."""
    tile, offs_n, b, g = _program(Hkv, BLOCK_N)
    st, pk, offs_d, offs_p = _tile_and_prompts(S, PK, b, g, 0, N, offs_n, stride_sb, stride_sh, stride_sn, stride_pkb,
                                               stride_pkh, stride_pkp, P, HEAD_DIM, BLOCK_D, BLOCK_P)  # S: sim_keys, or k
    a = prompt_softmax(st, pk, offs_p, P, prompt_scale_log2, PREC)
    if CONCAT:  # the gate sits on the query side there: gated_queries_kernel takes its gradient
        base = DKP + b * stride_gb + g * stride_gh
        dk = load_rows(base, offs_n, stride_gn, offs_d, N, HEAD_DIM, True).to(tl.float32)
        dke = _group_scale(GATE, g, GROUPS) * load_rows(base + HEAD_DIM, offs_n, stride_gn, offs_d, N, HEAD_DIM,
                                                        True).to(tl.float32)
    else:
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dke = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for hh in range(0, GROUPS):
            h = g * GROUPS + hh
            gate_h = tl.load(GATE + h).to(tl.float32)
            dkp = load_rows(DKP + b * stride_gb + h * stride_gh, offs_n, stride_gn, offs_d, N, HEAD_DIM,
                             True).to(tl.float32)                         # rows j >= N load as 0
            dk += dkp
            dke += gate_h * dkp
    dsim, dpk = prompt_chain_rule(dke, a, st, pk, offs_p, P, prompt_scale, PREC)  # back through ke and a
    dpk_ptrs = (DPK + tile * stride_dpk_t + b * stride_dpk_b + g * stride_dpk_h + offs_p[:, None] * stride_dpk_p
                + offs_d[None, :])
    tl.atomic_add(dpk_ptrs, dpk, mask=(offs_p[:, None] < P) & (offs_d[None, :] < HEAD_DIM))
    if SIM_IS_K:
        dk += dsim
    else:
        store_rows(DS + b * stride_dsb + g * stride_dsh, dsim, offs_n, stride_dsn, offs_d, N, HEAD_DIM)
    store_rows(DK + b * stride_dkb + g * stride_dkh, dk, offs_n, stride_dkn, offs_d, N, HEAD_DIM)


@triton.jit
def gated_queries_kernel(
    Q, GATE, Q2, DQ2, DQ,
    stride_qb, stride_qh, stride_qm, stride_2b, stride_2h, stride_2m, stride_dqb, stride_dqh, stride_dqm, Hq, M,
    GROUPS, BACKWARD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (query tile, batch * query head) of the concat form's queries q2 = [q, (gate[h] / t) q]
    (t = _group_scale of the head's key/value head): forward writes q2; BACKWARD takes dq2 = [dlo, dhi] to
    dq = dlo + (gate[h] / t) dhi (the gate's gradient is _GateTap's)."""
    _, offs_m, b, h = _program(Hq, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    gate_h = tl.load(GATE + h).to(tl.float32) / _group_scale(GATE, h // GROUPS, GROUPS)
    if BACKWARD:
        base = DQ2 + b * stride_2b + h * stride_2h
        dlo = load_rows(base, offs_m, stride_2m, offs_d, M, HEAD_DIM, True).to(tl.float32)
        dhi = load_rows(base + HEAD_DIM, offs_m, stride_2m, offs_d, M, HEAD_DIM, True).to(tl.float32)
        store_rows(DQ + b * stride_dqb + h * stride_dqh, dlo + gate_h * dhi, offs_m, stride_dqm, offs_d, M, HEAD_DIM)
    else:
        q = load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qm, offs_d, M, HEAD_DIM, True)
        base = Q2 + b * stride_2b + h * stride_2h
        store_rows(base, q, offs_m, stride_2m, offs_d, M, HEAD_DIM)
        store_rows(base + HEAD_DIM, gate_h * q.to(tl.float32), offs_m, stride_2m, offs_d, M, HEAD_DIM)


@triton.jit
def adapter_prompts_fwd_kernel(
    OT, Q, PK, PV, GATE, O,
    stride_tb, stride_th, stride_tm, stride_qb, stride_qh, stride_qm, stride_pkb, stride_pkh, stride_pkp,
    stride_pvb, stride_pvh, stride_pvp, stride_ob, stride_oh, stride_om,
    Hq, M, P, GROUPS, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (query tile, batch * query head): o = o_tokens + gate[h] softmax(scale q pk^T) pv."""
    _, offs_m, b, h = _program(Hq, BLOCK_M)
    g = h // GROUPS
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qm, offs_d, M, HEAD_DIM, True)
    _, op, _, _ = prompt_attention(q, PK + b * stride_pkb + g * stride_pkh, PV + b * stride_pvb + g * stride_pvh,
                                    stride_pkp, stride_pvp, tl.arange(0, BLOCK_P), offs_d, P, qk_scale, HEAD_DIM, PREC)
    ot = load_rows(OT + b * stride_tb + h * stride_th, offs_m, stride_tm, offs_d, M, HEAD_DIM, True)
    o = ot.to(tl.float32) + tl.load(GATE + h).to(tl.float32) * op
    store_rows(O + b * stride_ob + h * stride_oh, o, offs_m, stride_om, offs_d, M, HEAD_DIM)


@triton.jit
def adapter_prompts_bwd_kernel(
    DO, Q, PK, PV, GATE, DQ, DPK, DPV, DGATE,
    stride_dob, stride_doh, stride_dom, stride_qb, stride_qh, stride_qm, stride_pkb, stride_pkh, stride_pkp,
    stride_pvb, stride_pvh, stride_pvp, stride_dqb, stride_dqh, stride_dqm,
    stride_dpk_t, stride_dpk_b, stride_dpk_h, stride_dpk_p, stride_dg_t, stride_dg_b,
    Hq, M, P, GROUPS, ACC_HEAD_DIV, softmax_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (query tile, batch * query head): the prompt term's gradients (prompt_attention_backward
    has the formulas); dq holds the prompt part alone (SDPA's backward gives the token part). The prompt
    gradient slot is (tile, batch, h // ACC_HEAD_DIV): the key/value head for atomics, the query head when
    deterministic (each address then receives one add)."""
    tile, offs_m, b, h = _program(Hq, BLOCK_M)
    g = h // GROUPS
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_P)
    rows = offs_m[:, None] < M
    q = load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qm, offs_d, M, HEAD_DIM, True)
    do = load_rows(DO + b * stride_dob + h * stride_doh, offs_m, stride_dom, offs_d, M, HEAD_DIM, True)
    ap, op, pk, pv = prompt_attention(q, PK + b * stride_pkb + g * stride_pkh, PV + b * stride_pvb + g * stride_pvh,
                                      stride_pkp, stride_pvp, offs_p, offs_d, P, qk_scale, HEAD_DIM, PREC)
    gate_h = tl.load(GATE + h).to(tl.float32)
    dgate, dq, dpk, dpv = prompt_attention_backward(q, do, rows, ap, op, pk, pv, gate_h, softmax_scale, PREC)
    tl.atomic_add(DGATE + tile * stride_dg_t + b * stride_dg_b + h, dgate)
    store_rows(DQ + b * stride_dqb + h * stride_dqh, softmax_scale * dq, offs_m, stride_dqm, offs_d, M, HEAD_DIM)
    slot = tile * stride_dpk_t + b * stride_dpk_b + (h // ACC_HEAD_DIV) * stride_dpk_h
    ptrs = offs_p[:, None] * stride_dpk_p + offs_d[None, :]
    pmask = (offs_p[:, None] < P) & (offs_d[None, :] < HEAD_DIM)
    tl.atomic_add(DPK + slot + ptrs, dpk, mask=pmask)
    tl.atomic_add(DPV + slot + ptrs, dpv, mask=pmask)


# ----------------------------------------------------------------------------------------------
# Launchers (host side)
# ----------------------------------------------------------------------------------------------
def _rows_block(on_gpu: bool, L: int, itemsize: int) -> tuple[int, dict]:
    """(rows per tile, launch options) of the O(L) prompt kernels: on a GPU 64 rows (float32: 16) and 8 warps, no
    register spills on sm_80 or sm_90 at d <= 128, P <= 64 (bench.static); at most 32 rows interpreted."""
    if on_gpu:
        return (16 if itemsize > 2 else 64), dict(num_warps=8)
    return min(32, pow2(L)), {}


def excitor_keys(k, pk, gate, sim, prompt_scale, concat):
    """``k' (B, Hq, N, d)`` with ``k'[h] = k + gate[h] ke``, or ``[k, ke] (B, Hkv, N, 2d)`` when ``concat``."""
    B, Hkv, N, d = k.shape
    Hq, P = gate.shape[0], pk.shape[-2]
    shape = (B, Hkv, N, 2 * d) if concat else (B, Hq, N, d)
    kp = new_output(shape, dtype=k.dtype, device=k.device)
    s = k if sim is None else sim
    block, opts = _rows_block(k.is_cuda, N, k.element_size())
    excitor_keys_fwd_kernel[(triton.cdiv(N, block), B * Hkv)](
        k, s, pk, gate.contiguous(), kp, *k.stride()[:3], *s.stride()[:3], *prompt_strides(pk), *kp.stride()[:3],
        Hkv, N, P, Hq // Hkv, prompt_scale * LOG2E,
        CONCAT=concat, SIM_IS_K=sim is None, HEAD_DIM=d, BLOCK_N=block, BLOCK_D=pow2(d), BLOCK_P=pow2(P),
        PREC=precision(k), **opts,
    )
    return kp


def excitor_keys_backward(dkp, k, pk, gate, sim, prompt_scale, concat, deterministic):
    """(dk, dpk, dsim) from SDPA's gradient of :func:`excitor_keys`' output (gate detached)."""
    B, Hkv, N, d = k.shape
    Hq, P = gate.shape[0], pk.shape[-2]
    if dkp.stride(-1) != 1:
        dkp = dkp.contiguous()
    s = k if sim is None else sim
    dk = new_output(k.shape, dtype=k.dtype, device=k.device, like=k)
    dsim = None if sim is None else new_output(sim.shape, dtype=sim.dtype, device=sim.device, like=sim)
    ds = k if dsim is None else dsim
    block, opts = _rows_block(k.is_cuda, N, k.element_size())
    tiles = triton.cdiv(N, block)
    sums = GradSums(tiles, B, Hkv, 0, P, d, pk.dim() == 4, deterministic, k.device)
    excitor_keys_bwd_kernel[(tiles, B * Hkv)](
        dkp, s, pk, gate.contiguous(), dk, ds, sums.prompt,
        *dkp.stride()[:3], *s.stride()[:3], *prompt_strides(pk), *dk.stride()[:3],
        *ds.stride()[:3], *sums.prompt_strides,
        Hkv, N, P, Hq // Hkv, prompt_scale, prompt_scale * LOG2E,
        CONCAT=concat, SIM_IS_K=sim is None, HEAD_DIM=d, BLOCK_N=block, BLOCK_D=pow2(d), BLOCK_P=pow2(P),
        PREC=precision(k), **opts,
    )
    return dk, sums.prompt_grad(sums.prompt, Hkv, pk), dsim


def _gated_launch(q, gate, kv_heads, q2, dq, backward):
    """q2: the forward's output, or the backward's dq2."""
    B, Hq, M, d = q.shape
    block, opts = _rows_block(q.is_cuda, M, q.element_size())
    gated_queries_kernel[(triton.cdiv(M, block), B * Hq)](
        q, gate.contiguous(), q2, q2, dq, *q.stride()[:3], *q2.stride()[:3], *dq.stride()[:3], Hq, M, Hq // kv_heads,
        BACKWARD=backward, HEAD_DIM=d, BLOCK_M=block, BLOCK_D=pow2(d), **opts,
    )


def gated_queries(q, gate, kv_heads):
    """The concat form's queries ``[q, (gate[h] / t) q] (B, Hq, M, 2d)`` (t per key/value head: _group_scale)."""
    B, Hq, M, d = q.shape
    q2 = new_output((B, Hq, M, 2 * d), dtype=q.dtype, device=q.device)
    _gated_launch(q, gate, kv_heads, q2, q2, False)
    return q2


def gated_queries_backward(dq2, q, gate, kv_heads):
    """dq from the gradient of :func:`gated_queries`' output (gate detached)."""
    dq2 = dq2 if dq2.stride(-1) == 1 else dq2.contiguous()
    dq = new_output(q.shape, dtype=q.dtype, device=q.device, like=q)
    _gated_launch(q, gate, kv_heads, dq2, dq, True)
    return dq


def adapter_prompts(o_tokens, q, pk, pv, gate, softmax_scale):
    """``o_tokens + gate[h] softmax(softmax_scale q pk^T) pv``, in ``q``'s layout."""
    B, Hq, M, d = q.shape
    Hkv, P = pk.shape[-3], pk.shape[-2]
    o = new_output(q.shape, dtype=q.dtype, device=q.device, like=q)
    block, opts = _rows_block(q.is_cuda, M, q.element_size())
    adapter_prompts_fwd_kernel[(triton.cdiv(M, block), B * Hq)](
        o_tokens, q, pk, pv, gate.contiguous(), o, *o_tokens.stride()[:3], *q.stride()[:3], *prompt_strides(pk),
        *prompt_strides(pv), *o.stride()[:3], Hq, M, P, Hq // Hkv, softmax_scale * LOG2E,
        HEAD_DIM=d, BLOCK_M=block, BLOCK_D=pow2(d), BLOCK_P=pow2(P), PREC=precision(q),
        **opts,
    )
    return o


def adapter_prompts_backward(do, q, pk, pv, gate, softmax_scale, deterministic):
    """(dq of the prompt term, dpk, dpv, dgate)."""
    B, Hq, M, d = q.shape
    Hkv, P = pk.shape[-3], pk.shape[-2]
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq = new_output(q.shape, dtype=q.dtype, device=q.device, like=q)
    block, opts = _rows_block(q.is_cuda, M, q.element_size())
    tiles = triton.cdiv(M, block)
    sums = GradSums(tiles, B, Hq if deterministic else Hkv, Hq, P, d, pk.dim() == 4, deterministic, q.device,
                    values=True)
    adapter_prompts_bwd_kernel[(tiles, B * Hq)](
        do, q, pk, pv, gate.contiguous(), dq, sums.prompt, sums.value, sums.gate,
        *do.stride()[:3], *q.stride()[:3], *prompt_strides(pk), *prompt_strides(pv), *dq.stride()[:3],
        *sums.prompt_strides, *sums.gate_strides, Hq, M, P, Hq // Hkv, 1 if deterministic else Hq // Hkv,
        softmax_scale, softmax_scale * LOG2E,
        HEAD_DIM=d, BLOCK_M=block, BLOCK_D=pow2(d), BLOCK_P=pow2(P), PREC=precision(q),
        **opts,
    )
    return dq, sums.prompt_grad(sums.prompt, Hkv, pk), sums.prompt_grad(sums.value, Hkv, pv), sums.gate_grad(gate)


# ----------------------------------------------------------------------------------------------
# Custom ops (fake implementations and autograd: torch.compile traces the whole path)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("excitor_kernels::sdpa_excitor_keys", mutates_args=())
def _keys_op(k: Tensor, prompt_keys: Tensor, gate: Tensor, sim_keys: Optional[Tensor], prompt_scale: float,
             concat: bool, deterministic: bool) -> Tensor:
    return excitor_keys(k, prompt_keys, gate, sim_keys, prompt_scale, concat)


@_keys_op.register_fake
def _(k, prompt_keys, gate, sim_keys, prompt_scale, concat, deterministic):
    B, Hkv, N, d = k.shape
    return k.new_empty((B, Hkv, N, 2 * d) if concat else (B, gate.shape[0], N, d))


@torch.library.custom_op("excitor_kernels::sdpa_excitor_keys_bwd", mutates_args=())
def _keys_bwd_op(dkp: Tensor, k: Tensor, prompt_keys: Tensor, gate: Tensor, sim_keys: Optional[Tensor],
                 prompt_scale: float, concat: bool, deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    dk, dpk, dsim = excitor_keys_backward(dkp, k, prompt_keys, gate, sim_keys, prompt_scale, concat, deterministic)
    return dk, dpk, (k.new_empty(0) if dsim is None else dsim)


@_keys_bwd_op.register_fake
def _(dkp, k, prompt_keys, gate, sim_keys, prompt_scale, concat, deterministic):
    dsim = k.new_empty(0) if sim_keys is None else torch.empty_like(sim_keys)
    return torch.empty_like(k), torch.empty_like(prompt_keys), dsim


def _keys_setup(ctx, inputs, output):
    k, prompt_keys, gate, sim_keys, *args = inputs
    ctx.save_for_backward(k, prompt_keys, gate, sim_keys)
    ctx.args = args  # prompt_scale, concat, deterministic


def _detached_gate(ctx, index):
    if ctx.needs_input_grad[index]:
        raise RuntimeError("the sdpa backend's key and query ops take the gate detached (its gradient is _GateTap's)")


def _keys_backward(ctx, dkp):
    _detached_gate(ctx, 2)
    k, prompt_keys, gate, sim_keys = ctx.saved_tensors
    dk, dpk, dsim = _keys_bwd_op(dkp, k, prompt_keys, gate, sim_keys, *ctx.args)
    return dk, dpk, None, (dsim if sim_keys is not None else None), None, None, None


_keys_op.register_autograd(_keys_backward, setup_context=_keys_setup)


@torch.library.custom_op("excitor_kernels::sdpa_gated_queries", mutates_args=())
def _gated_op(q: Tensor, gate: Tensor, kv_heads: int) -> Tensor:
    return gated_queries(q, gate, kv_heads)


@_gated_op.register_fake
def _(q, gate, kv_heads):
    return q.new_empty((*q.shape[:-1], 2 * q.shape[-1]))


@torch.library.custom_op("excitor_kernels::sdpa_gated_queries_bwd", mutates_args=())
def _gated_bwd_op(dq2: Tensor, q: Tensor, gate: Tensor, kv_heads: int) -> Tensor:
    return gated_queries_backward(dq2, q, gate, kv_heads)


@_gated_bwd_op.register_fake
def _(dq2, q, gate, kv_heads):
    return torch.empty_like(q)


def _gated_setup(ctx, inputs, output):
    q, gate, kv_heads = inputs
    ctx.save_for_backward(q, gate)
    ctx.kv_heads = kv_heads


def _gated_backward(ctx, dq2):
    _detached_gate(ctx, 1)
    return _gated_bwd_op(dq2, *ctx.saved_tensors, ctx.kv_heads), None, None


_gated_op.register_autograd(_gated_backward, setup_context=_gated_setup)


@torch.library.custom_op("excitor_kernels::sdpa_adapter_prompts", mutates_args=())
def _prompts_op(o_tokens: Tensor, q: Tensor, prompt_keys: Tensor, prompt_values: Tensor, gate: Tensor,
                softmax_scale: float, deterministic: bool) -> Tensor:
    return adapter_prompts(o_tokens, q, prompt_keys, prompt_values, gate, softmax_scale)


@_prompts_op.register_fake
def _(o_tokens, q, prompt_keys, prompt_values, gate, softmax_scale, deterministic):
    return torch.empty_like(q)


@torch.library.custom_op("excitor_kernels::sdpa_adapter_prompts_bwd", mutates_args=())
def _prompts_bwd_op(do: Tensor, q: Tensor, prompt_keys: Tensor, prompt_values: Tensor, gate: Tensor,
                    softmax_scale: float, deterministic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return adapter_prompts_backward(do, q, prompt_keys, prompt_values, gate, softmax_scale, deterministic)


@_prompts_bwd_op.register_fake
def _(do, q, prompt_keys, prompt_values, gate, softmax_scale, deterministic):
    return torch.empty_like(q), torch.empty_like(prompt_keys), torch.empty_like(prompt_values), torch.empty_like(gate)


def _prompts_setup(ctx, inputs, output):
    _, q, prompt_keys, prompt_values, gate, *args = inputs
    ctx.save_for_backward(q, prompt_keys, prompt_values, gate)
    ctx.args = args  # softmax_scale, deterministic


def _prompts_backward(ctx, do):
    dq, dpk, dpv, dgate = _prompts_bwd_op(do, *ctx.saved_tensors, *ctx.args)
    return do, dq, dpk, dpv, dgate, None, None  # the token output passes its gradient through unchanged


_prompts_op.register_autograd(_prompts_backward, setup_context=_prompts_setup)


@torch.library.custom_op("excitor_kernels::sdpa_excitor_gate_grad", mutates_args=())
def _gate_grad_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, prompt_keys: Tensor, gate: Tensor,
                  sim_keys: Optional[Tensor], causal: bool, softmax_scale: float, prompt_scale: float) -> Tensor:
    return tri.excitor_gate_gradient(do, q, k, v, prompt_keys, gate, sim_keys, causal, softmax_scale, prompt_scale)


@_gate_grad_op.register_fake
def _(do, q, k, v, prompt_keys, gate, sim_keys, causal, softmax_scale, prompt_scale):
    return torch.empty_like(gate)


class _GateTap(torch.autograd.Function):
    """o unchanged; its backward passes ``do`` on and gives the gate its gradient (``_gate_grad_op``: SDPA's
    half-precision backward rounds what the gate gradient's cancelling sum is made of; the key and query ops
    take the gate detached)."""

    @staticmethod
    def forward(ctx, o, q, k, v, prompt_keys, gate, sim_keys, causal, softmax_scale, prompt_scale):
        ctx.save_for_backward(q, k, v, prompt_keys, gate, sim_keys)
        ctx.args = (causal, softmax_scale, prompt_scale)
        return o.as_strided(o.shape, o.stride())  # a view with o's strides (view_as drops them)

    @staticmethod
    def backward(ctx, do):
        q, k, v, prompt_keys, gate, sim_keys = ctx.saved_tensors
        dgate = _gate_grad_op(do, q, k, v, prompt_keys, gate, sim_keys, *ctx.args) if ctx.needs_input_grad[5] else None
        return do, None, None, None, None, dgate, None, None, None, None


# ----------------------------------------------------------------------------------------------
# The two operators
# ----------------------------------------------------------------------------------------------
def _per_group(t, Hkv):
    """(B, Hkv * G, L, d) -> (B * Hkv, G, L, d): a view when batch and head axes merge, else a copy."""
    return t.unflatten(1, (Hkv, -1)).flatten(0, 1)


def excitor_attention(q, k, v, prompt_keys, gate, sim_keys, causal, softmax_scale, prompt_scale, deterministic,
                      gqa_form="expand"):
    """docs/contract.md excitor_attention on validated padded inputs; differentiable in every tensor input."""
    B, Hq, M, d = q.shape
    Hkv = k.shape[1]
    det = bool(deterministic)
    g = gate.detach()  # the gate's gradient comes from _GateTap
    if Hq != Hkv and gqa_form == "concat":
        kk = _keys_op(k, prompt_keys, g, sim_keys, prompt_scale, True, det)           # [k, t ke] (B, Hkv, N, 2d)
        qq = _gated_op(q, g, Hkv)                                                       # [q, (gate[h] / t) q]
        o = attend(qq, kk, v, causal, softmax_scale, enable_gqa=True)
    else:
        kp = _keys_op(k, prompt_keys, g, sim_keys, prompt_scale, False, det)           # k' (B, Hq, N, d)
        if Hq == Hkv:
            o = attend(q, kp, v, causal, softmax_scale)
        else:
            G = Hq // Hkv
            v_per_head = v.unsqueeze(2).expand(B, Hkv, G, *v.shape[2:]).flatten(0, 1)  # stride 0 over G
            o = attend(_per_group(q, Hkv), _per_group(kp, Hkv), v_per_head, causal, softmax_scale)
            o = o.unflatten(0, (B, Hkv)).flatten(1, 2)
    o = in_layout_of(o, q)
    if not gate.requires_grad:
        return o
    return _GateTap.apply(o, q, k, v, prompt_keys, gate, sim_keys, causal, softmax_scale, prompt_scale)


def adapter_attention(q, k, v, prompt_keys, prompt_values, gate, causal, softmax_scale, deterministic):
    """docs/contract.md adapter_attention on validated padded inputs; differentiable in every tensor input."""
    o_tokens = attend(q, k, v, causal, softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
    return _prompts_op(o_tokens, q, prompt_keys, prompt_values, gate, softmax_scale, bool(deterministic))
