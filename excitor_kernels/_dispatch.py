"""The one place that turns ``backend=`` into an implementation.

``"reference"`` always runs. ``"triton"`` and ``"cuda"`` run when they support the inputs and raise a
``ValueError`` that says why when they do not. ``"auto"`` takes the first of cuda, triton that supports
the inputs and otherwise falls back to the reference backend, warning once per distinct reason.
"""
from __future__ import annotations

import os
import warnings

import torch

from ._validate import Problem

BACKENDS = ("auto", "reference", "triton", "cuda")
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256
MAX_FUSED_PROMPTS = 64

_warned: set = set()


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unsupported(op: str, p: Problem, *, explicit: bool) -> str | None:
    """Why the Triton backend cannot run ``p`` (None when it can)."""
    if not _triton_importable():
        return "triton is not installed"
    if p.device.type == "cuda":
        pass
    elif p.device.type == "cpu" and triton_interpreted():
        if not explicit:  # the interpreter is for testing; auto prefers the reference on a CPU
            return "inputs are on the CPU, where the fused kernels only run interpreted"
    else:
        hint = " (set TRITON_INTERPRET=1 to interpret the kernels on the CPU)" if p.device.type == "cpu" else ""
        return f"inputs are on {p.device.type}, the Triton kernels need a CUDA device{hint}"
    if p.dtype not in FUSED_DTYPES:
        return f"dtype {p.dtype} is not one of float16, bfloat16, float32"
    if p.head_dim > TRITON_MAX_HEAD_DIM:
        return f"head dim {p.head_dim} is larger than {TRITON_MAX_HEAD_DIM}"
    if p.num_prompts > MAX_FUSED_PROMPTS:
        return f"{p.num_prompts} prompts is more than the {MAX_FUSED_PROMPTS} the fused kernels hold"
    return None


def cuda_unsupported(op: str, p: Problem, *, explicit: bool) -> str | None:
    from . import _cuda

    return _cuda.unsupported_reason(op, p, explicit=explicit)


def select_backend(op: str, backend: str, p: Problem) -> str:
    """Return the backend name that will run ``op`` on problem ``p``."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "triton":
        reason = triton_unsupported(op, p, explicit=True)
    elif backend == "cuda":
        reason = cuda_unsupported(op, p, explicit=True)
    else:
        reasons = []
        for name, why in (("cuda", cuda_unsupported(op, p, explicit=False)), ("triton", triton_unsupported(op, p, explicit=False))):
            if why is None:
                return name
            reasons.append(f"{name}: {why}")
        message = f"{op}: backend='auto' uses the reference PyTorch backend ({'; '.join(reasons)})"
        if message not in _warned:
            _warned.add(message)
            warnings.warn(message, stacklevel=3)
        return "reference"
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run {op} on these inputs: {reason}")
    return backend
