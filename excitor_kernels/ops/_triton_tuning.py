"""Launch configurations of the attention kernels: fixed tiles, or on a GPU the fastest of a pruned set.

A configuration is the kernel's tiles (``BLOCK_M``, ``BLOCK_N``), launch options (``num_warps``,
``num_stages``) and switches of the same kernels:

* ``DESC``: q, k, ke, v (and do) tiles load through tensor descriptors (TMA). Only where
  :func:`descriptors_ok` holds: an sm_90 or newer GPU and 16-byte aligned bases and row strides; otherwise the
  pointer loads run (Ampere, odd strides).
* ``WARP_SPEC``: ``tl.range(..., warp_specialize=True)`` on the key (dk/dv: query) loop. Triton's sm_90 pass
  takes it only as the kernel's single loop, with descriptor loads and no early return: the kernels then
  run one loop with every tile masked (instead of unmasked tiles, then the masked diagonal ones).
* ``TC_ROW_SUM`` (forward only): the softmax's row sum on the tensor cores, the rounded weights times a column
  of ones, instead of float32 sums (docs/design.md, "The softmax's row sum"): fewer instructions, more
  tensor-core work; a candidate at the fixed tiles, never the fixed configuration.

:data:`CANDIDATES` lists the half-precision configurations per kernel and operator. Each compiles for sm_90
at ``d = 128`` (the largest tiles) with no register spills and shared memory within one block's limit
(tests/test_hopper_variants.py checks it with ``bench.static``'s compile path; smaller head dims hold smaller
tiles). On a
GPU of compute capability 9.0 or more, with ``EXCITOR_TRITON_AUTOTUNE=1``, the launchers time them (and the
fixed configuration) at the first call of each key (kernel, operator, layout, head dim, dtype, causal, length
bucket) and keep the fastest for the process (:func:`pick`). Tuning is opt-in until the variants have been
checked for correctness on a GPU (timing does not check results); without it, and on older GPUs, float32,
the CPU interpreter, ``deterministic=True`` backwards and CUDA-graph capture, the launchers use the fixed
tiles of ``_triton_attention.blocks``. ``python -m bench.rank_configs`` prints the ranking on a GPU.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton

from ._triton_common import ADAPTER, EXCITOR

BOTH = (EXCITOR, ADAPTER)
# (operators, BLOCK_M, BLOCK_N, num_warps, num_stages, DESC, WARP_SPEC); the first of each kernel is blocks()'s
# fixed GPU configuration and the second its pointer-load fallback (where descriptors cannot read the inputs).
# Kept: no spills on sm_90 at bf16, d = 128 for the operators named, compiled as a GPU launch sees them
# (16-byte aligned pointers and strides, bench.static). Left out for spilling there, e.g. forwards 128x64 with
# 4 warps (non-specialised), dk/dv 64x128 and 64x64 (4 warps), dk/dv 32x64 and 32x32 with 4 warps, the
# Adapter dq with descriptors at 32x64 (8 warps); the Excitor's dq, whose loop also holds the bypass scores and
# the gate gradient's sums (docs/design.md), at 128x128, and at 128x64 with pointer loads (d = 128). Warp
# specialisation compiles on sm_90 (triton 3.9) for the Excitor forward with descriptor loads at 4 warps (triton
# adds a producer warp group); not with pointer loads, not for the Adapter (its prompt products), not for the
# Excitor's dq (its row sums: triton's partitioning asserts), while the dk/dv loop and any loop at 8 warps triton
# leaves as it is.
_SET = {
    "fwd": [(BOTH, 128, 128, 8, 2, True, False), (BOTH, 128, 128, 8, 2, False, False),
            (BOTH, 128, 32, 8, 2, False, False), (BOTH, 128, 64, 8, 2, True, False),
            (BOTH, 64, 64, 4, 2, True, False), (BOTH, 64, 32, 4, 3, True, False),
            ((EXCITOR,), 128, 64, 4, 2, True, True), ((EXCITOR,), 128, 32, 4, 2, True, True)],
    "dkdv": [(BOTH, 32, 128, 8, 2, True, False), (BOTH, 32, 128, 8, 2, False, False),
             (BOTH, 64, 32, 8, 2, False, False), ((ADAPTER,), 64, 32, 8, 2, True, False),
             (BOTH, 32, 32, 8, 2, False, False), (BOTH, 32, 32, 8, 2, True, False)],
    "dq": [((ADAPTER,), 128, 64, 8, 2, True, False), ((ADAPTER,), 128, 64, 8, 2, False, False),
           ((ADAPTER,), 128, 32, 8, 2, True, False), ((ADAPTER,), 32, 64, 8, 2, False, False),
           ((ADAPTER,), 64, 64, 8, 2, True, False),
           ((EXCITOR,), 128, 64, 8, 2, True, False), ((EXCITOR,), 128, 32, 8, 2, False, False)],
}
# the forward's row sum on the tensor cores, at the fixed tiles with descriptors (with pointer loads, whose
# per-thread tile offsets take registers, it spills on sm_90)
_TC_ROW_SUM = _SET["fwd"][:1]


def _config(kernel, bm, bn, w, s, desc, ws, tc=False):
    config = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, DESC=desc, WARP_SPEC=ws)
    return dict(config, TC_ROW_SUM=tc) if kernel == "fwd" else config


CANDIDATES = {kernel: [(row[0], _config(kernel, *row[1:])) for row in rows]
              + [(row[0], _config(kernel, *row[1:], tc=True)) for row in (_TC_ROW_SUM if kernel == "fwd" else [])]
              for kernel, rows in _SET.items()}


def candidates(kernel: str, bypass: int, desc_ok: bool = True) -> list[dict]:
    """The configurations of ``kernel`` kept for operator ``bypass`` (those with descriptors only if
    ``desc_ok``); the first is the fixed one."""
    return [c for ops, c in CANDIDATES[kernel] if bypass in ops and (desc_ok or not c["DESC"])]


_table: dict = {}   # key -> chosen configuration, for the life of the process
_forced: dict = {}  # kernel -> configuration, set by forced()


def descriptors_ok(*tensors) -> bool:
    """Tensor-descriptor loads can read every tensor: on a CUDA device of compute capability 9.0 or more (or
    the CPU interpreter, which emulates them, for tests), unit last stride and 16-byte aligned base and other
    strides (TMA's rules)."""
    t0 = tensors[0]
    if t0.is_cuda:
        device_ok = torch.cuda.get_device_capability(t0.device) >= (9, 0)
    else:
        device_ok = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not device_ok:
        return False
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) for t in tensors)


