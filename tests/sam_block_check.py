"""The comparison behind tests/test_sam_block_kernels.py (CPU, Triton's interpreter) and
tests/test_sam_block_kernels_cuda.py: model/sam_block_kernels.py against the PyTorch calls of
WindowedBlock it replaces."""
from unittest import mock

import torch
import torch.nn as nn

from model import sam_block_kernels
from model.sam import add_unpartitioned, partition_windows


def layer_norm(c: int, dtype, device, seed: int = 0) -> nn.LayerNorm:
    """SAM's LayerNorm (eps 1e-6) with weights and biases away from 1 and 0."""
    torch.manual_seed(seed)
    norm = nn.LayerNorm(c, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_(0, 0.3)
    return norm.to(device, dtype)


def residual(shape, dtype, device) -> torch.Tensor:
    """A residual-stream-like grid, with a tiny row (where eps matters) and one far from zero mean."""
    x = torch.randn(shape, device=device).mul_(3)
    x.view(-1, shape[-1])[0] *= 1e-3
    x.view(-1, shape[-1])[1] += 40
    return x.to(dtype)


def ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| in units in the last place of want, counted as at 1/16 where want is nearer zero:
    the LayerNorm's float32 rounding (about 1e-6 of a row's scale, more in a row far from zero mean)
    shows there as many tiny ulps, in PyTorch's results as in the kernels'."""
    scale = want.float().abs().clamp_min(1 / 16)
    ulp = torch.finfo(want.dtype).eps * torch.exp2(torch.floor(torch.log2(scale)))
    return (got.float() - want.float()).abs() / ulp


def check_norm_to_windows(batch, h, w, c, window, dtype, device) -> tuple[int, float]:
    """norm_to_windows against partition_windows(norm(x)): the same windows, zero padding exactly.
    Returns the largest ulp difference and the fraction of equal elements."""
    norm = layer_norm(c, dtype, device)
    x = residual((batch, h, w, c), dtype, device)
    with torch.no_grad():
        want = partition_windows(norm(x), window)
        got = sam_block_kernels.norm_to_windows(x, norm, window)
    assert got.shape == want.shape and got.dtype == dtype, (got.shape, want.shape)
    diff = ulps(got, want)
    return float(diff.max()), float((diff == 0).float().mean())


def check_add_and_norm(batch, h, w, c, window, dtype, device) -> tuple[int, float]:
    """add_windows_and_norm (window > 0; random values in the windows' padding, which must not count)
    or add_and_norm (window 0) against the sum of PyTorch's calls, bit for bit, and its LayerNorm.
    Returns the largest ulp difference of the LayerNorm and the fraction of equal elements."""
    norm = layer_norm(c, dtype, device, seed=1)
    shortcut = residual((batch, h, w, c), dtype, device)
    if window:
        nh, nw = -(-h // window), -(-w // window)
        delta = torch.randn(batch * nh * nw, window, window, c, device=device, dtype=dtype)
    else:
        delta = torch.randn(batch, h, w, c, device=device, dtype=dtype)
    delta.view(-1, c)[0] *= 1e-3  # grid position (0, 0, 0) in either layout: its sum stays tiny
    with torch.no_grad():
        want = add_unpartitioned(shortcut, delta, window) if window else shortcut + delta
        if window:
            got, normed = sam_block_kernels.add_windows_and_norm(shortcut, delta, window, norm)
        else:
            got, normed = sam_block_kernels.add_and_norm(shortcut, delta, norm)
        want_normed = norm(want)
    where = (batch, h, w, c, window, dtype)
    assert torch.equal(got, want), where
    assert normed.shape == want_normed.shape and normed.dtype == dtype, where
    diff = ulps(normed, want_normed)
    return float(diff.max()), float((diff == 0).float().mean())


def with_and_without_kernels(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """module(x) with the block kernels switched on (on the CPU too: the interpreter) and off."""
    with torch.inference_mode():
        with mock.patch.object(sam_block_kernels, "available", lambda x, block: True):
            fused = module(x)
        with mock.patch.object(sam_block_kernels, "available", lambda x, block: False):
            plain = module(x)
    return fused, plain
