"""The machine's ceilings, measured in the same run as the attention numbers.

* matmul: a large square matrix product (bf16 on a GPU, 8192^3; fp32 512^3 on the CPU), 2 n^3 FLOPs.
* copy: a device-to-device copy of 1 GiB (16 MiB on the CPU), counting bytes read plus bytes written.
Both on random data, never zeros.
"""
import torch

from bench import timing
from bench.timing import HAS_GPU

DEVICE = "cuda" if HAS_GPU else "cpu"
BUDGET = dict(round_s=0.02, budget_s=1.0, min_rounds=10, max_rounds=100) if HAS_GPU else \
    dict(round_s=0.01, budget_s=0.2, min_rounds=3, max_rounds=20)


def test_matmul_rate(benchmark, record):
    n, dtype = (8192, torch.bfloat16) if HAS_GPU else (512, torch.float32)
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    out = torch.empty(n, n, device=DEVICE, dtype=dtype)

    def step():
        torch.matmul(a, b, out=out)

    benchmark.pedantic(step, **timing.plan(step, **BUDGET))
    seconds = benchmark.stats.stats.median
    record(dict(key="ceiling/matmul", kind="ceiling", name="matmul", dtype=str(dtype).removeprefix("torch."), n=n,
                ms=seconds * 1e3, tflops=2 * n**3 / seconds / 1e12))


def test_copy_bandwidth(benchmark, record):
    nbytes = 2**30 if HAS_GPU else 2**24
    src = torch.randn(nbytes // 4, device=DEVICE)
    dst = torch.empty_like(src)

    def step():
        dst.copy_(src)

    benchmark.pedantic(step, **timing.plan(step, **BUDGET))
    seconds = benchmark.stats.stats.median
    record(dict(key="ceiling/copy", kind="ceiling", name="copy", bytes=nbytes, ms=seconds * 1e3,
                gbps=2 * nbytes / seconds / 1e9))
