"""Released checkpoints (SESAME / READ / LISA layout) load exactly, save_released writes the same
layout, build_for_training's start points, and every error path.

The released directories here are written by hand from the documented format (keys, config.json,
4.31 tokenizer files, shard index), not by the code under test.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from test_checkpoint_tokenizer import SESAME_TOKENS, write_431_tokenizer

from model import checkpoint as ckpt
from model.builder import build_for_training, load_pretrained, sam_config_from_shapes
from model.checkpoint import CheckpointError, save_released
from model.config import SAM_PRESETS, SasPConfig, SesameConfig
from model.conversation import build_prompt, tokenize_with_image
from model.lora import apply_lora, merge_lora
from model.sesame import SesameModel
from model.tiny import tiny_model, write_clip_checkpoint, write_tiny_llava_base, write_tiny_sam
from model.tokenizer import SpecialTokenIds, add_sesame_tokens, load_tokenizer

VOCAB = 32003
RELEASED_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.", "model.mm_projector.",
                     "model.visual_model.image_encoder.", "model.visual_model.prompt_encoder.",
                     "model.visual_model.mask_decoder.", "model.text_hidden_fcs.")


# --- the released layout, by hand ---------------------------------------------------------------

def config_ids(loaded) -> SpecialTokenIds:
    """The token ids a loaded model generates with (its config) and the tokenizer's image delimiters."""
    cfg, vocab = loaded.model.config, loaded.tokenizer.get_vocab()
    return SpecialTokenIds(seg=cfg.seg_token_id, im_start=vocab.get("<im_start>", -1), im_end=vocab.get("<im_end>", -1),
                           pad=cfg.llm.pad_token_id, bos=cfg.llm.bos_token_id, eos=cfg.llm.eos_token_id)

def released_tensors(model, dtype=None):
    """Keys as the reference table lists them; inv_freq filled with junk (it must be ignored)."""
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith("vision_tower."):
            continue
        if name.startswith("llm.model."):
            key = "model." + name[len("llm.model."):]
        elif name.startswith("llm."):
            key = name[len("llm."):]
        else:
            key = "model." + name
        t = t.detach().clone()
        out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    for i in range(model.config.llm.num_hidden_layers):
        out[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.full((8,), 7.0)
    assert all(k.startswith(RELEASED_PREFIXES) for k in out)
    return out


def released_config(model, architecture, clip_dir):
    llm = model.config.llm
    return {
        "_name_or_path": "/mnt/runs/merged", "architectures": [architecture], "model_type": "llava",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
        "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_hidden_layers, "num_attention_heads": llm.num_attention_heads,
        "num_key_value_heads": llm.num_key_value_heads, "rms_norm_eps": 1e-05,
        "max_position_embeddings": llm.max_position_embeddings, "initializer_range": 0.02, "pretraining_tp": 1,
        "rope_scaling": None, "tie_word_embeddings": False, "use_cache": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.31.0", "vocab_size": VOCAB,
        "mm_hidden_size": model.config.vision.hidden_size, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": True,
        "mm_use_im_patch_token": False, "image_aspect_ratio": "square", "image_grid_pinpoints": None,
        "vision_tower": clip_dir, "mm_vision_tower": clip_dir, "use_mm_proj": True, "freeze_mm_mlp_adapter": True,
        "tune_mm_mlp_adapter": False, "pretrain_mm_mlp_adapter": None, "train_mask_decoder": True,
        "out_dim": model.config.out_dim,
    }


def write_release(directory, tensors, config, sp_model, fmt="bin", shards=3):
    os.makedirs(directory, exist_ok=True)
    write_431_tokenizer(directory, sp_model, SESAME_TOKENS)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, f)
    keys = sorted(tensors)
    chunks = [keys[i::shards] for i in range(shards)]
    ext, stem, index = (("bin", "pytorch_model", "pytorch_model.bin.index.json") if fmt == "bin"
                        else ("safetensors", "model", "model.safetensors.index.json"))
    weight_map = {}
    for i, chunk in enumerate(chunks):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" if shards > 1 else f"{stem}.{ext}"
        part = {k: tensors[k].contiguous() for k in chunk}
        if fmt == "bin":
            torch.save(part, os.path.join(directory, name))
        else:
            from safetensors.torch import save_file
            save_file(part, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(directory, index), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return directory


# --- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source(tmp_path_factory, sp_model):
    """The eager tiny model a release is made from, its tokenizer, and its CLIP directory."""
    tok = load_tokenizer(write_431_tokenizer(str(tmp_path_factory.mktemp("tok")), sp_model, SESAME_TOKENS))
    ids = add_sesame_tokens(tok)
    model = tiny_model(ids, VOCAB, seed=11)
    clip_dir = write_clip_checkpoint(model.vision_tower, str(tmp_path_factory.mktemp("clip")))
    return model, tok, ids, clip_dir


@pytest.fixture(scope="module")
def release(tmp_path_factory, source, sp_model):
    model, _, _, clip_dir = source
    directory = str(tmp_path_factory.mktemp("sesame_release"))
    return write_release(directory, released_tensors(model), released_config(model, "SESAMEForCausalLM", clip_dir),
                         sp_model)


@pytest.fixture(scope="module")
def loaded(release):
    return load_pretrained(release, device="cpu", dtype=torch.float32)


def copy_release(release, tmp_path):
    return shutil.copytree(release, str(tmp_path / "copy"))


def edit_config(directory, **changes):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with open(path, "w") as f:
        json.dump(cfg, f)


def edit_tensors(directory, fn):
    """Apply fn to the merged state dict of a sharded .bin release and write it back as one file."""
    weights = ckpt.find_weight_files(directory)
    state = {}
    for shard in ckpt.iter_shards(weights):
        state.update({k: v.clone() for k, v in shard.items()})
    for path in weights.files:
        os.remove(path)
    os.remove(os.path.join(directory, "pytorch_model.bin.index.json"))
    fn(state)
    torch.save(state, os.path.join(directory, "pytorch_model.bin"))


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())  # non-persistent ones too
    assert ba.keys() == bb.keys()
    for k in ba:
        assert ba[k].dtype == bb[k].dtype and torch.equal(ba[k], bb[k]), k


