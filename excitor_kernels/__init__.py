"""excitor-kernels: fused attention kernels for LLaMA-Excitor and LLaMA-Adapter."""
from ._alloc import poisoned_outputs
from .ops import adapter_attention, excitor_attention
from .reference import adapter_attention_reference, excitor_attention_reference

__version__ = "0.1.0"

__all__ = [
    "adapter_attention",
    "excitor_attention",
    "excitor_attention_reference",
    "adapter_attention_reference",
    "poisoned_outputs",
]
