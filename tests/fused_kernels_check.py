"""The comparison behind tests/test_fused_kernels.py (CPU, Triton's interpreter) and
tests/test_fused_kernels_cuda.py: engine/fused_kernels.py against the PyTorch calls it replaces."""
import torch
import torch.nn.functional as F

from engine import fused_kernels


def ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Units in the last place between two bf16 / fp16 tensors, elementwise (0 for +0 vs -0)."""
    def ordered(t):  # sign-magnitude bits -> integers in the order of the values
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -32768 - bits, bits)
    return (ordered(got) - ordered(want)).abs()


def reference_rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def check_rms(shape, dtype, device, eps=1e-6, row_pad=0, seed=0) -> tuple[int, float]:
    """x of `shape` (rows `row_pad` elements apart when nonzero: a strided view). Returns the largest
    ulp difference from the reference and the fraction of equal elements."""
    torch.manual_seed(seed)
    width = shape[-1]
    x = torch.randn(*shape[:-1], width + row_pad, device=device).mul_(3).to(dtype)[..., :width]
    x[..., 0, :] *= 1e-3  # a small row: eps matters
    weight = (1 + 0.3 * torch.randn(width, device=device)).to(dtype)
    got = fused_kernels.rms_norm_weighted(x, weight, eps)
    want = reference_rms(x, weight, eps)
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous(), (shape, dtype)
    diff = ulps(got, want)
    return int(diff.max()), float((diff == 0).float().mean())


def check_silu_mul(shape, dtype, device, packed=True, seed=0) -> tuple[int, int]:
    """gate, up of `shape`: the two halves of one (..., 2 * I) tensor when `packed`, else separate
    tensors. The product must round as PyTorch's does, exactly: silu_mul(gate, up) equals
    silu_mul(gate, 1) * up. Returns the largest ulp differences of the SiLU (silu_mul(gate, 1)) from
    F.silu(gate), and of the result from F.silu(gate) * up; one ulp in the SiLU can become two in
    the product."""
    torch.manual_seed(seed)
    width = shape[-1]
    both = torch.randn(*shape[:-1], 2 * width, device=device).mul_(4)
    both[..., :8] = torch.tensor([0.0, -0.0, 90.0, -90.0, 1e-3, -1e-3, 20.0, -20.0])  # exp's edges
    both = both.to(dtype)
    if packed:
        gate, up = both[..., :width], both[..., width:]
    else:
        gate, up = both[..., :width].contiguous(), both[..., width:].contiguous()
    got = fused_kernels.silu_mul(gate, up)
    assert got.shape == gate.shape and got.dtype == dtype and got.is_contiguous(), (shape, dtype)
    silu = fused_kernels.silu_mul(gate, torch.ones_like(gate))
    assert torch.equal(got, silu * up), (shape, dtype, "product")
    return int(ulps(silu, F.silu(gate)).max()), int(ulps(got, F.silu(gate) * up).max())
