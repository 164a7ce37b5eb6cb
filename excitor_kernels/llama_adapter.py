"""Checkpoints of the official LLaMA-Adapter code (OpenGVLab/LLaMA-Adapter) in and out of ``ExcitorAttention``.

What the official code computes in each adapted layer, the top ``L`` decoder layers (layer ``n_layers - L + j``
gets the ``j``-th block of ``P`` rows of one embedding table)::

    prompts = adapter_query.weight.reshape(L, P, dim)[j]     (+ visual_query (B, P, dim) in V2)
    pk, pv  = wk(prompts), wv(prompts)                       frozen projections, no rotary position
    o_i     = sum_j softmax_j(<q_i, k_j> / sqrt(d)) v_j + g[h] * sum_n softmax_n(<q_i, pk_n> / sqrt(d)) pv_n

i.e. ``adapter_attention`` (the prompt softmax is separate from the token softmax) with the per-head gate
``g`` of ``gate (1, H, 1, 1)`` (zero init) taken as

=================  ==========================================================  =========================
variant            official code                                               ``g``
=================  ==========================================================  =========================
``"v1"``           ``alpaca_finetuning_v1/llama/model.py`` (training)          ``tanh(gate)``
``"v1-inference"`` ``llama/model.py`` + ``example.py`` (the released           ``gate`` (raw)
                   inference code that runs ``llama_adapter_len10_layer30``)
``"v2"``           ``llama_adapter_v2_multimodal*/llama/llama.py``             ``tanh(gate) * new_gate``
=================  ==========================================================  =========================

``new_gate (1, 1, 1, 1)`` (one init) exists only in V2.1 files (the official loader creates it together with
LoRA); without it ``g = tanh(gate)``. V2 adds the same per-sample visual query ``(B, P, dim)`` to the prompts
of every adapted layer: pass it with :func:`~excitor_kernels.set_prompt_context`.

Layouts, as the official code writes them (``extract_adapter_from_checkpoint.py`` of each version):

* v1, a flat dict: ``adapter_query.weight (L * P, dim)`` and ``layers.{i}.attention.gate (1, H, 1, 1)`` for
  every decoder layer ``i`` (those below the adapted ones are never read by the official forward).
* v2, ``{"model": {...}, "config": {...}}``: ``adapter_query.weight``, ``llama.layers.{i}.attention.gate``
  and, in V2.1, ``llama.layers.{i}.attention.new_gate``, next to the visual encoder (``clip_proj``,
  ``visual_query``, ``visual_blocks``, ``visual_proj``) and the bias/norm/LoRA tuning of LLaMA itself. Only
  the adapter part maps onto ``ExcitorAttention``; the rest is refused unless ``strict=False``.

The files hold ``L * P`` prompt rows but neither number alone; like the official loaders (``adapter_len`` and
``query_len`` default to 10 there) ``P = 10`` unless ``num_prompts`` or ``num_layers`` says otherwise.
The official models are multi-head (``H`` key/value heads); a GQA model works too (the prompts go through
its ``k_proj``/``v_proj`` and are shared by the query heads of a group, as in PEFT).
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Union

import torch
from torch import nn

from .patch import adapt_or_check, decoder_layers, excitor_layers, load_adapted_state, top_adapted_layers

# variant -> (key layout, gate activation of ExcitorAttention)
VARIANTS = {"v1": ("v1", "tanh"), "v1-inference": ("v1", "identity"), "v2": ("v2", "tanh")}
OFFICIAL_NUM_PROMPTS = 10
QUERY = "adapter_query.weight"
_PREFIX = {"v1": "layers.", "v2": "llama.layers."}
_GATE_KEY = re.compile(r"^(llama\.)?layers\.(\d+)\.attention\.(gate|new_gate)$")


def _gate_key(layout: str, layer: int, name: str = "gate") -> str:
    return f"{_PREFIX[layout]}{layer}.attention.{name}"


def _read(checkpoint) -> Mapping:
    """The checkpoint as a mapping: given as one, or a ``torch.save`` / safetensors file."""
    if isinstance(checkpoint, Mapping):
        return checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    raise TypeError(f"checkpoint must be a state dict or the path of a file; got {type(checkpoint).__name__}")


def _layout(state: Mapping) -> str:
    """``"v1"`` or ``"v2"`` from the key names, or ``ValueError`` naming what was expected and found."""
    found = {m.group(1) is not None for m in map(_GATE_KEY.match, state) if m and m.group(3) == "gate"}
    if QUERY in state and len(found) == 1:
        return "v2" if found.pop() else "v1"
    keys = sorted(state)
    shown = ", ".join(map(repr, keys[:8])) + (f", ... ({len(keys)} keys)" if len(keys) > 8 else "")
    raise ValueError(f"checkpoint is not an official LLaMA-Adapter file: expected {QUERY!r} with "
                     f"'layers.{{i}}.attention.gate' (v1) or 'llama.layers.{{i}}.attention.gate' (v2), "
                     f"possibly inside a 'model' entry; found {shown or 'no keys'}")


def _split(rows: int, num_prompts: Optional[int], num_layers: Optional[int]) -> tuple:
    """``(P, L)`` with ``P * L == rows`` from the one given (``P = 10`` when neither is)."""
    for name, value in (("num_prompts", num_prompts), ("num_layers", num_layers)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or an int >= 1; got {value!r}")
    if num_prompts is None and num_layers is None:
        num_prompts = OFFICIAL_NUM_PROMPTS
    P = num_prompts if num_prompts is not None else rows // num_layers
    L = num_layers if num_layers is not None else rows // num_prompts
    if P * L != rows or rows == 0:
        raise ValueError(f"{QUERY!r} has {rows} rows, which is not num_layers * num_prompts for num_prompts="
                         f"{num_prompts}, num_layers={num_layers}")
    return P, L


def _model_shape(model: nn.Module) -> tuple:
    """``(decoder layers, hidden size, query heads)`` of a plain or adapted Llama-style model."""
    layers = decoder_layers(model)
    attn = layers[-1].self_attn
    if not all(hasattr(attn, name) for name in ("q_proj", "k_proj", "head_dim")):
        raise TypeError(f"model must be a Llama-style decoder (attention with q_proj, k_proj, head_dim); got "
                        f"{type(attn).__name__}")
    return len(layers), attn.k_proj.in_features, attn.q_proj.out_features // attn.head_dim


def load_llama_adapter(model: nn.Module, checkpoint: Union[Mapping, str, os.PathLike], variant: Optional[str] = None,
                       *, num_prompts: Optional[int] = None, num_layers: Optional[int] = None, strict: bool = True,
                       backend: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Run ``model`` (a transformers Llama) with the adapter of an official LLaMA-Adapter checkpoint.

    Args:
        model: a plain model, adapted here with ``apply_excitor(mode="adapter")`` on the top ``L`` layers, or
            one already adapted with exactly the options the checkpoint needs.
        checkpoint: the official state dict (v1 flat, v2 with its ``"model"`` entry) or a file path
            (``torch.load`` with ``weights_only=True``, or ``.safetensors``).
        variant: ``"v1"``, ``"v1-inference"`` or ``"v2"`` (module docstring). The layout (v1 or v2) is read from
            the keys; v2 files need no ``variant``, but v1 files do, since the two official v1 forwards read
            the same keys with different gates.
        num_prompts, num_layers: ``P`` and ``L`` (only their product is in the file); default ``P = 10``.
        strict: refuse keys that are not adapter parameters (V2's visual encoder and bias/norm/LoRA tuning,
            whole training checkpoints); ``False`` loads the adapter and leaves those to the caller.
        backend: operator backend (default ``"auto"`` when adapting, unchanged otherwise).
        dtype: dtype of the new parameters when adapting (default the projections').

    Every check runs before ``model`` is touched: ``ValueError`` names the key and what the model needs for a
    missing gate, a gate or prompt table of the wrong shape, gates of layers the model does not have, more
    adapted layers than the model has, or keys left over with ``strict``. Returns ``model``.
    """
    raw = _read(checkpoint)
    state = raw["model"] if isinstance(raw.get("model"), Mapping) else raw
    layout = _layout(state)
    if variant is None and layout == "v1":
        raise ValueError("checkpoint has the v1 layout, which the official code reads with two different gates: "
                         "pass variant='v1' (alpaca_finetuning_v1 training code, tanh(gate)) or "
                         "variant='v1-inference' (the released inference code llama/model.py, raw gate)")
    variant = variant or layout
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)} or None; got {variant!r}")
    if VARIANTS[variant][0] != layout:
        raise ValueError(f"variant={variant!r} needs the {VARIANTS[variant][0]} layout; the checkpoint has the "
                         f"{layout} layout (keys '{_PREFIX[layout]}{{i}}.attention.gate')")

    n_layers, hidden, heads = _model_shape(model)
    table = state[QUERY]
    if table.dim() != 2 or table.shape[1] != hidden:
        raise ValueError(f"{QUERY!r} has shape {tuple(table.shape)}; the model needs (num_layers * num_prompts, "
                         f"hidden={hidden})")
    P, L = _split(table.shape[0], num_prompts, num_layers)
    if L > n_layers:
        raise ValueError(f"{QUERY!r} holds {L} layers x {P} prompts but the model has {n_layers} decoder layers")
    adapted = range(n_layers - L, n_layers)

    gates, new_gates, used = {}, {}, {QUERY}
    for key in state:
        m = _GATE_KEY.match(key)
        if not m or (m.group(1) is not None) != (layout == "v2") or (m.group(3) == "new_gate" and layout == "v1"):
            continue
        layer = int(m.group(2))
        if layer >= n_layers:
            raise ValueError(f"checkpoint key {key!r} is for decoder layer {layer}; the model has {n_layers} layers "
                             f"(the checkpoint was written for a different model)")
        (gates if m.group(3) == "gate" else new_gates)[layer] = state[key]
        used.add(key)
    for layer in adapted:
        if layer not in gates:
            raise ValueError(f"checkpoint misses key {_gate_key(layout, layer)!r}, the gate of adapted layer "
                             f"{layer} (the top {L} of {n_layers} layers are adapted)")
    for layer, gate in gates.items():
        if tuple(gate.shape) != (1, heads, 1, 1):
            raise ValueError(f"{_gate_key(layout, layer)!r} has shape {tuple(gate.shape)}; the model needs "
                             f"(1, heads={heads}, 1, 1)")
    if new_gates:
        for layer in adapted:
            key = _gate_key(layout, layer, "new_gate")
            if layer not in new_gates:
                raise ValueError(f"checkpoint misses key {key!r}: it has new_gate for some adapted layers, not all")
            if tuple(new_gates[layer].shape) != (1, 1, 1, 1):
                raise ValueError(f"{key!r} has shape {tuple(new_gates[layer].shape)}; it must be (1, 1, 1, 1)")
        if P == 1:
            raise ValueError("checkpoint has new_gate with one prompt per layer, where the official V2 code "
                             "ignores new_gate; it cannot be reproduced")
    unused = sorted(set(state) - used)
    if strict and unused:
        shown = ", ".join(map(repr, unused[:6])) + (f", ... ({len(unused)} keys)" if len(unused) > 6 else "")
        raise ValueError(f"checkpoint holds keys that are not LLaMA-Adapter prompts or gates: {shown}; pass "
                         f"strict=False to load only the adapter (V2's visual encoder and bias/norm/LoRA tuning "
                         f"are not loaded)")

    options = dict(num_prompts=P, num_layers=L, mode="adapter", gate_activation=VARIANTS[variant][1],
                   sim_rank=None, gate_per_head=True, gate_scale=bool(new_gates))
    adapt_or_check(model, options, backend, f"the {variant} checkpoint", dtype=dtype)
    tensors = {}
    for j, layer in enumerate(adapted):
        tensors[f"layers.{layer}.prompts"] = table[j * P:(j + 1) * P]
        tensors[f"layers.{layer}.gate"] = gates[layer].reshape(heads)
        if new_gates:
            tensors[f"layers.{layer}.gate_scale"] = new_gates[layer].reshape(1)
    load_adapted_state(model, tensors, f"the {variant} checkpoint")
    return model


