"""python/finetune_demo.py picks the Triton interpreter from --device, not from whether the machine has a GPU."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A machine with a GPU (torch.cuda.is_available() pretended True) running the demo with --device cpu: check 1 calls
# the Triton backend on CPU tensors, which only runs when the kernels were decorated interpreted.
PROGRAM = """
import sys, torch
torch.cuda.is_available = lambda: True
sys.path.insert(0, "python")
import finetune_demo
finetune_demo.interpret_on_cpu(finetune_demo.parse_args(["--device", "cpu"]).device)
from excitor_kernels import excitor_attention
q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16)
o = excitor_attention(q, k, v, torch.randn(1, 3, 16), torch.rand(2), backend="triton")
print("ran", tuple(o.shape), bool(torch.isfinite(o).all()))
"""


def test_demo_interprets_the_kernels_for_device_cpu_on_a_gpu_machine():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "ran (1, 2, 5, 16) True" in run.stdout, run.stdout + run.stderr[-2000:]
