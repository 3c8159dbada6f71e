"""model/sam_mlp_kernel.py's linear_gelu against F.gelu(F.linear(x, w, b)) on the device, bf16 and
fp16, autotuned. CPU-only machines (CI) skip this file; tests/test_sam_mlp_kernel.py runs the kernel in
Triton's interpreter."""
import pytest
import torch
import torch.nn as nn
from sam_mlp_check import check_accuracy, check_rounding

from model.sam_mlp_kernel import available, linear_gelu

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.bfloat16, torch.float16]
# (x shape, N): ViT-H's lin1 for two images and for a few windowed rows; M, N, K off the blocks; tiny
SHAPES = [((2 * 4096, 1280), 5120), ((2, 196, 1280), 5120), ((37, 48), 80), ((1000, 264), 520),
          ((3, 7, 72), 200), ((1, 16), 8)]


@pytest.mark.parametrize("shape,n", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_gelu_rounds_as_eager(shape, n, dtype):
    worst, equal = check_rounding(shape, n, dtype, "cuda")
    print(f"rounding {shape} -> {n} {dtype}: max {worst} ulp, {equal:.6f} equal")
    # libdevice's erff in both: expected bit for bit
    assert worst <= 1 and equal >= 0.999, (worst, equal)


@pytest.mark.parametrize("shape,n", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_gelu_is_as_accurate_as_eager(shape, n, dtype):
    eager_diff, kernel_err, eager_err = check_accuracy(shape, n, dtype, "cuda")
    print(f"accuracy {shape} -> {n} {dtype}: vs eager {eager_diff:g}, vs float64 kernel {kernel_err:g} "
          f"eager {eager_err:g}")
    assert kernel_err <= 2 * eager_err, (kernel_err, eager_err)


def test_the_kernel_stays_out_of_autograd_and_off_other_types():
    lin = nn.Linear(64, 96, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(5, 64, device="cuda", dtype=torch.bfloat16)
    assert available(x, lin)
    assert available(x.half(), lin.half()) and not available(x, lin)  # lin is fp16 now
    lin.bfloat16()
    assert not available(x.float(), lin.float())
    assert not available(x.cpu(), lin.cpu())
    lin.cuda()
    assert not available(x.t().contiguous().t(), lin)  # not contiguous
    assert not available(x, nn.Linear(64, 96, bias=False, device="cuda", dtype=torch.bfloat16))
    assert not available(x, nn.Identity())
    assert not available(x.clone().requires_grad_(), lin)
    lin.requires_grad_(True)
    assert not available(x, lin)
    with torch.no_grad():
        assert available(x.clone().requires_grad_(), lin)
        got = linear_gelu(x, lin)
    assert got.grad_fn is None and got.shape == (5, 96)
