"""Factories from train_sesame.py's flags: the model, the data stream, the validation."""
from __future__ import annotations

import argparse
import functools
from typing import Callable, Optional

import torch

from model.batch import SesameBatch
from model.config import LoraConfig, LossConfig
from model.lora import apply_lora, enable_gradient_checkpointing, set_trainable
from model.sasp import sasp_config_from_args
from utils import distributed as dist_utils

from .data_stream import private_generator, samples_needed, stream_loader
from .deepspeed_config import DeepSpeedRecipe
from .engine import DTYPES, uses_ds_optimizer
from .loop import LoopConfig
from .validate import draw_queries, reduce_metrics, see_metrics, segment_metrics, shard


def build_model(args: argparse.Namespace, device: torch.device):
    """The start point with LoRA applied (not with --train_all) and the trainable split set; returns
    model.builder.LoadedSesame.

    Under ZeRO-3 the model is built on the CPU and DeepSpeed partitions it onto the GPUs.
    """
    from model.builder import build_for_training

    build_device = "cpu" if args.zero_stage == 3 else str(device)
    loaded = build_for_training(args.version, vision_pretrained=args.vision_pretrained, vision_tower=args.vision_tower,
                                dtype=DTYPES[args.precision], device=build_device,
                                out_dim=args.out_dim, train_mask_decoder=args.train_mask_decoder)
    model = loaded.model
    cfg = model.config
    # READ: a READ checkpoint brings SasP, --use_sasp adds it (e.g. fine-tuning from SESAME), the knob
    # flags tune it; SasP has no weights, so setting it after the build is exact.
    cfg.sasp = sasp_config_from_args(args, cfg.sasp)
    cfg.lora = LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                          target_modules=tuple(args.lora_target_modules))
    cfg.loss = LossConfig(ce_loss_weight=args.ce_loss_weight, bce_loss_weight=args.bce_loss_weight,
                          dice_loss_weight=args.dice_loss_weight)
    cfg.train_mask_decoder = args.train_mask_decoder
    cfg.use_mm_start_end = args.use_mm_start_end
    if not args.train_all:
        apply_lora(model)
        adapted = [n for n, _ in model.named_parameters() if "lora_A" in n]
        unmatched = [t for t in cfg.lora.target_modules if not any(f".{t}.lora_A" in n for n in adapted)]
        if unmatched:
            raise ValueError(f"--lora_target_modules {','.join(unmatched)} matched no attention projection of the "
                             "LLM (LoRA goes on LLaMA's self_attn q_proj/k_proj/v_proj/o_proj)")
    set_trainable(model, train_all=args.train_all)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    return loaded


def recipe_from_args(args: argparse.Namespace, device: torch.device) -> DeepSpeedRecipe:
    return DeepSpeedRecipe(micro_batch_size=args.batch_size, grad_accumulation_steps=args.grad_accumulation_steps,
                           lr=args.lr, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay,
                           total_steps=args.epochs * args.steps_per_epoch, warmup_steps=args.warmup_steps,
                           gradient_clipping=args.gradient_clipping, precision=args.precision,
                           zero_stage=args.zero_stage, offload_optimizer=args.offload_optimizer,
                           offload_param=args.offload_param,
                           ds_optimizer=uses_ds_optimizer(device, args.offload_optimizer))


def loop_config_from_args(args: argparse.Namespace) -> LoopConfig:
    return LoopConfig(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                      grad_accumulation_steps=args.grad_accumulation_steps, print_freq=args.print_freq,
                      save_steps=args.save_steps, no_eval=args.no_eval, best_metric=args.best_metric)


def collate_from_args(args: argparse.Namespace, tokenizer) -> Callable:
    from dataset.collate import collate_fn

    return functools.partial(collate_fn, tokenizer=tokenizer, model_max_length=args.model_max_length,
                             conv_template=args.conv_type, use_mm_start_end=args.use_mm_start_end)


