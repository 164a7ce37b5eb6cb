"""``python -m excitor_kernels`` (the environment report) and the CUDA build's messages about what is missing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from excitor_kernels import _cuda_build

ROOT = Path(__file__).resolve().parents[1]


def _report(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "excitor_kernels"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("interpret", ["set", "unset"])
def test_report_checks_every_available_backend(interpret):
    """The report self-checks reference and Triton (interpreted without a GPU: in a child process when
    TRITON_INTERPRET is not set) and ends in one PASS line naming the versions."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret == "set":
        env["TRITON_INTERPRET"] = "1"
    run = _report(env)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    for needle in ("torch", "triton", "transformers", "CUDA (torch)", "cuDNN", "driver", "GPU", "CUDA extension"):
        assert any(line.strip().startswith(needle) for line in lines), (needle, run.stdout)
    checks = {line.split()[0]: line for line in lines if line.startswith("  ") and " worst error " in line}
    assert set(checks) >= {"reference", "triton"}, run.stdout
    assert all(" ok " in line for line in checks.values()), run.stdout
    if not torch.cuda.is_available():
        assert "interpreted" in checks["triton"]
        assert any(line.strip().startswith("cuda") and "unavailable: " in line for line in lines), run.stdout
    last = lines[-1]
    assert last.startswith("excitor-kernels ") and last.endswith("| PASS"), last
    assert f"torch {torch.__version__}" in last and "self-check: reference ok, triton ok" in last


def test_self_check_fails_on_a_wrong_backend(monkeypatch):
    """The self-check can fail: a backend that returns a perturbed output is caught."""
    from excitor_kernels import __main__ as report

    real = report._attend
    monkeypatch.setattr(report, "_attend", lambda op, x, backend: real(op, x, backend) * (1.01 if backend else 1))
    result = report.self_check("reference")
    assert not result["ok"] and result["worst"]["excitor"][1] > result["budget"]


@pytest.mark.parametrize("what", ["torch", "gpu", "arch", "nvcc", "ninja"])
def test_cuda_build_names_what_is_missing(what, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None if what == "torch" else "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: what != "gpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (7, 5) if what == "arch" else (9, 0))
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None if what == "nvcc" else "/usr/local/cuda")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: what != "ninja")
    expected = {"torch": "has no CUDA support", "gpu": "no CUDA GPU is visible", "arch": "no sm_80+ GPU (found sm_75",
                "nvcc": "nvcc was not found", "ninja": "ninja is not installed"}[what]
    why = _cuda_build.missing()
    assert why is not None and expected in why, why
    with pytest.raises(RuntimeError, match="cannot build the CUDA backend"):
        _cuda_build.build()


def test_cuda_build_flags_and_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a 7.5")
    monkeypatch.setenv(_cuda_build.CACHE_ENV, str(tmp_path))
    assert _cuda_build.architectures() == [80, 90]
    assert _cuda_build.nvcc_flags([80, 90]) == ["-O3", "-gencode=arch=compute_80,code=sm_80",
                                                "-gencode=arch=compute_90a,code=sm_90a"]
    folder = _cuda_build.cache_dir([80, 90])
    assert folder.parent == tmp_path and torch.__version__.replace("+", "_") in folder.name
    assert folder.name.endswith("sm80_90")
    assert all((_cuda_build.source_dir() / f).exists() for f in _cuda_build.SOURCES)
