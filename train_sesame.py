"""Train SESAME (or READ) with DeepSpeed.

    deepspeed --include localhost:0,1,2,3,4,5,6,7 --master_port 15990 train_sesame.py \\
        --version liuhaotian/llava-v1.5-7b --vision_pretrained sam_vit_h_4b8939.pth --dataset_dir ./data \\
        --dataset "refer_seg||correct_refer_seg||vqa||neg_refer_seg" --sample_rates 12,2,2,1 --exp_name sesame

Also runs as one process (`python train_sesame.py ...`) and under `torchrun`. Checkpoints go to
{log_base_dir}/{exp_name}/ckpt_model (latest, for resume) and ckpt_model_best; turn one into a
released-layout model with merge_lora_weight.sh. Flags: training/args.py.

Order: flags, then the data (names, folders, validation sets: seconds), then the model and DeepSpeed
(a minute or more), then resume. Bad input stops the run with one `error:` line (utils/errors.py).
"""
from __future__ import annotations

import functools
import os
import sys

import torch

from training.args import parse_args
from training.build import (
    build_model,
    data_from_args,
    engine_io,
    loop_config_from_args,
    recipe_from_args,
    train_batches_from_args,
    validation_from_args,
)
from training.checkpoints import RunCheckpoints, StreamLayout, TrainState, write_model_recipe
from training.deepspeed_config import optimizer_name
from training.engine import build_engine
from training.loop import LoopIO, run_training
from utils import distributed as dist_utils
from utils.errors import InputError, run_main
from utils.logging import open_sink


def log(msg: str) -> None:
    if dist_utils.is_main():
        print(msg, flush=True)


def main(argv=None) -> TrainState:
    args = parse_args(argv)
    dist_utils.ensure_launch_env(args.local_rank)
    dist_utils.default_cuda_arch_list()
    dist_utils.init_distributed()
    torch.manual_seed(args.seed)
    device = dist_utils.accelerator_device()
    world = dist_utils.world_size()
    try:  # the recipes check the values of their flags
        cfg, recipe = loop_config_from_args(args), recipe_from_args(args, device)
    except ValueError as e:
        raise InputError(str(e)) from e
    data = data_from_args(args)

    loaded = build_model(args, device)
    model = loaded.model
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    engine = build_engine(model, recipe)

    run_dir = os.path.join(args.log_base_dir, args.exp_name)
    checkpoints = RunCheckpoints(run_dir, functools.partial(
        write_model_recipe, config_dict=model.config.to_dict(), tokenizer=loaded.tokenizer),
        stream=StreamLayout(batch_size=args.batch_size, world_size=world,
                            grad_accumulation_steps=args.grad_accumulation_steps),
        allow_stream_change=args.allow_resume_mismatch, optimizer=optimizer_name(recipe))
    state = TrainState()
    if args.resume or args.auto_resume:
        resumed = checkpoints.resume(engine, args.resume)
        if resumed is not None:
            state = resumed
            log(f"resumed from {args.resume or checkpoints.path()} at step {state.global_step}")

    validate = validation_from_args(args, data, loaded, engine)
    if args.eval_only:
        metrics = validate()
        log("validation: " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in metrics.items()))
        state.validations.append({"step": state.global_step, **metrics})
        return state

    sink, logger_kind = open_sink(args.logger, run_dir, is_main=dist_utils.is_main(), start_step=state.global_step,
                                  project=args.wandb_project, run_name=args.wandb_run_name, config=vars(args),
                                  resume_id=state.logger_run_id)
    state.logger_run_id = sink.run_id or state.logger_run_id
    log(f"SESAME training: {n_train / 1e6:.2f}M of {n_all / 1e6:.1f}M parameters trainable | world size {world} | "
        f"{args.batch_size} images/GPU x {args.grad_accumulation_steps} accumulation x {world} GPUs = "
        f"{args.batch_size * args.grad_accumulation_steps * world} per step | {cfg.total_steps} steps | "
        f"precision {args.precision}, ZeRO-{args.zero_stage} | logger {logger_kind} | run dir {run_dir}")
    io = LoopIO(batches=train_batches_from_args(args, data, loaded), validate=validate, to_device=engine_io(engine),
                checkpoints=checkpoints, sink=sink, world_size=world, progress=not args.no_progress)
    try:
        state = run_training(engine, cfg, io, state)
    finally:
        sink.close()
    log(f"done at step {state.global_step}; latest checkpoint {checkpoints.path()}"
        + (f", best {args.best_metric}={state.best_score:.4f} at step {state.best_step}" if state.best_score is not None
           else ""))
    return state


if __name__ == "__main__":
    sys.exit(run_main(main))
