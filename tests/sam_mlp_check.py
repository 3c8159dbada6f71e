"""The comparison behind tests/test_sam_mlp_kernel.py (CPU, Triton's interpreter) and
tests/test_sam_mlp_kernel_cuda.py: model/sam_mlp_kernel.py's linear_gelu against
F.gelu(F.linear(x, w, b)), the two PyTorch calls it replaces."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.sam_mlp_kernel import linear_gelu


def ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Units in the last place between two bf16 / fp16 tensors, elementwise (0 for +0 vs -0)."""
    def ordered(t):  # sign-magnitude bits -> integers in the order of the values
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -32768 - bits, bits)
    return (ordered(got) - ordered(want)).abs()


def _linear(k: int, n: int, dtype, device, weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(k, n, device=device, dtype=dtype).requires_grad_(False)
    linear.weight.copy_(weight)
    linear.bias.copy_(bias)
    return linear


def check_rounding(shape, n: int, dtype, device, seed=0) -> tuple[int, float]:
    """x of `shape` (..., K) and w, b whose float32 sums are exact in any order (small multiples of
    powers of two: each product under 2^12 units of the last place, their sum under 2^24), so the
    product's order cannot matter and the kernel must round as eager does: the sum plus bias rounded to
    `dtype` once, then PyTorch's GELU of that tensor. A GELU of the unrounded sum, a tanh GELU or a lost
    bias show here. Returns the largest ulp difference and the fraction of equal elements."""
    torch.manual_seed(seed)
    k = shape[-1]
    assert k <= 4000, "sums of up to 4000 products stay exact in float32"
    shrink = 2 ** max(0, round(math.log2(k) / 2) - 3)  # a power of two: sums of std about 1 for any K
    x = torch.randint(-64, 65, shape, device=device).to(dtype) / 64
    weight = torch.randint(-64, 65, (n, k), device=device).to(dtype) / (256 * shrink)
    bias = torch.randint(-2048, 2049, (n,), device=device).to(dtype) / 4096
    linear = _linear(k, n, dtype, device, weight, bias)
    exact = F.linear(x.double(), weight.double(), bias.double())
    want = F.gelu(exact.to(dtype))
    got = linear_gelu(x, linear)
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous(), (shape, n, dtype)
    diff = ulps(got, want)
    return int(diff.max()), float((diff == 0).float().mean())


def check_accuracy(shape, n: int, dtype, device, seed=0) -> tuple[float, float, float]:
    """Random x of `shape` (..., K), w and b (pre-activations of std about 1.7, GELU's bend). Returns
    the largest |kernel - eager| (eager: F.gelu(F.linear(x, w, b)) in `dtype`), and the largest errors
    of the kernel and of eager from the float64 result of the same inputs."""
    torch.manual_seed(seed)
    k = shape[-1]
    x = torch.randn(shape, device=device).to(dtype)
    weight = (torch.rand(n, k, device=device) * 2 - 1).mul_(3 / k ** 0.5).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    linear = _linear(k, n, dtype, device, weight, bias)
    got = linear_gelu(x, linear)
    eager = F.gelu(F.linear(x, weight, bias))
    exact = F.gelu(F.linear(x.double(), weight.double(), bias.double()))
    assert got.shape == eager.shape and got.dtype == dtype, (shape, n, dtype)

    def most(a, b) -> float:
        return float((a.double() - b.double()).abs().max())
    return most(got, eager), most(got, exact), most(eager, exact)
