"""LLaMA's RMSNorm and SwiGLU product as one GPU kernel each (Triton), with PyTorch's rounding.

In eager PyTorch each is two elementwise passes over a large tensor: `F.rms_norm` then the weight
product, and `silu(gate)` then `* up`. Here one program reads its inputs once and writes the result
once, rounding where eager PyTorch rounds:

- rms_norm_weighted: transformers' LlamaRMSNorm. float32 mean of squares, x * rsqrt(mean + eps)
  rounded to x's dtype, then the product with the weight rounded again.
- silu_mul: silu(gate) in float32 rounded to the dtype, then its product with `up` rounded again.

A product of two bf16 or fp16 values is exact in float32, so one product in the dtype rounds as
PyTorch's float32 product and cast do. The SiLU uses CUDA's own expf (libdevice) and an IEEE division,
as PyTorch's kernel does, so as to agree bit for bit; the mean of squares is summed in another order
than PyTorch's, so the norm may differ by one unit in the last place, rarely
(tests/test_fused_kernels_cuda.py). `available` says when to call them; llama_layers.py keeps the
PyTorch calls for everything else (CPU, float32, autograd).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU-only installs
    triton = None

MAX_WIDTH = 65536  # rms_norm_weighted holds one row in registers
SILU_BLOCK = 1024  # elements of one row per silu_mul program


def available(*tensors: torch.Tensor) -> bool:
    """bf16 / fp16 CUDA tensors outside autograd (the kernels have no backward)."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return (triton is not None and not grad
            and all(t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) for t in tensors))


if triton is not None:
    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, x_row_stride, width, inv_width, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        keep = c < width
        x_in = tl.load(x_ptr + row * x_row_stride + c, mask=keep, other=0.0)
        x = x_in.to(tl.float32)
        # PyTorch's CUDA mean multiplies the sum by 1/width (a float32 constant)
        variance = tl.sum(x * x, axis=0) * inv_width
        y = (x * tl.math.rsqrt(variance + eps)).to(x_in.dtype)
        w = tl.load(w_ptr + c, mask=keep, other=0.0)
        tl.store(out_ptr + row * width + c, y * w, mask=keep)

    @triton.jit
    def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, gate_row_stride, up_row_stride, width,
                         BLOCK: tl.constexpr, CUDA_EXP: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = c < width
        g_in = tl.load(gate_ptr + row * gate_row_stride + c, mask=keep, other=0.0)
        u = tl.load(up_ptr + row * up_row_stride + c, mask=keep, other=0.0)
        g = g_in.to(tl.float32)
        # tl.exp is an approximation on the GPU; libdevice's is CUDA's expf, which PyTorch uses.
        # Triton's CPU interpreter has no libdevice: it takes numpy's exp.
        if CUDA_EXP:
            e = libdevice.exp(-g)
        else:
            e = tl.exp(-g)
        silu = tl.math.div_rn(g, 1.0 + e).to(g_in.dtype)
        tl.store(out_ptr + row * width + c, silu * u, mask=keep)


def rms_norm_weighted(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., H), weight (H,) of x's dtype, H <= MAX_WIDTH: weight * rms_norm(x), a new contiguous
    tensor of x's shape."""
    width = x.shape[-1]
    rows = x.reshape(-1, width)  # a view where the leading dims allow it
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(width)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](rows, weight.contiguous(), out, rows.stride(0), width, 1.0 / width,
                                           eps, BLOCK=block, num_warps=max(1, min(16, block // 512)))
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate, up (..., I) of one shape and dtype, strided views allowed (the two
    halves of a packed gate/up product): a new contiguous tensor."""
    width = gate.shape[-1]
    g, u = gate.reshape(-1, width), up.reshape(-1, width)
    g, u = (t if t.stride(-1) == 1 else t.contiguous() for t in (g, u))
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if g.shape[0]:
        grid = (g.shape[0], triton.cdiv(width, SILU_BLOCK))
        _silu_mul_kernel[grid](g, u, out, g.stride(0), u.stride(0), width, BLOCK=SILU_BLOCK, CUDA_EXP=gate.is_cuda)
    return out
