"""SAM from the `segment_anything` package, and how SESAME prompts it.

The [SEG] embedding (256-d after text_hidden_fcs) is one extra sparse prompt token appended after
whatever point tokens there are (none for SESAME; READ's SasP points otherwise). The dense prompt
is SAM's `no_mask_embed`; one mask per prompt (`multimask_output=False`).
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.image_encoder import Attention as SamAttention
from segment_anything.modeling.image_encoder import get_rel_pos, window_unpartition

from . import sam_block_kernels, sam_rel_pos_kernel
from .config import SamConfig


class SdpaSamAttention(nn.Module):
    """segment_anything's image-encoder attention computed with `F.scaled_dot_product_attention`.

    The decomposed relative positions enter as extra query/key channels instead of an (HW x HW)
    bias: score = scale*q.k + q.Rh[hq,hk] + q.Rw[wq,wk]
                = scale * [q, q.Rh[hq]/scale, q.Rw[wq]/scale] . [k, e(hk), e(wk)]
    with e one-hot. No bias is materialised (it was 0.5 GB per image and global layer for ViT-H), SDPA
    can run its fused kernels, and the values keep their own width (SDPA allows a value width other
    than the query/key width), so neither they nor the output are copied. Same parameters (the same
    objects), same state-dict keys, same outputs to float rounding.
    """

    def __init__(self, attn: SamAttention):
        super().__init__()
        self.num_heads, self.scale, self.use_rel_pos = attn.num_heads, attn.scale, attn.use_rel_pos
        self.qkv, self.proj = attn.qkv, attn.proj
        if self.use_rel_pos:
            self.rel_pos_h, self.rel_pos_w = attn.rel_pos_h, attn.rel_pos_w
        # constant index / one-hot tensors per geometry and device, made once (not parameters)
        self._constants: dict[tuple, torch.Tensor] = {}

    def _constant(self, key: tuple, make) -> torch.Tensor:
        value = self._constants.get(key)
        if value is None:
            value = self._constants[key] = make()
        return value

    def _rel_table(self, size: int, rel_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """get_rel_pos(size, size, rel_pos) without its host-side index (a GPU sync per call)."""
        if rel_pos.shape[0] != 2 * size - 1:
            return get_rel_pos(size, size, rel_pos).to(dtype)  # tables that need resizing: the library's way
        index = self._constant(("rel", size, rel_pos.device), lambda: (
            torch.arange(size, device=rel_pos.device)[:, None] - torch.arange(size, device=rel_pos.device)[None, :]
            + size - 1))
        return rel_pos[index].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(b, h * w, 3, heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (b, heads, hw, d)
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
            return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))
        d = q.shape[-1]
        width = -(-(d + h + w) // 8) * 8  # zero channels up to a multiple of 8: fused kernels take it as is
        unscale = 1.0 / self.scale  # SDPA multiplies every channel's product by the scale
        table_h = self._rel_table(h, self.rel_pos_h, q.dtype) * unscale
        table_w = self._rel_table(w, self.rel_pos_w, q.dtype) * unscale
        if sam_rel_pos_kernel.available(qkv):  # the same channels, written by two GPU kernels
            q_ext, k_ext = sam_rel_pos_kernel.extend_qk(qkv, table_h, table_w, (h, w), width)
        else:
            q_ext, k_ext = self._extend(q, k, table_h, table_w, (h, w), width)
        out = F.scaled_dot_product_attention(q_ext, k_ext, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))

    def _extend(self, q, k, table_h, table_w, grid: tuple[int, int], width: int):
        """(b, heads, hw, width) extended queries and keys, in PyTorch calls."""
        (b, heads, _, d), (h, w) = q.shape, grid
        grid_q, grid_k = q.unflatten(2, (h, w)), k.unflatten(2, (h, w))  # (b, heads, h, w, d)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, table_h)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, table_w)

        def key_channels() -> torch.Tensor:  # (h, w, width - d): e(hk), e(wk), zeros
            rows, cols = torch.arange(h, device=q.device), torch.arange(w, device=q.device)
            e_h = (rows[:, None, None] == rows[None, None, :]).expand(h, w, h)
            e_w = (cols[None, :, None] == cols[None, None, :]).expand(h, w, w)
            pad = torch.zeros((h, w, width - d - h - w), dtype=torch.bool, device=q.device)
            return torch.cat([e_h, e_w, pad], dim=-1).to(q.dtype)

        extra = self._constant(("keys", h, w, width, q.device, q.dtype), key_channels)
        zeros = q.new_zeros(())
        q_ext = torch.cat([grid_q, rel_h, rel_w, zeros.expand(b, heads, h, w, width - d - h - w)], dim=-1)
        k_ext = torch.cat([grid_k, extra.expand(b, heads, h, w, width - d)], dim=-1)
        return q_ext.flatten(2, 3), k_ext.flatten(2, 3)


def _regions(size: int, window: int) -> list[tuple[int, int, int, int]]:
    """Split one axis into (first window, window count, first pixel, pixels per window): the whole
    windows, then the part-filled last one (padding), if any."""
    full = size // window
    out = [(0, full, 0, window)] if full else []
    if size % window:
        out.append((full, 1, full * window, size % window))
    return out


def partition_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """segment_anything's window_partition, (B, H, W, C) -> (B * nH * nW, window, window, C) zero
    padded, written by one strided copy per region (whole windows, bottom and right strips) instead
    of a padded copy and then a permuted one."""
    b, h, w, c = x.shape
    nh, nw = -(-h // window), -(-w // window)
    padded = nh * window != h or nw * window != w
    out = (x.new_zeros if padded else x.new_empty)((b, nh, nw, window, window, c))
    for i, rows, y, sy in _regions(h, window):
        for j, cols, x0, sx in _regions(w, window):
            src = x[:, y:y + rows * sy, x0:x0 + cols * sx].view(b, rows, sy, cols, sx, c).permute(0, 1, 3, 2, 4, 5)
            out[:, i:i + rows, j:j + cols, :sy, :sx].copy_(src)
    return out.view(b * nh * nw, window, window, c)


def add_unpartitioned(shortcut: torch.Tensor, windows: torch.Tensor, window: int) -> torch.Tensor:
    """shortcut + window_unpartition(windows) cropped to shortcut's (B, H, W, C): the sum is written
    straight from the window layout, region by region (no unpartitioned or cropped copies)."""
    b, h, w, c = shortcut.shape
    nh, nw = -(-h // window), -(-w // window)
    if torch.is_grad_enabled() and (shortcut.requires_grad or windows.requires_grad):  # out= has no autograd
        return shortcut + window_unpartition(windows, window, (nh * window, nw * window), (h, w))
    windows = windows.view(b, nh, nw, window, window, c)
    out = torch.empty_like(shortcut)
    for i, rows, y, sy in _regions(h, window):
        for j, cols, x0, sx in _regions(w, window):
            def grid(t: torch.Tensor) -> torch.Tensor:
                return t[:, y:y + rows * sy, x0:x0 + cols * sx].view(b, rows, sy, cols, sx, c)

            part = windows[:, i:i + rows, j:j + cols, :sy, :sx].permute(0, 1, 3, 2, 4, 5)
            torch.add(grid(shortcut), part, out=grid(out))
    return out


class WindowedBlock(nn.Module):
    """segment_anything's image-encoder Block (the same submodules, so the same parameters and
    state-dict keys) with its window partition and reverse partition done by `partition_windows`
    and `add_unpartitioned`: the same numbers, three fewer full-size copies per windowed block. On the
    GPU outside autograd, the LayerNorms are done in the same passes (model/sam_block_kernels.py)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        self.window_size = block.window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = self.window_size
        if sam_block_kernels.available(x, self):
            if window > 0:
                windows = self.attn(sam_block_kernels.norm_to_windows(x, self.norm1, window))
                x, normed = sam_block_kernels.add_windows_and_norm(x, windows, window, self.norm2)
            else:
                x, normed = sam_block_kernels.add_and_norm(x, self.attn(self.norm1(x)), self.norm2)
            return x + self.mlp(normed)
        if window > 0:
            x = add_unpartitioned(x, self.attn(partition_windows(self.norm1(x), window)), window)
        else:
            x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def use_sdpa_attention(encoder: ImageEncoderViT) -> ImageEncoderViT:
    """Swap every block's attention for SdpaSamAttention and its window handling for WindowedBlock's
    (in place; parameters are shared)."""
    for k, block in enumerate(encoder.blocks):
        if isinstance(block.attn, SamAttention):
            block.attn = SdpaSamAttention(block.attn)
        if not isinstance(block, WindowedBlock):
            encoder.blocks[k] = WindowedBlock(block)
    return encoder


