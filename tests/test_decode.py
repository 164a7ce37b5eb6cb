"""Split-KV decode forward (``_triton_decode.decode_forward``) against a float64 evaluation of docs/contract.md.

Each sample's reference sees only its cache entries ``[s_b, L_b)`` (``cache_leftpad``, ``cache_seqlens``), sliced
out of the cache, with the causal mask bottom-right aligned to ``L_b``. Outputs and the split workspace are poisoned
with NaN before the kernels run.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import excitor_kernels
from excitor_kernels import adapter_attention_reference, excitor_attention_reference
from excitor_kernels.ops._triton_attention import ADAPTER, EXCITOR
from excitor_kernels.ops._triton_decode import decode_forward
from helpers import BUDGET, DEVICES



@dataclasses.dataclass(frozen=True)
class Case:
    M: int
    N: int
    B: int = 2
    Hq: int = 4
    Hkv: int = 2
    d: int = 64
    P: int = 5
    seqlens: tuple | str | None = None  # explicit lengths, "random" or None (L_b = N)
    leftpad: tuple | str | None = None  # explicit first keys, "random" (0 <= s_b <= L_b) or None (s_b = 0)
    causal: bool = True
    per_sample: bool = False
    sim: bool = False
    strided: bool = False  # q as a (B, M, H, d) view, k/v as a slice of a longer (B, Nmax, H, d) cache
    splits: int | None = None

    def __str__(self):
        flags = "".join(f"-{n}" for n in ("per_sample", "sim", "strided") if getattr(self, n))
        lens = "" if self.seqlens is None else f"-L{self.seqlens}".replace(" ", "")
        lens += "" if self.leftpad is None else f"-s{self.leftpad}".replace(" ", "")
        return (f"M{self.M}-N{self.N}-B{self.B}-H{self.Hq}/{self.Hkv}-d{self.d}-P{self.P}{lens}"
                f"-{'causal' if self.causal else 'full'}{flags}-S{self.splits}")


def _heads(c: Case, H, L, dtype, device, strided, spare=0):
    if strided:  # a (B, L + spare, H, d) buffer, first L positions, viewed as (B, H, L, d)
        return torch.randn(c.B, L + spare, H, c.d, dtype=dtype, device=device)[:, :L].transpose(1, 2)
    return torch.randn(c.B, H, L, c.d, dtype=dtype, device=device)


def make_inputs(c: Case, op: str, dtype, device) -> dict:
    """Fresh random operands (never zeros)."""
    prompt_shape = ((c.B,) if c.per_sample else ()) + (c.Hkv, c.P, c.d)
    x = {
        "q": _heads(c, c.Hq, c.M, dtype, device, c.strided),
        "k": _heads(c, c.Hkv, c.N, dtype, device, c.strided, spare=7),
        "v": _heads(c, c.Hkv, c.N, dtype, device, c.strided, spare=7),
        "prompt_keys": torch.randn(prompt_shape, dtype=dtype, device=device),
        "prompt_values": torch.randn(prompt_shape, dtype=dtype, device=device) if op == "adapter" else None,
        "gate": torch.rand(c.Hq, device=device) * 2 - 1,
        "sim_keys": torch.randn(c.B, c.Hkv, c.N, c.d, dtype=dtype, device=device) if c.sim else None,
    }
    if c.seqlens == "random":
        x["cache_seqlens"] = torch.randint(1, c.N + 1, (c.B,), dtype=torch.int32, device=device)
    elif c.seqlens is not None:
        x["cache_seqlens"] = torch.tensor(c.seqlens, dtype=torch.int32, device=device)
    else:
        x["cache_seqlens"] = None
    ends = torch.full((c.B,), c.N) if x["cache_seqlens"] is None else x["cache_seqlens"].cpu()
    if c.leftpad == "random":
        x["cache_leftpad"] = (torch.rand(c.B) * (ends + 1)).floor().to(torch.int32).clamp(max=ends).to(device)
    elif c.leftpad is not None:
        x["cache_leftpad"] = torch.tensor(c.leftpad, dtype=torch.int32, device=device)
    else:
        x["cache_leftpad"] = None
    return x


def decode(op: str, x: dict, c: Case, scale: float, prompt_scale: float):
    with excitor_kernels.poisoned_outputs():
        return decode_forward(EXCITOR if op == "excitor" else ADAPTER, x["q"], x["k"], x["v"], x["prompt_keys"],
                              x["prompt_values"], x["gate"], x["sim_keys"], x["cache_seqlens"], c.causal, scale,
                              prompt_scale, cache_leftpad=x["cache_leftpad"], num_splits=c.splits)


def oracle(op: str, x: dict, c: Case, scale: float, prompt_scale: float) -> torch.Tensor:
    """Float64 reference, sample by sample on the cache entries [s_b, L_b) (an empty range: no key, as the
    reference computes it with cache_seqlens = 0)."""
    x = {n: None if t is None else t.detach().cpu().double() for n, t in x.items()}
    lens = [c.N] * c.B if x["cache_seqlens"] is None else x["cache_seqlens"].long().tolist()
    starts = [0] * c.B if x["cache_leftpad"] is None else x["cache_leftpad"].long().tolist()
    outs = []
    for b, (s, L) in enumerate(zip(starts, lens)):
        empty = {} if s < L else dict(cache_seqlens=torch.zeros(1, dtype=torch.int32))
        s, L = (s, L) if s < L else (0, 1)
        kv = {n: x[n][b:b + 1, :, s:L] for n in ("k", "v")}
        pk = x["prompt_keys"][b:b + 1] if c.per_sample else x["prompt_keys"]
        q = x["q"][b:b + 1]
        if op == "excitor":
            sim = None if x["sim_keys"] is None else x["sim_keys"][b:b + 1, :, s:L]
            outs.append(excitor_attention_reference(q, kv["k"], kv["v"], pk, x["gate"], sim_keys=sim, causal=c.causal,
                                                    softmax_scale=scale, prompt_scale=prompt_scale, **empty))
        else:
            pv = x["prompt_values"][b:b + 1] if c.per_sample else x["prompt_values"]
            outs.append(adapter_attention_reference(q, kv["k"], kv["v"], pk, pv, x["gate"], causal=c.causal,
                                                    softmax_scale=scale, **empty))
    return torch.cat(outs)


def check(op: str, c: Case, dtype, device):
    x = make_inputs(c, op, dtype, device)
    scale, prompt_scale = c.d ** -0.5, 0.7 * c.d ** -0.5
    o = decode(op, x, c, scale, prompt_scale)
    ref = oracle(op, x, c, scale, prompt_scale)
    assert o.shape == x["q"].shape and o.dtype == dtype and o.stride() == x["q"].stride()
    assert not torch.isnan(o).any(), "NaN in the output (an element never written, or a NaN made)"
    err = (o.cpu().double() - ref).norm().item() / ref.norm().item()
    assert err <= BUDGET[dtype], f"{c} {dtype}: rel err {err:.3g} over {BUDGET[dtype]:g}"


CASES = [
    Case(M=1, N=200),
    Case(M=1, N=131, Hkv=1, seqlens="random", sim=True),
    Case(M=4, N=77, Hkv=1, per_sample=True, seqlens=(77, 40)),
    Case(M=4, N=100, seqlens="random", strided=True, splits=3),
    Case(M=16, N=150, seqlens=(150, 9), per_sample=True, sim=True),   # sample 1: rows 0..6 see no key
    Case(M=16, N=45, d=32, P=1, causal=False, seqlens=(45, 17)),
    Case(M=4, N=70, B=1, Hq=2, Hkv=2, P=16, splits=1),                  # MHA, one split
    Case(M=1, N=66, splits=7),                                          # more splits than tiles: empty splits
    Case(M=1, N=1, B=1, Hq=1, Hkv=1, P=2),                              # a one-token cache
    Case(M=16, N=5, Hkv=1, P=3),                                        # cache shorter than the queries
    # cache_leftpad: a left-padded batch's first keys; empty ranges (s_b = L_b) see no key
    Case(M=1, N=150, B=3, leftpad=(0, 37, 149), splits=4),
    Case(M=4, N=90, seqlens=(90, 50), leftpad=(20, 50), sim=True, per_sample=True),
    Case(M=16, N=120, seqlens="random", leftpad="random", causal=False, strided=True),
    Case(M=3, N=64, leftpad=(63, 64), splits=2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["excitor", "adapter"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_decode_matches_oracle_fp32(case, op, device):
    check(op, case, torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["excitor", "adapter"])
@pytest.mark.parametrize("case", [Case(M=1, N=190, seqlens="random", per_sample=True),
                                  Case(M=2, N=130, seqlens="random", leftpad="random", sim=True),
                                  Case(M=16, N=90, Hkv=1, sim=True, seqlens=(90, 30), strided=True)], ids=str)
def test_decode_matches_oracle_half(case, op, dtype, device):
    check(op, case, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_split_count_invariant(device):
    """The combine makes the result independent of the number of splits (up to float32 rounding)."""
    c = Case(M=4, N=120, seqlens="random", sim=True)
    x = make_inputs(c, "excitor", torch.float32, device)
    outs = [decode("excitor", x, dataclasses.replace(c, splits=s), 0.125, 0.1) for s in (1, 2, 5)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["excitor", "adapter"])
def test_decode_very_negative_scores(op, device):
    """All scores far below 0 (base 2: < -149): a row that sees no key of a split (here the causal
    diagonal crosses the last chunk) must not pull the combine's max to 0."""
    c = Case(M=16, N=70, d=32, seqlens=(70, 33), splits=2)
    x = make_inputs(c, op, torch.float32, device)
    x["q"], x["k"], x["prompt_keys"] = -x["q"].abs(), x["k"].abs(), x["prompt_keys"].abs()
    o = decode(op, x, c, 10.0, 0.1)
    ref = oracle(op, x, c, 10.0, 0.1)
    assert not torch.isnan(o).any()
    assert (o.double() - ref).norm().item() / ref.norm().item() <= BUDGET[torch.float32]


