"""The Triton kernels compile for sm_80 and sm_90 with the GPU tile sizes (no GPU needed).

Compiled by ``bench.static`` (the ``static_cost_report`` fixture: triton's bundled ptxas, in a process without
TRITON_INTERPRET). The interpreter that runs the other CPU tests cannot see GPU-only compile errors; this can.
Resource limits (shared memory, spills) are checked by tests/test_static_cost.py on the same compiles.
"""
from __future__ import annotations

import importlib
import pkgutil

from excitor_kernels import ops


def _kernels() -> set[str]:
    """Every launchable Triton kernel of the package: the ``*_kernel`` functions of ``ops/*.py`` (the Triton
    backend's and the sdpa backends')."""
    modules = [importlib.import_module(f"{ops.__name__}.{m.name}") for m in pkgutil.iter_modules(ops.__path__)]
    return {name for module in modules for name, obj in vars(module).items()
            if name.endswith("_kernel") and hasattr(obj, "arg_names")}


def test_kernels_compile_for_sm80_and_sm90(static_cost_report):
    results = static_cost_report["results"].values()
    failed = {r["key"]: r["error"] for r in results if "error" in r}
    assert results and not failed, failed
    compiled = {(r["config"]["cc"], r["config"]["kernel"]) for r in results}
    assert compiled == {(cc, k) for cc in (80, 90) for k in _kernels()}, compiled
