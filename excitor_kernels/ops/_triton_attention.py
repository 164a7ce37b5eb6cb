"""Fused Triton kernels shared by ``excitor_attention`` and ``adapter_attention``.

One family of flash-attention kernels; the constexpr ``BYPASS`` picks what rides along with the
causal attention of ``q, k, v`` (notation of SPEC.md, per batch ``b`` and query head ``h``):

* ``BYPASS == 1`` (Excitor): every key tile is rebuilt from the prompts before it meets the queries,
      a[j, n] = softmax_n(prompt_scale <s_j, pk_n>),  ke_j = sum_n a[j, n] pk_n,  k'_j = k_j + gate[h] ke_j
  so neither ``k'`` nor any ``M x N`` tensor is ever written to memory.
* ``BYPASS == 2`` (Adapter): each query tile also attends to the prompts with its own softmax,
      o_i += gate[h] sum_n softmax_n(softmax_scale <q_i, pk_n>) pv_n.

Scores are kept in base 2: ``qk_scale = softmax_scale * log2(e)`` and the saved row statistic is
``lse_i = max_j + log2(sum_j exp2(...))`` in those units; a row that sees no key stores ``lse = +inf``
so that ``exp2(score - lse) = 0`` in the backward and the row passes no gradient.

The constexpr ``VARLEN`` switches from padded ``(B, H, L, d)`` batches to packed sequences (flash-attention's
varlen layout): batch index ``b`` is then a sequence whose rows start at ``cu_seqlens[b]`` and whose
lengths replace ``M`` and ``N`` (which only size the grid); see :class:`RowLayout`.

Cross-program reductions (prompt and gate gradients) go through ``tl.atomic_add`` into float32
buffers. With ``deterministic=True`` the launcher gives each program its own slice of the buffer
(non-zero tile strides), so every address receives exactly one add and the host sums the slices in a
fixed order.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """tl.dot with float32 accumulation. PREC "upcast" computes it in exact float32: the CPU interpreter's
    bfloat16 dot is wrong (triton 3.6 to 3.9), so interpreted bfloat16 runs take this path."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _load_rows(base, rows, stride_row, cols, n_rows, HEAD_DIM: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a (len(rows), BLOCK_D) tile of a row-major (n_rows, HEAD_DIM) matrix, zeros outside."""
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    mask = cols[None, :] < HEAD_DIM
    if CHECK_ROWS:
        mask = mask & (rows[:, None] < n_rows)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_rows(base, tile, rows, stride_row, cols, n_rows, HEAD_DIM: tl.constexpr):
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))


@triton.jit
def _prompt_softmax(x, pk, offs_p, P, scale_log2, PREC: tl.constexpr):
    """a[r, n] = softmax_n(scale * <x_r, pk_n>) over the P real prompts (padded ones get 0), float32."""
    z = _dot(x, tl.trans(pk), PREC) * scale_log2
    z = tl.where(offs_p[None, :] < P, z, float("-inf"))
    a = tl.exp2(z - tl.max(z, 1)[:, None])
    return a / tl.sum(a, 1)[:, None]


