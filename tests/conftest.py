"""Test configuration: the fused kernels run interpreted on the CPU when no GPU is present.

TRITON_INTERPRET must be set before triton decorates the kernels, hence here, before any test module
imports the package.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
