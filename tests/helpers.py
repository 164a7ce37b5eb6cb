"""Shared helpers for the operator tests: random inputs, the float64 oracle and the error budgets."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import excitor_kernels
from excitor_kernels import adapter_attention, excitor_attention
from excitor_kernels.reference import ERROR_BUDGET

# Triton runs either interpreted (TRITON_INTERPRET=1, read when the kernels are decorated) or compiled, never
# both in one process: without a GPU the tests run on the CPU, interpreted (conftest.py sets it); with a GPU
# they run on CUDA, compiled, and `TRITON_INTERPRET=1 python -m pytest tests` runs the CPU half there.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = ["cpu"] if INTERPRETED or not torch.cuda.is_available() else ["cuda"]
TRITON_DEVICE = DEVICES[0]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# docs/contract.md's budgets (||out - ref|| / ||ref|| against a float64 evaluation of the formulas); float64 inputs
# (the reference backend) agree to rounding
BUDGET = {**ERROR_BUDGET, torch.float64: 1e-10}


@dataclasses.dataclass(frozen=True)
class Case:
    B: int = 1
    Hq: int = 2
    Hkv: int = 1
    M: int = 33
    N: int = 33
    d: int = 64
    P: int = 4
    causal: bool = True
    per_sample: bool = False
    sim: bool = False
    transposed: bool = False  # q/k/v as (B, L, H, d) buffers viewed as (B, H, L, d)

    def __str__(self):
        flags = "".join(f"-{n}" for n in ("per_sample", "sim", "transposed") if getattr(self, n))
        return (f"B{self.B}-H{self.Hq}/{self.Hkv}-M{self.M}-N{self.N}-d{self.d}-P{self.P}"
                f"-{'causal' if self.causal else 'full'}{flags}")


def _heads(B, H, L, d, dtype, device, transposed):
    if transposed:
        return torch.randn(B, L, H, d, dtype=dtype, device=device).transpose(1, 2)
    return torch.randn(B, H, L, d, dtype=dtype, device=device)


def make_inputs(case: Case, op: str, dtype, device, gate_scale: float = 1.0) -> dict:
    """Fresh random operands (never zeros) for ``op`` ("excitor" or "adapter"), leaves requiring grad."""
    c = case
    x = {
        "q": _heads(c.B, c.Hq, c.M, c.d, dtype, device, c.transposed),
        "k": _heads(c.B, c.Hkv, c.N, c.d, dtype, device, c.transposed),
        "v": _heads(c.B, c.Hkv, c.N, c.d, dtype, device, c.transposed),
        "prompt_keys": torch.randn(*((c.B,) if c.per_sample else ()), c.Hkv, c.P, c.d, dtype=dtype, device=device),
        # float32 gates for the training dtypes, as modules keep them; float64 for the float64 checks
        "gate": (torch.rand(c.Hq, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
                 * 2 - 1) * gate_scale,
    }
    if op == "adapter":
        x["prompt_values"] = torch.randn_like(x["prompt_keys"])
    elif c.sim:
        x["sim_keys"] = torch.randn(c.B, c.Hkv, c.N, c.d, dtype=dtype, device=device)
    for t in x.values():
        t.requires_grad_(True)
    return x


def call(op: str, x: dict, backend: str, causal: bool, **kw):
    if op == "excitor":
        return excitor_attention(x["q"], x["k"], x["v"], x["prompt_keys"], x["gate"], sim_keys=x.get("sim_keys"),
                                 causal=causal, backend=backend, **kw)
    return adapter_attention(x["q"], x["k"], x["v"], x["prompt_keys"], x["prompt_values"], x["gate"],
                             causal=causal, backend=backend, **kw)


def run_with_grads(op: str, x: dict, backend: str, causal: bool, do: torch.Tensor, **kw):
    """(o, {name: grad}) with every kernel output poisoned with NaN before the kernels write it."""
    with excitor_kernels.poisoned_outputs():
        o = call(op, x, backend, causal, **kw)
        grads = torch.autograd.grad(o, list(x.values()), do)
    return o, dict(zip(x.keys(), grads))


def oracle(op: str, x: dict, causal: bool, do: torch.Tensor | None):
    """The float64 evaluation of docs/contract.md's formulas (reference backend on float64 copies) and its grads
    for output gradient ``do`` (``do=None``: the output alone, grads None)."""
    x64 = {n: t.detach().double().requires_grad_(do is not None) for n, t in x.items()}
    o = call(op, x64, "reference", causal)
    if do is None:
        return o, None
    grads = torch.autograd.grad(o, list(x64.values()), do.double())
    return o, dict(zip(x64.keys(), grads))


def in_dtype(op: str, x: dict, causal: bool, do: torch.Tensor):
    """The same formulas evaluated by PyTorch in the input dtype (the reference with ``compute_dtype`` the input
    dtype, the gate cast to it, autograd in it) and its grads: the comparison of docs/contract.md's standard."""
    from excitor_kernels.reference import adapter_attention_reference, excitor_attention_reference

    xd = {n: t.detach().clone().requires_grad_(True) for n, t in x.items()}
    dtype, scale = x["q"].dtype, x["q"].shape[-1] ** -0.5
    if op == "excitor":
        o = excitor_attention_reference(xd["q"], xd["k"], xd["v"], xd["prompt_keys"], xd["gate"],
                                        sim_keys=xd.get("sim_keys"), causal=causal, softmax_scale=scale,
                                        prompt_scale=scale, compute_dtype=dtype)
    else:
        o = adapter_attention_reference(xd["q"], xd["k"], xd["v"], xd["prompt_keys"], xd["prompt_values"], xd["gate"],
                                        causal=causal, softmax_scale=scale, compute_dtype=dtype)
    return o, dict(zip(xd.keys(), torch.autograd.grad(o, list(xd.values()), do)))


