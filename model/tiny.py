"""Random SESAME models in the real file formats: tiny ones for tests and the quick start, and the
from-scratch start point of a small preset (e.g. the shapes world's). Same code path, small sizes.

The tiny tokenizer is a small sentencepiece model trained on the fly (LLaMA's conventions: unk 0,
bos 1, eos 2, byte fallback), so nothing is downloaded.

`python -m model.tiny OUT_DIR` writes a tiny random checkpoint in the released layout (sharded
`.bin` + index, config.json with `model_type: llava`, the slow tokenizer files) and, inside it,
a tiny CLIP checkpoint (`OUT_DIR/vision_tower`, a full CLIPModel like openai's) that config.json
names as `vision_tower`. `--llava_base` writes a random LLaVA-1.5 base (original layout) and a
SAM `.pth` instead, the two inputs of `model.builder.build_for_training`; with `--preset shapes
--tokenizer assets/shapes_tokenizer` they are the shapes model's start point for training from scratch.
"""
from __future__ import annotations

import argparse
import io
import json
import os
from typing import Optional

import torch

from .config import LLM_PRESETS, RELEASED_ARCHITECTURES, SAM_PRESETS, SesameConfig
from .sesame import SesameModel
from .tokenizer import TOKENIZER_MODEL, SpecialTokenIds, add_sesame_tokens, load_tokenizer

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TOKENIZER_DIR = os.path.join(_REPO_ROOT, "assets", "tiny_tokenizer")  # the bundled 512-piece tokenizer
LLAMA_VOCAB_SIZE = 32000

_CORPUS = """A chat between a curious human and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the human's questions.
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.
USER: ASSISTANT: Can you confirm if the man in red is present in this image? If it is, kindly provide the segmentation map.
If it isn't, please state so and, if appropriate, mention any objects that might be mistaken for it.
Sure, the segmentation result is here. It is. No, there is no dog in this picture, but there is a cat.
While the red square is not present, the image does include a blue circle. Yes, the green triangle is detected.
the left zebra, person on right, white car, small yellow star, big purple ellipse, a shape near the top left corner.
What is in this image? Please output segmentation mask. Please respond with segmentation mask.
0 1 2 3 4 5 6 7 8 9 ( ) [ ] : ; ! ? - ' " , .
"""


def train_sentencepiece(out_dir: str, lines: list[str], vocab_size: int, repeat: int = 1) -> str:
    """Train a byte-fallback BPE sentencepiece model like LLaMA's (unk 0, bos 1, eos 2, digits split,
    dummy prefix) on `lines`; returns the tokenizer.model path. Deterministic for the same input."""
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    lines = [line for line in lines if line.strip()] * repeat
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, split_digits=True, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        minloglevel=2, num_threads=1)
    path = os.path.join(out_dir, TOKENIZER_MODEL)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def train_tiny_sentencepiece(out_dir: str, vocab_size: int = 512, extra_text: str = "") -> str:
    """The tiny tokenizer of the tests: 512 pieces trained on a few prompts and answers."""
    return train_sentencepiece(out_dir, (_CORPUS + extra_text).splitlines(), vocab_size, repeat=10)


def llama_sized_sentencepiece(out_dir: str, vocab_size: int = LLAMA_VOCAB_SIZE) -> str:
    """A tiny trained sentencepiece model padded with unreachable pieces to LLaMA's 32000, so the
    SESAME tokens land on 32000/32001/32002 as in the releases. Returns the tokenizer.model path."""
    from sentencepiece import sentencepiece_model_pb2

    path = train_tiny_sentencepiece(out_dir)
    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    lowest = min(p.score for p in proto.pieces)
    for i in range(len(proto.pieces), vocab_size):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"\u2581unused{i}", lowest - 1.0 - i, piece.NORMAL
    proto.trainer_spec.vocab_size = vocab_size
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    return path


def tiny_tokenizer(directory: str):
    """The SESAME tokenizer over a tiny sentencepiece model found (or trained) in `directory`."""
    if not os.path.exists(os.path.join(directory, "tokenizer.model")):
        train_tiny_sentencepiece(directory)
    tok = load_tokenizer(directory)
    ids = add_sesame_tokens(tok)
    return tok, ids


def tiny_model(tokens: SpecialTokenIds, vocab_size: int, seed: int = 0, sasp=None,
               dtype: torch.dtype = torch.float32, device: Optional[str] = None, preset: str = "tiny") -> SesameModel:
    """Random SESAME of a preset size (`model.config`: "tiny", "shapes", ...). Parameters in
    `dtype`; buffers stay float32 (the loader's policy)."""
    from .checkpoint import cast_parameters

    cfg = SesameConfig.preset(preset, preset, preset, sasp=sasp)
    cfg.llm.vocab_size = vocab_size
    cfg.use_token_ids(tokens)
    torch.manual_seed(seed)
    model = SesameModel(cfg)
    return cast_parameters(model.to(device=device or "cpu"), dtype).eval()


