"""SdpaSamAttention's extended queries and keys, written by two GPU kernels (Triton).

SdpaSamAttention (model/sam.py) feeds SAM's decomposed relative positions to SDPA as extra channels:

    q_ext = [q, q . Rh[row]^T, q . Rw[col]^T, 0...]      k_ext = [k, one-hot(row), one-hot(col), 0...]

In eager PyTorch that is two einsums (each copying q into the layout its batched product wants) and
two concatenations (each writing its inputs again): about a quarter of the ViT-H encoder's GPU time on
an H100, all of it copies (benchmarks/RESULTS.md). Here each q/k row is read once from the qkv
projection's output and each extended row written once; the relative-position products run as small
matrix products inside the kernels (one program per grid row for Rh, one per grid column for Rw, where
all tokens share one table). Products accumulate in float32 and round once, as cuBLAS does for the
einsum, so values agree to float rounding (tests/test_sam_kernel_cuda.py).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def available(qkv: torch.Tensor) -> bool:
    """For half-precision CUDA tensors outside autograd (SAM's image encoder is frozen in SESAME)."""
    return (triton is not None and qkv.is_cuda and qkv.dtype in (torch.bfloat16, torch.float16)
            and not (torch.is_grad_enabled() and qkv.requires_grad) and qkv.is_contiguous())


if triton is not None:
    @triton.jit
    def _queries_times_table(qkv_ptr, table_ptr, b, n, token, keep, table_row, heads, length, size,
                             D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
        """The queries of `token` (one head, one window), their rows' start in qkv, and their products
        with table[table_row]^T (size x D): (tokens, BLOCK_R), float32 accumulation."""
        c = tl.arange(0, BLOCK_D)
        base = qkv_ptr + b.to(tl.int64) * length * 3 * heads * D + token[:, None].to(tl.int64) * 3 * heads * D + n * D
        q = tl.load(base + c[None, :], mask=keep[:, None] & (c[None, :] < D), other=0.0)
        r = tl.arange(0, BLOCK_R)
        table = tl.load(table_ptr + table_row * size * D + r[:, None] * D + c[None, :],
                        mask=(r[:, None] < size) & (c[None, :] < D), other=0.0)
        return base, q, tl.dot(q, tl.trans(table))

    @triton.jit
    def _extended_rows(b, n, token, heads, length, width):
        """Where the extended rows of `token` (one head, one window) start: (B, h*w, heads, width) memory."""
        return ((b.to(tl.int64) * length + token[:, None].to(tl.int64)) * heads + n) * width

    @triton.jit
    def _rows_kernel(qkv_ptr, th_ptr, q_out, k_out, heads, length, grid_h, grid_w, width,
                     D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_Z: tl.constexpr):
        """One program per (window x head, grid row): q copied, q . Rh[row]^T, the zero channels, and
        the whole extended key row."""
        bn, row = tl.program_id(0), tl.program_id(1)
        b, n = bn // heads, bn % heads
        col = tl.arange(0, BLOCK_T)
        keep = col < grid_w
        token = row * grid_w + col
        base, q, rel = _queries_times_table(qkv_ptr, th_ptr, b, n, token, keep, row, heads, length, grid_h,
                                            D, BLOCK_D, BLOCK_R)
        dst = _extended_rows(b, n, token, heads, length, width)
        c = tl.arange(0, BLOCK_D)
        tl.store(q_out + dst + c[None, :], q, mask=keep[:, None] & (c[None, :] < D))
        r = tl.arange(0, BLOCK_R)
        tl.store(q_out + dst + D + r[None, :], rel.to(q.dtype), mask=keep[:, None] & (r[None, :] < grid_h))
        z = D + grid_h + grid_w + tl.arange(0, BLOCK_Z)
        tl.store(q_out + dst + z[None, :], tl.zeros((BLOCK_T, BLOCK_Z), q.dtype),
                 mask=keep[:, None] & (z[None, :] < width))
        kc = tl.arange(0, BLOCK_K)
        key = tl.load(base + heads * D + kc[None, :], mask=keep[:, None] & (kc[None, :] < D), other=0.0)
        one_hot = (kc[None, :] == D + row) | (kc[None, :] == D + grid_h + col[:, None])
        key = tl.where(one_hot, 1.0, key.to(tl.float32)).to(q.dtype)
        tl.store(k_out + dst + kc[None, :], key, mask=keep[:, None] & (kc[None, :] < width))

    @triton.jit
    def _cols_kernel(qkv_ptr, tw_ptr, q_out, heads, length, grid_h, grid_w, width,
                     D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program per (window x head, grid column): q . Rw[column]^T."""
        bn, column = tl.program_id(0), tl.program_id(1)
        b, n = bn // heads, bn % heads
        row = tl.arange(0, BLOCK_T)
        keep = row < grid_h
        token = row * grid_w + column
        _, q, rel = _queries_times_table(qkv_ptr, tw_ptr, b, n, token, keep, column, heads, length, grid_w,
                                         D, BLOCK_D, BLOCK_C)
        dst = _extended_rows(b, n, token, heads, length, width)
        k = tl.arange(0, BLOCK_C)
        tl.store(q_out + dst + D + grid_h + k[None, :], rel.to(q.dtype), mask=keep[:, None] & (k[None, :] < grid_w))


def _block(size: int) -> int:
    return max(16, triton.next_power_of_2(size))  # tl.dot wants every side >= 16


def extend_qk(qkv: torch.Tensor, table_h: torch.Tensor, table_w: torch.Tensor, grid: tuple[int, int],
              width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (B, h*w, 3, heads, d) contiguous: the qkv projection's output. table_h (h, h, d) and
    table_w (w, w, d): the gathered relative-position tables, already divided by the attention scale.
    Returns q_ext and k_ext, (B, heads, h*w, width) views of (B, h*w, heads, width) memory, width >=
    d + h + w: laid out so, SDPA writes its output with the heads of a token side by side, which the
    projection after it reads with no copy."""
    batch, length, _, heads, d = qkv.shape
    h, w = grid
    q_ext = qkv.new_empty((batch, length, heads, width))
    k_ext = torch.empty_like(q_ext)
    table_h, table_w = table_h.to(qkv.dtype).contiguous(), table_w.to(qkv.dtype).contiguous()
    block_d = _block(d)
    _rows_kernel[(batch * heads, h)](qkv, table_h, q_ext, k_ext, heads, length, h, w, width, D=d,
                                     BLOCK_T=_block(w), BLOCK_R=_block(h), BLOCK_D=block_d,
                                     BLOCK_K=triton.next_power_of_2(width),
                                     BLOCK_Z=max(1, triton.next_power_of_2(max(1, width - d - h - w))))
    _cols_kernel[(batch * heads, w)](qkv, table_w, q_ext, heads, length, h, w, width, D=d,
                                     BLOCK_T=_block(h), BLOCK_C=_block(w), BLOCK_D=block_d)
    return q_ext.transpose(1, 2), k_ext.transpose(1, 2)
