"""Attention of a decode step read straight from the engine's KV cache (one Triton kernel).

At a decode step each cache row (a group: one image's queries) holds its prefix once and every slot's
suffix and answer columns; its n slots each add one query row per head. SDPA (cuDNN) takes that as
(rows, heads, n, d) queries over (rows, kv_heads, read, d) strided cache views with an additive mask,
and tiles 64 query rows where there are n (8 in the evaluation): it streamed the cache at ~2.6 TB/s on
an H100, half of a decode step's GPU time (benchmarks/RESULTS.md). Here one program per (row, head)
holds its n query rows (padded to 16) and streams that head's keys and values once, block after
block, with an online softmax in float32; it writes (rows, n, heads, d), the layout the output
projection takes, so no transpose copy follows.

The mask stays the engine's additive (rows, 1, n, read) tensor (0 visible, -inf not), read block by
block beside the keys. Results equal SDPA's up to float rounding (another summation order):
tests/test_decode_attention_cuda.py compares them, and the engine tests compare answers.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

MAX_QUERIES = 64  # query rows per (row, head) a program holds
BLOCK_N = 64  # cache columns per step of a program's loop


def available(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> bool:
    """q (B, heads, n, d) bf16/fp16 on CUDA with unit stride in d; kv the cache's (rows, columns, 2,
    kv_heads, d) tensor, contiguous; mask (B, 1, n, read) additive, unit stride in the columns; d a
    power of two (16..256); n <= MAX_QUERIES; outside autograd."""
    d = q.shape[-1]
    grad = torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad)
    return (triton is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and not grad
            and kv.dtype == q.dtype and mask.dtype in (q.dtype, torch.float32) and kv.is_contiguous()
            and q.stride(-1) == 1 and mask.stride(-1) == 1 and 16 <= d <= 256 and d & (d - 1) == 0
            and q.shape[2] <= MAX_QUERIES and kv.shape[-1] == d and q.shape[1] % kv.shape[3] == 0)


if triton is not None:
    @triton.jit
    def _decode_attention_kernel(q_ptr, kv_ptr, mask_ptr, out_ptr, n, read, scale,
                                 q_row, q_head, q_query, kv_row, kv_column, mask_row, mask_query,
                                 HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One program per (cache row b, head h): softmax(q k^T * scale + mask) v over columns [0, read)."""
        pid = tl.program_id(0)
        b, h = pid // HEADS, pid % HEADS
        kv_h = h // (HEADS // KV_HEADS)
        m = tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        rows = m < n
        b64 = b.to(tl.int64)
        q = tl.load(q_ptr + b64 * q_row + h * q_head + m[:, None] * q_query + d[None, :], mask=rows[:, None],
                    other=0.0)
        keys = kv_ptr + b64 * kv_row + kv_h * D  # keys at [b, column, 0, kv_h], values KV_HEADS * D further
        values = keys + KV_HEADS * D
        bias = mask_ptr + b64 * mask_row + m[:, None] * mask_query
        log2e: tl.constexpr = 1.4426950408889634
        best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        for start in range(0, read, BLOCK_N):
            c = start + tl.arange(0, BLOCK_N)
            cols = c < read
            k = tl.load(keys + c[:, None].to(tl.int64) * kv_column + d[None, :], mask=cols[:, None], other=0.0)
            add = tl.load(bias + c[None, :], mask=rows[:, None] & cols[None, :], other=float("-inf"))
            s = (tl.dot(q, tl.trans(k)) * scale + add.to(tl.float32)) * log2e
            new_best = tl.maximum(best, tl.max(s, 1))
            shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # rows with nothing visible yet
            p = tl.exp2(s - shift[:, None])
            keep = tl.exp2(best - shift)
            total = total * keep + tl.sum(p, 1)
            v = tl.load(values + c[:, None].to(tl.int64) * kv_column + d[None, :], mask=cols[:, None], other=0.0)
            acc = acc * keep[:, None] + tl.dot(p.to(v.dtype), v)
            best = new_best
        out = acc / total[:, None]
        # out is (B, n, HEADS, D) contiguous
        tl.store(out_ptr + (b64 * n + m[:, None]) * (HEADS * D) + h * D + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=rows[:, None])


def attend(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, scale: float, block_n: int = BLOCK_N,
           num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """q (B, heads, n, d); kv: the cache tensor of a layer, (rows >= B, columns, 2, kv_heads, d); mask
    (B, 1, n, read), additive, read <= columns. Returns (B, n, heads * d): each query row's attention
    output over cache row b's columns [0, read), heads side by side. The launch settings are
    benchmarks/decode_kernels.py's to vary."""
    batch, heads, n, d = q.shape
    read = mask.shape[-1]
    out = q.new_empty((batch, n, heads * d))
    _decode_attention_kernel[(batch * heads,)](
        q, kv, mask, out, n, read, scale, q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
        mask.stride(0), mask.stride(2), HEADS=heads, KV_HEADS=kv.shape[3], D=d,
        BLOCK_M=max(16, triton.next_power_of_2(n)), BLOCK_N=block_n, num_warps=num_warps,
        num_stages=num_stages)
    return out
