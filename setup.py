"""Install excitor-kernels; build the optional CUDA extension when torch has CUDA and nvcc is present."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.4,<3",  # torch.library.custom_op; any installed 2.x satisfies this, so pip never pulls a second torch
    "triton>=3.2; platform_system == 'Linux'",
]
HF = ["transformers>=4.45", "safetensors>=0.4"]
EXTRAS = {
    "hf": HF,
    "test": HF + ["peft>=0.13", "pytest>=8", "hypothesis>=6.100"],
    "bench": HF + ["peft>=0.13", "pytest>=8", "pytest-benchmark>=4", "matplotlib>=3.7"],
}


def cuda_extension():
    """(ext_modules, cmdclass), or a one-line reason why the CUDA backend is not built."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}, "torch is not importable at build time (use `pip install --no-build-isolation`)"
    if torch.version.cuda is None:
        return [], {}, "the installed torch has no CUDA support"
    if cpp_extension.CUDA_HOME is None:
        return [], {}, "no CUDA toolkit (nvcc) found"
    try:
        from csrc_build import extension  # noqa: F401 - defined with the CUDA sources
    except ImportError:
        return [], {}, "the CUDA sources are not part of this tree"
    ext = extension(cpp_extension)
    return [ext], {"build_ext": cpp_extension.BuildExtension}, None


ext_modules, cmdclass, why_not = cuda_extension()
if why_not:
    print(f"excitor-kernels: CUDA backend not built: {why_not}; the reference and Triton backends are installed")

setup(
    name="excitor-kernels",
    version="0.1.0",
    description="Fused attention kernels for LLaMA-Excitor and LLaMA-Adapter prompt tuning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["excitor_kernels", "excitor_kernels.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
