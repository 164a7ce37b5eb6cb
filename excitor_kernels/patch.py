"""Adapt a whole transformers model: ``apply_excitor``, save/load, per-sample prompt context.

``apply_excitor`` replaces the ``self_attn`` of the top ``num_layers`` decoder layers with
:class:`~excitor_kernels.module.ExcitorAttention` and freezes every other parameter. Everything is
validated before the model is touched, so a bad argument leaves the model as it was.

Trainable parameters per adapted layer: ``P * hidden`` (prompts) + ``Hq`` gates (1 with
``gate_per_head=False``) + ``sim_rank * (hidden + Hkv * d)`` with ``sim_rank`` (+ 1 with ``gate_scale``).

Files written by ``save_excitor`` are safetensors holding only those parameters, named
``layers.{i}.{prompts|gate|gate_scale|sim_down.weight|sim_up.weight}`` with ``i`` the decoder layer index, and the
options as json under the metadata key ``"excitor"``.
"""
from __future__ import annotations

import contextlib
import json
from typing import Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from .module import ExcitorAttention, check_attention, check_options

FORMAT_VERSION = 1
_OPTIONS = ("num_prompts", "mode", "gate_activation", "sim_rank")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The first ``nn.ModuleList`` of ``model`` whose entries all have a ``self_attn``."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(hasattr(m, "self_attn") for m in module):
            return module
    raise TypeError(f"model must be a transformers decoder whose layers have a `self_attn` (Llama, Mistral, "
                    f"Qwen2); got {type(model).__name__} without such a layer list")


def excitor_layers(model: nn.Module) -> List[ExcitorAttention]:
    """The adapted attention layers of ``model``, bottom to top."""
    return [m for m in model.modules() if isinstance(m, ExcitorAttention)]


def apply_excitor(model: nn.Module, num_prompts: int = 10, num_layers: Optional[int] = None, mode: str = "excitor",
                  backend: str = "auto", gate_activation: str = "tanh", sim_rank: Optional[int] = None,
                  gate_per_head: bool = True, init_std: Optional[float] = None,
                  dtype: Optional[torch.dtype] = None, gate_scale: bool = False) -> nn.Module:
    """Adapt the top ``num_layers`` decoder layers (all when None) in place and return ``model``.

    Only the new prompts, gates (and similarity projections) require grad afterwards. Raises
    ``TypeError``/``ValueError`` naming the argument, before any change, for a non-Llama-style model, an
    already adapted model, ``num_layers`` out of ``1..len(layers)`` or a bad option (see
    :class:`ExcitorAttention` for their meaning).
    """
    check_options(num_prompts=num_prompts, mode=mode, backend=backend, gate_activation=gate_activation,
                  sim_rank=sim_rank, init_std=init_std, gate_scale=gate_scale)
    layers = decoder_layers(model)
    if excitor_layers(model):
        raise ValueError("model is already adapted (it contains ExcitorAttention layers); adapt it only once")
    if num_layers is None:
        num_layers = len(layers)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= len(layers):
        raise ValueError(f"num_layers must be None or an int in 1..{len(layers)} (the model's decoder layers); "
                         f"got {num_layers!r}")
    targets = list(layers)[len(layers) - num_layers:]
    for i, layer in enumerate(targets, start=len(layers) - num_layers):
        check_attention(layer.self_attn, f"layers[{i}].self_attn")

    model.requires_grad_(False)
    for layer in targets:
        layer.self_attn = ExcitorAttention(layer.self_attn, num_prompts=num_prompts, mode=mode, backend=backend,
                                           gate_activation=gate_activation, gate_per_head=gate_per_head,
                                           sim_rank=sim_rank, init_std=init_std, dtype=dtype,
                                           gate_scale=gate_scale)
    record_options(model)
    return model


