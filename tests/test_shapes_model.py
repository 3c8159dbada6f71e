"""The shapes model: its preset's size, its from-scratch start point, --train_all, the Shapes
recipe, and a CLIP directory that moved."""
import json
import logging
import os
import shlex
import subprocess

import pytest
import torch

from model.builder import build_for_training, resolve_vision_tower
from model.config import SesameConfig
from model.lora import apply_lora, set_trainable
from model.sesame import SesameModel
from model.tiny import tiny_model, write_tiny_llava_base, write_tiny_sam
from model.tokenizer import SpecialTokenIds
from training.args import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "assets", "shapes_tokenizer")
IDS = SpecialTokenIds(seg=1000, im_start=1001, im_end=1002, pad=0, bos=1, eos=2)


def test_shapes_preset_fits_25_mb_in_bf16_with_its_clip(tmp_path):
    from transformers import CLIPVisionModel

    from model.sesame import clip_config
    from model.tiny import write_clip_checkpoint

    cfg = SesameConfig.preset("shapes", "shapes", "shapes")
    cfg.use_token_ids(IDS)
    with torch.device("meta"):
        model = SesameModel(cfg)
    released = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vision_tower."))
    write_clip_checkpoint(CLIPVisionModel(clip_config(cfg)), str(tmp_path / "clip"), dtype=torch.bfloat16)
    clip_bytes = sum(f.stat().st_size for f in (tmp_path / "clip").iterdir())
    assert 2 * released + clip_bytes <= 25e6, (released, clip_bytes)
    assert cfg.vision.num_patches == 100 and cfg.sam.embedding_size == 32 and cfg.llm.vocab_size == 1003


def test_shapes_start_point_builds_with_the_sesame_tokens(tmp_path):
    base = write_tiny_llava_base(str(tmp_path / "base"), preset="shapes", tokenizer_dir=TOKENIZER)
    write_tiny_sam(str(tmp_path / "sam.pth"), preset="shapes")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["vocab_size"] == 1000 and config["hidden_size"] == 256 and config["mm_hidden_size"] == 192
    assert not os.path.exists(tmp_path / "base" / "vision_tower" / "pytorch_model.bin")
    loaded = build_for_training(str(tmp_path / "base"), vision_pretrained=str(tmp_path / "sam.pth"),
                                dtype=torch.float32, device="cpu", out_dim=None)
    cfg = loaded.model.config
    assert (cfg.seg_token_id, len(loaded.tokenizer), cfg.llm.vocab_size) == (1000, 1003, 1003)
    assert (cfg.vision.image_size, cfg.sam.image_size, cfg.sam.patch_size, cfg.out_dim) == (140, 256, 8, 128)
    torch.testing.assert_close(loaded.model.language_model.model.layers[0].mlp.up_proj.weight,
                               base.language_model.model.layers[0].mlp.up_proj.weight)


def test_train_all_trains_every_part_and_the_encoders_record_gradients(tokenizer, token_ids):
    model = tiny_model(token_ids, len(tokenizer))
    names = set_trainable(model, train_all=True)
    assert len(names) == len(list(model.parameters()))
    pixels = torch.randn(1, 3, model.config.vision.image_size, model.config.vision.image_size)
    sam = torch.randn(1, 3, model.config.sam.image_size, model.config.sam.image_size)
    clip_out, sam_out = model.encode_images_clip(pixels), model.encode_images_sam(sam)
    (clip_out.sum() + sam_out.sum()).backward()
    assert model.vision_tower.embeddings.patch_embedding.weight.grad is not None
    assert model.mm_projector[0].weight.grad is not None
    assert model.visual_model.image_encoder.patch_embed.proj.weight.grad is not None
    with torch.no_grad():
        assert not model.encode_images_clip(pixels).requires_grad


def test_freeze_vision_tower_keeps_clip_out_of_training(tokenizer, token_ids):
    model = tiny_model(token_ids, len(tokenizer))
    names = set_trainable(model, train_all=True, freeze_vision_tower=True)
    clip = [n for n, _ in model.named_parameters() if n.startswith("vision_tower.")]
    assert clip and not set(clip) & set(names)
    assert len(names) == len(list(model.parameters())) - len(clip)  # the projector and the rest still train
    assert any(n.startswith("mm_projector.") for n in names)


def test_the_released_recipe_builds_no_graph_through_its_frozen_encoders(tokenizer, token_ids):
    model = tiny_model(token_ids, len(tokenizer))
    apply_lora(model)
    set_trainable(model)
    pixels = torch.randn(1, 3, model.config.vision.image_size, model.config.vision.image_size)
    sam = torch.randn(1, 3, model.config.sam.image_size, model.config.sam.image_size)
    assert model.encode_images_clip(pixels).grad_fn is None  # CLIP and the projector are frozen
    assert model.encode_images_sam(sam).grad_fn is None


def test_train_all_flag(tmp_path):
    args = parse_args(["--train_all"])
    assert args.train_all
    assert not parse_args([]).train_all
    with pytest.raises(SystemExit):
        parse_args(["--train_all", "--no-train_mask_decoder"])
    assert parse_args(["--train_all", "--freeze_vision_tower"]).freeze_vision_tower
    with pytest.raises(SystemExit):
        parse_args(["--freeze_vision_tower"])


def test_a_moved_checkpoint_finds_its_clip_beside_it(tmp_path, caplog):
    (tmp_path / "ckpt" / "vision_tower").mkdir(parents=True)
    ckpt = str(tmp_path / "ckpt")
    assert resolve_vision_tower("vision_tower", ckpt) == os.path.join(ckpt, "vision_tower")
    with caplog.at_level(logging.WARNING):
        got = resolve_vision_tower("/gone/elsewhere/vision_tower", ckpt)
    assert got == os.path.join(ckpt, "vision_tower") and "does not exist" in caplog.text
    assert resolve_vision_tower("openai/clip-vit-large-patch14-336", ckpt) == "openai/clip-vit-large-patch14-336"
    assert resolve_vision_tower("/gone/elsewhere/vision_tower", str(tmp_path)) == "/gone/elsewhere/vision_tower"


def test_shapes_recipe_prepares_data_and_start_point_then_trains_everything(tmp_path):
    stub = tmp_path / "bin"  # a `deepspeed` command on PATH, as pip installs it (hosts with wheels unpacked lack it)
    stub.mkdir()
    (stub / "deepspeed").write_text("#!/bin/sh\n")
    (stub / "deepspeed").chmod(0o755)
    env = dict(os.environ, DRY_RUN="1", DATASET_DIR=str(tmp_path / "data"), VERSION=str(tmp_path / "start"),
               PATH=f"{stub}{os.pathsep}{os.environ.get('PATH', '')}")
    out = subprocess.run(["bash", os.path.join(ROOT, "train_sesame.sh"), "Shapes", "localhost:0", "15990",
                          "--epochs", "1"], env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("python -m dataset.shapes " + str(tmp_path / "data"))
    assert out[1].startswith("python -m model.tiny " + str(tmp_path / "start") + " --llava_base --preset shapes")
    train = out[2]
    for flag in ("--train_all", "--refer_seg_data refcoco", "--correct_refer_seg_data fprefcoco",
                 f"--vision_pretrained {tmp_path / 'start' / 'sam_shapes.pth'}", "--batch_size 32"):
        assert flag in train, flag
    assert train.startswith("deepspeed --include localhost:0 ") and train.strip().endswith("--epochs 1")
    words = shlex.split(train)  # the dry run prints the words shell-quoted
    assert words[words.index("--sdpa_backends") + 1] == "flash,efficient,math"  # no cuDNN attention
