"""Build a SESAME model from what users have on disk or on the Hub.

- `load_pretrained(path)`: a released SESAME / SESAME- / READ / LISA checkpoint (hub id or local
  directory), as it is, for inference. `"tiny-random"` gives the tiny untrained model.
- `build_for_training(version)`: a training start point, either a LLaVA-1.5 base (original
  haotian layout) plus SAM's official `.pth`, or a released checkpoint to fine-tune (READ from
  SESAME needs no config edit: `sasp=` decides).

config.json is read as plain JSON: it says `model_type: llava`, which transformers' AutoConfig
would take for the different, nested llava-hf schema. What the file does not say comes from the
weights (SAM geometry) and from the CLIP tower named by `vision_tower` (224 vs 336 px).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import checkpoint as ckpt
from .config import (
    LLAVA_BASE_ARCHITECTURES,
    RELEASED_ARCHITECTURES,
    SAM_PRESETS,
    LLMConfig,
    SamConfig,
    SasPConfig,
    SesameConfig,
    VisionTowerConfig,
)
from .sesame import SesameModel
from .tokenizer import add_sesame_tokens, load_tokenizer
from .transforms import ClipTransform, SamTransform

log = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random"
PROJECTOR_TYPES = ("mlp2x_gelu", "linear")
_HUB_PATTERNS = ["*.json", "*.bin", "*.safetensors", "tokenizer.model"]  # what a cached snapshot may hold


@dataclass
class LoadedSesame:
    model: SesameModel
    tokenizer: Any
    clip_transform: ClipTransform
    sam_transform: SamTransform


# --- locating files ------------------------------------------------------------------------------
def resolve_checkpoint_dir(path: str) -> str:
    """A local directory as it is; anything else is a Hugging Face Hub id (local cache first)."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise NotADirectoryError(f"{path} is a file; a checkpoint is a directory (config.json, weights, tokenizer)")
    from huggingface_hub import HfApi, snapshot_download

    try:
        return snapshot_download(path, allow_patterns=_HUB_PATTERNS, local_files_only=True)
    except Exception:  # not cached (or not a valid id): try the Hub
        pass
    try:
        # one weight format only: repos that hold both would otherwise be downloaded twice
        files = [f.rfilename for f in HfApi().model_info(path).siblings or []]
        weights = ["*.safetensors", "*.safetensors.index.json"] if any(f.endswith(".safetensors") for f in files) \
            else ["*.bin", "*.bin.index.json"]
        return snapshot_download(path, allow_patterns=["*.json", "tokenizer.model", *weights])
    except Exception as e:  # offline, unknown repo, bad id: all mean "not available"
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise FileNotFoundError(f"{path!r} is not a local directory, and as a Hugging Face Hub id it could not be "
                                f"found in the local cache or downloaded ({reason})") from e


