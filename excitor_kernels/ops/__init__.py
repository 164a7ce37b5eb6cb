"""One file per operator: its custom ops, autograd and public function (shared Triton kernels in
``_triton_attention``)."""
from .adapter_attention import adapter_attention
from .excitor_attention import excitor_attention

__all__ = ["adapter_attention", "excitor_attention"]
