"""The Excitor bypass keys, once per key/value head: a pre-pass for the forward and a post-pass for the backward.

Notation of docs/design.md, per batch entry (or packed sequence) ``b`` and key/value head ``g``; ``s`` is
``sim_keys`` or ``k`` itself, ``pk`` the ``P`` prompts of that head, ``c = mean_n pk_n``:

    a[j, n] = softmax_n(prompt_scale <s_j, pk_n>)          (P-way, per key j)
    ke_j    = sum_n a[j, n] pk_n - c                         (centred reconstruction)

Every query head ``h`` of the group then meets ``k'[h, j] = k_j + gate[h] ke_j``. The centring moves every key
of head ``h`` by the same vector ``gate[h] c``, which adds ``gate[h] <q_i, c>`` to every score of row ``i``
and so leaves each softmax, the output and every gradient unchanged; it keeps ``ke`` small where the mixture
is nearly uniform, so that ``k'`` rounds well.

The pre-pass writes ``ke`` in the input dtype (``B x Hkv x N x d``) and the centred weights ``a - 1/P``
(``B x Hkv x N x pow2(P)``, times AT_SCALE; for half precision as float16 pairs, the rounded value and its
rounding error), from which the dq kernel forms ``<q_i, ke_j>`` to about float32 accuracy for the gate gradient
(docs/design.md). The backward's key-tile programs reduce ``dk'`` over the group into
``dke_j = sum_h gate[h] dk'[h, j]`` (float32, ``ke``'s shape), and the post-pass applies the chain rule, tile by tile:

    da[j, n] = <dke_j, pk_n>,   dz = a (da - rowsum(a da))
    dsim_j   = prompt_scale sum_n dz[j, n] pk_n                              (to sim_keys, or added to dk)
    dpk_n    = sum_j (a[j, n] - 1/P) dke_j + prompt_scale sum_j dz[j, n] s_j

The ``- 1/P`` is the derivative of the centring; it sums to zero over a sequence (each row of ``ds`` sums to
zero, so ``sum_j dke_j = 0``), and keeping it makes near-uniform mixtures cancel before, not after, the sum.
Products run on the tensor cores in the input dtype with float32 accumulation (the centred weights
``a - 1/P``, ``dke`` and ``dz`` rounded to it); softmax and sums stay in float32. Both passes are
``O(N P d)`` work, small beside the attention's ``O(M N d)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import new_output
from ._triton_common import (AT_SCALE, LOG2E, GradSums, RowLayout, dot, dot_hi_lo, load_rows, pow2, precision,
                             prompt_softmax, prompt_strides, sequence, split, split_scaled, store_rows)


@triton.jit
def _centred(a, offs_p, P):
    """a - 1/P over the real prompts (0 on padded ones): ke = a pk - mean(pk) = (a - 1/P) pk, since sum_n a = 1."""
    return tl.where(offs_p[None, :] < P, a - 1.0 / P, 0.0)


@triton.jit
def prompt_mixture(st, pk, offs_p, P, prompt_scale_log2, PREC: tl.constexpr, EXACT: tl.constexpr):
    """(a, ke) for one tile of rows ``st`` of s: a = softmax(prompt_scale st pk^T) and the centred ke = (a - 1/P) pk,
    both float32. EXACT: the centred weights enter the product as a hi + lo pair (about float32 accuracy, two
    half-rate products); otherwise rounded once to the input dtype (the decode kernel's main loop)."""
    a = prompt_softmax(st, pk, offs_p, P, prompt_scale_log2, PREC)
    if EXACT:
        ke = dot_hi_lo(_centred(a, offs_p, P), pk, PREC)
    else:
        ke = dot(_centred(a, offs_p, P).to(pk.dtype), pk, PREC)
    return a, ke


@triton.jit
def prompt_chain_rule(dke, a, st, pk, offs_p, P, prompt_scale, PREC: tl.constexpr):
    """(dsim, dpk) of one tile of rows, float32, from dke (float32) and the tile's (a, st); see the module doc. dke
    and dz enter their products rounded to the input dtype after division by a power of two per tile (split_scaled):
    they are gradients, as small as the gates and prompts make them, and float16 would round them into its
    subnormal range (or past 65504)."""
    dke_t, _, dke_scale = split_scaled(dke, pk.dtype)
    da = dot(dke_t, tl.trans(pk), PREC) * dke_scale
    dz = a * (da - tl.sum(a * da, 1)[:, None])
    dz_t, _, dz_scale = split_scaled(dz, pk.dtype)
    dsim = (prompt_scale * dz_scale) * dot(dz_t, pk, PREC)
    dpk = dke_scale * dot(tl.trans(_centred(a, offs_p, P).to(pk.dtype)), dke_t, PREC)
    dpk += (prompt_scale * dz_scale) * dot(tl.trans(dz_t), st.to(pk.dtype), PREC)
    return dsim, dpk


@triton.jit
def _tile(CU_K, N, Hkv, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr):
    """(b, g, first row of the sequence, its length, offs_n) of this program's key tile."""
    bg = tl.program_id(1)
    b = (bg // Hkv).to(tl.int64)
    k0, N = sequence(CU_K, b, N, VARLEN)
    return b, bg % Hkv, k0, N, tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _tile_and_prompts(S, PK, b, g, k0, N, offs_n, stride_sb, stride_sh, stride_sn, stride_pkb, stride_pkh,
                      stride_pkp, P, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    """(st, pk, offs_d, offs_p): this key tile of s and the prompts of its key/value head."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_P)
    st = load_rows(S + b * stride_sb + k0 * stride_sn + g * stride_sh, offs_n, stride_sn, offs_d, N, HEAD_DIM, True)
    pk = load_rows(PK + b * stride_pkb + g * stride_pkh, offs_p, stride_pkp, offs_d, P, HEAD_DIM, True)
    return st, pk, offs_d, offs_p


@triton.jit
def prompt_keys_fwd_kernel(
    S, PK, KE, AT, AT_LO, CU_K,
    stride_sb, stride_sh, stride_sn, stride_pkb, stride_pkh, stride_pkp, stride_keb, stride_keh, stride_ken,
    stride_atb, stride_ath, stride_atn,
    Hkv, N, P, prompt_scale_log2,
    VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr, PREC: tl.constexpr,
):
    """One tile of keys of one (batch entry or sequence, key/value head): KE = ke rounded to the input dtype (what
    ``k'`` adds to k), and the centred weights times AT_SCALE, ``(a - 1/P) 2^15``, as AT (rounded to float16 for
    half-precision keys) and AT_LO (its rounding error; float32 keys have none: AT_LO is then AT and is not
    written), BLOCK_P = pow2(P) columns, 0 past P. The dq kernel forms ``<q_i, ke_j> = sum_n <q_i, pk_n> (a[j, n] -
    1/P)`` from them to about float32 accuracy (the gate gradient)."""
    b, g, k0, N, offs_n = _tile(CU_K, N, Hkv, BLOCK_N, VARLEN)
    if tl.program_id(0) * BLOCK_N >= N:
        return
    st, pk, offs_d, offs_p = _tile_and_prompts(S, PK, b, g, k0, N, offs_n, stride_sb, stride_sh, stride_sn, stride_pkb,
                                               stride_pkh, stride_pkp, P, HEAD_DIM, BLOCK_D, BLOCK_P)
    a, ke = prompt_mixture(st, pk, offs_p, P, prompt_scale_log2, PREC, True)
    store_rows(KE + b * stride_keb + k0 * stride_ken + g * stride_keh, ke.to(KE.dtype.element_ty), offs_n, stride_ken,
               offs_d, N, HEAD_DIM)
    at_hi, at_lo = split(_centred(a, offs_p, P) * AT_SCALE, AT.dtype.element_ty)
    rows = b * stride_atb + k0 * stride_atn + g * stride_ath
    store_rows(AT + rows, at_hi, offs_n, stride_atn, offs_p, N, BLOCK_P)
    if AT.dtype.element_ty != tl.float32:
        store_rows(AT_LO + rows, at_lo, offs_n, stride_atn, offs_p, N, BLOCK_P)


@triton.jit
def prompt_keys_bwd_kernel(
    S, PK, DKE, DK, DS, DPK, CU_K,
    stride_sb, stride_sh, stride_sn, stride_pkb, stride_pkh, stride_pkp, stride_dkeb, stride_dkeh, stride_dken,
    stride_dkb, stride_dkh, stride_dkn, stride_dsb, stride_dsh, stride_dsn,
    stride_dpk_t, stride_dpk_b, stride_dpk_h, stride_dpk_p,
    Hkv, N, P, prompt_scale, prompt_scale_log2,
    ADD_DS: tl.constexpr, VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
):
    """Chain rule of one key tile: DS = dsim, or DS = DK + dsim when ADD_DS (the s = k case), and the tile's
    dpk added to its float32 slice (tile stride 0 under atomics, one slice per tile when deterministic)."""
    b, g, k0, N, offs_n = _tile(CU_K, N, Hkv, BLOCK_N, VARLEN)
    if tl.program_id(0) * BLOCK_N >= N:
        return
    st, pk, offs_d, offs_p = _tile_and_prompts(S, PK, b, g, k0, N, offs_n, stride_sb, stride_sh, stride_sn, stride_pkb,
                                               stride_pkh, stride_pkp, P, HEAD_DIM, BLOCK_D, BLOCK_P)
    dke = load_rows(DKE + b * stride_dkeb + k0 * stride_dken + g * stride_dkeh, offs_n, stride_dken, offs_d, N,
                    HEAD_DIM, True)
    a, _ = prompt_mixture(st, pk, offs_p, P, prompt_scale_log2, PREC, False)
    dsim, dpk = prompt_chain_rule(dke, a, st, pk, offs_p, P, prompt_scale, PREC)
    if ADD_DS:
        dsim += load_rows(DK + b * stride_dkb + k0 * stride_dkn + g * stride_dkh, offs_n, stride_dkn, offs_d, N,
                          HEAD_DIM, True).to(tl.float32)
    store_rows(DS + b * stride_dsb + k0 * stride_dsn + g * stride_dsh, dsim, offs_n, stride_dsn, offs_d, N, HEAD_DIM)
    ptrs = (DPK + tl.program_id(0) * stride_dpk_t + b * stride_dpk_b + g * stride_dpk_h
            + offs_p[:, None] * stride_dpk_p + offs_d[None, :])
    tl.atomic_add(ptrs, dpk, mask=(offs_p[:, None] < P) & (offs_d[None, :] < HEAD_DIM))


def prompt_blocks(on_gpu: bool, N: int, itemsize: int = 2) -> dict:
    """Tile and launch options of both passes (float32: 8 keys, with 16 the packed backward pass spills on sm_90
    at d = 128)."""
    if on_gpu:
        return dict(BLOCK_N=8 if itemsize > 2 else 32, num_warps=8)
    return dict(BLOCK_N=min(64, pow2(N)))


def prompt_keys_forward(s: torch.Tensor, pk: torch.Tensor, prompt_scale: float, rows: RowLayout):
    """(ke, at) for s = sim_keys or k, padded ``(B, Hkv, N, d)`` or packed ``(total_k, Hkv, d)`` as ``rows`` says;
    ``pk`` is ``(Hkv, P, d)`` shared or ``(B, Hkv, P, d)`` per entry. ``ke`` has s's shape and dtype; ``at`` holds
    the centred weights times AT_SCALE, ``(a - 1/P) 2^15``, in ``pow2(P)`` columns (0 past P):
    ``(2, *s.shape[:-1], pow2(P))`` float16 for half-precision s (bfloat16 too: a float16 pair keeps 22 bits of
    ``|a - 1/P| < 1`` down to 2^-17, a bfloat16 pair 16), ``at[0]`` rounded, ``at[1]`` its rounding error;
    float32 s: ``(1, ...)`` float32, ``at[-1]`` is ``at[0]``."""
    BLOCK_P = pow2(pk.shape[-2])
    ke = new_output(s.shape, dtype=s.dtype, device=s.device)
    half = s.dtype != torch.float32
    at = new_output((2 if half else 1, *s.shape[:-1], BLOCK_P), dtype=torch.float16 if half else s.dtype,
                    device=s.device)
    launch = prompt_blocks(s.is_cuda, rows.N, s.element_size())
    grid = (triton.cdiv(rows.N, launch["BLOCK_N"]), rows.B * rows.Hkv)
    prompt_keys_fwd_kernel[grid](
        s, pk, ke, at[0], at[-1], rows.cu_k, *rows.strides(s), *prompt_strides(pk), *rows.strides(ke),
        *rows.strides(at[0]), rows.Hkv, rows.N, pk.shape[-2], prompt_scale * LOG2E,
        VARLEN=rows.varlen, HEAD_DIM=rows.d, BLOCK_D=pow2(rows.d), BLOCK_P=BLOCK_P, PREC=precision(s),
        **launch,
    )
    return ke, at


def prompt_keys_backward(dke: torch.Tensor, s: torch.Tensor, pk: torch.Tensor, prompt_scale: float, rows: RowLayout,
                         deterministic: bool, dk: torch.Tensor | None = None):
    """(dpk, ds) from ``dke`` (float32, s's shape). dpk has pk's shape and dtype; ds has s's shape and dtype and is
    the gradient to s, or, given ``dk`` (the s = k case: the attention's part of dk, any float dtype, s's
    shape), ``dk`` plus that gradient. ``deterministic`` sums the per-tile prompt gradients in a fixed order
    instead of with atomics."""
    launch = prompt_blocks(s.is_cuda, rows.N, s.element_size())
    tiles = triton.cdiv(rows.N, launch["BLOCK_N"])
    P, d = pk.shape[-2], rows.d
    sums = GradSums(tiles, rows.B, rows.Hkv, 0, P, d, pk.dim() == 4, deterministic, s.device)
    ds = new_output(s.shape, dtype=s.dtype, device=s.device, like=s)
    prompt_keys_bwd_kernel[(tiles, rows.B * rows.Hkv)](
        s, pk, dke, ds if dk is None else dk, ds, sums.prompt, rows.cu_k, *rows.strides(s), *prompt_strides(pk),
        *rows.strides(dke), *rows.strides(ds if dk is None else dk), *rows.strides(ds), *sums.prompt_strides,
        rows.Hkv, rows.N, P, prompt_scale, prompt_scale * LOG2E,
        ADD_DS=dk is not None, VARLEN=rows.varlen, HEAD_DIM=d, BLOCK_D=pow2(d), BLOCK_P=pow2(P), PREC=precision(s),
        **launch,
    )
    return sums.prompt_grad(sums.prompt, rows.Hkv, pk), ds