@triton.jit
def _reconstruct_keys(kt, s_base, stride_sn, offs_n, offs_d, N, pk, offs_p, P, prompt_scale_log2,
                      SIM_IS_K: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
    """Excitor bypass of one key tile: (a, ke) with a = softmax(prompt_scale s pk^T), ke = a pk."""
    if SIM_IS_K:
        st = kt
    else:
        st = _load_rows(s_base, offs_n, stride_sn, offs_d, N, HEAD_DIM, True)
    a = _prompt_softmax(st, pk, offs_p, P, prompt_scale_log2, PREC)
    # a stays float32 (tf32 on a GPU for half inputs): ke feeds the cancelling gate-gradient sum, where
    # rounding a to the input dtype would double the error of dgate
    ke = _dot(a, pk.to(tl.float32), PREC)
    return a, ke


@triton.jit
def _key_tile(k_base, s_base, stride_kn, stride_sn, offs_n, offs_d, N, pk, offs_p, P, gate_h, prompt_scale_log2,
              MASKED: tl.constexpr, BYPASS: tl.constexpr, SIM_IS_K: tl.constexpr, HEAD_DIM: tl.constexpr,
              PREC: tl.constexpr):
    """The key tile the queries of head h meet: k, or for the Excitor k' = k + gate[h] ke."""
    kt = _load_rows(k_base, offs_n, stride_kn, offs_d, N, HEAD_DIM, MASKED)
    if BYPASS == 1:
        _, ke = _reconstruct_keys(kt, s_base, stride_sn, offs_n, offs_d, N, pk, offs_p, P,
                                  prompt_scale_log2, SIM_IS_K, HEAD_DIM, PREC)
        kt = (kt.to(tl.float32) + gate_h * ke).to(kt.dtype)
    return kt


@triton.jit
def _sequence(CU, b, L, VARLEN: tl.constexpr):
    """(first row, length) of sequence ``b``: rows [CU[b], CU[b + 1]) of a packed tensor when VARLEN,
    else (0, L) in batch entry ``b`` of a padded one."""
    start = 0
    if VARLEN:
        start = tl.load(CU + b).to(tl.int64)
        L = (tl.load(CU + b + 1) - start).to(tl.int32)
    return start, L


@triton.jit
def _visible(offs_m, offs_n, N, shift, CAUSAL: tl.constexpr):
    """(rows, cols) mask of the keys each query sees: j < N and, when causal, j <= i + shift."""
    visible = offs_n[None, :] < N
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + shift)
    return visible


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, offs_m, offs_d, offs_p, k_base, v_base, s_base,
               stride_kn, stride_vn, stride_sn, lo, hi, N, shift, pk, gate_h, P, qk_scale, prompt_scale_log2,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, BYPASS: tl.constexpr, SIM_IS_K: tl.constexpr,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
    """Online softmax over key tiles [lo, hi); MASKED tiles apply the causal and the j < N masks."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = _key_tile(k_base, s_base, stride_kn, stride_sn, offs_n, offs_d, N, pk, offs_p, P, gate_h,
                       prompt_scale_log2, MASKED, BYPASS, SIM_IS_K, HEAD_DIM, PREC)
        qk = _dot(q, tl.trans(kt), PREC) * qk_scale
        if MASKED:
            qk = tl.where(_visible(offs_m, offs_n, N, shift, CAUSAL), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:  # a row may have seen nothing yet: keep exp2 away from (-inf) - (-inf)
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = _load_rows(v_base, offs_n, stride_vn, offs_d, N, HEAD_DIM, MASKED)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _causal_key_bounds(start_m, M, N, shift, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range seen by query tile [start_m, start_m + BLOCK_M): tiles [0, full) need no mask, [full, hi) do."""
    if CAUSAL:
        hi = tl.minimum(N, tl.maximum(start_m + BLOCK_M + shift, 0))
        full = tl.minimum(N // BLOCK_N, tl.maximum(start_m + shift + 1, 0) // BLOCK_N) * BLOCK_N
    else:
        hi = N
        full = N // BLOCK_N * BLOCK_N
    return full, hi


@triton.jit
def _prompt_attention(q, pk_base, pv_base, stride_pkp, stride_pvp, offs_p, offs_d, P, qk_scale,
                      HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
    """Adapter prompts for one query tile: (ap, op, pk, pv) with ap = softmax(scale q pk^T), op = ap pv."""
    pk = _load_rows(pk_base, offs_p, stride_pkp, offs_d, P, HEAD_DIM, True)
    pv = _load_rows(pv_base, offs_p, stride_pvp, offs_d, P, HEAD_DIM, True)
    ap = _prompt_softmax(q, pk, offs_p, P, qk_scale, PREC)
    op = _dot(ap.to(pv.dtype), pv, PREC)
    return ap, op, pk, pv


@triton.jit
def attention_fwd_kernel(
    Q, K, V, S, PK, PV, GATE, O, LSE, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_sb, stride_sh, stride_sn,
    stride_pkb, stride_pkh, stride_pkp,
    stride_pvb, stride_pvh, stride_pvp,
    stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
    Hq, M, N, P, GROUPS, qk_scale, prompt_scale_log2,
    CAUSAL: tl.constexpr, BYPASS: tl.constexpr, SIM_IS_K: tl.constexpr, VARLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (query tile, batch or sequence * query head); M, N are the longest lengths."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    g = h // GROUPS
    q0, M = _sequence(CU_Q, b, M, VARLEN)
    k0, N = _sequence(CU_K, b, N, VARLEN)
    if start_m >= M:  # past the end of a shorter packed sequence
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_P)
    shift = N - M  # bottom-right causal alignment: row i sees keys j <= i + shift

    q = _load_rows(Q + b * stride_qb + q0 * stride_qm + h * stride_qh, offs_m, stride_qm, offs_d, M, HEAD_DIM, True)
    k_base = K + b * stride_kb + k0 * stride_kn + g * stride_kh
    v_base = V + b * stride_vb + k0 * stride_vn + g * stride_vh
    s_base = S + b * stride_sb + k0 * stride_sn + g * stride_sh
    gate_h = tl.load(GATE + h).to(tl.float32)
    if BYPASS == 1:
        pk = _load_rows(PK + b * stride_pkb + g * stride_pkh, offs_p, stride_pkp, offs_d, P, HEAD_DIM, True)
    else:
        pk = q  # unused

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full, hi = _causal_key_bounds(start_m, M, N, shift, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, offs_m, offs_d, offs_p, k_base, v_base, s_base,
                               stride_kn, stride_vn, stride_sn, 0, full, N, shift, pk, gate_h, P, qk_scale,
                               prompt_scale_log2, False, CAUSAL, BYPASS, SIM_IS_K, BLOCK_N, HEAD_DIM, PREC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, offs_m, offs_d, offs_p, k_base, v_base, s_base,
                               stride_kn, stride_vn, stride_sn, full, hi, N, shift, pk, gate_h, P, qk_scale,
                               prompt_scale_log2, True, CAUSAL, BYPASS, SIM_IS_K, BLOCK_N, HEAD_DIM, PREC)

    empty = l_i == 0.0  # rows that saw no key: output 0, lse = +inf
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    if BYPASS == 2:
        _, op, _, _ = _prompt_attention(q, PK + b * stride_pkb + g * stride_pkh, PV + b * stride_pvb + g * stride_pvh,
                                        stride_pkp, stride_pvp, offs_p, offs_d, P, qk_scale, HEAD_DIM, PREC)
        o += gate_h * op
    _store_rows(O + b * stride_ob + q0 * stride_om + h * stride_oh, o, offs_m, stride_om, offs_d, M, HEAD_DIM)
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + b * stride_lb + h * stride_lh + q0 + offs_m, lse, mask=offs_m < M)


@triton.jit
def attention_bwd_preprocess_kernel(
    O, DO, Q, PK, PV, GATE, DELTA, CU_Q,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_qb, stride_qh, stride_qm,
    stride_pkb, stride_pkh, stride_pkp,
    stride_pvb, stride_pvh, stride_pvp, stride_lb, stride_lh,
    Hq, M, P, GROUPS, qk_scale,
    BYPASS: tl.constexpr, VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
):
    """delta_i = <do_i, o_i> minus, for the adapter, the prompt part gate[h] <do_i, op_i>.

    delta is the D of the softmax backward of the token attention alone: ds = p * (do v^T - delta).
    """
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    q0, M = _sequence(CU_Q, b, M, VARLEN)
    if start_m >= M:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * stride_ob + q0 * stride_om + h * stride_oh, offs_m, stride_om, offs_d, M, HEAD_DIM,
                   True).to(tl.float32)
    do = _load_rows(DO + b * stride_dob + q0 * stride_dom + h * stride_doh, offs_m, stride_dom, offs_d, M, HEAD_DIM,
                    True)
    if BYPASS == 2:
        g = h // GROUPS
        q = _load_rows(Q + b * stride_qb + q0 * stride_qm + h * stride_qh, offs_m, stride_qm, offs_d, M, HEAD_DIM,
                       True)
        _, op, _, _ = _prompt_attention(q, PK + b * stride_pkb + g * stride_pkh, PV + b * stride_pvb + g * stride_pvh,
                                        stride_pkp, stride_pvp, tl.arange(0, BLOCK_P), offs_d, P, qk_scale,
                                        HEAD_DIM, PREC)
        o -= tl.load(GATE + h).to(tl.float32) * op
    delta = tl.sum(o * do.to(tl.float32), 1)
    tl.store(DELTA + b * stride_lb + h * stride_lh + q0 + offs_m, delta, mask=offs_m < M)


