"""Turn a transformers attention mask into what the causal-only operators can run.

The operators know one mask: bottom-right aligned causal (query ``i`` of ``M`` sees key ``j`` of ``N``
iff ``j <= i + N - M``). transformers hands an attention layer one of

* ``None`` -- plain causal, nothing to do (but see :func:`filled_keys` for a static cache's empty slots);
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
  ``(query_index, key_index)`` pair per sample; when each sample's valid keys are the cache's last ones (left
  padding, the padded batches of ``generate()``), one call with ``cache_leftpad`` does the same.

Packed sequences (several sequences concatenated in one row of a batch of one, as transformers'
``DataCollatorWithFlattening`` makes them) run the operators' varlen form; :func:`sequence_packing`
finds them, in this order, from

* the ``cu_seq_lens_q/k, max_length_q/k`` keyword arguments of transformers' flash-attention path;
* a block-diagonal causal mask (what transformers builds from restarting ``position_ids`` for sdpa/eager);
* with no mask, ``position_ids`` that restart (a step other than +1 starts a new sequence), as
  transformers' flash-attention path reads them; only for a batch of one with no earlier cached tokens.

Masks of any other form (sliding windows, prefix-LM, additive biases) are rejected with a
``ValueError``: the operators cannot express them.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch

from ._validate import memo_on, version
from .reference import causal_mask

SamplePlan = Tuple[torch.Tensor, torch.Tensor]  # (indices of real queries, indices of valid keys)
# what transformers' flash-attention path passes for packed sequences
PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class Packing(NamedTuple):
    """The varlen arguments of a packed batch of one: rows cu_seqlens[s]:cu_seqlens[s + 1] are sequence s."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens_q.numel() - 1


class PaddingPlan:
    """How a padded batch runs, from its real queries ``real`` (B, M) and valid keys ``valid`` (B, N): each sample
    attends on its real queries and valid keys. When every sample's valid keys are its last ones (left padding, the
    padded batches of ``generate()``), that is one call with the operators' ``cache_leftpad`` = :attr:`leftpad`
    (query i sees ``[leftpad[b], i + N - M]``, the causal set on the valid keys; a padding row sees none, and the
    caller zeroes padding rows); else one varlen pack of them (:meth:`unpadded`) or one call per sample
    (:attr:`samples`); whichever the backend serves."""

    def __init__(self, real: torch.Tensor, valid: torch.Tensor):
        self.real, self._valid, self._samples = real, valid, None
        N = valid.shape[1]
        starts = N - valid.sum(dim=1)
        suffix = bool((valid == (torch.arange(N, device=valid.device)[None, :] >= starts[:, None])).all())
        self.leftpad: Optional[torch.Tensor] = starts.to(torch.int32) if suffix else None

    def unpadded(self) -> Tuple[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor], Packing]:
        """The real queries and valid keys as one varlen pack, a sequence per sample: ((b, i) of each packed query
        row, (b, j) of each packed key row, their Packing). Two host syncs, whatever the batch."""
        q_rows, k_rows = self.real.nonzero().unbind(1), self._valid.nonzero().unbind(1)
        counts = torch.stack([self.real.sum(1), self._valid.sum(1)])       # (2, B)
        cu = torch.nn.functional.pad(counts.cumsum(1), (1, 0)).to(torch.int32)
        longest = counts.max(1).values.tolist()
        return q_rows, k_rows, Packing(cu[0], cu[1], longest[0], longest[1])

    @property
    def samples(self) -> List[SamplePlan]:
        """One ``(query_index, key_index)`` pair per sample (found on first use: a host sync per sample)."""
        if self._samples is None:
            self._samples = [(r.nonzero().squeeze(1), v.nonzero().squeeze(1)) for r, v in zip(self.real, self._valid)]
        return self._samples


