"""Factories from train_sesame.py's flags: the data (first), the model, the data stream, the validation.

The data side is built before the model: dataset names, folders, annotation files and the
validation sets are checked in seconds, not after the minute the model and DeepSpeed take.
"""
from __future__ import annotations

import argparse
import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch

from model.batch import SesameBatch
from model.config import LoraConfig, LossConfig
from model.lora import apply_lora, enable_gradient_checkpointing, set_trainable
from model.sasp import sasp_config_from_args
from utils import distributed as dist_utils
from utils.errors import InputError, one_line
from utils.sdpa import set_sdpa_backends

from .data_stream import private_generator, samples_needed, stream_loader
from .deepspeed_config import DeepSpeedRecipe
from .engine import DTYPES, uses_ds_optimizer
from .loop import LoopConfig
from .validate import draw_queries, reduce_metrics, see_metrics, segment_metrics, shard

if TYPE_CHECKING:
    from dataset.eval_sets import EvalImage
    from dataset.hybrid import HybridDataset


@dataclass
class RunData:
    """The data of a run, read before the model exists.

    train: the training mixture (None with --eval_only); built without image transforms, which
        depend on the model and are attached by `train_batches_from_args`.
    val_segment / val_see: this rank's share of the seeded validation draws (empty with --no_eval;
        val_see also when See is skipped).
    """

    train: Optional[HybridDataset]
    val_segment: list[EvalImage]
    val_see: list[EvalImage]


@contextmanager
def _reading(what: str) -> Iterator[None]:
    """The dataset package reports bad names and malformed files under the data root as ValueError
    (an empty file as EOFError). Raised while it indexes the data root, they are taken for the
    input's fault and said in one line naming the flags; the chained original, traceback included,
    shows with --debug."""
    try:
        yield
    except (ValueError, EOFError) as e:
        raise InputError(f"{what}: {one_line(e)}") from e


def data_from_args(args: argparse.Namespace) -> RunData:
    """Check and index the training mixture and the validation sets (no images are decoded)."""
    val_segment, val_see = ([], []) if args.no_eval else validation_images_from_args(args)
    train = None
    if not args.eval_only:
        from dataset.hybrid import HybridDataset

        with _reading(f"--dataset {args.dataset!r} under --dataset_dir {args.dataset_dir}"):
            train = HybridDataset(
                args.dataset_dir, None, None, None,
                datasets=args.dataset, sample_rates=args.sample_rates, refer_seg_data=args.refer_seg_data,
                neg_refer_seg_data=args.neg_refer_seg_data, correct_refer_seg_data=args.correct_refer_seg_data,
                vqa_data=args.vqa_data, reason_seg_data=args.reason_seg_data, sem_seg_data=args.sem_seg_data,
                num_classes_per_sample=args.num_classes_per_sample, seed=args.seed, templates=args.templates,
                conv_template=args.conv_type,
                # One numbered stream for the whole run (see training/data_stream.py).
                samples_per_epoch=samples_needed(args.epochs, args.steps_per_epoch, args.grad_accumulation_steps,
                                                 args.batch_size, dist_utils.world_size()))
    return RunData(train=train, val_segment=val_segment, val_see=val_see)


def validation_images_from_args(args: argparse.Namespace) -> tuple[list[EvalImage], list[EvalImage]]:
    """This rank's (segment, see) validation images: seeded draws of --val_samples positive queries
    of --val_dataset and --val_see_samples queries of --val_see_dataset.

    See is skipped with a note when its files are absent, and under ZeRO-3, whose collective
    parameter gathering cannot follow answers of different lengths on different ranks.
    """
    from dataset.eval_sets import build_eval_dataset
    from dataset.image_io import DatasetFileError

    rank, world = dist_utils.rank(), dist_utils.world_size()
    seg_images = []
    for name in split_names(args.val_dataset):
        try:
            with _reading(f"--val_dataset {name!r} ({args.val_split})"):
                seg_images += build_eval_dataset(name, args.dataset_dir, args.val_split, seed=args.seed,
                                                 templates=args.templates)
        except DatasetFileError as e:
            raise DatasetFileError(f"validation set {name!r} ({args.val_split}): {e}. Choose the sets with "
                                   "--val_dataset/--val_split, or train without validation (--no_eval)") from e
    if not seg_images:
        raise InputError(f"--val_dataset {args.val_dataset!r} split {args.val_split!r} has no images")
    seg_items = shard(draw_queries(seg_images, args.val_samples, args.seed, positives_only=True), rank, world,
                      equal=args.zero_stage == 3)
    if not args.val_see_dataset:
        return seg_items, []
    if args.zero_stage == 3:
        _log("validation: See accuracy is skipped under ZeRO-3")
        return seg_items, []
    try:
        with _reading(f"--val_see_dataset {args.val_see_dataset!r} ({args.val_split})"):
            see_images = build_eval_dataset(args.val_see_dataset, args.dataset_dir, args.val_split, seed=args.seed,
                                            templates=args.templates)
    except DatasetFileError as e:
        _log(f"validation: See accuracy skipped, {args.val_see_dataset} is not available ({e})")
        return seg_items, []
    return seg_items, shard(draw_queries(see_images, args.val_see_samples, args.seed, positives_only=False), rank,
                            world)


