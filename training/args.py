"""Command-line flags of train_sesame.py: the original's names and defaults, plus what it lacked
(ZeRO-3 / offload, mid-epoch saves, logger choice, best-checkpoint metric, READ's SasP options).

Every flag is used; the original's ignored ones (`--vision-tower`, `--correct_refer_seg_data`,
`--conv_type`) are honoured here.
"""
from __future__ import annotations

import argparse

from model.sasp import add_sasp_arguments
from utils.errors import add_debug_flag
from utils.sdpa import parse_sdpa_backends

from .deepspeed_config import PRECISIONS
from .loop import BEST_METRICS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train SESAME (or READ) with DeepSpeed",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    on_off = argparse.BooleanOptionalAction

    g = p.add_argument_group("model")
    g.add_argument("--version", default="liuhaotian/llava-v1.5-7b",
                   help="start point: a LLaVA-1.5 base (hub id or dir, needs --vision_pretrained), a released "
                        "SESAME/READ checkpoint (fine-tuning), or tiny-random")
    g.add_argument("--vision_pretrained", default=None,
                   help="SAM ViT-H checkpoint (sam_vit_h_4b8939.pth); needed when --version is a LLaVA base")
    g.add_argument("--vision_tower", "--vision-tower", dest="vision_tower", default=None,
                   help="CLIP tower (hub id or dir); default: the one the --version config names")
    g.add_argument("--precision", default="bf16", choices=PRECISIONS)
    g.add_argument("--model_max_length", type=int, default=512)
    g.add_argument("--out_dim", type=int, default=None,
                   help="text_hidden_fcs output width; default: SAM's prompt width (256 for every released SAM)")
    g.add_argument("--train_mask_decoder", action=on_off, default=True)
    g.add_argument("--train_all", action="store_true",
                   help="train every part, as for a model trained from scratch: no LoRA (the --lora_* flags do not "
                        "apply), the LLM in full, CLIP, the projector and all of SAM (the released recipe freezes "
                        "CLIP, the projector, SAM's image and prompt encoders and the LLM base)")
    g.add_argument("--freeze_vision_tower", action="store_true",
                   help="with --train_all: keep CLIP as loaded, as the released recipe does (e.g. a tower taught "
                        "the Shapes world by training.clip_pretrain, which the language loss alone would not teach)")
    g.add_argument("--use_mm_start_end", action=on_off, default=True)
    g.add_argument("--gradient_checkpointing", action=on_off, default=True)
    g.add_argument("--checkpointed_layers", type=int, default=None,
                   help="with gradient checkpointing: only the first N of the LLM's decoder layers recompute their "
                        "activations, the rest keep them (faster where GPU memory allows; default: all, as the "
                        "original; an addition)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each repeated block (LLM decoder layers, CLIP and SAM encoder blocks): fused "
                        "elementwise work (7B on an H100: 2.73 -> 2.21 s a step; with --checkpointed_layers 20, "
                        "1.95 s). An addition, not in the original; the first steps pay the compilation")
    g.add_argument("--conv_type", default="llava_v1", choices=("llava_v1", "vicuna_v1"))
    g.add_argument("--sdpa_backends", default="auto",
                   help="attention kernels torch may use: 'auto' (torch's choice) or a comma list of "
                        "flash,efficient,cudnn,math (an addition, not in the original; see utils/sdpa.py)")

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_r", type=int, default=8)
    g.add_argument("--lora_alpha", type=int, default=16)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument("--lora_target_modules", default="q_proj,v_proj")

    g = p.add_argument_group("loss weights")
    g.add_argument("--ce_loss_weight", type=float, default=1.0)
    g.add_argument("--dice_loss_weight", type=float, default=0.5)
    g.add_argument("--bce_loss_weight", type=float, default=2.0)

    add_sasp_arguments(p)  # READ: --use_sasp --num_points --t_pos --t_neg --down_sample

    g = p.add_argument_group("data")
    g.add_argument("--dataset_dir", default="./data", help="the data root (layout: dataset/README.md)")
    g.add_argument("--dataset", default="refer_seg||correct_refer_seg||vqa||neg_refer_seg")
    g.add_argument("--sample_rates", default="12,2,2,1")
    g.add_argument("--sem_seg_data", default="ade20k||cocostuff||pascal_part||paco_lvis")
    g.add_argument("--refer_seg_data", default="refclef||refcoco||refcoco+||refcocog")
    g.add_argument("--neg_refer_seg_data", default="R-refcocog||R-refcoco||R-refcoco+")
    g.add_argument("--correct_refer_seg_data", default="fprefcoco||fprefcoco+||fprefcocog")
    g.add_argument("--vqa_data", default="llava_instruct_150k")
    g.add_argument("--reason_seg_data", default="ReasonSeg|train")
    g.add_argument("--num_classes_per_sample", type=int, default=3)
    g.add_argument("--templates", default=None, help="JSON file of question/answer template lists")
    g.add_argument("--seed", type=int, default=0, help="seeds the data stream, validation draws and init")
    g.add_argument("--workers", type=int, default=4)

    g = p.add_argument_group("validation")
    g.add_argument("--val_dataset", default="refcoco||refcoco+||refcocog",
                   help="teacher-forced gIoU/cIoU sets, joined by ||")
    g.add_argument("--val_see_dataset", default="fprefcoco",
                   help="false-premise set for See accuracy by greedy generation ('' to skip; skipped "
                        "with a note when its files are absent)")
    g.add_argument("--val_split", default="val")
    g.add_argument("--val_samples", type=int, default=3000, help="queries drawn (seeded) for gIoU/cIoU")
    g.add_argument("--val_see_samples", type=int, default=500, help="queries drawn (seeded) for See")
    g.add_argument("--val_batch_size", type=int, default=1)
    g.add_argument("--val_max_new_tokens", type=int, default=32)
    g.add_argument("--best_metric", default="giou", choices=BEST_METRICS)
    g.add_argument("--no_eval", action="store_true")
    g.add_argument("--eval_only", action="store_true")

    g = p.add_argument_group("schedule and optimiser")
    g.add_argument("--epochs", type=int, default=20)
    g.add_argument("--steps_per_epoch", type=int, default=500)
    g.add_argument("--batch_size", type=int, default=12, help="images per GPU per micro-step")
    g.add_argument("--grad_accumulation_steps", type=int, default=1)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.95)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--warmup_steps", type=int, default=100)
    g.add_argument("--gradient_clipping", type=float, default=1.0)
    g.add_argument("--zero_stage", type=int, default=2, choices=(0, 1, 2, 3))
    g.add_argument("--offload_optimizer", action="store_true", help="ZeRO-Offload of the optimizer to CPU")
    g.add_argument("--ds_fused_adam", action="store_true",
                   help="DeepSpeed's FusedAdam, as the original (JIT-built on first use: needs nvcc and ninja), "
                        "instead of torch's fused AdamW (the same update, nothing to compile)")
    g.add_argument("--offload_param", action="store_true", help="with --zero_stage 3: parameters offloaded to CPU")

    g = p.add_argument_group("run, checkpoints and logging")
    g.add_argument("--log_base_dir", default="./runs")
    g.add_argument("--exp_name", default="sesame_referseg")
    g.add_argument("--auto_resume", action=on_off, default=True,
                   help="continue from {log_base_dir}/{exp_name}/ckpt_model when it exists")
    g.add_argument("--resume", default=None, help="a DeepSpeed checkpoint directory to continue from")
    g.add_argument("--allow_resume_mismatch", action="store_true",
                   help="resume a checkpoint written with another --batch_size or --grad_accumulation_steps (refused "
                        "otherwise: the data stream then differs from the uninterrupted run's); the number of "
                        "processes must match in any case")
    g.add_argument("--save_steps", type=int, default=0,
                   help="also save the latest checkpoint every N steps (0: at the end of each epoch)")
    g.add_argument("--print_freq", type=int, default=3)
    g.add_argument("--logger", default="auto", choices=("auto", "wandb", "tensorboard", "none"))
    g.add_argument("--wandb_project", default="sesame")
    g.add_argument("--wandb_run_name", default=None, help="default: --exp_name")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    g.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    add_debug_flag(g)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.no_eval and args.eval_only:
        p.error("--no_eval and --eval_only contradict each other")
    if args.val_batch_size < 1 or args.batch_size < 1:
        p.error("--batch_size and --val_batch_size must be >= 1")
    if args.best_metric == "see" and not args.val_see_dataset:
        p.error("--best_metric see needs a --val_see_dataset")
    if args.train_all and not args.train_mask_decoder:
        p.error("--train_all trains every part, the mask decoder too: drop --no-train_mask_decoder")
    if args.freeze_vision_tower and not args.train_all:
        p.error("--freeze_vision_tower applies to --train_all (the released recipe freezes CLIP already)")
    args.lora_target_modules = tuple(m.strip() for m in args.lora_target_modules.split(",") if m.strip())
    if not args.lora_target_modules:
        p.error("--lora_target_modules is empty")
    args.wandb_run_name = args.wandb_run_name or args.exp_name
    try:
        args.sdpa_backends = parse_sdpa_backends(args.sdpa_backends)
    except ValueError as e:
        p.error(str(e))
    return args
