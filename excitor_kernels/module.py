"""``ExcitorAttention``: a transformers decoder attention layer whose attention carries the Excitor bypass
(or the Adapter prompts), everything else left to the layer itself.

The model's own attention layer stays in charge of its projections, norms (Qwen3's and Gemma3's ``q_norm/
k_norm``, OLMo2's), fused ``qkv_proj`` (Phi3), rotary embedding, KV-cache update and output projection:
``ExcitorAttention(layer)`` is an instance of ``layer``'s own class (a subclass made once per class, with the
same children, attributes and parameter names, so checkpoints load unchanged) whose attention call is routed,
through transformers' attention registry (``AttentionInterface``), to this package's operators. The layer gets
a private copy of its config with ``_attn_implementation = "excitor"``; the model's config, its masks and
every other layer are unchanged. The options the layer passes to its attention function are honoured or
refused, never dropped: ``scaling`` is used, ``softcap`` and attention sinks are refused when the layer is
adapted, a ``sliding_window`` shorter than the keys is refused at the call, and any other option the
function does not know raises ``ValueError`` naming it.

Per layer it owns

* ``prompts`` ``(P, hidden)``: learnable prompt tokens, normal init with ``init_std`` (default N(0, 1) in
  adapter mode, as the official LLaMA-Adapter and PEFT; ``config.initializer_range`` in excitor mode);
* ``gate`` ``(Hq,)`` (or ``(1,)`` with ``gate_per_head=False``, broadcast to all heads): zero init,
  the operator gets ``tanh(gate)`` (``gate_activation="tanh"``) or ``gate`` itself (``"identity"``);
* with ``gate_scale=True``: ``gate_scale`` ``(1,)``, one init, multiplying the activated gate (the scalar
  ``new_gate`` of the official LLaMA-Adapter V2.1);
* with ``sim_rank=r`` (excitor mode only): ``sim_down`` ``(r, hidden)`` and ``sim_up`` ``(Hkv*d, r)``,
  zero-initialised, giving the tokens' side of the prompt similarity

      sim_j = k_j + sim_up(sim_down(x_j))      (k_j as the layer hands it to attention; sim == k at init)

Prompt keys and values: every forward the prompts (plus the optional per-sample context ``(B, P, hidden)``)
run through the layer's own forward with the identity rotation (``cos = 1, sin = 0``: prompts have no
position) and no cache, and the keys and values it hands to the attention function are taken: the prompts
get exactly what the family does to keys and values before RoPE (projections, biases, norms). Mode
``"excitor"`` runs :func:`excitor_attention`, mode ``"adapter"`` :func:`adapter_attention`. With the gate
at zero the layer computes exactly the original layer. An inference forward with a KV cache keeps its prompt keys
and values with the cache for the cache's later forwards (``ExcitorAttention._prompts``: once per generation, not
once per token).

KV cache: the layer updates its cache itself. With ``sim_rank`` the cache it is given is wrapped so that
its key cache holds ``[k | sim]`` concatenated on the head dimension (2d), so cached tokens keep their
similarity keys; the two halves are read back as strided views. A static cache's unfilled slots are cut off
before the attention (:func:`excitor_kernels.padding.filled_keys`).

Padding and packing: see :mod:`excitor_kernels.padding` (batched causal call when exact, per-sample
calls on the kept tokens otherwise; packed sequences, from ``DataCollatorWithFlattening`` for instance,
run the varlen operators, with a prompt context of one entry per packed sequence).
"""
from __future__ import annotations

import copy
import inspect
import weakref
from typing import Optional

import torch
from torch import nn

from ._dispatch import BACKENDS, takes_cache_lengths, takes_varlen
from .ops import adapter_attention, adapter_attention_varlen, excitor_attention, excitor_attention_varlen
from ._validate import MAX_DECODE_QUERIES, version
from .padding import PACKING_KWARGS, attention_layout, position_restarts, traced_ranges

MODES = ("excitor", "adapter")
GATE_ACTIVATIONS = ("tanh", "identity")
IMPLEMENTATION = "excitor"  # the name registered in transformers' AttentionInterface
CACHE_ARGS = ("cache", "past_key_values", "past_key_value")  # the cache argument across transformers releases
# what transformers' continuous batching (paged attention) passes its attention function
PAGED_KWARGS = ("block_table", "read_index", "write_index")
# Keyword arguments a layer may pass its attention function that do not change the attention (or that the
# padding analysis reads); anything else that is not None is an option this function cannot silently drop.
BENIGN_KWARGS = frozenset(("position_ids", "cache_position", "use_cache", "num_items_in_batch",
                           "output_hidden_states", "output_router_logits", "layer_idx", "position_embeddings",
                           *PACKING_KWARGS, *CACHE_ARGS))
_CLASSES: dict = {}  # original attention class -> its ExcitorAttention subclass
# KV cache -> {id(layer): _KeptPrompts}: the prompt keys and values an inference forward made, kept with the cache
# for its later forwards (ExcitorAttention._prompts)
_PROMPTS_OF_CACHE = weakref.WeakKeyDictionary()


