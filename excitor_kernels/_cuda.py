"""The CUDA backend: the extension ``excitor_kernels._C`` (csrc/), built by setup.py when CUDA is present.

Importing ``_C`` registers the ops ``excitor_kernels_cuda::fwd`` and ``::bwd`` (csrc/binding.cpp); this module
adds their fake (meta) implementations and the autograd formula, and says which problems they support.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from . import _alloc
from ._validate import Problem

try:  # pragma: no cover - depends on the build
    from . import _C  # noqa: F401

    _IMPORT_ERROR = None
except ImportError as exc:
    _C = None
    _IMPORT_ERROR = exc

EXCITOR, ADAPTER = 1, 2  # EK_EXCITOR, EK_ADAPTER in csrc/excitor_attention.h
DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128)
MAX_PROMPTS = 64  # EK_MAX_PROMPTS
EXPERIMENTAL_ENV = "EXCITOR_CUDA_EXPERIMENTAL"


def unsupported_reason(op: str, p: Problem, *, explicit: bool = False) -> str | None:
    """Why the CUDA kernels cannot run ``op`` on ``p`` (None when they can)."""
    if _C is None:
        return "the CUDA extension excitor_kernels._C is not built (no CUDA toolkit or GPU torch at install time)"
    if p.varlen:
        return "the CUDA kernels take padded batches only (packed varlen sequences run on Triton)"
    if p.device.type != "cuda":
        return f"inputs are on {p.device.type}, the CUDA kernels need a CUDA device"
    if p.dtype not in DTYPES:
        return f"dtype {p.dtype} is not float16 or bfloat16"
    if p.head_dim not in HEAD_DIMS:
        return f"head dim {p.head_dim} is not one of {HEAD_DIMS}"
    if p.num_prompts > MAX_PROMPTS:
        return f"{p.num_prompts} prompts is more than the {MAX_PROMPTS} the CUDA kernels hold"
    if torch.cuda.get_device_capability(p.device) < (8, 0):
        return "the CUDA kernels need compute capability 8.0 or later (mma.sync bf16)"
    # The kernels were written and compiled without a GPU. They stay opt-in (also for backend="cuda" while
    # the dispatcher does not pass explicit=True) until csrc/gpu_check.py and the test suite with
    # backend="cuda" have passed on an H100/H200; then this check goes.
    if not explicit and os.environ.get(EXPERIMENTAL_ENV) != "1":
        return f"the CUDA kernels are not yet validated on a GPU (set {EXPERIMENTAL_ENV}=1 to use them)"
    return None


def _aligned(t: Tensor | None) -> Tensor | None:
    """``t`` itself when every row starts on 16 bytes (what the kernels' vector loads need), else a copy."""
    if t is None:
        return None
    ok = t.data_ptr() % 16 == 0 and all(
        st % 8 == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)
    return t if ok else t.clone(memory_format=torch.contiguous_format)


if _C is not None:  # pragma: no cover - needs the built extension
    _fwd_op = torch.ops.excitor_kernels_cuda.fwd
    _bwd_op = torch.ops.excitor_kernels_cuda.bwd

    @torch.library.register_fake("excitor_kernels_cuda::fwd")
    def _(q, k, v, pk, pv, gate, sim, causal, softmax_scale, prompt_scale, bypass, deterministic, poison):
        ke = torch.empty_like(k) if bypass == EXCITOR else k.new_empty(0)
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32), ke

    @torch.library.register_fake("excitor_kernels_cuda::bwd")
    def _(do, q, k, v, pk, pv, gate, sim, o, lse, ke, causal, softmax_scale, prompt_scale, bypass, deterministic,
          poison):
        dpv = torch.empty_like(pk) if bypass == ADAPTER else pk.new_empty(0)
        dsim = torch.empty_like(sim) if sim is not None else q.new_empty(0)
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(pk), dpv,
                torch.empty_like(gate), dsim)

    def _setup_context(ctx, inputs, output):
        q, k, v, pk, pv, gate, sim, causal, softmax_scale, prompt_scale, bypass, deterministic, poison = inputs
        o, lse, ke = output
        ctx.save_for_backward(q, k, v, pk, pv, gate, sim, o, lse, ke)
        ctx.args = (causal, softmax_scale, prompt_scale, bypass, deterministic, poison)

    def _backward(ctx, do, _dlse, _dke):
        q, k, v, pk, pv, gate, sim, o, lse, ke = ctx.saved_tensors
        dq, dk, dv, dpk, dpv, dgate, dsim = _bwd_op(_aligned(do), q, k, v, pk, pv, gate, sim, o, lse, ke,
                                                    *ctx.args)
        return (dq, dk, dv, dpk, dpv if pv is not None else None, dgate, dsim if sim is not None else None,
                None, None, None, None, None, None)

    torch.library.register_autograd("excitor_kernels_cuda::fwd", _backward, setup_context=_setup_context)


def excitor_attention(q, k, v, prompt_keys, gate, sim_keys, causal, softmax_scale, prompt_scale, deterministic):
    """SPEC.md excitor_attention on validated inputs; differentiable in every tensor input."""
    a = _aligned
    return _fwd_op(a(q), a(k), a(v), a(prompt_keys), None, gate, a(sim_keys), causal, softmax_scale, prompt_scale,
                   EXCITOR, bool(deterministic), _alloc._POISON)[0]


def adapter_attention(q, k, v, prompt_keys, prompt_values, gate, causal, softmax_scale, deterministic):
    """SPEC.md adapter_attention on validated inputs; differentiable in every tensor input."""
    a = _aligned
    return _fwd_op(a(q), a(k), a(v), a(prompt_keys), a(prompt_values), gate, None, causal, softmax_scale,
                   softmax_scale, ADAPTER, bool(deterministic), _alloc._POISON)[0]