def allowed_errors(op: str, x: dict, causal: bool, do: torch.Tensor, ref_o, ref_grads, zero=(), largest=None) -> dict:
    """docs/contract.md's standard, per output and gradient: ``budget[dtype] + 2 * e_pt``, where ``e_pt`` is the error
    of :func:`in_dtype` against the float64 oracle (``ref_o``, ``ref_grads``), measured like the backend's (the
    gradients in ``zero``, exactly zero in exact arithmetic, against ``largest``)."""
    budget = BUDGET[x["q"].dtype]
    o_pt, grads_pt = in_dtype(op, x, causal, do)
    allowed = {"o": budget + 2 * rel_err(o_pt, ref_o, allow_nan=True)}
    for name, g in grads_pt.items():
        allowed[name] = budget + 2 * rel_err(g, ref_grads[name], largest if name in zero else None, allow_nan=True)
    return allowed


def check_beside_rounding(op: str, x: dict, backend: str, causal: bool, do: torch.Tensor) -> None:
    """For inputs whose exact gradients are below float16's normal range or far from 1 (tiny gates, huge prompts):
    the output and every gradient within the dtype's budget of the best any backend can return, the float64 value
    rounded to the tensor's dtype: ``e(X) <= budget + e(round(X64))``."""
    o, grads = run_with_grads(op, x, backend, causal, do)
    o_ref, grads_ref = oracle(op, x, causal, do)
    budget = BUDGET[x["q"].dtype]
    bad = {}
    for name, out, ref in [("o", o, o_ref), *((n, g, grads_ref[n]) for n, g in grads.items())]:
        error, rounding = rel_err(out, ref), rel_err(ref.to(out.dtype), ref)
        if not error <= budget + rounding:
            bad[name] = (error, rounding)
    assert not bad, f"errors over budget + the exact value's own rounding (error, rounding): {bad}"


def rel_err(out: torch.Tensor, ref: torch.Tensor, scale: float | None = None, allow_nan: bool = False) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if allow_nan and not torch.isfinite(out).all():  # an in-dtype comparison that overflowed allows nothing more
        return 0.0
    assert not torch.isnan(out).any(), "NaN in output (an element the kernel never wrote, or a NaN it made)"
    denom = ref.norm().item() if scale is None else scale
    return (out.double() - ref.to(out.device)).norm().item() / denom


def exactly_zero_grads(op: str, case: Case) -> set:
    """Gradients that vanish in exact arithmetic, where a relative error is meaningless.

    One key (N == 1): every softmax row is constant, so nothing that only moves scores gets a gradient.
    One prompt (P == 1): the prompt softmax is constant; the Excitor bypass then shifts each score row
    by a constant, which its softmax cannot see.
    """
    zero = set()
    if op == "excitor":
        if case.N == 1:
            zero |= {"q", "k", "gate", "prompt_keys", "sim_keys"}
        if case.P == 1:
            zero |= {"gate", "prompt_keys", "sim_keys"}
    else:
        if case.N == 1:
            zero.add("k")
        if case.P == 1:
            zero.add("prompt_keys")
        if case.N == 1 and case.P == 1:
            zero.add("q")
    return zero


