"""Input validation shared by every operator and backend.

Every check raises ``TypeError`` (not a tensor, wrong dtype) or ``ValueError`` (shape, head count,
stride, device) naming the argument, what it got and what it needs, before any kernel runs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

# float64 is accepted for the reference backend (gradcheck, float64 oracles); the fused backends
# take the three training dtypes.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_DECODE_QUERIES = 16  # the most queries per sequence the split-KV decode kernel (ops/_triton_decode.py) takes


@dataclass(frozen=True)
class Problem:
    """The sizes of one attention call, as the dispatcher sees them."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    num_prompts: int
    per_sample_prompts: bool
    has_sim_keys: bool
    dtype: torch.dtype
    device: torch.device
    varlen: bool = False  # packed sequences: batch = sequences, q_len / kv_len = the longest ones
    requires_grad: bool = False  # training: grad mode on and some input requires a gradient

    @property
    def decode(self) -> bool:
        """Whether the split-KV decode kernel serves this call: padded, no gradient, at most
        ``MAX_DECODE_QUERIES`` queries (one or a few new tokens per sequence against a KV cache)."""
        return not self.varlen and not self.requires_grad and self.q_len <= MAX_DECODE_QUERIES


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _require_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    return t


def _require_rank(name: str, t: torch.Tensor, ranks: tuple, layout: str) -> None:
    if t.dim() not in ranks:
        raise ValueError(f"{name} must have shape {layout}; got a {t.dim()}-D tensor of shape {_shape(t)}")


def _require_unit_last_stride(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have unit stride on its last (head) dimension; got strides {t.stride()}. "
            f"Call {name}.contiguous() or pass a view whose last dimension is contiguous"
        )


