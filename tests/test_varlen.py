"""Packed variable-length sequences: ``excitor_attention_varlen`` and ``adapter_attention_varlen``.

The oracle runs every sequence alone through the padded-batch operators' float64 evaluation (reference
backend on float64 copies); the packed call must match it, forward and every gradient, within docs/contract.md's
budget. Lengths cover 1, odd, 0 (an empty sequence), longer than a block (the interpreted blocks are at
most 32 rows) and keys longer than queries (bottom-right causal alignment within each sequence).
"""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import excitor_kernels
from excitor_kernels import (adapter_attention, adapter_attention_varlen, excitor_attention,
                             excitor_attention_varlen)

from helpers import BUDGET, DEVICES, TRITON_DEVICE, rel_err


@dataclasses.dataclass(frozen=True)
class VarlenCase:
    lq: tuple
    lk: tuple | None = None  # None: the same as lq (training)
    Hq: int = 4
    Hkv: int = 2
    d: int = 64
    P: int = 16
    causal: bool = True
    per_sequence: bool = False
    sim: bool = False

    @property
    def key_lengths(self):
        return self.lq if self.lk is None else self.lk

    def __str__(self):
        flags = "".join(f"-{n}" for n in ("per_sequence", "sim") if getattr(self, n))
        return (f"q{'_'.join(map(str, self.lq))}-k{'_'.join(map(str, self.key_lengths))}-H{self.Hq}/{self.Hkv}"
                f"-d{self.d}-P{self.P}-{'causal' if self.causal else 'full'}{flags}")


CASES = [
    VarlenCase(lq=(1, 7, 40, 3), Hq=4, Hkv=2, P=16),
    VarlenCase(lq=(5, 0, 33, 1, 2), lk=(9, 3, 70, 1, 0), Hq=4, Hkv=1, P=2, per_sequence=True, sim=True),
    VarlenCase(lq=(37, 1, 13), Hq=4, Hkv=4, d=128, P=64, causal=False, sim=True),
]


def cu_seqlens(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def make_inputs(c: VarlenCase, op: str, dtype, device) -> dict:
    tq, tk, S = sum(c.lq), sum(c.key_lengths), len(c.lq)
    prompt_shape = ((S,) if c.per_sequence else ()) + (c.Hkv, c.P, c.d)
    x = {
        "q": torch.randn(tq, c.Hq, c.d, dtype=dtype, device=device),
        "k": torch.randn(tk, c.Hkv, c.d, dtype=dtype, device=device),
        "v": torch.randn(tk, c.Hkv, c.d, dtype=dtype, device=device),
        "prompt_keys": torch.randn(prompt_shape, dtype=dtype, device=device),
        "gate": torch.rand(c.Hq, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        * 2 - 1,
    }
    if op == "adapter":
        x["prompt_values"] = torch.randn(prompt_shape, dtype=dtype, device=device)
    elif c.sim:
        x["sim_keys"] = torch.randn(tk, c.Hkv, c.d, dtype=dtype, device=device)
    return {n: t.requires_grad_(True) for n, t in x.items()}


def call_varlen(op, x, c: VarlenCase, backend, **kw):
    device = x["q"].device
    cq, ck = cu_seqlens(c.lq, device), cu_seqlens(c.key_lengths, device)
    lens = (cq, ck, max(c.lq), max(c.key_lengths))
    if op == "excitor":
        return excitor_attention_varlen(x["q"], x["k"], x["v"], x["prompt_keys"], x["gate"], *lens,
                                        sim_keys=x.get("sim_keys"), causal=c.causal, backend=backend, **kw)
    return adapter_attention_varlen(x["q"], x["k"], x["v"], x["prompt_keys"], x["prompt_values"], x["gate"], *lens,
                                    causal=c.causal, backend=backend, **kw)


def oracle(op, x, c: VarlenCase, do):
    """Each sequence alone through the padded operator's float64 reference; grads of the packed inputs."""
    x64 = {n: t.detach().double().requires_grad_(True) for n, t in x.items()}
    outs, q0, k0 = [], 0, 0
    for b, (m, n) in enumerate(zip(c.lq, c.key_lengths)):
        def seq(t, start, length):
            return t[start:start + length].transpose(0, 1).unsqueeze(0)

        pk = x64["prompt_keys"][b] if c.per_sequence else x64["prompt_keys"]
        q, k, v = seq(x64["q"], q0, m), seq(x64["k"], k0, n), seq(x64["v"], k0, n)
        if m == 0:
            o = q
        elif op == "excitor":
            sim = seq(x64["sim_keys"], k0, n) if "sim_keys" in x64 else None
            o = excitor_attention(q, k, v, pk, x64["gate"], sim_keys=sim, causal=c.causal, backend="reference") \
                if n > 0 else torch.zeros_like(q)
        else:
            pv = x64["prompt_values"][b] if c.per_sequence else x64["prompt_values"]
            if n > 0:
                o = adapter_attention(q, k, v, pk, pv, x64["gate"], causal=c.causal, backend="reference")
            else:  # no keys: only the prompt term remains
                groups = c.Hq // c.Hkv
                pk_h, pv_h = pk.repeat_interleave(groups, 0), pv.repeat_interleave(groups, 0)
                a = torch.softmax(q @ pk_h.transpose(-1, -2) * c.d ** -0.5, -1)
                o = x64["gate"].view(1, -1, 1, 1) * (a @ pv_h)
        outs.append(o[0].transpose(0, 1))
        q0, k0 = q0 + m, k0 + n
    o = torch.cat(outs)
    grads = torch.autograd.grad(o, list(x64.values()), do.double(), allow_unused=True)
    return o, {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(x64.items(), grads)}


def check(op, c, dtype, device, backend, **kw):
    x = make_inputs(c, op, dtype, device)
    do = torch.randn_like(x["q"])
    with excitor_kernels.poisoned_outputs():
        o = call_varlen(op, x, c, backend, **kw)
        grads = dict(zip(x, torch.autograd.grad(o, list(x.values()), do)))
    o_ref, grads_ref = oracle(op, x, c, do)
    assert o.shape == x["q"].shape and o.dtype == dtype
    errors = {"o": rel_err(o, o_ref)}
    for name, g in grads.items():
        assert g.dtype == x[name].dtype, name
        errors[name] = rel_err(g, grads_ref[name])
    budget = BUDGET[dtype]
    bad = {n: e for n, e in errors.items() if not e <= budget}
    assert not bad, f"{c} {dtype} {backend}: errors over the {budget:g} budget: {bad} (all: {errors})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("op", ["excitor", "adapter"])
def test_triton_matches_each_sequence_alone(op, case, dtype, device):
    check(op, case, dtype, device, "triton")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["excitor", "adapter"])
def test_triton_float16_deterministic(op, device):
    check(op, CASES[1], torch.float16, device, "triton", deterministic=True)


@pytest.mark.parametrize("op", ["excitor", "adapter"])
def test_reference_backend_matches_each_sequence_alone(op):
    check(op, CASES[1], torch.float32, "cpu", "reference")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["excitor", "adapter"])
