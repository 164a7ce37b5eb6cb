"""Who computes each operator in the comparison, and why a provider cannot run here.

A provider is called as ``fn(x, causal, scale)`` with ``x`` the inputs of :func:`make_inputs` and
returns ``o (B, Hq, M, d)``. Plain-attention providers (``sdpa``, ``sdpa_flash``, ``sdpa_cudnn``,
``sdpa_efficient``, ``flash_attn``, ``flash_attn4``) ignore the prompts: they are the speed of light for the same q, k, v. On a GPU
plain SDPA is timed once per SDPA kernel, pinned (``SDPA_PINNED``); the report's "SDPA-best" is the fastest of
them on each case. Our backends are named by their ``backend=`` (``torch``: PyTorch ops around SDPA, the CPU smoke set), except
``ours_sdpa`` / ``ours_sdpa_concat`` (``backend="sdpa"`` / ``"sdpa_concat"``: the prompt passes around SDPA,
GQA with values per query head / through the ``[q, g q], [k, ke]`` rewrite), since ``sdpa`` is the plain baseline.
"""
from __future__ import annotations

import importlib.util

import torch

import excitor_kernels
from excitor_kernels import _dispatch
from . import baselines
from .cases import Case
from .timing import HAS_GPU


def _ours(backend, ops=("excitor", "adapter")):
    def excitor(x, causal, scale):
        return excitor_kernels.excitor_attention(x["q"], x["k"], x["v"], x["pk"], x["gate"], causal=causal,
                                                 softmax_scale=scale, backend=backend)

    def adapter(x, causal, scale):
        return excitor_kernels.adapter_attention(x["q"], x["k"], x["v"], x["pk"], x["pv"], x["gate"], causal=causal,
                                                 softmax_scale=scale, backend=backend)

    return {op: fn for op, fn in (("excitor", excitor), ("adapter", adapter)) if op in ops}


def _plain(fn):
    def run(x, causal, scale):
        return fn(x["q"], x["k"], x["v"], causal=causal, scale=scale)

    return {"excitor": run, "adapter": run}


def _excitor_only(fn):
    return {"excitor": lambda x, causal, scale: fn(x["q"], x["k"], x["v"], x["pk"], x["gate"], causal=causal,
                                                   scale=scale)}


def _adapter_only(fn):
    return {"adapter": lambda x, causal, scale: fn(x["q"], x["k"], x["v"], x["pk"], x["pv"], x["gate"],
                                                   causal=causal, scale=scale)}


def _merge(*tables):
    out = {}
    for t in tables:
        out.update(t)
    return out


# name -> {op: fn}
PROVIDERS = {
    "sdpa": _plain(baselines.sdpa),
    **{name: _plain(baselines.sdpa) for name in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")},
    "flash_attn": _plain(baselines.flash_attn),
    "flash_attn4": _plain(baselines.flash_attn4),
    "composition": _merge(_excitor_only(baselines.excitor_composition), _adapter_only(baselines.adapter_composition)),
    "eager_official": _merge(_excitor_only(baselines.excitor_eager), _adapter_only(baselines.adapter_eager_official)),
    "eager_peft": _adapter_only(baselines.adapter_eager_peft),
    "reference": _ours("reference"),
    "torch": _ours("torch"),
    "triton": _ours("triton"),
    "cuda": _ours("cuda"),
    "ours_sdpa": _ours("sdpa"),
    "ours_sdpa_concat": _ours("sdpa_concat", ops=("excitor",)),
}
USES_SDPA = {"sdpa", "composition", "ours_sdpa", "ours_sdpa_concat"}  # timed with the fastest SDPA backend for the case
SDPA_PINNED = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",  # plain SDPA, one kernel each
               "sdpa_efficient": "EFFICIENT_ATTENTION"}
PLAIN_SDPA = ("sdpa", *SDPA_PINNED)
GPU_PROVIDERS = (*SDPA_PINNED, "flash_attn", "flash_attn4", "composition", "eager_official", "eager_peft", "triton", "cuda", "ours_sdpa",
                 "ours_sdpa_concat")
SMOKE_PROVIDERS = ("reference", "torch", "sdpa", "flash_attn", "composition", "eager_official", "eager_peft", "triton", "cuda",
                   "ours_sdpa", "ours_sdpa_concat")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def unavailable(name: str) -> str | None:
    """Why ``name`` cannot run in this environment (None when it can)."""
    if name == "flash_attn" and not _importable("flash_attn.flash_attn_interface"):
        return "flash-attn is not installed"
    if name == "flash_attn4" and not _importable("flash_attn.cute"):
        return "flash-attn-4 is not installed (.ci/fa4_carry carries it to the device machine)"
    if name in ("triton", "ours_sdpa", "ours_sdpa_concat"):  # the sdpa backend's prompt passes are Triton kernels
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if not HAS_GPU and not _dispatch.triton_interpreted():
            return "no GPU and TRITON_INTERPRET is not 1"
    if name == "cuda":
        from excitor_kernels import _cuda

        if _cuda.cannot_build() is not None:
            return f"the CUDA extension cannot be built: {_cuda.cannot_build()}"
    if name in ("flash_attn", "flash_attn4") and not HAS_GPU:
        return f"{name} needs a GPU"
    return None


def sdpa_backends() -> list:
    """SDPA backends to try on this device (None: let PyTorch choose, the only choice on the CPU)."""
    if not HAS_GPU:
        return [None]
    from torch.nn.attention import SDPBackend

    return [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def make_inputs(case: Case, device, *, requires_grad: bool, seed: int = 0) -> dict:
    """Fresh random inputs (never zeros): q, k, v, prompt keys/values, a nonzero gate."""
    g = torch.Generator(device=device).manual_seed(seed)
    dt = case.torch_dtype

    def rand(*shape, scale=1.0):
        t = torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale
        return t.to(dt).requires_grad_(requires_grad)

    B, H, Hkv, N, d, P = case.batch, case.heads, case.kv_heads, case.seq, case.head_dim, case.prompts
    return dict(q=rand(B, H, N, d), k=rand(B, Hkv, N, d), v=rand(B, Hkv, N, d), pk=rand(Hkv, P, d),
                pv=rand(Hkv, P, d), gate=rand(H, scale=0.5))
