"""The 8-bit and 4-bit kernels on a GPU (tinygemm's 4-bit layout differs from the CPU one)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_quantize import _int4_reference

from model.quantize import Int4Linear, Int8Linear, int8_kernel_runs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("shape", [(256, 96), (4096, 11008), (11008, 4096)])
def test_kernels_on_cuda_equal_the_dequantised_product(shape):
    k, n = shape
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=False).to("cuda", torch.bfloat16)
    x = torch.randn(3, 7, k, dtype=torch.bfloat16, device="cuda")
    q4 = Int4Linear(linear)
    want = F.linear(x.float(), _int4_reference(linear, q4.group_size))
    scale = want.abs().max()
    assert (q4(x).float() - want).abs().max() <= 2e-2 * scale
    q8 = Int8Linear(linear)
    s = linear.weight.float().abs().amax(1) / 127
    w8 = (linear.weight.float() / s[:, None]).round().clamp(-128, 127) * s[:, None]
    want8 = F.linear(x.float(), w8)
    assert (q8(x).float() - want8).abs().max() <= 2e-2 * want8.abs().max()
    assert not q8.kernel  # the converted weight on a GPU
    int8_kernel_runs(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16)  # probes without failing
