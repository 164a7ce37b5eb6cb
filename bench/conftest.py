"""pytest configuration for ``pytest bench/``: options, the results recorder, the report at the end.

Without a GPU the fused kernels can only run interpreted, so TRITON_INTERPRET=1 is set here, before
any benchmark module imports the package (triton reads it when the kernels are decorated).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import report  # noqa: E402
from bench.device import environment  # noqa: E402

_RECORDS = pytest.StashKey[list]()
_WRITTEN = pytest.StashKey[list]()


def pytest_addoption(parser):
    group = parser.getgroup("excitor-bench")
    group.addoption("--bench-quick", action="store_true", default=False,
                    help="GPU: the trimmed sweep that fits one 10-minute command (also EXCITOR_BENCH_QUICK=1)")
    group.addoption("--bench-no-report", action="store_true", default=False,
                    help="do not write bench/results/*.json, BENCHMARKS.md or plots")


def bench_quick(config) -> bool:
    return config.getoption("--bench-quick") or os.environ.get("EXCITOR_BENCH_QUICK", "0") not in ("", "0")


def pytest_configure(config):
    config.stash[_RECORDS] = []
    config.stash[_WRITTEN] = []


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


def pytest_terminal_summary(terminalreporter, config):
    written = config.stash.get(_WRITTEN, [])
    if written:
        terminalreporter.section("excitor-bench report")
        for line in written:
            terminalreporter.write_line(str(line))
