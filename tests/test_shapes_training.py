"""Training from scratch learns: a tiny SESAME, every part trained (`--train_all`) by the real
train_sesame.py on a reduced shapes world, merged by merge_lora_weights.py and evaluated by
test_sesame.py on held-out test images, must See and Segment clearly better than chance.

A falling loss alone could be faked by a broken pipeline; these scores cannot. Checked by breaking
the collate function on purpose: labels shifted by one token give balanced See 0.50 and mask IoU 0.0;
masks mirrored left-right (misaligned with their image) give mask IoU 0.001 (and See 0.53).

Not caught there: masks paired with the wrong [SEG] *of the same image*. In 200 steps the tiny model
learns to segment the image's shapes, not the one asked about: its IoU with the asked object equals
its IoU with the image's other object (printed as `other_object_iou`; 0.29 against 0.29, and 0.39
against 0.39 with two colours and two kinds), so swapping an image's masks changes nothing. The second
test catches it from a model that has that grounding: the shipped Shapes model, trained 20 more steps by
the same pipeline, keeps finding the object asked about (mask IoU 0.78, other object 0.14); with each
sample's masks in reverse order (collate broken on purpose) it loses it (0.16 against 0.16).
"""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cpu_deepspeed import cpu_process_group
from torch.autograd import DeviceType

import merge_lora_weights
import test_sesame
import train_sesame
from dataset.shapes.patches import patch_centres
from dataset.shapes.scene import SceneSpec
from dataset.shapes.world import WorldConfig, generate_world
from evaluation.records import read_shard, shard_path
from model.tiny import write_tiny_llava_base, write_tiny_sam
from utils import distributed as dist_utils
from utils.mask_io import decode_rle
from utils.sdpa import set_sdpa_backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "assets", "shapes_tokenizer")
SHIPPED = os.path.join(ROOT, "assets", "shapes_sesame")
# Two shapes per image, so that most training images carry two [SEG] masks to keep apart.
REDUCED = SceneSpec(min_shapes=2, max_shapes=2, kinds=("circle", "square", "triangle"),
                    colors=("red", "green", "blue", "yellow"), min_side=(112, 144), max_aspect=1.4)
# One answer per case: the model's first answer token decides See.
ANSWERS = {"short_answer": ["[SEG]."], "correct_answer": ["No, but there is {gt_name}."], "neg_answer": ["No."]}