def test_packed_equals_padded_batch(op, device):
    """Equal-length sequences packed give the padded-batch operator's result, in the same dtype and kernels."""
    c = VarlenCase(lq=(21, 21, 21), Hq=4, Hkv=2, P=4, sim=True)
    x = make_inputs(c, op, torch.float32, device)
    packed = call_varlen(op, x, c, "triton")
    padded = {n: (t.view(3, 21, *t.shape[1:]).transpose(1, 2) if n in ("q", "k", "v", "sim_keys") else t)
              for n, t in x.items()}
    if op == "excitor":
        ref = excitor_attention(padded["q"], padded["k"], padded["v"], padded["prompt_keys"], padded["gate"],
                                sim_keys=padded["sim_keys"], backend="triton")
    else:
        ref = adapter_attention(padded["q"], padded["k"], padded["v"], padded["prompt_keys"],
                                padded["prompt_values"], padded["gate"], backend="triton")
    assert rel_err(packed, ref.transpose(1, 2).reshape(63, 4, -1).double()) < 1e-6


def _excitor_args(device="cpu"):
    c = CASES[0]
    x = make_inputs(c, "excitor", torch.float32, device)
    return dict(q=x["q"], k=x["k"], v=x["v"], prompt_keys=x["prompt_keys"], gate=x["gate"],
                cu_seqlens_q=cu_seqlens(c.lq, device), cu_seqlens_k=cu_seqlens(c.lq, device),
                max_seqlen_q=max(c.lq), max_seqlen_k=max(c.lq))


@pytest.mark.parametrize("change, error, words", [
    (lambda a: a.update(q=a["q"][None]), ValueError, "q must have shape (total_q, Hq, d)"),
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].float()), TypeError, "cu_seqlens_q must be an int32"),
    (lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"][:-1]), ValueError, "same number of sequences"),
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"] + 1), ValueError, "cu_seqlens_q must start at 0"),
    (lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"].flip(0)), ValueError, "cu_seqlens_k must start at 0"),
    (lambda a: a["cu_seqlens_q"].__setitem__(2, 50), ValueError, "never decrease"),
    (lambda a: a.update(max_seqlen_q=39), ValueError, "max_seqlen_q must be at least the longest sequence (40)"),
    (lambda a: a.update(max_seqlen_k=40.0), TypeError, "max_seqlen_k must be an int"),
    (lambda a: a.update(prompt_keys=a["prompt_keys"].detach().expand(2, -1, -1, -1)), ValueError,
     "one entry per packed sequence"),
    (lambda a: a.update(k=a["k"][:, :, :32]), ValueError, "k must have shape"),
])
def test_bad_varlen_inputs_raise(change, error, words):
    args = _excitor_args()
    change(args)
    with pytest.raises(error) as info:
        excitor_attention_varlen(**args, backend="reference")
    assert words in str(info.value)


