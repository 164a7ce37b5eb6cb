"""excitor-kernels: fused attention kernels for LLaMA-Excitor and LLaMA-Adapter.

What the operators compute, differentiate and support: docs/contract.md. ``python -m excitor_kernels`` reports
the environment and self-checks the available backends.
"""
from ._alloc import poisoned_outputs
from ._dispatch import explain_backend
from .ops import adapter_attention, adapter_attention_varlen, excitor_attention, excitor_attention_varlen
from .reference import adapter_attention_reference, excitor_attention_reference
from .module import ExcitorAttention
from .patch import (apply_excitor, from_pretrained, load_excitor, prompt_context, save_excitor, set_backend,
                    set_prompt_context)
from .peft_interop import from_peft_adaption_prompt, to_peft_adaption_prompt
from .llama_adapter import export_llama_adapter, load_llama_adapter
from .peft_method import register as _register_peft_method

_register_peft_method()  # ExcitorConfig for get_peft_model when peft is installed (optional)


def __getattr__(name):
    """``ExcitorConfig`` (the PEFT method's config) when peft is installed."""
    if name == "ExcitorConfig":
        from .peft_method import __getattr__ as peft_method_attribute

        return peft_method_attribute(name)
    raise AttributeError(f"module 'excitor_kernels' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "adapter_attention",
    "excitor_attention",
    "adapter_attention_varlen",
    "excitor_attention_varlen",
    "excitor_attention_reference",
    "adapter_attention_reference",
    "poisoned_outputs",
    "explain_backend",
    "ExcitorAttention",
    "apply_excitor",
    "save_excitor",
    "load_excitor",
    "from_pretrained",
    "ExcitorConfig",
    "set_backend",
    "set_prompt_context",
    "prompt_context",
    "from_peft_adaption_prompt",
    "to_peft_adaption_prompt",
    "load_llama_adapter",
    "export_llama_adapter",
]
