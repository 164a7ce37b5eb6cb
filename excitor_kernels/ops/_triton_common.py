"""Pieces shared by the Triton kernels of every operator: tile loads and stores, the float32-accumulating
dot, the P-way prompt softmax, packed-sequence offsets, and the host-side row layout and launch helpers."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def dot(a, b, PREC: tl.constexpr, acc=None):
    """acc + a b with float32 accumulation (a rounded to b's dtype first). PREC "upcast" computes it in exact
    float32: the prompt passes use it (O(N P d) work), and interpreted bfloat16 runs, since the CPU
    interpreter's bfloat16 dot is wrong (triton 3.6 to 3.9)."""
    if PREC == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    else:
        out = tl.dot(a.to(b.dtype), b, acc=acc, input_precision=PREC)
    return out


@triton.jit
def split(x, dtype: tl.constexpr):
    """x (float32) as a hi + lo pair of ``dtype`` values: hi rounded, lo its rounding error."""
    hi = x.to(dtype)
    return hi, (x - hi.to(tl.float32)).to(dtype)


# Half-precision operands made from float32 values (the gate gradient's float16 pairs, the prompt post-pass's
# rounded gradients) are first divided by a power of two that puts the tile's largest entry in [2^14, 2^15): exact,
# nothing overflows float16's 65504, and float16 keeps 11 bits of every entry down to 2^-28 of the largest (a pair
# 22 bits down to 2^-17) where unscaled tiny values would be subnormal. bfloat16 has float32's range: harmless.
PAIR_TOP: tl.constexpr = tl.constexpr(2.0 ** 14)
# the centred prompt weights a - 1/P lie in (-1, 1): the pre-pass stores them times 2^15
AT_SCALE: tl.constexpr = tl.constexpr(2.0 ** 15)


@triton.jit
def tile_scale(x):
    """The power of two 2^(floor(log2 max |x|) - 14) of a float32 tile (1 for x = 0; inf where x holds a NaN or an
    inf, so that it propagates): x / tile_scale(x) has its largest entry in [2^14, 2^15) (PAIR_TOP)."""
    top = tl.max(tl.max(tl.abs(x), 1), 0)
    scale = (top.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True) / PAIR_TOP
    return tl.where(scale == 0.0, 1.0, scale)


@triton.jit
def split_scaled(x, dtype: tl.constexpr):
    """(hi, lo, scale) with x (float32) = scale (hi + lo), hi and lo in ``dtype`` (split) and scale =
    tile_scale(x): a float16 pair carries about 22 bits of x's entries whatever their range, and hi alone is x
    rounded once without overflow or subnormals (the low half then unused: the compiler drops it). float32
    ``dtype``: (x, 0, 1)."""
    if dtype == tl.float32:
        hi, lo, scale = x, tl.zeros_like(x), 1.0
    else:
        scale = tile_scale(x)
        hi, lo = split(x / scale, dtype)
    return hi, lo, scale


@triton.jit
def dot_hi_lo(x, y, PREC: tl.constexpr):
    """x (float32) times y (input dtype) to about float32 accuracy on the half tensor cores: x = hi + lo with hi, lo
    rounded to y's dtype, two products at the half rate (no TF32). One product when y is float32 or under
    "upcast", whose dots are float32 already."""
    if PREC == "upcast" or y.dtype == tl.float32:
        out = dot(x, y, PREC)
    else:
        hi, lo = split(x, y.dtype)
        out = dot(hi, y, PREC) + dot(lo, y, PREC)
    return out


@triton.jit
def load_rows(base, rows, stride_row, cols, n_rows, HEAD_DIM: tl.constexpr, CHECK_ROWS: tl.constexpr,
              UNSIGNED: tl.constexpr = False):
    """Load a (len(rows), BLOCK_D) tile of a row-major (n_rows, HEAD_DIM) matrix, zeros outside. UNSIGNED: the
    element offsets as unsigned 32-bit integers (rows never negative: no high word per load)."""
    if UNSIGNED:
        ptrs = base + (rows[:, None] * stride_row + cols[None, :]).to(tl.uint32)
    else:
        ptrs = base + rows[:, None] * stride_row + cols[None, :]
    mask = cols[None, :] < HEAD_DIM
    if CHECK_ROWS:
        mask = mask & (rows[:, None] < n_rows)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def row_source(base, n_rows, stride_row, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
               DESC: tl.constexpr):
    """Where ``load_tile`` reads (BLOCK_R, BLOCK_D) tiles of a row-major (n_rows, HEAD_DIM) matrix from: a tensor
    descriptor when DESC (TMA loads on sm_90; rows and columns outside the matrix read as 0; the launcher
    checks that ``base`` and ``stride_row`` are 16-byte aligned), else the base pointer itself."""
    if DESC:
        return tl.make_tensor_descriptor(base, shape=[n_rows, HEAD_DIM], strides=[stride_row, 1],
                                         block_shape=[BLOCK_R, BLOCK_D])
    else:
        return base


@triton.jit
def load_tile(src, start, stride_row, cols, n_rows, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
              CHECK_ROWS: tl.constexpr, DESC: tl.constexpr):
    """Rows [start, start + BLOCK_R) of a ``row_source``, zeros outside (a descriptor always bounds-checks).
    Pointers, half precision: the tile's first row, src + start * stride_row (a scalar), plus the tile's own row
    offsets, the same for every tile, so that a load in a key or query loop costs one 64-bit add (two instructions;
    from row indices, four: sm_80's loops, bench.static); the offsets unsigned (load_rows' UNSIGNED). float32
    keeps the row indices: with the tile's base, ptxas spills a few bytes in some of its narrow 8-warp kernels."""
    if DESC:
        return src.load([start, 0])
    elif src.dtype.element_ty.primitive_bitwidth < 32:
        return load_rows(src + start * stride_row, tl.arange(0, BLOCK_R), stride_row, cols, n_rows - start, HEAD_DIM,
                         CHECK_ROWS, True)
    else:
        return load_rows(src, start + tl.arange(0, BLOCK_R), stride_row, cols, n_rows, HEAD_DIM, CHECK_ROWS)


@triton.jit
def store_rows(base, tile, rows, stride_row, cols, n_rows, HEAD_DIM: tl.constexpr):
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))


