"""Typed configuration of a SESAME model.

One dataclass tree describes every size: LLaMA-7B/13B with CLIP ViT-L/14 and SAM ViT-H for the
released checkpoints, and tiny random ones for tests. Sizes are presets, never code paths.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

# --precision names, used by every script
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# `architectures[0]` of a released config.json -> whether that model uses READ's SasP by default
RELEASED_ARCHITECTURES: dict[str, bool] = {"SESAMEForCausalLM": False, "READForCausalLM": True,
                                           "LISAForCausalLM": False}
# LLaVA bases a training run can start from
LLAVA_BASE_ARCHITECTURES: tuple[str, ...] = ("LlavaLlamaForCausalLM",)


@dataclass
class LLMConfig:
    """LLaMA decoder geometry (transformers.LlamaConfig fields)."""

    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    vocab_size: int = 32003  # 32000 LLaMA pieces + [SEG], <im_start>, <im_end>
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2


LLM_PRESETS: dict[str, LLMConfig] = {
    "llama-7b": LLMConfig(),
    "llama-13b": LLMConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                           num_attention_heads=40, num_key_value_heads=40),
    "tiny": LLMConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=1024),
    # the shapes world's model (dataset/shapes): 1000-piece tokenizer + the 3 SESAME tokens
    "shapes": LLMConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=4, max_position_embeddings=512, vocab_size=1003),
}


@dataclass
class VisionTowerConfig:
    """CLIP vision tower (transformers.CLIPVisionConfig fields) and how LLaVA reads it.

    `name_or_path` is what the released config.json calls `vision_tower` (a hub id or a local
    directory); the geometry fields are used when the tower is built without weights.
    """

    name_or_path: str = "openai/clip-vit-large-patch14-336"
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    projection_dim: int = 768
    select_layer: int = -2  # LLaVA-1.5: second-to-last layer, CLS token dropped

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


VISION_PRESETS: dict[str, VisionTowerConfig] = {
    "clip-l-336": VisionTowerConfig(),
    "clip-l-224": VisionTowerConfig(name_or_path="openai/clip-vit-large-patch14", image_size=224),
    "tiny": VisionTowerConfig(name_or_path="tiny-clip", image_size=112, patch_size=14, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              projection_dim=32),
    # 140 px, patch 14: 10 x 10 = 100 image tokens
    "shapes": VisionTowerConfig(name_or_path="vision_tower", image_size=140, patch_size=14, hidden_size=192,
                                intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                                projection_dim=64),
}


@dataclass
class SamConfig:
    """SAM geometry, as `segment_anything.build_sam` wires it (ViT image encoder, prompt
    encoder, two-way-transformer mask decoder)."""

    encoder_embed_dim: int = 1280
    encoder_depth: int = 32
    encoder_num_heads: int = 16
    encoder_global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.patch_size


SAM_PRESETS: dict[str, SamConfig] = {
    "vit_h": SamConfig(),
    "vit_l": SamConfig(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                       encoder_global_attn_indexes=(5, 11, 17, 23)),
    "vit_b": SamConfig(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                       encoder_global_attn_indexes=(2, 5, 8, 11)),
    "tiny": SamConfig(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,),
                      image_size=128, patch_size=16, window_size=4, prompt_embed_dim=32, decoder_mlp_dim=64,
                      decoder_num_heads=2, iou_head_hidden_dim=32),
    # 256 px, patch 8: a 32 x 32 embedding grid, so 128 x 128 low-resolution mask logits
    "shapes": SamConfig(encoder_embed_dim=128, encoder_depth=4, encoder_num_heads=4, encoder_global_attn_indexes=(1, 3),
                        image_size=256, patch_size=8, window_size=8, prompt_embed_dim=128, decoder_mlp_dim=512,
                        decoder_num_heads=4, iou_head_hidden_dim=128),
}


@dataclass
class SasPConfig:
    """READ's Similarity-as-Points: point prompts picked from the [SEG]/image-token similarity.

    geometry: "read" computes as READ's code does (its aspect padding, which can crop one row or
    column; float32 cell centres; scores and the full-resolution min-max in the hidden states'
    dtype), which is what the released READ weights were trained with. "exact" undoes CLIP's crop
    exactly and scores in float32. A saved SasP dict without the key (written before the switch
    existed) loads as "read": the SasP checkpoints in circulation are READ's.
    """

    num_points: int = 30
    t_pos: float = 0.8
    t_neg: float = 0.2
    down_sample: int = 2
    geometry: str = "read"


@dataclass
class LossConfig:
    ce_loss_weight: float = 1.0
    bce_loss_weight: float = 2.0
    dice_loss_weight: float = 0.5


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass
class SesameConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sasp: Optional[SasPConfig] = None  # None: plain SESAME; set: READ
    out_dim: int = 256  # text_hidden_fcs output = SAM prompt width
    train_mask_decoder: bool = True
    use_mm_start_end: bool = True
    mm_projector_type: str = "mlp2x_gelu"  # LLaVA-1.5; "linear" for LLaVA-v1 bases (LISA)
    attn_implementation: str = "sdpa"
    # [SEG]'s id, set from the tokenizer when a model is built or loaded (32000 in every release);
    # pad / bos / eos ids are in `llm`
    seg_token_id: int = 32000
    architecture: str = "SESAMEForCausalLM"

    def __post_init__(self) -> None:
        if self.out_dim != self.sam.prompt_embed_dim:
            raise ValueError(f"out_dim ({self.out_dim}) must equal the SAM prompt width "
                             f"sam.prompt_embed_dim ({self.sam.prompt_embed_dim})")

    @classmethod
    def preset(cls, llm: str = "llama-7b", vision: str = "clip-l-336", sam: str = "vit_h",
               **overrides) -> "SesameConfig":
        for name, table in (("llm", LLM_PRESETS), ("vision", VISION_PRESETS), ("sam", SAM_PRESETS)):
            key = locals()[name]
            if key not in table:
                raise ValueError(f"unknown {name} preset {key!r}; known: {sorted(table)}")
        sam_cfg = dataclasses.replace(SAM_PRESETS[sam])
        overrides.setdefault("out_dim", sam_cfg.prompt_embed_dim)
        return cls(llm=dataclasses.replace(LLM_PRESETS[llm]), vision=dataclasses.replace(VISION_PRESETS[vision]),
                   sam=sam_cfg, **overrides)

    @classmethod
    def tiny(cls, vocab_size: int, **overrides) -> "SesameConfig":
        cfg = cls.preset("tiny", "tiny", "tiny", **overrides)
        cfg.llm.vocab_size = vocab_size
        return cfg

    def use_token_ids(self, ids) -> None:
        """Take the ids the model generates and stops on from its tokenizer (`model.tokenizer.SpecialTokenIds`):
        the config is the one place the model, the engine and the predictor read them from."""
        self.seg_token_id = ids.seg
        self.llm.pad_token_id, self.llm.bos_token_id, self.llm.eos_token_id = ids.pad, ids.bos, ids.eos

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SesameConfig":
        d = dict(d)
        sam = dict(d.pop("sam"))
        sam["encoder_global_attn_indexes"] = tuple(sam["encoder_global_attn_indexes"])
        lora = dict(d.pop("lora"))
        lora["target_modules"] = tuple(lora["target_modules"])
        sasp = d.pop("sasp", None)
        for retired in ("seg_token", "im_start_token", "im_end_token"):  # token strings of older run configs
            d.pop(retired, None)
        return cls(llm=LLMConfig(**d.pop("llm")), vision=VisionTowerConfig(**d.pop("vision")), sam=SamConfig(**sam),
                   loss=LossConfig(**d.pop("loss")), lora=LoraConfig(**lora),
                   sasp=SasPConfig(**sasp) if sasp else None, **d)