def _torch_allocator(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def prepare_descriptors() -> None:
    """Device-side tensor descriptors need global scratch memory from triton's allocator: give it torch's
    caching allocator unless the caller installed one."""
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    if current is None or isinstance(current.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_allocator)


def length_bucket(n: int) -> int:
    """Lengths that share a tuned configuration: powers of two from 512 to 16384."""
    return min(max(triton.next_power_of_2(max(n, 1)), 512), 16384)


def autotune_enabled(t: torch.Tensor) -> bool:
    """Tune half-precision launches on sm_90+ GPUs (the set is pruned for sm_90), outside CUDA-graph capture,
    when ``EXCITOR_TRITON_AUTOTUNE=1`` (opt-in until the variants are validated on a GPU)."""
    return (t.is_cuda and t.element_size() == 2 and os.environ.get("EXCITOR_TRITON_AUTOTUNE", "0") == "1"
            and torch.cuda.get_device_capability(t.device) >= (9, 0)
            and not torch.cuda.is_current_stream_capturing())


@contextlib.contextmanager
def forced(**configs):
    """Launch the named kernels (``fwd``, ``dkdv``, ``dq``) with the given configuration entries (merged over
    the fixed ones), e.g. ``forced(fwd=dict(DESC=True))``: tests and ``bench.rank_configs`` use it."""
    saved = dict(_forced)
    _forced.update(configs)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


def pick(kernel: str, bypass: int, key: tuple, default: dict, tune: bool, desc_ok: bool, prepare) -> dict:
    """The configuration ``kernel`` runs with. ``prepare(config)`` returns a callable that launches the kernel
    once with ``config`` into scratch outputs (tuning must not touch the real ones: some kernels add into
    them); it is timed for every candidate the first time ``key`` is seen when ``tune``."""
    if kernel in _forced:
        config = dict(default, **_forced[kernel])
        if config["DESC"] and not desc_ok:
            raise ValueError(f"forced {kernel} configuration asks for DESC=True, but the inputs or device do not "
                             f"support tensor descriptors (descriptors_ok is False)")
        return config
    if not tune:
        return default
    key = (kernel, bypass) + key
    if key not in _table:
        others = [c for c in candidates(kernel, bypass, desc_ok) if c != default]
        _table[key] = fastest([default] + others, prepare)[0][1]
    return _table[key]


def fastest(configs: list, prepare) -> list:
    """[(milliseconds, config)] fastest first; a configuration that fails to compile or launch is left out
    (``bench.rank_configs`` reports it)."""
    timed = []
    for config in configs:
        try:
            ms = triton.testing.do_bench(prepare(config), warmup=5, rep=20)
        except Exception:  # noqa: BLE001 - a candidate this GPU or triton cannot run is skipped
            continue
        timed.append((ms, config))
    if not timed:
        raise RuntimeError("no configuration of the attention kernels could run; unset EXCITOR_TRITON_AUTOTUNE")
    return sorted(timed, key=lambda t: t[0])