@triton.jit
def prompt_weights(z, offs_p, P, scale_log2):
    """a[r, n] = softmax_n(scale * z[r, n]) over the P real prompts (padded ones get 0), float32."""
    z = tl.where(offs_p[None, :] < P, z * scale_log2, float("-inf"))
    a = tl.exp2(z - tl.max(z, 1)[:, None])
    return a / tl.sum(a, 1)[:, None]


@triton.jit
def prompt_softmax(x, pk, offs_p, P, scale_log2, PREC: tl.constexpr):
    """a[r, n] = softmax_n(scale * <x_r, pk_n>) over the P real prompts (padded ones get 0), float32."""
    return prompt_weights(dot(x, tl.trans(pk), PREC), offs_p, P, scale_log2)


@triton.jit
def prompt_attention(q, pk_base, pv_base, stride_pkp, stride_pvp, offs_p, offs_d, P, qk_scale,
                     HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
    """Adapter prompts for one query tile: (ap, op, pk, pv) with ap = softmax(scale q pk^T), op = ap pv."""
    pk = load_rows(pk_base, offs_p, stride_pkp, offs_d, P, HEAD_DIM, True)
    pv = load_rows(pv_base, offs_p, stride_pvp, offs_d, P, HEAD_DIM, True)
    ap = prompt_softmax(q, pk, offs_p, P, qk_scale, PREC)
    op = dot(ap.to(pv.dtype), pv, PREC)
    return ap, op, pk, pv


@triton.jit
def prompt_attention_backward(q, do, rows, ap, op, pk, pv, gate_h, softmax_scale, PREC: tl.constexpr):
    """Gradients of o_i += gate[h] op_i (op = ap pv, ap = softmax(softmax_scale q pk^T)) for one query tile whose
    real rows are ``rows``: (dgate, dq / softmax_scale, dpk, dpv), float32, with
        dgate = sum_i <do_i, op_i>,  z = ap (do pv^T - rowsum(ap do pv^T)),
        dq = gate[h] softmax_scale z pk,  dpk = gate[h] softmax_scale z^T q,  dpv = gate[h] ap^T do.
    The gate multiplies the float32 products, never a rounded operand: a small gate (LLaMA-Adapter's start at 0)
    would otherwise put the operands in float16's subnormal range."""
    do = tl.where(rows, do, 0.0)
    dgate = tl.sum(tl.sum(do.to(tl.float32) * op, 1), 0)
    dap = dot(do.to(pv.dtype), tl.trans(pv), PREC)
    z = tl.where(rows, ap * (dap - tl.sum(ap * dap, 1)[:, None]), 0.0)
    dq = gate_h * dot(z.to(pk.dtype), pk, PREC)
    dpk = (gate_h * softmax_scale) * dot(tl.trans(z).to(q.dtype), q, PREC)
    dpv = gate_h * dot(tl.trans(tl.where(rows, ap, 0.0)).to(pv.dtype), do.to(pv.dtype), PREC)
    return dgate, dq, dpk, dpv


@triton.jit
def sequence(CU, b, L, VARLEN: tl.constexpr, AGAIN: tl.constexpr = False):
    """(first row, length) of sequence ``b``: rows [CU[b], CU[b + 1]) of a packed tensor when VARLEN,
    else (0, L) in batch entry ``b`` of a padded one. AGAIN: a second read after a loop, volatile so that the
    compiler does not merge it with the first and keep what derives from that (row masks) live across the loop."""
    start = 0
    if VARLEN:
        start = tl.load(CU + b, volatile=AGAIN).to(tl.int64)
        L = (tl.load(CU + b + 1, volatile=AGAIN) - start).to(tl.int32)
    return start, L


EXCITOR, ADAPTER = 1, 2


def pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def precision(t: torch.Tensor) -> str:
    """float32 dots follow torch's TF32 switch; half types use their tensor-core path (see ``dot``)."""
    if t.device.type == "cpu" and t.dtype == torch.bfloat16:
        return "upcast"
    if t.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def prompt_strides(t: torch.Tensor | None) -> tuple:
    """(batch, head, prompt) strides of (Hkv, P, d) shared (batch stride 0) or (B, Hkv, P, d) prompts."""
    if t is None:
        return (0, 0, 0)
    return (0,) + tuple(t.stride()[:2]) if t.dim() == 3 else tuple(t.stride()[:3])


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


class GradSums:
    """float32 buffers for prompt and gate gradients summed over row tiles (Hq = 0 or P = 0: no such buffer).

    ``prompt (tiles | 1, B | 1, heads, P, d)`` (and ``value``, the same, for prompt values) and
    ``gate (tiles | 1, B | 1, Hq)``: with atomics the tile axis (and, for shared prompts, the batch axis) has
    stride 0 so every program adds into one slot; deterministic runs give every program its own slot and sum
    them here in a fixed order."""

    def __init__(self, tiles, B, heads, Hq, P, d, per_sample, deterministic, device, values=False):
        t, pb = (tiles, B) if deterministic else (1, B if per_sample else 1)
        self.prompt = torch.zeros((t, pb, heads, P, d), dtype=torch.float32, device=device)
        self.value = torch.zeros_like(self.prompt) if values else None
        self.gate = torch.zeros((t, B if deterministic else 1, Hq), dtype=torch.float32, device=device)
        st = self.prompt.stride()
        self.prompt_strides = (st[0] if deterministic else 0, st[1] if pb > 1 else 0, st[2], st[3])
        self.gate_strides = (self.gate.stride(0), self.gate.stride(1)) if deterministic else (0, 0)
        self.per_sample = per_sample

    def prompt_grad(self, buf, Hkv, like):
        g = buf.sum(0)                                                  # (B | 1, heads, P, d)
        g = g.unflatten(1, (Hkv, -1)).sum(2)                            # query heads -> their key/value head
        return (g if self.per_sample else g.sum(0)).to(like.dtype)

    def gate_grad(self, like):
        return self.gate.sum(dim=(0, 1)).to(like.dtype)