@triton.jit
def _bwd_key_tile_head(dkp, dv, kt, vt, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                       offs_n, offs_d, lo, hi, M, shift, qk_scale,
                       MASKED: tl.constexpr, FLOAT32_DS: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                       PREC: tl.constexpr):
    """Accumulate, for one key tile and one query head, dk'^T-free sums over query tiles [lo, hi):
    dv += p^T do and dkp += ds^T q (the softmax_scale factor is applied by the caller). FLOAT32_DS keeps ds
    in float32 for that product (the Excitor: dk' feeds the cancelling gate-gradient sum)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, offs_m, stride_qm, offs_d, M, HEAD_DIM, True)
        do = _load_rows(do_base, offs_m, stride_dom, offs_d, M, HEAD_DIM, True)
        lse = tl.load(lse_base + offs_m, mask=offs_m < M, other=float("inf"))   # rows >= M give p = 0
        delta = tl.load(delta_base + offs_m, mask=offs_m < M, other=0.0)
        qkT = _dot(kt, tl.trans(q), PREC) * qk_scale           # (BLOCK_N, BLOCK_M)
        pT = tl.exp2(qkT - lse[None, :])
        if MASKED:
            pT = tl.where(offs_n[:, None] <= offs_m[None, :] + shift, pT, 0.0)
        dv += _dot(pT.to(do.dtype), do, PREC)
        dpT = _dot(vt, tl.trans(do), PREC)
        dsT = pT * (dpT - delta[None, :])
        if FLOAT32_DS:
            dkp += _dot(dsT, q.to(tl.float32), PREC)
        else:
            dkp += _dot(dsT.to(q.dtype), q, PREC)
    return dkp, dv


@triton.jit
def _bwd_dkdv(pid, Q, K, V, S, PK, GATE, DO, LSE, DELTA, DK, DV, DS, DPK, DGATE, CU_Q, CU_K,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_sb, stride_sh, stride_sn,
              stride_pkb, stride_pkh, stride_pkp, stride_dob, stride_doh, stride_dom,
              stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
              stride_dsb, stride_dsh, stride_dsn,
              stride_dpk_t, stride_dpk_b, stride_dpk_h, stride_dpk_p, stride_dg_t, stride_dg_b, stride_lb, stride_lh,
              Hkv, M, N, P, GROUPS, qk_scale, softmax_scale, prompt_scale, prompt_scale_log2,
              CAUSAL: tl.constexpr, BYPASS: tl.constexpr, SIM_IS_K: tl.constexpr, VARLEN: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_P: tl.constexpr, PREC: tl.constexpr):
    """dk, dv (and the Excitor chain rule) for one key tile of one key/value head, all its query heads."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    tile = pid % n_tiles
    bg = pid // n_tiles
    b = (bg // Hkv).to(tl.int64)
    g = bg % Hkv
    start_n = tile * BLOCK_N
    q0, M = _sequence(CU_Q, b, M, VARLEN)
    k0, N = _sequence(CU_K, b, N, VARLEN)
    if start_n >= N:  # past the end of a shorter packed sequence
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_P)
    shift = N - M
    in_range = offs_n < N

    kt = _load_rows(K + b * stride_kb + k0 * stride_kn + g * stride_kh, offs_n, stride_kn, offs_d, N, HEAD_DIM, True)
    vt = _load_rows(V + b * stride_vb + k0 * stride_vn + g * stride_vh, offs_n, stride_vn, offs_d, N, HEAD_DIM, True)
    s_base = S + b * stride_sb + k0 * stride_sn + g * stride_sh
    pk_base = PK + b * stride_pkb + g * stride_pkh
    if BYPASS == 1:
        pk = _load_rows(pk_base, offs_p, stride_pkp, offs_d, P, HEAD_DIM, True)
        a, ke = _reconstruct_keys(kt, s_base, stride_sn, offs_n, offs_d, N, pk, offs_p, P, prompt_scale_log2,
                                  SIM_IS_K, HEAD_DIM, PREC)
        pk_mean = tl.sum(pk.to(tl.float32), 0) / P
    # query tiles [lo, full) straddle the causal diagonal of this key tile; [full, M) see all of it
    if CAUSAL:
        lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
        full = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M, M)
        lo = tl.minimum(lo, full)
    else:
        lo = 0
        full = 0

    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dke = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for hh in range(0, GROUPS):
        h = g * GROUPS + hh
        if BYPASS == 1:
            gate_h = tl.load(GATE + h).to(tl.float32)
            kh = (kt.to(tl.float32) + gate_h * ke).to(kt.dtype)           # k'[h] = k + gate[h] ke
        else:
            kh = kt
        q_base = Q + b * stride_qb + q0 * stride_qm + h * stride_qh
        do_base = DO + b * stride_dob + q0 * stride_dom + h * stride_doh
        row_stats = b * stride_lb + h * stride_lh + q0
        dkp = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dkp, dv = _bwd_key_tile_head(dkp, dv, kh, vt, q_base, do_base, LSE + row_stats, DELTA + row_stats,
                                     stride_qm, stride_dom, offs_n, offs_d, lo, full, M, shift, qk_scale,
                                     True, BYPASS == 1, BLOCK_M, HEAD_DIM, PREC)
        dkp, dv = _bwd_key_tile_head(dkp, dv, kh, vt, q_base, do_base, LSE + row_stats, DELTA + row_stats,
                                     stride_qm, stride_dom, offs_n, offs_d, full, M, M, shift, qk_scale,
                                     False, BYPASS == 1, BLOCK_M, HEAD_DIM, PREC)
        dkp = tl.where(in_range[:, None], dkp * softmax_scale, 0.0)          # dk'[h]
        dk += dkp
        if BYPASS == 1:
            dke += gate_h * dkp                                               # dke = sum_h gate[h] dk'[h]
            # dgate[h] = sum_j <dk'[h, j], ke_j> = sum_j <dk'[h, j], ke_j - c> for any c fixed over j, since
            # sum_j dk'[h, j] = softmax_scale sum_i q_i sum_j ds[i, j] = 0. Centring ke on the prompts' mean
            # c removes the common part that would otherwise cancel only up to rounding.
            dgate = tl.sum(tl.sum(dkp * (ke - pk_mean[None, :]), 1), 0)
            tl.atomic_add(DGATE + tile * stride_dg_t + b * stride_dg_b + h, dgate)

    if BYPASS == 1:
        # back through ke = a pk and a = softmax(prompt_scale s pk^T)
        da = _dot(dke.to(pk.dtype), tl.trans(pk), PREC)  # da[j, n] = <dke_j, pk_n>
        dz = a * (da - tl.sum(a * da, 1)[:, None])
        dsim = prompt_scale * _dot(dz.to(pk.dtype), pk, PREC)
        if SIM_IS_K:
            st = kt
            dk += dsim
        else:
            st = _load_rows(s_base, offs_n, stride_sn, offs_d, N, HEAD_DIM, True)
            _store_rows(DS + b * stride_dsb + k0 * stride_dsn + g * stride_dsh, dsim, offs_n, stride_dsn, offs_d, N,
                        HEAD_DIM)
        # dpk_n = sum_j a[j, n] dke_j + prompt_scale sum_j dz[j, n] s_j   (rows j >= N have dke = dz = 0)
        dpk = _dot(tl.trans(a).to(pk.dtype), dke.to(pk.dtype), PREC)
        dpk += prompt_scale * _dot(tl.trans(dz).to(pk.dtype), st, PREC)
        dpk_ptrs = (DPK + tile * stride_dpk_t + b * stride_dpk_b + g * stride_dpk_h
                    + offs_p[:, None] * stride_dpk_p + offs_d[None, :])
        tl.atomic_add(dpk_ptrs, dpk, mask=(offs_p[:, None] < P) & (offs_d[None, :] < HEAD_DIM))
    _store_rows(DK + b * stride_dkb + k0 * stride_dkn + g * stride_dkh, dk, offs_n, stride_dkn, offs_d, N, HEAD_DIM)
    _store_rows(DV + b * stride_dvb + k0 * stride_dvn + g * stride_dvh, dv, offs_n, stride_dvn, offs_d, N, HEAD_DIM)


