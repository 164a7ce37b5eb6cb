"""Property-based test: every backend, dtype and layout against the float64 formula, under docs/contract.md's standard.

Hypothesis draws the operator, backend, dtype, operand layout (contiguous; transposed ``(B, L, H, d)`` buffers;
sliced: every other head of a wider buffer; expanded: stride 0 over the batch; batch-sliced: every other batch
entry), 1 to 8 query heads (MHA, GQA, MQA), d in {16, 32, 64, 80, 96, 128, 256}, P, lengths (M > N, M < N, M = 1),
causal or not, shared or per-sample prompts and sim_keys. Outputs are poisoned with NaN before the kernels write them;
the output and every gradient must meet ``e <= budget[dtype] + 2 e_pt`` (helpers.allowed_errors), and a dense ``q``'s
layout is the output's. Shapes stay small: the Triton kernels run interpreted on the CPU (about 2.5 minutes on 2
cores).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (TRITON_DEVICE, allowed_errors, exactly_zero_grads, oracle, rel_err, run_with_grads, Case)

LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "batch_sliced")
BACKENDS = {"excitor": ("reference", "torch", "triton", "sdpa", "sdpa_concat"),
            "adapter": ("reference", "torch", "triton", "sdpa")}


def _operand(shape, layout, dtype, device, gen):
    """A fresh random operand of ``shape`` in ``layout`` (a view of a larger or smaller buffer), as a leaf."""
    def randn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    if layout == "transposed" and len(shape) >= 3:
        t = randn(*shape[:-3], shape[-2], shape[-3], shape[-1]).transpose(-2, -3)
    elif layout == "sliced" and len(shape) >= 3:
        t = randn(*shape[:-3], 2 * shape[-3], *shape[-2:])[(slice(None),) * (len(shape) - 3) + (slice(None, None, 2),)]
    elif layout == "expanded" and len(shape) == 4:
        t = randn(1, *shape[1:]).expand(*shape)
    elif layout == "batch_sliced" and len(shape) == 4:
        t = randn(2 * shape[0], *shape[1:])[::2]
    else:
        t = randn(*shape)
    return t.detach().requires_grad_(True)  # detach keeps the strides


def _gate(Hq, layout, dtype, device, gen):
    g = torch.rand(2 * Hq, generator=gen) * 2 - 1
    if layout == "expanded":
        t = g[0].expand(Hq)              # one gate shared by every head, stride 0
    elif layout in ("sliced", "batch_sliced"):
        t = g[::2]
    else:
        t = g[:Hq]
    return t.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype).detach().requires_grad_(True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op,backend", [(op, b) for op, bs in BACKENDS.items() for b in bs])
# Random examples each run (hypothesis's own seed): every backend meets the standard on every draw, the one-query-head
# gate gradients included (docs/design.md, "The gate gradient's precision").
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
       hkv_groups=st.sampled_from([(1, 1), (2, 1), (1, 2), (1, 3), (2, 2), (1, 4), (4, 1), (2, 3), (1, 6), (2, 4),
                                   (8, 1), (1, 8)]),
       d=st.sampled_from([256, 16, 32, 64, 80, 96, 128]), P=st.sampled_from([1, 2, 3, 5, 10, 16, 64]),
       B=st.integers(1, 2), M=st.integers(1, 24), N=st.integers(1, 24), causal=st.booleans(),
       per_sample=st.booleans(), sim=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_backends_meet_the_standard(op, backend, layout, dtype, hkv_groups, d, P, B, M, N, causal, per_sample, sim,
                                    seed):
    Hkv, groups = hkv_groups
    if backend == "sdpa_concat" and groups == 1:
        groups = 2  # the rewrite concerns GQA; without it the backend is sdpa
    Hq = Hkv * groups
    device = "cpu" if backend in ("reference", "torch") else TRITON_DEVICE
    sim = sim and op == "excitor"
    gen = torch.Generator().manual_seed(seed)
    x = {"q": _operand((B, Hq, M, d), layout, dtype, device, gen),
         "k": _operand((B, Hkv, N, d), layout, dtype, device, gen),
         "v": _operand((B, Hkv, N, d), layout, dtype, device, gen),
         "prompt_keys": _operand(((B,) if per_sample else ()) + (Hkv, P, d), layout, dtype, device, gen),
         "gate": _gate(Hq, layout, dtype, device, gen)}
    if op == "adapter":
        x["prompt_values"] = _operand(tuple(x["prompt_keys"].shape), layout, dtype, device, gen)
    elif sim:
        x["sim_keys"] = _operand((B, Hkv, N, d), layout, dtype, device, gen)
    do = torch.randn(B, Hq, M, d, generator=gen).to(device=device, dtype=dtype)

    o, grads = run_with_grads(op, x, backend, causal, do)
    o_ref, grads_ref = oracle(op, x, causal, do)
    case = Case(B=B, Hq=Hq, Hkv=Hkv, M=M, N=N, d=d, P=P, causal=causal)
    zero = exactly_zero_grads(op, case)
    largest = max(g.norm().item() for g in grads_ref.values())
    allowed = allowed_errors(op, x, causal, do, o_ref, grads_ref, zero, largest)
    errors = {"o": rel_err(o, o_ref)}
    for name, g in grads.items():
        assert g.dtype == x[name].dtype and g.shape == x[name].shape, name
        errors[name] = rel_err(g, grads_ref[name], largest if name in zero else None)
    bad = {n: (f"{errors[n]:.2e}", f"allowed {allowed[n]:.2e}") for n in errors if not errors[n] <= allowed[n]}
    assert not bad, f"{backend} {op} {case} {dtype} {layout}: {bad}"
    assert o.dtype == dtype and o.shape == x["q"].shape
    if layout in ("contiguous", "transposed"):  # a dense q: the output has its strides
        assert o.stride() == x["q"].stride(), (o.stride(), x["q"].stride())
