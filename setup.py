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
    """(ext_modules, cmdclass, reason): the extension excitor_kernels._C from csrc/, or why it is not built.

    Architectures: TORCH_CUDA_ARCH_LIST, else the visible GPUs; sm_80 and later only (bf16 mma.sync),
    and 9.0 is built as sm_90a."""
    import os

    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}, "torch is not importable at build time (use `pip install --no-build-isolation`)"
    if torch.version.cuda is None:
        return [], {}, "the installed torch has no CUDA support"
    if cpp_extension.CUDA_HOME is None:
        return [], {}, "no CUDA toolkit (nvcc) found"
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(",", ";").replace(" ", ";")
    caps = listed.split(";") if listed else [
        "%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    archs = sorted({int(c.split("+")[0].rstrip("a").replace(".", "")) for c in caps if c[:1].isdigit()})
    archs = [a for a in archs if a >= 80]
    if not archs:
        return [], {}, "no sm_80+ architecture in TORCH_CUDA_ARCH_LIST or among the visible GPUs"
    gencode = [f"-gencode=arch=compute_{a}{'a' * (a == 90)},code=sm_{a}{'a' * (a == 90)}" for a in archs]
    root = os.path.dirname(os.path.abspath(__file__))
    ext = cpp_extension.CUDAExtension(
        "excitor_kernels._C",
        [os.path.join("csrc", f) for f in ("binding.cpp", "forward.cu", "backward.cu")],
        include_dirs=[os.path.join(root, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *gencode]},
    )
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
    package_data={"excitor_kernels": ["auto_table.json"]},  # backend="auto"'s measured table, once bench.tune wrote it
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
