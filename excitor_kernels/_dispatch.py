"""The one place that turns ``backend=`` into an implementation.

``"reference"`` always runs. ``"triton"``, ``"cuda"``, ``"sdpa"``, ``"sdpa_concat"`` and ``"torch"`` run when they
support the inputs and raise a ``ValueError`` that says why when they do not. ``"auto"`` chooses per call among the
O(N)-memory backends that support the inputs (:func:`choose`, :func:`explain_backend`):

1. decode-shaped calls (``Problem.decode``: at most 16 queries, no gradient, padded) take triton, whose split-KV
   decode kernel serves them;
2. where ``auto_table.json`` (written by ``python -m bench.tune`` on a GPU, see ``_tuning``) has entries for
   the GPU's architecture, the backend with the smallest measured time in the nearest entry;
3. otherwise the rule: cuda (opt-in until validated on a GPU), else triton, else sdpa, else torch: the one-pass
   kernels keep the least memory, and sdpa is taken only where a measurement says it is faster (sdpa_concat is a
   candidate only under GQA, ``Hq != Hkv``: without it, it is sdpa's computation, :func:`redundant`); torch
   (PyTorch ops around SDPA, any device, no Triton) is what devices without the fused kernels get: the CPU, MPS;
4. with none of them (float64 inputs), the reference backend, warning once per distinct reason.

Every new choice is logged once at debug level on the ``excitor_kernels`` logger.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass

import torch

from . import _tuning
from ._validate import MAX_DECODE_QUERIES, Problem, check_cache_lengths, check_inputs

BACKENDS = ("auto", "reference", "triton", "cuda", "sdpa", "sdpa_concat", "torch")
FUSED_ORDER = ("cuda", "triton", "sdpa", "sdpa_concat", "torch")  # the rule's order without a measured table
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256
MAX_FUSED_PROMPTS = 64

_warned: set = set()
_logged: set = set()
_log = logging.getLogger("excitor_kernels")


def triton_interpreted() -> bool:
    """Whether triton runs its kernels interpreted on the CPU (TRITON_INTERPRET=1, read when triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_installed() -> bool:
    """Whether triton can be imported (it installs on Linux only; the torch and reference backends need none)."""
    return importlib.util.find_spec("triton") is not None


def triton_unsupported(op: str, p: Problem, *, explicit: bool) -> str | None:
    """Why the Triton backend cannot run ``p`` (None when it can)."""
    if not triton_installed():
        return "triton is not installed (it is a Linux package; backend 'torch' needs none)"
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


def sdpa_unsupported(op: str, p: Problem, *, explicit: bool, concat: bool = False,
                     triton_reason: str | None = "") -> str | None:
    """Why the sdpa backend (``concat``: its GQA rewrite) cannot run ``p``: SDPA plus Triton prompt kernels
    (``triton_reason``: :func:`triton_unsupported`'s answer when the caller has it)."""
    if concat and op.startswith("adapter"):
        return "the GQA rewrite <[q, g q], [k, ke]> concerns the Excitor keys; adapter_attention takes 'sdpa'"
    if p.varlen:
        return "SDPA has no entry point for packed (varlen) sequences on dense tensors; they run on triton or torch"
    return triton_unsupported(op, p, explicit=explicit) if triton_reason == "" else triton_reason


def torch_unsupported(op: str, p: Problem, *, explicit: bool) -> str | None:
    """Why the torch backend (``ops/_torch.py``) cannot run ``p`` (None when it can): it takes the training dtypes
    on any device, any head dim and number of prompts; float64 is the reference's (the oracle)."""
    if p.dtype not in FUSED_DTYPES:
        return f"dtype {p.dtype} is not one of float16, bfloat16, float32 (float64 runs on the reference)"
    return None


def unsupported(name: str, op: str, p: Problem, *, explicit: bool) -> str | None:
    """Why fused backend ``name`` cannot run ``op`` on ``p`` (None when it can)."""
    if name == "torch":
        return torch_unsupported(op, p, explicit=explicit)
    if name == "cuda":
        return cuda_unsupported(op, p, explicit=explicit)
    if name == "triton":
        return triton_unsupported(op, p, explicit=explicit)
    return sdpa_unsupported(op, p, explicit=explicit, concat=name == "sdpa_concat")


def redundant(name: str, p: Problem) -> str | None:
    """Why ``backend="auto"`` (and ``bench.tune``) need not consider fused backend ``name`` for ``p`` though it runs
    it (None when it is a candidate): sdpa_concat without GQA computes exactly what sdpa computes."""
    if name == "sdpa_concat" and p.q_heads == p.kv_heads:
        return "the same computation as sdpa without GQA"
    return None


@dataclass(frozen=True)
class Choice:
    """The backend a call takes and why."""

    backend: str
    reason: str


def _auto(op: str, p: Problem) -> Choice:
    reasons, able = [], []
    triton_reason = triton_unsupported(op, p, explicit=False)
    why_not = dict(cuda=cuda_unsupported(op, p, explicit=False), triton=triton_reason,
                   sdpa=sdpa_unsupported(op, p, explicit=False, triton_reason=triton_reason),
                   sdpa_concat=sdpa_unsupported(op, p, explicit=False, concat=True, triton_reason=triton_reason),
                   torch=torch_unsupported(op, p, explicit=False))
    for name in FUSED_ORDER:
        why = why_not[name] or redundant(name, p)
        if why is None:
            able.append(name)
        else:
            reasons.append(f"{name}: {why}")
    if not able:
        return Choice("reference", f"no O(N)-memory backend runs these inputs ({'; '.join(reasons)})")
    if "triton" in able and p.decode:
        return Choice("triton", f"decode-shaped call ({p.q_len} queries, no gradient): the split-KV decode kernel")
    case = _tuning.case_of(op, p)
    (gpu, measured), entry = _tuning.measured_on(p.device.type, p.device.index or 0), None
    if measured:  # (under compile, sizes become constants here: the table needs them)
        gpu, entry = _tuning.nearest_times(p.device.type, p.device.index or 0,
                                           *(int(v) if isinstance(v, torch.SymInt) else v for v in case.values()))
    timed = {} if entry is None else {n: ms for n, ms in entry[3] if n in able}
    where = f"{gpu} {case['op']} {case['mode']} {case['dtype']}"
    if timed:
        best = min(timed, key=timed.get)
        times = ", ".join(f"{n} {ms:.3g} ms" for n, ms in sorted(timed.items(), key=lambda t: t[1]))
        return Choice(best, f"measured on {where} (nearest entry: head dim {entry[0]}, GQA {entry[1]}, "
                            f"N {entry[2]}): {times}")
    why = f"no measured entry for {where}" if entry is None else f"the measured entry has no time for {able}"
    rule = " > ".join(n for n in FUSED_ORDER if n != "sdpa_concat")
    return Choice(able[0], f"{why}; rule {rule} picks {able[0]} among {able}")


def choose(op: str, backend: str, p: Problem) -> Choice:
    """The backend that runs ``op`` on problem ``p`` and why; raises ``ValueError`` for a named backend that
    cannot run it."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "reference":
        return Choice("reference", "asked for")
    if backend == "auto":
        return _auto(op, p)
    reason = unsupported(backend, op, p, explicit=True)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run {op} on these inputs: {reason}")
    return Choice(backend, "asked for")


def select_backend(op: str, backend: str, p: Problem, *, stacklevel: int = 3) -> str:
    """Return the backend name that will run ``op`` on problem ``p`` (logged once per new choice; ``stacklevel``
    of the warning for an automatic fall-back to the reference: the operator's caller)."""
    choice = choose(op, backend, p)
    if backend == "auto":
        if choice.backend == "reference":
            message = f"{op}: backend='auto' uses the reference PyTorch backend ({choice.reason})"
            # warned outside a torch.compile trace only: warnings.warn is a graph break
            if not torch.compiler.is_compiling() and message not in _warned:
                _warned.add(message)
                warnings.warn(message, stacklevel=stacklevel)
        key = (op, choice)
        if key not in _logged and not torch.compiler.is_compiling():
            _logged.add(key)
            _log.debug("%s: backend='auto' -> %s (%s)", op, choice.backend, choice.reason)
    return choice.backend


def serves_cache_lengths(backend: str, p: Problem) -> bool:
    """Whether the path that ``backend`` (as :func:`select_backend` resolved it) takes for ``p`` serves
    ``cache_seqlens`` / ``cache_leftpad``: the reference and torch backends at any M, the split-KV decode kernel
    (triton on a decode-shaped call, ``Problem.decode``) among the fused ones."""
    return backend in ("reference", "torch") or (backend == "triton" and p.decode)


def select_path(op: str, backend: str, p: Problem, cache_seqlens=None, cache_leftpad=None) -> tuple[str, bool]:
    """(backend, decode) of a padded call: :func:`select_backend`'s choice and whether the call takes the
    split-KV decode kernel (triton on a decode-shaped call, ``Problem.decode``). ``cache_seqlens`` and
    ``cache_leftpad`` are checked here; the decode kernel, the torch backend and the reference serve them."""
    if cache_seqlens is not None or cache_leftpad is not None:
        check_cache_lengths(cache_seqlens, cache_leftpad, p.batch, p.kv_len, p.device)
    backend = select_backend(op, backend, p, stacklevel=4)
    decode = backend == "triton" and p.decode
    given = [n for n, t in (("cache_seqlens", cache_seqlens), ("cache_leftpad", cache_leftpad)) if t is not None]
    if given and not serves_cache_lengths(backend, p):
        raise ValueError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} served by the decode path only "
                         f"among the fused backends (M <= {MAX_DECODE_QUERIES} queries, no gradients, backend 'triton' "
                         f"or 'auto' on a GPU); backends 'torch' and 'reference' serve them at any M; got M={p.q_len}, "
                         f"backend={backend!r}")
    return backend, decode


