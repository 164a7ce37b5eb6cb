"""Non-finite inputs propagate as in ``scaled_dot_product_attention`` (docs/contract.md, "Non-finite inputs").

One NaN or +inf element goes into one input (q, k, v, sim_keys, prompt_keys, prompt_values or gate), for every
backend, forward (the training kernel and the no-grad decode kernel) and backward:

* the output must have NaN / +inf / -inf exactly where the float64 formula (the reference backend in float64)
  has them; for a NaN, those are the rows the contract names (a NaN in what a row sees makes the row NaN),
  SDPA (math backend, bottom-right causal mask) agrees on every row that sees a key, and an Excitor row that
  sees no key is 0;
* except on a row whose visible token scores are all -inf (an infinite key or query can make them so): the
  formula's softmax there is 0 / 0 = NaN and SDPA's is 0, and the contract accepts either (the pattern of the
  formula or of SDPA, row by row);
* each gradient must be non-finite when the formula's is, and only where the formula's or SDPA's is: where a
  NaN meets an exactly-zero weight (a key a row does not see) the two differ, and the contract leaves it open.

The case has rows that see no key (causal, M > N), GQA and two batch elements, so the tests also check that a
NaN stays inside its batch element, its key/value head group and the rows that see it. Non-finite keys and
values sit at key 0, which every row that sees any key sees.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import excitor_kernels
from excitor_kernels import _cuda
from excitor_kernels.reference import visible_keys
import test_varlen as tv
from helpers import BUDGET, TRITON_DEVICE, call, rel_err, run_with_grads

B, HQ, HKV, M, N, D, P = 2, 4, 2, 6, 4, 64, 3
EMPTY_ROWS = M - N                       # causal, bottom-right: rows 0 .. M-N-1 see no key
SPOT = dict(b=1, g=0, h=1, row=3, key=0, prompt=1, col=5)
HEADS_OF_G = (0, 1)                      # query heads of key/value head g = 0
OPERANDS = {"excitor": ("q", "k", "v", "sim_keys", "prompt_keys", "gate"),
            "adapter": ("q", "k", "v", "prompt_keys", "prompt_values", "gate")}


def _backends():
    why = "no CUDA device" if TRITON_DEVICE != "cuda" else _cuda.cannot_build()
    return ["reference", "torch", "triton", "sdpa", "sdpa_concat",
            pytest.param("cuda", marks=pytest.mark.skipif(why is not None, reason=f"the CUDA backend: {why}"))]


def _inputs(op: str, device, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    x = {"q": randn(B, HQ, M, D), "k": randn(B, HKV, N, D), "v": randn(B, HKV, N, D),
         "prompt_keys": randn(HKV, P, D)}
    if op == "excitor":
        x["sim_keys"] = randn(B, HKV, N, D)
    else:
        x["prompt_values"] = randn(HKV, P, D)
    x["gate"] = (torch.rand(HQ, generator=g, dtype=torch.float64) + 0.5).to(device=device, dtype=torch.float32)
    return x


def _poison(x: dict, name: str, value: float) -> None:
    s, t = SPOT, x[name]
    with torch.no_grad():
        if name == "q":
            t[s["b"], s["h"], s["row"], s["col"]] = value
        elif name in ("k", "v", "sim_keys"):
            t[s["b"], s["g"], s["key"], s["col"]] = value
        elif name in ("prompt_keys", "prompt_values"):
            t[s["g"], s["prompt"], s["col"]] = value
        else:
            t[s["h"]] = value


def _heads(t: torch.Tensor) -> torch.Tensor:
    """Key/value heads -> query heads."""
    return t.repeat_interleave(HQ // HKV, dim=-3)


def _token_keys(op: str, x: dict) -> torch.Tensor:
    """The keys the queries of each head meet, (B, HQ, N, D): k, or the Excitor's k + gate[h] a pk."""
    if op == "adapter":
        return _heads(x["k"])
    pk = x["prompt_keys"]
    a = torch.softmax(D ** -0.5 * (x["sim_keys"] @ pk.transpose(-1, -2)), dim=-1)
    return _heads(x["k"]) + x["gate"].view(1, HQ, 1, 1) * _heads(a @ pk)