def read_config(directory: str) -> dict:
    path = os.path.join(directory, ckpt.CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model config: {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ckpt.CheckpointError(f"{path}: not valid JSON ({e})") from e
    if "text_config" in config:
        raise ckpt.CheckpointError(f"{path}: this is a llava-hf (transformers LlavaForConditionalGeneration) config; "
                                   "SESAME needs the original LLaVA layout (flat LLaMA fields, mm_* fields)")
    return config


def architecture_of(config: dict, directory: str) -> str:
    archs = config.get("architectures") or []
    if not archs:
        raise ckpt.CheckpointError(f"{os.path.join(directory, ckpt.CONFIG_FILE)}: no 'architectures' field")
    return archs[0]


def _field(config: dict, name: str, directory: str):
    if name not in config:
        raise ckpt.CheckpointError(f"{os.path.join(directory, ckpt.CONFIG_FILE)}: missing field {name!r}")
    return config[name]


# --- config.json + weights -> SesameConfig -------------------------------------------------------
def llm_config(config: dict, directory: str, vocab_size: Optional[int] = None) -> LLMConfig:
    get = lambda name: _field(config, name, directory)  # noqa: E731
    path = os.path.join(directory, ckpt.CONFIG_FILE)
    if config.get("rope_scaling"):
        raise ckpt.CheckpointError(f"{path}: rope_scaling {config['rope_scaling']} is not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ckpt.CheckpointError(f"{path}: hidden_act {config['hidden_act']!r} is not LLaMA's 'silu'")
    return LLMConfig(
        hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"),
        num_hidden_layers=get("num_hidden_layers"), num_attention_heads=get("num_attention_heads"),
        num_key_value_heads=config.get("num_key_value_heads") or get("num_attention_heads"),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6), max_position_embeddings=get("max_position_embeddings"),
        rope_theta=config.get("rope_theta", 10000.0), vocab_size=vocab_size or get("vocab_size"),
        pad_token_id=config.get("pad_token_id", 0), bos_token_id=config.get("bos_token_id", 1),
        eos_token_id=config.get("eos_token_id", 2))


def sam_config_from_shapes(shapes: dict[str, tuple[int, ...]], prefix: str, source: str) -> SamConfig:
    """SAM geometry read off its weights (the released configs do not name the SAM size).

    image encoder: embed dim and patch size from `patch_embed.proj.weight`, image size from
    `pos_embed`, depth from the blocks, head dim from `rel_pos_h` width, global-attention blocks
    from `rel_pos_h` length (2*grid-1 rows; windowed blocks have 2*window-1). Decoder: depth, MLP
    and IoU-head widths from the weights; its head count is not in the weights and comes from the
    preset with the same prompt width (8 for SAM's 256).
    """
    def shape(name: str) -> tuple[int, ...]:
        key = prefix + name
        if key not in shapes:
            raise ckpt.CheckpointError(f"{source}: no SAM weights found (missing {key})")
        return shapes[key]

    embed_dim, _, patch, _ = shape("image_encoder.patch_embed.proj.weight")
    grid = shape("image_encoder.pos_embed")[1]
    depth = 0
    while prefix + f"image_encoder.blocks.{depth}.attn.rel_pos_h" in shapes:
        depth += 1
    if depth == 0:
        raise ckpt.CheckpointError(f"{source}: SAM image encoder without rel-pos blocks "
                                   f"({prefix}image_encoder.blocks.0.attn.rel_pos_h)")
    rel = [shape(f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    head_dim = rel[0][1]
    global_blocks = tuple(i for i, r in enumerate(rel) if r[0] == 2 * grid - 1)
    windows = {(r[0] + 1) // 2 for r in rel if r[0] != 2 * grid - 1}
    if len(windows) > 1:
        raise ckpt.CheckpointError(f"{source}: SAM blocks disagree on the attention window: {sorted(windows)}")
    prompt_dim = shape("image_encoder.neck.0.weight")[0]
    decoder_depth = 0
    while prefix + f"mask_decoder.transformer.layers.{decoder_depth}.mlp.lin1.weight" in shapes:
        decoder_depth += 1
    same_width = [p for p in SAM_PRESETS.values() if p.prompt_embed_dim == prompt_dim]
    if not same_width:
        raise ckpt.CheckpointError(f"{source}: SAM prompt width {prompt_dim} matches no known SAM "
                                   f"(known widths: {sorted({p.prompt_embed_dim for p in SAM_PRESETS.values()})})")
    return SamConfig(
        encoder_embed_dim=embed_dim, encoder_depth=depth, encoder_num_heads=embed_dim // head_dim,
        encoder_global_attn_indexes=global_blocks, image_size=grid * patch, patch_size=patch,
        window_size=windows.pop() if windows else SamConfig.window_size, prompt_embed_dim=prompt_dim,
        decoder_depth=decoder_depth, decoder_mlp_dim=shape("mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        decoder_num_heads=same_width[0].decoder_num_heads,
        iou_head_hidden_dim=shape("mask_decoder.iou_prediction_head.layers.0.weight")[0])


def projector_type(config: dict, shapes: dict[str, tuple[int, ...]], directory: str) -> str:
    """LLaVA's rule (no `mm_projector_type` means a single Linear), checked against the weights."""
    kind = config.get("mm_projector_type", "linear")
    if kind not in PROJECTOR_TYPES:
        raise ckpt.CheckpointError(f"{directory}: mm_projector_type {kind!r} is not supported "
                                   f"(supported: {', '.join(PROJECTOR_TYPES)})")
    in_files = "linear" if "model.mm_projector.weight" in shapes else "mlp2x_gelu"
    if "model.mm_projector.0.weight" in shapes or "model.mm_projector.weight" in shapes:
        if in_files != kind:
            raise ckpt.CheckpointError(f"{directory}: config.json says mm_projector_type {kind!r} but the weights "
                                       f"hold a {in_files!r} projector")
    return kind


def resolve_vision_tower(name: str, checkpoint_dir: Optional[str]) -> str:
    """A local CLIP directory (absolute, or relative to the checkpoint directory or the working
    directory) when one exists, else `name` as a hub id. An absolute directory that no longer
    exists (a checkpoint moved to another machine) falls back to `vision_tower/` beside the
    checkpoint, with a note."""
    candidates = [name] if os.path.isabs(name) else [os.path.join(checkpoint_dir or "", name), name]
    for candidate in candidates:
        if os.path.isdir(candidate):
            return candidate
    beside = os.path.join(checkpoint_dir or "", "vision_tower")
    if os.path.isabs(name) and checkpoint_dir and os.path.isdir(beside):
        log.warning("CLIP directory %s (named in %s) does not exist; using %s beside the checkpoint", name,
                    os.path.join(checkpoint_dir, ckpt.CONFIG_FILE), beside)
        return beside
    return name


def load_vision_tower(name: str, *, dtype: torch.dtype, device: str | torch.device, attn_implementation: str,
                      named_by: str):
    """CLIPVisionModel from a hub id or directory (a full CLIPModel checkpoint works too)."""
    from transformers import CLIPVisionModel
    from transformers.utils import logging as hf_logging

    # a full CLIPModel reports its text tower as unexpected keys: expected here, so keep quiet
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tower = CLIPVisionModel.from_pretrained(name, dtype=dtype, attn_implementation=attn_implementation)
    except Exception as e:
        how = "as a local directory" if os.path.isdir(name) else "from the local cache or the Hugging Face Hub"
        raise FileNotFoundError(f"CLIP vision tower {name!r} ({named_by}) could not be loaded {how} "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return tower.to(device).eval()


def vision_config(tower, name: str, select_layer: int) -> VisionTowerConfig:
    c = tower.config
    return VisionTowerConfig(name_or_path=name, image_size=c.image_size, patch_size=c.patch_size,
                             hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                             num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                             projection_dim=getattr(c, "projection_dim", c.hidden_size), select_layer=select_layer)


def _check_vision_fields(config: dict, tower_cfg: VisionTowerConfig, directory: str) -> None:
    path = os.path.join(directory, ckpt.CONFIG_FILE)
    feature = config.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise ckpt.CheckpointError(f"{path}: mm_vision_select_feature {feature!r} is not supported (only 'patch')")
    hidden = config.get("mm_hidden_size", tower_cfg.hidden_size)
    if hidden != tower_cfg.hidden_size:
        raise ckpt.CheckpointError(f"{path}: mm_hidden_size {hidden} but the CLIP tower {tower_cfg.name_or_path!r} "
                                   f"has hidden size {tower_cfg.hidden_size} (wrong --vision_tower?)")


# --- assembling --------------------------------------------------------------------------------
def _loaded(model: SesameModel, tokenizer, clip_name: Optional[str]) -> LoadedSesame:
    return LoadedSesame(model=model, tokenizer=tokenizer,
                        clip_transform=ClipTransform(model.config.vision.image_size, clip_name),
                        sam_transform=SamTransform(model.config.sam.image_size))


def _tiny_random(dtype: torch.dtype, device: str, sasp: Optional[SasPConfig]) -> LoadedSesame:
    from .tiny import TINY_TOKENIZER_DIR, tiny_model, tiny_tokenizer

    tokenizer, ids = tiny_tokenizer(TINY_TOKENIZER_DIR)
    model = tiny_model(ids, len(tokenizer), seed=0, sasp=sasp, dtype=dtype, device=device)
    return _loaded(model, tokenizer, None)


def _tokenizer_for(directory: str, use_mm_start_end: bool):
    tokenizer = load_tokenizer(directory)
    return tokenizer, add_sesame_tokens(tokenizer, use_mm_start_end)


def _load_released(directory: str, config: dict, architecture: str, *, vision_tower: Optional[str],
                   dtype: torch.dtype, device: str, sasp: Optional[SasPConfig]) -> LoadedSesame:
    weights = ckpt.find_weight_files(directory)
    shapes = ckpt.read_shapes(weights)
    use_start_end = bool(config.get("mm_use_im_start_end", True))
    tokenizer, ids = _tokenizer_for(directory, use_start_end)
    vocab = _field(config, "vocab_size", directory)
    if len(tokenizer) != vocab:
        raise ckpt.CheckpointError(f"{directory}: the tokenizer has {len(tokenizer)} tokens but config.json says "
                                   f"vocab_size {vocab} (tokenizer files from another checkpoint?)")
    named_by = "--vision_tower" if vision_tower else f"'vision_tower' in {os.path.join(directory, ckpt.CONFIG_FILE)}"
    clip_name = vision_tower or config.get("vision_tower") or _field(config, "mm_vision_tower", directory)
    clip_name = resolve_vision_tower(clip_name, directory)
    tower = load_vision_tower(clip_name, dtype=dtype, device=device, attn_implementation="sdpa", named_by=named_by)
    vision = vision_config(tower, clip_name, config.get("mm_vision_select_layer", -2))
    _check_vision_fields(config, vision, directory)
    sam = sam_config_from_shapes(shapes, "model.visual_model.", directory)
    if sasp is None and RELEASED_ARCHITECTURES[architecture]:
        sasp = SasPConfig()
    cfg = SesameConfig(llm=llm_config(config, directory), vision=vision, sam=sam, sasp=sasp,
                       out_dim=config.get("out_dim", sam.prompt_embed_dim),
                       train_mask_decoder=bool(config.get("train_mask_decoder", True)),
                       use_mm_start_end=use_start_end, mm_projector_type=projector_type(config, shapes, directory),
                       architecture=architecture)
    cfg.use_token_ids(ids)
    model = ckpt.build_on_meta(lambda: SesameModel(cfg, vision_tower=tower))
    plan = ckpt.plan_loading(model, shapes, f"checkpoint {directory}", to_internal=ckpt.released_to_internal,
                             provides=("llm.", "mm_projector.", "visual_model.", "text_hidden_fcs."))
    ckpt.load_planned(model, ckpt.iter_shards(weights, _shard_device(weights, device)), plan, device=device,
                      dtype=dtype)
    ckpt.finish_loading(model, device, f"checkpoint {directory}")
    return _loaded(model, tokenizer, clip_name)


def _shard_device(weights: ckpt.WeightFiles, device: str) -> str:
    # safetensors can read straight onto the GPU; pickled .bin shards are memory-mapped on the CPU
    return str(device) if weights.format == "safetensors" else "cpu"


def _open(path: str):
    directory = resolve_checkpoint_dir(path)
    config = read_config(directory)
    architecture = architecture_of(config, directory)
    known = list(RELEASED_ARCHITECTURES) + list(LLAVA_BASE_ARCHITECTURES)
    if architecture not in known:
        raise ckpt.CheckpointError(f"{os.path.join(directory, ckpt.CONFIG_FILE)}: unknown architecture "
                                   f"{architecture!r}; known: {', '.join(known)}")
    return directory, config, architecture


def load_pretrained(path: str, *, vision_tower: Optional[str] = None, dtype: torch.dtype = torch.bfloat16,
                    device: str = "cuda", sasp: Optional[SasPConfig] = None) -> LoadedSesame:
    """Build the model described by `path`/config.json and load its weights; CLIP from the config's
    `vision_tower` unless `vision_tower` overrides it.

    path: a released checkpoint directory or hub id (SESAMEForCausalLM, READForCausalLM,
        LISAForCausalLM), or "tiny-random".
    sasp: READ's SasP settings; None keeps the architecture's choice (READ on, others off).
    """
    if path == TINY_RANDOM:
        return _tiny_random(dtype, device, sasp)
    directory, config, architecture = _open(path)
    if architecture in LLAVA_BASE_ARCHITECTURES:
        raise ckpt.CheckpointError(f"{directory} is a LLaVA base ({architecture}), not a SESAME checkpoint: "
                                   "it has no SAM or text_hidden_fcs; start training from it with build_for_training")
    loaded = _load_released(directory, config, architecture, vision_tower=vision_tower, dtype=dtype, device=device,
                            sasp=sasp)
    loaded.model.eval()
    return loaded


def build_for_training(version: str, *, vision_pretrained: Optional[str] = None, vision_tower: Optional[str] = None,
                       dtype: torch.dtype = torch.bfloat16, device: str = "cuda", sasp: Optional[SasPConfig] = None,
                       out_dim: Optional[int] = 256, train_mask_decoder: bool = True,
                       use_mm_start_end: bool = True) -> LoadedSesame:
    """A training start point.

    version: (a) a LLaVA-1.5 base in the original layout (`LlavaLlamaForCausalLM`): its LLM and
        projector, the SESAME tokens added (embedding/lm_head rows for them drawn from N(0, 0.02)
        like transformers 4.31's resize), SAM from `vision_pretrained` (official `sam_vit_h_4b8939.pth`
        key layout, strict), text_hidden_fcs freshly initialised;
        (b) a released SESAME/READ/LISA checkpoint, fine-tuned from its own SAM and text_hidden_fcs
        (`vision_pretrained` is not used then);
        or "tiny-random".
    vision_tower: CLIP to use (default: the config's `vision_tower` / `mm_vision_tower`).
    sasp: READ's SasP; None keeps the checkpoint architecture's choice.
    out_dim: width of a fresh text_hidden_fcs (case (a)); must equal the SAM prompt width. A
        released checkpoint keeps its own (as the original: its config wins).
    use_mm_start_end: case (a): add <im_start>/<im_end> to the LLaVA tokenizer (SESAME's default).
    """
    if version == TINY_RANDOM:
        loaded = _tiny_random(dtype, device, sasp)
    else:
        directory, config, architecture = _open(version)
        if architecture in LLAVA_BASE_ARCHITECTURES:
            loaded = _from_llava_base(directory, config, vision_pretrained=vision_pretrained, vision_tower=vision_tower,
                                      dtype=dtype, device=device, sasp=sasp, out_dim=out_dim,
                                      use_mm_start_end=use_mm_start_end)
        else:
            loaded = _load_released(directory, config, architecture, vision_tower=vision_tower, dtype=dtype,
                                    device=device, sasp=sasp)
    loaded.model.config.train_mask_decoder = train_mask_decoder
    loaded.model.train()
    loaded.model.vision_tower.eval()  # frozen, as in the original
    return loaded


def _from_llava_base(directory: str, config: dict, *, vision_pretrained: Optional[str], vision_tower: Optional[str],
                     dtype: torch.dtype, device: str, sasp: Optional[SasPConfig],
                     out_dim: Optional[int], use_mm_start_end: bool) -> LoadedSesame:
    if not vision_pretrained:
        raise ValueError(f"{directory} is a LLaVA base: SAM weights are needed too (vision_pretrained / "
                         "--vision_pretrained, e.g. sam_vit_h_4b8939.pth)")
    if not os.path.isfile(vision_pretrained):
        raise FileNotFoundError(f"SAM checkpoint (vision_pretrained) {vision_pretrained} does not exist")
    weights = ckpt.find_weight_files(directory)
    shapes = ckpt.read_shapes(weights)
    sam_state = ckpt.load_pickle_checkpoint(vision_pretrained)
    if isinstance(sam_state, dict) and "model" in sam_state and isinstance(sam_state["model"], dict):
        raise ckpt.CheckpointError(f"{vision_pretrained}: a training checkpoint with a 'model' entry; "
                                   "pass the plain SAM state dict (image_encoder.*, prompt_encoder.*, mask_decoder.*)")
    sam_shapes = {k: tuple(v.shape) for k, v in sam_state.items()}
    sam = sam_config_from_shapes(sam_shapes, "", vision_pretrained)
    out_dim = sam.prompt_embed_dim if out_dim is None else out_dim
    if out_dim != sam.prompt_embed_dim:
        raise ValueError(f"out_dim {out_dim} must equal the SAM prompt width {sam.prompt_embed_dim} "
                         f"of {vision_pretrained}")

    tokenizer, ids = _tokenizer_for(directory, use_mm_start_end)
    named_by = "--vision_tower" if vision_tower else f"'mm_vision_tower' in {os.path.join(directory, ckpt.CONFIG_FILE)}"
    clip_name = resolve_vision_tower(vision_tower or _field(config, "mm_vision_tower", directory), directory)
    tower = load_vision_tower(clip_name, dtype=dtype, device=device, attn_implementation="sdpa", named_by=named_by)
    vision = vision_config(tower, clip_name, config.get("mm_vision_select_layer", -2))
    _check_vision_fields(config, vision, directory)
    cfg = SesameConfig(llm=llm_config(config, directory, vocab_size=len(tokenizer)), vision=vision, sam=sam,
                       sasp=sasp, out_dim=out_dim, use_mm_start_end=use_mm_start_end,
                       mm_projector_type=projector_type(config, shapes, directory),
                       architecture="READForCausalLM" if sasp is not None else "SESAMEForCausalLM")
    cfg.use_token_ids(ids)
    model = ckpt.build_on_meta(lambda: SesameModel(cfg, vision_tower=tower))

    plan = ckpt.plan_loading(model, shapes, f"LLaVA base {directory}", to_internal=ckpt.released_to_internal,
                             provides=("llm.", "mm_projector."),
                             growable=("llm.model.embed_tokens.weight", "llm.lm_head.weight"))
    ckpt.load_planned(model, ckpt.iter_shards(weights, _shard_device(weights, device)), plan, device=device,
                      dtype=dtype)
    sam_plan = ckpt.plan_loading(model, sam_shapes, f"SAM checkpoint {vision_pretrained}",
                                 to_internal=lambda k: "visual_model." + k, provides=("visual_model.",),
                                 to_file=lambda n: n[len("visual_model."):])
    ckpt.load_planned(model, [sam_state], sam_plan, device=device, dtype=dtype)
    del sam_state
    _init_fresh(model.text_hidden_fcs, device=device, dtype=dtype)
    ckpt.finish_loading(model, device, f"LLaVA base {directory} + {vision_pretrained}")
    return _loaded(model, tokenizer, clip_name)


def _init_fresh(module: torch.nn.Module, *, device: str, dtype: torch.dtype, seed: int = 0) -> None:
    """PyTorch's default init (what the original's freshly built text_hidden_fcs got), seeded."""
    module.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for sub in module.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
    module.to(device=device)
    ckpt.cast_parameters(module, dtype)