def takes_varlen(backend: str) -> bool:
    """Whether the ``*_varlen`` operators run with ``backend`` (reference, triton, torch, and auto, which picks
    among them; cuda and the sdpa backends have no varlen path)."""
    return backend in ("auto", "reference", "triton", "torch")


def takes_cache_lengths(op: str, q, k, v, prompt_keys, gate, *, prompt_values=None, sim_keys=None,
                        backend: str = "auto") -> bool:
    """Whether ``excitor_attention`` (``op="excitor"``) or ``adapter_attention`` (``op="adapter"``) on these padded
    inputs, under the current grad mode, takes a path that serves ``cache_seqlens`` and ``cache_leftpad``
    (:func:`serves_cache_lengths`); the module asks before it runs a left-padded batch in one call."""
    p = check_inputs(q, k, v, prompt_keys, gate, prompt_values=prompt_values, sim_keys=sim_keys,
                     needs_prompt_values=op == "adapter")
    return serves_cache_lengths(choose(f"{op}_attention", backend, p).backend, p)


def explain_backend(op: str, q, k, v, prompt_keys, gate, *, prompt_values=None, sim_keys=None,
                    backend: str = "auto") -> Choice:
    """Which backend ``excitor_attention`` (``op="excitor"``) or ``adapter_attention`` (``op="adapter"``) would
    take for these (padded) inputs under the current grad mode, and why. Raises what the call would raise for
    bad inputs or a named backend that cannot run them."""
    if op not in ("excitor", "adapter"):
        raise ValueError(f"op must be 'excitor' or 'adapter'; got {op!r}")
    p = check_inputs(q, k, v, prompt_keys, gate, prompt_values=prompt_values, sim_keys=sim_keys,
                     needs_prompt_values=op == "adapter")
    return choose(f"{op}_attention", backend, p)
