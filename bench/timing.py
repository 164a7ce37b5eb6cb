"""How time and memory are measured.

On a GPU the clock handed to pytest-benchmark reads CUDA events: each call records an event on the
current stream, waits for it and returns its time since a fixed origin event, so the difference
between two calls is device time between two points in the stream (launch gaps inside the timed
region included, host work after it excluded). On the CPU it is ``time.perf_counter``.
pytest-benchmark then takes warm-up rounds, timed rounds and the median.
"""
from __future__ import annotations

import math
import time

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
_origin = None


def clock() -> float:
    """Seconds; CUDA-event time on a GPU, host time otherwise."""
    global _origin
    if not HAS_GPU:
        return time.perf_counter()
    if _origin is None:
        _origin = torch.cuda.Event(enable_timing=True)
        _origin.record()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    event.synchronize()
    return _origin.elapsed_time(event) / 1e3


def once_s(step) -> float:
    """Seconds for one call of ``step`` on the benchmark clock."""
    start = clock()
    step()
    return clock() - start


def plan(step, *, round_s: float, budget_s: float, min_rounds: int, max_rounds: int) -> dict:
    """Warm ``step`` up (compilation, caches), time one call, and choose pytest-benchmark's pedantic
    arguments: enough iterations per round that a round lasts ``round_s`` (launch latency amortised),
    rounds to fill ``budget_s`` within [min_rounds, max_rounds]."""
    step()
    estimate = max(once_s(step), 1e-6)
    iterations = max(1, min(100, math.ceil(round_s / estimate)))
    rounds = max(min_rounds, min(max_rounds, int(budget_s / (estimate * iterations))))
    return dict(rounds=rounds, iterations=iterations, warmup_rounds=1)


def median_ms(step, reps: int = 10) -> float:
    """Median of ``reps`` single calls after one warm-up (used to choose among SDPA backends)."""
    step()
    return sorted(once_s(step) for _ in range(reps))[reps // 2] * 1e3


def peak_mib(step) -> float | None:
    """Peak device memory allocated during one call of ``step``, inputs included (None on the CPU)."""
    if not HAS_GPU:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def free_memory() -> None:
    if HAS_GPU:
        torch.cuda.empty_cache()


def measure(benchmark, record, base: dict, step_factory, budget: dict) -> tuple[float, float | None]:
    """Build the step (``step_factory()``), time it with pytest-benchmark (``plan(step, **budget)``) and measure
    its peak memory: (median seconds, peak MiB). Out of device memory: record ``base`` with status "oom" and
    skip the test."""
    oom = None
    try:
        step = step_factory()
        benchmark.pedantic(step, **plan(step, **budget))
        peak = peak_mib(step)
    except torch.cuda.OutOfMemoryError as exc:
        oom = str(exc).splitlines()[0]
    if oom is not None:
        step = None
        free_memory()
        record(dict(base, status="oom"))
        pytest.skip(f"out of memory: {oom}")
    return benchmark.stats.stats.median, peak