def _sdpa_formula(op: str, x: dict, causal: bool):
    """The operator through SDPA's math backend (float64): reconstructed keys with torch ops, bottom-right causal
    mask. (Rows that see no key are not compared: SDPA gives them NaN when a value they do not see is NaN.)"""
    q, v, scale = x["q"], _heads(x["v"]), D ** -0.5
    mask = visible_keys(M, N, causal, device=q.device)
    with sdpa_kernel(SDPBackend.MATH):
        tokens = F.scaled_dot_product_attention(q, _token_keys(op, x), v, attn_mask=mask, scale=scale)
        if op == "excitor":
            return tokens
        pk, pv = (_heads(x[n]).expand(B, -1, -1, -1) for n in ("prompt_keys", "prompt_values"))
        return tokens + x["gate"].view(1, HQ, 1, 1) * F.scaled_dot_product_attention(q, pk, pv, scale=scale)


def _minus_inf_rows(op: str, x: dict) -> torch.Tensor:
    """(B, HQ, M) rows that see keys whose token scores (float64) are all -inf: the formula's softmax there is
    0 / 0 = NaN, SDPA's is 0 (its math and CPU kernels); docs/contract.md leaves the row to the implementation."""
    t = {n: v.detach().double().cpu() for n, v in x.items()}
    scores = t["q"] @ _token_keys(op, t).transpose(-1, -2)
    visible = visible_keys(M, N, True).cpu()
    return (visible.any(-1) & (scores.eq(float("-inf")) | ~visible).all(-1))


def _with_grads(fn, x: dict, do: torch.Tensor):
    """fn on float64 CPU copies of ``x`` and its gradients for ``do``: the oracles."""
    leaves = {n: t.detach().double().cpu().requires_grad_(True) for n, t in x.items()}
    o = fn(leaves)
    return o, dict(zip(leaves, torch.autograd.grad(o, list(leaves.values()), do.double().cpu())))