def predict_once(model, tokenizer, ids, clip_transform, sam_transform):
    img = np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    sam_in = sam_transform(img)
    prompt = tokenize_with_image(build_prompt("<image>\nWhere is the red square?"), tokenizer)

    def hook(step, logits):  # [SEG] at step 1, EOS at step 3
        logits = logits.clone()
        logits[:, ids.seg if step == 1 else ids.eos] += 1e4 if step in (1, 3) else 0.0
        return logits
    return model.predict(clip_transform(img)[None], sam_in.pixels[None], [sam_in.resized_size],
                         [sam_in.original_size], [prompt], [0], max_new_tokens=5,
                         logits_hook=hook)[0]


def assert_same_prediction(p, q):
    assert p.output_ids == q.output_ids and torch.equal(p.masks, q.masks)
    assert torch.equal(p.seg_hidden, q.seg_hidden)


# --- loading ------------------------------------------------------------------------------------
def test_sharded_bin_release_loads_every_tensor_exactly(source, loaded):
    model, tok, ids, clip_dir = source
    assert_same_model(loaded.model, model)
    assert config_ids(loaded) == ids and len(loaded.tokenizer) == VOCAB
    cfg = loaded.model.config
    assert cfg.sasp is None and cfg.architecture == "SESAMEForCausalLM"
    assert cfg.sam == SAM_PRESETS["tiny"] and cfg.vision.image_size == 112 and cfg.vision.name_or_path == clip_dir
    assert not loaded.model.training
    assert_same_prediction(predict_once(loaded.model, loaded.tokenizer, config_ids(loaded), loaded.clip_transform,
                                        loaded.sam_transform),
                           predict_once(model, tok, ids, loaded.clip_transform, loaded.sam_transform))