def _packing_from_starts(starts: torch.Tensor) -> Packing:
    """Packing of a row whose sequences begin where the boolean ``starts`` (L,) is True (starts[0] is)."""
    first = starts.nonzero().squeeze(1)
    cu = torch.cat([first, first.new_tensor([starts.numel()])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return Packing(cu, cu, longest, longest)


def _packing_from_mask(allowed: torch.Tensor) -> Optional[Packing]:
    """The packing whose block-diagonal causal mask ``allowed`` (1, L, L) is, or None (one block or no such mask)."""
    B, M, N = allowed.shape
    if B != 1 or M != N or M < 2:
        return None
    a = allowed[0]
    i = torch.arange(1, M, device=a.device)
    starts = torch.ones(M, dtype=torch.bool, device=a.device)
    starts[1:] = ~a[i, i - 1]                                   # token i does not see token i - 1
    if int(starts.sum()) < 2:
        return None
    segment = starts.cumsum(0)
    expected = causal_mask(M, N, a.device) & (segment[:, None] == segment[None, :])
    return _packing_from_starts(starts) if torch.equal(a, expected) else None


def sequence_packing(allowed: Optional[torch.Tensor], position_ids, kwargs: dict, batch: int, q_len: int,
                     kv_len: int) -> Optional[Packing]:
    """The packed sequences of this call, or None for an ordinary (possibly padded) batch.

    ``allowed`` is :func:`visibility` of the attention mask, ``kwargs`` the layer's keyword arguments
    (``cu_seq_lens_q``, ``cu_seq_lens_k``, ``max_length_q``, ``max_length_k``).
    """
    given = [kwargs.get(n) is not None for n in PACKING_KWARGS]
    if any(given):
        if not all(given):
            raise ValueError(f"packed sequences need all of {PACKING_KWARGS}; got only "
                             f"{[n for n, g in zip(PACKING_KWARGS, given) if g]}")
        if batch != 1:
            raise ValueError(f"packed sequences (cu_seq_lens_q/k) need a batch of one row; got batch size {batch}")
        cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
        packing = Packing(cu_q, cu_k, int(kwargs["max_length_q"]), int(kwargs["max_length_k"]))
        if allowed is not None:
            from_mask = _packing_from_mask(allowed)
            if from_mask is None or not (torch.equal(from_mask.cu_seqlens_q, cu_q.to(torch.int32))
                                         and torch.equal(from_mask.cu_seqlens_k, cu_k.to(torch.int32))):
                raise ValueError("attention_mask does not keep attention within the sequences of cu_seq_lens_q/k; "
                                 "pass attention_mask=None with packed sequences")
        return packing
    if allowed is not None:
        return _packing_from_mask(allowed)
    if not _positions_may_pack(position_ids, batch, q_len, kv_len) or torch.compiler.is_compiling():
        return None  # under torch.compile the positions are not read: see position_restarts
    return memo_on(position_ids, "_excitor_packing", (version(position_ids),),
                   lambda: _packing_from_positions(position_ids))


def _positions_may_pack(position_ids, batch: int, q_len: int, kv_len: int) -> bool:
    """Whether ``position_ids`` can mark packed sequences: one row of at least 2 tokens and no cached keys."""
    return position_ids is not None and batch == 1 and q_len == kv_len >= 2 and position_ids.numel() == q_len


def _position_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """(L,) bool: where a sequence starts (token 0, and every position that is not its predecessor's + 1)."""
    positions = position_ids.reshape(-1)
    starts = torch.ones(positions.numel(), dtype=torch.bool, device=positions.device)
    starts[1:] = positions[1:] - positions[:-1] != 1
    return starts


def _packing_from_positions(position_ids: torch.Tensor) -> Optional[Packing]:
    starts = _position_starts(position_ids)
    return _packing_from_starts(starts) if bool(starts[1:].any()) else None


def position_restarts(attention_mask, position_ids, kwargs: dict, batch: int, q_len: int,
                      kv_len: int) -> Optional[torch.Tensor]:
    """Under ``torch.compile``, where :func:`sequence_packing` cannot read ``position_ids`` (a value-dependent
    branch), a 0-d bool tensor on the device that is True when they restart (packed sequences the traced graph
    runs as one causal sequence; the caller makes that call's output NaN, never silently wrong); None where the
    positions decide nothing (a mask, ``cu_seq_lens_*``, more than one row, cached keys) or outside a trace."""
    if (not torch.compiler.is_compiling() or attention_mask is not None
            or any(kwargs.get(n) is not None for n in PACKING_KWARGS)
            or not _positions_may_pack(position_ids, batch, q_len, kv_len)):
        return None
    return _position_starts(position_ids)[1:].any()


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
        # transformers' flash-attention mask over a static cache covers its filled slots only: (B, L), M <= L <= N,
        # the causal mask aligned to slot L - 1, the slots after it unfilled
        filled = attention_mask.shape[1]
        if attention_mask.shape[0] != batch or not q_len <= filled <= kv_len:
            raise ValueError(f"a 2-D attention_mask must have shape (B={batch}, N={kv_len}), or (B, L) with "
                             f"M={q_len} <= L < N over a static cache's filled slots; got {tuple(attention_mask.shape)}")
        valid = attention_mask.bool()
        allowed = causal_mask(q_len, filled, valid.device)[None] & valid[:, None, :]
        return torch.nn.functional.pad(allowed, (0, kv_len - filled)) if filled < kv_len else allowed
    if attention_mask.dim() != 4 or attention_mask.shape[0] != batch or tuple(attention_mask.shape[2:]) != (
            q_len, kv_len):
        raise ValueError(f"attention_mask must have shape (B={batch}, 1, M={q_len}, N={kv_len}) or "
                         f"(B={batch}, N={kv_len}); got {tuple(attention_mask.shape)}")
    if attention_mask.shape[1] != 1 and not bool((attention_mask == attention_mask[:, :1]).all()):
        raise ValueError("attention_mask must be the same for every head; got a per-head mask of shape "
                         f"{tuple(attention_mask.shape)}")
    mask = attention_mask[:, 0]
    return mask if mask.dtype == torch.bool else mask == 0


def _causal_fit(allowed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(causal, real, fits) of ``allowed`` (B, M, N), M <= N: the (M, N) bottom-right causal mask, the real queries
    (B, M) (those that see their own key ``i + N - M``), and per sample (B,) whether every real query sees exactly
    the causal set (no padding, or right padding)."""
    M, N = allowed.shape[1:]
    causal, real = causal_mask(M, N, allowed.device), _real_rows(allowed)
    return causal, real, ((allowed == causal) | ~real[:, :, None]).all(-1).all(-1)


def _real_rows(allowed: torch.Tensor) -> torch.Tensor:
    """(B, M): the queries of ``allowed`` (B, M, N), M <= N, that see their own key ``i + N - M``."""
    M, N = allowed.shape[1:]
    rows = torch.arange(M, device=allowed.device)
    return allowed[:, rows, rows + (N - M)]


def padding_plan(allowed: torch.Tensor) -> Optional[PaddingPlan]:
    """None when one batched causal call is exact for ``allowed`` (B, M, N), else the per-sample plan."""
    B, M, N = allowed.shape
    if M > N:
        raise ValueError(f"attention_mask has more queries (M={M}) than keys (N={N})")
    causal, real, fits = _causal_fit(allowed)
    if bool(fits.all()):
        return None
    valid = (allowed & real[:, :, None]).any(dim=1)                      # (B, N): seen by a real query
    expected = causal[None] & valid[:, None, :]
    consistent = ((allowed == expected) | ~real[:, :, None]).all() & (valid[:, N - M:] == real).all()
    if not bool(consistent):
        raise ValueError(
            "attention_mask is not a causal mask with padding or packed sequences (e.g. a sliding window or a "
            "prefix-LM mask); excitor/adapter attention supports causal attention with left or right padding and "
            "packed sequences (a block-diagonal causal mask in a batch of one)"
        )
    return PaddingPlan(real, valid)


def _chunk_ends(allowed: torch.Tensor) -> torch.Tensor:
    """(B,) per sample of ``allowed`` (B, M, N): the least end under which no row sees a key after its diagonal
    ``end - M + i``, i.e. max over the keys j row i sees of j - i + M (0 where no row sees a key)."""
    M, N = allowed.shape[1:]
    j = torch.arange(N, device=allowed.device)
    i = torch.arange(M, device=allowed.device)[:, None]
    return torch.where(allowed, j - i + M, 0).amax(-1).amax(-1)


def filled_keys(attention_mask, batch: int, q_len: int, kv_len: int, none_is_upper_left: bool):
    """(keys, allowed): how many leading key slots of this call hold keys, and the :func:`visibility` of the mask
    over them (None for a None mask). A static cache hands the layer every slot it has, the unfilled ones after
    the filled ones and hidden by the mask, and the operators' causal mask is aligned to the last key: the keys
    are cut after the new tokens' last slot. That is the least ``keep`` under which no row sees a key after its
    diagonal ``keep - M + i``: a real row sees its own key, the M new tokens fill consecutive slots, so
    ``keep = max_i(last key row i sees - i) + M`` over the rows that see a key puts every real row's diagonal on
    its own key, and a padding row (its own key hidden) sees less, never more. A cut never hides a key some row
    sees; with a dynamic cache (every slot filled) it keeps them all. A None mask with 1 < M < N: in transformers'
    sdpa convention (``none_is_upper_left``) the model skipped the mask on an empty static cache, meaning SDPA's
    upper-left causal mask, so the M new tokens are the first M slots; in the flash-attention convention every key
    is filled (a 2-D mask shorter than the keys, transformers' flash-attention mask over a static cache, covers
    the filled slots: :func:`visibility`)."""
    if attention_mask is None:
        return (q_len if none_is_upper_left and 1 < q_len < kv_len else kv_len), None
    allowed = visibility(attention_mask, batch, q_len, kv_len)
    keep = kv_len
    if kv_len > q_len:
        end = int(_chunk_ends(allowed).amax())  # 0 where no row sees a key (nothing to align: keep every slot)
        keep = min(max(end, q_len), kv_len) if end else kv_len
    return keep, allowed[..., :keep]


def traced_ranges(attention_mask, batch: int, q_len: int, kv_len: int):
    """Inside ``torch.compile`` (``q_len <= kv_len``), where the mask's values cannot steer the host: each sample's keys
    as one range ``[starts[b], ends[b])`` of the cache, computed on the device, for one call with ``cache_leftpad``
    and ``cache_seqlens`` (row i sees keys ``starts[b] <= j <= ends[b] - M + i``). ``ends[b]`` follows
    :func:`filled_keys`' rule per sample (the least end under which no row sees a key after its diagonal: the slot
    after the new tokens, a static cache's unfilled slots cut), ``starts[b]`` is the first key a row sees. The rows
    that see their diagonal key are the sample's real rows, and each must see exactly the range's causal set (left
    padding, right padding, a static cache's filled slots, or none of these); the others are padding (their own key
    hidden). Returns (starts, ends, keep, ok): int32 (B,) ranges, ``keep`` (B, M) the rows that see a key (the
    others are set to 0, as the host path leaves them), and ``ok`` a 0-d bool, False when a real row sees another set
    (holes in a cache): the caller then makes the output NaN, never silently wrong."""
    allowed = visibility(attention_mask, batch, q_len, kv_len)                 # (B, M, N)
    j = torch.arange(kv_len, device=allowed.device)
    i = torch.arange(q_len, device=allowed.device)[:, None]
    ends = _chunk_ends(allowed).clamp(max=kv_len)
    starts = torch.minimum(torch.where(allowed.any(1), j, kv_len).amin(1), ends)
    own = ends[:, None] - q_len + i[:, 0]                                      # (B, M): each row's diagonal key
    real = allowed.gather(2, own.clamp(min=0)[..., None])[..., 0] & (own >= 0)
    window = (j >= starts[:, None, None]) & (j <= own[..., None])
    ok = ((allowed == window) | ~real[..., None]).all()
    return starts.to(torch.int32), ends.to(torch.int32), allowed.any(-1), ok


def attention_layout(attention_mask, position_ids, kwargs: dict, batch: int, q_len: int, kv_len: int,
                     none_is_upper_left: bool = True) -> Tuple[int, Optional[Packing], Optional[PaddingPlan]]:
    """(keys, packing, padding plan) of one layer call: the leading key slots that hold keys (:func:`filled_keys`;
    packed sequences: all of them), and at most one of packing and plan not None; both None means one batched
    causal call over those keys. Every decoder layer gets the same mask object, so a mask's analysis (O(M * N) and
    a device sync) is kept on it and done once per forward, not once per layer (but for an inference tensor, made
    under ``torch.inference_mode``: without a version counter an in-place change would go unseen, so every layer
    analyses it)."""
    packed = any(kwargs.get(n) is not None for n in PACKING_KWARGS)

    def analyse():
        if packed:
            keys, allowed = kv_len, visibility(attention_mask, batch, q_len, kv_len)
        else:
            keys, allowed = filled_keys(attention_mask, batch, q_len, kv_len, none_is_upper_left)
        packing = sequence_packing(allowed, position_ids, kwargs, batch, q_len, keys)
        plan = None if allowed is None or packing is not None else padding_plan(allowed)
        return keys, packing, plan

    if not isinstance(attention_mask, torch.Tensor) or packed:
        return analyse()
    return memo_on(attention_mask, "_excitor_layout",
                   (version(attention_mask), batch, q_len, kv_len, none_is_upper_left), analyse)