def _pattern(t: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 NaN, 2 +inf, 3 -inf, per element."""
    t = t.detach().cpu()
    return (torch.isnan(t).int() + 2 * torch.isposinf(t).int() + 3 * torch.isneginf(t).int())


def _nan_rows(op: str, name: str) -> torch.Tensor:
    """(B, HQ, M) the output rows the contract makes NaN for one NaN element in ``name``."""
    s, rows = SPOT, torch.zeros(B, HQ, M, dtype=torch.bool)
    sees_keys = torch.arange(M) >= EMPTY_ROWS
    every_row = torch.ones(M, dtype=torch.bool) if op == "adapter" else sees_keys  # prompts are seen by all
    if name == "q":
        rows[s["b"], s["h"], s["row"]] = True
    elif name in ("k", "v", "sim_keys"):
        rows[s["b"], list(HEADS_OF_G)] = sees_keys
    elif name in ("prompt_keys", "prompt_values"):
        rows[:, list(HEADS_OF_G)] = every_row
    else:
        rows[:, s["h"]] = every_row
    return rows


def _check(label: str, got: torch.Tensor, want: torch.Tensor, open_rows=None, alt=None) -> str | None:
    """None when ``got`` has NaN/+inf/-inf exactly where ``want`` has them (on the ``open_rows``, where ``alt``
    has them is as good), else what differs."""
    pg, pw = _pattern(got), _pattern(want)
    if open_rows is not None:
        as_alt = open_rows & (pg == _pattern(alt)).all(-1)
        pw = torch.where(as_alt[..., None], pg, pw)
    if torch.equal(pg, pw):
        return None
    where = (pg != pw).nonzero().tolist()
    kinds = ["finite", "nan", "+inf", "-inf"]
    detail = ", ".join(f"{tuple(i)}: {kinds[pg[tuple(i)]]} (expected {kinds[pw[tuple(i)]]})" for i in where[:3])
    return f"{label}: {len(where)} of {pw.numel()} elements differ, e.g. {detail}"


def _grads_outside(label: str, got: torch.Tensor, formula: torch.Tensor, sdpa: torch.Tensor) -> str | None:
    """None when ``got`` is non-finite only where the formula or SDPA is, and somewhere when the formula is.

    Exactly which gradient elements a non-finite input reaches is left to each implementation where a NaN
    meets a zero weight (a masked score, a key a row does not see): there the formula (masked before its
    softmax) and SDPA (-inf added to the scores) differ from each other and from the exact answer."""
    bad, f_bad, s_bad = (~torch.isfinite(t.detach().cpu()) for t in (got, formula, sdpa))
    extra = bad & ~(f_bad | s_bad)
    if extra.any():
        return (f"{label}: {int(extra.sum())} of {bad.numel()} elements non-finite where the formula and SDPA are "
                f"finite, e.g. {extra.nonzero()[:2].tolist()}")
    if f_bad.any() and not bad.any():
        return f"{label}: finite where the formula has {int(f_bad.sum())} non-finite elements"
    return None


def _cases():
    for op, names in OPERANDS.items():
        for name in names:
            for backend in _backends():
                if op == "adapter" and backend == "sdpa_concat":
                    continue  # the rewrite of the Excitor keys only
                for value, vid in ((float("nan"), "nan"), (float("inf"), "inf")):
                    marks = list(getattr(backend, "marks", ()))
                    backend_name = getattr(backend, "values", (backend,))[0]
                    yield pytest.param(op, name, backend_name, value, marks=marks,
                                       id=f"{op}-{name}-{backend_name}-{vid}")


@pytest.mark.parametrize("op,name,backend,value", list(_cases()))
def test_non_finite_input_propagates(op, name, backend, value):
    """The output has NaN/+inf/-inf exactly where the float64 formula has them (a NaN: in the rows the
    contract names, which are SDPA's among the rows that see a key; a row that sees no key: 0); a gradient
    is non-finite when the formula's is, and only where the formula's or SDPA's is."""
    device = "cpu" if backend in ("reference", "torch") else TRITON_DEVICE
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32  # the CUDA kernels take fp16/bf16 only
    x = _inputs(op, device, dtype)
    _poison(x, name, value)
    do = torch.randn(B, HQ, M, D, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    o_ref, grads_ref = _with_grads(lambda t: call(op, t, "reference", True), x, do)
    o_sdpa, grads_sdpa = _with_grads(lambda t: _sdpa_formula(op, t, True), x, do)
    if value != value:
        rows = _nan_rows(op, name)
        assert torch.equal(torch.isnan(o_ref).any(-1), rows)
        if name not in ("v", "prompt_values"):  # a NaN value element reaches its own column only
            assert torch.equal(torch.isnan(o_ref).all(-1), rows)
        sees = slice(EMPTY_ROWS, None)
        assert _check("o: SDPA vs float64 formula", o_sdpa[..., sees, :], o_ref[..., sees, :]) is None
    if op == "excitor":  # rows that see no key: 0 because they see nothing, whatever the inputs hold
        assert bool((o_ref[..., :EMPTY_ROWS, :] == 0).all())

    leaves = {n: t.detach().requires_grad_(True) for n, t in x.items()}
    o, grads = run_with_grads(op, leaves, backend, True, do)
    with torch.no_grad():  # no gradient and M <= 16: the fused backends take the split-KV decode kernel
        o_decode = call(op, x, backend, True)
    open_rows = _minus_inf_rows(op, x)
    sdpa_differs = (_pattern(o_sdpa) != _pattern(o_ref)).any(-1) & (torch.arange(M) >= EMPTY_ROWS)
    assert not (sdpa_differs & ~open_rows).any(), "SDPA and the formula differ outside the rows left open"
    problems = [_check("o", o, o_ref, open_rows, o_sdpa),
                _check("o (no-grad call)", o_decode, o_ref, open_rows, o_sdpa)]
    problems += [_grads_outside(f"d{n}", g, grads_ref[n], grads_sdpa[n]) for n, g in grads.items()]
    problems = [p for p in problems if p]
    assert not problems, f"{backend} {op}, {value} in {name}:\n" + "\n".join(problems)

    finite = torch.isfinite(o_ref)
    err = (o.double().cpu()[finite] - o_ref[finite]).norm() / o_ref[finite].norm()
    assert err <= BUDGET[dtype], f"finite part of o: relative error {err:.2e}"


def _token_gradient_cases():
    for backend in _backends():
        name = getattr(backend, "values", (backend,))[0]
        if name in ("triton", "sdpa", "cuda"):
            yield pytest.param("padded", name, marks=getattr(backend, "marks", ()), id=f"padded-{name}")
    yield pytest.param("varlen", "triton", id="varlen-triton")


@pytest.mark.parametrize("layout,backend", list(_token_gradient_cases()))
@pytest.mark.parametrize("poison", ["prompt_values-nan", "gate-inf"])
def test_adapter_token_gradients_stay_exact_when_the_prompt_term_is_not(layout, backend, poison):
    """A NaN or Inf in the Adapter's prompts or gate makes the gated prompt term of the rows that see it
    non-finite, but not the token attention: dk and dv must still match the float64 formula (the fused delta
    pre-passes recompute the token output of such rows instead of taking o - gate op)."""
    name, value = poison.split("-")
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32  # the CUDA kernels take fp16/bf16 only
    if layout == "padded":
        x = _inputs("adapter", TRITON_DEVICE, dtype)
        do = torch.randn(B, HQ, M, D, generator=torch.Generator().manual_seed(1)).to(TRITON_DEVICE, dtype)
        _poison(x, name, float(value))
        o_ref, grads_ref = _with_grads(lambda t: call("adapter", t, "reference", True), x, do)
        _, grads = run_with_grads("adapter", {n: t.detach().requires_grad_(True) for n, t in x.items()}, backend,
                                  True, do)
    else:
        c = tv.VarlenCase(lq=(5, 0, 33, 1, 2), lk=(9, 3, 70, 1, 0), Hq=4, Hkv=2, P=3, per_sequence=True)
        x = {n: t.detach() for n, t in tv.make_inputs(c, "adapter", dtype, TRITON_DEVICE).items()}
        do = torch.randn_like(x["q"])
        with torch.no_grad():
            x[name][(2, 0, 1, 5) if name != "gate" else (1,)] = float(value)
        o_ref, grads_ref = tv.oracle("adapter", x, c, do)
        leaves = {n: t.detach().requires_grad_(True) for n, t in x.items()}
        with excitor_kernels.poisoned_outputs():
            o = tv.call_varlen("adapter", leaves, c, backend)
            grads = dict(zip(leaves, torch.autograd.grad(o, list(leaves.values()), do)))
    assert not torch.isfinite(o_ref).all(), "the poisoned input must make some output rows non-finite"
    for n in ("k", "v"):
        assert torch.isfinite(grads_ref[n]).all()
        err = (grads[n].double().cpu() - grads_ref[n].cpu()).norm() / grads_ref[n].norm()
        assert err <= BUDGET[dtype], f"d{n}: relative error {err:.2e}"


@pytest.mark.parametrize("op,backend", [(op, b) for op in ("excitor", "adapter") for b in _backends()
                                        if getattr(b, "values", (b,))[0] != "cuda"
                                        and not (op == "adapter" and b == "sdpa_concat")])  # Excitor-only
def test_nan_in_a_late_key_reaches_only_the_rows_that_see_it(backend, op):
    """A NaN in the last key (causal, M = N): only the last query row sees it, so only that row of its head goes NaN
    and every other row matches the formula. SDPA's math kernel adds the mask to the scores and makes every row of
    the head NaN; the sdpa and torch backends take an exact path off CUDA when an operand is not finite
    (docs/contract.md, "Non-finite inputs"). (A NaN value of a key a row does not see meets a weight of exactly 0
    there; whether 0 x NaN reaches the row is left to the implementation, as among SDPA's kernels.)"""
    device = "cpu" if backend in ("reference", "torch") else TRITON_DEVICE
    g = torch.Generator().manual_seed(2)
    L, heads = 9, 2
    x = {n: torch.randn(1, heads, L, 16, generator=g).to(device) for n in ("q", "k", "v")}
    x["prompt_keys"] = torch.randn(heads, 3, 16, generator=g).to(device)
    x["prompt_values"] = torch.randn(heads, 3, 16, generator=g).to(device)
    x["gate"] = torch.rand(heads, generator=g).to(device) + 0.5
    if op == "excitor":
        del x["prompt_values"]
    x["k"][0, 1, L - 1, 3] = float("nan")
    with excitor_kernels.poisoned_outputs():
        o = call(op, x, backend, True)
    o_ref = call(op, {n: t.double().cpu() for n, t in x.items()}, "reference", True)
    nan_rows = torch.isnan(o.cpu()).any(-1)
    assert torch.equal(nan_rows, torch.isnan(o_ref).any(-1))
    assert nan_rows[0, 1, L - 1] and int(nan_rows.sum()) == 1
    finite = ~nan_rows
    assert rel_err(o.cpu()[finite], o_ref[finite]) <= BUDGET[torch.float32]


@pytest.mark.parametrize("op", ["excitor", "adapter"])
def test_torch_backend_under_compile_shows_a_nan(op):
    """Under torch.compile the torch backend cannot branch on values (the exact path): a NaN operand then makes the
    whole output NaN instead of the contract's rows, never a finite output (docs/contract.md, "Non-finite inputs")."""
    x = _inputs(op, "cpu")
    x["k"][1, 0, 2, 5] = float("nan")

    def step(t):
        return call(op, t, "torch", True)

    o = torch.compile(step, backend="aot_eager", fullgraph=True)(x)
    assert torch.isnan(o).all()
    assert torch.isnan(step(x)).any() and not torch.isnan(step(x)).all()  # eager: the rows that see it
