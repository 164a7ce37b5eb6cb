"""adapter_attention: every backend against the float64 evaluation of docs/contract.md, plus its contract."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from excitor_kernels import adapter_attention
from helpers import (BUDGET, DEVICES, FUSED_BACKENDS, SUPPORT_GRID, TRITON_DEVICE, Case, check_against_oracle,
                     check_beside_rounding, make_inputs, oracle, rel_err, run_with_grads, support_grid_tests)

OP = "adapter"

# The same support grid as excitor_attention (sim_keys does not exist for this operator).
GRID = [dataclasses.replace(c, sim=False) for c in SUPPORT_GRID]

test_fused_matches_float64, test_reference_backend_matches_float64 = support_grid_tests(OP, GRID, GRID[:2])


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 2), Hkv=st.integers(1, 2), groups=st.sampled_from([1, 2, 3]), M=st.integers(1, 70),
    N=st.integers(1, 70), d=st.sampled_from([16, 32, 64, 128, 40]), P=st.integers(1, 64), causal=st.booleans(),
    per_sample=st.booleans(), transposed=st.booleans(), backend=st.sampled_from(FUSED_BACKENDS[OP]),
)
def test_random_shapes(device, B, Hkv, groups, M, N, d, P, causal, per_sample, transposed, backend):
    case = Case(B=B, Hq=Hkv * groups, Hkv=Hkv, M=M, N=N, d=d, P=P, causal=causal, per_sample=per_sample,
                transposed=transposed)
    check_against_oracle(OP, case, torch.float32, device, backend=backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS[OP])
def test_official_llama_adapter_formula(device, backend):
    """LLaMA-Adapter's own formulation, written out: softmax over token scores plus tanh(g) times a
    separate softmax over prompt scores (prompts shared by all queries, no position)."""
    case = Case(B=2, Hq=4, Hkv=4, M=21, N=21, P=10)
    x = make_inputs(case, OP, torch.float32, device)
    raw_gate = torch.randn(case.Hq, device=device)
    o = adapter_attention(x["q"], x["k"], x["v"], x["prompt_keys"], x["prompt_values"], torch.tanh(raw_gate),
                          backend=backend)
    q, k, v = (x[n].detach().double() for n in "qkv")
    pk, pv = x["prompt_keys"].detach().double(), x["prompt_values"].detach().double()
    scale = case.d ** -0.5
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores + torch.full((case.M, case.N), float("-inf"), device=device).triu(1).double()
    prompt_scores = torch.einsum("bhmd,hpd->bhmp", q, pk) * scale
    expected = (torch.softmax(scores, -1) @ v
                + torch.tanh(raw_gate).double().view(1, -1, 1, 1)
                * torch.einsum("bhmp,hpd->bhmd", torch.softmax(prompt_scores, -1), pv))
    assert rel_err(o, expected) <= BUDGET[torch.float32]


@pytest.mark.parametrize("backend", FUSED_BACKENDS[OP])
def test_tiny_gates_in_float16(backend):
    """Gates of 1e-6 (LLaMA-Adapter's gates start at 0): the prompts' exact gradients are ~1e-5, float16's
    subnormal range. The gate multiplies the float32 products, never a rounded operand
    (prompt_attention_backward), so the returned gradients are the float32 results rounded once (before: 2.5x their
    rounding floor)."""
    case = Case(B=2, Hq=4, Hkv=2, M=40, N=40, d=64, P=8)
    x = make_inputs(case, OP, torch.float16, TRITON_DEVICE, gate_scale=1e-6)
    do = torch.randn(case.B, case.Hq, case.M, case.d, dtype=torch.float16, device=TRITON_DEVICE)
    check_beside_rounding(OP, x, backend, case.causal, do)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS[OP])
def test_deterministic_backward_is_bitwise_repeatable(device, backend, deterministic_torch):
    case = Case(B=2, Hq=4, Hkv=2, M=45, N=40, P=16)
    x = make_inputs(case, OP, torch.float32, device)
    do = torch.randn(case.B, case.Hq, case.M, case.d, device=device)
    _, g1 = run_with_grads(OP, x, backend, True, do, deterministic=True)
    _, g2 = run_with_grads(OP, x, backend, True, do, deterministic=True)
    _, g_ref = oracle(OP, x, True, do)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name
        assert rel_err(g1[name], g_ref[name]) <= BUDGET[torch.float32], name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend, M", [("triton", 16), ("sdpa", 16), ("sdpa", 7), ("sdpa", 23), ("torch", 16), ("torch", 7)])
def test_torch_compile_traces_without_graph_break(device, backend, M):
    x = make_inputs(Case(M=M, N=16, P=4), OP, torch.float32, device)

    def step(*args):
        return (adapter_attention(*args, backend=backend) ** 2).sum()

    args = [x[n] for n in ("q", "k", "v", "prompt_keys", "prompt_values", "gate")]
    loss = torch.compile(step, backend="aot_eager", fullgraph=True)(*args)
    grads = torch.autograd.grad(loss, args)
    grads_eager = torch.autograd.grad(step(*args), args)
    for g, ge in zip(grads, grads_eager):
        torch.testing.assert_close(g, ge)


def _good():
    B, Hq, Hkv, M, N, d, P = 2, 4, 2, 6, 8, 16, 3
    return dict(q=torch.randn(B, Hq, M, d), k=torch.randn(B, Hkv, N, d), v=torch.randn(B, Hkv, N, d),
                prompt_keys=torch.randn(Hkv, P, d), prompt_values=torch.randn(Hkv, P, d), gate=torch.randn(Hq))


BAD = [
    ("values shape", lambda a: a.update(prompt_values=torch.randn(2, 4, 16)), ValueError,
     "prompt_values must have prompt_keys' shape"),
    ("values dtype", lambda a: a.update(prompt_values=a["prompt_values"].half()), TypeError,
     "prompt_values must have q's dtype"),
    ("values type", lambda a: a.update(prompt_values=None), TypeError, "prompt_values must be a torch.Tensor"),
    ("empty prompts", lambda a: a.update(prompt_keys=torch.randn(2, 0, 16), prompt_values=torch.randn(2, 0, 16)),
     ValueError, "at least one prompt"),
    ("heads", lambda a: a.update(gate=torch.randn(5)), ValueError, r"gate must have shape \(Hq=4,\)"),
    ("stride", lambda a: a.update(k=torch.randn(2, 2, 16, 8).transpose(-1, -2)), ValueError,
     "k must have unit stride on its last"),
    ("backend", lambda a: a.update(backend="triton", q=a["q"].double(), k=a["k"].double(), v=a["v"].double(),
                                   prompt_keys=a["prompt_keys"].double(), prompt_values=a["prompt_values"].double()),
     ValueError, "backend='triton' cannot run adapter_attention"),
    ("sdpa_concat", lambda a: a.update(backend="sdpa_concat"), ValueError,
     "backend='sdpa_concat' cannot run adapter_attention.*adapter_attention takes 'sdpa'"),
]


@pytest.mark.parametrize("mutate, exc, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_clear_error(mutate, exc, match):
    args = _good()
    mutate(args)
    pos = [args.pop(n) for n in ("q", "k", "v", "prompt_keys", "prompt_values", "gate")]
    with pytest.raises(exc, match=match):
        adapter_attention(*pos, **args)


def test_sdpa_custom_ops_pass_opcheck():
    """torch.library.opcheck on the sdpa backend's Adapter prompt op: schema, fake implementation, autograd."""
    case = Case(B=2, Hq=4, Hkv=2, M=9, N=9, P=3, per_sample=True)
    x = make_inputs(case, OP, torch.float32, DEVICES[0])
    o_tokens = torch.randn_like(x["q"]).requires_grad_(True)
    args = (o_tokens, x["q"], x["prompt_keys"], x["prompt_values"], x["gate"], 0.125, False)
    torch.library.opcheck(torch.ops.excitor_kernels.sdpa_adapter_prompts, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
