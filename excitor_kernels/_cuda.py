"""Loader for the optional CUDA extension (``excitor_kernels._C``), built by setup.py when CUDA is present."""
from __future__ import annotations

from ._validate import Problem

try:  # pragma: no cover - depends on the build
    from . import _C  # noqa: F401

    _IMPORT_ERROR = None
except ImportError as exc:
    _C = None
    _IMPORT_ERROR = exc


def unsupported_reason(op: str, p: Problem) -> str | None:
    if _C is None:
        return "the CUDA extension excitor_kernels._C is not built (no CUDA toolkit or GPU torch at install time)"
    return f"the CUDA extension has no {op} kernel yet"
