"""What is measured: attention problem sizes, the GPU sweep (full or quick) and the CPU smoke set.

FLOPs are counted as flash-attention counts them: ``4 * B * H * M * N * d`` for the forward (two
matrix products), halved when causal; the backward is 2.5x the forward. The prompt terms (O(N * P * d))
are left out, so every provider is credited with the same work for the same case.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PASSES = ("fwd", "bwd", "fwd+bwd")
PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
TOKENS = 16 * 1024  # B * N for the GPU sweep


@dataclass(frozen=True)
class Case:
    op: str          # "excitor" or "adapter"
    pass_: str       # "fwd", "bwd" or "fwd+bwd"
    dtype: str       # key of DTYPES
    head_dim: int
    causal: bool
    batch: int
    seq: int         # M == N: self-attention over the whole sequence, as in training
    heads: int       # query heads
    kv_heads: int
    prompts: int

    @property
    def id(self) -> str:
        mask = "causal" if self.causal else "full"
        return (f"{self.op}-{self.pass_}-{self.dtype}-d{self.head_dim}-{mask}-N{self.seq}-B{self.batch}"
                f"-H{self.heads}kv{self.kv_heads}-P{self.prompts}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def flops(self) -> float:
        fwd = 4.0 * self.batch * self.heads * self.seq * self.seq * self.head_dim
        if self.causal:
            fwd /= 2
        return fwd * PASS_FLOP_FACTOR[self.pass_]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        return d


def gpu_cases(quick: bool) -> list[Case]:
    """The GPU sweep (B * N = 16k tokens, 32 query heads). Quick: bf16, d=128, causal, N in {1k, 4k, 16k}, MHA and
    GQA 32/8, P=30 (the operator set of the GPU issue; about one 10-minute command)."""
    if quick:
        grid = dict(dtype=["bf16"], d=[128], causal=[True], seq=[1024, 4096, 16384], kv=[32, 8], prompts=[30])
    else:
        grid = dict(dtype=["bf16", "fp16"], d=[64, 128], causal=[True, False],
                    seq=[512, 1024, 2048, 4096, 8192, 16384], kv=[32, 8], prompts=[10, 30])
    cases = []
    for op, pass_, dtype, d, causal, seq, kv, prompts in itertools.product(
            ("excitor", "adapter"), PASSES, grid["dtype"], grid["d"], grid["causal"], grid["seq"], grid["kv"],
            grid["prompts"]):
        cases.append(Case(op, pass_, dtype, d, causal, TOKENS // seq, seq, 32, kv, prompts))
    return cases


def smoke_cases() -> list[Case]:
    """CPU smoke set: tiny fp32 shapes that exercise every code path (GQA causal, MHA full), not performance."""
    cases = []
    for op in ("excitor", "adapter"):
        for pass_ in PASSES:
            cases.append(Case(op, pass_, "fp32", 64, True, 1, 64, 4, 2, 10))
        cases.append(Case(op, "fwd+bwd", "fp32", 64, False, 2, 48, 4, 4, 3))
    return cases