@pytest.fixture
def one_thread():
    """One intra-op thread: on a small shared machine two threads per op can be several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    saved = {k: os.environ.get(k) for k in dist_utils.LAUNCH_ENV}
    yield
    torch.set_num_threads(threads)
    for k, v in saved.items():  # leave no launcher variables behind for other tests' subprocesses
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def held_out_scores(records) -> dict:
    """Balanced See accuracy (present / absent queries weigh the same), mean IoU of the predicted
    mask on present queries, the IoU a full-image mask would get there, and the predicted mask's IoU
    with the image's best-matching *other* object (a model that finds the object asked about scores
    below mask_iou there)."""
    present = [r for r in records if r.gt_exists]
    absent = [r for r in records if not r.gt_exists]
    objects: dict = {}  # image -> ref -> ground-truth mask
    for r in present:
        objects.setdefault(r.image_id, {})[r.ref_id] = decode_rle(r.gt_mask).astype(bool)
    ious, full, other = [], [], []
    for r in present:
        gt = objects[r.image_id][r.ref_id]
        pred = decode_rle(r.pred_mask).astype(bool) if r.pred_mask else np.zeros_like(gt)
        ious.append(iou(pred, gt))
        full.append(gt.mean())
        other += [max(iou(pred, m) for k, m in objects[r.image_id].items() if k != r.ref_id)] \
            if len(objects[r.image_id]) > 1 else []
    see = (np.mean([r.pred_exists for r in present]) + np.mean([not r.pred_exists for r in absent])) / 2
    return {"balanced_see": float(see), "mask_iou": float(np.mean(ious)), "full_mask_iou": float(np.mean(full)),
            "other_object_iou": float(np.mean(other)), "present": len(present), "absent": len(absent)}


def evaluate_held_out(model_dir, world, out, val_dataset: str, conv_type: str, max_new_tokens: int) -> dict:
    """test_sesame.py on the world's test split (CPU, fp32), then `held_out_scores` of its records."""
    assert test_sesame.main(["--pretrained_model_path", str(model_dir), "--dataset_dir", str(world), "--val_dataset",
                             val_dataset, "--split", "test", "--vis_save_path", str(out), "--device", "cpu",
                             "--precision", "fp32", "--conv_type", conv_type, "--max_new_tokens", str(max_new_tokens),
                             "--num_workers", "0", "--no_progress"]) == 0
    scores = held_out_scores(read_shard(shard_path(str(out), val_dataset, "test", 0, 1)))
    print(scores)
    return scores


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_training_from_scratch_learns_to_see_and_segment(tmp_path, one_thread):
    world, start, runs = tmp_path / "world", tmp_path / "start", tmp_path / "runs"
    # plain false premises, as before the full world's relation and order forms: with those, one CI run
    # of these 200 steps ended at balanced See 0.50 (another passed), too close to call for a check
    generate_world(str(world), WorldConfig(images=360, seed=0, val_fraction=0.0, test_fraction=0.2, scene=REDUCED,
                                           premise_forms=()), workers=2)
    write_tiny_llava_base(str(start), seed=0, preset="tiny", tokenizer_dir=TOKENIZER)
    write_tiny_sam(str(start / "sam.pth"), seed=0, preset="tiny")
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(ANSWERS))

    with cpu_process_group():  # on any host, as CI runs it
        train_sesame.main([
            "--version", str(start), "--vision_pretrained", str(start / "sam.pth"), "--dataset_dir", str(world),
            "--dataset", "refer_seg||correct_refer_seg", "--sample_rates", "1,3", "--refer_seg_data", "refcoco",
            "--correct_refer_seg_data", "fprefcoco", "--templates", str(answers), "--train_all", "--precision",
            "fp32", "--epochs", "1", "--steps_per_epoch", "200", "--batch_size", "8", "--lr", "5e-3",
            "--warmup_steps", "10", "--num_classes_per_sample", "6",
            "--workers", "1", "--no_eval", "--no-gradient_checkpointing", "--log_base_dir", str(runs),
            "--exp_name", "shapes", "--logger", "none", "--no_progress", "--print_freq", "50"])
    merged = tmp_path / "merged"
    merge_lora_weights.main(["--ckpt_dir", str(runs / "shapes" / "ckpt_model"), "--save_path", str(merged),
                             "--dtype", "bf16", "--safe_serialization"])  # as the shipped checkpoint
    assert json.loads((merged / "config.json").read_text())["vision_tower"] == "vision_tower"  # trained CLIP, beside
    assert (merged / "model.safetensors").exists() and (merged / "vision_tower" / "model.safetensors").exists()

    scores = evaluate_held_out(merged, world, tmp_path / "eval", "fprefcoco", "llava_v1", max_new_tokens=16)
    assert scores["present"] >= 100 and scores["absent"] >= 50
    assert scores["balanced_see"] >= 0.7, scores  # chance: 0.5 (seen: 0.82-0.92 over five seeds)
    assert scores["mask_iou"] >= max(0.15, 4 * scores["full_mask_iou"]), scores  # blank 0, full ~0.03 (seen: 0.24-0.31)


def test_training_keeps_each_mask_with_its_seg(tmp_path, one_thread):
    """Fine-tuning the shipped model (which tells the objects of a picture apart) through the real
    pipeline must keep each [SEG] paired with its own object's mask: a pairing error within an image
    teaches it to segment the other objects in 20 steps."""
    world, runs = tmp_path / "world", tmp_path / "runs"
    generate_world(str(world), WorldConfig(images=160, seed=13, val_fraction=0.0, test_fraction=0.25), workers=2)
    with cpu_process_group():  # on any host, as CI runs it
        train_sesame.main([
            "--version", SHIPPED, "--dataset_dir", str(world), "--dataset", "refer_seg||correct_refer_seg",
            "--sample_rates", "1,1", "--refer_seg_data", "refcoco", "--correct_refer_seg_data", "fprefcoco",
            "--train_all", "--freeze_vision_tower", "--conv_type", "vicuna_v1", "--precision", "fp32", "--epochs",
            "1", "--steps_per_epoch", "20", "--batch_size", "2", "--lr", "2e-3", "--warmup_steps", "2",
            "--num_classes_per_sample", "6", "--workers", "1", "--no_eval", "--no-gradient_checkpointing",
            "--log_base_dir", str(runs), "--exp_name", "ft", "--logger", "none", "--no_progress"])
    merged = tmp_path / "merged"
    merge_lora_weights.main(["--ckpt_dir", str(runs / "ft" / "ckpt_model"), "--save_path", str(merged),
                             "--dtype", "bf16", "--safe_serialization"])
    scores = evaluate_held_out(merged, world, tmp_path / "eval", "refcoco", "vicuna_v1", max_new_tokens=32)
    assert scores["present"] >= 100
    assert scores["mask_iou"] >= 0.5, scores  # seen 0.78; masks reversed within each sample: 0.16
    assert scores["mask_iou"] >= 3 * scores["other_object_iou"], scores  # seen 0.14; reversed: 0.16


