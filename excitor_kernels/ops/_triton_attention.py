"""Fused Triton kernels shared by ``excitor_attention`` and ``adapter_attention`` (design: docs/design.md).

One family of flash-attention kernels; the constexpr ``BYPASS`` picks what rides along with the causal
attention of ``q, k, v`` (notation of docs/contract.md, per batch ``b`` and query head ``h`` of key/value
head ``g``):

* ``BYPASS == 0``: plain attention (the baseline of the static cost report, ``python -m bench.static``).
* ``BYPASS == 1`` (Excitor): the queries of head ``h`` meet ``k'_j = k_j + gate[h] ke_j``, where ``ke`` is the
  centred prompt reconstruction written once per key/value head by the pre-pass of ``_triton_prompt_keys``.
  ``gated_keys`` writes ``k'`` for one group member's query heads at a time (``k``'s shape) before its forward
  and again before its dk/dv and dq launches (not saved), and those kernels read it where plain attention reads
  ``k``: the forward and dk/dv main loops are plain attention's; the dk/dv kernel adds ``dke`` after its loop.
  The dq kernel forms the scores from ``k`` and the centred prompt weights instead, to make the gate gradient
  from float32-grade terms (``attention_bwd_dq_kernel``; ``excitor_gate_grad_kernel`` makes it alone for the
  sdpa and CUDA backends).
* ``BYPASS == 2`` (Adapter): each query tile also attends to the prompts with its own softmax,
      o_i += gate[h] sum_n softmax_n(softmax_scale <q_i, pk_n>) pv_n,
  and the forward also writes the token attention's output alone (``ot``), which the backward's delta reads.

Tiles (``blocks``): on sm_90 every product is a wgmma of at least 64 rows per warpgroup (at d = 128: forward
128 x 128 and dq 128 x 64 query x key tiles, dk/dv 128 keys x 32 queries, 8 warps) with descriptor (TMA) loads;
on sm_80 each warp owns 16 query rows, so no warp repeats another's mma.sync.

Scores are kept in base 2: ``qk_scale = softmax_scale * log2(e)`` and the saved row statistic is
``lse_i = max_j + log2(sum_j exp2(...))`` in those units; a row that sees no key stores ``lse = +inf``
so that ``exp2(score - lse) = 0`` in the backward and the row passes no gradient.

Backward: ``delta`` pre-pass, then two launches as in FlashAttention-2: key-tile programs (one per key tile
and key/value head, looping over its query heads) for dk, dv and, for the Excitor, ``dke = sum_h gate[h]
dk'[h]``; query-tile programs for dq, the Excitor's gate and the Adapter's prompt gradients. The Excitor's prompt
chain rule then runs once per key tile in the post-pass of ``_triton_prompt_keys``.

The constexpr ``VARLEN`` switches from padded ``(B, H, L, d)`` batches to packed sequences (flash-attention's
varlen layout): batch index ``b`` is then a sequence whose rows start at ``cu_seqlens[b]`` and whose
lengths replace ``M`` and ``N`` (which only size the grid); see :class:`RowLayout`.

Cross-program reductions (prompt and gate gradients) go through ``tl.atomic_add`` into float32
buffers. With ``deterministic=True`` the launcher gives each program its own slice of the buffer
(non-zero tile strides), so every address receives exactly one add and the host sums the slices in a
fixed order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import new_output
from ._triton_common import (ADAPTER, AT_SCALE, EXCITOR, LOG2E, GradSums, RowLayout, dot, load_rows, load_tile, pow2,
                             precision, prompt_attention, prompt_attention_backward, prompt_strides, prompt_weights,
                             row_source, sequence, split_scaled, stats_shape, store_rows)
from ._triton_prompt_keys import prompt_keys_backward, prompt_keys_forward
from ._triton_tuning import autotune_enabled, candidates, descriptors_ok, length_bucket, pick, prepare_descriptors

__all__ = ["ADAPTER", "EXCITOR", "RowLayout", "stats_shape", "attention_forward", "attention_backward", "blocks"]


@triton.jit
def _last_key(offs_m, N, shift, CAUSAL: tl.constexpr):
    """Per row, the last key it sees: min(i + shift, N - 1) when causal, else N - 1 (row i sees keys
    j <= _last_key(i): one comparison per score)."""
    last = tl.zeros_like(offs_m) + (N - 1)
    if CAUSAL:
        last = tl.minimum(offs_m + shift, last)
    return last


@triton.jit
def _row_parts(x, PARTS: tl.constexpr):
    """sum_j x_ij over a (rows, n) tile as (rows, PARTS) partial sums, column j added into column j mod PARTS.
    PARTS = 8 (half inputs, row_parts): the tensor cores' accumulator layouts (mma.sync, wgmma) give each thread
    the same 2 of every 8 columns of its rows, so these sums stay in the thread, and a row's sum is finished
    once, after the key loop (tl.sum(., 1)), not by shuffles across the row's 4 threads per key tile
    (FlashAttention's deferred reduction); 4 parts, 1 of 8 columns a thread, would move values between threads.
    PARTS = 1: the whole row per tile."""
    if PARTS == 1:
        parts = tl.sum(x, 1)[:, None]
    else:
        parts = tl.sum(tl.reshape(x, [x.shape[0], x.shape[1] // PARTS, PARTS]), 1)
    return parts


@triton.jit
def row_parts(T):
    """The row sums' parts (_row_parts) for inputs like the tensor T points to: 8 for half types; 1 for float32,
    whose FMA products' layouts give a thread no fixed columns (8 parts there spill, bench.static)."""
    return 1 if T.dtype.element_ty == tl.float32 else 8


@triton.jit
def _scores(q, q_base, stride_qm, offs_m, M, k_src, stride_kn, offs_d, start_n, N, MASKED: tl.constexpr,
            BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr, DESC: tl.constexpr,
            Q_CHUNK: tl.constexpr):
    """q k^T for key tile [start_n, start_n + BLOCK_N). Q_CHUNK > 0 (float32): summed over head-dim chunks of
    Q_CHUNK columns, q's chunk re-read per key tile, so that no whole (rows, d) float32 operand is held in
    registers (triton's float32 dot holds its operands' rows over the whole reduction and spills at d = 128)."""
    if Q_CHUNK > 0:
        qk = tl.zeros([offs_m.shape[0], BLOCK_N], tl.float32)
        for c in tl.static_range(0, HEAD_DIM, Q_CHUNK):
            cols = c + tl.arange(0, Q_CHUNK)
            qc = load_rows(q_base, offs_m, stride_qm, cols, M, HEAD_DIM, True)
            kc = load_rows(k_src, start_n + tl.arange(0, BLOCK_N), stride_kn, cols, N, HEAD_DIM, MASKED)
            qk += dot(qc, tl.trans(kc), PREC)
    else:
        kt = load_tile(k_src, start_n, stride_kn, offs_d, N, BLOCK_N, HEAD_DIM, MASKED, DESC)
        qk = dot(q, tl.trans(kt), PREC)
    return qk


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, q_base, stride_qm, offs_m, M, last, k_src, v_src, stride_kn, stride_vn, offs_d,
              start_n, N, qk_scale, MASKED: tl.constexpr, POS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
              HEAD_DIM: tl.constexpr, PREC: tl.constexpr, DESC: tl.constexpr, Q_CHUNK: tl.constexpr,
              TC_ROW_SUM: tl.constexpr):
    """Online softmax over key tile [start_n, start_n + BLOCK_N); MASKED keeps keys j <= last[i] (the causal
    and the j < N masks). POS_SCALE (qk_scale > 0): rowmax(qk_scale s) = qk_scale rowmax(s), so the scale is
    applied once, inside exp2's argument (one FFMA per score); otherwise the scores are scaled first.
    The row sum l, (rows, row_parts(Q)): float32 sums of the float32 weights (one FADD per score) as
    _row_parts' parts; TC_ROW_SUM: (rows, 8), 8 equal columns, the rounded weights (those p v uses) times a
    column of ones on the tensor cores (docs/design.md, "The softmax's row sum")."""
    qk = _scores(q, q_base, stride_qm, offs_m, M, k_src, stride_kn, offs_d, start_n, N, MASKED, BLOCK_N, HEAD_DIM,
                 PREC, DESC, Q_CHUNK)
    scale = qk_scale
    if not POS_SCALE:
        qk = qk * qk_scale
        scale = 1.0
    if MASKED:
        qk = tl.where((start_n + tl.arange(0, BLOCK_N))[None, :] <= last[:, None], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
    if MASKED:  # a row may have seen nothing yet: keep exp2 away from (-inf) - (-inf)
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk * scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    vt = load_tile(v_src, start_n, stride_vn, offs_d, N, BLOCK_N, HEAD_DIM, MASKED, DESC)
    pr = p.to(vt.dtype)
    if TC_ROW_SUM:
        ones = tl.full([BLOCK_N, 8], 1.0, tl.float32).to(vt.dtype)  # (triton 3.8's interpreter has no bf16 full)
        l_i = dot(pr, ones, PREC, acc=l_i * alpha[:, None])
    else:
        l_i = l_i * alpha[:, None] + _row_parts(p, l_i.shape[1])
    acc = acc * alpha[:, None] + dot(pr, vt, PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_keys(acc, l_i, m_i, q, q_base, stride_qm, offs_m, M, shift, k_src, v_src, stride_kn, stride_vn, offs_d, full,
              hi, N, qk_scale, CAUSAL: tl.constexpr, POS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
              HEAD_DIM: tl.constexpr, PREC: tl.constexpr, DESC: tl.constexpr, WARP_SPEC: tl.constexpr,
              Q_CHUNK: tl.constexpr, TC_ROW_SUM: tl.constexpr):
    """Online softmax over key tiles [0, hi): [0, full) need no mask, [full, hi) do (_causal_key_bounds).
    Warp specialisation takes a kernel's single loop: WARP_SPEC runs one loop over [0, hi), every tile masked.
    The masked tiles' last keys are formed after the unmasked loop (not live across it)."""
    lo = 0
    if not WARP_SPEC:
        # pointer loads: the tiles' pointers advance by BLOCK_N rows per tile (the loop counter then stays 32-bit)
        k_tile, v_tile = k_src, v_src
        for start_n in tl.range(0, full, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, q_base, stride_qm, offs_m, M, offs_m, k_tile, v_tile,
                                      stride_kn, stride_vn, offs_d, start_n if DESC else 0, N, qk_scale, False,
                                      POS_SCALE, BLOCK_N, HEAD_DIM, PREC, DESC, Q_CHUNK, TC_ROW_SUM)
            if not DESC:
                k_tile += BLOCK_N * stride_kn
                v_tile += BLOCK_N * stride_vn
        lo = full
    last = _last_key(offs_m, N, shift, CAUSAL)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, q_base, stride_qm, offs_m, M, last, k_src, v_src, stride_kn,
                                  stride_vn, offs_d, start_n, N, qk_scale, True, POS_SCALE, BLOCK_N, HEAD_DIM, PREC,
                                  DESC, Q_CHUNK, TC_ROW_SUM)
    return acc, l_i, m_i


@triton.jit
def _causal_key_bounds(start_m, M, N, shift, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range seen by query tile [start_m, start_m + BLOCK_M) of M queries: tiles [0, full) need no mask,
    [full, hi) do. A tile past the end of a shorter packed sequence (start_m >= M) sees no key, hi = 0 (its
    program runs on and stores nothing: triton's sm_90 warp specialisation rejects an early return)."""
    if CAUSAL:
        hi = tl.minimum(N, tl.maximum(start_m + BLOCK_M + shift, 0))
        full = tl.minimum(N // BLOCK_N, tl.maximum(start_m + shift + 1, 0) // BLOCK_N) * BLOCK_N
    else:
        hi = N
        full = N // BLOCK_N * BLOCK_N
    hi = tl.where(start_m < M, hi, 0)
    return tl.minimum(full, hi), hi


@triton.jit
def _key_sources(K, V, b, g, k0, N, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, DESC: tl.constexpr):
    """``row_source`` of the keys (k, or one group member's k', gated_keys) and values of key/value head g."""
    k_src = row_source(K + b * stride_kb + k0 * stride_kn + g * stride_kh, N, stride_kn, BLOCK_N, BLOCK_D, HEAD_DIM,
                       DESC)
    v_src = row_source(V + b * stride_vb + k0 * stride_vn + g * stride_vh, N, stride_vn, BLOCK_N, BLOCK_D, HEAD_DIM,
                       DESC)
    return k_src, v_src


@triton.jit
def _query_tile(Q, stride_qb, stride_qh, stride_qm, CU_Q, CU_K, Hq, M, N, GROUPS, member,
                VARLEN: tl.constexpr, BLOCK_M: tl.constexpr):
    """(b, h, g, q0, k0, M, N, start_m) of this program's query tile. Grid: query tiles x batch * query heads
    (member < 0), or x batch * key/value heads for the query heads h = g * GROUPS + member of one group member
    (the Excitor's launches, one per member)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    heads = tl.where(member < 0, Hq, Hq // GROUPS)
    b = (bh // heads).to(tl.int64)
    h = tl.where(member < 0, bh % heads, bh % heads * GROUPS + member)
    q0, M = sequence(CU_Q, b, M, VARLEN)
    k0, N = sequence(CU_K, b, N, VARLEN)
    return b, h, h // GROUPS, q0, k0, M, N, start_m


@triton.jit
def attention_fwd_kernel(
    Q, K, V, PK, PV, GATE, O, OT, LSE, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkb, stride_pkh, stride_pkp,
    stride_pvb, stride_pvh, stride_pvp,
    stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
    Hq, M, N, P, GROUPS, member, qk_scale,
    CAUSAL: tl.constexpr, BYPASS: tl.constexpr, VARLEN: tl.constexpr, POS_SCALE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr, PREC: tl.constexpr, DESC: tl.constexpr, WARP_SPEC: tl.constexpr, Q_CHUNK: tl.constexpr,
    TC_ROW_SUM: tl.constexpr,
):
    """One program per (query tile, batch or sequence * query head; _query_tile); M, N are the longest lengths.
    K is k, or for the Excitor group member ``member``'s k' (gated_keys), so the key loop is plain attention's.
    DESC: q, k, v tiles through tensor descriptors (TMA on sm_90); WARP_SPEC: warp-specialised key loops
    (loads, tensor-core products and softmax in separate warp groups; sm_90 and later); TC_ROW_SUM: the softmax's
    row sum on the tensor cores (_fwd_tile)."""
    b, h, g, q0, k0, M, N, start_m = _query_tile(Q, stride_qb, stride_qh, stride_qm, CU_Q, CU_K, Hq, M, N, GROUPS,
                                                 member, VARLEN, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    shift = N - M  # bottom-right causal alignment: row i sees keys j <= i + shift

    q_base = Q + b * stride_qb + q0 * stride_qm + h * stride_qh
    q_src = row_source(q_base, M, stride_qm, BLOCK_M, BLOCK_D, HEAD_DIM, DESC)
    q = load_tile(q_src, start_m, stride_qm, offs_d, M, BLOCK_M, HEAD_DIM, True, DESC)
    k_src, v_src = _key_sources(K, V, b, g, k0, N, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                                BLOCK_N, BLOCK_D, HEAD_DIM, DESC)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M, 8 if TC_ROW_SUM else row_parts(Q)], tl.float32)  # the row sum's parts (_fwd_tile)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full, hi = _causal_key_bounds(start_m, M, N, shift, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_keys(acc, l_i, m_i, q, q_base, stride_qm, offs_m, M, shift, k_src, v_src, stride_kn,
                              stride_vn, offs_d, full, hi, N, qk_scale, CAUSAL, POS_SCALE, BLOCK_N, HEAD_DIM, PREC,
                              DESC, WARP_SPEC, Q_CHUNK, TC_ROW_SUM)
    if TC_ROW_SUM:
        l_i = tl.max(l_i, 1)  # its columns are equal
    else:
        l_i = tl.sum(l_i, 1)
    _, M = sequence(CU_Q, b, M, VARLEN, AGAIN=True)  # the stores' row masks, not kept from q's load (registers)

    # a row that sees no key outputs 0 and stores lse = +inf, whatever the tiles it skipped held; a row that
    # sees keys whose scores are all -inf has l = 0 and gets 0 / 0 = NaN, as the softmax of the formula
    empty = (offs_m < 0) | (N == 0)
    if CAUSAL:
        empty = empty | (offs_m < -shift)  # not offs_m + shift: the loops' value, which would stay live across them
    o = tl.where(empty[:, None], 0.0, acc / l_i[:, None])
    o_rows = b * stride_ob + q0 * stride_om + h * stride_oh
    if BYPASS == 2:
        # the token attention's output alone (OT, o's layout), saved for the backward's delta: o minus the prompt
        # term, rounded, would lose it where the prompt term dominates (or is not finite)
        store_rows(OT + o_rows, o, offs_m, stride_om, offs_d, M, HEAD_DIM)
        # the prompt term, its scores q pk^T as the key tiles' (_scores: chunked for float32)
        offs_p = tl.arange(0, BLOCK_P)
        pk_base = PK + b * stride_pkb + g * stride_pkh
        z = _scores(q, q_base, stride_qm, offs_m, M, pk_base, stride_pkp, offs_d, 0, P, True, BLOCK_P, HEAD_DIM,
                    PREC, False, Q_CHUNK)
        ap = prompt_weights(z, offs_p, P, qk_scale)
        pv = load_rows(PV + b * stride_pvb + g * stride_pvh, offs_p, stride_pvp, offs_d, P, HEAD_DIM, True)
        o += tl.load(GATE + h).to(tl.float32) * dot(ap, pv, PREC)  # gate times the product: inf gates as the formula
    store_rows(O + o_rows, o, offs_m, stride_om, offs_d, M, HEAD_DIM)
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_i))
    tl.store(LSE + b * stride_lb + h * stride_lh + q0 + offs_m, lse, mask=offs_m < M)


@triton.jit
def attention_bwd_preprocess_kernel(
    O, DO, DELTA, CU_Q, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, stride_lb, stride_lh,
    Hq, M, VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta_i = <do_i, ot_i>, ot the token attention's output (the Excitor's o; the Adapter's forward saves it
    apart from the prompt term): the D of its softmax backward, ds = p * (do v^T - delta)."""
    b, h, _, q0, _, M, _, start_m = _query_tile(O, stride_ob, stride_oh, stride_om, CU_Q, CU_Q, Hq, M, M, 1, -1,
                                                VARLEN, BLOCK_M)
    if start_m >= M:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_rows(O + b * stride_ob + q0 * stride_om + h * stride_oh, offs_m, stride_om, offs_d, M, HEAD_DIM, True)
    do = load_rows(DO + b * stride_dob + q0 * stride_dom + h * stride_doh, offs_m, stride_dom, offs_d, M, HEAD_DIM,
                   True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b * stride_lb + h * stride_lh + q0 + offs_m, delta, mask=offs_m < M)


@triton.jit
def _dkdv_tile(dk, dv, kt, vt, q_src, do_src, lse_base, delta_base, stride_qm, stride_dom, offs_n, offs_d, start_m,
               M, shift, qk_scale,
               MASKED: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr,
               DESC: tl.constexpr):
    """For one key tile and one query head, query tile [start_m, start_m + BLOCK_M): dv += p^T do and
    dk += ds^T q (the softmax_scale factor of dk is applied by the caller); MASKED applies the causal mask (rows
    i >= M have lse = +inf, so p = 0)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = load_tile(q_src, start_m, stride_qm, offs_d, M, BLOCK_M, HEAD_DIM, True, DESC)
    do = load_tile(do_src, start_m, stride_dom, offs_d, M, BLOCK_M, HEAD_DIM, True, DESC)
    lse = tl.load(lse_base + offs_m, mask=offs_m < M, other=float("inf"))   # rows >= M give p = 0
    delta = tl.load(delta_base + offs_m, mask=offs_m < M, other=0.0)
    qkT = dot(kt, tl.trans(q), PREC) * qk_scale           # (BLOCK_N, BLOCK_M)
    pT = tl.exp2(qkT - lse[None, :])
    if MASKED:
        pT = tl.where(offs_n[:, None] <= offs_m[None, :] + shift, pT, 0.0)
    dv += dot(pT.to(do.dtype), do, PREC)
    dpT = dot(vt, tl.trans(do), PREC)
    dsT = pT * (dpT - delta[None, :])
    dk += dot(dsT.to(q.dtype), q, PREC)
    return dk, dv


@triton.jit
def _dkdv_queries(dk, dv, kt, vt, q_src, do_src, lse_base, delta_base, stride_qm, stride_dom, offs_n, offs_d,
                  lo, full, M, shift, qk_scale,
                  CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr,
                  DESC: tl.constexpr, WARP_SPEC: tl.constexpr):
    """dk, dv of one key tile and one query head over query tiles [lo, M): [lo, full) straddle the key tile's
    causal diagonal and are masked (empty unless CAUSAL), [full, M) see all of it. Warp specialisation takes a
    kernel's single loop: WARP_SPEC runs one loop over [lo, M), masked when CAUSAL."""
    hi = full
    if WARP_SPEC:
        hi = M
    for start_m in tl.range(lo, hi, BLOCK_M, warp_specialize=WARP_SPEC):
        dk, dv = _dkdv_tile(dk, dv, kt, vt, q_src, do_src, lse_base, delta_base, stride_qm, stride_dom, offs_n, offs_d,
                            start_m, M, shift, qk_scale, CAUSAL, BLOCK_M, HEAD_DIM, PREC, DESC)
    if not WARP_SPEC:
        for start_m in tl.range(full, M, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, kt, vt, q_src, do_src, lse_base, delta_base, stride_qm, stride_dom, offs_n,
                                offs_d, start_m, M, shift, qk_scale, False, BLOCK_M, HEAD_DIM, PREC, DESC)
    return dk, dv


@triton.jit
def _write_rows(base, tile, rows, stride_row, cols, n_rows, HEAD_DIM: tl.constexpr, ADD: tl.constexpr):
    """store_rows, or (ADD, float32 sums) add the tile into what is there with one atomic add per element: an
    address gets one add per launch, from the one program that owns its rows, so the sum is that of a load, add
    and store, in the same order, and no loaded tile is held in registers."""
    if ADD:
        ptrs = base + rows[:, None] * stride_row + cols[None, :]
        tl.atomic_add(ptrs, tile, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), sem="relaxed")
    else:
        store_rows(base, tile, rows, stride_row, cols, n_rows, HEAD_DIM)


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, GATE, DO, LSE, DELTA, DK, DV, DKE, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn, stride_dkeb, stride_dkeh, stride_dken,
    stride_lb, stride_lh,
    Hkv, M, N, GROUPS, member, qk_scale, softmax_scale,
    CAUSAL: tl.constexpr, BYPASS: tl.constexpr, VARLEN: tl.constexpr, ACCUMULATE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr, DESC: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    """dk'[h], dv[h] of one key tile for query head h = g * GROUPS + member of key/value head g (K: k, or the
    Excitor's k' of this member, gated_keys), over every query tile; one launch per group member, so a program
    holds one head's two accumulators, as in FlashAttention-2. Their sums over the group go into DK, DV (float32
    under GQA: ACCUMULATE adds to what the earlier members' launches wrote; this program owns those rows, so the
    order is fixed, _write_rows). Excitor (BYPASS == 1): also DKE += gate[h] dk'[h]; the post-pass turns
    (DK, DKE) into dk, dprompt and dsim. The loop is plain attention's for every operator (the gate gradient is
    the dq kernel's)."""
    tile = tl.program_id(0)
    bg = tl.program_id(1)
    b = (bg // Hkv).to(tl.int64)
    g = bg % Hkv
    h = g * GROUPS + member
    start_n = tile * BLOCK_N
    q0, M = sequence(CU_Q, b, M, VARLEN)
    k0, N = sequence(CU_K, b, N, VARLEN)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    shift = N - M
    # query tiles [lo, full) straddle the causal diagonal of this key tile; [full, M) see all of it
    if CAUSAL:
        lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
        full = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M, M)
        lo = tl.minimum(lo, full)
    else:
        lo = 0
        full = 0
    # a program past the end of a shorter packed sequence sees no query tile and stores nothing (no early
    # return: triton's sm_90 warp specialisation rejects one)
    lo = tl.where(start_n < N, lo, M)
    full = tl.where(start_n < N, full, M)

    k_src, v_src = _key_sources(K, V, b, g, k0, N, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                                BLOCK_N, BLOCK_D, HEAD_DIM, DESC)
    kh = load_tile(k_src, start_n, stride_kn, offs_d, N, BLOCK_N, HEAD_DIM, True, DESC)  # k'[h] (k unless Excitor)
    vt = load_tile(v_src, start_n, stride_vn, offs_d, N, BLOCK_N, HEAD_DIM, True, DESC)
    q_src = row_source(Q + b * stride_qb + q0 * stride_qm + h * stride_qh, M, stride_qm, BLOCK_M, BLOCK_D, HEAD_DIM,
                       DESC)
    do_src = row_source(DO + b * stride_dob + q0 * stride_dom + h * stride_doh, M, stride_dom, BLOCK_M, BLOCK_D,
                        HEAD_DIM, DESC)
    row_stats = b * stride_lb + h * stride_lh + q0
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dk, dv = _dkdv_queries(dk, dv, kh, vt, q_src, do_src, LSE + row_stats, DELTA + row_stats, stride_qm, stride_dom,
                           offs_n, offs_d, lo, full, M, shift, qk_scale, CAUSAL, BLOCK_M, HEAD_DIM, PREC, DESC,
                           WARP_SPEC)
    dk = tl.where(offs_n[:, None] < N, dk * softmax_scale, 0.0)                      # dk'[h]

    _write_rows(DV + b * stride_dvb + k0 * stride_dvn + g * stride_dvh, dv, offs_n, stride_dvn, offs_d, N, HEAD_DIM,
                ACCUMULATE)
    if BYPASS == 1:
        _write_rows(DKE + b * stride_dkeb + k0 * stride_dken + g * stride_dkeh, tl.load(GATE + h).to(tl.float32) * dk,
                    offs_n, stride_dken, offs_d, N, HEAD_DIM, ACCUMULATE)
    _write_rows(DK + b * stride_dkb + k0 * stride_dkn + g * stride_dkh, dk, offs_n, stride_dkn, offs_d, N, HEAD_DIM,
                ACCUMULATE)


@triton.jit
def _bypass_scores(qp_hi, qp_lo, at_src, at_lo_src, stride_atn, offs_n, offs_p, N, BLOCK_P: tl.constexpr,
                   MASKED: tl.constexpr, PREC: tl.constexpr):
    """x_ij / x_scale = sum_n qp_in at_jn / x_scale for the keys ``offs_n`` (x_ij = <q_i, ke_j>; qp = q pk^T as
    split_scaled's pair, at the pre-pass's centred weights times AT_SCALE, rounded and its rounding error; x_scale
    both scales) from float16 hi + lo pairs: three products of P columns, about float32 (float32 inputs: one
    product)."""
    at = load_rows(at_src, offs_n, stride_atn, offs_p, N, BLOCK_P, MASKED)
    x = dot(qp_hi, tl.trans(at), PREC)
    if at.dtype != tl.float32:
        x += dot(qp_hi, tl.trans(load_rows(at_lo_src, offs_n, stride_atn, offs_p, N, BLOCK_P, MASKED)), PREC)
        x += dot(qp_lo, tl.trans(at), PREC)
    return x


@triton.jit
def _add_gate_sums(c, e, r, l, ds, p, x):
    """The gate gradient's row sums, float32 throughout: c += sum_j ds_ij x_ij, e += sum_j p_ij x_ij (per key
    tile), r += sum_j ds_ij, l += sum_j p_ij (row_parts(Q) parts, _row_parts: c and e as parts too would spill on
    sm_90 at d = 128)."""
    return (c + tl.sum(ds * x, 1), e + tl.sum(p * x, 1), r + _row_parts(ds, r.shape[1]), l + _row_parts(p, l.shape[1]))


@triton.jit
def _gate_rows(c, e, r, l, x_scale, seen):
    """(l, g) per row: g_i = x_scale (c_i - r_i e_i / l_i) / l_i, row i's share of dgate[h] / softmax_scale
    (docs/design.md, "The gate gradient's precision"; c and e summed over x / x_scale, _bypass_scores; r and l as
    _row_parts' parts). Rows not ``seen`` (chosen by the mask, so that a NaN that reaches a row reaches dgate)
    give l = 1, g = 0."""
    r, l = tl.sum(r, 1), tl.sum(l, 1)
    sl = tl.where(seen, l, 1.0)
    return sl, tl.where(seen, x_scale * (c - r * e / sl) / sl, 0.0)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, last, k_src, kg_src, v_src, stride_kn, stride_kgn, stride_vn, offs_d, start_n, N,
             qk_scale, gate_x, qp_hi, qp_lo, at_src, at_lo_src, stride_atn, offs_p, c, e, r, l,
             MASKED: tl.constexpr, BYPASS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
             BLOCK_P: tl.constexpr, PREC: tl.constexpr, DESC: tl.constexpr):
    """dq += ds k over key tile [start_n, start_n + BLOCK_N) (softmax_scale applied by the caller); MASKED keeps
    keys j <= last[i] (the causal and the j < N masks).

    Excitor (BYPASS == 1): the scores are q k^T + gate[h] x with x_ij = <q_i, ke_j> to about float32 accuracy
    (_bypass_scores gives x / x_scale, gate_x = gate[h] x_scale), dq += ds k' with k' from ``kg_src`` (the group
    member's k' = k + gate[h] ke, gated_keys), and the gate gradient's float32 row sums c, e, r, l (_add_gate_sums,
    over x / x_scale) carry what attention_bwd_dq_kernel needs after the loop."""
    kt = load_tile(k_src, start_n, stride_kn, offs_d, N, BLOCK_N, HEAD_DIM, MASKED, DESC)
    vt = load_tile(v_src, start_n, stride_vn, offs_d, N, BLOCK_N, HEAD_DIM, MASKED, DESC)
    if BYPASS == 1:
        x = _bypass_scores(qp_hi, qp_lo, at_src, at_lo_src, stride_atn, start_n + tl.arange(0, BLOCK_N), offs_p, N,
                           BLOCK_P, MASKED, PREC)
        qk = dot(q, tl.trans(kt), PREC, acc=gate_x * x)
    else:
        qk = dot(q, tl.trans(kt), PREC)
    p = tl.exp2(qk * qk_scale - lse[:, None])
    if MASKED:
        p = tl.where((start_n + tl.arange(0, BLOCK_N))[None, :] <= last[:, None], p, 0.0)
    dp = dot(do, tl.trans(vt), PREC)
    ds = p * (dp - delta[:, None])
    if BYPASS == 1:
        c, e, r, l = _add_gate_sums(c, e, r, l, ds, p, x)
        kt = load_tile(kg_src, start_n, stride_kgn, offs_d, N, BLOCK_N, HEAD_DIM, MASKED, DESC)
    dq += dot(ds.to(kt.dtype), kt, PREC)
    return dq, c, e, r, l


@triton.jit
def _dq_keys(dq, q, do, lse, delta, offs_m, shift, k_src, kg_src, v_src, stride_kn, stride_kgn, stride_vn, offs_d, full,
             hi, N, qk_scale, gate_x, qp_hi, qp_lo, at_src, at_lo_src, stride_atn, offs_p, c, e, r, l,
             CAUSAL: tl.constexpr, BYPASS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
             BLOCK_P: tl.constexpr, PREC: tl.constexpr, DESC: tl.constexpr, WARP_SPEC: tl.constexpr):
    """dq over key tiles [0, hi), split as in _fwd_keys: [0, full) unmasked, [full, hi) masked (their last keys
    formed between the loops); WARP_SPEC: one loop over [0, hi), every tile masked."""
    lo = 0
    if not WARP_SPEC:
        for start_n in tl.range(0, full, BLOCK_N):
            dq, c, e, r, l = _dq_tile(dq, q, do, lse, delta, offs_m, k_src, kg_src, v_src, stride_kn, stride_kgn,
                                      stride_vn, offs_d, start_n, N, qk_scale, gate_x, qp_hi, qp_lo, at_src,
                                      at_lo_src, stride_atn, offs_p, c, e, r, l, False, BYPASS, BLOCK_N, HEAD_DIM,
                                      BLOCK_P, PREC, DESC)
        lo = full
    last = _last_key(offs_m, N, shift, CAUSAL)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        dq, c, e, r, l = _dq_tile(dq, q, do, lse, delta, last, k_src, kg_src, v_src, stride_kn, stride_kgn, stride_vn,
                                  offs_d, start_n, N, qk_scale, gate_x, qp_hi, qp_lo, at_src, at_lo_src, stride_atn,
                                  offs_p, c, e, r, l, True, BYPASS, BLOCK_N, HEAD_DIM, BLOCK_P, PREC, DESC)
    return dq, c, e, r, l


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, KG, V, PK, PV, AT, AT_LO, GATE, DO, LSE, DELTA, DQ, DPK, DPV, DGATE, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_kgb, stride_kgh, stride_kgn,
    stride_vb, stride_vh, stride_vn, stride_atb, stride_ath, stride_atn,
    stride_pkb, stride_pkh, stride_pkp, stride_pvb, stride_pvh, stride_pvp,
    stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    stride_dpk_t, stride_dpk_b, stride_dpk_h, stride_dpk_r, stride_dpk_p, stride_dg_t, stride_dg_b,
    stride_lb, stride_lh, Hq, M, N, P, GROUPS, member, qk_scale, softmax_scale,
    CAUSAL: tl.constexpr, BYPASS: tl.constexpr, VARLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr, PREC: tl.constexpr, DESC: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    """dq for one query tile of one query head (plus, for the adapter, every prompt-side gradient). Grid as the
    forward's (_query_tile): every query head (member < 0), or the heads of one group member (the Excitor).

    Excitor (BYPASS == 1, one launch per group member): the scores are formed from k (K) and the centred weights
    AT (hi, lo) to about float32 accuracy, dq from the member's k' (KG, gated_keys) (_dq_tile); the program writes
    its rows' share of the gate gradient to DGATE[tile, b, h]:
        dgate[h] = softmax_scale sum_i sum_j ds*_ij x_ij = softmax_scale sum_i (c_i - r_i e_i / l_i) / l_i,
    with ds* the exact ds (p* = p / l: l_i = sum_j p_ij is 1 up to the forward's rounding of k'): the covariance
    of dp and x under row i's softmax, in which neither delta (the output's rounding) nor lse enters. The sum
    cancels (sum_j ds*_ij = 0), and what it cancels to is computed from float32 terms."""
    b, h, g, q0, k0, M, N, start_m = _query_tile(Q, stride_qb, stride_qh, stride_qm, CU_Q, CU_K, Hq, M, N, GROUPS,
                                                 member, VARLEN, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    shift = N - M

    q_src = row_source(Q + b * stride_qb + q0 * stride_qm + h * stride_qh, M, stride_qm, BLOCK_M, BLOCK_D, HEAD_DIM,
                       DESC)
    q = load_tile(q_src, start_m, stride_qm, offs_d, M, BLOCK_M, HEAD_DIM, True, DESC)
    do_src = row_source(DO + b * stride_dob + q0 * stride_dom + h * stride_doh, M, stride_dom, BLOCK_M, BLOCK_D,
                        HEAD_DIM, DESC)
    do = load_tile(do_src, start_m, stride_dom, offs_d, M, BLOCK_M, HEAD_DIM, True, DESC)
    row_stats = b * stride_lb + h * stride_lh + q0
    lse = tl.load(LSE + row_stats + offs_m, mask=offs_m < M, other=float("inf"))
    delta = tl.load(DELTA + row_stats + offs_m, mask=offs_m < M, other=0.0)
    k_src, v_src = _key_sources(K, V, b, g, k0, N, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                                BLOCK_N, BLOCK_D, HEAD_DIM, DESC)
    kg_src = k_src
    if BYPASS == 1:
        kg_src = row_source(KG + b * stride_kgb + k0 * stride_kgn + g * stride_kgh, N, stride_kgn, BLOCK_N, BLOCK_D,
                            HEAD_DIM, DESC)

    # Adapter prompts first, so that their tiles are dead before the key loop:
    # o_i += gate[h] op_i with op = ap pv and ap = softmax(softmax_scale q pk^T)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if BYPASS == 2:
        offs_p = tl.arange(0, BLOCK_P)
        ap, op, pk, pv = prompt_attention(q, PK + b * stride_pkb + g * stride_pkh, PV + b * stride_pvb + g * stride_pvh,
                                          stride_pkp, stride_pvp, offs_p, offs_d, P, qk_scale, HEAD_DIM, PREC)
        tile = tl.program_id(0)
        dgate, dq, dpk, dpv = prompt_attention_backward(q, do, offs_m[:, None] < M, ap, op, pk, pv,
                                                        tl.load(GATE + h).to(tl.float32), softmax_scale, PREC)
        tl.atomic_add(DGATE + tile * stride_dg_t + b * stride_dg_b + h, dgate)
        # slice (tile, b, g, h - g * GROUPS); the atomic layout sets the tile, group-member (and, for
        # shared prompts, batch) strides to 0 so that those programs add into one (P, d) block
        pmask = (offs_p[:, None] < P) & (offs_d[None, :] < HEAD_DIM)
        off = (tile * stride_dpk_t + b * stride_dpk_b + g * stride_dpk_h + (h - g * GROUPS) * stride_dpk_r
               + offs_p[:, None] * stride_dpk_p + offs_d[None, :])
        tl.atomic_add(DPK + off, dpk, mask=pmask)
        tl.atomic_add(DPV + off, dpv, mask=pmask)
    # Excitor: qp = q pk^T (exact products, float32 sums), scaled to a float16 hi + lo pair (split_scaled) for the
    # scores' bypass part
    offs_p = tl.arange(0, BLOCK_P)
    qp = tl.zeros([BLOCK_M, BLOCK_P], tl.float32)
    gate_h = 0.0
    if BYPASS == 1:
        gate_h = tl.load(GATE + h).to(tl.float32)
        pk = load_rows(PK + b * stride_pkb + g * stride_pkh, offs_p, stride_pkp, offs_d, P, HEAD_DIM, True)
        qp = dot(q, tl.trans(pk), PREC)
    qp_hi, qp_lo, x_scale = split_scaled(qp, AT.dtype.element_ty)
    x_scale = x_scale / AT_SCALE  # x = x_scale (qp_hi + qp_lo) AT^T, AT the pre-pass's
    at_rows = b * stride_atb + k0 * stride_atn + g * stride_ath
    c = tl.zeros([BLOCK_M], tl.float32)
    e = tl.zeros([BLOCK_M], tl.float32)
    r = tl.zeros([BLOCK_M, row_parts(Q)], tl.float32)
    l = tl.zeros([BLOCK_M, row_parts(Q)], tl.float32)
    full, hi = _causal_key_bounds(start_m, M, N, shift, CAUSAL, BLOCK_M, BLOCK_N)
    dq, c, e, r, l = _dq_keys(dq, q, do, lse, delta, offs_m, shift, k_src, kg_src, v_src, stride_kn, stride_kgn,
                              stride_vn, offs_d, full, hi, N, qk_scale, gate_h * x_scale, qp_hi, qp_lo, AT + at_rows,
                              AT_LO + at_rows, stride_atn, offs_p, c, e, r, l, CAUSAL, BYPASS, BLOCK_N, HEAD_DIM,
                              BLOCK_P, PREC, DESC, WARP_SPEC)
    if BYPASS == 1:
        seen = (offs_m < M) & (N > 0)
        if CAUSAL:
            seen = seen & (offs_m >= -shift)  # not offs_m + shift: the loops' value, kept live across them
        sl, rows_dgate = _gate_rows(c, e, r, l, x_scale, seen)
        tl.store(DGATE + tl.program_id(0) * stride_dg_t + b * stride_dg_b + h, softmax_scale * tl.sum(rows_dgate, 0))
        dq = dq / sl[:, None]  # sum_j ds*_ij k'_j, up to the row term r_i p_ij / l_i^2 (r is delta's rounding)
    dq *= softmax_scale
    store_rows(DQ + b * stride_dqb + q0 * stride_dqm + h * stride_dqh, dq, offs_m, stride_dqm, offs_d, M, HEAD_DIM)


@triton.jit
def excitor_gate_grad_kernel(
    Q, K, V, PK, AT, AT_LO, GATE, DO, DGATE,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_atb, stride_ath, stride_atn, stride_pkb, stride_pkh, stride_pkp, stride_dob, stride_doh, stride_dom,
    stride_dg_t, stride_dg_b, Hq, M, N, P, GROUPS, qk_scale, softmax_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
):
    """The Excitor's gate gradient alone, for the backends whose dq does not make it (sdpa, CUDA; padded batches):
    one program per (query tile, batch * query head) writes its rows' share to DGATE[tile, b, h], as the dq kernel
    does (attention_bwd_dq_kernel: the same float32-grade scores and row sums), with an online row maximum in
    place of the saved lse and without delta (the sums' formula is invariant to a per-row scale of p, and
    ds = p dp is ds up to a row constant times p, which it removes)."""
    b, h, g, q0, k0, M, N, start_m = _query_tile(Q, stride_qb, stride_qh, stride_qm, Q, Q, Hq, M, N, GROUPS, -1,
                                                 False, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_P)
    shift = N - M
    last = _last_key(offs_m, N, shift, CAUSAL)
    q = load_rows(Q + b * stride_qb + q0 * stride_qm + h * stride_qh, offs_m, stride_qm, offs_d, M, HEAD_DIM, True)
    do = load_rows(DO + b * stride_dob + q0 * stride_dom + h * stride_doh, offs_m, stride_dom, offs_d, M, HEAD_DIM,
                   True)
    pk = load_rows(PK + b * stride_pkb + g * stride_pkh, offs_p, stride_pkp, offs_d, P, HEAD_DIM, True)
    qp_hi, qp_lo, x_scale = split_scaled(dot(q, tl.trans(pk), PREC), AT.dtype.element_ty)
    x_scale = x_scale / AT_SCALE  # as in attention_bwd_dq_kernel
    gate_x = tl.load(GATE + h).to(tl.float32) * x_scale
    k_base = K + b * stride_kb + k0 * stride_kn + g * stride_kh
    v_base = V + b * stride_vb + k0 * stride_vn + g * stride_vh
    at_rows = b * stride_atb + k0 * stride_atn + g * stride_ath
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    c = tl.zeros([BLOCK_M], tl.float32)
    e = tl.zeros([BLOCK_M], tl.float32)
    r = tl.zeros([BLOCK_M, row_parts(Q)], tl.float32)
    l = tl.zeros([BLOCK_M, row_parts(Q)], tl.float32)
    _, hi = _causal_key_bounds(start_m, M, N, shift, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kt = load_rows(k_base, offs_n, stride_kn, offs_d, N, HEAD_DIM, True)
        vt = load_rows(v_base, offs_n, stride_vn, offs_d, N, HEAD_DIM, True)
        x = _bypass_scores(qp_hi, qp_lo, AT + at_rows, AT_LO + at_rows, stride_atn, offs_n, offs_p, N, BLOCK_P, True,
                           PREC)
        qk = dot(q, tl.trans(kt), PREC) + gate_x * x
        qk = tl.where(offs_n[None, :] <= last[:, None], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        ds = p * dot(do, tl.trans(vt), PREC)
        c, e, r, l = _add_gate_sums(c * alpha, e * alpha, r * alpha[:, None], l * alpha[:, None], ds, p, x)
        m_i = m_new
    _, rows_dgate = _gate_rows(c, e, r, l, x_scale, (offs_m < M) & (_last_key(offs_m, N, shift, CAUSAL) >= 0))
    tl.store(DGATE + tl.program_id(0) * stride_dg_t + b * stride_dg_b + h, softmax_scale * tl.sum(rows_dgate, 0))


# ----------------------------------------------------------------------------------------------
# Launchers (host side)
# ----------------------------------------------------------------------------------------------


# the delta pre-pass: 8 warps, query tiles of at most PREPROCESS_BLOCK_M rows (the dq kernel's, if smaller)
PREPROCESS_LAUNCH = dict(num_warps=8)
PREPROCESS_BLOCK_M = 32


def q_chunk(itemsize: int) -> int:
    """The forward's Q_CHUNK: float32 scores summed over head-dim chunks of 32 columns (_scores), else 0."""
    return 32 if itemsize > 2 else 0


def _tiles(BLOCK_M, BLOCK_N, num_warps, num_stages=2):
    # pointer loads, no warp specialisation: every GPU, every triton (see _triton_tuning for the others)
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps, num_stages=num_stages, DESC=False,
                WARP_SPEC=False)


def blocks(on_gpu: bool, M: int, N: int, d: int, itemsize: int = 2, bypass: int = EXCITOR,
           arch: int = 90, varlen: bool = False, prompts: int = 32) -> tuple[dict, dict, dict]:
    """(forward, backward key-tile, backward query-tile) tiles and launch options.

    On a GPU (``arch`` = compute capability as 80, 90, ...): for half types, the tiles with which every
    kernel compiles without register spills for d <= 128 and P <= 64 on that architecture, padded or packed
    (``varlen``; the static cost report, ``python -m bench.static``, checks it). sm_90: every product a wgmma
    of at least 64 rows per warpgroup (the forward and dq query tiles, the dk/dv key tile), descriptor (TMA)
    loads (_configs falls back to pointer loads where descriptors cannot read the inputs); at d <= 64 the
    backward tiles are twice as wide. sm_80: 16 query rows per warp, so no warp repeats another's mma.sync;
    the widest key tile that leaves registers: 128 x 128 at d = 64, 128 x 64 at d = 128 (one stage), but 128 x 32
    for the Adapter with more than 32 ``prompts`` (its prompt tile after the key loop). float32: the forward's
    scores by head-dim chunks (q_chunk), 16 or 32 query rows and 32 keys per tile. Interpreted: tiles no larger
    than the problem. The forward sums its softmax rows in float32 (``TC_ROW_SUM=False``, docs/design.md). On
    sm_90+ the launchers may run a faster configuration of ``_triton_tuning.CANDIDATES`` instead (``_configs``).
    """
    fwd, dkdv, dq = _fixed_tiles(on_gpu, M, N, d, itemsize, bypass, arch, varlen, prompts)
    return dict(fwd, TC_ROW_SUM=False), dkdv, dq


def _fixed_tiles(on_gpu, M, N, d, itemsize, bypass, arch, varlen, prompts):
    if not on_gpu:
        bm, bn = min(32, pow2(M)), min(32, pow2(N))
        return (dict(BLOCK_M=bm, BLOCK_N=bn, DESC=False, WARP_SPEC=False),) * 3
    if itemsize > 2:  # float32: narrow tiles (docs/design.md); the Adapter's prompt terms leave 16-row tiles only
        fwd = _tiles(16, 32, 8) if bypass == ADAPTER else _tiles(32, 32, 4)
        dq = _tiles(32, 32, 8) if bypass == EXCITOR else _tiles(16, 32, 8)
        return fwd, _tiles(16, 32, 8), dq
    if arch >= 90:
        wide = d <= 64
        # the Excitor's dq loop also holds the bypass scores x and reads k' beside k: 128 x 128 spills at d = 64
        dq_n = 128 if wide and bypass != EXCITOR else 64
        return (dict(_tiles(128, 128, 8), DESC=True), dict(_tiles(64 if wide else 32, 128, 8), DESC=True),
                dict(_tiles(128, dq_n, 8), DESC=True))
    if d <= 64:
        fwd = _tiles(128, 128, 8)
    else:
        fwd = _tiles(128, 32, 8) if bypass == ADAPTER and pow2(prompts) > 32 else _tiles(128, 64, 8, 1)
    # the Excitor's dq: 128 query rows (its gate sums per row), 32 keys (16 for packed sequences at d = 128: their
    # offsets take the registers of 32)
    dq = _tiles(128, 16 if varlen and d > 64 else 32, 8) if bypass == EXCITOR else _tiles(32, 64, 8)
    return fwd, _tiles(64, 32, 8), dq


def _arch(t: torch.Tensor) -> int:
    major, minor = torch.cuda.get_device_capability(t.device) if t.is_cuda else (0, 0)
    return 10 * major + minor


def _configs(kernel, default, rows, causal, bypass, tensors, prepare, deterministic=False):
    """The configuration ``kernel`` launches with (``_triton_tuning.pick``): ``default`` unless tuned on a GPU
    or forced; sets triton's allocator when it uses tensor descriptors. ``deterministic`` backwards keep the
    fixed tiles: a timed choice may differ between processes, and the tiles set the order of the sums."""
    t = tensors[0]
    key = (rows.varlen, rows.d, t.dtype, causal, length_bucket(max(rows.M, rows.N)))
    desc_ok = descriptors_ok(*tensors)
    if desc_ok:
        prepare_descriptors()
    elif default.get("DESC"):  # the fixed configuration's pointer-load fallback (_triton_tuning.CANDIDATES: d = 128)
        fixed, fallback = candidates(kernel, bypass)[:2]
        default = fallback if default == fixed else dict(default, DESC=False)
    return pick(kernel, bypass, key, default, autotune_enabled(t) and not deterministic, desc_ok, prepare)


def gated_keys(k, ke, gate, member, rows):
    """The Excitor's keys for group member ``member``: k'[g] = k[g] + gate[h] ke[g] for the query heads
    h = g * groups + member (float32 arithmetic, rounded once to k's dtype), laid out as k. Built before each
    member's launches, forward and backward (not saved), so that the kernels' key loops are plain attention's;
    one k of memory while they run."""
    g = gate.float().view(rows.Hkv, -1)[:, member]
    view = [1] * k.dim()
    view[1] = rows.Hkv  # the head axis: (B, Hkv, N, d) or (total, Hkv, d)
    return torch.addcmul(k.float(), ke.float(), g.view(view)).to(k.dtype)


def attention_forward(bypass, q, k, v, pk, pv, gate, sim, causal, softmax_scale, prompt_scale, rows):
    """Launch the forward; returns (o, lse, ke, at, ot): lse float32 (``rows.stats_shape``) in base-2 units; for the
    Excitor (else None) the pre-pass's reconstructed keys ``ke`` and centred weights ``at``
    (``prompt_keys_forward``); for the Adapter (else None) the token attention's output ``ot`` (o without the
    prompt term); saved for the backward, which takes ``ot`` as its ``o``."""
    B, Hq, M, N, d, P = rows.B, rows.Hq, rows.M, rows.N, rows.d, pk.shape[-2]
    gate = gate.contiguous()  # the kernels index gate[h] with unit stride
    ke, at = (prompt_keys_forward(k if sim is None else sim, pk, prompt_scale, rows) if bypass == EXCITOR
              else (None, None))
    o = new_output(q.shape, dtype=q.dtype, device=q.device, like=q)
    lse = new_output(rows.stats_shape, dtype=torch.float32, device=q.device)
    ot = new_output(q.shape, dtype=q.dtype, device=q.device, like=q) if bypass == ADAPTER else None
    # the Excitor launches once per group member (member m: the query heads g * groups + m, keys k' of m)
    members = range(Hq // rows.Hkv) if ke is not None else (-1,)

    def launch(config, o, lse, member=members[0], keys=k):
        heads = Hq if member < 0 else rows.Hkv
        attention_fwd_kernel[(triton.cdiv(M, config["BLOCK_M"]), B * heads)](
            q, keys, v, pk, pk if pv is None else pv, gate, o, o if ot is None else ot, lse, rows.cu_q, rows.cu_k,
            *rows.strides(q), *rows.strides(keys), *rows.strides(v),
            *prompt_strides(pk), *prompt_strides(pv), *rows.strides(o), *rows.stats_strides(lse),
            Hq, M, N, P, Hq // rows.Hkv, member, softmax_scale * LOG2E,
            CAUSAL=causal, BYPASS=bypass, VARLEN=rows.varlen, POS_SCALE=softmax_scale > 0, HEAD_DIM=d,
            BLOCK_D=pow2(d), BLOCK_P=pow2(P), PREC=precision(q), Q_CHUNK=q_chunk(q.element_size()), **config,
        )

    for member in members:
        keys = k if member < 0 else gated_keys(k, ke, gate, member, rows)
        if member == members[0]:
            fixed = blocks(q.is_cuda, M, N, d, q.element_size(), bypass, _arch(q), rows.varlen, P)[0]
            fwd = _configs("fwd", fixed, rows, causal, bypass, (q, keys, v),
                           lambda config: lambda: launch(config, o, lse, member, keys))
        launch(fwd, o, lse, member, keys)
    return o, lse, ke, at, ot


def attention_backward(bypass, do, q, k, v, pk, pv, gate, sim, ke, at, o, lse, causal, softmax_scale, prompt_scale,
                       deterministic, rows):
    """Launch the backward; returns (dq, dk, dv, dpk, dpv, dgate, dsim) in the inputs' dtypes
    (dpv and dsim are None where the operator has no such input)."""
    B, Hq, Hkv, M, N, d, P = rows.B, rows.Hq, rows.Hkv, rows.M, rows.N, rows.d, pk.shape[-2]
    groups = Hq // Hkv
    gate = gate.contiguous()
    per_sample = pk.dim() == 4
    if do.stride(-1) != 1:
        do = do.contiguous()
    dev = q.device
    _, kv_default, q_default = blocks(q.is_cuda, M, N, d, q.element_size(), bypass, _arch(q), rows.varlen, P)
    prec = precision(q)
    BLOCK_D, BLOCK_P = pow2(d), pow2(P)
    excitor = bypass == EXCITOR

    delta = new_output(rows.stats_shape, dtype=torch.float32, device=dev)
    pre_bm = min(PREPROCESS_BLOCK_M, q_default["BLOCK_M"])
    attention_bwd_preprocess_kernel[(triton.cdiv(M, pre_bm), B * Hq)](
        o, do, delta, rows.cu_q, *rows.strides(o), *rows.strides(do), *rows.stats_strides(delta), Hq, M,
        VARLEN=rows.varlen, HEAD_DIM=d, BLOCK_M=pre_bm, BLOCK_D=BLOCK_D, **(PREPROCESS_LAUNCH if q.is_cuda else {}),
    )

    dq = new_output(q.shape, dtype=q.dtype, device=dev, like=q)
    # dk, dv: in the outputs' dtypes under MHA; float32 sums over the group under GQA (one launch per member)
    # and always for the Excitor's dk, which the post-pass finishes with dke
    dv = new_output(v.shape, dtype=v.dtype if groups == 1 else torch.float32, device=dev, like=v)
    dk = new_output(k.shape, dtype=k.dtype if groups == 1 and not excitor else torch.float32, device=dev, like=k)
    dke = new_output(ke.shape, dtype=torch.float32, device=dev) if excitor else dk
    at = (k, k) if at is None else at  # stand-ins for the Adapter

    def keys(member):
        """The keys of the dk/dv kernel and of the dq kernel's product: k, or the Excitor's k' of one group member."""
        return k if ke is None else gated_keys(k, ke, gate, member, rows)

    def grad_sums(kv_config, q_config):
        """GradSums of the gate (and the Adapter's prompt) gradients, made by the query-tile programs: the
        Excitor's gate sums have one slot per program (tiles past a shorter packed sequence leave 0); the
        Adapter's are atomics into one slot unless deterministic."""
        if excitor:
            return GradSums(triton.cdiv(M, q_config["BLOCK_M"]), B, 0, Hq, 0, d, per_sample, True, dev)
        return GradSums(triton.cdiv(M, q_config["BLOCK_M"]), B, Hq if deterministic else Hkv, Hq, P, d, per_sample,
                        deterministic, dev, values=True)

    def prompt_args(sums):
        """(dpk, dpv, strides) of the dq kernel's prompt sums [tile, batch, kv head, group member, prompt]: the
        sums' head axis holds the query heads h = g * groups + member when deterministic, the key/value heads
        under atomics (member stride 0). The Excitor passes unused stand-ins."""
        if excitor:
            return sums.gate, sums.gate, (0,) * 5
        t, b, h, p = sums.prompt_strides
        return sums.prompt, sums.value, (t, b, h * groups, h, p) if deterministic else (t, b, h, 0, p)

    def launch_dkdv(config, member, kk):
        attention_bwd_dkdv_kernel[(triton.cdiv(N, config["BLOCK_N"]), B * Hkv)](
            q, kk, v, gate, do, lse, delta, dk, dv, dke, rows.cu_q, rows.cu_k,
            *rows.strides(q), *rows.strides(kk), *rows.strides(v), *rows.strides(do),
            *rows.strides(dk), *rows.strides(dv), *rows.strides(dke), *rows.stats_strides(lse),
            Hkv, M, N, groups, member, softmax_scale * LOG2E, softmax_scale,
            CAUSAL=causal, BYPASS=bypass, VARLEN=rows.varlen, ACCUMULATE=member > 0, HEAD_DIM=d,
            BLOCK_D=BLOCK_D, PREC=prec, **config,
        )

    def launch_dq(config, sums, member=-1, kk=k):
        """Every query head in one launch (member < 0: plain attention, the Adapter); or the Excitor's heads of group
        member ``member``: scores from k and the centred weights, dq from its k' ``kk``, the gate gradient."""
        dg_buf, dg_strides = sums.gate, sums.gate_strides
        dpk_buf, dpv_buf, dpk_strides = prompt_args(sums)
        attention_bwd_dq_kernel[(triton.cdiv(M, config["BLOCK_M"]), B * (Hq if member < 0 else Hkv))](
            q, k, kk, v, pk, pk if pv is None else pv, at[0], at[-1], gate, do, lse, delta, dq, dpk_buf, dpv_buf,
            dg_buf, rows.cu_q, rows.cu_k,
            *rows.strides(q), *rows.strides(k), *rows.strides(kk), *rows.strides(v), *rows.strides(at[0]),
            *prompt_strides(pk), *prompt_strides(pv), *rows.strides(do), *rows.strides(dq),
            *dpk_strides, *dg_strides, *rows.stats_strides(lse),
            Hq, M, N, P, groups, member, softmax_scale * LOG2E, softmax_scale,
            CAUSAL=causal, BYPASS=bypass, VARLEN=rows.varlen, HEAD_DIM=d, BLOCK_D=BLOCK_D,
            BLOCK_P=BLOCK_P, PREC=prec, **config,
        )

    # the Excitor's dk/dv kernel runs per group member, each member's k' built once; tuning launches write fresh
    # sums (the real ones are added into) and only the first group member's dk, dv (which the first real launch
    # overwrites)
    first = keys(0)

    def tune_dkdv(config):
        return lambda: launch_dkdv(config, 0, first)

    def tune_dq(config):
        return lambda: launch_dq(config, grad_sums(kv_default, config), *((0, first) if excitor else ()))

    kv_config = _configs("dkdv", kv_default, rows, causal, bypass, (q, first, v, do), tune_dkdv, deterministic)
    q_config = _configs("dq", q_default, rows, causal, bypass, (q, k, first, v, do), tune_dq, deterministic)
    sums = grad_sums(kv_config, q_config)
    for member in range(groups):
        kk = first if member == 0 else keys(member)
        launch_dkdv(kv_config, member, kk)
        if excitor:  # dq per group member, with its k'
            launch_dq(q_config, sums, member, kk)
    if not excitor:
        launch_dq(q_config, sums)
    dgate = sums.gate_grad(gate)
    dv = dv.to(v.dtype)
    if excitor:
        s = k if sim is None else sim
        dpk, ds = prompt_keys_backward(dke, s, pk, prompt_scale, rows, deterministic, dk=dk if sim is None else None)
        if sim is None:
            return dq, ds, dv, dpk, None, dgate, None
        return dq, dk.to(k.dtype), dv, dpk, None, dgate, ds
    return (dq, dk.to(k.dtype), dv, sums.prompt_grad(sums.prompt, Hkv, pk), sums.prompt_grad(sums.value, Hkv, pv),
            dgate, None)


# excitor_gate_grad_kernel's tiles on a GPU by input size (half, float32): no spills on sm_80 or sm_90 at
# d <= 128, P <= 64 (bench.static)
GATE_BLOCKS = {2: dict(BLOCK_M=64, BLOCK_N=32, num_warps=4), 4: dict(BLOCK_M=16, BLOCK_N=32, num_warps=8)}


def excitor_gate_gradient(do, q, k, v, pk, gate, sim, causal, softmax_scale, prompt_scale):
    """dgate of the Excitor in gate's dtype (excitor_gate_grad_kernel) for padded operands: the sdpa and CUDA
    backends' gate gradient."""
    rows = RowLayout(q, k)
    B, Hq, M, N, d, P = rows.B, rows.Hq, rows.M, rows.N, rows.d, pk.shape[-2]
    _, at = prompt_keys_forward(k if sim is None else sim, pk, prompt_scale, rows)
    tile = GATE_BLOCKS[q.element_size()] if q.is_cuda else dict(BLOCK_M=min(32, pow2(M)), BLOCK_N=min(32, pow2(N)))
    tiles = triton.cdiv(M, tile["BLOCK_M"])
    sums = GradSums(tiles, B, 0, Hq, 0, d, pk.dim() == 4, True, q.device)
    if do.stride(-1) != 1:
        do = do.contiguous()
    excitor_gate_grad_kernel[(tiles, B * Hq)](
        q, k, v, pk, at[0], at[-1], gate.contiguous(), do, sums.gate,
        *rows.strides(q), *rows.strides(k), *rows.strides(v), *rows.strides(at[0]), *prompt_strides(pk),
        *rows.strides(do), *sums.gate_strides, Hq, M, N, P, Hq // rows.Hkv, softmax_scale * LOG2E, softmax_scale,
        CAUSAL=causal, HEAD_DIM=d, BLOCK_D=pow2(d), BLOCK_P=at.shape[-1], PREC=precision(q),
        **tile,
    )
    return sums.gate_grad(gate)
