"""The Triton kernels of model/sam_rel_pos_kernel.py on the CPU, through Triton's interpreter (no GPU
in CI): they write what SdpaSamAttention's PyTorch calls write. float16 here (the interpreter has no
bfloat16); the GPU file tests/test_sam_kernel_cuda.py covers both on the device."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = """
import torch
from sam_kernel_check import check_extend

for geometry in [(2, 14, 14, 2, 80), (3, 4, 4, 2, 8), (2, 12, 20, 2, 24), (2, 7, 5, 3, 40)]:
    check_extend(*geometry, torch.half, "cpu", tolerance=0.01)
print("kernels ok")
"""


def test_kernels_write_what_the_pytorch_calls_write_in_the_interpreter():
    pytest.importorskip("triton")
    path = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])  # the project, and sam_kernel_check
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "kernels ok" in done.stdout, done.stderr[-3000:]
