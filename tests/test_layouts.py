"""Operands at any stride, outputs in q's layout, and the contract's edge cases (docs/contract.md, "Inputs").

Every tensor operand with a contiguous last dimension is taken at any stride by every backend: sliced (every other
entry of a larger tensor), expanded (stride 0) and transposed views. Each test builds one operand as a view of a
fresh random leaf, the others contiguous, and compares the output and every gradient (reaching the leaf through the
view) with the float64 formula evaluated on the same views of float64 copies.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import excitor_kernels
from excitor_kernels import (adapter_attention, adapter_attention_varlen, excitor_attention,
                             excitor_attention_varlen)
from helpers import BUDGET, TRITON_DEVICE, rel_err

B, HQ, HKV, M, N, D, P = 2, 4, 2, 7, 11, 16, 3
LENGTHS = [5, 0, 11]  # cache_seqlens / key lengths of the varlen pack, with an empty one


def _views(shape, layout):
    """(leaf shape, view function) producing a ``shape`` operand in ``layout``."""
    if layout == "contiguous":
        return shape, lambda t: t
    if layout == "sliced":  # every other entry of the first dimension (the last one for 1-D operands: the gate)
        return (2 * shape[0], *shape[1:]), lambda t: t[::2]
    if layout == "expanded":  # stride 0 on the first dimension
        return (1, *shape[1:]), lambda t: t.expand(*shape)
    if layout == "transposed":  # (x, L, H, d) buffers viewed as (x, H, L, d)
        lead = shape[:-3]
        return (*lead, shape[-2], shape[-3], shape[-1]), lambda t: t.transpose(-2, -3)
    raise AssertionError(layout)


PADDED = {"q": (B, HQ, M, D), "k": (B, HKV, N, D), "v": (B, HKV, N, D), "sim_keys": (B, HKV, N, D),
          "prompt_keys": (HKV, P, D), "prompt_values": (HKV, P, D), "gate": (HQ,)}
PACKED = {"q": (9, HQ, D), "k": (sum(LENGTHS), HKV, D), "v": (sum(LENGTHS), HKV, D),
          "sim_keys": (sum(LENGTHS), HKV, D), "prompt_keys": (HKV, P, D), "prompt_values": (HKV, P, D), "gate": (HQ,)}
OPERANDS = {"excitor": ("q", "k", "v", "sim_keys", "prompt_keys", "gate"),
            "adapter": ("q", "k", "v", "prompt_keys", "prompt_values", "gate")}


def _inputs(op, shapes, operand, layout, device):
    """{name: (leaf, view)} with ``operand`` in ``layout``; fresh random leaves (the gate float32)."""
    x = {}
    for name in OPERANDS[op]:
        shape = shapes[name]
        leaf_shape, view = _views(shape, layout if name == operand else "contiguous")
        if name == "gate":
            leaf = torch.rand(leaf_shape, device=device) * 2 - 1
        else:
            leaf = torch.randn(leaf_shape, device=device)
        x[name] = (leaf.requires_grad_(True), view)
    return x


def _offsets(lengths, device, strided=False):
    """cu_seqlens of ``lengths``, int32; ``strided``: every other entry of a larger tensor."""
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return torch.stack([cu, torch.full_like(cu, -7)], 1).flatten()[::2] if strided else cu


def _call(op, t, backend, varlen=False, cache_seqlens=None, strided_offsets=False, cache_leftpad=None):
    kw = dict(backend=backend, causal=True)
    if cache_seqlens is not None:
        kw["cache_seqlens"] = cache_seqlens
    if cache_leftpad is not None:
        kw["cache_leftpad"] = cache_leftpad
    if varlen:
        device = t["q"].device
        lens = (_offsets([3, 1, 5], device, strided_offsets), _offsets(LENGTHS, device, strided_offsets), 5,
                max(LENGTHS))
        if op == "excitor":
            return excitor_attention_varlen(t["q"], t["k"], t["v"], t["prompt_keys"], t["gate"], *lens,
                                            sim_keys=t.get("sim_keys"), **kw)
        return adapter_attention_varlen(t["q"], t["k"], t["v"], t["prompt_keys"], t["prompt_values"], t["gate"],
                                        *lens, **kw)
    if op == "excitor":
        return excitor_attention(t["q"], t["k"], t["v"], t["prompt_keys"], t["gate"], sim_keys=t.get("sim_keys"),
                                 **kw)
    return adapter_attention(t["q"], t["k"], t["v"], t["prompt_keys"], t["prompt_values"], t["gate"], **kw)


def _check(op, x, backend, *, varlen=False, grads=True, cache_seqlens=None, strided_offsets=False,
           cache_leftpad=None):
    views = {n: view(leaf) for n, (leaf, view) in x.items()}
    leaves = [leaf for leaf, _ in x.values()]
    do = torch.randn(views["q"].shape, device=views["q"].device)
    with excitor_kernels.poisoned_outputs(), torch.set_grad_enabled(grads):
        o = _call(op, views, backend, varlen, cache_seqlens, strided_offsets, cache_leftpad)
        got = torch.autograd.grad(o, leaves, do) if grads else ()
    x64 = {n: (leaf.detach().double().cpu().requires_grad_(True), view) for n, (leaf, view) in x.items()}
    lens64, pads64 = (None if t is None else t.cpu() for t in (cache_seqlens, cache_leftpad))
    o64 = _call(op, {n: view(leaf) for n, (leaf, view) in x64.items()}, "reference", varlen, lens64,
                cache_leftpad=pads64)
    want = torch.autograd.grad(o64, [leaf for leaf, _ in x64.values()], do.double().cpu()) if grads else ()
    errors = {"o": rel_err(o.cpu(), o64)}
    errors.update({f"d{n}": rel_err(g.cpu(), w) for n, g, w in zip(x, got, want)})
    bad = {n: e for n, e in errors.items() if not e <= BUDGET[torch.float32]}
    assert not bad, f"{backend}: errors over budget {bad}"
    return o


def _params(layouts):
    for op, names in OPERANDS.items():
        for backend in ("reference", "torch", "triton", "sdpa", "sdpa_concat"):
            if backend == "sdpa_concat" and op == "adapter":
                continue
            for name in names:
                for layout in layouts:
                    if layout == "transposed" and name not in ("q", "k", "v", "sim_keys"):
                        continue
                    yield pytest.param(op, backend, name, layout, id=f"{op}-{backend}-{name}-{layout}")


@pytest.mark.parametrize("op,backend,operand,layout", list(_params(("sliced", "expanded", "transposed"))))
def test_strided_operand_padded(op, backend, operand, layout):
    """Training call (gradients) with one operand strided: the output and every gradient within budget."""
    device = "cpu" if backend in ("reference", "torch") else TRITON_DEVICE
    _check(op, _inputs(op, PADDED, operand, layout, device), backend)


def _operand_params(extra=()):
    return [pytest.param(op, name, id=f"{op}-{name}") for op, names in OPERANDS.items() for name in (*names, *extra)]


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("layout", ["sliced", "expanded"])
@pytest.mark.parametrize("op,operand", _operand_params())
def test_strided_operand_decode(op, operand, layout, backend):
    """No-grad call with at most 16 queries (triton: the split-KV decode kernel) and strided cache_seqlens with
    a 0 (a sample without keys) and strided cache_leftpad: one operand strided at a time."""
    device = "cpu" if backend in ("reference", "torch") else TRITON_DEVICE
    lengths = torch.tensor([5, -1, 0, -1], dtype=torch.int32, device=device)[::2]  # stride 2
    starts = torch.tensor([2, -1, 0, -1], dtype=torch.int32, device=device)[::2]
    _check(op, _inputs(op, PADDED, operand, layout, device), backend, grads=False, cache_seqlens=lengths,
           cache_leftpad=starts)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("op,operand", _operand_params(("cu_seqlens",)))
def test_strided_operand_varlen(op, operand, backend):
    """Packed sequences (one without keys) with one operand sliced; ``cu_seqlens``: both offsets strided."""
    device = "cpu" if backend in ("reference", "torch") else TRITON_DEVICE
    x = _inputs(op, PACKED, operand, "sliced", device)
    _check(op, x, backend, varlen=True, strided_offsets=operand == "cu_seqlens")


@pytest.mark.parametrize("op", ["excitor", "adapter"])
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_varlen_pack_without_keys(op, backend):
    """A pack whose key sequences are all empty: every row sees no key (docs/contract.md, "A row that sees no key"):
    the Excitor outputs 0, the Adapter its prompt term alone, with gradients."""
    device = "cpu" if backend in ("reference", "torch") else TRITON_DEVICE
    torch.manual_seed(0)
    q = torch.randn(5, HQ, D, device=device, requires_grad=True)
    k = torch.randn(0, HKV, D, device=device, requires_grad=True)
    pk = torch.randn(HKV, P, D, device=device, requires_grad=True)
    pv = torch.randn(HKV, P, D, device=device, requires_grad=True)
    gate = (torch.rand(HQ, device=device) + 0.5).requires_grad_(True)
    cq = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    ck = torch.zeros(3, dtype=torch.int32, device=device)
    with excitor_kernels.poisoned_outputs():
        if op == "excitor":
            o = excitor_attention_varlen(q, k, k, pk, gate, cq, ck, 3, 0, backend=backend)
            assert bool((o == 0).all())
            return
        o = adapter_attention_varlen(q, k, k, pk, pv, gate, cq, ck, 3, 0, backend=backend)
        do = torch.randn_like(o)
        grads = torch.autograd.grad(o, (q, pk, pv, gate), do)
    leaves = [t.detach().double().cpu().requires_grad_(True) for t in (q, pk, pv, gate)]
    q64, pk64, pv64, g64 = leaves
    heads = HQ // HKV
    a = torch.softmax(q64.transpose(0, 1) @ pk64.repeat_interleave(heads, 0).transpose(-1, -2) * D ** -0.5, -1)
    o64 = (g64.view(-1, 1, 1) * (a @ pv64.repeat_interleave(heads, 0))).transpose(0, 1)
    want = torch.autograd.grad(o64, leaves, do.double().cpu())
    assert rel_err(o.cpu(), o64) <= BUDGET[torch.float32]
    for g, w in zip(grads, want):
        assert rel_err(g.cpu(), w) <= BUDGET[torch.float32]


@pytest.mark.parametrize("op,backend", [(op, b) for op in OPERANDS for b in ("reference", "torch", "triton", "sdpa",
                                                                              "sdpa_concat")
                                        if not (op == "adapter" and b == "sdpa_concat")])
@pytest.mark.parametrize("grad", [True, False])
def test_output_keeps_q_layout(op, backend, grad):
    """q = x.view(B, M, H, d).transpose(1, 2): o has q's strides, so o.transpose(1, 2).reshape(B, M, H * d) is a
    view (README)."""
    device = "cpu" if backend in ("reference", "torch") else TRITON_DEVICE
    x = _inputs(op, PADDED, "q", "transposed", device)
    with torch.set_grad_enabled(grad):
        o = _check(op, x, backend, grads=grad)
    q = x["q"][1](x["q"][0])
    assert o.stride() == q.stride()
    assert o.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("call", ["padded", "varlen"])
def test_deterministic_must_be_a_bool(call):
    x = {n: leaf for n, (leaf, _) in _inputs("excitor", PADDED if call == "padded" else PACKED, None, "contiguous",
                                             "cpu").items()}
    with pytest.raises(TypeError, match="deterministic must be a bool; got str 'yes'"):
        if call == "padded":
            excitor_attention(x["q"], x["k"], x["v"], x["prompt_keys"], x["gate"], deterministic="yes")
        else:
            excitor_attention_varlen(x["q"], x["k"], x["v"], x["prompt_keys"], x["gate"], _offsets([9], "cpu"),
                                     _offsets([sum(LENGTHS)], "cpu"), 9, sum(LENGTHS), deterministic="yes")


def test_imports_and_runs_without_triton(tmp_path):
    """Without triton (macOS, Windows): the package imports, auto takes the torch backend, triton is refused with
    the reason."""
    script = tmp_path / "no_triton.py"
    script.write_text(
        "import sys\n"
        "sys.modules['triton'] = None  # as if not installed: import fails, importlib.util.find_spec gives None\n"
        "import torch, excitor_kernels as ek\n"
        "q, k = torch.randn(1, 2, 5, 8, requires_grad=True), torch.randn(1, 2, 5, 8)\n"
        "pk, g = torch.randn(2, 3, 8), torch.rand(2)\n"
        "print(ek.explain_backend('excitor', q, k, k, pk, g).backend)\n"
        "ek.excitor_attention(q, k, k, pk, g).sum().backward()\n"
        "try:\n"
        "    ek.excitor_attention(q, k, k, pk, g, backend='triton')\n"
        "except ValueError as e:\n"
        "    print(e)\n")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, str(script)], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0] == "torch"
    assert "triton is not installed" in lines[1]
