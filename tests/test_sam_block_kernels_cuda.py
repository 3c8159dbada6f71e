"""The Triton kernels that fuse WindowedBlock's LayerNorms into its window copies and residual adds
(model/sam_block_kernels.py) against the PyTorch calls they replace, and SAM's blocks and encoder with
them. CPU-only machines (CI) skip this file; tests/test_sam_block_kernels.py runs the kernels in
Triton's interpreter."""
from functools import partial

import pytest
import torch
import torch.nn as nn
from sam_block_check import check_add_and_norm, check_norm_to_windows
from segment_anything.modeling.image_encoder import Block

from model import sam_block_kernels
from model.config import SAM_PRESETS
from model.sam import SdpaSamAttention, WindowedBlock, build_sam

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (batch, h, w, channels, window): ViT-H's grid and width (5 x 5 windows of 14, padded), a tiny
# model's, padded windows on both axes, a window wider than the grid, channels not a power of two
GEOMETRIES = [(2, 64, 64, 1280, 14), (2, 8, 8, 32, 4), (2, 9, 7, 64, 4), (1, 5, 6, 80, 8), (3, 10, 9, 48, 7)]


@pytest.mark.parametrize("batch,h,w,c,window", GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", ["norm_to_windows", "add_windows_and_norm", "add_and_norm"])
def test_kernels_write_what_the_pytorch_calls_write(batch, h, w, c, window, dtype, fused):
    if fused == "norm_to_windows":
        worst, equal = check_norm_to_windows(batch, h, w, c, window, dtype, "cuda")
    else:
        worst, equal = check_add_and_norm(batch, h, w, c, window if fused == "add_windows_and_norm" else 0,
                                          dtype, "cuda")
    print(f"{fused} {(batch, h, w, c, window)} {dtype}: max {worst:.2f} ulp, {equal:.6f} equal")
    # the LayerNorm's sums run in another order than PyTorch's: one ulp, rarely
    assert worst <= 1 and equal >= 0.999, (worst, equal)


def windowed_block(dim: int, heads: int, window: int, grid: tuple[int, int]) -> WindowedBlock:
    """A SAM image-encoder block (window 0: global attention) with random weights, rel-pos tables too."""
    torch.manual_seed(3)
    block = Block(dim, heads, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=window,
                  input_size=grid if window == 0 else (window, window))
    block.attn = SdpaSamAttention(block.attn)
    for p in block.parameters():
        nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        block.norm1.weight.add_(1)
        block.norm2.weight.add_(1)
    return WindowedBlock(block).to("cuda", torch.bfloat16)


def outputs_with_and_without_kernels(module: nn.Module, x: torch.Tensor, monkeypatch):
    with torch.inference_mode():
        fused = module(x)
        monkeypatch.setattr(sam_block_kernels, "available", lambda x, block: False)
        plain = module(x)
    return fused, plain


# (dim, heads, window, grid): ViT-H's windowed and global blocks, small ones with padded windows
@pytest.mark.parametrize("dim,heads,window,grid", [(1280, 16, 14, (64, 64)), (1280, 16, 0, (64, 64)),
                                                   (64, 2, 4, (9, 7)), (48, 2, 0, (5, 6))])
def test_block_with_the_kernels_equals_without(dim, heads, window, grid, monkeypatch):
    block = windowed_block(dim, heads, window, grid)
    x = torch.randn(2, *grid, dim, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        assert sam_block_kernels.available(x, block)  # the real check: the GPU path takes the kernels
    fused, plain = outputs_with_and_without_kernels(block, x, monkeypatch)
    assert fused.shape == plain.shape
    err = (fused.float() - plain.float()).abs().max() / plain.float().abs().max()
    assert err < 0.02, float(err)


def test_encoder_with_the_kernels_equals_without(monkeypatch):
    torch.manual_seed(0)
    encoder = build_sam(SAM_PRESETS["tiny"]).image_encoder  # one windowed and one global block
    for p in encoder.parameters():
        nn.init.normal_(p, std=0.1)
    encoder = encoder.to("cuda", torch.bfloat16)
    x = torch.randn(2, 3, 128, 128, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    fused, plain = outputs_with_and_without_kernels(encoder, x, monkeypatch)
    err = float((fused.float() - plain.float()).norm() / plain.float().norm())
    assert fused.shape == plain.shape and err < 0.01, err


def test_the_kernels_stay_out_of_autograd():
    """SAM's encoder is frozen in SESAME; trained (--train_all), the PyTorch calls keep the graph."""
    block = windowed_block(32, 2, 4, (8, 8))
    x = torch.randn(1, 8, 8, 32, device="cuda", dtype=torch.bfloat16)
    assert not sam_block_kernels.available(x, block)  # its parameters record a graph
    block.requires_grad_(False)
    assert sam_block_kernels.available(x, block)
    assert not sam_block_kernels.available(x.float(), block)
    assert not sam_block_kernels.available(x.cpu(), block)
    assert not sam_block_kernels.available(x.transpose(1, 2), block)
    assert not sam_block_kernels.available(x.clone().requires_grad_(), block)
    with torch.no_grad():
        assert sam_block_kernels.available(x.clone().requires_grad_(), block)
