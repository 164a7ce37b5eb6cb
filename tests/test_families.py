"""Every family the module swap accepts is exact (zero gate = the unmodified model, cached generation, cached
chunks = the full forward after training) or refused when adapted, naming what the operators cannot honour."""
from __future__ import annotations

import pytest
import torch

from excitor_kernels import apply_excitor
from excitor_kernels.patch import excitor_layers
from families import FAMILIES, available, calls_the_registry, family_model
from tiny_models import randomize, rel

NAMES = [n for n in FAMILIES if available(n) and calls_the_registry(family_model(n))]
# families whose layer in the installed release computes attention itself (e.g. Qwen2-MoE before transformers 5)
OLD_STYLE = [n for n in FAMILIES if available(n) and n not in NAMES]
MODES = [("excitor", None), ("excitor", 3), ("adapter", None)]


def _batch():
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(3, 97, (3, 11), generator=gen)
    mask = torch.ones_like(x)
    mask[0, :3] = 0   # left padding
    mask[2, -2:] = 0  # right padding
    return x, mask


def test_the_required_families_are_all_here_and_the_others_refused():
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo2"} <= set(NAMES)
    for name in OLD_STYLE:  # refused before anything changes
        model = family_model(name)
        with pytest.raises(TypeError, match="attention registry"):
            apply_excitor(model)
        assert not excitor_layers(model)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode,sim_rank", MODES)
def test_zero_gate_padded_batch_and_cached_generation_equal_the_original(name, mode, sim_rank):
    x, mask = _batch()
    base = family_model(name)
    with torch.no_grad():
        expected = base(input_ids=x, attention_mask=mask).logits
        want = base.generate(x[:2], attention_mask=mask[:2], max_new_tokens=6, do_sample=False, pad_token_id=0)
    model = apply_excitor(family_model(name), num_prompts=4, mode=mode, sim_rank=sim_rank, backend="reference")
    assert len(excitor_layers(model)) == 2
    real = mask.bool()
    with torch.no_grad():
        got = model(input_ids=x, attention_mask=mask).logits
        tokens = model.generate(x[:2], attention_mask=mask[:2], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert rel(got[real], expected[real]) <= 1e-5
    assert torch.equal(tokens, want)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode,sim_rank", MODES)
def test_static_cache_generation_equals_the_dynamic_cache(name, mode, sim_rank):
    """Every family, prompts and gates randomised, a left-padded batch: cache_implementation="static" generates
    the dynamic cache's tokens (the adapted layer attends the static cache's filled slots only)."""
    x, mask = _batch()
    model = randomize(apply_excitor(family_model(name), num_prompts=4, mode=mode, sim_rank=sim_rank,
                                    backend="reference")).eval()
    kw = dict(attention_mask=mask[:2], max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(x[:2], **kw)
        got = model.generate(x[:2], cache_implementation="static", **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", NAMES)
def test_compiled_static_cache_generation_equals_eager(name):
    """Every family, the Excitor with sim_rank, backend auto: transformers' compiled generation (a static cache,
    torch.compile(model.forward, fullgraph=True)) is one graph and generates eager dynamic-cache generation's
    tokens (the masks' key ranges found on the device: padding.traced_ranges). A prompt of 10 tokens, the first
    left-padded by 2."""
    torch._dynamo.reset()
    x, mask = _batch()
    model = randomize(apply_excitor(family_model(name), num_prompts=3, sim_rank=2, backend="auto")).eval()
    kw = dict(attention_mask=mask[:2, 1:], max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    want = model.generate(x[:2, 1:], **kw)
    model.forward = torch.compile(model.forward, fullgraph=True, backend="eager")
    try:
        got = model.generate(x[:2, 1:], cache_implementation="static", **kw)
    except Exception as error:  # the family itself may not compile in this release (e.g. its MoE kernels)
        base = family_model(name)
        base.forward = torch.compile(base.forward, fullgraph=True, backend="eager")
        try:
            base.generate(x[:2, 1:], cache_implementation="static", **kw)
        except Exception as own:
            pytest.skip(f"{name}'s unadapted model does not compile either here: {str(own).splitlines()[0][:200]}")
        raise error
    assert torch.equal(got.sequences, want.sequences)
    assert rel(torch.stack(got.logits), torch.stack(want.logits)) <= 1e-5


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode,sim_rank", MODES)
def test_after_training_cached_chunks_equal_the_full_forward(name, mode, sim_rank):
    x, _ = _batch()
    model = apply_excitor(family_model(name), num_prompts=4, mode=mode, sim_rank=sim_rank,
                          backend="reference").train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):  # zero gate, then zero sim_up: the third step reaches every tensor
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    randomize(model)
    model.eval()
    base = family_model(name)
    try:
        with torch.no_grad():
            base(input_ids=x[:, 5:8], past_key_values=base(input_ids=x[:, :5], use_cache=True).past_key_values)
    except RuntimeError:  # this release's own layer cannot continue a cache (StableLM in transformers 5.0)
        with pytest.raises((RuntimeError, ValueError)):  # loud for the adapted model too, never wrong
            with torch.no_grad():
                model(input_ids=x[:, 5:8], past_key_values=model(input_ids=x[:, :5], use_cache=True).past_key_values)
        return
    with torch.no_grad():
        full = model(input_ids=x).logits
        out = model(input_ids=x[:, :5], use_cache=True)
        pieces, cache = [out.logits], out.past_key_values
        for start, stop in [(5, 8), (8, 9), (9, 11)]:
            out = model(input_ids=x[:, start:stop], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
            cache = out.past_key_values
        plain = family_model(name)(input_ids=x).logits
    assert rel(torch.cat(pieces, dim=1), full) <= 1e-5
    assert rel(full, plain) > 1e-3, "the trained prompts must change the outputs"


def test_prompt_keys_take_the_layers_own_key_path():
    """Qwen3 normalises keys per head before RoPE: the prompt keys are k_norm(k_proj(prompts)), unrotated."""
    model = apply_excitor(family_model("qwen3"), num_prompts=4, backend="reference")
    layer = excitor_layers(model)[-1]  # the spy keeps the last layer's call
    seen = {}

    def spy(q, k, v, pk, gate, **kw):
        seen["pk"] = pk
        return torch.zeros_like(q)

    import excitor_kernels.module as module
    original = module.excitor_attention
    module.excitor_attention = spy
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[5, 6, 7]]))
    finally:
        module.excitor_attention = original
    d = layer.head_dim
    want = layer.k_norm(layer.k_proj(layer.prompts).view(4, -1, d)).transpose(0, 1)
    assert torch.allclose(seen["pk"], want, atol=1e-6, rtol=1e-6)


def test_softcapping_is_refused_when_adapting():
    model = family_model("gemma2", attn_logit_softcapping=50.0)
    before = [type(layer.self_attn) for layer in model.model.layers]
    with pytest.raises(ValueError, match="softcapping"):
        apply_excitor(model)
    assert [type(layer.self_attn) for layer in model.model.layers] == before


def test_sliding_window_shorter_than_the_keys_is_refused_at_the_call():
    model = apply_excitor(family_model("mistral", sliding_window=4), backend="reference")
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))  # within the window: exact, runs
        with pytest.raises(ValueError, match="sliding"):
            model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10]]))


