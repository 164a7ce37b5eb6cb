"""The CUDA kernels (csrc/*.cu) must keep compiling for sm_80 and sm_90a: runs .ci/compile_csrc.sh (about
two minutes on 2 cores), so a kernel that stops compiling fails the suite even on a machine without a GPU."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH: the CUDA sources cannot be compiled")
def test_csrc_compiles():
    run = subprocess.run(["bash", str(ROOT / ".ci" / "compile_csrc.sh")], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
