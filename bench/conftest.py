"""pytest configuration for ``pytest bench/``: options, the results recorder, the report at the end.

Without a GPU the fused kernels can only run interpreted, so TRITON_INTERPRET=1 is set here, before
any benchmark module imports the package (triton reads it when the kernels are decorated). Without a GPU
the GPU cases (marker ``gpu``) are deselected at collection, and so are cases whose provider cannot run
here (marker ``unavailable``): the run shows the smoke set only, with one summary line per reason.
"""
import os
import signal

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import report  # noqa: E402
from bench.device import environment  # noqa: E402

_RECORDS = pytest.StashKey[list]()
_WRITTEN = pytest.StashKey[list]()
_DESELECTED = pytest.StashKey[dict]()
NO_GPU = "GPU benchmark cases: no CUDA device here (the CPU smoke set runs instead)"


def pytest_addoption(parser):
    group = parser.getgroup("excitor-bench")
    group.addoption("--bench-quick", action="store_true", default=False,
                    help="GPU: the trimmed sweep that fits one 10-minute command (also EXCITOR_BENCH_QUICK=1)")
    group.addoption("--bench-no-report", action="store_true", default=False,
                    help="do not write bench/results/*.json, BENCHMARKS.md or plots")


def bench_quick(config) -> bool:
    return config.getoption("--bench-quick") or os.environ.get("EXCITOR_BENCH_QUICK", "0") not in ("", "0")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    # a run stopped by SIGTERM (.ci/gpu_session's deadline) ends as an interrupted session: pytest_sessionfinish
    # still writes the results measured so far
    signal.signal(signal.SIGTERM, _interrupt)
    config.stash[_RECORDS] = []
    config.stash[_WRITTEN] = []
    config.stash[_DESELECTED] = {}
    config.addinivalue_line("markers", "gpu: a GPU benchmark case (deselected without a CUDA device)")
    config.addinivalue_line("markers", "unavailable(reason): its provider cannot run here (deselected)")


def _why_deselected(item) -> str | None:
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        return NO_GPU
    marker = item.get_closest_marker("unavailable")
    return f"provider unavailable, {marker.args[0]}" if marker else None


def pytest_collection_modifyitems(config, items):
    keep, dropped, counts = [], [], config.stash[_DESELECTED]
    for item in items:
        why = _why_deselected(item)
        if why is None:
            keep.append(item)
        else:
            dropped.append(item)
            counts[why] = counts.get(why, 0) + 1
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture
def record(request):
    """``record(dict)``: add one result (it needs a unique ``key``) to this run's results file."""
    return request.config.stash[_RECORDS].append


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return bench_quick(request.config)


def pytest_sessionfinish(session):
    config = session.config
    records = config.stash.get(_RECORDS, [])
    if not records or config.getoption("--bench-no-report"):
        return
    options = dict(quick=bench_quick(config), args=list(config.invocation_params.args))
    path = report.write_run(records, environment(), options)
    config.stash[_WRITTEN] = [path, *report.regenerate()]


def pytest_report_collectionfinish(config, items):
    return [f"deselected {n} case(s): {why}" for why, n in config.stash.get(_DESELECTED, {}).items()]


def pytest_terminal_summary(terminalreporter, config):
    written = config.stash.get(_WRITTEN, [])
    if written:
        terminalreporter.section("excitor-bench report")
        for line in written:
            terminalreporter.write_line(str(line))
