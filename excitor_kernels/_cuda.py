"""The CUDA backend: the extension built from csrc/, its fake (meta) implementations and autograd formula.

The extension registers the ops ``excitor_kernels_cuda::fwd`` and ``::bwd`` (csrc/binding.cpp). It is built just
in time by the first call that runs ``backend="cuda"`` (ninja, cached per torch/CUDA/architecture; see
:mod:`excitor_kernels._cuda_build`), or ahead of time into ``excitor_kernels._C`` for a wheel
(``EXCITOR_BUILD_CUDA=1``), which is then used instead. This module also says which problems the kernels
support (docs/contract.md, "Backends").
"""
from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from . import _alloc, _cuda_build
from ._validate import Problem

try:  # pragma: no cover - depends on the build
    from . import _C  # built ahead of time (EXCITOR_BUILD_CUDA=1 at install)
except ImportError:
    _C = None

EXCITOR, ADAPTER = 1, 2  # EK_EXCITOR, EK_ADAPTER in csrc/excitor_attention.h
DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128)
MAX_PROMPTS = 64  # EK_MAX_PROMPTS
EXPERIMENTAL_ENV = "EXCITOR_CUDA_EXPERIMENTAL"


@functools.lru_cache(maxsize=None)
def cannot_build() -> str | None:
    """Why the extension is neither built ahead of time nor buildable here (None when it is one of them)."""
    return None if _C is not None else _cuda_build.missing()


def status() -> str:
    """One phrase for reports: how the extension is (or would be) obtained on this machine."""
    if _C is not None:
        return "built ahead of time (excitor_kernels._C)"
    why = cannot_build()
    if why is not None:
        return f"cannot be built here: {why}"
    lib = _cuda_build.cached()
    return f"cached at {lib}" if lib else "not built yet: compiled with ninja on first use of backend='cuda'"


def unsupported_reason(op: str, p: Problem, *, explicit: bool = False) -> str | None:
    """Why the CUDA kernels cannot run ``op`` on ``p`` (None when they can)."""
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
    if cannot_build() is not None:
        return f"the CUDA extension cannot be built: {cannot_build()}"
    # The kernels were written and compiled without a GPU: backend="auto" takes them only when opted in, until
    # csrc/gpu_check.py and the test suite with backend="cuda" have passed on an H100/H200; then this check
    # goes. backend="cuda" (explicit) runs them.
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


_ops = None


def _load():
    """The ``(fwd, bwd)`` ops, building or loading the extension on first use and registering their fake
    implementations and autograd once."""
    global _ops
    if _ops is None:  # pragma: no cover - needs a GPU
        if _C is None:
            _cuda_build.build()
        _register()
        _ops = (torch.ops.excitor_kernels_cuda.fwd, torch.ops.excitor_kernels_cuda.bwd)
    return _ops


def _register():  # pragma: no cover - needs the built extension
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
        dq, dk, dv, dpk, dpv, dgate, dsim = torch.ops.excitor_kernels_cuda.bwd(
            _aligned(do), q, k, v, pk, pv, gate, sim, o, lse, ke, *ctx.args)
        if ctx.args[3] == EXCITOR:
            # the gate gradient from float32-grade terms (docs/design.md, "The gate gradient's precision"): the
            # CUDA kernels' sum over dk' has the rounding tail the Triton pass does not
            from .ops import _triton_attention as tri

            dgate = tri.excitor_gate_gradient(do, q, k, v, pk, gate, sim, *ctx.args[:3])
        return (dq, dk, dv, dpk, dpv if pv is not None else None, dgate, dsim if sim is not None else None,
                None, None, None, None, None, None)

    torch.library.register_autograd("excitor_kernels_cuda::fwd", _backward, setup_context=_setup_context)


def excitor_attention(q, k, v, prompt_keys, gate, sim_keys, causal, softmax_scale, prompt_scale, deterministic):
    """docs/contract.md excitor_attention on validated inputs; differentiable in every tensor input."""
    a = _aligned
    return _load()[0](a(q), a(k), a(v), a(prompt_keys), None, gate, a(sim_keys), causal, softmax_scale, prompt_scale,
                   EXCITOR, bool(deterministic), _alloc._POISON)[0]


def adapter_attention(q, k, v, prompt_keys, prompt_values, gate, causal, softmax_scale, deterministic):
    """docs/contract.md adapter_attention on validated inputs; differentiable in every tensor input."""
    a = _aligned
    return _load()[0](a(q), a(k), a(v), a(prompt_keys), a(prompt_values), gate, None, causal, softmax_scale,
                   softmax_scale, ADAPTER, bool(deterministic), _alloc._POISON)[0]