def build_sam(cfg: SamConfig) -> Sam:
    """Same wiring as `segment_anything.build_sam._build_sam`, for any geometry (ViT-H .. tiny);
    the image encoder's attention runs through PyTorch SDPA (`SdpaSamAttention`)."""
    emb = cfg.embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg.encoder_depth, embed_dim=cfg.encoder_embed_dim, img_size=cfg.image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=cfg.encoder_num_heads,
            patch_size=cfg.patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=tuple(cfg.encoder_global_attn_indexes), window_size=cfg.window_size,
            out_chans=cfg.prompt_embed_dim),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim, image_embedding_size=(emb, emb),
            input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.prompt_embed_dim,
                                          mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_num_heads),
            transformer_dim=cfg.prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=cfg.iou_head_hidden_dim),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    use_sdpa_attention(sam.image_encoder)
    return sam


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """(b, C, h, w) x in channels-last memory format; a batch dimension broadcast with stride 0 (an
    expanded view) stays broadcast rather than being written out b times."""
    if x.shape[0] > 1 and x.stride(0) == 0:
        return x[:1].contiguous(memory_format=torch.channels_last).expand_as(x)
    return x.contiguous(memory_format=torch.channels_last)


def _decode_first_mask(decoder: MaskDecoder, src: torch.Tensor, pos: torch.Tensor,
                       sparse: torch.Tensor) -> torch.Tensor:
    """The mask-decoder steps for `multimask_output=False` (mask token 0 only, no IoU head), with
    src (n, C, h, w) channels-last as given and pos (1, C, h, w) broadcast over the batch.

    `decoder(...)` is not called: its predict_masks repeats the image embedding and positional
    encoding per prompt (repeat_interleave, NCHW-contiguous copies), so the transformer's image
    tokens (n, h*w, C) are a transposed view and every add and linear on them takes a strided path.
    Here both are channels-last, so those token views are contiguous. Same submodules, so the same
    parameters and state-dict keys."""
    n, c, h, w = src.shape
    # the learned tokens through their Embedding modules' forward, not `.weight`: under DeepSpeed ZeRO-3 a
    # module's parameters are gathered only while its forward runs (the library reads `.weight` inside
    # MaskDecoder.forward, which is not called here); a lookup of every row is the weight itself
    rows = torch.arange(decoder.num_mask_tokens + 1, device=sparse.device)
    learned = torch.cat([decoder.iou_token(rows[:1]), decoder.mask_tokens(rows[:-1])], dim=0)
    tokens = torch.cat([learned.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
    # TwoWayTransformer only adds the positional tokens to the image tokens: a batch of one broadcasts
    hs, image_tokens = decoder.transformer(src, pos, tokens)
    grid = image_tokens.transpose(1, 2).reshape(n, c, h, w)  # a view: channels-last again
    upscaled = decoder.output_upscaling(grid)
    # token 0 is the IoU token, tokens 1.. the masks'. All mask MLPs run (they are tiny) so that, as with
    # the library's slicing, the unused ones get zero gradients rather than none (optimizer steps, weight
    # decay and gradient-set checks see the same parameters); only mask 0, the one multimask_output=False
    # keeps, is multiplied out.
    hyper = torch.stack([mlp(hs[:, 1 + k]) for k, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    masks = hyper[:, :1] @ upscaled.flatten(2)  # (n, 1, 4h * 4w)
    return masks.unflatten(2, upscaled.shape[2:])


def decode_masks(
    sam: Sam,
    image_embeddings: torch.Tensor,
    seg_embeddings: torch.Tensor,
    points: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Low-resolution mask logits for n prompts, each on its own image, in one mask-decoder call.

    image_embeddings: (n, C, h, w), row k the SAM embedding of prompt k's image (an expanded view
                      when all prompts share one image).
    seg_embeddings:   (n, C) projected [SEG] states: the last sparse prompt token of each prompt.
    points:           optional ((n, K, 2) xy in SAM's input frame, (n, K) labels), READ's SasP points,
                      placed before the [SEG] token.
    Returns (n, 1, 4h, 4w) logits in SAM's padded input frame (see `masks_at_original_size`).

    SAM's decoder repeats one image embedding per prompt and adds the dense prompt to it. Each
    prompt's own image embedding therefore goes in as part of its dense prompt (plus SAM's no-mask
    embedding, the true dense prompt) with a zero image embedding: the same sums, so the same logits
    as a call per image, for prompts on any number of images. The zero image embedding is left out
    (0 + x == x) and the decoder's steps run in `_decode_first_mask`, on channels-last tensors.
    """
    n = seg_embeddings.shape[0]
    dtype = seg_embeddings.dtype
    sparse, dense = sam.prompt_encoder(points=points, boxes=None, masks=None)
    # segment_anything computes positional encodings in float32; bring them to the working dtype.
    sparse = torch.cat([sparse.to(dtype).expand(n, -1, -1), seg_embeddings.unsqueeze(1)], dim=1)
    # dense (no-mask embedding, broadcast) goes first: its channels-last strides set the sum's layout,
    # so the sum is written channels-last in one pass whatever image_embeddings' layout
    own = _channels_last(dense.to(dtype)) + image_embeddings.to(dtype)
    own = own.contiguous(memory_format=torch.channels_last)  # a no-op when the sum already is
    pos = _channels_last(sam.prompt_encoder.get_dense_pe().to(dtype))
    return _decode_first_mask(sam.mask_decoder, own, pos, sparse)


def masks_at_original_size(sam: Sam, low_res: torch.Tensor, resized_size: tuple[int, int],
                           original_size: tuple[int, int]) -> torch.Tensor:
    """(k, 1, 4h, 4w) low-resolution logits of one image -> (k, H, W) float32 logits at its original
    size (SAM's postprocessing: upscale to the input frame, crop the padding, resize); threshold at 0."""
    masks = sam.postprocess_masks(low_res.float(), input_size=tuple(resized_size), original_size=tuple(original_size))
    return masks[:, 0]