@pytest.mark.parametrize("backend", ["cuda", "sdpa", "sdpa_concat"])
def test_backends_without_varlen_refuse_it_and_auto_falls_back(backend):
    args = _excitor_args()
    with pytest.raises(ValueError, match=f"backend='{backend}' cannot run"):
        excitor_attention_varlen(**args, backend=backend)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        o = excitor_attention_varlen(**args, backend="auto")
    assert o.shape == args["q"].shape and not torch.isnan(o).any()


def test_offsets_changed_in_place_are_checked_again():
    """The host-side offset check is kept on the offset tensor per version: an in-place change re-runs it."""
    args = _excitor_args()
    excitor_attention_varlen(**args, backend="reference")
    args["cu_seqlens_q"][-1] = 60
    with pytest.raises(ValueError, match="end at the packed length 51"):
        excitor_attention_varlen(**args, backend="reference")


@pytest.mark.parametrize("op", ["excitor", "adapter"])
def test_varlen_custom_ops_pass_opcheck(op):
    """torch.library.opcheck: schema, fake (meta) implementation and autograd registration of the varlen
    form of the custom ops agree with the real kernels (what torch.compile relies on)."""
    c = CASES[1]
    x = make_inputs(c, op, torch.float32, TRITON_DEVICE)
    cq, ck = cu_seqlens(c.lq, TRITON_DEVICE), cu_seqlens(c.key_lengths, TRITON_DEVICE)
    lens = (cq, ck, max(c.lq), max(c.key_lengths), c.causal, c.d ** -0.5)
    if op == "excitor":
        args = (x["q"], x["k"], x["v"], x["prompt_keys"], x["gate"], x["sim_keys"], *lens, c.d ** -0.5, False)
        fwd = torch.ops.excitor_kernels.excitor_attention_fwd
    else:
        args = (x["q"], x["k"], x["v"], x["prompt_keys"], x["prompt_values"], x["gate"], *lens, False)
        fwd = torch.ops.excitor_kernels.adapter_attention_fwd
    torch.library.opcheck(fwd, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_varlen_call_traces_in_one_graph_and_checks_offsets_on_the_device():
    """Inside torch.compile the offsets cannot be read on the host: the triton varlen call traces with
    fullgraph=True (max_seqlen_* as given) and checks the offsets with a device-side assertion: right offsets
    give eager's result, a sequence longer than max_seqlen_q raises when the graph runs."""
    torch._dynamo.reset()
    args = _excitor_args(TRITON_DEVICE)

    def call(q, k, v, prompt_keys, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        return excitor_attention_varlen(q, k, v, prompt_keys, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, backend="triton")

    traced = torch.compile(call, fullgraph=True, backend="aot_eager")
    assert rel_err(traced(**args), call(**args).double()) < 1e-6
    torch._dynamo.reset()
    short = dict(args, max_seqlen_q=args["max_seqlen_q"] - 1)
    with pytest.raises(RuntimeError, match="at most max_seqlen_q"):
        torch.compile(call, fullgraph=True, backend="aot_eager")(**short)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_offsets_and_cache_lengths_under_inference_mode(backend):
    """Tensors made under torch.inference_mode have no version counter: the host checks of varlen offsets and of
    cache_seqlens (kept per tensor version elsewhere) run each call there (before: they raised), with eager's
    result."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    args = _excitor_args(device)
    B, H, N, d = 2, 2, 20, 32
    q, k, v = (torch.randn(B, H, n, d, device=device) for n in (4, N, N))
    prompt_keys, gate = torch.randn(H, 3, d, device=device), torch.rand(H, device=device)
    lengths = torch.tensor([13, 20], dtype=torch.int32, device=device)
    with torch.no_grad():
        packed = excitor_attention_varlen(**args, backend=backend)
        cached = excitor_attention(q, k, v, prompt_keys, gate, cache_seqlens=lengths, backend=backend)
    with torch.inference_mode():
        fresh = {name: t.clone() if isinstance(t, torch.Tensor) else t for name, t in args.items()}
        assert fresh["cu_seqlens_q"].is_inference()
        assert torch.equal(excitor_attention_varlen(**fresh, backend=backend), packed)
        o = excitor_attention(q.clone(), k.clone(), v.clone(), prompt_keys.clone(), gate.clone(),
                              cache_seqlens=lengths.clone(), backend=backend)
        assert torch.equal(o, cached)
