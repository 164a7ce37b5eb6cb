"""Test configuration: the fused kernels run interpreted on the CPU when no GPU is present.

TRITON_INTERPRET must be set before triton decorates the kernels, hence here, before any test module
imports the package.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture
def deterministic_torch():
    """torch.use_deterministic_algorithms(True) for one test: on a GPU, SDPA's own backward (FlashAttention, cuDNN,
    memory-efficient attention) repeats bitwise only then; ``deterministic=True`` covers our kernels."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