def build_model(args: argparse.Namespace, device: torch.device):
    """The start point with LoRA applied (not with --train_all) and the trainable split set; returns
    model.builder.LoadedSesame.

    Under ZeRO-3 the model is built on the CPU and DeepSpeed partitions it onto the GPUs.
    """
    from model.builder import build_for_training

    set_sdpa_backends(args.sdpa_backends)
    build_device = "cpu" if args.zero_stage == 3 else str(device)
    loaded = build_for_training(args.version, vision_pretrained=args.vision_pretrained, vision_tower=args.vision_tower,
                                dtype=DTYPES[args.precision], device=build_device,
                                out_dim=args.out_dim, train_mask_decoder=args.train_mask_decoder,
                                use_mm_start_end=args.use_mm_start_end)
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
    if cfg.use_mm_start_end != args.use_mm_start_end:  # a released start point keeps the prompt it was trained on
        _log(f"note: {args.version} was trained with use_mm_start_end={cfg.use_mm_start_end}; training and "
             f"validation keep it (--use_mm_start_end={args.use_mm_start_end} applies to a LLaVA base only)")
    if not args.train_all:
        apply_lora(model)
        adapted = [n for n, _ in model.named_parameters() if "lora_A" in n]
        unmatched = [t for t in cfg.lora.target_modules if not any(f".{t}.lora_A" in n for n in adapted)]
        if unmatched:
            raise InputError(f"--lora_target_modules {','.join(unmatched)} matched no attention projection of the "
                             "LLM (LoRA goes on LLaMA's self_attn q_proj/k_proj/v_proj/o_proj)")
    set_trainable(model, train_all=args.train_all, freeze_vision_tower=args.freeze_vision_tower)
    if args.gradient_checkpointing:
        try:
            enable_gradient_checkpointing(model, args.checkpointed_layers)
        except ValueError as e:
            raise InputError(f"--checkpointed_layers {args.checkpointed_layers}: {e}") from e
    if args.compile:
        compile_blocks(model)
    model.train()
    return loaded


def compile_blocks(model, backend: str = "inductor") -> int:
    """torch.compile, in place, every repeated block of the three towers: the LLM's decoder layers,
    CLIP's encoder layers and SAM's image-encoder blocks (sequence lengths vary by batch: dynamic
    shapes). The parameters and state-dict keys stay the same. Returns the number of blocks."""
    blocks = [*model.language_model.model.layers, *model.vision_tower.encoder.layers,
              *model.visual_model.image_encoder.blocks]
    for block in blocks:
        block.compile(dynamic=True, backend=backend)
    return len(blocks)


def recipe_from_args(args: argparse.Namespace, device: torch.device) -> DeepSpeedRecipe:
    return DeepSpeedRecipe(micro_batch_size=args.batch_size, grad_accumulation_steps=args.grad_accumulation_steps,
                           lr=args.lr, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay,
                           total_steps=args.epochs * args.steps_per_epoch, warmup_steps=args.warmup_steps,
                           gradient_clipping=args.gradient_clipping, precision=args.precision,
                           zero_stage=args.zero_stage, offload_optimizer=args.offload_optimizer,
                           offload_param=args.offload_param,
                           ds_optimizer=uses_ds_optimizer(device, args.offload_optimizer, args.ds_fused_adam))


def loop_config_from_args(args: argparse.Namespace) -> LoopConfig:
    return LoopConfig(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                      grad_accumulation_steps=args.grad_accumulation_steps, print_freq=args.print_freq,
                      save_steps=args.save_steps, no_eval=args.no_eval, best_metric=args.best_metric)


def collate_from_args(args: argparse.Namespace, loaded) -> Callable:
    """The collate function for the loaded model's tokenizer and prompt layout (its use_mm_start_end)."""
    from dataset.collate import collate_fn

    return functools.partial(collate_fn, tokenizer=loaded.tokenizer, model_max_length=args.model_max_length,
                             conv_template=args.conv_type, use_mm_start_end=loaded.model.config.use_mm_start_end)


def train_batches_from_args(args: argparse.Namespace, data: RunData, loaded) -> Callable[[int, int], object]:
    """batches(start, stop): this rank's collated micro-batches for micro-steps [start, stop)."""
    train = data.train
    train.clip_transform, train.sam_transform = loaded.clip_transform, loaded.sam_transform
    collate = collate_from_args(args, loaded)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    return lambda start, stop: stream_loader(train, collate, start, stop, rank, world, args.batch_size, args.workers)


def engine_io(engine) -> Callable[[SesameBatch], SesameBatch]:
    device = engine.device
    dtype = next(p for p in engine.module.parameters() if p.is_floating_point()).dtype
    return lambda batch: batch.to(device, dtype)


def validation_from_args(args: argparse.Namespace, data: RunData, loaded, engine) -> Optional[Callable[[], dict]]:
    """validate() -> metrics (the same on every rank), or None with --no_eval.

    gIoU/cIoU: teacher-forced over `data.val_segment`; See: greedy generation over `data.val_see`,
    prompted as the model was trained (its conversation template and use_mm_start_end).
    """
    if args.no_eval:
        return None
    from torch.utils.data import DataLoader

    from dataset.eval_sets import teacher_forced_samples
    from dataset.image_io import read_image_rgb
    from model.predictor import SesamePredictor

    seg_set = teacher_forced_samples(data.val_segment, loaded.clip_transform, loaded.sam_transform,
                                     templates=args.templates, seed=args.seed, conv_template=args.conv_type)
    seg_loader = DataLoader(seg_set, batch_size=args.val_batch_size, shuffle=False,
                            collate_fn=collate_from_args(args, loaded), num_workers=min(args.workers, 2),
                            generator=private_generator())
    to_device = engine_io(engine)
    # the reference backend: the engine's packing would replace parameters the optimizer holds
    predictor = SesamePredictor(loaded, conv_type=args.conv_type, max_new_tokens=args.val_max_new_tokens)

    def read_rgb(image):
        return read_image_rgb(image.image_path, image.dataset or "validation")

    def validate() -> dict:
        was_training = engine.module.training
        engine.eval()
        try:
            seg = segment_metrics(engine, seg_loader, to_device)
            see = see_metrics(predictor, data.val_see, read_rgb) if data.val_see else None
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