def test_shapes_step_benchmark_smoke(tmp_path, one_thread):
    """benchmarks/shapes_step.py: the GPU profile's code path runs on the CPU and its figures add up."""
    import importlib.util

    world, start = tmp_path / "world", tmp_path / "start"
    generate_world(str(world), WorldConfig(images=40, seed=0, val_fraction=0.0, test_fraction=0.2, scene=REDUCED))
    write_tiny_llava_base(str(start), seed=0, preset="tiny", tokenizer_dir=TOKENIZER)
    write_tiny_sam(str(start / "sam.pth"), seed=0, preset="tiny")
    spec = importlib.util.spec_from_file_location("shapes_step", os.path.join(ROOT, "benchmarks", "shapes_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with cpu_process_group():  # the CPU, as the docstring says, on any host
        r = bench.main(["--version", str(start), "--vision_pretrained", str(start / "sam.pth"), "--dataset_dir",
                        str(world), "--batch_size", "2", "--warmup", "1", "--steps", "1", "--profile_steps", "1",
                        "--workers", "0", "--", "--zero_stage", "0", "--sdpa_backends", "efficient,math"])
    set_sdpa_backends(())  # a process-wide torch setting: back to torch's default for the other tests
    assert r["zero_stage"] == 0  # flags after "--" reach train_sesame.py's parser (the recipe says 2)
    assert r["sdpa_backends"] == "efficient,math"
    assert set(r["phase_ms_synchronised"]) == {"to_device", "forward", "backward", "optimizer_step"}
    assert r["step_ms"] > 0 and r["images_per_s"] == pytest.approx(2000 / r["step_ms"])
    phases = r["aten_ops_per_phase"]
    assert phases["forward"] > 100 and phases["backward"] > 100 and phases["optimizer_step"] > 0
    assert sum(phases.values()) <= r["aten_ops_per_step"]
    # the forward finds the [SEG] states by boolean indexing: at least one host synchronisation
    assert r["host_syncs_per_step"]["aten::nonzero"] >= 1
    assert r["device_busy_ms_per_step"] is None  # CPU run
    # device time: kernels once, not again through the host operators that launched them
    kernel = SimpleNamespace(device_type=DeviceType.CUDA, is_user_annotation=False, self_device_time_total=3e5)
    host_op = SimpleNamespace(device_type=DeviceType.CPU, is_user_annotation=False, self_device_time_total=3e5)
    phase = SimpleNamespace(device_type=DeviceType.CUDA, is_user_annotation=True, self_device_time_total=9e5)
    assert bench.device_seconds([kernel, host_op, phase, kernel]) == pytest.approx(0.6)


def test_clip_probe_labels_line_up_with_the_pixels(tmp_path):
    """benchmarks/shapes_clip_probe.py: each patch's label is the object under its centre in CLIP's crop.
    Colour is in the raw pixels of a patch, so a probe on them must find it; labels shifted off their
    patches would fail that."""
    import importlib.util

    world, start = tmp_path / "world", tmp_path / "start"
    generate_world(str(world), WorldConfig(images=60, seed=0, val_fraction=0.0, test_fraction=0.3))
    write_tiny_llava_base(str(start), seed=0, preset="shapes", tokenizer_dir=TOKENIZER)
    spec = importlib.util.spec_from_file_location("probe", os.path.join(ROOT, "benchmarks", "shapes_clip_probe.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    xs, ys = patch_centres(200, 100, 140, 14)  # portrait: the crop keeps the middle rows
    assert len(xs) == 100 and (xs[0], ys[0]) == (5, 55) and (xs[-1], ys[-1]) == (95, 145)
    r = probe.main(["--dataset_dir", str(world), "--vision_tower", str(start / "vision_tower")])
    assert r["test_patches"] > 40
    assert r["colour"]["raw_pixels"] > 0.8 > r["colour"]["majority"]
    assert 0.0 <= r["kind"]["clip"] <= 1.0 and 0.0 < r["kind"]["majority"] < 1.0
    # every patch has a place: all 100 patches (a 10 x 10 grid) of each test image, each row equally often
    assert r["all_test_patches"] > 0 and r["all_test_patches"] % 100 == 0
    assert r["row"]["majority"] == r["column"]["majority"] == 0.1
    assert 0.0 <= r["row"]["clip"] <= 1.0 and 0.0 <= r["column"]["clip"] <= 1.0


def test_clip_pretraining_writes_a_model_that_loads_its_new_tower(tmp_path):
    """training/clip_pretrain.py: the tower trains on patch labels, goes back into a copy of the model in
    the released layout, and that copy loads it (not the source's tower, which its config named by an
    absolute path)."""
    from safetensors.torch import load_file

    from model.builder import load_pretrained
    from model.tiny import write_tiny_released
    from training import clip_pretrain

    world, src, out = tmp_path / "world", tmp_path / "model", tmp_path / "model_clip"
    generate_world(str(world), WorldConfig(images=24, seed=0, val_fraction=0.0, test_fraction=0.25))
    write_tiny_released(str(src), llama_vocab=False, safe_serialization=True)
    r = clip_pretrain.main(["--dataset_dir", str(world), "--model", str(src), "--out", str(out), "--steps", "30",
                            "--batch_size", "4", "--lr", "3e-3", "--warmup_steps", "5", "--workers", "0",
                            "--print_freq", "10", "--eval_freq", "20", "--device", "cpu"])
    assert r["test"]["patches"] > 0 and 0.0 <= r["test"]["kind_accuracy"] <= 1.0
    assert r["losses"][-1] < r["losses"][0]
    old = load_file(str(src / "vision_tower" / "model.safetensors"))
    new = load_file(str(out / "vision_tower" / "model.safetensors"))
    key = "vision_model.embeddings.patch_embedding.weight"
    assert set(old) == set(new) and not torch.equal(old[key], new[key])
    assert json.loads((out / "config.json").read_text())["vision_tower"] == "vision_tower"
    loaded = load_pretrained(str(out), device="cpu", dtype=torch.float32)
    weights = {k: v for k, v in loaded.model.vision_tower.state_dict().items()
               if k.endswith("embeddings.patch_embedding.weight")}
    assert len(weights) == 1
    torch.testing.assert_close(next(iter(weights.values())), new[key].float())
    assert os.path.isfile(out / "vision_tower" / "preprocessor_config.json")
    # --vision_tower with --model: that tower trains and replaces the model's (here: out's tower, 1 more step)
    again = tmp_path / "model_clip2"
    clip_pretrain.main(["--dataset_dir", str(world), "--model", str(src), "--vision_tower", str(out / "vision_tower"),
                        "--out", str(again), "--steps", "1", "--batch_size", "2", "--lr", "1e-3", "--warmup_steps", "1",
                        "--workers", "0", "--device", "cpu"])
    newer = load_file(str(again / "vision_tower" / "model.safetensors"))[key]
    assert (newer.float() - new[key].float()).abs().max() < (newer.float() - old[key].float()).abs().max()
    with pytest.raises(SystemExit):
        clip_pretrain.main(["--dataset_dir", str(world), "--out", str(out)])  # neither --model nor --vision_tower


def test_clip_pretraining_teaches_where_each_patch_is(tmp_path):
    """--position_weight: the row and column heads learn each patch's place in the grid from the tower's
    features (8 x 8 here: chance 1/8; about 0.7 after these 150 steps; with the target off, the heads
    stay near chance, 0.12, and this test fails)."""
    from model.tiny import write_tiny_released
    from training import clip_pretrain

    world, src = tmp_path / "world", tmp_path / "model"
    generate_world(str(world), WorldConfig(images=24, seed=0, val_fraction=0.0, test_fraction=0.25))
    write_tiny_released(str(src), llama_vocab=False, safe_serialization=True)
    r = clip_pretrain.main(["--dataset_dir", str(world), "--model", str(src), "--out", str(tmp_path / "out"),
                            "--steps", "150", "--batch_size", "4", "--lr", "3e-3", "--warmup_steps", "5",
                            "--workers", "0", "--print_freq", "150", "--device", "cpu", "--position_weight", "1"])
    assert (r["test"]["row_accuracy"] + r["test"]["column_accuracy"]) / 2 > 0.5, r["test"]
