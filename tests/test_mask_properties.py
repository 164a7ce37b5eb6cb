"""Property-based test of the adapted model's mask handling: random padded batches, fed whole or in chunks through
a KV cache, under each mask convention transformers has (sdpa's boolean 4-D, eager's additive 4-D, flash-attention's
2-D or None), equal every sample run alone, unpadded.

Hypothesis draws the batch (1 to 3 samples), the padded length, each sample's real length and padding (left, right,
or a block in the middle: a hole in the cache), where the tokens are cut into forwards through one cache (no cut:
one forward without a cache; single tokens are decoding steps), the cache (dynamic or static), the mask
convention, the operator and the backend. Every layer is adapted, so no layer runs transformers' own attention (a
flash-attention model then runs on the CPU). The logits at every real token must equal the sample's own unpadded
forward (reference, torch and triton backends in float32: 1e-4 relative); padding rows are not compared, nothing
reads them. The masks the layers got are also read as a compiled graph reads them (padding.traced_ranges, one key
range per sample on the device), which must give every real row the keys the mask shows it, or report that a
hole leaves no range (the graph's output is then NaN).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, StaticCache

from excitor_kernels._dispatch import triton_installed
from excitor_kernels.module import ExcitorAttention
from excitor_kernels.padding import traced_ranges, visibility
from tiny_models import DEVICES, LAYERS, adapted, rel, tokens

CONVENTIONS = ("sdpa", "eager", "flash_attention_2")
BACKENDS = ("reference", "torch") + (("triton",) if triton_installed() else ())
VARIANTS = (("excitor", None), ("excitor", 4), ("adapter", None))


def _flash_masks_keep_static_length() -> bool:
    """Whether transformers' flash-attention mask keeps a static cache's filled length when nothing is padded:
    transformers 5.0 returns None for an all-ones mask shorter than the keys, so the filled length is lost there
    (its own flash-attention path then attends the unfilled slots too); later releases return the mask."""
    import inspect

    from transformers.masking_utils import flash_attention_mask

    shape = {"q_length": 1} if "q_length" in inspect.signature(flash_attention_mask).parameters else {
        "cache_position": torch.arange(1)}  # transformers 5.0's signature
    return flash_attention_mask(batch_size=1, kv_length=3, attention_mask=torch.ones(1, 1, dtype=torch.bool),
                                **shape) is not None


@st.composite
def batches(draw):
    """(B, L, lengths, sides, splits): each sample's real length and where its padding is (left, right, or a block
    in the middle, as when generating after right padding: a hole in the cache), and where the tokens are cut into
    chunks (no cut: one forward without a cache; single-token chunks are decoding steps)."""
    B = draw(st.integers(1, 3))
    L = draw(st.integers(2, 9))
    lengths = [draw(st.integers(1, L)) for _ in range(B)]
    sides = [draw(st.sampled_from(["left", "right", "middle"])) for _ in range(B)]
    splits = sorted(draw(st.sets(st.integers(1, L - 1), max_size=3)))
    return B, L, lengths, sides, splits


def _mask(L, lengths, sides, device):
    mask = torch.zeros(len(lengths), L, dtype=torch.long, device=device)
    for b, (n, side) in enumerate(zip(lengths, sides)):
        if side == "left":
            mask[b, L - n:] = 1
        elif side == "middle" and 2 <= n < L:  # n // 2 real tokens, the padding, the others
            mask[b, :n // 2] = 1
            mask[b, L - (n - n // 2):] = 1
        else:
            mask[b, :n] = 1
    return mask


def _holes(allowed, real):
    """Whether some real row of the (B, M, N) visibility sees keys that are not one contiguous range."""
    j = torch.arange(allowed.shape[-1], device=allowed.device)
    first = torch.where(allowed, j, allowed.shape[-1]).amin(-1, keepdim=True)
    last = torch.where(allowed, j, -1).amax(-1, keepdim=True)
    return bool((((j >= first) & (j <= last)) != allowed)[real].any())


_MODELS = {}


def _device(backend):
    return DEVICES[0] if backend == "triton" else "cpu"


def _model(mode, sim_rank, backend, impl):
    """One randomised model per variant (made once: the draws change the data, not the weights)."""
    key = (mode, sim_rank, backend, impl)
    if key not in _MODELS:
        model = adapted(_device(backend), mode, sim_rank, num_layers=LAYERS, backend=backend)
        model.config._attn_implementation_internal = impl
        _MODELS[key] = model
    return _MODELS[key]


def _padded(batch, variant, backend, impl, seed):
    """(model, device, tokens, mask, position ids) of a drawn batch."""
    B, L, lengths, sides, _ = batch
    device = _device(backend)
    mask = _mask(L, lengths, sides, device)
    return (_model(*variant, backend, impl), device, tokens(device, B=B, L=L, seed=seed), mask,
            (mask.cumsum(-1) - 1).clamp(min=0))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches(), impl=st.sampled_from(CONVENTIONS), static=st.booleans(),
       variant=st.sampled_from(VARIANTS),
       backend=st.sampled_from(BACKENDS), seed=st.integers(0, 2 ** 16))
def test_padded_batches_in_chunks_equal_each_sample_alone(batch, impl, static, variant, backend, seed):
    B, L, lengths, sides, splits = batch
    model, device, x, mask, positions = _padded(batch, variant, backend, impl, seed)
    # a transformers bug, not the layer's: drawn again where the release's flash-attention mask of an unpadded chunk
    # over a static cache loses the filled length
    assume(not (impl == "flash_attention_2" and static and not _flash_masks_keep_static_length()
                and any(bool(mask[:, :e].all()) for e in splits + [L])))
    calls = []

    def attention(self, call, q, k, v, attention_mask, *args):  # records the masks the layers get
        calls.append((attention_mask, q.shape[2], k.shape[2]))
        return original(self, call, q, k, v, attention_mask, *args)

    original = ExcitorAttention.attention
    bounds = [0, *splits, L]
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(ExcitorAttention, "attention", attention)
        if not splits:
            logits = model(input_ids=x, attention_mask=mask, position_ids=positions, use_cache=False).logits
        else:
            cache = (StaticCache(config=model.config, max_cache_len=L + 3) if static
                     else DynamicCache(config=model.config))
            logits = torch.cat([model(input_ids=x[:, a:e], attention_mask=mask[:, :e], position_ids=positions[:, a:e],
                                      past_key_values=cache, use_cache=True).logits
                                for a, e in zip(bounds, bounds[1:])], 1)
    # what a compiled graph reads of the same masks (padding.traced_ranges): each sample's range, row i seeing
    # keys starts <= j <= ends - M + i, must be what the mask shows every real row; a real row that sees keys on
    # both sides of a hole fits no range, and the graph's output is then NaN (ok False)
    assert len(calls) == LAYERS * (len(bounds) - 1)
    for n, (layer_mask, M, N) in enumerate(calls):
        if layer_mask is None:
            continue
        starts, ends, keep, ok = traced_ranges(layer_mask, B, M, N)
        start = bounds[n // LAYERS]
        real = mask[:, start:start + M].bool()
        allowed = visibility(layer_mask, B, M, N)
        assert bool(ok) != _holes(allowed, real)
        if ok:
            j, i = torch.arange(N, device=device), torch.arange(M, device=device)[:, None]
            ranges = (j >= starts[:, None, None]) & (j <= (ends[:, None, None] - M + i))
            assert torch.equal(ranges[real], allowed[real]) and keep[real].all()
    with torch.no_grad():
        for b in range(B):
            real = mask[b].bool()
            alone = model(input_ids=x[b:b + 1, real], use_cache=False).logits[0]
            assert not torch.isnan(logits[b, real]).any()
            assert rel(logits[b, real], alone) <= 1e-4, (b, lengths, sides, splits, impl, static)


@pytest.mark.parametrize("impl", CONVENTIONS)
def test_a_hand_made_case_of_each_convention(impl):
    """The property's hardest hand-made case, run whatever hypothesis draws: a left-padded and a right-padded sample
    split inside the padding of one and the real tokens of the other, with a static cache."""
    test_padded_batches_in_chunks_equal_each_sample_alone.hypothesis.inner_test(
        batch=(2, 7, [4, 5], ["left", "right"], [3]), impl=impl, static=True, variant=("excitor", 4),
        backend="reference", seed=3)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches(), impl=st.sampled_from(CONVENTIONS),
       variant=st.sampled_from(VARIANTS),
       backend=st.sampled_from(BACKENDS), seed=st.integers(0, 2 ** 16))
def test_padded_training_batches_give_each_samples_gradients(batch, impl, variant, backend, seed):
    """Training (gradients on, no cache): a padded batch's loss, a random weighting of the real tokens' logits, has
    the gradients of every adapter parameter that the samples' own unpadded forwards give summed."""
    B, L, lengths, sides, _ = batch
    model, device, x, mask, positions = _padded(batch, variant, backend, impl, seed)
    weights = torch.randn(B, L, model.config.vocab_size, generator=torch.Generator().manual_seed(seed)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    real = mask.bool()
    logits = model(input_ids=x, attention_mask=mask, position_ids=positions, use_cache=False).logits
    got = torch.autograd.grad((logits[real] * weights[real]).sum(), params)
    expected = [torch.zeros_like(p) for p in params]
    for b in range(B):
        alone = model(input_ids=x[b:b + 1, real[b]], use_cache=False).logits[0]
        for e, g in zip(expected, torch.autograd.grad((alone * weights[b, real[b]]).sum(), params)):
            e += g
    # gradients that are 0 in exact arithmetic (every Excitor gradient when each sample has one token: a softmax
    # over one key is 1 whatever k') come out as float32 noise, about 1e-6 in norm, where this model's others are
    # 0.1 and more: errors are measured against at least 0.1
    for p, g, e in zip(params, got, expected):
        assert not torch.isnan(g).any()
        error = (g.double() - e.double()).norm()
        assert error <= 1e-4 * max(e.double().norm(), 0.1), (p.shape, lengths, sides, impl, error)
