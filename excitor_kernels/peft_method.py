"""Excitor and Adapter as a PEFT method: ``get_peft_model(model, ExcitorConfig(...))``.

One method, ``peft_type="EXCITOR"``, with ``mode="excitor" | "adapter"`` in its config: both modes are the same
module swap (:func:`~excitor_kernels.apply_excitor`) with the same trainable tensors and checkpoint layout, so one
config class, one tuner and one file format serve both, exactly as ``apply_excitor`` takes ``mode``.

Registered when ``excitor_kernels`` is imported with peft installed (peft stays optional). PEFT takes methods it
does not ship through ``peft.utils.register_peft_method``, which needs a member of its ``PeftType`` enum: the
member ``EXCITOR`` is added to that enum first. The tuner follows the protocol of PEFT's own prompt adapter
(``AdaptionPrompt``: ``is_adaption_prompt``), so ``PeftModel`` adds, disables, saves and loads it as it does that
one: ``disable_adapter()`` swaps the model's original attention layers back in (the base model's logits exactly),
``save_pretrained`` writes ``adapter_config.json`` and ``adapter_model.safetensors`` with the trainable tensors only,
``PeftModel.from_pretrained(fresh_base, path)`` restores them. One adapter per model.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from .module import ExcitorAttention
from .patch import apply_excitor, decoder_layers, excitor_config, excitor_layers

NAME = "excitor"
PARAMETERS = ("prompts", "gate", "gate_scale", "sim_down", "sim_up")  # ExcitorAttention's trainable tensors


def _add_peft_type():
    """``PeftType.EXCITOR``: a member of PEFT's str enum, added once (the enum has no public way to extend it)."""
    from peft.utils.peft_types import PeftType

    if "EXCITOR" in PeftType.__members__:
        return PeftType.EXCITOR
    member = str.__new__(PeftType, "EXCITOR")
    member._name_, member._value_ = "EXCITOR", "EXCITOR"
    member.__objclass__ = PeftType
    type.__setattr__(PeftType, "EXCITOR", member)
    PeftType._member_map_["EXCITOR"] = member
    PeftType._value2member_map_["EXCITOR"] = member
    PeftType._member_names_.append("EXCITOR")
    return member


def register() -> bool:
    """Register the method with PEFT (once); False when peft is not installed."""
    try:
        from peft import PeftConfig
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
        from peft.utils import register_peft_method
    except ImportError:
        return False
    peft_type = _add_peft_type()
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        config_cls, model_cls = _classes(PeftConfig, peft_type)
        register_peft_method(name=NAME, config_cls=config_cls, model_cls=model_cls, prefix="excitor_")
    return True


_CLASSES: dict = {}


