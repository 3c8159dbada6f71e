"""SdpaSamAttention's extended queries and keys, written by one GPU kernel (Triton).

SdpaSamAttention (model/sam.py) feeds SAM's decomposed relative positions to SDPA as extra channels:

    q_ext = [q, q . Rh[row]^T, q . Rw[col]^T, 0...]      k_ext = [k, one-hot(row), one-hot(col), 0...]

In eager PyTorch that is two einsums (each copying q into the layout its batched product wants) and
two concatenations (each writing its inputs again): about a quarter of the ViT-H encoder's GPU time on
an H100, all of it copies (benchmarks/RESULTS.md). Here each q/k row is read from the qkv projection's
output and each extended row written once; the relative-position products run as small matrix
products inside the kernel, over tokens that share one table (a grid row's for Rh, a grid column's
for Rw). Products accumulate in float32 and round once, as cuBLAS does for the einsum, so values agree
to float rounding (tests/test_sam_kernel_cuda.py).

One kernel, one program per (window or image, grid row, a few grid columns) with all heads: a token's
heads lie side by side in qkv and in the output, so programs move whole token rows. It writes the
copies, q . Rh[row]^T, the zeros and the keys, then q . Rw[column]^T for each of its columns (q read
from DRAM once). Two kernels with a program per (window x head, grid row) and per (window x head,
grid column) took 0.378 + 0.340 ms where this takes 0.300 + 0.273 (ViT-H windowed + global layer, 8
images, H100; benchmarks/RESULTS.md).
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
    def _start(b, token, n, length, heads, width):
        """Where row (b, token, n) of (B, length, heads, width) memory starts: one per token, or per
        (token, head) when n is a vector. qkv is (B, length, 3 * heads, d): q at head n, k at heads + n."""
        return ((b.to(tl.int64) * length + token.to(tl.int64)) * heads + n) * width

    @triton.jit
    def _load(ptr, start, keep, count, BLOCK: tl.constexpr):
        """(rows, BLOCK): `count` elements from each row start, zeros after and in rows not kept."""
        c = tl.arange(0, BLOCK)
        return tl.load(ptr + start[:, None] + c[None, :], mask=keep[:, None] & (c[None, :] < count), other=0.0)

    @triton.jit
    def _store(ptr, start, values, keep, count, BLOCK: tl.constexpr):
        """The first `count` of values' BLOCK columns to each kept row start."""
        c = tl.arange(0, BLOCK)
        tl.store(ptr + start[:, None] + c[None, :], values, mask=keep[:, None] & (c[None, :] < count))

    @triton.jit
    def _row_part(qkv_ptr, th_ptr, q_out, k_out, b, n, token, keep, row, col, heads, length, grid_h, grid_w,
                  width, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_Z: tl.constexpr):
        """The extended rows of `token` (columns `col` of grid row `row`; head n, or one per token): q
        copied, q . Rh[row]^T, the zero channels, and the whole key row (k copied, one-hots)."""
        src, dst = _start(b, token, n, length, 3 * heads, D), _start(b, token, n, length, heads, width)
        q = _load(qkv_ptr, src, keep, D, BLOCK_D)
        r = tl.arange(0, BLOCK_R)
        table = _load(th_ptr + row * grid_h * D, r * D, r < grid_h, D, BLOCK_D)
        _store(q_out, dst, q, keep, D, BLOCK_D)
        _store(q_out, dst + D, tl.dot(q, tl.trans(table)).to(q.dtype), keep, grid_h, BLOCK_R)
        zeros_from = D + grid_h + grid_w
        _store(q_out, dst + zeros_from, tl.zeros((q.shape[0], BLOCK_Z), q.dtype), keep, width - zeros_from, BLOCK_Z)
        kc = tl.arange(0, BLOCK_K)
        key = _load(qkv_ptr, src + heads * D, keep, D, BLOCK_K)
        one_hot = (kc[None, :] == D + row) | (kc[None, :] == D + grid_h + col[:, None])
        _store(k_out, dst, tl.where(one_hot, 1.0, key.to(tl.float32)).to(q.dtype), keep, width, BLOCK_K)

    @triton.jit
    def _column_part(qkv_ptr, tw_ptr, q_out, b, n, token, keep, column, heads, length, grid_h, grid_w, width,
                     D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
        """q . Rw[column]^T of `token` (all in grid column `column`; head n, or one per token)."""
        src, dst = _start(b, token, n, length, 3 * heads, D), _start(b, token, n, length, heads, width)
        q = _load(qkv_ptr, src, keep, D, BLOCK_D)
        c = tl.arange(0, BLOCK_C)
        table = _load(tw_ptr + column * grid_w * D, c * D, c < grid_w, D, BLOCK_D)
        _store(q_out, dst + D + grid_h, tl.dot(q, tl.trans(table)).to(q.dtype), keep, grid_w, BLOCK_C)

    @triton.jit
    def _extend_kernel(qkv_ptr, th_ptr, tw_ptr, q_out, k_out, heads, length, grid_h, grid_w, width,
                       D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_Z: tl.constexpr, COLS: tl.constexpr, BLOCK_H: tl.constexpr):
        """One program per (window, grid row, COLS columns), all heads (rows (column, head)): all but
        q . Rw^T, then that, in a loop over the columns."""
        b, row, first = tl.program_id(0), tl.program_id(1), tl.program_id(2) * COLS
        i = tl.arange(0, COLS * BLOCK_H)
        col, n = first + i // BLOCK_H, i % BLOCK_H
        _row_part(qkv_ptr, th_ptr, q_out, k_out, b, n, row * grid_w + col, (col < grid_w) & (n < heads), row,
                  col, heads, length, grid_h, grid_w, width, D, BLOCK_R, BLOCK_D, BLOCK_K, BLOCK_Z)
        n = tl.arange(0, BLOCK_H)
        for column in range(first, tl.minimum(first + COLS, grid_w)):
            _column_part(qkv_ptr, tw_ptr, q_out, b, n, row * grid_w + column, n < heads, column, heads, length,
                         grid_h, grid_w, width, D, BLOCK_C, BLOCK_D)


def _block(size: int) -> int:
    return max(16, triton.next_power_of_2(size))  # tl.dot wants every side >= 16


def _columns_per_program(size: int, block_h: int) -> int:
    """Grid columns a program of all heads takes: 64 (token, head) rows (128 and 256 ran slower)."""
    return min(triton.next_power_of_2(size), max(1, 64 // block_h))


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
    block_h = _block(heads)
    cols = _columns_per_program(w, block_h)
    _extend_kernel[(batch, h, triton.cdiv(w, cols))](
        qkv, table_h, table_w, q_ext, k_ext, heads, length, h, w, width, D=d, BLOCK_R=_block(h), BLOCK_C=_block(w),
        BLOCK_D=_block(d), BLOCK_K=triton.next_power_of_2(width),
        BLOCK_Z=max(1, triton.next_power_of_2(max(1, width - d - h - w))), COLS=cols, BLOCK_H=block_h)
    return q_ext.transpose(1, 2), k_ext.transpose(1, 2)