# --- tiny files in the released formats ------------------------------------------------------------
def write_clip_checkpoint(vision_tower, out_dir: str, dtype: Optional[torch.dtype] = None,
                          processor_from: Optional[str] = None) -> str:
    """Save `vision_tower` (a CLIPVisionModel) as a full CLIPModel checkpoint with a minimal text
    tower and a preprocessor_config.json: the layout of openai/clip-vit-large-patch14(-336).

    dtype: the weights' dtype on disk (default: the tower's). processor_from: a CLIP directory
    whose preprocessor_config.json is kept (default: CLIP's processor for the tower's image size).
    """
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    vc = vision_tower.config
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                max_position_embeddings=16, projection_dim=vc.projection_dim, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    with torch.random.fork_rng(devices=[]):  # the unused text tower's init: the same bytes for the same tower
        torch.manual_seed(0)
        clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vc.to_dict(), projection_dim=vc.projection_dim))
    clip.vision_model.load_state_dict(vision_tower.state_dict())
    clip.save_pretrained(out_dir) if dtype is None else clip.to(dtype).save_pretrained(out_dir)
    processor = None
    if processor_from and os.path.isfile(os.path.join(processor_from, "preprocessor_config.json")):
        processor = CLIPImageProcessorPil.from_pretrained(processor_from)
    if processor is None:
        size = vc.image_size
        processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                          resample=3, do_center_crop=True)
    processor.save_pretrained(out_dir)
    return out_dir


def write_tiny_released(out_dir: str, *, architecture: str = "SESAMEForCausalLM", seed: int = 0,
                        llama_vocab: bool = True, safe_serialization: bool = False,
                        max_shard_size: str = "4MB", dtype: torch.dtype = torch.float32) -> SesameModel:
    """A tiny random checkpoint in the released layout, its CLIP in `out_dir/vision_tower`.
    Returns the model that was saved (for comparisons)."""
    from .checkpoint import save_released

    os.makedirs(out_dir, exist_ok=True)
    tok_dir = os.path.join(out_dir, "_sentencepiece")
    if llama_vocab:
        llama_sized_sentencepiece(tok_dir)
    else:
        train_tiny_sentencepiece(tok_dir)
    tokenizer, ids = tiny_tokenizer(tok_dir)
    model = tiny_model(ids, len(tokenizer), seed=seed)
    clip_dir = os.path.abspath(os.path.join(out_dir, "vision_tower"))
    write_clip_checkpoint(model.vision_tower, clip_dir)
    model.config.vision.name_or_path = clip_dir
    save_released(model, tokenizer, out_dir, architecture=architecture, safe_serialization=safe_serialization,
                  max_shard_size=max_shard_size, dtype=dtype)
    _remove_tree(tok_dir)
    return model


def write_tiny_sam(path: str, seed: int = 0, preset: str = "tiny") -> dict[str, torch.Tensor]:
    """A random SAM state dict of a preset size in the official `sam_vit_*.pth` key layout."""
    from .sam import build_sam

    if preset not in SAM_PRESETS:
        raise ValueError(f"unknown SAM preset {preset!r}; known: {sorted(SAM_PRESETS)}")
    torch.manual_seed(seed)
    state = build_sam(SAM_PRESETS[preset]).state_dict()
    torch.save(state, path)
    return state