@triton.jit
def _bwd_dq_tiles(dq, q, do, lse, delta, offs_m, offs_d, offs_p, k_base, v_base, s_base,
                  stride_kn, stride_vn, stride_sn, lo, hi, N, shift, pk, gate_h, P, qk_scale, prompt_scale_log2,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, BYPASS: tl.constexpr, SIM_IS_K: tl.constexpr,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
    """dq += ds k' over key tiles [lo, hi) (softmax_scale applied by the caller)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = _key_tile(k_base, s_base, stride_kn, stride_sn, offs_n, offs_d, N, pk, offs_p, P, gate_h,
                       prompt_scale_log2, MASKED, BYPASS, SIM_IS_K, HEAD_DIM, PREC)
        vt = _load_rows(v_base, offs_n, stride_vn, offs_d, N, HEAD_DIM, MASKED)
        p = tl.exp2(_dot(q, tl.trans(kt), PREC) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m, offs_n, N, shift, CAUSAL), p, 0.0)
        dp = _dot(do, tl.trans(vt), PREC)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), kt, PREC)
    return dq


@triton.jit
def _bwd_dq(pid, Q, K, V, S, PK, PV, GATE, DO, LSE, DELTA, DQ, DPK, DPV, DGATE, CU_Q, CU_K,
            stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
            stride_vb, stride_vh, stride_vn, stride_sb, stride_sh, stride_sn,
            stride_pkb, stride_pkh, stride_pkp, stride_pvb, stride_pvh, stride_pvp,
            stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
            stride_dpk_t, stride_dpk_b, stride_dpk_h, stride_dpk_r, stride_dpk_p, stride_dg_t, stride_dg_b,
            stride_lb, stride_lh, Hq, M, N, P, GROUPS, qk_scale, softmax_scale, prompt_scale_log2,
            CAUSAL: tl.constexpr, BYPASS: tl.constexpr, SIM_IS_K: tl.constexpr, VARLEN: tl.constexpr,
            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_P: tl.constexpr, PREC: tl.constexpr):
    """dq for one query tile of one query head (plus, for the adapter, every prompt-side gradient)."""
    n_tiles = tl.cdiv(M, BLOCK_M)
    tile = pid % n_tiles
    bh = pid // n_tiles
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    g = h // GROUPS
    start_m = tile * BLOCK_M
    q0, M = _sequence(CU_Q, b, M, VARLEN)
    k0, N = _sequence(CU_K, b, N, VARLEN)
    if start_m >= M:  # past the end of a shorter packed sequence
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_P)
    shift = N - M

    q = _load_rows(Q + b * stride_qb + q0 * stride_qm + h * stride_qh, offs_m, stride_qm, offs_d, M, HEAD_DIM, True)
    do = _load_rows(DO + b * stride_dob + q0 * stride_dom + h * stride_doh, offs_m, stride_dom, offs_d, M, HEAD_DIM,
                    True)
    row_stats = b * stride_lb + h * stride_lh + q0
    lse = tl.load(LSE + row_stats + offs_m, mask=offs_m < M, other=float("inf"))
    delta = tl.load(DELTA + row_stats + offs_m, mask=offs_m < M, other=0.0)
    gate_h = tl.load(GATE + h).to(tl.float32)
    pk_base = PK + b * stride_pkb + g * stride_pkh
    if BYPASS == 1:
        pk = _load_rows(pk_base, offs_p, stride_pkp, offs_d, P, HEAD_DIM, True)
    else:
        pk = q  # unused
    k_base = K + b * stride_kb + k0 * stride_kn + g * stride_kh
    v_base = V + b * stride_vb + k0 * stride_vn + g * stride_vh
    s_base = S + b * stride_sb + k0 * stride_sn + g * stride_sh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full, hi = _causal_key_bounds(start_m, M, N, shift, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _bwd_dq_tiles(dq, q, do, lse, delta, offs_m, offs_d, offs_p, k_base, v_base, s_base,
                       stride_kn, stride_vn, stride_sn, 0, full, N, shift, pk, gate_h, P, qk_scale,
                       prompt_scale_log2, False, CAUSAL, BYPASS, SIM_IS_K, BLOCK_N, HEAD_DIM, PREC)
    dq = _bwd_dq_tiles(dq, q, do, lse, delta, offs_m, offs_d, offs_p, k_base, v_base, s_base,
                       stride_kn, stride_vn, stride_sn, full, hi, N, shift, pk, gate_h, P, qk_scale,
                       prompt_scale_log2, True, CAUSAL, BYPASS, SIM_IS_K, BLOCK_N, HEAD_DIM, PREC)
    dq *= softmax_scale

    if BYPASS == 2:
        # o_i += gate[h] op_i with op = ap pv and ap = softmax(softmax_scale q pk^T)
        ap, op, pk, pv = _prompt_attention(q, pk_base, PV + b * stride_pvb + g * stride_pvh, stride_pkp, stride_pvp,
                                           offs_p, offs_d, P, qk_scale, HEAD_DIM, PREC)
        do32 = tl.where(offs_m[:, None] < M, do.to(tl.float32), 0.0)
        dgate = tl.sum(tl.sum(do32 * op, 1), 0)                                # sum_i <do_i, op_i>
        tl.atomic_add(DGATE + tile * stride_dg_t + b * stride_dg_b + h, dgate)
        dop = gate_h * do32
        dap = _dot(dop.to(pv.dtype), tl.trans(pv), PREC)     # dap[i, n] = <dop_i, pv_n>
        dzp = ap * (dap - tl.sum(ap * dap, 1)[:, None])
        dzp = tl.where(offs_m[:, None] < M, dzp, 0.0)
        dq += softmax_scale * _dot(dzp.to(pk.dtype), pk, PREC)
        dpk = softmax_scale * _dot(tl.trans(dzp).to(q.dtype), q, PREC)
        dpv = _dot(tl.trans(ap * (offs_m[:, None] < M)).to(pv.dtype), dop.to(pv.dtype), PREC)
        # slice (tile, b, g, h - g * GROUPS); the atomic layout sets the tile, group-member (and, for
        # shared prompts, batch) strides to 0 so that those programs add into one (P, d) block
        pmask = (offs_p[:, None] < P) & (offs_d[None, :] < HEAD_DIM)
        off = (tile * stride_dpk_t + b * stride_dpk_b + g * stride_dpk_h + (h - g * GROUPS) * stride_dpk_r
               + offs_p[:, None] * stride_dpk_p + offs_d[None, :])
        tl.atomic_add(DPK + off, dpk, mask=pmask)
        tl.atomic_add(DPV + off, dpv, mask=pmask)
    _store_rows(DQ + b * stride_dqb + q0 * stride_dqm + h * stride_dqh, dq, offs_m, stride_dqm, offs_d, M, HEAD_DIM)


@triton.jit
def attention_bwd_kernel(
    Q, K, V, S, PK, PV, GATE, DO, LSE, DELTA, DQ, DK, DV, DS, DPK, DPV, DGATE_K, DGATE_Q, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_sb, stride_sh, stride_sn,
    stride_pkb, stride_pkh, stride_pkp, stride_pvb, stride_pvh, stride_pvp,
    stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_dsb, stride_dsh, stride_dsn,
    stride_kdpk_t, stride_kdpk_b, stride_kdpk_h, stride_kdpk_p, stride_kdg_t, stride_kdg_b,
    stride_qdpk_t, stride_qdpk_b, stride_qdpk_h, stride_qdpk_r, stride_qdpk_p, stride_qdg_t, stride_qdg_b,
    stride_lb, stride_lh,
    Hq, Hkv, M, N, P, GROUPS, num_key_programs, qk_scale, softmax_scale, prompt_scale, prompt_scale_log2,
    CAUSAL: tl.constexpr, BYPASS: tl.constexpr, SIM_IS_K: tl.constexpr, VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    KV_BLOCK_M: tl.constexpr, KV_BLOCK_N: tl.constexpr, Q_BLOCK_M: tl.constexpr, Q_BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
):
    """One launch for the whole backward: the first ``num_key_programs`` programs own a key tile
    (dk, dv, Excitor prompt/gate gradients); the rest own a query tile (dq, Adapter prompt/gate gradients)."""
    pid = tl.program_id(0)
    if pid < num_key_programs:
        _bwd_dkdv(pid, Q, K, V, S, PK, GATE, DO, LSE, DELTA, DK, DV, DS, DPK, DGATE_K, CU_Q, CU_K,
                  stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn, stride_sb, stride_sh, stride_sn,
                  stride_pkb, stride_pkh, stride_pkp, stride_dob, stride_doh, stride_dom,
                  stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                  stride_dsb, stride_dsh, stride_dsn,
                  stride_kdpk_t, stride_kdpk_b, stride_kdpk_h, stride_kdpk_p, stride_kdg_t, stride_kdg_b,
                  stride_lb, stride_lh, Hkv, M, N, P, GROUPS, qk_scale, softmax_scale, prompt_scale, prompt_scale_log2,
                  CAUSAL, BYPASS, SIM_IS_K, VARLEN, HEAD_DIM, KV_BLOCK_M, KV_BLOCK_N, BLOCK_D, BLOCK_P, PREC)
    else:
        _bwd_dq(pid - num_key_programs, Q, K, V, S, PK, PV, GATE, DO, LSE, DELTA, DQ, DPK, DPV, DGATE_Q, CU_Q, CU_K,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_sb, stride_sh, stride_sn,
                stride_pkb, stride_pkh, stride_pkp, stride_pvb, stride_pvh, stride_pvp,
                stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
                stride_qdpk_t, stride_qdpk_b, stride_qdpk_h, stride_qdpk_r, stride_qdpk_p, stride_qdg_t, stride_qdg_b,
                stride_lb, stride_lh, Hq, M, N, P, GROUPS, qk_scale, softmax_scale, prompt_scale_log2,
                CAUSAL, BYPASS, SIM_IS_K, VARLEN, HEAD_DIM, Q_BLOCK_M, Q_BLOCK_N, BLOCK_D, BLOCK_P, PREC)


# ----------------------------------------------------------------------------------------------
# Launchers (host side)
# ----------------------------------------------------------------------------------------------
import torch  # noqa: E402

from .._alloc import new_output  # noqa: E402

EXCITOR, ADAPTER = 1, 2


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def _precision(t: torch.Tensor) -> str:
    """float32 dots follow torch's TF32 switch; half types use their tensor-core path (see ``_dot``)."""
    if t.device.type == "cpu" and t.dtype == torch.bfloat16:
        return "upcast"
    if t.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _prompt_strides(t: torch.Tensor | None) -> tuple:
    """(batch, head, prompt) strides of (Hkv, P, d) shared (batch stride 0) or (B, Hkv, P, d) prompts."""
    if t is None:
        return (0, 0, 0)
    return (0,) + tuple(t.stride()[:2]) if t.dim() == 3 else tuple(t.stride()[:3])


def blocks(on_gpu: bool, M: int, N: int, d: int, itemsize: int = 2) -> tuple[dict, dict]:
    """(forward, backward) tile sizes and launch options. On a GPU: flash-attention-tutorial shapes, halved
    for float32 inputs (whose 128 x 64 forward tiles with d = 128 need more shared memory than a block may
    have, tests/triton_gpu_compile.py); interpreted: tiles no larger than the problem."""
    if on_gpu and itemsize > 2:
        fwd = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
        bwd = dict(KV_BLOCK_M=32, KV_BLOCK_N=64, Q_BLOCK_M=64, Q_BLOCK_N=32, num_warps=4, num_stages=2)
    elif on_gpu:
        fwd = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8 if d > 64 else 4, num_stages=3 if d <= 128 else 2)
        bwd = dict(KV_BLOCK_M=32, KV_BLOCK_N=64, Q_BLOCK_M=64, Q_BLOCK_N=32, num_warps=4, num_stages=2)
    else:
        bm, bn = min(32, _pow2(M)), min(32, _pow2(N))
        fwd = dict(BLOCK_M=bm, BLOCK_N=bn)
        bwd = dict(KV_BLOCK_M=bm, KV_BLOCK_N=bn, Q_BLOCK_M=bm, Q_BLOCK_N=bn)
    return fwd, bwd


