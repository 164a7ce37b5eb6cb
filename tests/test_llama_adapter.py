"""Official LLaMA-Adapter checkpoints (OpenGVLab/LLaMA-Adapter layouts) in and out of ExcitorAttention.

The checkpoints are built here with the key names, shapes and dtypes the official code writes, and the logits
are compared with an official-style forward written from the formulas: prompts through the frozen k/v
projections without rotary, a softmax over the prompts separate from the causal token softmax, scaled by the
variant's gate (tanh(gate), raw gate, tanh(gate) * new_gate), V2's visual query added to every layer's prompts.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from excitor_kernels import (apply_excitor, export_llama_adapter, load_excitor, load_llama_adapter, prompt_context,
                             save_excitor)
from excitor_kernels.patch import excitor_layers
from helpers import TRITON_DEVICE
from tiny_models import HEADS, HIDDEN, LAYERS, VOCAB, randomize, rel, tiny_model, tokens

P_OFFICIAL = 10  # adapter_len / query_len default of the official code


def base(kv_heads=HEADS, dtype=torch.float64, **overrides):
    return tiny_model(num_key_value_heads=kv_heads, **overrides).to(dtype)


def official_checkpoint(layout, num_layers=2, num_prompts=P_OFFICIAL, model_layers=LAYERS, heads=HEADS,
                        new_gate=False, extra=False, seed=0):
    """A checkpoint as the official extraction scripts write it.

    v1 (alpaca_finetuning_v1): adapter_query and the adapted layers' gates are float32 (the training code
    casts its trainable parameters), the other gates float16 zeros (the model is built in half precision).
    v2 (multimodal7b finetune phase): adapter_query float32, gates and new_gates float16, wrapped in
    {"model", "config"}; ``extra`` adds a few of V2's other tuned tensors.
    """
    gen = torch.Generator().manual_seed(seed)
    prefix = "layers." if layout == "v1" else "llama.layers."
    state = {"adapter_query.weight": torch.randn(num_layers * num_prompts, HIDDEN, generator=gen)}
    for i in range(model_layers):
        adapted = i >= model_layers - num_layers
        gate = torch.randn(1, heads, 1, 1, generator=gen) if adapted else torch.zeros(1, heads, 1, 1)
        state[f"{prefix}{i}.attention.gate"] = gate.to(torch.float32 if adapted and layout == "v1" else torch.float16)
        if new_gate:
            scale = 0.5 + torch.rand(1, 1, 1, 1, generator=gen) if adapted else torch.ones(1, 1, 1, 1)
            state[f"{prefix}{i}.attention.new_gate"] = scale.half()
    if layout == "v1":
        return state
    if extra:
        state["visual_query.weight"] = torch.randn(num_prompts, 16, generator=gen)
        state["llama.layers.0.attention.wq.bias"] = torch.zeros(HIDDEN)
    return {"model": state, "config": {"w_bias": True, "w_lora": new_gate, "lora_rank": 16}}


def official_gates(state, variant, layer):
    """The per-head gate of ``layer`` as each official forward applies it, from the checkpoint tensors."""
    prefix = "llama.layers." if variant == "v2" else "layers."
    gate = state[f"{prefix}{layer}.attention.gate"].double().view(-1)
    if variant == "v1-inference":
        return gate
    g = torch.tanh(gate)
    new_gate = state.get(f"{prefix}{layer}.attention.new_gate")
    return g if new_gate is None else g * new_gate.double().view(())


class OfficialForward:
    """The official forward with a start_pos KV cache, on the weights of a plain model and a checkpoint."""

    def __init__(self, model, checkpoint, variant, num_prompts=P_OFFICIAL, visual=None):
        self.model, self.variant, self.visual = model, variant, visual
        self.state = checkpoint.get("model", checkpoint)
        table = self.state["adapter_query.weight"].double()
        self.num_layers = table.shape[0] // num_prompts
        self.prompts = table.reshape(self.num_layers, num_prompts, -1)
        self.cache = {}

    def attention(self, i, attn, x, cos, sin):
        B, M, _ = x.shape
        d = attn.head_dim
        H, Hkv = attn.q_proj.out_features // d, attn.k_proj.out_features // d

        def heads(t, n):
            return t.view(*t.shape[:-1], n, d).transpose(-3, -2)

        q = heads(attn.q_proj(x), H)
        k, v = heads(attn.k_proj(x), Hkv), heads(attn.v_proj(x), Hkv)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if i in self.cache:
            k, v = torch.cat([self.cache[i][0], k], 2), torch.cat([self.cache[i][1], v], 2)
        self.cache[i] = (k, v)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        N = k.shape[2]
        hidden = torch.ones(M, N, dtype=torch.bool).triu(N - M + 1)  # key j > start_pos + i is masked
        scores = (q @ k.transpose(-1, -2) / d ** 0.5).masked_fill(hidden, float("-inf"))
        o = torch.softmax(scores, -1) @ v
        j = i - (len(self.model.model.layers) - self.num_layers)
        if j >= 0:
            prompts = self.prompts[j] if self.visual is None else self.prompts[j] + self.visual   # (B?, P, dim)
            pk = heads(attn.k_proj(prompts), Hkv).repeat_interleave(H // Hkv, -3)                # no rotary
            pv = heads(attn.v_proj(prompts), Hkv).repeat_interleave(H // Hkv, -3)
            gate = official_gates(self.state, self.variant, i).view(1, H, 1, 1)
            o = o + gate * (torch.softmax(q @ pk.transpose(-1, -2) / d ** 0.5, -1) @ pv)
        return attn.o_proj(o.transpose(1, 2).reshape(B, M, -1))

    def __call__(self, ids):
        start = self.cache[0][0].shape[2] if self.cache else 0
        m = self.model.model
        h = m.embed_tokens(ids)
        positions = torch.arange(start, start + ids.shape[1])[None].expand(ids.shape[0], -1)
        cos, sin = m.rotary_emb(h, positions)
        for i, layer in enumerate(m.layers):
            h = h + self.attention(i, layer.self_attn, layer.input_layernorm(h), cos, sin)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(m.norm(h))


def check_prefill_and_decoding(model, reference, ids, visual=None, budget=1e-6):
    """Prefill, two cached one-token steps and a cached two-token chunk, each against the official forward."""
    chunks = [ids[:, :6], ids[:, 6:7], ids[:, 7:8], ids[:, 8:10]]
    cache = DynamicCache()
    with torch.no_grad(), prompt_context(model, visual):
        for chunk in chunks:
            got = model(input_ids=chunk, past_key_values=cache, use_cache=True).logits
            expected = reference(chunk)
            assert rel(got, expected) <= budget, (chunk.shape, rel(got, expected))


CASES = {  # name: (variant passed, checkpoint layout, new_gate)
    "v1": ("v1", "v1", False),
    "v1-inference": ("v1-inference", "v1", False),
    "v2": (None, "v2", False),            # recognised from the keys
    "v2.1-new_gate": ("v2", "v2", True),
}


@pytest.mark.parametrize("kv_heads", [HEADS, 2], ids=["mha-official", "gqa"])
@pytest.mark.parametrize("case", list(CASES))
def test_official_checkpoint_logits(case, kv_heads):
    variant, layout, new_gate = CASES[case]
    ckpt = official_checkpoint(layout, new_gate=new_gate)
    ids = tokens("cpu", B=2, L=10)
    visual = torch.randn(2, P_OFFICIAL, HIDDEN, dtype=torch.float64) if layout == "v2" else None
    model = load_llama_adapter(base(kv_heads), ckpt, variant, backend="reference")
    assert [layer.layer_idx for layer in excitor_layers(model)] == [1, 2]
    assert all(not p.requires_grad for n, p in model.named_parameters() if "prompts" not in n and "gate" not in n)
    reference = OfficialForward(base(kv_heads), ckpt, variant or layout, visual=visual)
    check_prefill_and_decoding(model, reference, ids, visual)

    # the adapter and the variant's gate both matter, so the comparison above can fail
    with torch.no_grad(), prompt_context(model, visual):
        got = model(input_ids=ids).logits
        assert rel(got, base(kv_heads)(input_ids=ids).logits) > 1e-3
    if layout == "v1":
        other = "v1" if variant == "v1-inference" else "v1-inference"
        assert rel(got, OfficialForward(base(kv_heads), ckpt, other)(ids)) > 1e-3


def test_gradients_match_the_official_forward():
    """Training parity (V2.1 with a visual query): gradients of prompts, gates, new_gate and the visual query."""
    ckpt = official_checkpoint("v2", new_gate=True)
    state = {k: v.double().requires_grad_() for k, v in ckpt["model"].items()}
    visual = torch.randn(2, P_OFFICIAL, HIDDEN, dtype=torch.float64, requires_grad=True)
    visual_copy = visual.detach().clone().requires_grad_()
    ids = tokens("cpu", B=2, L=9)
    weights = torch.randn(2, 9, VOCAB, dtype=torch.float64)
    (OfficialForward(base(), {"model": state}, "v2", visual=visual)(ids) * weights).sum().backward()

    model = load_llama_adapter(base(), ckpt, backend="reference").train()
    with prompt_context(model, visual_copy):
        (model(input_ids=ids).logits * weights).sum().backward()
    layers = excitor_layers(model)
    got_rows = torch.cat([layer.prompts.grad for layer in layers])
    assert rel(got_rows, state["adapter_query.weight"].grad) <= 1e-6
    assert rel(visual_copy.grad, visual.grad) <= 1e-6
    for layer in layers:
        key = f"llama.layers.{layer.layer_idx}.attention."
        assert rel(layer.gate.grad, state[key + "gate"].grad.view(-1)) <= 1e-6
        assert rel(layer.gate_scale.grad, state[key + "new_gate"].grad.view(-1)) <= 1e-6


def test_prompt_and_layer_counts_from_arguments():
    ckpt = official_checkpoint("v1", num_layers=3, num_prompts=4)
    ids = tokens("cpu", B=1, L=10)
    for kwargs in ({"num_prompts": 4}, {"num_layers": 3}, {"num_prompts": 4, "num_layers": 3}):
        model = load_llama_adapter(base(), ckpt, "v1", backend="reference", **kwargs)
        assert [(layer.layer_idx, layer.num_prompts) for layer in excitor_layers(model)] == [(0, 4), (1, 4), (2, 4)]
        check_prefill_and_decoding(model, OfficialForward(base(), ckpt, "v1", num_prompts=4), ids)


@pytest.mark.parametrize("case", list(CASES))
def test_export_round_trip(case, tmp_path):
    variant, layout, new_gate = CASES[case]
    ckpt = official_checkpoint(layout, new_gate=new_gate, extra=True)
    model = load_llama_adapter(base(), ckpt, variant, strict=False, backend="reference")
    variant = variant or layout
    original = ckpt.get("model", ckpt)

    exported = export_llama_adapter(model, variant, dtype=None)
    state = exported.get("model", exported)
    assert set(state) == {k for k in original if k not in ("visual_query.weight", "llama.layers.0.attention.wq.bias")}
    for key, t in state.items():
        assert t.shape == original[key].shape and torch.equal(t, original[key].double()), key
    if layout == "v2":
        assert exported["config"]["w_lora"] == new_gate  # the official loader makes new_gate only with LoRA

    default = export_llama_adapter(model, variant)  # float32, the official dtype of adapter parameters
    assert {t.dtype for t in default.get("model", default).values()} == {torch.float32}
    torch.save(default, tmp_path / "adapter.pth")
    paths = [tmp_path / "adapter.pth"]
    if layout == "v1":  # a flat dict also travels as safetensors
        save_file(default, str(tmp_path / "adapter.safetensors"))
        paths.append(str(tmp_path / "adapter.safetensors"))
    ids = tokens("cpu", B=2, L=9)
    for path in paths:
        reloaded = load_llama_adapter(base(), path, variant, backend="reference")
        with torch.no_grad():
            assert rel(reloaded(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-6


def test_export_scalar_identity_gates_as_released_v1():
    """A PEFT-style model (one raw gate per layer) becomes a released-v1 file with the gate on every head."""
    model = randomize(apply_excitor(base(), num_prompts=P_OFFICIAL, num_layers=2, mode="adapter",
                                    gate_activation="identity", gate_per_head=False, backend="reference"))
    ckpt = export_llama_adapter(model, "v1-inference", dtype=None)
    assert ckpt["layers.2.attention.gate"].shape == (1, HEADS, 1, 1)
    assert torch.equal(ckpt["layers.0.attention.gate"], torch.zeros(1, HEADS, 1, 1, dtype=torch.float64))
    ids = tokens("cpu", B=2, L=10)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert rel(OfficialForward(base(), ckpt, "v1-inference")(ids), expected) <= 1e-6


def test_gate_scale_survives_save_excitor(tmp_path):
    ckpt = official_checkpoint("v2", new_gate=True)
    model = load_llama_adapter(base(), ckpt, backend="reference")
    save_excitor(model, str(tmp_path / "a.safetensors"))
    reloaded = load_excitor(base(), str(tmp_path / "a.safetensors"), backend="reference")
    ids = tokens("cpu", B=2, L=8)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_load_excitor_reads_files_written_before_gate_scale(tmp_path):
    model = randomize(apply_excitor(base(), num_prompts=4, num_layers=2, mode="adapter", backend="reference"))
    save_excitor(model, str(tmp_path / "new.safetensors"))
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:
        options = json.loads(f.metadata()["excitor"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del options["gate_scale"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"excitor": json.dumps(options)})
    ids = tokens("cpu", B=1, L=7)
    already = apply_excitor(base(), num_prompts=4, num_layers=2, mode="adapter", backend="reference")
    for target in (base(), already):  # a plain model is adapted, an adapted one compared with the file
        reloaded = load_excitor(target, str(tmp_path / "old.safetensors"), backend="reference")
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_adapter_mode_defaults_follow_the_official_code():
    """Adapter prompts N(0, 1) (official nn.Embedding, PEFT normal_()), zero tanh per-head gates; excitor mode
    keeps config.initializer_range (0.15 in the tiny models)."""
    adapter = excitor_layers(apply_excitor(base(), num_prompts=64, mode="adapter"))
    excitor = excitor_layers(apply_excitor(base(), num_prompts=64, mode="excitor"))
    for layer in adapter:
        assert abs(layer.prompts.std().item() - 1.0) < 0.05
        assert layer.gate_activation == "tanh" and layer.gate.shape == (HEADS,) and not layer.gate.any()
        assert layer.gate_scale is None
    for layer in excitor:
        assert abs(layer.prompts.std().item() - 0.15) < 0.0075


def _drop(ckpt, key):
    state = dict(ckpt)
    del state[key]
    return state


def _replace(ckpt, key, value):
    return {**ckpt, key: value}


V1 = official_checkpoint("v1")
V2 = official_checkpoint("v2", new_gate=True, extra=True)
BAD = {
    "no adapter_query": (_drop(V1, "adapter_query.weight"), {"variant": "v1"}, "expected 'adapter_query.weight'"),
    "no gates": ({"adapter_query.weight": V1["adapter_query.weight"]}, {"variant": "v1"},
                 r"'layers.\{i\}.attention.gate' \(v1\)"),
    "missing gate": (_drop(V1, "layers.1.attention.gate"), {"variant": "v1"}, "misses key 'layers.1.attention.gate'"),
    "gate shape": (_replace(V1, "layers.2.attention.gate", torch.zeros(1, HEADS + 1, 1, 1)), {"variant": "v1"},
                   r"'layers.2.attention.gate' has shape \(1, 5, 1, 1\); the model needs \(1, heads=4, 1, 1\)"),
    "prompt width": (_replace(V1, "adapter_query.weight", torch.zeros(20, HIDDEN + 2)), {"variant": "v1"},
                     r"'adapter_query.weight' has shape \(20, 66\)"),
    "deeper model": (official_checkpoint("v1", model_layers=LAYERS + 1), {"variant": "v1"},
                     "'layers.3.attention.gate' is for decoder layer 3; the model has 3 layers"),
    "too many layers": (official_checkpoint("v1", num_layers=4, model_layers=3), {"variant": "v1"},
                        "'adapter_query.weight' holds 4 layers x 10 prompts but the model has 3 decoder layers"),
    "rows": (_replace(V1, "adapter_query.weight", torch.zeros(25, HIDDEN)), {"variant": "v1"}, "has 25 rows"),
    "no rows": (_replace(V1, "adapter_query.weight", torch.zeros(0, HIDDEN)), {"variant": "v1"}, "has 0 rows"),
    "v1 needs a variant": (V1, {}, "variant='v1-inference'"),
    "wrong variant": (V1, {"variant": "v2"}, "needs the v2 layout; the checkpoint has the v1 layout"),
    "unknown variant": (V1, {"variant": "v3"}, "variant must be one of"),
    "extra keys": (V2, {}, "not LLaMA-Adapter prompts or gates: 'llama.layers.0.attention.wq.bias', "
                           "'visual_query.weight'; pass strict=False"),
    "partial new_gate": ({"model": _drop(V2["model"], "llama.layers.2.attention.new_gate")}, {"strict": False},
                         "misses key 'llama.layers.2.attention.new_gate'"),
    "new_gate shape": ({"model": _replace(V2["model"], "llama.layers.1.attention.new_gate",
                                          torch.ones(1, HEADS, 1, 1))}, {"strict": False}, r"'llama.layers.1.attention.new_gate' has shape \(1, 4, 1, 1\)"),
    "v1 with new_gate": ({**V1, "layers.2.attention.new_gate": torch.ones(1, 1, 1, 1)}, {"variant": "v1"},
                         "'layers.2.attention.new_gate'; pass strict=False"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_checkpoints_name_the_key(name):
    ckpt, kwargs, match = BAD[name]
    model = base()
    with pytest.raises(ValueError, match=match):
        load_llama_adapter(model, ckpt, **kwargs)
    assert not excitor_layers(model)  # checked before anything changed


def test_bad_arguments_and_mismatched_models():
    with pytest.raises(TypeError, match="gate_scale must be a bool; got 1"):
        apply_excitor(base(), gate_scale=1)
    with pytest.raises(TypeError, match="checkpoint must be a state dict or the path"):
        load_llama_adapter(base(), 3, "v1")
    with pytest.raises(ValueError, match="num_prompts must be None or an int >= 1"):
        load_llama_adapter(base(), V1, "v1", num_prompts=0)
    with pytest.raises(ValueError, match="20 rows, which is not num_layers \\* num_prompts"):
        load_llama_adapter(base(), V1, "v1", num_prompts=3)
    adapted = apply_excitor(base(), num_prompts=P_OFFICIAL, num_layers=2, mode="adapter", gate_activation="identity")
    with pytest.raises(ValueError, match="model is adapted with .* the v1 checkpoint holds"):
        load_llama_adapter(adapted, V1, "v1")
    load_llama_adapter(adapted, V1, "v1-inference")  # same options: loads into the adapted layers
    assert torch.equal(excitor_layers(adapted)[0].prompts, V1["adapter_query.weight"][:10].double())


def test_export_refuses_other_options():
    with pytest.raises(ValueError, match="variant must be one of"):
        export_llama_adapter(apply_excitor(base(), num_layers=2, mode="adapter"), "v3")
    with pytest.raises(ValueError, match="needs mode='adapter', gate_activation='tanh'"):
        export_llama_adapter(apply_excitor(base(), num_layers=2, mode="excitor"), "v1")
    with pytest.raises(ValueError, match="needs mode='adapter', gate_activation='identity'"):
        export_llama_adapter(apply_excitor(base(), num_layers=2, mode="adapter"), "v1-inference")
    with pytest.raises(ValueError, match="has no new_gate"):
        export_llama_adapter(apply_excitor(base(), num_layers=2, mode="adapter", gate_scale=True), "v1")
    with pytest.raises(ValueError, match="no ExcitorAttention layers"):
        export_llama_adapter(base(), "v2")


def test_fused_backend_float32():
    """One Triton run (interpreted without a GPU) in float32 against the float64 official forward (fp32 budget)."""
    pytest.importorskip("triton")
    ckpt = official_checkpoint("v2", new_gate=True)
    visual = torch.randn(1, P_OFFICIAL, HIDDEN, dtype=torch.float64)
    model = load_llama_adapter(base(dtype=torch.float32).to(TRITON_DEVICE), ckpt, backend="triton")
    ids = tokens("cpu", B=1, L=8)
    with torch.no_grad(), prompt_context(model, visual.float().to(TRITON_DEVICE)):
        got = model(input_ids=ids.to(TRITON_DEVICE)).logits.cpu()
        expected = OfficialForward(base(), ckpt, "v2", visual=visual)(ids)
    assert rel(got, expected) <= 1e-3
