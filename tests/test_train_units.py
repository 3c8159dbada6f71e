"""Training pieces that need no DeepSpeed engine: config, flags, data stream, metrics, logging."""
import json
import os

import numpy as np
import pytest
import torch

from training.args import parse_args
from training.data_stream import MicroBatchSampler, micro_batch_indices, samples_needed, stream_loader
from training.deepspeed_config import DeepSpeedRecipe, build_deepspeed_config
from training.loop import LoopConfig
from training.validate import SeeSums, SegmentSums, draw_queries, reduce_metrics, shard


def test_deepspeed_config_is_the_original_recipe():
    cfg = build_deepspeed_config(DeepSpeedRecipe())
    assert cfg["train_micro_batch_size_per_gpu"] == 12 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.0, "betas": [0.9, 0.95],
                                                             "eps": 1e-8}}
    assert cfg["scheduler"] == {"type": "WarmupDecayLR", "params": {
        "total_num_steps": 10_000, "warmup_min_lr": 0.0, "warmup_max_lr": 3e-4, "warmup_num_steps": 100,
        "warmup_type": "linear"}}
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["gradient_clipping"] == 1.0
    z = cfg["zero_optimization"]
    assert z == {"stage": 2, "contiguous_gradients": True, "overlap_comm": True, "reduce_scatter": True,
                 "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}


def test_deepspeed_config_small_gpu_options_and_errors():
    z3 = build_deepspeed_config(DeepSpeedRecipe(zero_stage=3, offload_optimizer=True, offload_param=True))
    z3 = z3["zero_optimization"]
    assert z3["stage"] == 3 and z3["offload_optimizer"]["device"] == "cpu" and z3["offload_param"]["device"] == "cpu"
    with pytest.raises(ValueError, match="offload_param"):
        DeepSpeedRecipe(zero_stage=2, offload_param=True)
    client = build_deepspeed_config(DeepSpeedRecipe(ds_optimizer=False, precision="fp32"))
    assert "optimizer" not in client and client["zero_force_ds_cpu_optimizer"] is False
    assert client["bf16"]["enabled"] is False
    with pytest.raises(ValueError, match="--precision"):
        DeepSpeedRecipe(precision="fp8")
    with pytest.raises(ValueError, match="offload"):
        DeepSpeedRecipe(offload_optimizer=True, ds_optimizer=False)


def test_optimizer_choice_needs_no_build_unless_asked():
    """torch's AdamW unless DeepSpeed's own op is needed (CPU offload) or asked for (--ds_fused_adam,
    GPUs only); each choice has the name checkpoints record."""
    from training.deepspeed_config import client_optimizer, optimizer_name
    from training.engine import uses_ds_optimizer

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert not uses_ds_optimizer(cpu, False) and not uses_ds_optimizer(gpu, False)
    assert uses_ds_optimizer(gpu, False, ds_fused_adam=True)
    assert uses_ds_optimizer(cpu, True) and uses_ds_optimizer(gpu, True)
    with pytest.raises(ValueError, match="--ds_fused_adam needs a GPU"):
        uses_ds_optimizer(cpu, False, ds_fused_adam=True)
    assert optimizer_name(DeepSpeedRecipe(ds_optimizer=False)) == "torch AdamW"
    assert optimizer_name(DeepSpeedRecipe()) == "DeepSpeed FusedAdam"
    assert optimizer_name(DeepSpeedRecipe(offload_optimizer=True)) == "DeepSpeedCPUAdam"
    r = DeepSpeedRecipe(lr=2e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, ds_optimizer=False)
    opt = client_optimizer([torch.nn.Parameter(torch.ones(3))], r)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (2e-3, (0.9, 0.95), 1e-8, 0.0)
    assert not group["fused"]  # fused only when every parameter is on a GPU
    assert not parse_args([]).ds_fused_adam and parse_args(["--ds_fused_adam"]).ds_fused_adam


def test_flags_keep_the_original_defaults():
    a = parse_args([])
    assert (a.version, a.precision, a.model_max_length, a.lora_r, a.lora_alpha, a.lora_dropout) == \
        ("liuhaotian/llava-v1.5-7b", "bf16", 512, 8, 16, 0.05)
    assert a.lora_target_modules == ("q_proj", "v_proj")
    assert (a.epochs, a.steps_per_epoch, a.batch_size, a.grad_accumulation_steps, a.lr) == (20, 500, 12, 1, 3e-4)
    assert (a.ce_loss_weight, a.dice_loss_weight, a.bce_loss_weight) == (1.0, 0.5, 2.0)
    assert a.gradient_checkpointing and a.train_mask_decoder and a.use_mm_start_end and a.auto_resume
    assert not a.no_eval and not a.eval_only
    assert a.dataset.split("||") == ["refer_seg", "correct_refer_seg", "vqa", "neg_refer_seg"]
    assert len(a.sample_rates.split(",")) == 4
    assert a.wandb_run_name == a.exp_name
    b = parse_args(["--no-gradient_checkpointing", "--vision-tower", "x/clip", "--local_rank=3"])
    assert not b.gradient_checkpointing and b.vision_tower == "x/clip" and b.local_rank == 3
    assert a.checkpointed_layers is None and parse_args(["--checkpointed_layers", "20"]).checkpointed_layers == 20
    with pytest.raises(SystemExit):
        parse_args(["--no_eval", "--eval_only"])


def test_attention_kernel_flag(capsys):
    from utils.sdpa import enabled_sdpa_backends, set_sdpa_backends

    assert parse_args([]).sdpa_backends == ()  # torch's own choice, as the original
    assert parse_args(["--sdpa_backends", "Flash, efficient,math"]).sdpa_backends == ("flash", "efficient", "math")
    for bad in ("flsh", ","):
        with pytest.raises(SystemExit):
            parse_args(["--sdpa_backends", bad])
        assert "--sdpa_backends" in capsys.readouterr().err
    try:
        set_sdpa_backends(("efficient", "math"))
        assert enabled_sdpa_backends() == ("efficient", "math")
        assert not torch.backends.cuda.cudnn_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    finally:
        set_sdpa_backends(())
    assert enabled_sdpa_backends() == ("flash", "efficient", "cudnn", "math")


def test_loop_config_rejects_bad_values():
    with pytest.raises(ValueError, match="best_metric"):
        LoopConfig(1, 1, 1, best_metric="loss")
    with pytest.raises(ValueError, match="steps_per_epoch"):
        LoopConfig(1, 0, 1)


def test_stream_indices_cover_each_sample_once_across_ranks_and_resume():
    world, batch, steps = 3, 2, 5
    seen = []
    for r in range(world):
        seen += [i for b in MicroBatchSampler(0, steps, r, world, batch) for i in b]
    assert sorted(seen) == list(range(samples_needed(1, steps, 1, batch, world)))
    # resuming at micro-step 3 continues exactly where the uninterrupted stream is
    full = list(MicroBatchSampler(0, steps, 1, world, batch))
    assert list(MicroBatchSampler(3, steps, 1, world, batch)) == full[3:]
    assert micro_batch_indices(3, 1, world, batch) == [20, 21]


def test_stream_loader_refuses_a_too_short_dataset():
    with pytest.raises(ValueError, match="samples_per_epoch"):
        stream_loader(list(range(10)), list, 0, 6, 0, 1, 2)
    loader = stream_loader(list(range(12)), list, 2, 6, 0, 1, 2)
    assert [b for b in loader] == [[4, 5], [6, 7], [8, 9], [10, 11]]


def test_iou_rules_match_lisa():
    gt = torch.tensor([[1, 1, 0, 255]], dtype=torch.uint8)  # the ignore pixel counts for neither I nor U
    sums = SegmentSums()
    logits = torch.tensor([[[5.0, -5.0, 5.0, 5.0]], [[-1.0, -1.0, -1.0, -1.0]]])
    sums.add_masks(logits, torch.stack([gt, torch.zeros_like(gt)]))  # second: empty vs empty -> IoU 1
    m = reduce_metrics(sums, SeeSums(correct=3, total=4))
    assert m["giou"] == pytest.approx((1 / (3 + 1e-5) + 1.0) / 2)
    assert m["ciou"] == pytest.approx(1 / 3) and m["num_masks"] == 2 and m["see"] == 0.75


def test_draw_queries_is_seeded_and_regroups_by_image():
    from dataset.eval_sets import EvalImage, EvalQuery

    def q(i, exists):
        return EvalQuery(ref_id=i, sent_id=i, sentence="s", question="<image>\nq", gt_exists=exists, gt_sent=None,
                         gt_mask=np.zeros((2, 2), np.uint8))
    images = [EvalImage(f"{k}.jpg", k, 2, 2, [q(10 * k + j, j != 1) for j in range(3)]) for k in range(6)]
    a = draw_queries(images, 5, seed=1, positives_only=True)
    b = draw_queries(images, 5, seed=1, positives_only=True)
    assert [(im.image_id, [x.sent_id for x in im.queries]) for im in a] == \
        [(im.image_id, [x.sent_id for x in im.queries]) for im in b]
    assert sum(len(im.queries) for im in a) == 5 and all(x.gt_exists for im in a for x in im.queries)
    assert [im.image_id for im in a] == sorted(im.image_id for im in a)
    assert sum(len(im.queries) for im in draw_queries(images, 100, 0, positives_only=False)) == 18
    assert shard(list(range(7)), 1, 3) == [1, 4] and shard(list(range(7)), 0, 3) == [0, 3, 6]
    assert shard(list(range(7)), 0, 3, equal=True) == [0, 3]


def test_logger_choice_and_jsonl(tmp_path, monkeypatch):
    from utils.logging import open_sink, resolve_logger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_logger("auto") == "tensorboard" and resolve_logger("wandb") == "none"
    sink, kind = open_sink("auto", str(tmp_path), is_main=True)
    sink.log({"train/loss": 1.5}, step=3)
    sink.close()
    assert kind == "tensorboard"
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "train/loss": 1.5}
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
    null, kind = open_sink("auto", str(tmp_path / "n"), is_main=False)
    assert kind == "none" and not (tmp_path / "n").exists()
    with pytest.raises(ValueError, match="--logger"):
        resolve_logger("mlflow")