def stats_shape(q, cu_seqlens_q) -> tuple:
    """Shape of the per-row statistics (lse, delta): (B, Hq, M) padded, (Hq, total_q) packed."""
    return tuple(q.shape[:3]) if cu_seqlens_q is None else (q.shape[1], q.shape[0])


class RowLayout:
    """Where the rows of each batch entry live, for padded ``(B, H, L, d)`` or packed ``(total, H, d)`` tensors.

    Padded: ``B`` entries of ``M`` query and ``N`` key rows. Packed (varlen): sequence ``b`` owns rows
    ``[cu_q[b], cu_q[b + 1])`` of ``q`` and ``[cu_k[b], cu_k[b + 1])`` of ``k, v``; ``M, N`` are the
    longest lengths (they size the grid), the kernels read each sequence's own from ``cu_*``. Row
    statistics (lse, delta) are ``(B, Hq, M)`` padded and ``(Hq, total_q)`` packed.
    """

    def __init__(self, q, k, cu_q=None, cu_k=None, max_q=0, max_k=0):
        self.varlen = cu_q is not None
        if self.varlen:
            self.B, self.M, self.N = cu_q.numel() - 1, int(max_q), int(max_k)
            self.Hq, self.d, self.Hkv = q.shape[1], q.shape[2], k.shape[1]
            self.cu_q, self.cu_k = cu_q, cu_k
        else:
            self.B, self.Hq, self.M, self.d = q.shape
            self.Hkv, self.N = k.shape[1], k.shape[2]
            self.cu_q = self.cu_k = q  # never read
        self.stats_shape = stats_shape(q, cu_q)

    def strides(self, t):
        """(batch, head, row) strides of ``t``; a packed tensor is one batch entry (batch stride 0)."""
        return (0, t.stride(1), t.stride(0)) if self.varlen else tuple(t.stride()[:3])

    def stats_strides(self, stats):
        return (0, stats.stride(0)) if self.varlen else tuple(stats.stride()[:2])


