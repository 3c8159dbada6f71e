"""SAM from the `segment_anything` package, and how SESAME prompts it.

The [SEG] embedding (256-d after text_hidden_fcs) is one extra sparse prompt token appended after
whatever point tokens there are (none for SESAME; READ's SasP points otherwise). The dense prompt
is SAM's `no_mask_embed`; one mask per prompt (`multimask_output=False`).
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from .config import SamConfig


def build_sam(cfg: SamConfig) -> Sam:
    """Same wiring as `segment_anything.build_sam._build_sam`, for any geometry (ViT-H .. tiny)."""
    emb = cfg.embedding_size
    return Sam(
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


def decode_masks(
    sam: Sam,
    image_embedding: torch.Tensor,
    seg_embeddings: torch.Tensor,
    resized_size: tuple[int, int],
    original_size: tuple[int, int],
    points: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Mask logits at the original image size for n prompts on one image.

    image_embedding: (1, C, h, w) SAM image embedding.
    seg_embeddings:  (n, C) projected [SEG] states.
    points:          optional ((n, P, 2) xy in SAM's input frame, (n, P) labels) for SasP.
    Returns (n, H, W) logits; threshold at 0 for the mask.
    """
    n = seg_embeddings.shape[0]
    dtype = seg_embeddings.dtype
    sparse, dense = sam.prompt_encoder(points=points, boxes=None, masks=None)
    # segment_anything computes positional encodings in float32; bring them to the working dtype.
    sparse = sparse.to(dtype).expand(n, -1, -1)
    sparse = torch.cat([sparse, seg_embeddings.unsqueeze(1)], dim=1)
    dense = dense.to(dtype).expand(n, -1, -1, -1)
    low_res, _ = sam.mask_decoder(
        image_embeddings=image_embedding.to(dtype),
        image_pe=sam.prompt_encoder.get_dense_pe().to(dtype),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    masks = sam.postprocess_masks(low_res.float(), input_size=tuple(resized_size), original_size=tuple(original_size))
    return masks[:, 0]
