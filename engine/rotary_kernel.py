"""The rotary embedding of q and k as one GPU kernel (Triton, which ships with PyTorch's CUDA builds).

In eager PyTorch it is four kernels (x*cos, swap halves, *sin, add), three of them on broadcast or
strided operands, which PyTorch runs in its slow generic elementwise kernel: for LLaMA-7B's prefill
that was a fifth of the non-matrix GPU time. Here each program rotates the heads of one token in
registers. It rounds where eager PyTorch rounds (after each product and after the sum), so the
result is the same bit for bit (tests/test_eval_engine_cuda.py). It is for bfloat16, the dtype
SESAME runs in; `rotate_` in llama_layers.py calls it on bf16 CUDA tensors when Triton is
importable and falls back to the four PyTorch calls otherwise.

`rotate_and_store_` also writes a layer's keys and values into the engine's KV cache in that pass:
the copy it replaces read them from the strided projection output in PyTorch's generic kernel (55
ms of a 512-query benchmark batch's prefills on an H100, benchmarks/RESULTS.md).
"""
from __future__ import annotations

from typing import Optional

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
    def _rotate_kernel(x_ptr, cos_ptr, sin_ptr, cache_ptr, columns_ptr, first_row, row_stride, column_stride,
                       seq_len, heads, rotated, in_place, stride_b, stride_l, stride_h,
                       HALF: tl.constexpr, BLOCK_H: tl.constexpr, STORE: tl.constexpr):
        """Heads [0, rotated) of a token rotated, the rest as they are; heads [0, in_place) written back
        in place, and (STORE) heads [in_place, heads) to the token's KV cache slot instead."""
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
        turn = h[:, None] < rotated
        out1 = tl.where(turn, _round_bf16(x1 * c1) + _round_bf16(x2 * s1), x1).to(tl.bfloat16)
        out2 = tl.where(turn, _round_bf16(x2 * c2) + _round_bf16(x1 * s2), x2).to(tl.bfloat16)
        here = keep & (h[:, None] < in_place)
        tl.store(rows + i[None, :], out1, mask=here)
        tl.store(rows + HALF + i[None, :], out2, mask=here)
        if STORE:  # the cache slot's (2, kv_heads, d) keys and values are the token's last heads, in order
            column = tl.load(columns_ptr + pos)
            slot = (cache_ptr + (first_row + b).to(tl.int64) * row_stride + column * column_stride
                    + (h[:, None] - in_place).to(tl.int64) * 2 * HALF)
            there = keep & (h[:, None] >= in_place)
            tl.store(slot + i[None, :], out1, mask=there)
            tl.store(slot + HALF + i[None, :], out2, mask=there)


def _launch(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, rotated: int, in_place: int,
            cache: Optional[torch.Tensor] = None, first_row: int = 0, columns: Optional[torch.Tensor] = None) -> None:
    batch, length, heads, d = x.shape
    cos = cos.reshape(batch * length, d).contiguous()
    sin = signed_sin.reshape(batch * length, d).contiguous()
    block_h = min(triton.next_power_of_2(heads), max(1, 4096 // d))
    grid = (batch * length, triton.cdiv(heads, block_h))
    store = cache is not None
    _rotate_kernel[grid](x, cos, sin, cache if store else x, columns if store else cos, first_row,
                         cache.stride(0) if store else 0, cache.stride(1) if store else 0, length, heads, rotated,
                         in_place, x.stride(0), x.stride(1), x.stride(2), HALF=d // 2, BLOCK_H=block_h, STORE=store)


def rotate_triton_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """x (B, L, heads, D) bf16 in place, last dim contiguous; cos / signed_sin (B, L, 1, D) bf16."""
    heads = x.shape[2]
    _launch(x, cos, signed_sin, heads, heads)


def can_store(cache: torch.Tensor) -> bool:
    """`rotate_and_store_` writes to this (rows, columns, 2, kv_heads, head_dim) cache: contiguous, and
    what the kernel rotates (projections of the cache's dtype and head width, contiguous last dim)."""
    return available(cache) and cache.is_contiguous()


def rotate_and_store_(qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, heads: int, kv_heads: int,
                      cache: torch.Tensor, first_row: int, columns: torch.Tensor) -> None:
    """One decoder layer's projections qkv (B, L, heads + 2 kv_heads, D): the queries rotated in place,
    the keys rotated and, with the values, written to cache (rows, columns, 2, kv_heads, D) at row
    first_row + b, column columns[l] (an (L,) int64 tensor on the device): what `rotate_` of q and k
    and then a copy into the cache give, bit for bit, in one pass. qkv's keys stay unrotated."""
    if (tuple(cache.shape[2:]) != (2, kv_heads, qkv.shape[-1]) or qkv.shape[2] != heads + 2 * kv_heads
            or qkv.dtype != cache.dtype):
        raise ValueError(f"rotate_and_store_: qkv {tuple(qkv.shape)} and cache {tuple(cache.shape)} do not match "
                         f"{heads} heads and {kv_heads} key/value heads")
    _launch(qkv, cos, signed_sin, heads + kv_heads, heads, cache, first_row, columns)
