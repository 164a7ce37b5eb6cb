"""Test configuration: the fused kernels run interpreted on the CPU when no GPU is present.

TRITON_INTERPRET must be set before triton decorates the kernels, hence here, before any test module
imports the package.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