class _KeptPrompts:
    """One layer's prompt keys and values kept with a cache: ``state`` what they were made from
    (``ExcitorAttention._prompt_state``, ``kept`` its tensors), ``mark`` the layer's key tensor in the cache (weakly)
    and its version after the layer's last forward, ``before`` that tensor before this forward's update (weakly)."""

    __slots__ = ("state", "pk", "pv", "kept", "mark", "before")

    def __init__(self):
        self.state = self.pk = self.pv = self.kept = self.mark = self.before = None


def _forward_source(cls) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def check_attention(attention: nn.Module, name: str = "attention") -> None:
    """Raise ``TypeError``/``ValueError`` naming what ``attention`` has that the operators cannot honour.

    Accepted: a transformers decoder self-attention layer whose ``forward`` calls the attention registry
    (``ALL_ATTENTION_FUNCTIONS``) with ``config``, ``layer_idx`` and ``head_dim``, causal, without attention
    dropout, logit softcapping or attention sinks, and without a patched ``forward`` (hooks of accelerate or
    another adapter: adapt the model before dispatching it).
    """
    if isinstance(attention, ExcitorAttention):
        raise ValueError(f"{name} is already an ExcitorAttention; adapt a model only once")
    cls = type(attention)
    problems = []
    for attr in ("config", "layer_idx", "head_dim"):
        if not hasattr(attention, attr):
            problems.append(f"no attribute {attr!r}")
    if "ALL_ATTENTION_FUNCTIONS" not in _forward_source(cls):
        problems.append("a forward that does not call transformers' attention registry (ALL_ATTENTION_FUNCTIONS)")
    if "forward" in vars(attention):
        problems.append("a patched forward (accelerate hooks or another adapter; adapt the model first)")
    if getattr(attention, "is_cross_attention", False) or getattr(attention, "is_causal", True) is False:
        problems.append("non-causal or cross attention")
    if problems:
        raise TypeError(f"{name} must be a transformers decoder self-attention layer that calls the attention "
                        f"registry; got {cls.__name__} with {'; '.join(problems)}")
    clashes = _clashes(attention)
    if clashes:
        raise ValueError(f"{name} ({cls.__name__}) has attribute(s) {clashes} of its own, which ExcitorAttention "
                         f"sets or defines itself: its forward would read the adapted layer's")
    config = attention.config
    dropout = getattr(attention, "attention_dropout", 0.0) or 0.0
    if dropout != 0.0:
        raise ValueError(f"{name} has attention_dropout={dropout}; the operators have no attention dropout, "
                         f"set config.attention_dropout=0.0")
    softcap = getattr(attention, "attn_logit_softcapping", getattr(config, "attn_logit_softcapping", None))
    if softcap is not None:
        raise ValueError(f"{name} ({cls.__name__}) applies attention logit softcapping "
                         f"(config.attn_logit_softcapping={softcap}); the operators cannot, set it to None")
    if isinstance(getattr(attention, "sinks", None), torch.Tensor):
        raise ValueError(f"{name} ({cls.__name__}) has attention sinks (sinks); the operators have none")


def _heads(config) -> tuple[int, int]:
    """(query heads, key/value heads) of a layer's config."""
    return config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _clashes(attention: nn.Module) -> list[str]:
    """The names ``ExcitorAttention`` sets on the layer or defines in its class that the layer already has: the
    layer's own forward would read the adapted layer's. Accepted: ``num_heads`` and ``num_kv_heads`` holding the
    config's head counts (the values the adapted layer sets; ``original_attention`` restores the layer's own)."""
    heads = dict(zip(("num_heads", "num_kv_heads"), _heads(attention.config)))
    own = vars(attention)
    taken = set(own) | set(attention._parameters) | set(attention._modules) | set(attention._buffers)
    added = ExcitorAttention.OWN_ATTRIBUTES + ExcitorAttention.OWN_PARAMETERS + ExcitorAttention.OWN_MODULES
    names = [n for n in added if n in taken and not (n in heads and own.get(n) == heads[n])]
    methods = [n for n in vars(ExcitorAttention) if not n.startswith("__") and n not in ("forward", "extra_repr")]
    return names + [n for n in methods if n in taken or hasattr(type(attention), n)]


def check_options(*, num_prompts, mode, backend, gate_activation, sim_rank, init_std, gate_scale=False) -> None:
    """Validate the per-layer options (shared by ``ExcitorAttention`` and ``apply_excitor``)."""
    if not isinstance(gate_scale, bool):
        raise TypeError(f"gate_scale must be a bool; got {gate_scale!r}")
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"num_prompts must be an int >= 1; got {num_prompts!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if gate_activation not in GATE_ACTIVATIONS:
        raise ValueError(f"gate_activation must be one of {GATE_ACTIVATIONS}; got {gate_activation!r}")
    if sim_rank is not None:
        if isinstance(sim_rank, bool) or not isinstance(sim_rank, int) or sim_rank < 1:
            raise ValueError(f"sim_rank must be None or an int >= 1; got {sim_rank!r}")
        if mode != "excitor":
            raise ValueError(f"sim_rank needs mode='excitor' (the adapter has no similarity keys); got mode={mode!r}")
    if init_std is not None and not (isinstance(init_std, (int, float)) and init_std > 0):
        raise ValueError(f"init_std must be None or a float > 0; got {init_std!r}")


