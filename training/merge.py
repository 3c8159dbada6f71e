"""DeepSpeed training checkpoint -> merged model in the released layout.

1. Consolidate the ZeRO shards into one fp32 state dict of the training model (LoRA-wrapped LLM,
   CLIP, SAM, text_hidden_fcs), with DeepSpeed's own `zero_to_fp32`. Stage-1 checkpoints keep the
   frozen weights only in the module file, so those are filled in from there. Every file is read
   weights-only (training/safe_load.py): a tampered checkpoint is refused, never run.
2. Rebuild the same network on the meta device from the `sesame_config.json` the run stored next to
   its checkpoints (no base model download, no full-size random init), wrap it with the same LoRA,
   and assign the state dict strictly: every key must match.
3. Fold LoRA into q_proj/v_proj (in fp32), cast, and write the released layout with
   `model.checkpoint.save_released`. CLIP is named in config.json, not stored, as in the releases,
   unless the run trained it (a run without LoRA, `--train_all`, trained every part) or it is a local
   directory: then the tower used is written to `OUT/vision_tower/` (a CLIPModel directory) and
   config.json names it relatively ("vision_tower"), so the merged model is self-contained.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Optional

import torch

from model.config import SesameConfig
from model.lora import apply_lora, has_lora, merge_lora
from model.sesame import SesameModel

from .checkpoints import CONFIG_FILE, TOKENIZER_DIR, read_latest_tag
from .safe_load import load_checkpoint_file, refuse_unsafe_files, weights_only_loading

VISION_TOWER_DIR = "vision_tower"  # beside the merged weights; model.builder looks a relative name up there first


def training_state_dict(ckpt_dir: str, tag: Optional[str] = None) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole training model from a DeepSpeed checkpoint directory."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = tag or read_latest_tag(ckpt_dir)
    if tag is None or not os.path.isdir(os.path.join(ckpt_dir, tag)):
        raise FileNotFoundError(f"no DeepSpeed checkpoint in {ckpt_dir}: expected a 'latest' file naming a "
                                f"global_stepN/ folder (got tag {tag!r})")
    tag_dir = os.path.join(ckpt_dir, tag)
    model_files = sorted(glob.glob(os.path.join(tag_dir, "*mp_rank_00_model_states.pt")))
    if not model_files:
        raise FileNotFoundError(f"{tag_dir} holds no mp_rank_00_model_states.pt")
    refuse_unsafe_files(tag_dir)
    has_zero_shards = bool(glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*optim_states.pt")))
    state = {}
    if has_zero_shards:
        with weights_only_loading(tag_dir):
            state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    module = load_checkpoint_file(model_files[0])["module"]
    for name, tensor in module.items():
        if name not in state:  # frozen weights of ZeRO-0/1 checkpoints, or everything without ZeRO
            state[name] = tensor.float() if tensor.is_floating_point() else tensor
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def read_model_recipe(ckpt_dir: str):
    """(SesameConfig, tokenizer) stored by the training run."""
    from model.tokenizer import load_tokenizer

    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    for sub in ("ckpt_model", "ckpt_model_best"):
        if os.path.isfile(os.path.join(ckpt_dir, sub, CONFIG_FILE)):
            raise FileNotFoundError(f"{ckpt_dir} is a run directory: pass {os.path.join(ckpt_dir, sub)} "
                                    f"(latest) or {os.path.join(ckpt_dir, 'ckpt_model_best')} (best)")
    path = os.path.join(ckpt_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: this checkpoint was not written by train_sesame.py, so the "
                                "network it holds cannot be rebuilt")
    with open(path, encoding="utf-8") as f:
        recipe = json.load(f)
    cfg = SesameConfig.from_dict(recipe["sesame_config"])
    if "seg_token_id" in recipe:  # runs that kept the id beside the config
        cfg.seg_token_id = int(recipe["seg_token_id"])
    return cfg, load_tokenizer(os.path.join(ckpt_dir, TOKENIZER_DIR))


def rebuild_training_model(cfg: SesameConfig, state: dict[str, torch.Tensor]) -> SesameModel:
    """The training model, LoRA-wrapped when `state` holds adapters, with `state` assigned (strict:
    every key must match)."""
    from model.checkpoint import build_on_meta

    lora = has_lora(state)

    def build() -> SesameModel:
        m = SesameModel(cfg)
        if lora:
            apply_lora(m)
        return m
    model = build_on_meta(build)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"the checkpoint does not match the network in {CONFIG_FILE}: "
                         f"{len(missing)} missing (e.g. {missing[:4]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:4]})")
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"never loaded: {left[:6]}")
    return model.eval()


def merge_checkpoint(ckpt_dir: str, out_dir: str, *, tag: Optional[str] = None, dtype: torch.dtype = torch.bfloat16,
                     safe_serialization: bool = False, vision_tower: Optional[str] = None) -> str:
    """Write the merged, released-layout model of `ckpt_dir` to `out_dir`; returns `out_dir`."""
    from model.checkpoint import cast_parameters, save_released

    cfg, tokenizer = read_model_recipe(ckpt_dir)
    state = training_state_dict(ckpt_dir, tag)
    clip_trained = not has_lora(state)
    model = rebuild_training_model(cfg, state)
    merge_lora(model)  # in fp32
    cast_parameters(model, dtype)
    if vision_tower is None and (clip_trained or os.path.isdir(cfg.vision.name_or_path)):
        vision_tower = write_vision_tower(model, out_dir, dtype)
    save_released(model, tokenizer, out_dir, safe_serialization=safe_serialization, dtype=dtype,
                  vision_tower=vision_tower)
    return out_dir


def write_vision_tower(model: SesameModel, out_dir: str, dtype: torch.dtype) -> str:
    """The model's CLIP tower as `out_dir/vision_tower` (a CLIPModel directory, the preprocessor
    config of the tower it was trained from when that is a directory); returns the relative name."""
    from model.tiny import write_clip_checkpoint

    source = model.config.vision.name_or_path
    write_clip_checkpoint(model.vision_tower, os.path.join(out_dir, VISION_TOWER_DIR), dtype=dtype,
                          processor_from=source if os.path.isdir(source) else None)
    return VISION_TOWER_DIR