def attention_forward(bypass, q, k, v, pk, pv, gate, sim, causal, softmax_scale, prompt_scale, rows):
    """Launch the forward; returns (o, lse) with lse float32 (``rows.stats_shape``) in base-2 units."""
    B, Hq, M, N, d, P = rows.B, rows.Hq, rows.M, rows.N, rows.d, pk.shape[-2]
    gate = gate.contiguous()  # the kernels index gate[h] with unit stride
    o = new_output(q.shape, dtype=q.dtype, device=q.device, like=q)
    lse = new_output(rows.stats_shape, dtype=torch.float32, device=q.device)
    s = k if sim is None else sim
    fwd, _ = blocks(q.is_cuda, M, N, d, q.element_size())
    grid = (triton.cdiv(M, fwd["BLOCK_M"]), B * Hq)
    attention_fwd_kernel[grid](
        q, k, v, s, pk, pk if pv is None else pv, gate, o, lse, rows.cu_q, rows.cu_k,
        *rows.strides(q), *rows.strides(k), *rows.strides(v), *rows.strides(s),
        *_prompt_strides(pk), *_prompt_strides(pv), *rows.strides(o), *rows.stats_strides(lse),
        Hq, M, N, P, Hq // rows.Hkv, softmax_scale * LOG2E, prompt_scale * LOG2E,
        CAUSAL=causal, BYPASS=bypass, SIM_IS_K=sim is None, VARLEN=rows.varlen, HEAD_DIM=d,
        BLOCK_D=_pow2(d), BLOCK_P=_pow2(P), PREC=_precision(q), **fwd,
    )
    return o, lse