def _subclass(cls) -> type:
    """``ExcitorAttention`` mixed into attention class ``cls`` (made once per class)."""
    if cls not in _CLASSES:
        name = f"Excitor{cls.__name__}"
        sub = type(name, (ExcitorAttention, cls), {"__module__": __name__, "__qualname__": name})
        sub._forward_args = tuple(inspect.signature(cls.forward).parameters)[1:]  # without self
        _CLASSES[cls] = sub
    return _CLASSES[cls]


def _rebuild(cls, state):
    """Unpickle / deepcopy an ``ExcitorAttention`` of attention class ``cls``."""
    obj = object.__new__(_subclass(cls))
    obj.__dict__.update(state)
    return obj


def _register() -> None:
    from transformers import AttentionInterface

    if AttentionInterface._global_mapping.get(IMPLEMENTATION) is not _attention_function:
        AttentionInterface.register(IMPLEMENTATION, _attention_function)


class _Capture:
    """Marks the prompt pass: the attention function keeps the keys and values it is handed."""

    keys = values = None


class _Call:
    """What one adapted forward hands its attention function: prompt keys/values, the sim-key terms and whether the
    forward was given a KV cache."""

    def __init__(self, pk, pv, delta, cached: bool = False):
        self.pk, self.pv, self.delta, self.sim, self.cached = pk, pv, delta, None, cached


class _SimCache:
    """A cache seen through a layer with ``sim_rank``: ``update`` stores ``[k | k + delta]`` (2d wide keys)
    and hands back the key half, keeping the sim half for the attention function; all else is the cache's."""

    def __init__(self, cache, call: _Call, head_dim: int):
        self._cache, self._call, self._d = cache, call, head_dim

    def update(self, key_states, value_states, *args, **kwargs):
        wide = torch.cat([key_states, key_states + self._call.delta.to(key_states.dtype)], dim=-1)
        keys, values = self._cache.update(wide, value_states, *args, **kwargs)
        self._call.sim = keys[..., self._d:]
        return keys[..., :self._d], values

    def __getattr__(self, name):
        return getattr(self._cache, name)