def check_inputs(
    q,
    k,
    v,
    prompt_keys,
    gate,
    *,
    prompt_values=None,
    sim_keys=None,
    softmax_scale=None,
    prompt_scale=None,
    needs_prompt_values: bool = False,
    packed: bool = False,
) -> Problem:
    """Validate the operands of ``excitor_attention`` / ``adapter_attention`` and return their sizes (``packed``:
    the ``(1, H, total, d)`` views of a varlen pack, whose total of keys may be 0)."""
    q = _require_tensor("q", q)
    k = _require_tensor("k", k)
    v = _require_tensor("v", v)
    prompt_keys = _require_tensor("prompt_keys", prompt_keys)
    gate = _require_tensor("gate", gate)
    if needs_prompt_values:
        prompt_values = _require_tensor("prompt_values", prompt_values)
    if sim_keys is not None:
        sim_keys = _require_tensor("sim_keys", sim_keys)

    _require_rank("q", q, (4,), "(B, Hq, M, d)")
    _require_rank("k", k, (4,), "(B, Hkv, N, d)")
    _require_rank("v", v, (4,), "(B, Hkv, N, d)")
    _require_rank("prompt_keys", prompt_keys, (3, 4), "(Hkv, P, d) or (B, Hkv, P, d)")
    _require_rank("gate", gate, (1,), "(Hq,)")

    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32 (float64 for the reference backend); got {q.dtype}")
    tensors = {"k": k, "v": v, "prompt_keys": prompt_keys}
    if needs_prompt_values:
        tensors["prompt_values"] = prompt_values
    if sim_keys is not None:
        tensors["sim_keys"] = sim_keys
    for name, t in tensors.items():
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}; got {t.dtype}")
    if not gate.dtype.is_floating_point:
        raise TypeError(f"gate must be a floating-point tensor; got {gate.dtype}")
    for name, t in list(tensors.items()) + [("gate", gate)]:
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}; got {t.device}")

    B, Hq, M, d = q.shape
    if k.shape[0] != B or k.shape[3] != d:
        raise ValueError(f"k must have shape (B={B}, Hkv, N, d={d}) to match q {_shape(q)}; got {_shape(k)}")
    Hkv, N = k.shape[1], k.shape[2]
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {_shape(k)}; got {_shape(v)}")
    if sim_keys is not None and sim_keys.shape != k.shape:
        raise ValueError(f"sim_keys must have k's shape {_shape(k)}; got {_shape(sim_keys)}")
    if d < 1:
        raise ValueError(f"q must have a head dimension d >= 1; got shape {_shape(q)}")
    if packed and M < 1:  # a pack may hold no key at all (every row then sees none), not no query
        raise ValueError(f"q must hold at least one packed row (total_q >= 1); got q {_shape(q[0].transpose(0, 1))}")
    if M < 1 or N < (0 if packed else 1) or B < 1:
        raise ValueError(
            f"q and k need B >= 1, M >= 1 and N >= 1; got q {_shape(q)} and k {_shape(k)}"
        )
    if Hkv < 1 or Hq < 1 or Hq % Hkv != 0:
        raise ValueError(
            f"the number of query heads must be a positive multiple of the key/value heads; "
            f"got q heads Hq={Hq} and k heads Hkv={Hkv}"
        )

    want_pk = f"(Hkv={Hkv}, P, d={d}) or (B={B}, Hkv={Hkv}, P, d={d})"
    per_sample = prompt_keys.dim() == 4
    lead = prompt_keys.shape[:-2]
    if lead != ((B, Hkv) if per_sample else (Hkv,)) or prompt_keys.shape[-1] != d:
        raise ValueError(f"prompt_keys must have shape {want_pk}; got {_shape(prompt_keys)}")
    P = prompt_keys.shape[-2]
    if P < 1:
        raise ValueError(f"prompt_keys must hold at least one prompt (P >= 1); got shape {_shape(prompt_keys)}")
    if needs_prompt_values and prompt_values.shape != prompt_keys.shape:
        raise ValueError(
            f"prompt_values must have prompt_keys' shape {_shape(prompt_keys)}; got {_shape(prompt_values)}"
        )
    if gate.shape[0] != Hq:
        raise ValueError(f"gate must have shape (Hq={Hq},), one value per query head; got {_shape(gate)}")

    for name, t in [("q", q)] + list(tensors.items()):
        _require_unit_last_stride(name, t)

    for name, val in (("softmax_scale", softmax_scale), ("prompt_scale", prompt_scale)):
        if val is None:
            continue
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise TypeError(f"{name} must be a float or None; got {type(val).__name__}")
        if not (val == val and abs(val) != float("inf")):
            raise ValueError(f"{name} must be finite; got {val}")

    return Problem(
        batch=B,
        q_heads=Hq,
        kv_heads=Hkv,
        q_len=M,
        kv_len=N,
        head_dim=d,
        num_prompts=P,
        per_sample_prompts=per_sample,
        has_sim_keys=sim_keys is not None,
        dtype=q.dtype,
        device=q.device,
        requires_grad=torch.is_grad_enabled() and any(t.requires_grad for t in [q, gate, *tensors.values()]),
    )


def _check_lengths(name: str, t, batch: int, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype int32; got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32; got {t.dtype}")
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name} must have shape (B,) = ({batch},); got {tuple(t.shape)}")
    if t.device != torch.device(device):
        raise ValueError(f"{name} must be on q's device {device}; got {t.device}")


