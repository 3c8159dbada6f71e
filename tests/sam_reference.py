"""segment_anything's own image encoder over the parameters of this project's: the reference the SAM
encoder tests and benchmarks/sam_encoder.py compare with."""
from __future__ import annotations

import copy

import torch.nn as nn
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Attention as SamAttention

from model.sam import SdpaSamAttention


def library_encoder(encoder: ImageEncoderViT) -> ImageEncoderViT:
    """A copy of `encoder` made of segment_anything's own Block and Attention modules, sharing
    `encoder`'s parameters: the reference the tests and benchmarks compare with."""
    from segment_anything.modeling.image_encoder import Block

    reference = copy.copy(encoder)
    reference._modules = dict(encoder._modules)  # its own module table: replacing blocks leaves encoder's
    reference.blocks = nn.ModuleList()
    for block in encoder.blocks:
        attn = block.attn
        if isinstance(attn, SdpaSamAttention):
            lib = SamAttention(attn.qkv.in_features, attn.num_heads, use_rel_pos=attn.use_rel_pos, input_size=(1, 1))
            lib.qkv, lib.proj = attn.qkv, attn.proj
            if attn.use_rel_pos:
                lib.rel_pos_h, lib.rel_pos_w = attn.rel_pos_h, attn.rel_pos_w
            attn = lib
        plain = Block.__new__(Block)
        nn.Module.__init__(plain)
        plain.norm1, plain.attn, plain.norm2, plain.mlp = block.norm1, attn, block.norm2, block.mlp
        plain.window_size = block.window_size
        reference.blocks.append(plain)
    return reference
