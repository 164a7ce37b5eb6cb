"""Operator benchmarks: every provider on every case of the sweep (GPU) or the smoke set (CPU).

Each test times one provider on one case with pytest-benchmark (median of timed rounds; see
timing.py for the clock), then measures the peak memory of one more call, and records ms, TFLOP/s
and peak MiB. Plain SDPA runs once per SDPA kernel on a GPU (``sdpa_flash``, ``sdpa_cudnn``, ``sdpa_efficient``;
a kernel that refuses the case is recorded as "unsupported" with its reason); the providers built on SDPA
(the composition, ours_sdpa) are timed with whichever SDPA kernel is fastest for the case. A case that runs out
of device memory is recorded as "oom". Both are skipped, not failed.
"""
import functools

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import timing
from bench.cases import gpu_cases, smoke_cases
from bench.conftest import bench_quick
from bench.providers import (GPU_PROVIDERS, PROVIDERS, SDPA_PINNED, SMOKE_PROVIDERS, USES_SDPA, make_inputs,
                             sdpa_backends, unavailable)
from bench.steps import make_step
from bench.timing import HAS_GPU


def pytest_generate_tests(metafunc):
    """The GPU sweep (marked ``gpu``: bench/conftest.py deselects it without a GPU) and, without a GPU, the
    smoke set; a provider that cannot run here is deselected with its reason (``unavailable`` marker)."""
    if "case" not in metafunc.fixturenames:
        return

    def marks(name, gpu):
        why = unavailable(name)
        return [pytest.mark.gpu] * gpu + ([pytest.mark.unavailable(f"{name}: {why}")] if why else [])

    params = [pytest.param(case, name, id=f"{name}-{case.id}", marks=marks(name, True))
              for case in gpu_cases(bench_quick(metafunc.config)) for name in GPU_PROVIDERS if _runs(name, case)]
    if not HAS_GPU:
        params += [pytest.param(case, name, id=f"smoke-{name}-{case.id}", marks=marks(name, False))
                   for case in smoke_cases() for name in SMOKE_PROVIDERS if _runs(name, case)]
    metafunc.parametrize(("case", "provider"), params)


def _runs(name, case) -> bool:
    """Whether provider ``name`` is measured on ``case`` (the GQA rewrite is the sdpa backend itself under MHA)."""
    return case.op in PROVIDERS[name] and not (name == "ours_sdpa_concat" and case.heads == case.kv_heads)


def _timing_budget():
    if HAS_GPU:
        return dict(round_s=0.02, budget_s=0.5, min_rounds=5, max_rounds=50)
    return dict(round_s=0.0, budget_s=0.2, min_rounds=2, max_rounds=10)


def _fastest_sdpa_step(fn, x, pass_):
    """(backend name, step) for the SDPA backend that runs this step fastest."""
    best = None
    for backend in sdpa_backends():
        context = functools.partial(sdpa_kernel, backend) if backend is not None else None
        try:
            step = make_step(fn, x, pass_, context) if context else make_step(fn, x, pass_)
            ms = timing.median_ms(step, reps=5)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError:  # this backend does not support the case
            continue
        if best is None or ms < best[0]:
            best = (ms, getattr(backend, "name", "default"), step)
    if best is None:
        raise RuntimeError("no SDPA backend runs this case")
    return best[1], best[2]


def test_attention(case, provider, benchmark, record):
    key = f"attention/{case.id}/{provider}"
    base = dict(key=key, kind="attention", provider=provider, case=case.as_dict(), flops=case.flops())
    device = "cuda" if HAS_GPU else "cpu"
    scale = case.head_dim ** -0.5
    fn = PROVIDERS[provider][case.op]
    oom = None
    try:
        x = make_inputs(case, device, requires_grad=case.pass_ != "fwd")
        call = functools.partial(fn, x, case.causal, scale)
        if provider in USES_SDPA:
            sdpa_backend, step = _fastest_sdpa_step(call, x, case.pass_)
        elif provider in SDPA_PINNED:
            sdpa_backend = SDPA_PINNED[provider]
            step = make_step(call, x, case.pass_, functools.partial(sdpa_kernel, getattr(SDPBackend, sdpa_backend)))
            try:
                step()
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as exc:  # this SDPA kernel does not take the case ("No available kernel")
                record(dict(base, status="unsupported", error=str(exc).splitlines()[0][:300]))
                pytest.skip(f"{sdpa_backend} does not run this case")
        else:
            sdpa_backend, step = None, make_step(call, x, case.pass_)
        benchmark.pedantic(step, **timing.plan(step, **_timing_budget()))
        peak = timing.peak_mib(step)
    except torch.cuda.OutOfMemoryError as exc:
        oom = str(exc).splitlines()[0]
    except Exception as exc:
        record(dict(base, status="error", error=f"{type(exc).__name__}: {exc}"[:300]))
        raise
    if oom is not None:
        x = step = None
        timing.free_memory()
        record(dict(base, status="oom"))
        pytest.skip(f"out of memory: {oom}")
    seconds = benchmark.stats.stats.median
    record(dict(base, status="ok", ms=seconds * 1e3, tflops=case.flops() / seconds / 1e12, peak_mib=peak,
                sdpa_backend=sdpa_backend, rounds=benchmark.stats.stats.rounds,
                iterations=benchmark.stats.iterations))
