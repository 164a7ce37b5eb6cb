"""Convert between PEFT's ``AdaptionPrompt`` (LLaMA-Adapter) and ``ExcitorAttention`` in adapter mode.

PEFT's ``AdaptedAttention`` (peft/tuners/adaption_prompt/layer.py) wraps the original attention and adds

    o_proj( gate * softmax_n(<q_i, pk_n> / sqrt(d)) pv_n )      pk = k_proj(prompt), pv = v_proj(prompt)

to its output, with ``prompt`` ``(1, P, hidden)``, one plain scalar ``adaption_gate`` ``(1,)`` per layer
(no tanh), the prompts repeated over the query heads of a key/value head (GQA), and the prompt softmax
taken in float32. Since ``o_proj`` is linear without bias this is exactly ``adapter_attention`` with
``gate`` broadcast to every head, i.e. ``ExcitorAttention(mode="adapter", gate_activation="identity",
gate_per_head=False)`` holding the same prompt and gate -- also for gradients, because the scalar gate
stays one parameter. (With a biased ``o_proj`` PEFT adds the bias twice; such models are refused.)
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from .module import ExcitorAttention
from .patch import decoder_layers, excitor_layers, record_options, top_adapted_layers


def _adapted_attentions(model: nn.Module) -> List[Tuple[nn.Module, nn.Module]]:
    from peft.tuners.adaption_prompt.layer import AdaptedAttention

    return [(layer, layer.self_attn) for layer in decoder_layers(model) if isinstance(layer.self_attn, AdaptedAttention)]


def from_peft_adaption_prompt(peft_model: nn.Module, backend: str = "auto") -> nn.Module:
    """Return the transformers model inside ``peft_model`` running ``adapter_attention`` with PEFT's weights.

    ``peft_model`` is a ``PeftModel`` (or ``AdaptionPromptModel``) made with ``AdaptionPromptConfig`` on a
    Llama or Mistral model. The active adapter's layers are converted in place (the prompt and gate
    tensors are copied into new parameters); the PEFT wrapper must not be used afterwards. Only prompts and
    gates require grad in the result.
    """
    from peft.tuners.adaption_prompt import AdaptionPromptModel

    inner = peft_model.base_model if hasattr(peft_model, "peft_config") and hasattr(peft_model, "base_model") \
        else peft_model
    if not isinstance(inner, AdaptionPromptModel):
        raise TypeError(f"peft_model must be a PEFT model made with AdaptionPromptConfig; got "
                        f"{type(peft_model).__name__} wrapping {type(inner).__name__}")
    model = inner.model
    adapted = _adapted_attentions(model)
    if not adapted:
        raise ValueError("peft_model has no active AdaptedAttention layers (is its adapter disabled?)")
    for _, attn in adapted:
        if attn.model.o_proj.bias is not None:
            raise ValueError("peft_model's o_proj has a bias, which PEFT's AdaptedAttention adds twice; "
                             "adapter_attention cannot reproduce that")

    model.requires_grad_(False)
    for layer, attn in adapted:
        new = ExcitorAttention(attn.model, num_prompts=attn.adapter_len, mode="adapter", backend=backend,
                               gate_activation="identity", gate_per_head=False,
                               dtype=attn.adaption_prompt.dtype)
        with torch.no_grad():
            new.prompts.copy_(attn.adaption_prompt[0])
            new.gate.copy_(attn.adaption_gate)
        layer.self_attn = new
    record_options(model)
    return model


def to_peft_adaption_prompt(model: nn.Module, adapter_name: str = "default"):
    """Wrap ``model`` (adapted with PEFT-compatible options) back into a PEFT ``AdaptionPrompt`` model.

    ``model`` must be adapted with ``mode="adapter", gate_activation="identity", gate_per_head=False`` (no
    ``gate_scale``) on
    its top layers (what :func:`from_peft_adaption_prompt` produces). The original attention classes are
    restored around the same projections, ``get_peft_model`` builds the adapter, and the prompts and gates
    are copied in. Returns the ``PeftModel``; ``save_pretrained`` then writes a standard PEFT checkpoint.
    """
    from peft import AdaptionPromptConfig, get_peft_model

    adapted_idx = top_adapted_layers(model, "PEFT")
    layers = excitor_layers(model)
    for layer in layers:
        if (layer.mode != "adapter" or layer.gate_activation != "identity" or layer.gate.numel() != 1
                or layer.gate_scale is not None):
            raise ValueError(f"model must be adapted with mode='adapter', gate_activation='identity', "
                             f"gate_per_head=False, gate_scale=False to match PEFT; got mode={layer.mode!r}, "
                             f"gate_activation={layer.gate_activation!r}, {layer.gate.numel()} gate values per "
                             f"layer, gate_scale={layer.gate_scale is not None}")
    all_layers = decoder_layers(model)
    weights = [(layer.prompts.detach().clone(), layer.gate.detach().clone()) for layer in layers]
    for i in adapted_idx:
        all_layers[i].self_attn = all_layers[i].self_attn.original_attention()
    record_options(model)
    config = AdaptionPromptConfig(adapter_len=layers[0].num_prompts, adapter_layers=len(layers),
                                  task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    with torch.no_grad():
        for (_, attn), (prompts, gate) in zip(_adapted_attentions(peft_model.base_model.model), weights):
            attn.adaption_prompt.copy_(prompts[None])
            attn.adaption_gate.copy_(gate)
    return peft_model
