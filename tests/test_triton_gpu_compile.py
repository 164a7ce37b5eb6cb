"""The Triton kernels compile for sm_80 and sm_90 with the GPU tile sizes, within shared memory limits.

Runs ``tests/triton_gpu_compile.py`` in a fresh interpreter without TRITON_INTERPRET (no GPU needed:
triton bundles ptxas). The interpreter that runs the other CPU tests cannot see GPU-only compile errors
or tiles too large for a block's shared memory; this can.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_gpu_compile.py")], env=env,
                         capture_output=True, text=True, timeout=1200)
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    bad = [r for r in results if not r["ok"]]
    assert run.returncode == 0 and results and not bad, (bad, run.stderr[-3000:])
    assert {r["cc"] for r in results} == {80, 90}
    assert {r["kernel"].split("/")[0] for r in results} == {"fwd", "bwd", "bwd_preprocess", "decode_split",
                                                            "decode_combine"}
