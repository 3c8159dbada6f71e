"""LoRA and the trainable/frozen split, as the original trains SESAME.

LoRA (r 8, alpha 16, dropout 0.05) on LLaMA's q_proj/v_proj only; trained in full: lm_head,
embed_tokens, the SAM mask decoder and text_hidden_fcs; frozen: CLIP, the projector, SAM's image
and prompt encoders and every other LLaMA weight.

Training from scratch (`train_all`, train_sesame.py's `--train_all`) has nothing to adapt: no
LoRA, and every parameter is trained (the LLM in full, CLIP, the projector, all of SAM).
"""
from __future__ import annotations

from typing import Optional

from .sesame import SesameModel

FULLY_TRAINABLE = ("lm_head", "embed_tokens", "text_hidden_fcs")


def apply_lora(model: SesameModel) -> None:
    """Wrap the LLM with peft LoRA adapters. Only the LLM is wrapped, so CLIP, SAM and the
    projector can never be targeted."""
    from peft import LoraConfig, get_peft_model

    cfg = model.config.lora
    targets = "|".join(cfg.target_modules)
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                      target_modules=rf".*\.layers\.\d+\.self_attn\.({targets})")
    model.llm = get_peft_model(model.llm, lora)


def is_trainable(name: str, train_mask_decoder: bool = True) -> bool:
    if "lora_" in name or any(part in name for part in FULLY_TRAINABLE):
        return True
    return train_mask_decoder and "visual_model.mask_decoder" in name


def set_trainable(model: SesameModel, train_all: bool = False, freeze_vision_tower: bool = False) -> list[str]:
    """Freeze everything, then unfreeze the trainable parts (every part with `train_all`, CLIP
    excepted with `freeze_vision_tower`); returns the trainable names."""
    names = []
    for name, param in model.named_parameters():
        param.requires_grad = train_all or is_trainable(name, model.config.train_mask_decoder)
        if freeze_vision_tower and name.startswith("vision_tower."):
            param.requires_grad = False
        if param.requires_grad:
            names.append(name)
    return names


def has_lora(state_names) -> bool:
    """Whether a model (its parameter or state-dict names) carries LoRA adapters."""
    return any("lora_" in name for name in state_names)


def merge_lora(model: SesameModel) -> None:
    """Fold the adapters into q_proj/v_proj and drop peft, leaving a plain LlamaForCausalLM."""
    if hasattr(model.llm, "merge_and_unload"):
        model.llm = model.llm.merge_and_unload()


def enable_gradient_checkpointing(model: SesameModel, layers: Optional[int] = None) -> None:
    """Recompute the LLM's decoder-layer activations in the backward pass instead of keeping them.
    `layers`: only the first `layers` decoder layers recompute; the others keep their activations, which
    costs memory and saves their second forward (None: every layer, as the original trains)."""
    # transformers renamed it after 5.17 (the oldest release requirements.txt allows) and deprecated the old name
    llm = model.language_model
    if hasattr(llm, "activation_checkpointing_enable"):
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if layers is not None:
        decoder_layers = llm.model.layers
        if not 0 <= layers <= len(decoder_layers):
            raise ValueError(f"checkpointed layers: {layers} is not between 0 and the LLM's {len(decoder_layers)}")
        for layer in decoder_layers[layers:]:
            layer.gradient_checkpointing = False  # transformers' GradientCheckpointingLayer reads it per call