def export_llama_adapter(model: nn.Module, variant: str, dtype: Optional[torch.dtype] = torch.float32) -> dict:
    """The adapter of ``model`` as an official LLaMA-Adapter state dict (the layout of ``variant``).

    ``model`` must be adapted in adapter mode on its top layers with one prompt length and the gate activation
    of ``variant`` (``tanh`` for ``"v1"``/``"v2"``, ``identity`` for ``"v1-inference"``); ``gate_scale``
    (``new_gate``) only with ``"v2"``. A scalar gate (``gate_per_head=False``, e.g. converted from PEFT) is
    written to every head. Gates are written for every decoder layer (zeros below the adapted ones, and
    ``new_gate`` ones) as the official extraction scripts do; for v2 the dict is ``{"model": ..., "config":
    ...}`` with ``config["w_lora"]`` telling the official loader to create ``new_gate`` (it does so only
    together with its zero-initialised LoRA). Tensors are on the CPU in ``dtype`` (float32, the official
    training dtype of adapter parameters; None keeps the parameters' dtype). ``torch.save`` it for the
    official code; :func:`load_llama_adapter` reads it back.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}; got {variant!r}")
    layout, activation = VARIANTS[variant]
    index = top_adapted_layers(model, f"LLaMA-Adapter {variant}")
    layers = excitor_layers(model)
    for layer in layers:
        if layer.mode != "adapter" or layer.gate_activation != activation:
            raise ValueError(f"variant={variant!r} needs mode='adapter', gate_activation={activation!r}; model has "
                             f"mode={layer.mode!r}, gate_activation={layer.gate_activation!r}")
        if layer.gate_scale is not None and layout != "v2":
            raise ValueError(f"variant={variant!r} has no new_gate; model is adapted with gate_scale=True (use 'v2')")
    n_layers, _, heads = _model_shape(model)
    scaled = any(layer.gate_scale is not None for layer in layers)

    def out(t):  # a copy, never a view of a parameter
        return t.detach().to("cpu", dtype or t.dtype, copy=True)

    gate_dtype = layers[0].gate.dtype
    state = {QUERY: out(torch.cat([layer.prompts for layer in layers]))}
    by_index = dict(zip(index, layers))
    for i in range(n_layers):
        layer = by_index.get(i)
        gate = layer.gate.expand(heads) if layer is not None else torch.zeros(heads, dtype=gate_dtype)
        state[_gate_key(layout, i)] = out(gate.reshape(1, heads, 1, 1))
        if scaled:
            has_scale = layer is not None and layer.gate_scale is not None
            scale = layer.gate_scale if has_scale else torch.ones(1, dtype=gate_dtype)  # official init
            state[_gate_key(layout, i, "new_gate")] = out(scale.reshape(1, 1, 1, 1))
    if layout == "v1":
        return state
    return {"model": state, "config": {"w_bias": False, "w_lora": scaled, "lora_rank": 16}}