def test_bf16_safetensors_release_equals_eager_bf16_model(source, sp_model, tmp_path):
    model, tok, ids, clip_dir = source
    directory = write_release(str(tmp_path / "bf16"), released_tensors(model, torch.bfloat16),
                              released_config(model, "SESAMEForCausalLM", clip_dir), sp_model, fmt="safetensors",
                              shards=1)
    got = load_pretrained(directory, device="cpu", dtype=torch.bfloat16)
    eager = tiny_model(ids, VOCAB, seed=11, dtype=torch.bfloat16)
    eager.vision_tower.to(torch.bfloat16)  # the loader builds CLIP in the model dtype, as the original
    pe = eager.visual_model.prompt_encoder.pe_layer  # the release stores SAM's Gaussian in bf16 too
    pe.positional_encoding_gaussian_matrix = pe.positional_encoding_gaussian_matrix.bfloat16().float()
    assert_same_model(got.model, eager)
    assert got.model.visual_model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32
    assert got.model.language_model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert_same_prediction(predict_once(got.model, got.tokenizer, config_ids(got), got.clip_transform,
                                        got.sam_transform),
                           predict_once(eager, tok, ids, got.clip_transform, got.sam_transform))


def test_parameters_start_on_meta_and_arrive_in_the_target_dtype(release, monkeypatch):
    """No full-precision copy: LLM/SAM/projector parameters are meta until their tensor arrives,
    converted one by one to the target dtype (the file is float32 here, the model bf16)."""
    seen = {}
    real = ckpt.load_planned

    def spy(model, weights, plan, **kw):
        if not seen:
            seen.update({n: p.device.type for n, p in model.named_parameters() if not n.startswith("vision_tower.")})
        return real(model, weights, plan, **kw)
    monkeypatch.setattr(ckpt, "load_planned", spy)
    got = load_pretrained(release, device="cpu", dtype=torch.bfloat16)
    assert seen and set(seen.values()) == {"meta"}
    assert {p.dtype for p in got.model.parameters()} == {torch.bfloat16}


def test_read_and_lisa_architectures(source, sp_model, tmp_path):
    model, _, ids, clip_dir = source
    read_dir = write_release(str(tmp_path / "read"), released_tensors(model),
                             released_config(model, "READForCausalLM", clip_dir), sp_model)
    read = load_pretrained(read_dir, device="cpu", dtype=torch.float32)
    assert read.model.config.sasp == SasPConfig() and read.model.config.architecture == "READForCausalLM"

    # LISA: LLaVA-v1 single-Linear projector, no mm_projector_type in config.json
    cfg = SesameConfig.tiny(vocab_size=VOCAB, mm_projector_type="linear", seg_token_id=ids.seg)
    torch.manual_seed(5)
    lisa = SesameModel(cfg, vision_tower=model.vision_tower).eval()
    tensors = released_tensors(lisa)
    assert "model.mm_projector.weight" in tensors and "model.mm_projector.0.weight" not in tensors
    config = released_config(lisa, "LISAForCausalLM", clip_dir)
    del config["mm_projector_type"]
    got = load_pretrained(write_release(str(tmp_path / "lisa"), tensors, config, sp_model), device="cpu",
                          dtype=torch.float32)
    assert got.model.config.sasp is None and got.model.config.mm_projector_type == "linear"
    assert_same_model(got.model, lisa)


