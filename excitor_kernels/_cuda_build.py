"""Building the CUDA extension from ``csrc/``: just in time on first use, or ahead of time for a wheel.

Just in time (the default): the first call that runs ``backend="cuda"`` compiles ``csrc/`` with ninja through
``torch.utils.cpp_extension.load``, printing one line (what is built and how long it took), into a cache folder
named after the torch version, the CUDA version and the GPU architectures: ``$EXCITOR_KERNELS_CACHE`` or
``~/.cache/excitor_kernels``. Later processes load the cached library in well under a second; a new torch,
CUDA or GPU architecture gets its own folder.

Ahead of time (for wheels): ``EXCITOR_BUILD_CUDA=1 pip install --no-build-isolation .`` makes ``setup.py``
build ``excitor_kernels._C`` with the same flags (:func:`nvcc_flags`); it is then loaded instead.

This module only imports torch inside its functions, so ``setup.py`` can load it by path.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

SOURCES = ("binding.cpp", "forward.cu", "backward.cu")
LIBRARY = "excitor_kernels_cuda"  # the extension's module name: its ops' namespace and its file's stem
MIN_ARCH = 80  # mma.sync with bfloat16 operands
CACHE_ENV = "EXCITOR_KERNELS_CACHE"


def source_dir() -> Path:
    """``csrc/``: inside the installed package (a wheel) or beside it (a source checkout, an editable install)."""
    here = Path(__file__).resolve().parent
    packaged = here / "csrc"
    return packaged if (packaged / SOURCES[0]).exists() else here.parent / "csrc"


def architectures() -> list[int]:
    """The sm_80+ architectures to build for: ``TORCH_CUDA_ARCH_LIST`` ("8.0;9.0a", "8.6+PTX"), else the
    visible GPUs."""
    import torch

    listed = re.split(r"[;, ]+", os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip())
    caps = [c for c in listed if c[:1].isdigit()] or [
        "%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    archs = {int(c.split("+")[0].rstrip("a").replace(".", "")) for c in caps}
    return sorted(a for a in archs if a >= MIN_ARCH)


def _sm(a: int) -> str:
    """The target of architecture ``a``: 9.0 is built as sm_90a (the wgmma-capable variant)."""
    return f"{a}{'a' * (a == 90)}"


def nvcc_flags(archs: list[int]) -> list[str]:
    """-O3 and one -gencode per architecture (:func:`_sm`)."""
    return ["-O3", *(f"-gencode=arch=compute_{_sm(a)},code=sm_{_sm(a)}" for a in archs)]


def missing() -> str | None:
    """What this machine lacks to build the extension (None when it can): named so a user can act on it."""
    import torch

    if torch.version.cuda is None:
        return f"the installed torch {torch.__version__} has no CUDA support (install a CUDA build of torch)"
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return "no CUDA GPU is visible (the kernels need an sm_80+ GPU: A100, H100, RTX 30xx/40xx or later)"
    if not architectures():
        found = ", ".join(sorted({"sm_%d%d" % torch.cuda.get_device_capability(i)
                                  for i in range(torch.cuda.device_count())}))
        return f"no sm_80+ GPU (found {found}; the kernels use bfloat16 mma.sync, sm_80 or later)"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "nvcc was not found (install the CUDA toolkit matching torch's CUDA, or set CUDA_HOME)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def cache_dir(archs: list[int]) -> Path:
    """One folder per torch version, CUDA version and architecture set."""
    import torch

    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "excitor_kernels")
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}-sm{'_'.join(map(str, archs))}"
    return root / re.sub(r"[^A-Za-z0-9_.-]+", "_", tag)


def _library(folder: Path, name: str) -> Path | None:
    found = sorted(folder.glob(f"{name}*.so")) + sorted(folder.glob(f"{name}*.pyd"))
    return found[0] if found else None


def cached() -> Path | None:
    """The cached library for this machine, when one was built before."""
    if missing() is not None:
        return None
    return _library(cache_dir(architectures()), LIBRARY)


def build():
    """Compile (or load from the cache) the extension; registers the ``excitor_kernels_cuda`` ops."""
    from torch.utils import cpp_extension

    why = missing()
    if why is not None:
        raise RuntimeError(f"excitor-kernels: cannot build the CUDA backend: {why}")
    archs = architectures()
    folder = cache_dir(archs)
    folder.mkdir(parents=True, exist_ok=True)
    src = source_dir()
    library = _library(folder, LIBRARY)
    newest_source = max((src / f).stat().st_mtime for f in (*SOURCES, "common.cuh", "excitor_attention.h"))
    fresh = library is None or library.stat().st_mtime < newest_source  # ninja rebuilds: say so
    if fresh:
        arch_names = ", ".join(f"sm_{_sm(a)}" for a in archs)
        print(f"excitor-kernels: building the CUDA extension for {arch_names} with ninja into {folder} ...",
              end="", flush=True)
    start = time.perf_counter()
    module = cpp_extension.load(
        name=LIBRARY,
        sources=[str(src / f) for f in SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=nvcc_flags(archs),
        build_directory=str(folder),
        verbose=False,
    )
    if fresh:
        print(f" done in {time.perf_counter() - start:.0f} s", flush=True)
    return module