class ExcitorAttention(nn.Module):
    """A decoder attention layer whose scores carry the Excitor bypass (or the Adapter prompts).

    ``ExcitorAttention(layer, ...)`` returns an instance of ``layer``'s own class mixed with this one: it shares
    ``layer``'s children and attributes (not copied) and adds the trainable parameters.

    Args:
        attention: the layer to adapt (see :func:`check_attention` for what is refused).
        num_prompts: ``P``, the learnable prompt tokens.
        mode: ``"excitor"`` or ``"adapter"``.
        backend: operator backend, ``"auto" | "reference" | "triton" | "cuda" | "sdpa" | "sdpa_concat"``.
        gate_activation: ``"tanh"`` (Excitor; official LLaMA-Adapter v1 training code and V2) or ``"identity"``
            (PEFT; the released LLaMA-Adapter v1 inference code).
        gate_per_head: one gate per query head, or one scalar broadcast to all heads (PEFT).
        gate_scale: add a learnable scalar (one init) multiplying the activated gate (LLaMA-Adapter V2.1).
        sim_rank: rank of the learnable similarity projection (excitor mode), None for ``sim = k``.
        init_std: std of the prompts' normal init; default 1.0 in adapter mode (official LLaMA-Adapter's
            ``nn.Embedding`` and PEFT's ``normal_()``), ``config.initializer_range`` (or 0.02) in excitor mode.
        dtype: dtype of the new parameters; default the dtype of the layer's first parameter.
    """

    # what the adapted layer adds to the layer (check_attention refuses a layer that has any of it already, but
    # num_heads / num_kv_heads with the config's values: they are kept, _shadowed, for original_attention)
    OWN_ATTRIBUTES = ("attention_class", "original_config", "num_heads", "num_kv_heads", "mode", "backend",
                      "gate_activation", "num_prompts", "sim_rank", "prompt_context", "_shadowed")
    OWN_PARAMETERS = ("prompts", "gate", "gate_scale")
    OWN_MODULES = ("sim_down", "sim_up")

    def __new__(cls, attention=None, *args, **kwargs):
        if cls is ExcitorAttention:
            check_attention(attention)
            cls = _subclass(type(attention))
        return object.__new__(cls)

    def __init__(self, attention: nn.Module, *, num_prompts: int = 10, mode: str = "excitor",
                 backend: str = "auto", gate_activation: str = "tanh", gate_per_head: bool = True,
                 sim_rank: Optional[int] = None, init_std: Optional[float] = None,
                 dtype: Optional[torch.dtype] = None, gate_scale: bool = False):
        check_options(num_prompts=num_prompts, mode=mode, backend=backend, gate_activation=gate_activation,
                      sim_rank=sim_rank, init_std=init_std, gate_scale=gate_scale)
        _register()
        nn.Module.__init__(self)
        fresh = set(vars(self))  # nn.Module's own bookkeeping stays new (no hooks carried over)
        for key, value in vars(attention).items():
            if key not in fresh:
                self.__dict__[key] = value
        self._parameters.update(attention._parameters)
        self._buffers.update(attention._buffers)
        self._non_persistent_buffers_set.update(attention._non_persistent_buffers_set)
        self._modules.update(attention._modules)
        self.training = attention.training
        self._shadowed = {k: v for k, v in vars(attention).items() if k in self.OWN_ATTRIBUTES}
        self.attention_class = type(attention)
        self.original_config = attention.config
        self._mask_none_is_upper_left()  # refuses a model whose layers get no masks from transformers
        config = copy.copy(attention.config)  # this layer alone calls the registered function
        config._attn_implementation_internal = IMPLEMENTATION
        self.config = config

        self.num_heads, self.num_kv_heads = _heads(attention.config)
        self.mode, self.backend, self.gate_activation = mode, backend, gate_activation
        self.num_prompts, self.sim_rank = num_prompts, sim_rank

        weight = next(attention.parameters())
        dtype = dtype or weight.dtype
        hidden = attention.config.hidden_size
        if init_std is not None:
            std = init_std
        else:
            std = 1.0 if mode == "adapter" else getattr(attention.config, "initializer_range", 0.02)
        self.prompts = nn.Parameter(torch.empty(num_prompts, hidden, device=weight.device, dtype=dtype).normal_(0, std))
        self.gate = nn.Parameter(torch.zeros(self.num_heads if gate_per_head else 1, device=weight.device, dtype=dtype))
        self.gate_scale = nn.Parameter(torch.ones(1, device=weight.device, dtype=dtype)) if gate_scale else None
        if sim_rank is not None:
            self.sim_down = nn.Linear(hidden, sim_rank, bias=False, device=weight.device, dtype=dtype)
            self.sim_up = nn.Linear(sim_rank, self.num_kv_heads * self.head_dim, bias=False,
                                    device=weight.device, dtype=dtype)
            nn.init.zeros_(self.sim_up.weight)
        self.prompt_context: Optional[torch.Tensor] = None

    def __reduce_ex__(self, protocol):
        return _rebuild, (self.attention_class, self.__dict__)

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, num_prompts={self.num_prompts}, heads={self.num_heads}/{self.num_kv_heads}, "
                f"head_dim={self.head_dim}, gate_activation={self.gate_activation!r}, "
                f"gate_scale={self.gate_scale is not None}, sim_rank={self.sim_rank}, "
                f"backend={self.backend!r}")

    def gate_values(self) -> torch.Tensor:
        """The ``(Hq,)`` gate the operator gets: ``tanh(gate)`` or ``gate`` (times ``gate_scale`` when present),
        broadcast when scalar."""
        g = torch.tanh(self.gate) if self.gate_activation == "tanh" else self.gate
        if self.gate_scale is not None:
            g = g * self.gate_scale
        return g.expand(self.num_heads).contiguous()

    def _named_arguments(self, args, kwargs) -> dict:
        """The forward's arguments after ``hidden_states``, all by name."""
        if len(args) > len(self._forward_args) - 1:
            raise TypeError(f"{type(self).__name__}.forward got {len(args) + 1} positional arguments")
        named = dict(zip(self._forward_args[1:], args))
        for key, value in kwargs.items():
            if key in named:
                raise TypeError(f"{type(self).__name__}.forward got two values for {key!r}")
            named[key] = value
        return named

    def _prompt_projections(self, hidden_states, position_embeddings):
        """The keys and values the layer makes of its prompts (plus the context), without position:
        ``(Hkv, P, d)`` each, or ``(S, Hkv, P, d)`` with a context of S entries (checked by ``attention``)."""
        x = self.prompts[None]
        if self.prompt_context is not None:
            ctx = self.prompt_context
            if ctx.dim() != 3 or tuple(ctx.shape[1:]) != tuple(self.prompts.shape):
                raise ValueError(f"prompt context must have shape (B samples or packed sequences, "
                                 f"num_prompts={self.num_prompts}, "
                                 f"hidden={self.prompts.shape[1]}); got {tuple(ctx.shape)}")
            x = x + ctx.to(x.dtype)
        x = x.to(hidden_states.dtype)
        capture = _Capture()
        named = {"attention_mask": None, IMPLEMENTATION: capture}
        if position_embeddings is not None:
            if not (isinstance(position_embeddings, (tuple, list)) and len(position_embeddings) == 2
                    and all(isinstance(t, torch.Tensor) for t in position_embeddings)):
                raise TypeError(f"{self.attention_class.__name__} gets position_embeddings that are not a (cos, sin) "
                                f"pair of tensors; the prompts' identity rotation cannot be built")
            cos, sin = position_embeddings
            shape = (*[1] * (cos.dim() - 2), self.num_prompts, cos.shape[-1])
            named["position_embeddings"] = (cos.new_ones(shape), sin.new_zeros(shape))
        self.attention_class.forward(self, x, **named)
        keys, values = capture.keys, capture.values
        if self.prompt_context is None:
            keys, values = keys[0], values[0]
        return keys, values

    def _prompt_state(self, hidden_states) -> tuple:
        """What the prompt keys and values are made from, as identities and version counters (an in-place
        update, an optimizer step or ``load_state_dict``, changes a version; a replaced tensor its identity), and
        the tensors themselves, kept alive so that their identities stay theirs; None where one of them is an
        inference tensor (no version counter: nothing made from it is kept)."""
        kept = (*self.parameters(), *([] if self.prompt_context is None else [self.prompt_context]))
        versions = tuple((id(t), version(t)) for t in kept)
        if any(v is None for _, v in versions):
            return None, kept
        device = hidden_states.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return (hidden_states.dtype, hidden_states.device, autocast, self.prompt_context is None, versions), kept

    def _cache_keys(self, cache) -> Optional[torch.Tensor]:
        """This layer's key tensor in ``cache`` (transformers' ``cache.layers[i].keys``), or None."""
        try:
            keys = cache.layers[self.layer_idx].keys
        except (AttributeError, IndexError, KeyError, TypeError):
            return None
        return keys if isinstance(keys, torch.Tensor) else None

    def _kept_prompts(self, cache) -> Optional[_KeptPrompts]:
        """This layer's kept prompt keys in ``cache`` for an inference forward, or None where nothing is kept."""
        if cache is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        try:
            layers = _PROMPTS_OF_CACHE.setdefault(cache, {})
        except TypeError:  # a cache object that cannot be a weak dictionary's key
            return None
        entry = layers.get(id(self))
        if entry is None:
            entry = layers[id(self)] = _KeptPrompts()
        return entry

    def _prompts(self, hidden_states, position_embeddings, cache, entry):
        """The prompt keys and values of this forward (:meth:`_prompt_projections`). An inference forward with a
        KV cache keeps them with the cache (``entry``), and the cache's next forward (a decoding step) reuses them
        when nothing they are made from has changed and the cache holds what this layer left in it: the layer's
        prompt pass (its projections on ``P`` rows) runs once per generation instead of once per generated token.
        Made again whenever gradients are on, without a cache, under ``torch.compile``, when a parameter or the
        prompt context was replaced or updated in place (its version: an optimizer step, ``load_state_dict``), and
        when the cache was changed by anything but this layer (reset and given to another ``generate`` call,
        cropped, reordered by beam search: its key tensor's identity or version).
        Only a write through ``.data`` between two forwards of one cache bumps no version: the kept prompt keys
        and values are then, like the keys and values the cache holds for its tokens, those of the weights the
        cache was filled with."""
        if entry is None:
            return self._prompt_projections(hidden_states, position_embeddings)
        state, kept = self._prompt_state(hidden_states)
        keys, mark = self._cache_keys(cache), entry.mark
        entry.before = None if keys is None else weakref.ref(keys)
        if (state is not None and entry.state == state and keys is not None and mark is not None
                and mark[0]() is keys and mark[1] == version(keys)):
            return entry.pk, entry.pv
        entry.pk, entry.pv = self._prompt_projections(hidden_states, position_embeddings)
        entry.state, entry.kept = state, kept
        return entry.pk, entry.pv

    def _mark_cache(self, cache, entry) -> None:
        """After the forward: what this layer left in the cache, its key tensor (weakly) and that tensor's version.
        An inference tensor has no version: it is marked only when this forward's update made it (a new tensor,
        as a dynamic cache's concatenation), not when the update wrote into the same one (a static cache, whose
        reset would then go unseen)."""
        keys, before = self._cache_keys(cache), entry.before
        entry.before = None
        if keys is None or (keys.is_inference() and before is not None and before() is keys):
            entry.mark = None
        else:
            entry.mark = (weakref.ref(keys), version(keys))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        named = self._named_arguments(args, kwargs)
        cache = next((named[n] for n in CACHE_ARGS if named.get(n) is not None), None)
        entry = self._kept_prompts(cache)
        pk, pv = self._prompts(hidden_states, named.get("position_embeddings"), cache, entry)
        delta = None
        if self.sim_rank is not None:
            B, M, _ = hidden_states.shape
            delta = self.sim_up(self.sim_down(hidden_states.to(self.sim_down.weight.dtype)))
            delta = delta.view(B, M, -1, self.head_dim).transpose(1, 2)
        call = _Call(pk, pv if self.mode == "adapter" else None, delta, cache is not None)
        if delta is not None:
            for name in CACHE_ARGS:
                if named.get(name) is not None:
                    named[name] = _SimCache(named[name], call, self.head_dim)
        named[IMPLEMENTATION] = call
        out = self.attention_class.forward(self, hidden_states, **named)
        if entry is not None:
            self._mark_cache(cache, entry)
        return out

    def original_attention(self) -> nn.Module:
        """An instance of the adapted class holding the same (shared) children, without the prompts."""
        attention = object.__new__(self.attention_class)
        added = self.OWN_ATTRIBUTES + self.OWN_PARAMETERS + self.OWN_MODULES  # gate_scale=None: an attribute
        attention.__dict__.update({k: v for k, v in vars(self).items() if k not in added})
        attention.__dict__.update(self._shadowed)
        attention._parameters = {k: v for k, v in self._parameters.items() if k not in self.OWN_PARAMETERS}
        attention._modules = {k: v for k, v in self._modules.items() if k not in self.OWN_MODULES}
        attention._buffers = dict(self._buffers)
        attention.config = self.original_config
        return attention

    # -- the attention itself (called by the layer's forward through the registry) --

    def _attend(self, q, k, v, pk, pv, sim, gate, scaling, cache_leftpad=None, cache_seqlens=None):
        """The causal operator on ``(B, H, L, d)`` views (``cache_leftpad``, ``cache_seqlens``: each sample's key
        range)."""
        lengths = dict(cache_leftpad=cache_leftpad, cache_seqlens=cache_seqlens)
        if self.mode == "excitor":
            return excitor_attention(q, k, v, pk, gate, sim_keys=sim, softmax_scale=scaling, backend=self.backend,
                                     **lengths)
        return adapter_attention(q, k, v, pk, pv, gate, softmax_scale=scaling, backend=self.backend, **lengths)

    def _takes_leftpad(self, q, k, v, pk, pv, sim, gate) -> bool:
        """Whether the backend's path for this call serves ``cache_leftpad`` (a left-padded batch in one call)."""
        return takes_cache_lengths(self.mode, q, k, v, pk, gate, prompt_values=pv, sim_keys=sim, backend=self.backend)

    def _traced_layout(self, call, q, k, v, pk, pv, sim, gate, attention_mask, kwargs) -> Optional[str]:
        """How this call runs without the host's mask analysis, or None: inside ``torch.compile``, a call with a mask
        and no packing, with at most as many queries as keys, that is either an inference call of at most 16
        queries (generation steps, a static cache's decoding) or a forward given a KV cache (a prefill: transformers
        builds packed sequences' block masks only without a cache, and those the ranges cannot express) finds each
        sample's keys as one range on the device (:func:`~excitor_kernels.padding.traced_ranges`); ``"ranges"``: one
        call with ``cache_leftpad`` / ``cache_seqlens`` where the path serves them, ``"varlen"``: one varlen call
        over three segments per sample (:meth:`_attend_ranges_varlen`) where the backend has a varlen path."""
        M, N = q.shape[2], k.shape[2]
        if not (torch.compiler.is_compiling() and isinstance(attention_mask, torch.Tensor) and M <= N
                and not any(kwargs.get(n) is not None for n in PACKING_KWARGS)
                and (call.cached or (not torch.is_grad_enabled() and M <= MAX_DECODE_QUERIES))):
            return None
        if self._takes_leftpad(q, k, v, pk, pv, sim, gate):
            return "ranges"
        return "varlen" if takes_varlen(self.backend) else None

    def _attend_ranges_varlen(self, q, k, v, pk, pv, sim, gate, scaling, starts, ends):
        """Sample ``b`` attending to keys ``[starts[b], ends[b])``, causal aligned to ``ends[b]``, as one varlen call
        with no host read: the batch flattened into a pack of three sequences per sample, the padding queries (rows
        before ``starts[b] + M - ends[b]``, which see no key) with the keys before ``starts[b]``, the real queries
        with the range's keys, and no query with the keys from ``ends[b]`` on. The first sequence's rows are
        padding (the caller sets them to 0). Returns ``(B, Hq, M, d)``."""
        B, Hq, M, _ = q.shape
        N = k.shape[2]
        first = (starts + M - ends).clamp(0, M)

        def offsets(*lengths):  # (3B + 1,) int32 offsets of the sequences' lengths, sample by sample
            cu = torch.stack(lengths, 1).reshape(-1).cumsum(0)
            return torch.cat([cu.new_zeros(1), cu]).to(torch.int32)

        cu_q = offsets(first, M - first, torch.zeros_like(first))
        cu_k = offsets(starts, ends - starts, N - ends)

        def flat(t):  # (B, H, L, d) -> (B * L, H, d)
            return None if t is None else t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])

        def per_sequence(t):  # per-sample prompts (B, Hkv, P, d): the sample's for each of its three sequences
            return t.repeat_interleave(3, 0) if t is not None and t.dim() == 4 else t

        o = self._attend_varlen(flat(q), flat(k), flat(v), per_sequence(pk), per_sequence(pv), flat(sim), gate,
                                scaling, (cu_q, cu_k, M, N))
        return o.view(B, M, Hq, -1).transpose(1, 2)

    def _attend_varlen(self, q, k, v, pk, pv, sim, gate, scaling, packing):
        """The varlen operator on packed ``(total, H, d)`` operands."""
        if self.mode == "excitor":
            return excitor_attention_varlen(q, k, v, pk, gate, *packing, sim_keys=sim, softmax_scale=scaling,
                                            backend=self.backend)
        return adapter_attention_varlen(q, k, v, pk, pv, gate, *packing, softmax_scale=scaling, backend=self.backend)

    def _attend_packed(self, q, k, v, pk, pv, sim, gate, scaling, packing):
        """The varlen operator on a packed batch of one; returns ``(1, Hq, M, d)``."""
        def flat(t):  # (1, H, L, d) view -> (L, H, d) view
            return None if t is None else t[0].transpose(0, 1)

        o = self._attend_varlen(flat(q), flat(k), flat(v), pk, pv, flat(sim), gate, scaling, packing)
        return o.transpose(0, 1).unsqueeze(0)

    def _attend_unpadded(self, plan, q, k, v, pk, pv, sim, gate, scaling):
        """A padded batch as one varlen call on its real queries and valid keys, gathered into a pack (a sequence
        per sample; its prompts, when per sample, are per sequence) and scattered back; padding rows are 0.
        Returns ``(B, Hq, M, d)``."""
        (qb, qi), (kb, kj), packing = plan.unpadded()

        def rows(t, b, i):  # (B, H, L, d) -> the (total, H, d) rows (b, i)
            return None if t is None else t.transpose(1, 2)[b, i]

        o = self._attend_varlen(rows(q, qb, qi), rows(k, kb, kj), rows(v, kb, kj), pk, pv, rows(sim, kb, kj), gate,
                                scaling, packing)
        B, Hq, M, _ = q.shape
        return o.new_zeros(B, M, Hq, o.shape[-1]).index_put((qb, qi), o).transpose(1, 2)

    def _attend_sample(self, b, q_index, k_index, q, k, v, pk, pv, sim, gate, scaling):
        """Sample ``b`` on its real queries and valid keys; padding query rows are 0. Returns (Hq, M, d)."""
        out = q.new_zeros(q.shape[1:])
        if q_index.numel() == 0:
            return out

        def keys(t):
            return t[b:b + 1].index_select(2, k_index)

        def prompts(t):
            return None if t is None else (t[b:b + 1] if t.dim() == 4 else t)

        o = self._attend(q[b:b + 1].index_select(2, q_index), keys(k), keys(v), prompts(pk), prompts(pv),
                         None if sim is None else keys(sim), gate, scaling)
        return out.index_copy(1, q_index, o[0])

    def _check_context(self, pk, want: int) -> None:
        """Per-sample prompt keys (a prompt context) need one entry per sample or packed sequence."""
        if pk.dim() == 4 and pk.shape[0] != want:
            raise ValueError(f"prompt context must have shape (B={want} samples or packed sequences, "
                             f"num_prompts={self.num_prompts}, hidden={self.prompts.shape[1]}); got "
                             f"{tuple(self.prompt_context.shape)}")

    def _mask_none_is_upper_left(self) -> bool:
        """Whether a None mask over more keys than queries means SDPA's upper-left causal mask (an empty static
        cache: transformers' sdpa and eager masks) rather than every key filled, bottom-right aligned (its
        flash-attention masks), read from the mask function transformers registers for the model's attention
        implementation (AttentionMaskInterface; a hub kernel registers its own), not from the name. An
        implementation with none gets no mask from transformers at all, so the layer could not see padding or
        packed sequences: refused."""
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

        name = getattr(self.original_config, "_attn_implementation", None) or "sdpa"
        make = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(name)
        if make is None:
            raise ValueError(f"{type(self).__name__}: the model's attn_implementation {name!r} has no mask function in "
                             f"transformers' AttentionMaskInterface, so transformers passes its layers no attention "
                             f"mask and padding or packed sequences would be ignored; load the model with "
                             f"attn_implementation='sdpa', 'eager' or a flash-attention one, or register a mask "
                             f"function for {name!r}")
        return make is not flash_attention_mask

    def attention(self, call: _Call, q, k, v, attention_mask, scaling, kwargs):
        """``(B, M, Hq, d)`` attention output of queries ``q (B, Hq, M, d)`` over keys/values ``(B, Hkv, N, d)``."""
        B, _, M, _ = q.shape
        N = k.shape[2]
        none_is_upper_left = self._mask_none_is_upper_left()
        if torch.is_autocast_enabled(q.device.type):  # as autocast runs SDPA: all operands in its dtype
            dtype = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        sim = None
        if self.sim_rank is not None:
            sim = call.sim
            if sim is None:  # no cache: the keys are this call's tokens
                if N != M:
                    raise ValueError(f"{type(self).__name__} got {N} keys for {M} queries without a cache update; "
                                     f"sim_rank needs the layer's cache to go through its update")
                sim = k + call.delta.to(k.dtype)
            sim = sim.to(q.dtype)
        pk = call.pk.to(q.dtype)
        pv = None if call.pv is None else call.pv.to(q.dtype)
        gate = self.gate_values()
        traced = self._traced_layout(call, q, k, v, pk, pv, sim, gate, attention_mask, kwargs)
        if traced is not None:
            self._check_context(pk, B)
            starts, ends, keep, ok = traced_ranges(attention_mask, B, M, N)
            if traced == "ranges":
                o = self._attend(q, k, v, pk, pv, sim, gate, scaling, cache_leftpad=starts, cache_seqlens=ends)
            else:
                o = self._attend_ranges_varlen(q, k, v, pk, pv, sim, gate, scaling, starts, ends)
            o = o.masked_fill(~keep[:, None, :, None], 0.0) + torch.where(ok, 0.0, float("nan")).to(o.dtype)
            return o.transpose(1, 2)
        keys, packing, plan = attention_layout(attention_mask, kwargs.get("position_ids"), kwargs, B, M, N,
                                               none_is_upper_left)
        if keys < N:  # a static cache's unfilled slots (padding.filled_keys)
            k, v = k[:, :, :keys], v[:, :, :keys]
            sim = None if sim is None else sim[:, :, :keys]
        self._check_context(pk, B if packing is None else packing.num_sequences)
        if packing is not None:
            o = self._attend_packed(q, k, v, pk, pv, sim, gate, scaling, packing)
        elif plan is None:
            o = self._attend(q, k, v, pk, pv, sim, gate, scaling)
        elif plan.leftpad is not None and self._takes_leftpad(q, k, v, pk, pv, sim, gate):
            o = self._attend(q, k, v, pk, pv, sim, gate, scaling, cache_leftpad=plan.leftpad)
            o = o.masked_fill(~plan.real[:, None, :, None], 0.0)  # padding rows 0, as the other paths leave them
        elif takes_varlen(self.backend):
            o = self._attend_unpadded(plan, q, k, v, pk, pv, sim, gate, scaling)
        else:
            o = torch.stack([self._attend_sample(b, qi, ki, q, k, v, pk, pv, sim, gate, scaling)
                             for b, (qi, ki) in enumerate(plan.samples)])
        restarts = position_restarts(attention_mask, kwargs.get("position_ids"), kwargs, B, M, keys)
        if restarts is not None:  # under torch.compile: packed position_ids the graph cannot honour give NaN
            o = o + torch.where(restarts, float("nan"), 0.0).to(o.dtype)
        return o.transpose(1, 2)


