"""Split-KV decode (flash-decoding) forward for ``excitor_attention`` and ``adapter_attention``.

For ``M <= 16`` new queries against a long key/value cache the training kernel's grid (query tiles x
query heads) has too few programs to fill a GPU and reads the cache once per *query* head. Here:

* grid ``(S splits, B * Hkv)``: a program owns one key/value head ``g`` of sample ``b`` and one chunk of
  its cache, and packs all ``GROUPS = Hq / Hkv`` query heads x ``M`` queries into the rows of its tile,
  row ``r = (h - g * GROUPS) * M + i``, so the cache (and the Excitor reconstruction) is read once per
  key/value head.
* Excitor keys are rebuilt per key tile from the prompts (``prompt_mixture``, the centred ``ke`` of
  docs/design.md) and never stored: the score of row r (head h, query i) is
      <q_i, k_j + gate[h] ke_j> = <q_i, k_j> + gate[h] <q_i, ke_j>
  i.e. two dots against the shared tiles k and ke, with the gate applied per row. Rebuilding instead of
  reading a cached ``ke``: decode is bound by the bytes it reads, and per cached token and key/value head
  it reads ``k`` and ``v`` (2 d elements) either way; a cached ``ke`` would add d more (+50%, and the cache
  would have to be kept in step with ``k``), while rebuilding from ``k`` adds no bytes (with ``sim_keys`` it
  reads ``s`` instead, the same d elements a cached ``ke`` would cost) and ``4 P d`` flops on the half
  tensor cores, which the memory time hides.
* Per sample the keys ``[s_b, L_b)``, ``L_b = cache_seqlens[b]`` (``N`` without it), ``s_b = cache_leftpad[b]``
  (0 without it: a left-padded batch's pads); causal bottom-right alignment:
      query i sees key j  iff  s_b <= j < L_b  and  j <= i + L_b - M.
  Split ``s`` of sample ``b`` covers keys ``[s_b + s * C_b, min(s_b + (s + 1) * C_b, L_b))`` with
  ``C_b = ceil(ceil((L_b - s_b) / S) / BLOCK_N) * BLOCK_N``; keys outside ``[s_b, L_b)`` are never read.

Split/combine invariants (base-2 scores ``t_ij = softmax_scale * log2(e) * <q_i, k'_j>``): split ``s`` writes
      m_s = max_{j in s} t_ij,   l_s = sum_{j in s} exp2(t_ij - m_s),   acc_s = sum_{j in s} exp2(t_ij - m_s) v_j
to a float32 workspace, with ``(m_s, l_s, acc_s) = (-inf, 0, 0)`` for a row that sees no key of its chunk.
The combine kernel takes ``m = max_s m_s`` and
      o_i = sum_s exp2(m_s - m) acc_s / sum_s exp2(m_s - m) l_s
which is the softmax over the union of the chunks, independent of ``S``; a row with ``l = 0`` (no visible
key) gives 0. For the Adapter the combine kernel adds ``gate[h] sum_n softmax_n(softmax_scale <q_i, pk_n>)
pv_n``, computed once per query.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._alloc import new_output
from .._validate import MAX_DECODE_QUERIES, check_cache_lengths
from ._triton_common import LOG2E, dot, load_rows, pow2, precision, prompt_strides, store_rows
from ._triton_prompt_keys import prompt_mixture


@triton.jit
def _packed_offsets(r, R, M, stride_h, stride_m):
    """Memory offset of packed row r = head * M + i (rows >= R repeat row R - 1, so loads stay in bounds)."""
    r = tl.minimum(r, R - 1)
    return (r // M) * stride_h + (r % M) * stride_m


@triton.jit
def decode_split_kernel(
    Q, K, V, S, PK, GATE, SEQLENS, LEFTPAD, WS_ACC, WS_M, WS_L,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_sb, stride_sh, stride_sn,
    stride_pkb, stride_pkh, stride_pkp,
    Hkv, M, N, P, GROUPS, NUM_SPLITS, qk_scale, prompt_scale_log2,
    CAUSAL: tl.constexpr, BYPASS: tl.constexpr, SIM_IS_K: tl.constexpr, HAS_SEQLENS: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
):
    """Partial (acc, m, l) of one cache chunk for every query row of one key/value head."""
    split = tl.program_id(0)
    bg = tl.program_id(1)
    b = (bg // Hkv).to(tl.int64)
    g = bg % Hkv
    R = GROUPS * M
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_P)
    if HAS_SEQLENS:
        L = tl.load(SEQLENS + b)
    else:
        L = N
    start = 0
    if HAS_LEFTPAD:
        start = tl.load(LEFTPAD + b)
    chunk = tl.cdiv(tl.cdiv(L - start, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = tl.minimum(start + split * chunk, L)
    hi = tl.minimum(lo + chunk, L)

    q_rows = _packed_offsets(offs_r, R, M, stride_qh, stride_qm)
    q = load_rows(Q + b * stride_qb + g * GROUPS * stride_qh, q_rows, 1, offs_d, R, HEAD_DIM, False)
    last_key = offs_r % M + L - M  # causal: row r sees keys j <= i + L - M
    gate_r = tl.load(GATE + g * GROUPS + offs_r // M, mask=offs_r < R, other=0.0).to(tl.float32)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    s_base = S + b * stride_sb + g * stride_sh
    if BYPASS == 1:
        pk = load_rows(PK + b * stride_pkb + g * stride_pkh, offs_p, stride_pkp, offs_d, P, HEAD_DIM, True)

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    # row r sees a key of this chunk iff the chunk is not empty and (causal) its first key is one r may see
    seen = (offs_r >= 0) & (lo < hi)
    if CAUSAL:
        seen = seen & (lo <= last_key)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = load_rows(k_base, offs_n, stride_kn, offs_d, hi, HEAD_DIM, True)
        qk = dot(q, tl.trans(kt), PREC)
        if BYPASS == 1:  # Excitor: <q_i, k'_j> = <q_i, k_j> + gate[h] <q_i, ke_j>
            if SIM_IS_K:
                st = kt
            else:
                st = load_rows(s_base, offs_n, stride_sn, offs_d, hi, HEAD_DIM, True)
            _, ke = prompt_mixture(st, pk, offs_p, P, prompt_scale_log2, PREC, False)
            qk += gate_r[:, None] * dot(q, tl.trans(ke.to(q.dtype)), PREC)
        visible = offs_n[None, :] < hi
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= last_key[:, None])
        qk = tl.where(visible, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: keep exp2 finite
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        vt = load_rows(v_base, offs_n, stride_vn, offs_d, hi, HEAD_DIM, True)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(vt.dtype), vt, PREC)
        m_i = m_new

    # a row that sees no key of the chunk leaves (-inf, 0, 0), whatever the masked tiles held; one that sees
    # keys whose scores are all -inf stores l = NaN, so that the combined row is NaN like the formula's softmax
    ws = (split * tl.num_programs(1) + bg).to(tl.int64) * R
    store_rows(WS_ACC + ws * HEAD_DIM, tl.where(seen[:, None], acc, 0.0), offs_r, HEAD_DIM, offs_d, R, HEAD_DIM)
    tl.store(WS_M + ws + offs_r, tl.where(l_i == 0.0, float("-inf"), m_i), mask=offs_r < R)
    tl.store(WS_L + ws + offs_r, tl.where(seen & (l_i == 0.0), float("nan"), l_i), mask=offs_r < R)


@triton.jit
def _prompt_term(q, pk_base, pv_base, stride_pkp, stride_pvp, offs_d, P, qk_scale, HEAD_DIM: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """sum_n softmax_n(qk_scale <q_r, pk_n>) pv_n (base 2, float32) for the rows of a decode step (groups x at
    most 16 queries), one prompt at a time with an online maximum: R x P x d float32 multiply-adds, once per
    key/value head and step, and no (P, d) prompt tiles in registers (tensor-core dots over so few rows held them
    per warp: 112 bytes spilled in float32 at P = 32, d = 128)."""
    in_d = offs_d < HEAD_DIM
    q32 = q.to(tl.float32)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)
    op = tl.zeros(q.shape, tl.float32)
    for n in range(0, P):
        pk_n = tl.load(pk_base + n * stride_pkp + offs_d, mask=in_d, other=0.0).to(tl.float32)
        z = tl.sum(q32 * pk_n[None, :], 1) * qk_scale
        m_new = tl.maximum(m, z)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(z - m_new)
        pv_n = tl.load(pv_base + n * stride_pvp + offs_d, mask=in_d, other=0.0).to(tl.float32)
        l = l * alpha + w
        op = op * alpha[:, None] + w[:, None] * pv_n[None, :]
        m = m_new
    return op / l[:, None]


@triton.jit
def decode_combine_kernel(
    Q, PK, PV, GATE, WS_ACC, WS_M, WS_L, O,
    stride_qb, stride_qh, stride_qm,
    stride_pkb, stride_pkh, stride_pkp,
    stride_pvb, stride_pvh, stride_pvp,
    stride_ob, stride_oh, stride_om,
    Hkv, M, P, GROUPS, NUM_SPLITS, qk_scale,
    BYPASS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """o = sum_s exp2(m_s - m) acc_s / sum_s exp2(m_s - m) l_s (+ gate[h] prompt attention) for one kv head."""
    bg = tl.program_id(0)
    b = (bg // Hkv).to(tl.int64)
    g = bg % Hkv
    R = GROUPS * M
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for split in range(0, NUM_SPLITS):
        ws = (split * tl.num_programs(0) + bg).to(tl.int64) * R
        m_s = tl.load(WS_M + ws + offs_r, mask=offs_r < R, other=float("-inf"))
        l_s = tl.load(WS_L + ws + offs_r, mask=offs_r < R, other=0.0)
        acc_s = load_rows(WS_ACC + ws * HEAD_DIM, offs_r, HEAD_DIM, offs_d, R, HEAD_DIM, True)
        m_new = tl.maximum(m, m_s)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_ref)
        beta = tl.exp2(m_s - m_ref)
        l = l * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m = m_new
    o = acc / tl.where(l == 0.0, 1.0, l)[:, None]  # rows that saw no key: 0
    if BYPASS == 2:  # Adapter: all rows of kv head g share its prompts: o_i += gate[h] softmax(q_i pk^T) pv
        q_rows = _packed_offsets(offs_r, R, M, stride_qh, stride_qm)
        q = load_rows(Q + b * stride_qb + g * GROUPS * stride_qh, q_rows, 1, offs_d, R, HEAD_DIM, False)
        op = _prompt_term(q, PK + b * stride_pkb + g * stride_pkh, PV + b * stride_pvb + g * stride_pvh, stride_pkp,
                          stride_pvp, offs_d, P, qk_scale, HEAD_DIM, BLOCK_R)
        gate_r = tl.load(GATE + g * GROUPS + offs_r // M, mask=offs_r < R, other=0.0).to(tl.float32)
        o += gate_r[:, None] * op
    o_rows = _packed_offsets(offs_r, R, M, stride_oh, stride_om)
    o_ptrs = O + b * stride_ob + g * GROUPS * stride_oh + o_rows[:, None] + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=(offs_r[:, None] < R) & (offs_d[None, :] < HEAD_DIM))


def _num_splits(q: torch.Tensor, programs: int, N: int, block_n: int) -> int:
    """Splits of the cache: on a GPU enough programs for two waves of SMs, each split >= 4 key tiles;
    interpreted on the CPU, where programs run one after another, at most 4."""
    tiles = triton.cdiv(N, block_n)
    if q.is_cuda:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(tiles, 4), 128))
    return max(1, min(4, tiles))


def decode_blocks(on_gpu: bool, R: int, N: int, d: int, itemsize: int = 2) -> tuple[int, int, dict]:
    """(BLOCK_N, BLOCK_R, launch options) for ``R = groups * M`` query rows per key/value head (float32: 16-key
    tiles on 8 warps, with 64 the Excitor's split kernel spills tens of KB per thread at d = 128)."""
    BLOCK_R = pow2(R)
    if not on_gpu:
        return min(32, pow2(N)), BLOCK_R, {}
    if itemsize > 2:
        return 16, BLOCK_R, dict(num_warps=8, num_stages=2)
    return 64, BLOCK_R, dict(num_warps=8 if BLOCK_R * pow2(d) >= 64 * 128 else 4, num_stages=2)


def decode_forward(bypass, q, k, v, prompt_keys, prompt_values, gate, sim_keys, cache_seqlens, causal, softmax_scale,
                   prompt_scale, *, cache_leftpad=None, num_splits=None):
    """Decode forward of ``bypass`` (``EXCITOR`` or ``ADAPTER``) for ``M <= 16`` queries; returns ``o``.

    Shapes as in SPEC.md; ``cache_seqlens`` (int32 ``(B,)``, or None for ``L_b = N``) gives each sample's
    valid cache length, ``cache_leftpad`` (likewise) the first valid key of each. Inference only (no lse, no
    backward). ``num_splits`` overrides the heuristic.
    Two launches: ``decode_split_kernel`` (grid ``(S, B * Hkv)``) and ``decode_combine_kernel`` (grid
    ``(B * Hkv,)``); extra memory is the float32 workspace ``S * B * Hq * M * (d + 2)``.

    Benchmark: the intended comparison is plain ``torch.nn.functional.scaled_dot_product_attention``
    decode on the same cache (same ``q, k, v``, ``enable_gqa=True``, a bottom-right causal or length mask,
    gate 0 / no prompts), i.e. the cost of the bypass on top of ordinary decode attention.
    """
    B, Hq, M, d = q.shape
    Hkv, N, P = k.shape[1], k.shape[2], prompt_keys.shape[-2]
    if M > MAX_DECODE_QUERIES:
        raise ValueError(f"decode_forward takes at most {MAX_DECODE_QUERIES} queries; got q.shape[2] = {M}")
    check_cache_lengths(cache_seqlens, cache_leftpad, B, N, q.device)
    # the kernel reads L_b at cache_seqlens + b, s_b at cache_leftpad + b
    cache_seqlens, cache_leftpad = (None if t is None else t.contiguous() for t in (cache_seqlens, cache_leftpad))
    gate = gate.contiguous()  # the kernels index gate[h] with unit stride
    groups = Hq // Hkv
    R = groups * M
    block_n, BLOCK_R, launch = decode_blocks(q.is_cuda, R, N, d, q.element_size())
    S = num_splits or _num_splits(q, B * Hkv, N, block_n)
    BLOCK_D, BLOCK_P = pow2(d), pow2(P)
    prec = precision(q)

    ws_acc = new_output((S, B * Hkv, R, d), dtype=torch.float32, device=q.device)
    ws_m = new_output((S, B * Hkv, R), dtype=torch.float32, device=q.device)
    ws_l = new_output((S, B * Hkv, R), dtype=torch.float32, device=q.device)
    s = k if sim_keys is None else sim_keys
    decode_split_kernel[(S, B * Hkv)](
        q, k, v, s, prompt_keys, gate, q if cache_seqlens is None else cache_seqlens,
        q if cache_leftpad is None else cache_leftpad, ws_acc, ws_m, ws_l,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *s.stride()[:3], *prompt_strides(prompt_keys),
        Hkv, M, N, P, groups, S, softmax_scale * LOG2E, prompt_scale * LOG2E,
        CAUSAL=causal, BYPASS=bypass, SIM_IS_K=sim_keys is None, HAS_SEQLENS=cache_seqlens is not None,
        HAS_LEFTPAD=cache_leftpad is not None, HEAD_DIM=d, BLOCK_R=BLOCK_R, BLOCK_N=block_n, BLOCK_D=BLOCK_D,
        BLOCK_P=BLOCK_P, PREC=prec, **launch,
    )
    o = new_output(q.shape, dtype=q.dtype, device=q.device, like=q)
    pv = prompt_keys if prompt_values is None else prompt_values
    decode_combine_kernel[(B * Hkv,)](
        q, prompt_keys, pv, gate, ws_acc, ws_m, ws_l, o,
        *q.stride()[:3], *prompt_strides(prompt_keys), *prompt_strides(pv), *o.stride()[:3],
        Hkv, M, P, groups, S, softmax_scale * LOG2E,
        BYPASS=bypass, HEAD_DIM=d, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, **launch,
    )
    return o


@torch.library.custom_op("excitor_kernels::attention_decode", mutates_args=())
def attention_decode(bypass: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prompt_keys: torch.Tensor,
                     prompt_values: Optional[torch.Tensor], gate: torch.Tensor, sim_keys: Optional[torch.Tensor],
                     cache_seqlens: Optional[torch.Tensor], cache_leftpad: Optional[torch.Tensor], causal: bool,
                     softmax_scale: float, prompt_scale: float) -> torch.Tensor:
    """:func:`decode_forward` as an opaque op, so ``torch.compile`` keeps generation graphs whole."""
    return decode_forward(bypass, q, k, v, prompt_keys, prompt_values, gate, sim_keys, cache_seqlens, causal,
                          softmax_scale, prompt_scale, cache_leftpad=cache_leftpad)


@attention_decode.register_fake
def _(bypass, q, k, v, prompt_keys, prompt_values, gate, sim_keys, cache_seqlens, cache_leftpad, causal, softmax_scale,
      prompt_scale):
    return torch.empty_like(q)