def test_an_option_the_function_does_not_know_is_refused():
    from excitor_kernels.module import _attention_function

    model = apply_excitor(family_model("llama"), num_prompts=2, backend="reference")
    layer = excitor_layers(model)[0]
    original = layer.attention_class.forward

    def forward(self, *args, **kwargs):
        return original(self, *args, s_aux=torch.zeros(4), **kwargs)

    layer.attention_class.forward = forward
    try:
        with pytest.raises(ValueError, match="s_aux"):
            model(input_ids=torch.tensor([[5, 6, 7]]))
    finally:
        layer.attention_class.forward = original
    with pytest.raises(RuntimeError, match="without its prompts"):
        _attention_function(layer, torch.zeros(1, 4, 2, 16), torch.zeros(1, 2, 2, 16), torch.zeros(1, 2, 2, 16), None)


def test_continuous_batching_is_refused_by_name():
    """generate_batch (continuous batching, paged attention) hands the attention function a paged cache's block
    tables and read/write indices (transformers 5.25: block_table, read_index, write_index, with is_causal=False):
    refused with an error that names continuous batching (transformers logs it and the requests come back empty),
    before the is_causal refusal, which would not say why."""
    from excitor_kernels.module import IMPLEMENTATION, _attention_function, _Call

    model = apply_excitor(family_model("llama"), num_prompts=2, backend="reference")
    layer = excitor_layers(model)[0]
    q, kv = torch.zeros(1, 4, 2, 16), torch.zeros(1, 2, 2, 16)
    paged = dict(read_index=[torch.zeros(2, dtype=torch.long)], write_index=[torch.zeros(2, dtype=torch.long)],
                 is_causal=False, **{IMPLEMENTATION: _Call(None, None, None)})
    with pytest.raises(ValueError, match="continuous batching"):
        _attention_function(layer, q, kv, kv, None, **paged)


def test_layers_without_the_registry_are_refused():
    class Attention(torch.nn.Module):  # a layer that computes its own attention
        def __init__(self, config):
            super().__init__()
            self.config, self.layer_idx, self.head_dim = config, 0, 16

        def forward(self, hidden_states, **kwargs):
            return hidden_states, None

    model = family_model("llama")
    model.model.layers[-1].self_attn = Attention(model.config)
    with pytest.raises(TypeError, match="attention registry"):
        apply_excitor(model)


@pytest.mark.parametrize("name", NAMES)
def test_original_attention_gives_back_the_original_layer(name):
    """The adapted layers, trained, then swapped back for ``original_attention()``: the base model's logits exactly
    (StableLM's layer keeps its own ``num_heads``, which the adapted layer also sets)."""
    x, mask = _batch()
    base = family_model(name)
    with torch.no_grad():
        expected = base(input_ids=x, attention_mask=mask).logits
    model = apply_excitor(family_model(name), num_prompts=4, backend="reference")
    randomize(model)
    for layer in model.model.layers:
        original = layer.self_attn.original_attention()
        assert type(original) is type(base.model.layers[0].self_attn)
        assert set(vars(original)) == set(vars(base.model.layers[layer.self_attn.layer_idx].self_attn))
        layer.self_attn = original
    with torch.no_grad():
        assert torch.equal(model(input_ids=x, attention_mask=mask).logits, expected)


@pytest.mark.parametrize("attribute", ["gate", "mode", "prompts", "sim_up", "gate_values", "num_heads"])
def test_a_layer_with_an_attribute_the_adapted_layer_sets_is_refused(attribute):
    model = family_model("llama")
    attention = model.model.layers[0].self_attn
    value = 7 if attribute == "num_heads" else torch.nn.Linear(2, 2) if attribute == "sim_up" else \
        torch.nn.Parameter(torch.zeros(1)) if attribute in ("gate", "prompts") else "x"
    setattr(attention, attribute, value)  # num_heads: not the config's head count
    with pytest.raises(ValueError, match=attribute):
        apply_excitor(model, num_prompts=2, backend="reference")
    assert not excitor_layers(model)