def test_auto_logger_falls_back_to_tensorboard_without_wandb(monkeypatch):
    import sys

    from utils.logging import resolve_logger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails, as where it is not installed
    assert resolve_logger("auto") == "tensorboard"


def test_auto_logger_picks_offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is optional (requirements-extra); without it see the test above")
    from utils.logging import open_sink, resolve_logger

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_logger("auto") == "wandb"
    sink, kind = open_sink("auto", str(tmp_path / "w"), is_main=True, project="p", run_name="r")
    sink.log({"x": 1.0}, step=1)
    sink.close()
    assert kind == "wandb" and any(d.startswith("offline-run") for d in os.listdir(tmp_path / "w" / "wandb"))


def test_a_resumed_run_drops_what_an_earlier_attempt_logged_after_its_checkpoint(tmp_path, capsys):
    from utils.logging import JsonlSink

    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "train/loss": float(s)} for s in (1, 2, 3, 4)] + [{"step": 2, "val/giou": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "train/lo')  # torn by a kill
    sink = JsonlSink(str(path), start_step=2)
    sink.log({"train/loss": 30.0}, step=3)
    sink.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == \
        [records[0], records[1], records[4], {"step": 3, "train/loss": 30.0}]
    assert "dropped 3 records past step 2" in capsys.readouterr().out
    JsonlSink(str(path), start_step=3).close()  # nothing past step 3: the file stays as it is
    assert len(path.read_text().splitlines()) == 4


def test_logged_losses_are_on_the_original_scale():
    """The original logged ce_loss, mask_bce_loss and mask_dice_loss times their loss weights."""
    from types import SimpleNamespace

    from model.config import LossConfig
    from training.loop import LossMeter

    w = LossConfig(ce_loss_weight=1.5, bce_loss_weight=2.0, dice_loss_weight=0.5)
    meter = LossMeter(w)
    for ce, bce, dice in ((1.0, 0.2, 0.6), (3.0, 0.4, 1.0)):  # what the model returns: unweighted parts
        mask = w.bce_loss_weight * bce + w.dice_loss_weight * dice
        out = SimpleNamespace(loss=torch.tensor(w.ce_loss_weight * ce + mask), ce_loss=torch.tensor(ce),
                              mask_bce_loss=torch.tensor(bce), mask_dice_loss=torch.tensor(dice),
                              mask_loss=torch.tensor(mask))
        meter.add(out, samples=2)
    r = meter.report()
    assert r["train/ce_loss"] == pytest.approx(1.5 * 2.0) and r["train/unweighted/ce_loss"] == pytest.approx(2.0)
    assert r["train/mask_bce_loss"] == pytest.approx(2.0 * 0.3) and r["train/unweighted/mask_bce_loss"] == \
        pytest.approx(0.3)
    assert r["train/mask_dice_loss"] == pytest.approx(0.5 * 0.8)
    assert r["train/mask_loss"] == pytest.approx(r["train/mask_bce_loss"] + r["train/mask_dice_loss"])
    assert r["train/loss"] == pytest.approx(r["train/ce_loss"] + r["train/mask_loss"])


def test_a_resume_must_keep_the_data_stream_layout(tmp_path, capsys):
    from training.checkpoints import STREAM_FILE, RunCheckpoints, StreamLayout
    from utils.errors import InputError

    saved = StreamLayout(batch_size=12, world_size=8, grad_accumulation_steps=1)
    tag_dir = tmp_path / "ckpt_model" / "global_step10"
    tag_dir.mkdir(parents=True)
    (tmp_path / "ckpt_model" / "latest").write_text("global_step10")
    (tag_dir / STREAM_FILE).write_text(json.dumps({"batch_size": 12, "world_size": 8, "grad_accumulation_steps": 1}))

    def checkpoints(stream, allow=False):
        return RunCheckpoints(str(tmp_path), lambda d: None, stream, allow_stream_change=allow)

    checkpoints(saved)._check_stream(str(tag_dir))  # the same layout passes
    other = StreamLayout(batch_size=6, world_size=8, grad_accumulation_steps=2)
    with pytest.raises(InputError, match=r"--batch_size 12 \(now 6\), --grad_accumulation_steps 1 \(now 2\).*"
                                         "--allow_resume_mismatch"):
        checkpoints(other).resume(engine=None)  # refused before DeepSpeed reads anything
    for allow in (False, True):  # DeepSpeed cannot re-partition ZeRO state: refused even when allowed
        with pytest.raises(InputError, match="written by 8 processes and this run has 4.*resume with 8"):
            checkpoints(StreamLayout(batch_size=12, world_size=4, grad_accumulation_steps=1), allow).resume(None)
    checkpoints(other, allow=True)._check_stream(str(tag_dir))
    assert "the data stream differs" in capsys.readouterr().out
    (tag_dir / STREAM_FILE).unlink()  # a checkpoint without the record: continued, with a note
    checkpoints(other)._check_stream(str(tag_dir))
    assert "cannot be checked" in capsys.readouterr().out


def test_see_validation_prompts_as_the_model_was_trained(tokenizer, token_ids):
    """See's greedy prompts (through the predictor) wrap the image in <im_start>/<im_end> exactly when
    the model does."""
    from types import SimpleNamespace

    from dataset.eval_sets import EvalImage, EvalQuery
    from model.builder import LoadedSesame
    from model.predictor import SesamePredictor
    from model.tiny import tiny_model
    from model.transforms import ClipTransform, SamTransform
    from training.validate import see_metrics

    prompts = []

    class Backend:
        queries_per_batch = max_images_per_batch = 1

        def run(self, works, max_new_tokens):
            works = list(works)
            prompts.extend(p for w in works for p in w.prompts)
            return [[SimpleNamespace(exists=True) for _ in w.prompts] for w in works]

    query = EvalQuery(ref_id=1, sent_id=1, sentence="s", question="<image>\nWhere is s?", gt_exists=True,
                      gt_sent=None, gt_mask=np.zeros((2, 2), np.uint8))
    image = EvalImage("a.jpg", 1, 2, 2, [query])
    model = tiny_model(token_ids, len(tokenizer))
    loaded = LoadedSesame(model, tokenizer, ClipTransform(112), SamTransform(128))
    for use_mm_start_end in (True, False):
        prompts.clear()
        model.config.use_mm_start_end = use_mm_start_end
        predictor = SesamePredictor(loaded, conv_type="llava_v1", max_new_tokens=4, backend=Backend())
        sums = see_metrics(predictor, [image], lambda im: np.zeros((2, 2, 3), np.uint8))
        assert sums.total == sums.correct == 1
        assert (token_ids.im_start in prompts[0]) == use_mm_start_end


def test_data_left_out_is_counted_per_source(capsys):
    from types import SimpleNamespace

    from training.loop import DataCounts

    counts = DataCounts()
    counts.add(SimpleNamespace(meta={"skipped": {"refcoco": 2}, "truncated_rows": 1, "dropped_masks": 0}))
    counts.add(SimpleNamespace(meta={"skipped": {"refcoco": 1, "vqa": 4}, "truncated_rows": 0, "dropped_masks": 3}))
    assert counts.report(epoch=0) == {"skipped/refcoco": 3, "skipped/vqa": 4, "truncated_rows": 1, "dropped_masks": 3}
    assert "data left out" in capsys.readouterr().out


def test_merge_names_what_is_wrong_with_the_directory(tmp_path):
    from training.merge import read_model_recipe

    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_model_recipe(str(tmp_path / "nope"))
    (tmp_path / "run" / "ckpt_model").mkdir(parents=True)
    (tmp_path / "run" / "ckpt_model" / "sesame_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="run directory"):
        read_model_recipe(str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="not written by train_sesame.py"):
        read_model_recipe(str(tmp_path))


def test_cuda_arch_list_suffixes_are_reduced(monkeypatch):
    """DeepSpeed's op builder cannot parse '9.0a'; the launcher helper rewrites it."""
    from utils.distributed import default_cuda_arch_list
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a 9.0+PTX")
    default_cuda_arch_list()
    import os
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0;9.0+PTX"