def _call_with_seqlens(cache_seqlens, M=1, cache_leftpad=None):
    c = Case(M=M, N=20, B=2, Hq=2, Hkv=1, d=32, P=2)
    x = make_inputs(c, "excitor", torch.float32, "cpu")
    return decode_forward(EXCITOR, x["q"], x["k"], x["v"], x["prompt_keys"], None, x["gate"], None, cache_seqlens,
                          True, 0.2, 0.2, cache_leftpad=cache_leftpad)


@pytest.mark.parametrize("bad, error, match", [
    (torch.tensor([5, 6], dtype=torch.int64), TypeError, "cache_seqlens must have dtype torch.int32"),
    ([5, 6], TypeError, "cache_seqlens must be a torch.Tensor"),
    (torch.tensor([5, 6, 7], dtype=torch.int32), ValueError, r"cache_seqlens must have shape \(B,\)"),
    (torch.tensor([[5, 6]], dtype=torch.int32), ValueError, r"cache_seqlens must have shape \(B,\)"),
    (torch.tensor([5, 21], dtype=torch.int32), ValueError, r"cache_seqlens values must lie in \[0, N\]"),
    (torch.tensor([-1, 6], dtype=torch.int32), ValueError, r"cache_seqlens values must lie in \[0, N\]"),
], ids=["int64", "list", "long", "2d", "above_N", "zero"])
def test_cache_seqlens_validation(bad, error, match):
    with pytest.raises(error, match=match):
        _call_with_seqlens(bad)


