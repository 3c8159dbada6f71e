"""WindowedBlock's LayerNorms fused into its window copies and residual adds (Triton GPU kernels).

A windowed SAM block in eager PyTorch reads and writes the (B, H, W, C) token grid in several passes:
LayerNorm, a zero fill and strided copies into the window layout (`partition_windows`), strided adds
back out of it (`add_unpartitioned`), LayerNorm again; a global block's residual add and LayerNorm are
two passes too. On ViT-H that is about a fifth of the encoder's GPU time on an H100, all of it memory
traffic. Here each kernel reads its inputs once and writes its outputs once:

- norm_to_windows:      partition_windows(norm(x), window), padding zeros written in the same pass
- add_windows_and_norm: x = add_unpartitioned(shortcut, windows, window) and norm(x)
- add_and_norm:         x = x + delta and norm(x)

One program holds a few tokens' whole channel rows in registers. Rounding is PyTorch's: the sum is
computed in float32 and rounded to the tensor dtype (bit-equal), the LayerNorm's statistics are float32
over that rounded sum, its output rounded once; it sums in another order than PyTorch's, so it may be
one unit in the last place off, rarely (tests/test_sam_block_kernels_cuda.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

TILE = 4096  # channel values per program: 2 rows of ViT-H's 1280 (padded to 2048), more of narrow ones


def available(x: torch.Tensor, block: nn.Module) -> bool:
    """For contiguous half-precision CUDA tensors outside autograd (SAM's image encoder is frozen in
    SESAME): neither x nor any parameter of `block`, whose outputs the kernels take, records a graph."""
    graph = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in block.parameters()))
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and not graph
            and x.is_contiguous())


if triton is not None:
    @triton.jit
    def _grid_position(token, h, w):
        """(b, y, x) of `token`, a flat index into a (B, h, w) grid."""
        return token // (h * w), token // w % h, token % w

    @triton.jit
    def _window_row(b, y, x, nh, nw, window):
        """The row of grid position (b, y, x) in the window layout (B, nh, nw, window, window, C)."""
        return ((b * nh + y // window) * nw + x // window) * window * window + y % window * window + x % window

    @triton.jit
    def _layer_norm(x, w_ptr, b_ptr, eps, C: tl.constexpr, BLOCK_C: tl.constexpr):
        """LayerNorm of the rows x (ROWS, BLOCK_C) float32, zero past C, in float32 (not yet rounded):
        weight * (rstd * (x - mean)) + bias, PyTorch's order."""
        c = tl.arange(0, BLOCK_C)
        keep = c < C
        mean = tl.sum(x, axis=1) / C
        centred = tl.where(keep[None, :], x - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(centred * centred, axis=1) / C + eps)
        weight = tl.load(w_ptr + c, mask=keep, other=0.0).to(tl.float32)
        bias = tl.load(b_ptr + c, mask=keep, other=0.0).to(tl.float32)
        return weight[None, :] * (rstd[:, None] * centred) + bias[None, :]

    @triton.jit
    def _norm_to_windows_kernel(x_ptr, w_ptr, b_ptr, out_ptr, positions, h, w, nh, nw, window, eps,
                                C: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
        """One program per ROWS positions of the padded grid (B, nh * window, nw * window): the
        LayerNorm of the token there (zero in the padding), stored at its row of the window layout."""
        p = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        keep = p < positions
        b, y, x = _grid_position(p, nh * window, nw * window)
        inside = keep & (y < h) & (x < w)
        c = tl.arange(0, BLOCK_C)
        channels = (c < C)[None, :]
        src = ((b * h + y) * w + x).to(tl.int64) * C
        row = tl.load(x_ptr + src[:, None] + c[None, :], mask=inside[:, None] & channels, other=0.0)
        normed = tl.where(inside[:, None], _layer_norm(row.to(tl.float32), w_ptr, b_ptr, eps, C, BLOCK_C), 0.0)
        dst = _window_row(b, y, x, nh, nw, window).to(tl.int64) * C
        tl.store(out_ptr + dst[:, None] + c[None, :], normed.to(row.dtype), mask=keep[:, None] & channels)

    @triton.jit
    def _add_windows_and_norm_kernel(shortcut_ptr, windows_ptr, w_ptr, b_ptr, sum_ptr, out_ptr, tokens, h, w, nh,
                                     nw, window, eps, C: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
        """One program per ROWS tokens of the grid (B, h, w): the shortcut plus the token's row of the
        window layout, rounded to the dtype, and its LayerNorm."""
        t = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        keep = t < tokens
        b, y, x = _grid_position(t, h, w)
        c = tl.arange(0, BLOCK_C)
        mask = keep[:, None] & (c < C)[None, :]
        here = t.to(tl.int64)[:, None] * C + c[None, :]
        shortcut = tl.load(shortcut_ptr + here, mask=mask, other=0.0)
        there = _window_row(b, y, x, nh, nw, window).to(tl.int64)[:, None] * C + c[None, :]
        delta = tl.load(windows_ptr + there, mask=mask, other=0.0)
        # as PyTorch adds half-precision tensors: in float32, rounded to the dtype
        total = (shortcut.to(tl.float32) + delta.to(tl.float32)).to(shortcut.dtype)
        tl.store(sum_ptr + here, total, mask=mask)
        normed = _layer_norm(total.to(tl.float32), w_ptr, b_ptr, eps, C, BLOCK_C)
        tl.store(out_ptr + here, normed.to(total.dtype), mask=mask)


def _tiling(c: int) -> dict:
    block_c = triton.next_power_of_2(c)
    return dict(C=c, BLOCK_C=block_c, ROWS=max(1, TILE // block_c))


def norm_to_windows(x: torch.Tensor, norm: nn.LayerNorm, window: int) -> torch.Tensor:
    """x (B, H, W, C) -> partition_windows(norm(x), window): (B * nH * nW, window, window, C), zero
    where the windows pad the grid."""
    x, (b, h, w, c) = x.contiguous(), x.shape
    nh, nw = -(-h // window), -(-w // window)
    out = x.new_empty((b * nh * nw, window, window, c))
    positions, tiling = out.numel() // c, _tiling(c)
    _norm_to_windows_kernel[(triton.cdiv(positions, tiling["ROWS"]),)](
        x, norm.weight, norm.bias, out, positions, h, w, nh, nw, window, norm.eps, **tiling)
    return out


def add_windows_and_norm(shortcut: torch.Tensor, windows: torch.Tensor, window: int,
                         norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """shortcut (B, H, W, C), windows (B * nH * nW, window, window, C) -> x =
    add_unpartitioned(shortcut, windows, window) and norm(x), both (B, H, W, C) contiguous."""
    shortcut, (h, w, c) = shortcut.contiguous(), shortcut.shape[1:]
    total, normed = torch.empty_like(shortcut), torch.empty_like(shortcut)
    tokens, tiling = shortcut.numel() // c, _tiling(c)
    _add_windows_and_norm_kernel[(triton.cdiv(tokens, tiling["ROWS"]),)](
        shortcut, windows.contiguous(), norm.weight, norm.bias, total, normed, tokens, h, w, -(-h // window),
        -(-w // window), window, norm.eps, **tiling)
    return total, normed


def add_and_norm(x: torch.Tensor, delta: torch.Tensor, norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """x, delta (B, H, W, C) -> x + delta and norm(x + delta)."""
    return add_windows_and_norm(x, delta, 1, norm)  # windows of one token: the grid's own layout
