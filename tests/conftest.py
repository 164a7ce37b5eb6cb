"""Test configuration: the fused kernels run interpreted on the CPU when no GPU is present.

TRITON_INTERPRET must be set before triton decorates the kernels, hence here, before any test module
imports the package.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def fresh_generator(request):
    """Every test draws from torch's generator freshly seeded for it: each run draws new inputs, a draw added to or
    removed from one test does not move another test's inputs, and a failure names its seed
    (``EXCITOR_TEST_SEED=<seed>`` draws the same inputs again)."""
    seed = int(os.environ.get("EXCITOR_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)  # every device's generator
    request.node.excitor_seed = seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed and hasattr(item, "excitor_seed"):
        report.sections.append(("torch seed", f"EXCITOR_TEST_SEED={item.excitor_seed} draws this test's inputs again"))


@pytest.fixture
def deterministic_torch():
    """torch.use_deterministic_algorithms(True) for one test: on a GPU, SDPA's own backward (FlashAttention, cuDNN,
    memory-efficient attention) repeats bitwise only then; ``deterministic=True`` covers our kernels."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@pytest.fixture(scope="session")
def static_cost_report(tmp_path_factory):
    """``python -m bench.static --subset test`` (Triton kernels only) run once per session in a fresh
    interpreter without TRITON_INTERPRET (no GPU needed: triton bundles ptxas); its results document."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    out = tmp_path_factory.mktemp("static") / "static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-m", "bench.static", "--subset", "test", "--no-csrc", "--json", str(out)],
                         cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    assert out.exists(), run.stderr[-4000:]
    return json.loads(out.read_text())