@pytest.mark.parametrize("seqlens, bad, error, match", [
    (None, torch.tensor([5, 6], dtype=torch.int64), TypeError, "cache_leftpad must have dtype torch.int32"),
    (None, (5, 6), TypeError, "cache_leftpad must be a torch.Tensor"),
    (None, torch.tensor([5], dtype=torch.int32), ValueError, r"cache_leftpad must have shape \(B,\)"),
    (None, torch.tensor([5, 21], dtype=torch.int32), ValueError, r"cache_leftpad values must lie in \[0, L_b\]"),
    (None, torch.tensor([-1, 6], dtype=torch.int32), ValueError, r"cache_leftpad values must lie in \[0, L_b\]"),
    (torch.tensor([20, 6], dtype=torch.int32), torch.tensor([3, 7], dtype=torch.int32), ValueError,
     r"cache_leftpad values must lie in \[0, L_b\]"),
], ids=["int64", "tuple", "short", "above_N", "negative", "above_L"])
def test_cache_leftpad_validation(seqlens, bad, error, match):
    with pytest.raises(error, match=match):
        _call_with_seqlens(seqlens, cache_leftpad=bad)


def test_too_many_queries():
    with pytest.raises(ValueError, match="at most 16 queries"):
        _call_with_seqlens(None, M=17)


