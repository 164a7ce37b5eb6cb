"""Where a run happened: device, driver and library versions, and the name of its results file."""
from __future__ import annotations

import datetime
import importlib.metadata
import platform
import re
import subprocess

import torch

from .timing import HAS_GPU


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def environment() -> dict:
    """Everything the results file records about the machine and software."""
    if HAS_GPU:
        props = torch.cuda.get_device_properties(0)
        name = torch.cuda.get_device_name(0)
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        extra = dict(gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                     capability=f"{props.major}.{props.minor}", driver=_driver())
    else:
        name, slug, extra = f"CPU ({platform.processor() or platform.machine()})", "cpu-smoke", {}
    return dict(
        device=name,
        slug=slug,
        run_type="gpu" if HAS_GPU else "cpu-smoke",
        date=datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if HAS_GPU else None,
        triton=_version("triton"),
        transformers=_version("transformers"),
        peft=_version("peft"),
        flash_attn=_version("flash-attn"),
        flash_attn_4=_version("flash-attn-4"),
        python=platform.python_version(),
        **extra,
    )