def write_tiny_llava_base(out_dir: str, *, seed: int = 0, preset: str = "tiny",
                          tokenizer_dir: Optional[str] = None) -> SesameModel:
    """A random LLaVA-1.5 base of a preset size in the original (haotian) layout: the
    sentencepiece vocabulary without SESAME tokens, `model.layers.*`, `model.mm_projector.{0,2}.*`,
    the CLIP tower under `model.vision_tower.vision_tower.vision_model.*`, config.json with
    `mm_vision_tower`, and the slow tokenizer files. Its CLIP is also saved to `out_dir/vision_tower`.

    tokenizer_dir: the sentencepiece model to use (its `tokenizer.model`; added tokens are left
    out, as a LLaVA base has none); default: a tiny one padded to LLaMA's 32000 pieces.
    Returns the source model (base vocabulary) for comparisons."""
    import shutil

    from .checkpoint import internal_to_released
    from .tokenizer import save_slow_tokenizer

    os.makedirs(out_dir, exist_ok=True)
    if tokenizer_dir is None:
        llama_sized_sentencepiece(out_dir)
    else:
        src = os.path.join(tokenizer_dir, TOKENIZER_MODEL)
        if not os.path.isfile(src):
            raise FileNotFoundError(f"--tokenizer {tokenizer_dir}: no {TOKENIZER_MODEL} there")
        if os.path.abspath(src) != os.path.abspath(os.path.join(out_dir, TOKENIZER_MODEL)):
            shutil.copyfile(src, os.path.join(out_dir, TOKENIZER_MODEL))
        for stale in ("added_tokens.json", "tokenizer_config.json", "special_tokens_map.json"):
            if os.path.isfile(os.path.join(out_dir, stale)):
                os.remove(os.path.join(out_dir, stale))
    tokenizer = load_tokenizer(out_dir)
    base_vocab = len(tokenizer)
    ids = SpecialTokenIds(seg=-1, im_start=-1, im_end=-1, pad=0, bos=1, eos=2)
    model = tiny_model(ids, base_vocab, seed=seed, preset=preset)
    clip_dir = os.path.abspath(os.path.join(out_dir, "vision_tower"))
    write_clip_checkpoint(model.vision_tower, clip_dir)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(("llm.", "mm_projector.")):
            state[internal_to_released(name)] = tensor.clone()
        elif name.startswith("vision_tower."):
            state["model.vision_tower.vision_tower.vision_model." + name[len("vision_tower."):]] = tensor.clone()
    inv_freq = model.language_model.model.rotary_emb.inv_freq
    for i in range(model.config.llm.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    torch.save(state, os.path.join(out_dir, "pytorch_model.bin"))
    llm, vision = model.config.llm, model.config.vision
    config = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 0, "hidden_act": "silu", "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size, "num_hidden_layers": llm.num_hidden_layers,
        "num_attention_heads": llm.num_attention_heads, "num_key_value_heads": llm.num_key_value_heads,
        "max_position_embeddings": llm.max_position_embeddings, "rms_norm_eps": llm.rms_norm_eps,
        "initializer_range": 0.02, "tie_word_embeddings": False, "use_cache": True, "vocab_size": base_vocab,
        "torch_dtype": "float32", "image_aspect_ratio": "pad", "mm_hidden_size": vision.hidden_size,
        "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": vision.select_layer, "mm_vision_tower": clip_dir,
        "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False, "use_mm_proj": True,
    }
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_slow_tokenizer(tokenizer, out_dir, model_max_length=2048)
    return model


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.tiny", description=__doc__.split("\n\n")[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--architecture", default="SESAMEForCausalLM",
                        choices=list(RELEASED_ARCHITECTURES))
    parser.add_argument("--safetensors", action="store_true", help="model*.safetensors instead of pytorch_model*.bin")
    parser.add_argument("--max_shard_size", default="4MB", help="shard size limit (default 4MB: several shards)")
    parser.add_argument("--small_vocab", action="store_true",
                        help="the 512-piece tokenizer (vocab 515) instead of a LLaMA-sized 32000 (vocab 32003)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--llava_base", action="store_true",
                        help="write a random LLaVA-1.5 base + OUT_DIR/sam_{preset}.pth (build_for_training inputs): "
                             "the start point for training from scratch")
    parser.add_argument("--preset", default="tiny", choices=sorted(LLM_PRESETS),
                        help="--llava_base: model sizes (model/config.py presets; 'shapes' for the shapes world)")
    parser.add_argument("--tokenizer", default=None,
                        help="--llava_base: directory with the tokenizer.model to use (e.g. assets/shapes_tokenizer); "
                             "default: a tiny one padded to LLaMA's 32000 pieces")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.llava_base:
        sam_path = os.path.join(args.out_dir, f"sam_{args.preset}.pth")
        write_tiny_llava_base(args.out_dir, seed=args.seed, preset=args.preset, tokenizer_dir=args.tokenizer)
        write_tiny_sam(sam_path, seed=args.seed, preset=args.preset)
        print(f"random {args.preset} LLaVA base in {args.out_dir} (CLIP in {os.path.join(args.out_dir, 'vision_tower')}"
              f"), SAM in {sam_path}")
        return
    if args.preset != "tiny" or args.tokenizer:
        parser.error("--preset and --tokenizer apply to --llava_base only")
    write_tiny_released(args.out_dir, architecture=args.architecture, seed=args.seed,
                        llama_vocab=not args.small_vocab, safe_serialization=args.safetensors,
                        max_shard_size=args.max_shard_size, dtype=getattr(torch, args.dtype))
    clip_dir = os.path.join(args.out_dir, "vision_tower")
    print(f"tiny {args.architecture} checkpoint in {args.out_dir} (CLIP in {clip_dir})")


if __name__ == "__main__":
    main()