def train_batches_from_args(args: argparse.Namespace, loaded) -> Callable[[int, int], object]:
    """batches(start, stop): this rank's collated micro-batches for micro-steps [start, stop)."""
    from dataset.hybrid import HybridDataset

    world = dist_utils.world_size()
    dataset = HybridDataset(
        args.dataset_dir, loaded.tokenizer, loaded.clip_transform, loaded.sam_transform,
        datasets=args.dataset, sample_rates=args.sample_rates, refer_seg_data=args.refer_seg_data,
        neg_refer_seg_data=args.neg_refer_seg_data, correct_refer_seg_data=args.correct_refer_seg_data,
        vqa_data=args.vqa_data, reason_seg_data=args.reason_seg_data, sem_seg_data=args.sem_seg_data,
        num_classes_per_sample=args.num_classes_per_sample, seed=args.seed, templates=args.templates,
        conv_template=args.conv_type,
        # One numbered stream for the whole run (see training/data_stream.py).
        samples_per_epoch=samples_needed(args.epochs, args.steps_per_epoch, args.grad_accumulation_steps,
                                         args.batch_size, world))
    collate = collate_from_args(args, loaded.tokenizer)
    rank = dist_utils.rank()
    return lambda start, stop: stream_loader(dataset, collate, start, stop, rank, world, args.batch_size, args.workers)


def engine_io(engine) -> Callable[[SesameBatch], SesameBatch]:
    device = engine.device
    dtype = next(p for p in engine.module.parameters() if p.is_floating_point()).dtype
    return lambda batch: batch.to(device, dtype)


def validation_from_args(args: argparse.Namespace, loaded, engine) -> Optional[Callable[[], dict]]:
    """validate() -> metrics (the same on every rank), or None with --no_eval.

    gIoU/cIoU: teacher-forced over a seeded draw of --val_samples positive queries of --val_dataset.
    See: greedy generation over a seeded draw of --val_see_samples queries of --val_see_dataset
    (skipped with a note when its files are absent, and under ZeRO-3, whose collective parameter
    gathering cannot follow answers of different lengths on different ranks).
    """
    if args.no_eval:
        return None
    from torch.utils.data import DataLoader

    from dataset.eval_sets import build_eval_dataset, teacher_forced_samples
    from dataset.image_io import DatasetFileError, read_image_rgb

    rank, world = dist_utils.rank(), dist_utils.world_size()
    equal = args.zero_stage == 3
    seg_images = []
    for name in split_names(args.val_dataset):
        try:
            seg_images += build_eval_dataset(name, args.dataset_dir, args.val_split, seed=args.seed,
                                             templates=args.templates)
        except DatasetFileError as e:
            raise DatasetFileError(f"validation set {name!r} ({args.val_split}): {e}. Choose the sets with "
                                   "--val_dataset/--val_split, or train without validation (--no_eval)") from e
    if not seg_images:
        raise ValueError(f"--val_dataset {args.val_dataset!r} split {args.val_split!r} has no images")
    seg_items = shard(draw_queries(seg_images, args.val_samples, args.seed, positives_only=True), rank, world, equal)
    see_items = []
    if args.val_see_dataset and args.zero_stage == 3:
        _log("validation: See accuracy is skipped under ZeRO-3")
    elif args.val_see_dataset:
        try:
            see_images = build_eval_dataset(args.val_see_dataset, args.dataset_dir, args.val_split, seed=args.seed,
                                            templates=args.templates)
        except DatasetFileError as e:
            _log(f"validation: See accuracy skipped, {args.val_see_dataset} is not available ({e})")
            see_images = []
        see_items = shard(draw_queries(see_images, args.val_see_samples, args.seed, positives_only=False), rank, world)
    seg_set = teacher_forced_samples(seg_items, loaded.clip_transform, loaded.sam_transform, templates=args.templates,
                                     seed=args.seed, conv_template=args.conv_type)
    seg_loader = DataLoader(seg_set, batch_size=args.val_batch_size, shuffle=False,
                            collate_fn=collate_from_args(args, loaded.tokenizer), num_workers=min(args.workers, 2),
                            generator=private_generator())
    to_device = engine_io(engine)

    def load_inputs(image):
        rgb = read_image_rgb(image.image_path, image.dataset or "validation")
        sam = loaded.sam_transform(rgb)
        return loaded.clip_transform(rgb)[None], sam.pixels[None], sam.resized_size, sam.original_size

    tok_ids = loaded.token_ids

    def validate() -> dict:
        was_training = engine.module.training
        engine.eval()
        try:
            seg = segment_metrics(engine, seg_loader, to_device)
            see = see_metrics(engine.module, see_items, load_inputs, loaded.tokenizer, args.conv_type,
                              args.val_max_new_tokens, tok_ids.eos, tok_ids.pad) if see_items else None
        finally:
            if was_training:
                engine.train()
        return reduce_metrics(seg, see)

    return validate


def split_names(value: str) -> list[str]:
    return [n.strip() for n in value.split("||") if n.strip()]


def _log(msg: str) -> None:
    if dist_utils.is_main():
        print(msg, flush=True)