# ------------------------------------------------------------------------------------------------
# Through the public operators: inference calls with <= 16 queries take the decode path.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["excitor", "adapter"])
def test_public_operator_routes_inference_to_decode(op, device):
    from excitor_kernels import adapter_attention, excitor_attention
    from excitor_kernels.ops import _triton_decode

    B, Hq, Hkv, M, N, d, P = 3, 4, 2, 4, 77, 32, 5
    q = torch.randn(B, Hq, M, d, device=device)
    k, v = torch.randn(B, Hkv, N, d, device=device), torch.randn(B, Hkv, N, d, device=device)
    pk, pv = torch.randn(Hkv, P, d, device=device), torch.randn(Hkv, P, d, device=device)
    gate = torch.rand(Hq, device=device) * 2 - 1
    lengths = torch.tensor([77, 30, 5], dtype=torch.int32, device=device)
    calls = []
    original = _triton_decode.decode_forward

    def spy(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    _triton_decode.decode_forward = spy
    try:
        with torch.no_grad(), excitor_kernels.poisoned_outputs():
            if op == "excitor":
                o = excitor_attention(q, k, v, pk, gate, backend="triton", cache_seqlens=lengths)
                ref = excitor_attention(*(t.double() for t in (q, k, v, pk, gate)), backend="reference",
                                        cache_seqlens=lengths)
            else:
                o = adapter_attention(q, k, v, pk, pv, gate, backend="triton", cache_seqlens=lengths)
                ref = adapter_attention(*(t.double() for t in (q, k, v, pk, pv, gate)), backend="reference",
                                        cache_seqlens=lengths)
    finally:
        _triton_decode.decode_forward = original
    assert len(calls) == 1
    assert not torch.isnan(o).any()
    assert ((o.double() - ref).norm() / ref.norm()).item() <= 1e-3


def test_cache_seqlens_needs_the_decode_path():
    from excitor_kernels import excitor_attention

    q, k = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 30, 16)
    with pytest.raises(ValueError, match="cache_seqlens is served by the decode path only"):
        excitor_attention(q, k, k, torch.randn(2, 3, 16), torch.randn(2), backend="triton",
                          cache_seqlens=torch.tensor([25], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_leftpad is served by the decode path only"):
        excitor_attention(q, k, k, torch.randn(2, 3, 16), torch.randn(2), backend="sdpa",
                          cache_leftpad=torch.tensor([3], dtype=torch.int32))


@pytest.mark.parametrize("op", ["excitor", "adapter"])
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_cache_leftpad_is_the_sliced_cache(op, backend):
    """Every backend that serves cache_leftpad gives what each sample gives on its slice [s_b, L_b) of the cache
    (the torch and reference backends also at M > 16 and with gradients; rows that see no key: 0, or the Adapter's
    prompt term alone)."""
    from excitor_kernels import adapter_attention, excitor_attention

    device = DEVICES[0] if backend == "triton" else "cpu"
    grads = backend != "triton"  # the decode kernel is inference only
    c = Case(M=20 if grads else 3, N=40, B=3, seqlens=(40, 25, 12), leftpad=(5, 0, 12), sim=op == "excitor",
             per_sample=True)
    x = make_inputs(c, op, torch.float32, device)
    names = ["q", "k", "v", "prompt_keys"] + (["prompt_values"] if op == "adapter" else []) + ["gate"]
    leaves = {n: x[n].detach().requires_grad_(grads) for n in names}
    sim = x["sim_keys"]
    lengths = dict(cache_seqlens=x["cache_seqlens"], cache_leftpad=x["cache_leftpad"])
    f = excitor_attention if op == "excitor" else adapter_attention
    kw = dict(sim_keys=sim) if op == "excitor" else {}
    with torch.set_grad_enabled(grads), excitor_kernels.poisoned_outputs():
        o = f(*leaves.values(), backend=backend, **kw, **lengths)
    expected = {n: x[n].detach().cpu().double().requires_grad_(grads) for n in names}
    outs = []
    for b, (s, L) in enumerate(zip(c.leftpad, c.seqlens)):
        keys = {n: expected[n][b:b + 1, :, s:L] for n in ("k", "v")} if s < L else \
            {n: expected[n][b:b + 1] for n in ("k", "v")}
        empty = {} if s < L else dict(cache_seqlens=torch.zeros(1, dtype=torch.int32))
        prompts = [expected[n][b:b + 1] for n in names[3:-1]]
        extra = {} if op == "adapter" else dict(sim_keys=sim[b:b + 1, :, s:L].cpu().double() if s < L
                                                else sim[b:b + 1].cpu().double())
        outs.append(f(expected["q"][b:b + 1], keys["k"], keys["v"], *prompts, expected["gate"], backend="reference",
                      **extra, **empty))
    ref = torch.cat(outs)
    assert not torch.isnan(o).any()
    assert ((o.detach().cpu().double() - ref).norm() / ref.norm()).item() <= 1e-5
    if grads:
        do = torch.randn_like(ref)
        o.backward(do.to(o.dtype))
        ref.backward(do)
        for n in names:
            assert ((leaves[n].grad.double() - expected[n].grad).norm() / expected[n].grad.norm()).item() <= 1e-5, n


def test_cache_lengths_are_checked_once_per_version(monkeypatch):
    """The value check of cache_seqlens / cache_leftpad (a device sync) runs once for the tensors every layer of a
    forward shares, and again when they change in place (a bad value written later is caught)."""
    from excitor_kernels import _validate

    checks = []
    original = _validate._check_length_values
    monkeypatch.setattr(_validate, "_check_length_values", lambda *a: checks.append(1) or original(*a))
    lengths, starts = torch.tensor([20, 12], dtype=torch.int32), torch.tensor([3, 0], dtype=torch.int32)
    for _ in range(3):
        _call_with_seqlens(lengths, cache_leftpad=starts)
    assert len(checks) == 1
    starts[1] = 13  # past L_1 = 12
    with pytest.raises(ValueError, match=r"cache_leftpad\[1\] = 13 with L_1 = 12"):
        _call_with_seqlens(lengths, cache_leftpad=starts)
    starts[1] = 0
    lengths[0] = 21
    with pytest.raises(ValueError, match=r"cache_seqlens values must lie in \[0, N\]"):
        _call_with_seqlens(lengths, cache_leftpad=starts)


@pytest.mark.parametrize("op", ["excitor", "adapter"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_outside_the_cache_range_reaches_no_row(op, backend):
    """NaN in the keys, values and similarity keys outside [cache_leftpad[b], cache_seqlens[b]) (a left-padded
    batch's pads, a cache's unfilled slots): the decode kernel and the torch backend attend the range only."""
    from excitor_kernels import adapter_attention, excitor_attention

    device = DEVICES[0] if backend == "triton" else "cpu"
    c = Case(M=2, N=50, B=3, seqlens=(50, 30, 41), leftpad=(7, 0, 40), sim=op == "excitor")
    x = make_inputs(c, op, torch.float32, device)
    for name in ("k", "v", "sim_keys"):
        if x[name] is not None:
            for b, (s, L) in enumerate(zip(c.leftpad, c.seqlens)):
                x[name][b, :, :s] = float("nan")
                x[name][b, :, L:] = float("nan")
    lengths = dict(cache_seqlens=x["cache_seqlens"], cache_leftpad=x["cache_leftpad"])
    with torch.no_grad(), excitor_kernels.poisoned_outputs():
        if op == "excitor":
            o = excitor_attention(x["q"], x["k"], x["v"], x["prompt_keys"], x["gate"], sim_keys=x["sim_keys"],
                                  backend=backend, **lengths)
        else:
            o = adapter_attention(x["q"], x["k"], x["v"], x["prompt_keys"], x["prompt_values"], x["gate"],
                                  backend=backend, **lengths)
    assert torch.isfinite(o).all()