def record_options(model: nn.Module) -> None:
    """Keep the options of the adapted layers in ``model.config.excitor`` (none when no layer is adapted), so
    that ``save_pretrained`` writes them into config.json beside the weights (which hold the adapted
    parameters under their module names) and :func:`from_pretrained` restores the model in one call."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    if excitor_layers(model):
        config.excitor = excitor_config(model)
    elif hasattr(config, "excitor"):
        del config.excitor


def from_pretrained(path: str, *, backend: Optional[str] = None, model_class=None, **kwargs) -> nn.Module:
    """Load a model that ``save_pretrained`` wrote after :func:`apply_excitor`, adapted as it was saved.

    ``path`` is a directory or a hub id; ``kwargs`` go to ``model_class.from_pretrained`` (default
    ``AutoModelForCausalLM``: ``torch_dtype``, ``revision``, ...). The base weights load as transformers loads
    them (it lists the adapted tensors as unexpected at that step); the options come from config.json's
    ``excitor`` entry and the adapted tensors from the checkpoint's safetensors files. ``backend`` defaults to
    ``"auto"``. Raises ``ValueError`` when the checkpoint holds no options or misses an adapted tensor.
    """
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    model = model_class.from_pretrained(path, **kwargs)
    saved = getattr(model.config, "excitor", None)
    if not isinstance(saved, dict):
        raise ValueError(f"{path!r} has no 'excitor' entry in its config.json: it was not saved from a model "
                         f"adapted with apply_excitor")
    if saved.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path!r} has excitor format version {saved.get('version')}; this code reads {FORMAT_VERSION}")
    options = {"gate_scale": False, **{k: v for k, v in saved.items() if k != "version"}}
    tensors = _checkpoint_tensors(path, kwargs.get("revision"))
    names = [n for n in tensors if n.endswith(".prompts")]
    dtype = tensors[names[0]].dtype if names else None
    apply_excitor(model, backend=backend or "auto", dtype=dtype, **options)
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(state) - set(tensors))
    if missing:
        raise ValueError(f"{path!r} misses the adapted tensors {missing}")
    with torch.no_grad():
        for name, p in state.items():
            if p.shape != tensors[name].shape:
                raise ValueError(f"{name} has shape {tuple(p.shape)} in the model and {tuple(tensors[name].shape)} "
                                 f"in {path!r}")
            p.copy_(tensors[name])
    return model


def _checkpoint_tensors(path: str, revision: Optional[str] = None) -> dict:
    """The adapted tensors (names ending in an ExcitorAttention parameter) of a safetensors checkpoint."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    index = cached_file(path, "model.safetensors.index.json", revision=revision,
                        _raise_exceptions_for_missing_entries=False)
    if index is not None:
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    ends = (".prompts", ".gate", ".gate_scale", ".sim_down.weight", ".sim_up.weight")
    tensors = {}
    for name in files:
        with safe_open(cached_file(path, name, revision=revision), framework="pt") as f:
            for key in f.keys():
                if key.endswith(ends) and ".self_attn." in key:
                    tensors[key] = f.get_tensor(key)
    return tensors


def set_backend(model: nn.Module, backend: str) -> None:
    """Switch every adapted layer of ``model`` to operator ``backend``."""
    layers = excitor_layers(model)
    for layer in layers:
        check_options(num_prompts=layer.num_prompts, mode=layer.mode, backend=backend,
                      gate_activation=layer.gate_activation, sim_rank=layer.sim_rank, init_std=None)
        layer.backend = backend


def set_prompt_context(model: nn.Module, context: Union[None, torch.Tensor, Sequence[torch.Tensor]]) -> None:
    """Add a per-sample context ``(B, num_prompts, hidden)`` to the prompts of every adapted layer.

    ``context`` is one tensor for all adapted layers, a sequence with one tensor per adapted layer (bottom
    to top), or None to clear it. With a context the prompt keys are per sample, ``(B, Hkv, P, d)``:
    the multi-modal variant (e.g. projected image features added to the prompts). The context stays in
    place for every following forward (generation included) until cleared; its batch size must match.
    Gradients flow into the context.
    """
    layers = excitor_layers(model)
    if not layers:
        raise ValueError("model has no ExcitorAttention layers; call apply_excitor first")
    if context is None or isinstance(context, torch.Tensor):
        contexts = [context] * len(layers)
    else:
        contexts = list(context)
        if len(contexts) != len(layers):
            raise ValueError(f"context must be one tensor or {len(layers)} tensors (one per adapted layer); "
                             f"got {len(contexts)}")
    for layer, ctx in zip(layers, contexts):
        want = (layer.num_prompts, layer.prompts.shape[1])
        if ctx is not None and (not isinstance(ctx, torch.Tensor) or ctx.dim() != 3 or tuple(ctx.shape[1:]) != want):
            got = tuple(ctx.shape) if isinstance(ctx, torch.Tensor) else type(ctx).__name__
            raise ValueError(f"context must have shape (B, num_prompts={want[0]}, hidden={want[1]}); got {got}")
    for layer, ctx in zip(layers, contexts):
        layer.prompt_context = ctx


@contextlib.contextmanager
def prompt_context(model: nn.Module, context) -> Iterator[nn.Module]:
    """``with prompt_context(model, ctx): model(...)`` -- :func:`set_prompt_context`, cleared on exit."""
    set_prompt_context(model, context)
    try:
        yield model
    finally:
        set_prompt_context(model, None)


def _layer_index(model: nn.Module) -> dict:
    layers = decoder_layers(model)
    return {id(layer.self_attn): i for i, layer in enumerate(layers) if isinstance(layer.self_attn, ExcitorAttention)}