def check_cache_lengths(cache_seqlens, cache_leftpad, batch: int, cache_len: int, device) -> None:
    """``cache_seqlens`` (``L_b``) and ``cache_leftpad`` (``s_b``), each None or an int32 tensor of shape (B,) on q's
    device (any stride), with 0 <= s_b <= L_b <= N (``L_b = N`` without cache_seqlens, ``s_b = 0`` without
    cache_leftpad): sample b's keys are ``[s_b, L_b)``; with s_b = L_b it has none and its rows see none
    (docs/contract.md).

    The value check reads one flag on the host (a device sync), once per tensor and version (:func:`memo_on`: the
    layers of one forward share the tensors); inside ``torch.compile`` it is a device-side assertion
    (``torch._assert_async``: no host read in the graph); it is skipped while a CUDA graph is captured.
    """
    for name, t in (("cache_seqlens", cache_seqlens), ("cache_leftpad", cache_leftpad)):
        if t is not None:
            _check_lengths(name, t, batch, device)
    anchor = cache_leftpad if cache_leftpad is not None else cache_seqlens
    if anchor is None or (anchor.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    if torch.compiler.is_compiling():
        torch._assert_async(~_bad_lengths(cache_seqlens, cache_leftpad, cache_len)[0].any(),
                            "cache_seqlens / cache_leftpad out of range (0 <= cache_leftpad[b] <= cache_seqlens[b] "
                            "<= N)")
        return
    other = cache_seqlens if anchor is cache_leftpad else None
    key = (cache_len, version(anchor)) + ((id(other), version(other)) if other is not None else ())
    memo_on(anchor, "_excitor_lengths_checked", key,
            lambda: _check_length_values(cache_seqlens, cache_leftpad, cache_len))


def _bad_lengths(cache_seqlens, cache_leftpad, cache_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bad, ends): the samples whose range breaks 0 <= s_b <= L_b <= N, and the L_b."""
    ends = cache_seqlens if cache_seqlens is not None else torch.full_like(cache_leftpad, cache_len)
    bad = (ends < 0) | (ends > cache_len)
    if cache_leftpad is not None:
        bad = bad | (cache_leftpad < 0) | (cache_leftpad > ends)
    return bad, ends


def _check_length_values(cache_seqlens, cache_leftpad, cache_len: int) -> bool:
    bad, ends = _bad_lengths(cache_seqlens, cache_leftpad, cache_len)
    if not bool(bad.any()):
        return True
    if cache_seqlens is not None and bool(((cache_seqlens < 0) | (cache_seqlens > cache_len)).any()):
        raise ValueError(f"cache_seqlens values must lie in [0, N] = [0, {cache_len}] (N = k.shape[2]); "
                         f"got values in [{int(cache_seqlens.min())}, {int(cache_seqlens.max())}]")
    b = int(bad.nonzero()[0, 0])
    raise ValueError(f"cache_leftpad values must lie in [0, L_b] (L_b = cache_seqlens[b], or N = {cache_len} "
                     f"without it); got cache_leftpad[{b}] = {int(cache_leftpad[b])} with L_{b} = {int(ends[b])}")


def _require_cu_seqlens(name: str, cu, q: torch.Tensor) -> torch.Tensor:
    cu = _require_tensor(name, cu)
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor; got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must have shape (S + 1,) with S >= 1 sequences; got shape {_shape(cu)}")
    if cu.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}; got {cu.device}")
    return cu


def _require_max_seqlen(name: str, value, longest: int) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_floating_point:
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < longest:
        raise ValueError(f"{name} must be at least the longest sequence ({longest}); got {value}")
    return value


def version(t: torch.Tensor) -> Optional[int]:
    """``t``'s version counter (bumped by every in-place change), or None for an inference tensor (made under
    ``torch.inference_mode``), which has none: what is computed from it cannot be kept."""
    return None if t.is_inference() else t._version


def memo_on(t: torch.Tensor, name: str, key: tuple, compute):
    """``compute()``, kept on ``t`` itself under ``name`` and reused while ``key`` stays the same; ``key``
    must hold the version counters (:func:`version`) of every tensor the result reads, and nothing is kept where
    one is None. Layers of one model forward get the same offset tensors, so their host-side checks (a device sync
    each) run once, not once per layer."""
    if torch.compiler.is_compiling() or any(k is None for k in key):
        return compute()
    cached = t.__dict__.get(name)
    if cached is not None and cached[0] == key:
        return cached[1]
    value = compute()
    t.__dict__[name] = (key, value)
    return value


def _longest_sequences(cu_q: torch.Tensor, cu_k: torch.Tensor, totals: tuple) -> tuple[int, int]:
    """Check the offsets on the host (one device sync) and return the longest query and key sequences."""
    offsets = torch.stack([cu_q.long(), cu_k.long()]).cpu()
    longest = []
    for cu, name, total in zip(offsets, ("cu_seqlens_q", "cu_seqlens_k"), totals):
        if cu[0] != 0 or cu[-1] != total or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"{name} must start at 0, never decrease and end at the packed length {total}; "
                             f"got {cu.tolist()}")
        longest.append(int((cu[1:] - cu[:-1]).max()))
    return longest[0], longest[1]


def check_varlen_inputs(q, k, v, prompt_keys, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                        prompt_values=None, sim_keys=None, softmax_scale=None, prompt_scale=None,
                        needs_prompt_values: bool = False) -> Problem:
    """Validate packed operands (flash-attention's varlen layout) and return their sizes.

    ``q (total_q, Hq, d)``, ``k, v, sim_keys (total_k, Hkv, d)``, prompts ``(Hkv, P, d)`` or ``(S, Hkv, P, d)``,
    ``cu_seqlens_q/k (S + 1,)`` int32/int64 offsets from 0 to the totals, non-decreasing, and
    ``max_seqlen_q/k`` at least the longest sequence. Reads the offsets on the host (one device sync; inside
    ``torch.compile`` a device-side assertion instead, and ``max_seqlen_q/k`` must be ints).
    """
    for name, t in (("q", q), ("k", k), ("v", v)) + ((("sim_keys", sim_keys),) if sim_keys is not None else ()):
        _require_rank(name, _require_tensor(name, t), (3,), f"({'total_q, Hq' if name == 'q' else 'total_k, Hkv'}, d)")
    cu_q = _require_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q)
    cu_k = _require_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q)
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences; got shapes "
                         f"{_shape(cu_q)} and {_shape(cu_k)}")
    S = cu_q.numel() - 1
    totals = (q.shape[0], k.shape[0])
    if torch.compiler.is_compiling():  # no host read in a graph: the offsets checked on the device, the bounds trusted
        longest = (0, 0)
        for cu, total, bound in ((cu_q, totals[0], max_seqlen_q), (cu_k, totals[1], max_seqlen_k)):
            lengths = cu[1:] - cu[:-1]
            torch._assert_async((cu[0] == 0) & (cu[-1] == total) & (lengths >= 0).all() & (lengths <= bound).all(),
                                "cu_seqlens_q / cu_seqlens_k must start at 0, never decrease, end at the packed "
                                "length, and their sequences be at most max_seqlen_q / max_seqlen_k long")
    else:
        longest = memo_on(cu_q, "_excitor_longest", (version(cu_q), id(cu_k), version(cu_k), totals),
                          lambda: _longest_sequences(cu_q, cu_k, totals))
    max_q = _require_max_seqlen("max_seqlen_q", max_seqlen_q, longest[0])
    max_k = _require_max_seqlen("max_seqlen_k", max_seqlen_k, longest[1])

    if isinstance(prompt_keys, torch.Tensor) and prompt_keys.dim() == 4 and prompt_keys.shape[0] != S:
        raise ValueError(f"per-sequence prompt_keys must have shape (S={S}, Hkv, P, d), one entry per packed "
                         f"sequence; got {_shape(prompt_keys)}")

    def batched(t):  # (total, H, d) -> (1, H, total, d) view, and per-sequence prompts -> one entry
        return t.unsqueeze(0).transpose(1, 2)

    def one_entry(t):
        return t[0] if isinstance(t, torch.Tensor) and t.dim() == 4 else t

    p = check_inputs(batched(q), batched(k), batched(v), one_entry(prompt_keys), gate,
                     prompt_values=one_entry(prompt_values), sim_keys=None if sim_keys is None else batched(sim_keys),
                     softmax_scale=softmax_scale, prompt_scale=prompt_scale, needs_prompt_values=needs_prompt_values,
                     packed=True)
    if needs_prompt_values and prompt_values.shape != prompt_keys.shape:
        raise ValueError(f"prompt_values must have prompt_keys' shape {_shape(prompt_keys)}; "
                         f"got {_shape(prompt_values)}")
    return replace(p, batch=S, q_len=max_q, kv_len=max_k, per_sample_prompts=prompt_keys.dim() == 4, varlen=True)


def require_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__} {value!r}")
    return value


def resolve_scales(p: Problem, causal, softmax_scale, prompt_scale=None, *, deterministic=False) -> tuple[float, float]:
    """Check ``causal`` and ``deterministic`` (bools) and return (softmax_scale, prompt_scale) with their defaults
    ``d ** -0.5`` and ``softmax_scale`` (the values themselves were checked by :func:`check_inputs`)."""
    require_bool("causal", causal)
    require_bool("deterministic", deterministic)
    softmax_scale = float(p.head_dim ** -0.5 if softmax_scale is None else softmax_scale)
    return softmax_scale, float(softmax_scale if prompt_scale is None else prompt_scale)
