"""The rotary embedding of q and k as one GPU kernel (Triton, which ships with PyTorch's CUDA builds).

In eager PyTorch it is four kernels (x*cos, swap halves, *sin, add), three of them on broadcast or
strided operands, which PyTorch runs in its slow generic elementwise kernel: for LLaMA-7B's prefill
that was a fifth of the non-matrix GPU time. Here each program rotates the heads of one token in
registers. It rounds where eager PyTorch rounds (after each product and after the sum), so the
result is the same bit for bit (tests/test_eval_engine_cuda.py). It is for bfloat16, the dtype
SESAME runs in; `rotate_` in llama_layers.py calls it on bf16 CUDA tensors when Triton is
importable and falls back to the four PyTorch calls otherwise.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def available(x: torch.Tensor) -> bool:
    d = x.shape[-1]
    return (triton is not None and x.is_cuda and x.dtype == torch.bfloat16 and x.stride(-1) == 1 and d >= 4
            and d & (d - 1) == 0)


if triton is not None:
    @triton.jit
    def _round_bf16(x):
        """float32 -> the nearest bfloat16 value (ties to even), kept in float32. By integer
        arithmetic: the compiler may drop a float32 -> bf16 -> float32 round trip as a no-op."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))

    @triton.jit
    def _rotate_kernel(x_ptr, cos_ptr, sin_ptr, seq_len, heads, stride_b, stride_l, stride_h,
                       HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        token = tl.program_id(0)
        b = token // seq_len
        pos = token % seq_len
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        i = tl.arange(0, HALF)
        rows = x_ptr + b.to(tl.int64) * stride_b + pos.to(tl.int64) * stride_l + h[:, None].to(tl.int64) * stride_h
        keep = h[:, None] < heads
        # both halves are read and written by the thread that owns element i: no thread reads what
        # another has already overwritten
        x1 = tl.load(rows + i[None, :], mask=keep).to(tl.float32)
        x2 = tl.load(rows + HALF + i[None, :], mask=keep).to(tl.float32)
        table = token.to(tl.int64) * 2 * HALF
        c1 = tl.load(cos_ptr + table + i).to(tl.float32)
        c2 = tl.load(cos_ptr + table + HALF + i).to(tl.float32)
        s1 = tl.load(sin_ptr + table + i).to(tl.float32)  # -sin of the first half (signed table)
        s2 = tl.load(sin_ptr + table + HALF + i).to(tl.float32)
        # eager bf16 rounds each product and the sum: so do we
        out1 = _round_bf16(x1 * c1) + _round_bf16(x2 * s1)
        out2 = _round_bf16(x2 * c2) + _round_bf16(x1 * s2)
        tl.store(rows + i[None, :], out1.to(tl.bfloat16), mask=keep)
        tl.store(rows + HALF + i[None, :], out2.to(tl.bfloat16), mask=keep)


def rotate_triton_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """x (B, L, heads, D) bf16 in place, last dim contiguous; cos / signed_sin (B, L, 1, D) bf16."""
    batch, length, heads, d = x.shape
    cos = cos.reshape(batch * length, d).contiguous()
    sin = signed_sin.reshape(batch * length, d).contiguous()
    block_h = min(triton.next_power_of_2(heads), max(1, 4096 // d))
    grid = (batch * length, triton.cdiv(heads, block_h))
    _rotate_kernel[grid](x, cos, sin, length, heads, x.stride(0), x.stride(1), x.stride(2), HALF=d // 2,
                         BLOCK_H=block_h)