def top_adapted_layers(model: nn.Module, target: str) -> List[int]:
    """Indices of the adapted decoder layers of ``model``, checked to be the top ones with one prompt
    length, as ``target`` (a checkpoint format named in the errors) requires."""
    adapted = excitor_layers(model)
    if not adapted:
        raise ValueError("model has no ExcitorAttention layers; nothing to convert")
    layers = decoder_layers(model)
    index = [i for i, layer in enumerate(layers) if isinstance(layer.self_attn, ExcitorAttention)]
    if index != list(range(len(layers) - len(index), len(layers))):
        raise ValueError(f"{target} adapts the top layers only; model has adapted layers {index}")
    if len({layer.num_prompts for layer in adapted}) != 1:
        raise ValueError(f"{target} uses one prompt length for all layers; model's layers have "
                         f"{[layer.num_prompts for layer in adapted]}")
    return index


def excitor_state_dict(model: nn.Module) -> dict:
    """``{"layers.{i}.{name}": tensor}`` for the trainable parameters of every adapted layer."""
    index = _layer_index(model)
    if not index:
        raise ValueError("model has no ExcitorAttention layers; call apply_excitor first")
    state = {}
    for layer in excitor_layers(model):
        for name, p in layer.named_parameters():
            if not name.split(".")[0] in ("q_proj", "k_proj", "v_proj", "o_proj"):
                state[f"layers.{index[id(layer)]}.{name}"] = p
    return state


def excitor_config(model: nn.Module) -> dict:
    """The options ``apply_excitor`` needs to rebuild the adapted layers of ``model``."""
    layers = excitor_layers(model)
    if not layers:
        raise ValueError("model has no ExcitorAttention layers; call apply_excitor first")
    first = layers[0]
    config = {name: getattr(first, name) for name in _OPTIONS}
    config.update(num_layers=len(layers), gate_per_head=first.gate.numel() > 1,
                  gate_scale=first.gate_scale is not None, version=FORMAT_VERSION)
    return config


def save_excitor(model: nn.Module, path: str) -> None:
    """Write the adapted parameters of ``model`` and their options to the safetensors file ``path``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in excitor_state_dict(model).items()}
    save_file(tensors, path, metadata={"excitor": json.dumps(excitor_config(model))})


def load_excitor(model: nn.Module, path: str, backend: Optional[str] = None) -> nn.Module:
    """Load ``path`` into ``model`` and return it.

    A plain model is adapted first with the saved options (``backend`` defaults to ``"auto"``); an adapted
    model must have the same options and layers. Raises ``ValueError`` on any mismatch.
    """
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        if "excitor" not in metadata:
            raise ValueError(f"path {path!r} is not an excitor file (no 'excitor' metadata)")
        saved = json.loads(metadata["excitor"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if saved.get("version") != FORMAT_VERSION:
        raise ValueError(f"path {path!r} has format version {saved.get('version')}; this code reads {FORMAT_VERSION}")
    options = {"gate_scale": False, **{k: v for k, v in saved.items() if k != "version"}}  # older files: no gate_scale
    adapt_or_check(model, options, backend, f"the file {path!r}")
    load_adapted_state(model, tensors, f"path {path!r}")
    return model


def adapt_or_check(model: nn.Module, options: dict, backend: Optional[str], source: str,
                   dtype: Optional[torch.dtype] = None) -> None:
    """Adapt a plain ``model`` with ``options`` (``apply_excitor`` keywords, ``num_layers`` included; new
    parameters in ``dtype``), or check that an adapted one has exactly these options (``ValueError`` naming
    ``source`` otherwise); set ``backend`` when given (``"auto"`` for a plain model without one)."""
    if not excitor_layers(model):
        apply_excitor(model, backend=backend or "auto", dtype=dtype, **options)
        return
    current = {k: v for k, v in excitor_config(model).items() if k != "version"}
    if current != options:
        raise ValueError(f"model is adapted with {current}; {source} holds {options}")
    if backend is not None:
        set_backend(model, backend)


def load_adapted_state(model: nn.Module, tensors: dict, source: str) -> None:
    """Copy ``tensors``, named as :func:`excitor_state_dict` names them, into the adapted ``model``: the
    names must match exactly and every shape agree (checked before anything is copied)."""
    state = excitor_state_dict(model)
    if set(state) != set(tensors):
        raise ValueError(f"{source} holds {sorted(set(tensors) - set(state))} unknown and misses "
                         f"{sorted(set(state) - set(tensors))} parameters")
    with torch.no_grad():
        for name, p in state.items():
            if p.shape != tensors[name].shape:
                raise ValueError(f"{name} has shape {tuple(p.shape)} in the model and {tuple(tensors[name].shape)} "
                                 f"in {source}")
        for name, p in state.items():
            p.copy_(tensors[name])