def check_against_oracle(op: str, case: Case, dtype, device, backend="triton", **kw):
    """Forward and every gradient of ``backend`` within docs/contract.md's budget of the float64 oracle."""
    x = make_inputs(case, op, dtype, device)
    do = torch.randn(case.B, case.Hq, case.M, case.d, dtype=dtype, device=device)
    o, grads = run_with_grads(op, x, backend, case.causal, do, **kw)
    o_ref, grads_ref = oracle(op, x, case.causal, do)
    assert o.dtype == dtype and o.shape == x["q"].shape
    budget = BUDGET[dtype]
    errors = {"o": rel_err(o, o_ref)}
    zero = exactly_zero_grads(op, case)
    largest = max(g.norm().item() for g in grads_ref.values())
    for name, g in grads.items():
        assert g.dtype == x[name].dtype, name
        # A gradient that is zero in exact arithmetic is measured against the call's largest gradient.
        errors[name] = rel_err(g, grads_ref[name], largest if name in zero else None)
    bad = {n: e for n, e in errors.items() if not e <= budget}
    assert not bad, f"{case} {dtype}: errors over the {budget:g} budget: {bad} (all: {errors})"
    return errors


def param_cases(cases):
    return pytest.mark.parametrize("case", cases, ids=[str(c) for c in cases])


# The support grid: MHA/GQA/MQA, causal and not, M < N, M == 1, M > N (rows that see no key), lengths
# that are no multiple of any block, P in {1, 2, 16, 64}, shared and per-sample prompts, sim_keys,
# d 64 and 128, transposed (B, L, H, d) views.
# bf16 gate gradients are sums with heavy cancellation; at least 4 heads keep the norm of the (Hq,)
# error vector out of the tail where one near-zero entry dominates.
SUPPORT_GRID = [
    Case(B=2, Hq=4, Hkv=4, M=37, N=37, d=64, P=16),
    Case(B=1, Hq=4, Hkv=2, M=19, N=53, d=64, P=2),
    Case(B=1, Hq=4, Hkv=1, M=40, N=40, d=64, P=64, causal=False),
    Case(B=2, Hq=2, Hkv=1, M=1, N=45, d=64, P=1),
    Case(B=1, Hq=4, Hkv=1, M=50, N=20, d=64, P=16),
    Case(B=2, Hq=4, Hkv=2, M=33, N=70, d=128, P=16, per_sample=True, sim=True),
    Case(B=2, Hq=4, Hkv=2, M=29, N=29, d=64, P=2, transposed=True, sim=True),
    Case(B=1, Hq=4, Hkv=1, M=17, N=31, d=128, P=64, causal=False, per_sample=True),
]


FUSED_BACKENDS = {"excitor": ("triton", "sdpa", "sdpa_concat", "torch"), "adapter": ("triton", "sdpa", "torch")}


def fused_params(op: str, cases: list) -> list:
    """(backend, case) pairs of the fused backends of ``op`` on ``cases``; ``sdpa_concat`` only where it differs
    from ``sdpa`` (GQA/MQA cases)."""
    return [pytest.param(backend, case, id=f"{backend}-{case}") for backend in FUSED_BACKENDS[op] for case in cases
            if backend != "sdpa_concat" or case.Hq != case.Hkv]


def support_grid_tests(op: str, grid: list, reference_cases: list):
    """The two grid tests of an operator's test module: every fused backend on every case of ``grid`` and the
    reference backend on ``reference_cases``, each in every dtype and on every device, against the oracle."""
    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("backend, case", fused_params(op, grid))
    def test_fused_matches_float64(backend, case, dtype, device):
        check_against_oracle(op, case, dtype, device, backend=backend)

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @param_cases(reference_cases)
    def test_reference_backend_matches_float64(case, dtype, device):
        check_against_oracle(op, case, dtype, device, backend="reference")

    return test_fused_matches_float64, test_reference_backend_matches_float64