def _classes(PeftConfig, peft_type):
    """(ExcitorConfig, ExcitorModel), defined once peft is importable."""
    if _CLASSES:
        return _CLASSES["config"], _CLASSES["model"]

    @dataclass
    class ExcitorConfig(PeftConfig):
        """The options of :func:`~excitor_kernels.apply_excitor` as a PEFT config (see its docstring)."""

        num_prompts: int = field(default=10, metadata={"help": "P, the learnable prompt tokens per layer"})
        num_layers: Optional[int] = field(default=None, metadata={"help": "adapt the top layers (all when None)"})
        mode: str = field(default="excitor", metadata={"help": "'excitor' or 'adapter'"})
        backend: str = field(default="auto", metadata={"help": "operator backend (not saved into the tensors)"})
        gate_activation: str = field(default="tanh", metadata={"help": "'tanh' or 'identity'"})
        gate_per_head: bool = field(default=True, metadata={"help": "one gate per query head, or one scalar"})
        gate_scale: bool = field(default=False, metadata={"help": "a learnable scalar times the gate (V2.1)"})
        sim_rank: Optional[int] = field(default=None, metadata={"help": "rank of the similarity projection"})
        init_std: Optional[float] = field(default=None, metadata={"help": "std of the prompts' normal init"})

        def __post_init__(self):
            super().__post_init__()
            self.peft_type = peft_type

        @property
        def is_adaption_prompt(self) -> bool:  # PeftModel's protocol for prompt adapters that swap layers
            return True

        def apply_options(self) -> dict:
            return dict(num_prompts=self.num_prompts, num_layers=self.num_layers, mode=self.mode,
                        backend=self.backend, gate_activation=self.gate_activation,
                        gate_per_head=self.gate_per_head, gate_scale=self.gate_scale, sim_rank=self.sim_rank,
                        init_std=self.init_std)

    ExcitorConfig.__module__ = __name__
    ExcitorConfig.__qualname__ = "ExcitorConfig"

    class ExcitorModel(nn.Module):
        """The PEFT tuner: the adapted model, one adapter; disabling swaps the original layers back in."""

        def __init__(self, model, configs: dict, adapter_name: str):
            super().__init__()
            self.model = model
            self.peft_config: dict = {}
            self._active_adapter = None
            self._enabled = True
            self._swapped: list = []  # (decoder layer, the adapted attention) while disabled
            self.add_adapter(adapter_name, configs[adapter_name])

        def forward(self, *args, **kwargs):
            return self.model(*args, **kwargs)

        def add_adapter(self, adapter_name: str, config) -> None:
            if self.peft_config:
                raise ValueError(f"an Excitor PEFT model holds one adapter; it has {list(self.peft_config)}, "
                                 f"cannot add {adapter_name!r}")
            apply_excitor(self.model, **config.apply_options())
            self.peft_config[adapter_name] = config
            self._active_adapter = adapter_name
            if config.inference_mode:
                self.model.requires_grad_(False)

        def delete_adapter(self, adapter_name: str) -> None:
            raise ValueError("an Excitor PEFT model holds one adapter and cannot delete it; use get_base_model() "
                             "on a fresh base or ExcitorAttention.original_attention()")

        @property
        def active_adapters(self) -> list:
            return [] if self._active_adapter is None else [self._active_adapter]

        def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
            if adapter_name != self._active_adapter:
                raise ValueError(f"adapter {adapter_name!r} does not exist; this model has {self.active_adapters}")
            if inference_mode:
                self.model.requires_grad_(False)

        @contextlib.contextmanager
        def _temporarily_active(self, adapter_name: str):
            self.set_adapter(adapter_name)
            was_enabled = self._enabled
            if not was_enabled:
                self.enable_adapter_layers()
            try:
                yield
            finally:
                if not was_enabled:
                    self.disable_adapter_layers()

        def disable_adapter_layers(self):
            if self._enabled:
                for layer in decoder_layers(self.model):
                    if isinstance(layer.self_attn, ExcitorAttention):
                        self._swapped.append((layer, layer.self_attn))
                        layer.self_attn = layer.self_attn.original_attention()
                self._enabled = False

        def enable_adapter_layers(self):
            if not self._enabled:
                for layer, attention in self._swapped:
                    layer.self_attn = attention
                self._swapped.clear()
                self._enabled = True

        def __getattr__(self, name: str):
            try:
                return super().__getattr__(name)
            except AttributeError:
                if name == "model":
                    raise
                return getattr(self.model, name)

        @classmethod
        def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
            return {k: v for k, v in state_dict.items()
                    if ".self_attn." in k and k.split(".self_attn.")[-1].split(".")[0] in PARAMETERS}

        @classmethod
        def _remove_adapter_name_from_key(cls, key, adapter_name):
            return key

        @classmethod
        def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
            return state_dict

    ExcitorModel.__module__ = __name__
    ExcitorModel.__qualname__ = "ExcitorModel"
    _CLASSES.update(config=ExcitorConfig, model=ExcitorModel)
    return ExcitorConfig, ExcitorModel


def __getattr__(name):
    """``ExcitorConfig`` / ``ExcitorModel`` once peft is importable."""
    if name in ("ExcitorConfig", "ExcitorModel"):
        if not register():
            raise ImportError(f"{name} needs peft: pip install peft")
        return _CLASSES["config" if name == "ExcitorConfig" else "model"]
    raise AttributeError(name)


def from_adaption_prompt(peft_model, *, backend: str = "auto"):
    """A PEFT ``AdaptionPrompt`` model converted to an Excitor PEFT model (``mode="adapter"``, identity scalar gate,
    as PEFT computes it): the same logits, now through this package's kernels, one call."""
    import torch
    from peft import get_peft_model

    from .peft_interop import from_peft_adaption_prompt

    register()
    model = from_peft_adaption_prompt(peft_model, backend=backend)
    saved = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    options = {k: v for k, v in excitor_config(model).items() if k != "version"}
    config = _CLASSES["config"](task_type="CAUSAL_LM", backend=backend, **options)
    layers = decoder_layers(model)
    for layer in layers:  # get_peft_model adapts the plain model again from the config
        if isinstance(layer.self_attn, ExcitorAttention):
            layer.self_attn = layer.self_attn.original_attention()
    out = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in out.base_model.model.named_parameters():
            if name in saved:
                p.copy_(saved[name])
    return out


def to_adaption_prompt(peft_model):
    """An Excitor PEFT model in adapter mode with identity scalar gates (PEFT's formula) back to a PEFT
    ``AdaptionPrompt`` model; refused (``ValueError``) for options PEFT's formula cannot express."""
    from .peft_interop import to_peft_adaption_prompt

    model = peft_model.base_model.model
    if not excitor_layers(model):
        raise ValueError("peft_model has no adapted layers (is its adapter disabled?)")
    return to_peft_adaption_prompt(model)
