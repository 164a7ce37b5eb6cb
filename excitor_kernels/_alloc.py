"""Output allocation for the fused backends.

Every tensor a kernel is meant to overwrite completely comes from :func:`new_output`. Tests switch on
:func:`poisoned_outputs`, which fills those tensors with NaN before the kernel runs, so an element the
kernel forgets to write shows up as NaN instead of passing silently with whatever memory held.
"""
from __future__ import annotations

import contextlib

import torch

_POISON = False


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    """Within this context, kernel outputs start as NaN instead of uninitialised memory."""
    global _POISON
    previous, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = previous


def new_output(shape, *, dtype: torch.dtype, device, like: torch.Tensor | None = None) -> torch.Tensor:
    """An uninitialised tensor (NaN-filled under :func:`poisoned_outputs`).

    With ``like`` of the same shape, the result keeps ``like``'s memory layout (a ``(B, M, H, d)``
    view transposed to ``(B, H, M, d)`` gets an output of the same layout, so the caller's reshape is free).
    """
    if like is not None and tuple(like.shape) == tuple(shape):
        out = torch.empty_like(like, dtype=dtype, device=device)
    else:
        out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON:
        out.fill_(float("nan"))
    return out


def in_layout_of(o: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``o`` with ``like``'s memory layout (``torch.empty_like``'s: its strides when ``like`` is dense, else the
    dense layout of its dimension order); a differentiable copy when the layouts differ."""
    if o.stride() == like.stride():
        return o
    out = torch.empty_like(like, dtype=o.dtype)
    return o if out.stride() == o.stride() else out.copy_(o)