def test_vision_tower_geometry_comes_from_clip_and_can_be_overridden(source, release, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    model = source[0]
    vc = model.vision_tower.config.to_dict()
    vc.update(image_size=56)  # 4x4 = 16 patches instead of 8x8
    small = CLIPVisionModel(CLIPVisionConfig(**vc))
    small_dir = str(tmp_path / "clip56")
    small.save_pretrained(small_dir)  # a CLIPVisionModel directory (no preprocessor config)
    got = load_pretrained(release, device="cpu", dtype=torch.float32, vision_tower=small_dir)
    assert got.model.config.vision.image_size == 56 and got.model.config.vision.num_patches == 16
    img = np.zeros((30, 50, 3), dtype=np.uint8)
    assert got.clip_transform(img).shape == (3, 56, 56)
    assert got.model.encode_images_clip(got.clip_transform(img)[None]).shape[1] == 16
    for k, v in small.state_dict().items():
        assert torch.equal(got.model.vision_tower.state_dict()[k], v), k
    # the release's own tower still loads without the override
    assert got.model.config.vision.name_or_path == small_dir


@pytest.mark.parametrize("preset", ["vit_h", "vit_l", "vit_b", "tiny"])
def test_sam_geometry_is_read_off_the_weights(preset):
    from model.sam import build_sam
    with torch.device("meta"):
        sam = build_sam(SAM_PRESETS[preset])
    shapes = {"model.visual_model." + k: tuple(v.shape) for k, v in sam.state_dict().items()}
    assert sam_config_from_shapes(shapes, "model.visual_model.", "test") == SAM_PRESETS[preset]


# --- saving -------------------------------------------------------------------------------------
def test_save_released_writes_the_released_layout_and_round_trips(loaded, release, tmp_path):
    out = str(tmp_path / "saved")
    save_released(loaded.model, loaded.tokenizer, out, max_shard_size="4MB")
    files = sorted(os.listdir(out))
    assert {"config.json", "generation_config.json", "pytorch_model.bin.index.json", "tokenizer.model",
            "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"} <= set(files)
    shards = [f for f in files if f.startswith("pytorch_model-")]
    assert len(shards) > 1
    with open(os.path.join(out, "pytorch_model.bin.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    with open(os.path.join(release, "pytorch_model.bin.index.json")) as f:
        assert weight_map.keys() == json.load(f)["weight_map"].keys()  # same keys as the hand-made release
    assert not any("vision_tower" in k for k in weight_map)
    with open(os.path.join(out, "config.json")) as f:
        saved_cfg = json.load(f)
    with open(os.path.join(release, "config.json")) as f:
        ref_cfg = json.load(f)
    for k, v in ref_cfg.items():
        if k not in ("_name_or_path", "transformers_version", "torch_dtype"):
            assert saved_cfg[k] == v, k
    assert saved_cfg["torch_dtype"] == "float32"
    with open(os.path.join(out, "added_tokens.json")) as f:
        assert json.load(f) == SESAME_TOKENS
    again = load_pretrained(out, device="cpu", dtype=torch.float32)
    assert_same_model(again.model, loaded.model)
    assert_same_prediction(predict_once(again.model, again.tokenizer, config_ids(again), again.clip_transform,
                                        again.sam_transform),
                           predict_once(loaded.model, loaded.tokenizer, config_ids(loaded), loaded.clip_transform,
                                        loaded.sam_transform))


def test_save_released_safetensors_and_bf16(loaded, tmp_path):
    out = str(tmp_path / "safe")
    save_released(loaded.model, loaded.tokenizer, out, safe_serialization=True, dtype=torch.bfloat16,
                  architecture="READForCausalLM", max_shard_size="2MB")
    assert not any(f.endswith(".bin") for f in os.listdir(out))
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 1
    from safetensors import safe_open
    gaussian = "model.visual_model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    for key, dtype in (("model.layers.0.self_attn.q_proj.weight", torch.bfloat16), (gaussian, torch.float32)):
        with safe_open(os.path.join(out, weight_map[key]), "pt") as f:
            assert f.get_tensor(key).dtype == dtype
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["torch_dtype"] == "bfloat16" and cfg["architectures"] == ["READForCausalLM"]
    got = load_pretrained(out, device="cpu", dtype=torch.float32)
    assert got.model.config.sasp == SasPConfig()
    ref = {k: v.to(torch.bfloat16).float() if v.is_floating_point() else v
           for k, v in loaded.model.state_dict().items()}
    for k, v in got.model.state_dict().items():
        expected = loaded.model.state_dict()[k] if "gaussian" in k or k.startswith("vision_tower.") else ref[k]
        assert torch.equal(v, expected), k


def test_save_refuses_unmerged_lora_and_saves_merged(source, tmp_path):
    model, tok, ids, clip_dir = source
    m = tiny_model(ids, VOCAB, seed=11)
    apply_lora(m)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_()
    with pytest.raises(CheckpointError, match=r"merge_lora"):
        save_released(m, tok, str(tmp_path / "lora"))
    m.eval()
    merge_lora(m)
    out = str(tmp_path / "merged")
    save_released(m, tok, out, vision_tower=clip_dir)
    got = load_pretrained(out, device="cpu", dtype=torch.float32)
    assert_same_model(got.model, m)
    assert not torch.equal(got.model.language_model.model.layers[0].self_attn.q_proj.weight,
                           model.language_model.model.layers[0].self_attn.q_proj.weight)


# --- errors -------------------------------------------------------------------------------------
def test_missing_keys_are_reported_by_group(release, tmp_path):
    d = copy_release(release, tmp_path)

    def drop(state):
        del state["model.layers.1.mlp.up_proj.weight"]
        del state["model.visual_model.mask_decoder.iou_token.weight"]
        del state["model.text_hidden_fcs.0.0.bias"]
    edit_tensors(d, drop)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(d, device="cpu", dtype=torch.float32)
    msg = str(e.value)
    assert d in msg and "missing keys" in msg
    assert "LLM (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "SAM mask decoder (1): model.visual_model.mask_decoder.iou_token.weight" in msg
    assert "text_hidden_fcs (1): model.text_hidden_fcs.0.0.bias" in msg


def test_unexpected_keys_and_shape_mismatches_are_reported(release, tmp_path):
    d = copy_release(release, tmp_path)

    def corrupt(state):
        state["model.extra.weight"] = torch.zeros(2)
        state["model.visual_model.image_encoder.extra_block.weight"] = torch.zeros(2)
        state["model.text_hidden_fcs.0.2.weight"] = torch.zeros(16, 64)
    edit_tensors(d, corrupt)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(d, device="cpu", dtype=torch.float32)
    msg = str(e.value)
    assert "unexpected keys" in msg and "other (1): model.extra.weight" in msg
    assert "SAM image encoder (1): model.visual_model.image_encoder.extra_block.weight" in msg
    assert "model.text_hidden_fcs.0.2.weight: checkpoint [16, 64] vs model [32, 64]" in msg
    assert "missing keys" not in msg  # a mismatched key is not also reported as missing


def test_unknown_architecture_and_bad_configs(release, tmp_path):
    d = copy_release(release, tmp_path)
    edit_config(d, architectures=["FooForCausalLM"])
    with pytest.raises(CheckpointError, match=r"FooForCausalLM.*SESAMEForCausalLM, READForCausalLM, LISAForCausalLM"):
        load_pretrained(d, device="cpu")
    edit_config(d, architectures=["SESAMEForCausalLM"], vocab_size=32010)
    with pytest.raises(CheckpointError, match=r"32003 tokens.*vocab_size 32010"):
        load_pretrained(d, device="cpu")
    edit_config(d, vocab_size=VOCAB, mm_projector_type="linear")
    with pytest.raises(CheckpointError, match=r"mm_projector_type 'linear'.*'mlp2x_gelu' projector"):
        load_pretrained(d, device="cpu")
    edit_config(d, mm_projector_type="mlp2x_gelu", text_config={"model_type": "llama"})
    with pytest.raises(CheckpointError, match=r"llava-hf"):
        load_pretrained(d, device="cpu")
    edit_config(d, text_config=None, hidden_size=None)
    with pytest.raises(CheckpointError, match=r"config\.json: missing field 'hidden_size'"):
        load_pretrained(d, device="cpu")


def test_missing_files_name_the_path_searched(release, tmp_path):
    d = copy_release(release, tmp_path)
    os.remove(os.path.join(d, "pytorch_model-00002-of-00003.bin"))
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00003\.bin"):
        load_pretrained(d, device="cpu")
    for f in os.listdir(d):
        if f.startswith("pytorch_model"):
            os.remove(os.path.join(d, f))
    with pytest.raises(FileNotFoundError, match=rf"no weights in {d}: .*pytorch_model\.bin"):
        load_pretrained(d, device="cpu")
    shutil.copytree(release, d, dirs_exist_ok=True)
    os.remove(os.path.join(d, "tokenizer.model"))
    with pytest.raises(FileNotFoundError, match=rf"{d}/tokenizer\.model"):
        load_pretrained(d, device="cpu")
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(FileNotFoundError, match=rf"{d}/config\.json"):
        load_pretrained(d, device="cpu")


def test_unreachable_hub_id_and_clip_tower(release, tmp_path, source):
    with pytest.raises(FileNotFoundError, match=r"'nobody-here/no-such-model' is not a local directory.*Hugging Face"):
        load_pretrained("nobody-here/no-such-model", device="cpu")
    d = copy_release(release, tmp_path)
    edit_config(d, vision_tower="/nonexistent/clip-vit-large-patch14-336")
    with pytest.raises(FileNotFoundError, match=r"CLIP vision tower '/nonexistent/clip-vit-large-patch14-336' "
                                                r"\('vision_tower' in .*config\.json\)"):
        load_pretrained(d, device="cpu")
    # --vision_tower overrides the config's
    got = load_pretrained(d, device="cpu", dtype=torch.float32, vision_tower=source[3])
    assert got.model.config.vision.name_or_path == source[3]


# --- training start points ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava_base(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("llava_base"))
    base_model = write_tiny_llava_base(d, seed=3)
    sam_path = os.path.join(d, "sam_tiny.pth")
    sam_state = write_tiny_sam(sam_path, seed=4)
    return d, base_model, sam_path, sam_state


def test_build_for_training_from_llava_base(llava_base, tmp_path):
    d, base, sam_path, sam_state = llava_base
    # CLIP weights inside the base file are ignored: CLIP comes from mm_vision_tower, as in the original
    d = shutil.copytree(d, str(tmp_path / "base"))
    state = torch.load(os.path.join(d, "pytorch_model.bin"), weights_only=True)
    assert any(k.startswith("model.vision_tower.vision_tower.vision_model.") for k in state)
    torch.save({k: torch.zeros_like(v) if "vision_tower" in k else v for k, v in state.items()},
               os.path.join(d, "pytorch_model.bin"))

    got = build_for_training(d, vision_pretrained=sam_path, device="cpu", dtype=torch.float32, out_dim=32)
    m = got.model
    assert m.training and not m.vision_tower.training
    assert len(got.tokenizer) == VOCAB and (config_ids(got).seg, config_ids(got).im_start) == (32000, 32001)
    assert m.config.llm.vocab_size == VOCAB and m.config.sasp is None and m.config.use_mm_start_end
    emb, head = m.language_model.get_input_embeddings().weight, m.language_model.lm_head.weight
    assert torch.equal(emb[:32000], base.language_model.get_input_embeddings().weight)
    assert torch.equal(head[:32000], base.language_model.lm_head.weight)
    new_rows = torch.cat([emb[32000:], head[32000:]])
    assert 0.01 < new_rows.std().item() < 0.03 and abs(new_rows.mean().item()) < 0.01
    base_sd, sd = base.state_dict(), m.state_dict()
    for k, v in base_sd.items():
        if k.startswith(("llm.model.layers.", "mm_projector.", "vision_tower.")):
            assert torch.equal(sd[k], v), k
    for k, v in sam_state.items():
        assert torch.equal(sd["visual_model." + k], v), k
    fc = m.text_hidden_fcs[0][0].weight
    assert torch.isfinite(fc).all() and fc.abs().max() <= 1 / fc.shape[1] ** 0.5 and fc.std() > 0
    again = build_for_training(d, vision_pretrained=sam_path, device="cpu", dtype=torch.float32, out_dim=None,
                               sasp=SasPConfig(num_points=4))
    assert torch.equal(again.model.text_hidden_fcs[0][0].weight, fc)  # seeded
    assert torch.equal(again.model.language_model.lm_head.weight, head)
    assert again.model.config.sasp == SasPConfig(num_points=4)
    assert again.model.config.architecture == "READForCausalLM"


def test_build_for_training_llava_base_errors(llava_base, tmp_path):
    d, _, sam_path, sam_state = llava_base
    with pytest.raises(ValueError, match=r"vision_pretrained"):
        build_for_training(d, device="cpu")
    with pytest.raises(FileNotFoundError, match=r"/no/sam\.pth"):
        build_for_training(d, vision_pretrained="/no/sam.pth", device="cpu")
    with pytest.raises(ValueError, match=r"out_dim 256 must equal the SAM prompt width 32"):
        build_for_training(d, vision_pretrained=sam_path, device="cpu", out_dim=256)
    broken = str(tmp_path / "sam_broken.pth")
    torch.save({k: v for k, v in sam_state.items() if not k.startswith("mask_decoder.output_upscaling")}, broken)
    with pytest.raises(CheckpointError, match=r"(?s)SAM checkpoint .*sam_broken\.pth.*SAM mask decoder \(6\): "
                                              r"mask_decoder\.output_upscaling\.0\.bias"):
        build_for_training(d, vision_pretrained=broken, device="cpu", dtype=torch.float32, out_dim=32)
    with pytest.raises(CheckpointError, match=r"LLaVA base.*build_for_training"):
        load_pretrained(d, device="cpu")


def test_build_for_training_fine_tunes_a_release_and_tiny_random(release, loaded):
    got = build_for_training(release, device="cpu", dtype=torch.float32, sasp=SasPConfig(num_points=5),
                             train_mask_decoder=False)
    assert got.model.config.sasp == SasPConfig(num_points=5) and not got.model.config.train_mask_decoder
    assert got.model.training
    assert_same_model(got.model, loaded.model)
    tiny = build_for_training("tiny-random", device="cpu", dtype=torch.float32)
    assert tiny.model.training and tiny.model.config.llm.hidden_size == 64


def test_tiny_random_is_the_seeded_tiny_model():
    from model.tiny import TINY_TOKENIZER_DIR, tiny_tokenizer
    got = load_pretrained("tiny-random", device="cpu", dtype=torch.float32)
    tok, ids = tiny_tokenizer(TINY_TOKENIZER_DIR)
    assert config_ids(got) == ids and not got.model.training
    assert_same_model(got.model, tiny_model(ids, len(tok), seed=0))


def test_cli_writes_loadable_release_and_llava_base(tmp_path):
    from model.tiny import main
    out = str(tmp_path / "tiny_read")
    main([out, "--architecture", "READForCausalLM", "--small_vocab", "--max_shard_size", "200KB"])
    assert os.path.isfile(os.path.join(out, "pytorch_model.bin.index.json"))
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "llava" and cfg["vocab_size"] == 515
    assert cfg["vision_tower"] == os.path.join(out, "vision_tower")
    got = load_pretrained(out, device="cpu", dtype=torch.float32)
    assert got.model.config.sasp == SasPConfig()
    pred = predict_once(got.model, got.tokenizer, config_ids(got), got.clip_transform, got.sam_transform)
    assert pred.masks.shape == (1, 45, 70)

    base = str(tmp_path / "tiny_base")
    main([base, "--llava_base"])
    start = build_for_training(base, vision_pretrained=os.path.join(base, "sam_tiny.pth"), device="cpu",
                               dtype=torch.float32, out_dim=32)
    assert start.model.config.llm.vocab_size == VOCAB


class _WritesAFile:
    """Unpickling this would create a file: safe loading must refuse it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_code_is_refused(release, tmp_path):
    d = copy_release(release, tmp_path)
    marker = str(tmp_path / "code_ran")
    shard = os.path.join(d, "pytorch_model-00001-of-00003.bin")
    state = torch.load(shard, weights_only=True)
    state["model.norm.weight"] = _WritesAFile(marker)
    torch.save(state, shard)
    with pytest.raises(CheckpointError, match=r"pytorch_model-00001-of-00003\.bin: not a weights-only"):
        load_pretrained(d, device="cpu")
    assert not os.path.exists(marker)


def test_clip_checkpoint_is_the_same_bytes_for_the_same_tower(source, tmp_path):
    """The unused text tower written beside CLIP is seeded: merging one model twice gives identical files
    (and the global random stream is left as it was)."""
    model = source[0]
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = write_clip_checkpoint(model.vision_tower, str(tmp_path / "a"))
    assert torch.equal(torch.rand(1), expected_next)
    b = write_clip_checkpoint(model.vision_tower, str(tmp_path / "b"))
    for name in sorted(os.listdir(a)):
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name
