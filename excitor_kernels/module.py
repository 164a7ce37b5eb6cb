"""``ExcitorAttention``: a drop-in replacement for a transformers Llama-family attention layer.

It keeps the layer's frozen ``q_proj, k_proj, v_proj, o_proj`` (same parameter names, so checkpoints
load unchanged), the rotary embedding, the KV-cache update and the ``(attn_output, attn_weights)``
return convention (weights are always ``None``), and computes the attention with this package's
operators. Per layer it owns

* ``prompts`` ``(P, hidden)``: learnable prompt tokens, normal init with ``init_std`` (default N(0, 1) in
  adapter mode, as the official LLaMA-Adapter and PEFT; ``config.initializer_range`` in excitor mode);
* ``gate`` ``(Hq,)`` (or ``(1,)`` with ``gate_per_head=False``, broadcast to all heads): zero init,
  the operator gets ``tanh(gate)`` (``gate_activation="tanh"``) or ``gate`` itself (``"identity"``);
* with ``gate_scale=True``: ``gate_scale`` ``(1,)``, one init, multiplying the activated gate (the scalar
  ``new_gate`` of the official LLaMA-Adapter V2.1);
* with ``sim_rank=r`` (excitor mode only): ``sim_down`` ``(r, hidden)`` and ``sim_up`` ``(Hkv*d, r)``,
  zero-initialised, giving the tokens' side of the prompt similarity

      sim_j = k_j + sim_up(sim_down(x_j))      (k_j after rotary; sim == k at init)

Every forward the prompts (plus the optional per-sample context ``(B, P, hidden)``) go through the frozen
``k_proj`` (and ``v_proj`` in adapter mode) without rotary position and become ``prompt_keys``
``(Hkv, P, d)`` (``(B, Hkv, P, d)`` with a context). Mode ``"excitor"`` runs
:func:`excitor_attention`, mode ``"adapter"`` runs :func:`adapter_attention`. With the gate at zero
the layer computes exactly the frozen layer.

KV cache: keys and values go through ``past_key_values.update`` like the original layer. With
``sim_rank`` the key cache of the layer holds ``[k | sim]`` concatenated on the head dimension (2d),
so cached tokens keep their similarity keys; the two halves are read back as strided views.

Padding and packing: see :mod:`excitor_kernels.padding` (batched causal call when exact, per-sample
calls on the kept tokens otherwise; packed sequences, from ``DataCollatorWithFlattening`` for instance,
run the varlen operators, with a prompt context of one entry per packed sequence).
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from ._dispatch import BACKENDS
from .ops import adapter_attention, adapter_attention_varlen, excitor_attention, excitor_attention_varlen
from .padding import attention_layout

MODES = ("excitor", "adapter")
GATE_ACTIVATIONS = ("tanh", "identity")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def check_llama_attention(attention: nn.Module, name: str = "attention") -> None:
    """Raise ``TypeError`` unless ``attention`` is shaped like transformers' ``LlamaAttention``.

    Needed: exactly the children ``q_proj, k_proj, v_proj, o_proj`` (``nn.Linear``), no own parameters or
    buffers (so no q/k norms), ``config``, ``layer_idx`` and ``head_dim``, and an ``apply_rotary_pos_emb``
    in the module that defines the class (Llama, Mistral, Qwen2 and their copies).
    """
    if isinstance(attention, ExcitorAttention):
        raise ValueError(f"{name} is already an ExcitorAttention; adapt a model only once")
    children = dict(attention.named_children())
    problems = []
    if set(children) != set(PROJECTIONS) or not all(isinstance(children[p], nn.Linear) for p in PROJECTIONS):
        problems.append(f"children {sorted(children)} instead of nn.Linear {list(PROJECTIONS)}")
    if list(attention.named_parameters(recurse=False)) or list(attention.named_buffers(recurse=False)):
        problems.append("parameters or buffers of its own")
    for attr in ("config", "layer_idx", "head_dim"):
        if not hasattr(attention, attr):
            problems.append(f"no attribute {attr!r}")
    if not callable(getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)):
        problems.append(f"no apply_rotary_pos_emb in {type(attention).__module__}")
    if problems:
        raise TypeError(f"{name} must be a Llama-style attention layer (LlamaAttention, MistralAttention, "
                        f"Qwen2Attention); got {type(attention).__name__} with {'; '.join(problems)}")
    dropout = getattr(attention, "attention_dropout", 0.0) or 0.0
    if dropout != 0.0:
        raise ValueError(f"{name} has attention_dropout={dropout}; the operators have no attention dropout, "
                         f"set config.attention_dropout=0.0")


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


class ExcitorAttention(nn.Module):
    """Llama-family attention whose scores carry the Excitor bypass (or the Adapter prompts).

    Args:
        attention: the layer to replace; its projections are taken over (not copied).
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
        dtype: dtype of the new parameters; default the projections' dtype.
    """

    def __init__(self, attention: nn.Module, *, num_prompts: int = 10, mode: str = "excitor",
                 backend: str = "auto", gate_activation: str = "tanh", gate_per_head: bool = True,
                 sim_rank: Optional[int] = None, init_std: Optional[float] = None,
                 dtype: Optional[torch.dtype] = None, gate_scale: bool = False):
        super().__init__()
        check_llama_attention(attention)
        check_options(num_prompts=num_prompts, mode=mode, backend=backend, gate_activation=gate_activation,
                      sim_rank=sim_rank, init_std=init_std, gate_scale=gate_scale)
        self.attention_class = type(attention)
        self.config = attention.config
        self.layer_idx = attention.layer_idx
        self.head_dim = attention.head_dim
        for name in PROJECTIONS:
            setattr(self, name, getattr(attention, name))
        self.num_heads = self.q_proj.out_features // self.head_dim
        self.num_kv_heads = self.k_proj.out_features // self.head_dim
        self.scaling = getattr(attention, "scaling", self.head_dim ** -0.5)
        self.sliding_window = getattr(attention, "sliding_window", getattr(self.config, "sliding_window", None))
        self._rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        self.mode, self.backend, self.gate_activation = mode, backend, gate_activation
        self.num_prompts, self.sim_rank = num_prompts, sim_rank

        weight = self.k_proj.weight
        dtype = dtype or weight.dtype
        hidden = self.k_proj.in_features
        if init_std is not None:
            std = init_std
        else:
            std = 1.0 if mode == "adapter" else getattr(self.config, "initializer_range", 0.02)
        self.prompts = nn.Parameter(torch.empty(num_prompts, hidden, device=weight.device, dtype=dtype).normal_(0, std))
        self.gate = nn.Parameter(torch.zeros(self.num_heads if gate_per_head else 1, device=weight.device, dtype=dtype))
        self.gate_scale = nn.Parameter(torch.ones(1, device=weight.device, dtype=dtype)) if gate_scale else None
        if sim_rank is not None:
            self.sim_down = nn.Linear(hidden, sim_rank, bias=False, device=weight.device, dtype=dtype)
            self.sim_up = nn.Linear(sim_rank, self.num_kv_heads * self.head_dim, bias=False,
                                    device=weight.device, dtype=dtype)
            nn.init.zeros_(self.sim_up.weight)
        self.prompt_context: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, num_prompts={self.num_prompts}, heads={self.num_heads}/{self.num_kv_heads}, "
                f"head_dim={self.head_dim}, gate_activation={self.gate_activation!r}, "
                f"gate_scale={self.gate_scale is not None}, sim_rank={self.sim_rank}, "
                f"backend={self.backend!r}")

    def gate_values(self) -> torch.Tensor:
        """The contiguous ``(Hq,)`` gate the operator gets: ``tanh(gate)`` or ``gate`` (times ``gate_scale``
        when present), broadcast when scalar."""
        g = torch.tanh(self.gate) if self.gate_activation == "tanh" else self.gate
        if self.gate_scale is not None:
            g = g * self.gate_scale
        return g.expand(self.num_heads).contiguous()  # the fused kernels index gate[h] assuming unit stride

    def _project_prompts(self, proj: nn.Linear, batch: int) -> torch.Tensor:
        """``proj(prompts [+ context])`` as ``(Hkv, P, d)``, or ``(B, Hkv, P, d)`` with a context."""
        x = self.prompts
        if self.prompt_context is not None:
            ctx = self.prompt_context
            if ctx.dim() != 3 or tuple(ctx.shape) != (batch, *self.prompts.shape):
                raise ValueError(f"prompt context must have shape (B={batch} samples or packed sequences, "
                                 f"num_prompts={self.num_prompts}, "
                                 f"hidden={self.prompts.shape[1]}); got {tuple(ctx.shape)}")
            x = x + ctx.to(x.dtype)
        y = proj(x.to(proj.weight.dtype))
        return y.view(*y.shape[:-1], self.num_kv_heads, self.head_dim).transpose(-3, -2)

    def _attend(self, q, k, v, pk, pv, sim, gate, causal=True):
        """The operator on ``(B, H, L, d)`` views."""
        if self.mode == "excitor":
            return excitor_attention(q, k, v, pk, gate, sim_keys=sim, causal=causal, softmax_scale=self.scaling,
                                     backend=self.backend)
        return adapter_attention(q, k, v, pk, pv, gate, causal=causal, softmax_scale=self.scaling,
                                 backend=self.backend)

    def _attend_packed(self, q, k, v, pk, pv, sim, gate, packing):
        """The varlen operator on a packed batch of one; returns ``(1, Hq, M, d)``."""
        def flat(t):  # (1, H, L, d) view -> (L, H, d) view
            return None if t is None else t[0].transpose(0, 1)

        if self.mode == "excitor":
            o = excitor_attention_varlen(flat(q), flat(k), flat(v), pk, gate, *packing, sim_keys=flat(sim),
                                         softmax_scale=self.scaling, backend=self.backend)
        else:
            o = adapter_attention_varlen(flat(q), flat(k), flat(v), pk, pv, gate, *packing,
                                         softmax_scale=self.scaling, backend=self.backend)
        return o.transpose(0, 1).unsqueeze(0)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, position_ids=None, **kwargs):
        if position_embeddings is None:
            raise ValueError("position_embeddings must be the (cos, sin) pair from the model's rotary embedding; "
                             "got None")
        B, M, _ = hidden_states.shape
        shape = (B, M, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self._rotary(q, k, cos, sin)
        sim = None
        if self.sim_rank is not None:
            delta = self.sim_up(self.sim_down(hidden_states.to(self.sim_down.weight.dtype)))
            sim = k + delta.view(shape).transpose(1, 2).to(k.dtype)
        if past_key_values is not None:
            if sim is None:
                k, v = past_key_values.update(k, v, self.layer_idx)
            else:
                ks, v = past_key_values.update(torch.cat([k, sim], dim=-1), v, self.layer_idx)
                k, sim = ks[..., :self.head_dim], ks[..., self.head_dim:]
        N = k.shape[2]
        if self.sliding_window is not None and N > self.sliding_window:
            raise ValueError(f"sequence of {N} keys is longer than the layer's sliding_window={self.sliding_window}; "
                             f"the operators implement full causal attention only")

        packing, plan = attention_layout(attention_mask, position_ids, kwargs, B, M, N)
        prompt_batch = B if packing is None else packing.num_sequences
        pk = self._project_prompts(self.k_proj, prompt_batch).to(q.dtype)
        pv = self._project_prompts(self.v_proj, prompt_batch).to(q.dtype) if self.mode == "adapter" else None
        gate = self.gate_values()
        if packing is not None:
            o = self._attend_packed(q, k, v, pk, pv, sim, gate, packing)
        elif plan is None:
            o = self._attend(q, k, v, pk, pv, sim, gate)
        else:
            o = torch.stack([self._attend_sample(b, qi, ki, q, k, v, pk, pv, sim, gate)
                             for b, (qi, ki) in enumerate(plan)])
        out = self.o_proj(o.transpose(1, 2).reshape(B, M, -1))
        return out, None

    def _attend_sample(self, b, q_index, k_index, q, k, v, pk, pv, sim, gate):
        """Sample ``b`` on its real queries and valid keys; padding query rows are 0. Returns (Hq, M, d)."""
        out = q.new_zeros(q.shape[1:])
        if q_index.numel() == 0:
            return out

        def keys(t):
            return t[b:b + 1].index_select(2, k_index)

        def prompts(t):
            return None if t is None else (t[b:b + 1] if t.dim() == 4 else t)

        o = self._attend(q[b:b + 1].index_select(2, q_index), keys(k), keys(v), prompts(pk), prompts(pv),
                         None if sim is None else keys(sim), gate)
        return out.index_copy(1, q_index, o[0])

    def original_attention(self) -> nn.Module:
        """A fresh instance of the replaced class holding the same (shared) projections."""
        with torch.device("meta"):
            attention = self.attention_class(self.config, self.layer_idx)
        for name in PROJECTIONS:
            setattr(attention, name, getattr(self, name))
        return attention