def attention_backward(bypass, do, q, k, v, pk, pv, gate, sim, o, lse, causal, softmax_scale, prompt_scale,
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
    _, bwd = blocks(q.is_cuda, M, N, d, q.element_size())
    prec = _precision(q)
    BLOCK_D, BLOCK_P = _pow2(d), _pow2(P)

    delta = new_output(rows.stats_shape, dtype=torch.float32, device=dev)
    pre_bm = bwd["Q_BLOCK_M"]
    attention_bwd_preprocess_kernel[(triton.cdiv(M, pre_bm), B * Hq)](
        o, do, q, pk, pk if pv is None else pv, gate, delta, rows.cu_q,
        *rows.strides(o), *rows.strides(do), *rows.strides(q), *_prompt_strides(pk), *_prompt_strides(pv),
        *rows.stats_strides(delta), Hq, M, P, groups, softmax_scale * LOG2E,
        BYPASS=bypass, VARLEN=rows.varlen, HEAD_DIM=d, BLOCK_M=pre_bm, BLOCK_D=BLOCK_D, BLOCK_P=BLOCK_P, PREC=prec,
    )

    dq = new_output(q.shape, dtype=q.dtype, device=dev, like=q)
    dk = new_output(k.shape, dtype=k.dtype, device=dev, like=k)
    dv = new_output(v.shape, dtype=v.dtype, device=dev, like=v)
    dsim = None if sim is None else new_output(sim.shape, dtype=sim.dtype, device=dev, like=sim)

    kv_tiles = triton.cdiv(N, bwd["KV_BLOCK_N"])
    q_tiles = triton.cdiv(M, bwd["Q_BLOCK_M"])
    pb = B if per_sample else 1
    # Excitor prompt/gate sums are made by key-tile programs, Adapter ones by query-tile programs.
    # Index layout of the buffers: [tile, batch, kv head, group member, prompt, d] and [tile, batch, q head].
    if bypass == EXCITOR:
        tiles, members = kv_tiles, 1
    else:
        tiles, members = q_tiles, groups
    if deterministic:
        dpk_buf = torch.zeros((tiles, B, Hkv, members, P, d), dtype=torch.float32, device=dev)
        dg_buf = torch.zeros((tiles, B, Hq), dtype=torch.float32, device=dev)
        dpk_strides = dpk_buf.stride()[:5]
        dg_strides = dg_buf.stride()[:2]
    else:
        dpk_buf = torch.zeros((1, pb, Hkv, 1, P, d), dtype=torch.float32, device=dev)
        dg_buf = torch.zeros((1, 1, Hq), dtype=torch.float32, device=dev)
        dpk_strides = (0, dpk_buf.stride(1) if per_sample else 0, dpk_buf.stride(2), 0, dpk_buf.stride(4))
        dg_strides = (0, 0)
    dpv_buf = torch.zeros_like(dpk_buf) if bypass == ADAPTER else dpk_buf
    no_strides = (0, 0, 0, 0, 0, 0, 0)
    k_strides = (dpk_strides[0], dpk_strides[1], dpk_strides[2], dpk_strides[4], *dg_strides)
    q_strides = (*dpk_strides, *dg_strides)
    s = k if sim is None else sim
    ds = k if dsim is None else dsim

    num_key_programs = kv_tiles * B * Hkv
    grid = (num_key_programs + q_tiles * B * Hq,)
    attention_bwd_kernel[grid](
        q, k, v, s, pk, pk if pv is None else pv, gate, do, lse, delta, dq, dk, dv, ds, dpk_buf, dpv_buf,
        dg_buf, dg_buf, rows.cu_q, rows.cu_k,
        *rows.strides(q), *rows.strides(k), *rows.strides(v), *rows.strides(s),
        *_prompt_strides(pk), *_prompt_strides(pv), *rows.strides(do), *rows.strides(dq),
        *rows.strides(dk), *rows.strides(dv), *rows.strides(ds),
        *(k_strides if bypass == EXCITOR else no_strides[:6]),
        *(q_strides if bypass == ADAPTER else no_strides), *rows.stats_strides(lse),
        Hq, Hkv, M, N, P, groups, num_key_programs, softmax_scale * LOG2E, softmax_scale, prompt_scale,
        prompt_scale * LOG2E,
        CAUSAL=causal, BYPASS=bypass, SIM_IS_K=sim is None, VARLEN=rows.varlen, HEAD_DIM=d, BLOCK_D=BLOCK_D,
        BLOCK_P=BLOCK_P, PREC=prec, **bwd,
    )

    def _prompt_grad(buf):  # -> pk's shape: sum tiles and group members (and the batch for shared prompts)
        g = buf.sum(dim=(0, 3))
        return (g if per_sample else g.sum(0)).to(pk.dtype)

    dpk = _prompt_grad(dpk_buf)
    dpv = _prompt_grad(dpv_buf).to(pv.dtype) if bypass == ADAPTER else None
    dgate = dg_buf.sum(dim=(0, 1)).to(gate.dtype)
    return dq, dk, dv, dpk, dpv, dgate, dsim
