"""The Triton kernels of model/sam_rel_pos_kernel.py on the CPU, through Triton's interpreter (no GPU
in CI): they write what SdpaSamAttention's PyTorch calls write. float16 here (the interpreter has no
bfloat16); the GPU file tests/test_sam_kernel_cuda.py covers both on the device."""
import pytest
import torch
from triton_interpreter import run_in_interpreter

CHECK = """
import torch
from sam_kernel_check import check_extend

# a windowed layer's grid, a tiny model's, grids that are not square or not a power of two wide,
# and more heads than one program takes
for geometry in [(2, 14, 14, 2, 80), (3, 4, 4, 2, 8), (2, 12, 20, 2, 24), (2, 7, 5, 3, 40), (1, 20, 17, 20, 16)]:
    check_extend(*geometry, torch.half, "cpu", tolerance=0.01)
print("kernels ok")
"""


# on a GPU host tests/test_sam_kernel_cuda.py runs the kernel itself (and the Triton interpreter of
# the torch 2.11 GPU image cannot loop to a bound passed as an argument)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA twin covers the kernel")
def test_kernels_write_what_the_pytorch_calls_write_in_the_interpreter():
    done = run_in_interpreter(CHECK)
    assert done.returncode == 0 and "kernels ok" in done.stdout, done.stderr[-3000:]
