"""Install excitor-kernels. The CUDA backend is compiled just in time on its first use (ninja, cached; see
excitor_kernels/_cuda_build.py), so installing needs no compiler and works with build isolation.

Ahead of time, for a wheel: ``EXCITOR_BUILD_CUDA=1 pip install --no-build-isolation .`` (needs the torch to
build against, nvcc, and TORCH_CUDA_ARCH_LIST or a visible sm_80+ GPU) builds ``excitor_kernels._C``.
"""
import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
INSTALL_REQUIRES = [
    # the floors and the newest releases are tested in CI (.ci/run). triton 3.7 and older fail on the kernels
    # (3.7 compiles no float32 dot over 8 keys, the float32 prompt passes' tile; 3.6 and older: the CPU interpreter); torch 2.12 and older
    # pin those tritons in their PyPI builds (2.14 takes triton 3.8)
    "torch>=2.13",  # an installed torch 2.13+ is kept as it is
    "triton>=3.8; platform_system == 'Linux'",
    "ninja; platform_system == 'Linux'",  # the just-in-time build of the CUDA backend
]
HF = ["transformers>=5.0", "safetensors>=0.4"]  # the floor is tested in CI (.ci/run), as is the newest release
EXTRAS = {
    "hf": HF,
    "test": HF + ["peft>=0.21", "trl", "pytest>=8", "hypothesis>=6.100"],
    "bench": HF + ["peft>=0.21", "pytest>=8", "pytest-benchmark>=4", "matplotlib>=3.7"],
}


class BuildPy(build_py):
    """Ship csrc/ inside the package, where the just-in-time build finds it in a wheel install."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "excitor_kernels" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for f in (ROOT / "csrc").iterdir():
            if f.suffix in (".cpp", ".cu", ".cuh", ".h"):
                shutil.copy2(f, target / f.name)


def ahead_of_time_extension():
    """([CUDAExtension excitor_kernels._C], {build_ext}) when EXCITOR_BUILD_CUDA=1, else nothing."""
    if os.environ.get("EXCITOR_BUILD_CUDA", "0") != "1":
        return [], {}
    spec = importlib.util.spec_from_file_location("_cuda_build", ROOT / "excitor_kernels" / "_cuda_build.py")
    cuda_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_build)  # needs torch: use --no-build-isolation
    why = cuda_build.missing()
    if why is not None:
        raise SystemExit(f"EXCITOR_BUILD_CUDA=1: cannot build the CUDA extension: {why}")
    from torch.utils import cpp_extension

    ext = cpp_extension.CUDAExtension(
        "excitor_kernels._C",
        [os.path.join("csrc", f) for f in cuda_build.SOURCES],
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": cuda_build.nvcc_flags(cuda_build.architectures())},
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = ahead_of_time_extension()
setup(
    name="excitor-kernels",
    version="0.1.0",
    description="Fused attention kernels for LLaMA-Excitor and LLaMA-Adapter prompt tuning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["excitor_kernels", "excitor_kernels.*"]),
    package_data={"excitor_kernels": ["auto_table.json"]},  # backend="auto"'s measured table, once bench.tune wrote it
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPy, **cmdclass},
)
