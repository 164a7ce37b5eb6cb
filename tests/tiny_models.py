"""Tiny random Llama-family models for the module tests (nothing downloaded)."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from excitor_kernels.patch import apply_excitor, excitor_layers
from helpers import DEVICES  # noqa: F401 (re-exported for the module tests)

HIDDEN, HEADS, KV_HEADS, LAYERS, VOCAB = 64, 4, 2, 3, 97


def tiny_config(**overrides) -> LlamaConfig:
    kw = dict(hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
              num_hidden_layers=LAYERS, vocab_size=VOCAB, max_position_embeddings=256, attn_implementation="sdpa",
              initializer_range=0.15)
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_model(device="cpu", seed=0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**overrides)).to(device).eval()


def randomize(model, seed=1, gate_std=1.0):
    """Prompts, gates and similarity projections at sizes where the bypass visibly matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in excitor_layers(model):
            for name, p in layer.named_parameters():
                if name == "prompts":
                    p.copy_(torch.randn(p.shape, generator=gen))
                elif name == "gate":
                    p.copy_(torch.randn(p.shape, generator=gen) * gate_std)
                elif name.startswith("sim_"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def adapted(device="cpu", mode="excitor", sim_rank=None, num_layers=2, num_prompts=5, backend="reference",
            seed=0, **overrides):
    model = tiny_model(device, seed, **overrides)
    return randomize(apply_excitor(model, num_prompts=num_prompts, num_layers=num_layers, mode=mode,
                                   backend=backend, sim_rank=sim_rank))


def tokens(device, B=2, L=11, seed=5):
    return torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(seed)).to(device)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def masks_materialised_under_compile() -> bool:
    """Whether the installed transformers builds the full causal mask under torch.compile even without padding
    (releases before its skip under tracing: 5.0 does, 5.25 does not). The layer then has to read the mask's
    values, which breaks the graph and hides packed sequences' boundaries from the mask."""
    import inspect

    from transformers import masking_utils

    return "is_torchdynamo_exporting" not in inspect.getsource(masking_utils._ignore_causal_mask_sdpa)
