"""One file per operator: its custom ops, autograd and public function (shared Triton kernels in
``_triton_attention``)."""
from .adapter_attention import adapter_attention, adapter_attention_varlen
from .excitor_attention import excitor_attention, excitor_attention_varlen

__all__ = ["adapter_attention", "adapter_attention_varlen", "excitor_attention", "excitor_attention_varlen"]