def _attention_function(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function registered as ``attn_implementation="excitor"``: the layer's queries ``(B, Hq, M, d)``
    (after its norms and RoPE) and keys/values ``(B, Hkv, N, d)`` (after its cache update) through the
    package's operators; ``(output (B, M, Hq, d), None)``."""
    call = kwargs.pop(IMPLEMENTATION, None)
    if isinstance(call, _Capture):  # the prompt pass: keep what the layer made of the prompts
        call.keys, call.values = key, value
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None
    name = type(module).__name__
    if not isinstance(module, ExcitorAttention) or call is None:
        raise RuntimeError(f"attn_implementation={IMPLEMENTATION!r} is set by ExcitorAttention for its own layer; "
                           f"{name} called it without its prompts (call the layer, not the function)")
    if dropout:
        raise ValueError(f"{name} asks for attention dropout {dropout}; the operators have none")
    if kwargs.pop("softcap", None) is not None:
        raise ValueError(f"{name} asks for attention logit softcapping; the operators cannot apply it")
    window = kwargs.pop("sliding_window", None)
    if window is not None and key.shape[2] > window:
        raise ValueError(f"{name} has sliding_window={window} and {key.shape[2]} keys; the operators implement "
                         f"full causal attention only (sequences up to the window are exact)")
    paged = sorted(n for n in PAGED_KWARGS if kwargs.get(n) is not None)
    if paged:
        raise ValueError(f"{name} got a paged cache's {paged}: continuous batching (generate_batch, paged "
                         f"attention) is not supported by ExcitorAttention; use generate()")
    if kwargs.pop("is_causal", None) is False:
        raise ValueError(f"{name} asks for non-causal attention (is_causal=False); the adapted layer is causal")
    if kwargs.pop("output_attentions", None):
        raise ValueError(f"{name} asks for attention weights (output_attentions=True); the fused operators do "
                         f"not form them")
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in BENIGN_KWARGS)
    if unknown:
        raise ValueError(f"{name} passes its attention function the option(s) {unknown}, which ExcitorAttention "
                         f"does not implement; refusing rather than ignoring them")
    if scaling is None:
        scaling = module.head_dim ** -0.5
    return module.attention(call, query, key, value, attention_mask, scaling, kwargs), None
