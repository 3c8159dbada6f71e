"""Training-step benchmark: the real DeepSpeed step of train_sesame.py at full size.

LLaMA-7B + CLIP ViT-L/14-336 + SAM ViT-H with random bf16 weights built on the GPU, LoRA and the
trainable split as in training, gradient checkpointing, ZeRO-2 with DeepSpeed's AdamW, bf16,
per-GPU batch 12 images x 3 conversations (the original recipe), text lengths like the SESAME
templates. Prints step time, samples/s, peak GPU memory and the model FLOPs utilisation (MFU) of
the LLM part. Batches are built in memory: this measures the model step, not data loading
(benchmarks/data_throughput.py covers that).

    python benchmarks/train_step.py                         # one GPU
    deepspeed --num_gpus 2 benchmarks/train_step.py         # two GPUs (same per-GPU batch)
    python benchmarks/train_step.py --tiny                  # CPU smoke check (tiny model, fp32)

The optimizer is train_sesame.py's: torch's fused AdamW, or DeepSpeed's JIT-built FusedAdam with --ds_fused_adam.
The whole training script on 2 GPUs (data, validation, checkpoints, merge), with a tiny model:
    python -m dataset.synthetic /tmp/data && python -m model.tiny /tmp/tiny
    deepspeed --num_gpus 2 train_sesame.py --version /tmp/tiny --dataset_dir /tmp/data --epochs 2 \
        --steps_per_epoch 10 --batch_size 4 --exp_name two_gpus
    bash merge_lora_weight.sh runs/two_gpus/ckpt_model /tmp/m

MFU counts the LLM's model FLOPs per step (gradient-checkpoint recomputation not counted):
  frozen-aware: forward 2*N + input-gradient 2*N per token (the base weights are frozen, so no
                weight gradients), attention 3 x 4*T*d per token per layer, lm_head at supervised
                positions 3 x 2*V*d (it is trained);
  6N convention: 6*N per token + 3 x 4*T*d attention per token per layer (what most MFU figures use);
with N = linear parameters of the decoder layers, T = sequence length after the image splice,
d = hidden size; per GPU, divided by the whole step time (CLIP, SAM, mask decoder and optimizer
included) x the GPU's dense bf16 peak (--peak_tflops; H100/H200 SXM: 989 TFLOP/s).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.batch import SesameBatch  # noqa: E402
from model.config import SesameConfig  # noqa: E402
from model.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from model.lora import apply_lora, enable_gradient_checkpointing, set_trainable  # noqa: E402
from model.sesame import SesameModel  # noqa: E402
from training.build import compile_blocks  # noqa: E402
from training.deepspeed_config import DeepSpeedRecipe  # noqa: E402
from training.engine import build_engine, uses_ds_optimizer  # noqa: E402
from utils import distributed as dist_utils  # noqa: E402
from utils.sdpa import enabled_sdpa_backends, parse_sdpa_backends, set_sdpa_backends  # noqa: E402

# Dense bf16 peak per GPU (no sparsity), TFLOP/s.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "H800": 989.0, "B200": 2250.0}
BOS, EOS = 1, 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke check of this script")
    p.add_argument("--batch_size", type=int, default=None, help="images per GPU (default 12; --tiny 2)")
    p.add_argument("--convs_per_image", type=int, default=3, help="conversations per image (num_classes_per_sample)")
    p.add_argument("--prompt_tokens", type=int, default=100,
                   help="text tokens before the answer (system + question; SESAME templates give ~90-110)")
    p.add_argument("--answer_tokens", type=int, default=14, help="answer tokens incl. [SEG] and </s>")
    p.add_argument("--length_jitter", type=int, default=0,
                   help="each batch's prompt length drawn from prompt_tokens +- this (training's lengths change "
                        "every step; cuDNN attention builds a plan per new length)")
    p.add_argument("--distinct_batches", type=int, default=2, help="batches cycled through")
    p.add_argument("--sdpa_backends", default="auto", help="as train_sesame.py's flag (utils/sdpa.py)")
    p.add_argument("--image_hw", type=int, nargs=2, default=(480, 640), help="original image size (masks)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--grad_accumulation_steps", type=int, default=1,
                   help="micro-batches per optimizer step (a step's figures cover all of them)")
    p.add_argument("--memory_cap_gib", type=float, default=None,
                   help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction), as a smaller card")
    p.add_argument("--zero_stage", type=int, default=2)
    p.add_argument("--offload_optimizer", action="store_true")
    p.add_argument("--offload_param", action="store_true", help="with --zero_stage 3")
    p.add_argument("--ds_fused_adam", action="store_true",
                   help="DeepSpeed's FusedAdam (JIT-built) instead of torch's fused AdamW, as train_sesame.py")
    p.add_argument("--no_gradient_checkpointing", action="store_true")
    p.add_argument("--checkpointed_layers", type=int, default=None,
                   help="as train_sesame.py's flag: only the first N decoder layers recompute (default: all)")
    p.add_argument("--compile", action="store_true", help="as train_sesame.py's flag (training.build.compile_blocks)")
    p.add_argument("--profile_steps", type=int, default=0,
                   help="after the timed steps, profile this many more and print the kernels that take the most "
                        "GPU time (torch.profiler)")
    p.add_argument("--precision", default=None, choices=("bf16", "fp32"), help="default bf16 (--tiny: fp32)")
    p.add_argument("--peak_tflops", type=float, default=None, help="GPU dense bf16 peak (default: from the name)")
    p.add_argument("--local_rank", type=int, default=-1)
    return p.parse_args(argv)


def build_model(cfg: SesameConfig, device: torch.device, dtype: torch.dtype) -> SesameModel:
    """Random weights built directly on the device, in `dtype` (SAM's positional Gaussian stays fp32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = SesameModel(cfg)
    finally:
        torch.set_default_dtype(previous)
    model._apply(lambda t: t)  # re-runs SesameModel's float32 rule for SAM's positional encoding
    return model


def run_step(engine, batches, i: int, accum: int):
    """One optimizer step of `accum` micro-batches (DeepSpeed updates the weights at the last one)."""
    for micro in range(accum):
        out = engine(batches[(i * accum + micro) % len(batches)])
        engine.backward(out.loss)
        engine.step()
    return out


def print_profile(step, steps: int, device: torch.device, rows: int = 25) -> None:
    """The kernels (and CPU-side operators) with the most GPU time over `steps` more steps, per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of {steps} step(s), sorted by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70), flush=True)


def make_batch(cfg: SesameConfig, args, seed: int) -> SesameBatch:
    """One per-GPU micro-batch: B images, each with `convs_per_image` single-turn conversations whose
    answer holds one [SEG]; a GT mask per [SEG] at the original image size."""
    g = torch.Generator().manual_seed(seed)
    b, k = args.batch_size, args.convs_per_image
    vocab_text, seg = cfg.seg_token_id, cfg.seg_token_id  # text ids below the three added tokens
    rows, labels = [], []
    jitter = args.length_jitter
    prompt_tokens = args.prompt_tokens + (int(torch.randint(-jitter, jitter + 1, (1,), generator=g)) if jitter else 0)
    for _ in range(b * k):
        before = torch.randint(3, vocab_text, (prompt_tokens,), generator=g).tolist()
        answer = torch.randint(3, vocab_text, (args.answer_tokens - 2,), generator=g).tolist()
        cut = 40  # "{system} USER: <im_start><image><im_end>\n{question} ASSISTANT:"
        ids = [BOS] + before[:cut] + [IMAGE_TOKEN_INDEX] + before[cut:] + answer + [seg, EOS]
        rows.append(ids)
        labels.append([IGNORE_INDEX] * (len(ids) - len(answer) - 2) + answer + [seg, EOS])
    length = max(map(len, rows))
    input_ids = torch.zeros((len(rows), length), dtype=torch.long)
    lab = torch.full_like(input_ids, IGNORE_INDEX)
    att = torch.zeros_like(input_ids, dtype=torch.bool)
    for r, (ids, y) in enumerate(zip(rows, labels)):
        input_ids[r, :len(ids)], lab[r, :len(y)], att[r, :len(ids)] = torch.tensor(ids), torch.tensor(y), True
    h, w = args.image_hw
    s = cfg.sam.image_size
    scale = s / max(h, w)
    resized = (int(h * scale + 0.5), int(w * scale + 0.5))
    masks = []
    for _ in range(b):
        m = torch.zeros((k, h, w), dtype=torch.uint8)
        for j in range(k):
            y0, x0 = int(torch.randint(0, h // 2, (1,), generator=g)), int(torch.randint(0, w // 2, (1,), generator=g))
            m[j, y0:y0 + h // 3, x0:x0 + w // 3] = 1
        masks.append(m)
    v = cfg.vision.image_size
    return SesameBatch(images_clip=torch.randn(b, 3, v, v, generator=g),
                       images_sam=torch.randn(b, 3, s, s, generator=g),
                       input_ids=input_ids, labels=lab, attention_mask=att,
                       offset=torch.arange(0, b * k + 1, k), masks=masks, resized_sizes=[resized] * b,
                       original_sizes=[(h, w)] * b)


def llm_flops(cfg: SesameConfig, batch: SesameBatch, num_patches: int) -> tuple[float, float]:
    """(frozen-aware, 6N-convention) model FLOPs of the LLM for one micro-batch, forward + backward."""
    llm = cfg.llm
    d, L, V = llm.hidden_size, llm.num_hidden_layers, llm.vocab_size
    kv = d * llm.num_key_value_heads // llm.num_attention_heads
    n_linear = L * (2 * d * d + 2 * d * kv + 3 * d * llm.intermediate_size)
    lengths = (batch.attention_mask.sum(1) + num_patches - 1).tolist()
    supervised = int((batch.labels != IGNORE_INDEX).sum())
    attention = sum(3 * 4 * L * t * t * d for t in lengths)
    tokens = sum(lengths)
    frozen_aware = 4 * n_linear * tokens + attention + 3 * 2 * V * d * supervised
    six_n = 6 * n_linear * tokens + attention
    return float(frozen_aware), float(six_n)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 2 if args.tiny else 12
    precision = args.precision or ("fp32" if args.tiny else "bf16")
    set_sdpa_backends(parse_sdpa_backends(args.sdpa_backends))
    dist_utils.default_cuda_arch_list()
    dist_utils.ensure_launch_env(args.local_rank)
    dist_utils.init_distributed()
    device = dist_utils.accelerator_device()
    world, main_rank = dist_utils.world_size(), dist_utils.is_main()
    if args.memory_cap_gib and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2 ** 30 / total), device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    cfg = SesameConfig.tiny(vocab_size=515) if args.tiny else SesameConfig.preset("llama-7b", "clip-l-336", "vit_h")
    cfg.seg_token_id = cfg.llm.vocab_size - 3  # [SEG] is the first of the three added tokens

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(cfg, device, dtype)
    apply_lora(model)
    trainable = set_trainable(model)
    if not args.no_gradient_checkpointing:
        enable_gradient_checkpointing(model, args.checkpointed_layers)
    if args.compile:
        compile_blocks(model)
    model.train()
    build_s = time.perf_counter() - t0
    n_trainable = sum(p.numel() for n, p in model.named_parameters() if n in set(trainable))
    n_all = sum(p.numel() for p in model.parameters())
    ds_optimizer = uses_ds_optimizer(device, args.offload_optimizer, args.ds_fused_adam)
    accum = args.grad_accumulation_steps
    engine = build_engine(model, DeepSpeedRecipe(
        micro_batch_size=args.batch_size, grad_accumulation_steps=accum, precision=precision,
        zero_stage=args.zero_stage,
        offload_optimizer=args.offload_optimizer, offload_param=args.offload_param, total_steps=10_000,
        ds_optimizer=ds_optimizer))
    num_patches = cfg.vision.num_patches
    batches = [make_batch(cfg, args, seed=1000 * dist_utils.rank() + i).to(device, dtype)
               for i in range(args.distinct_batches)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync()
        t = time.perf_counter()
        out = run_step(engine, batches, i, accum)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            losses.append(float(out.loss.detach().float()))
    step_s = statistics.median(times)
    if args.profile_steps and main_rank:
        print_profile(lambda i: run_step(engine, batches, i, accum), args.profile_steps, device)
    flops_frozen, flops_6n = (accum * sum(x) / len(batches)
                              for x in zip(*(llm_flops(cfg, b, num_patches) for b in batches)))
    peak = peak_tflops(device, args.peak_tflops)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    seq = (batches[0].attention_mask.sum(1) + num_patches - 1).float()
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": world,
        "model": "tiny" if args.tiny else "LLaMA-7B + CLIP-L/336 + SAM ViT-H",
        "parameters_B": n_all / 1e9,
        "trainable_M": n_trainable / 1e6,
        "build_s": build_s,
        "precision": precision,
        "zero_stage": args.zero_stage,
        "offload": ",".join(n for n, on in (("optimizer", args.offload_optimizer), ("param", args.offload_param)) if on)
        or "none",
        "optimizer": f"{'DeepSpeed' if ds_optimizer else 'torch'} AdamW in {type(engine.optimizer).__name__}",
        "gradient_checkpointing": not args.no_gradient_checkpointing,
        "checkpointed_layers": "none" if args.no_gradient_checkpointing else (
            "all" if args.checkpointed_layers is None else args.checkpointed_layers),
        "compiled_blocks": args.compile,
        "sdpa_backends": ",".join(enabled_sdpa_backends()),
        "row_lengths": sorted({int(b.attention_mask.sum(1).max()) for b in batches}),
        "images_per_gpu": args.batch_size,
        "grad_accumulation_steps": accum,
        "images_per_gpu_step": args.batch_size * accum,
        "conversations_per_gpu": args.batch_size * args.convs_per_image,
        "memory_cap_gib": args.memory_cap_gib,
        "mean_seq_len": float(seq.mean()),
        "step_s_median": step_s,
        "step_s_mean": statistics.mean(times),
        "step_s_min": min(times),
        "samples_per_s": args.batch_size * accum * world / step_s,
        "conversations_per_s": args.batch_size * accum * args.convs_per_image * world / step_s,
        "peak_gpu_mem_GiB": peak_mem,
        "llm_tflops_per_step_per_gpu_frozen_aware": flops_frozen / 1e12,
        "llm_tflops_per_step_per_gpu_6N": flops_6n / 1e12,
        "llm_achieved_tflops_per_gpu": flops_frozen / step_s / 1e12,
        "mfu_llm_frozen_aware": flops_frozen / step_s / (peak * 1e12) if peak else float("nan"),
        "mfu_llm_6N": flops_6n / step_s / (peak * 1e12) if peak else float("nan"),
        "peak_tflops_assumed": peak or float("nan"),
        "loss_first_last": (losses[0], losses[-1]),
    }
    if main_rank:
        print("\n| figure | value |\n|---|---|")
        for k, v in result.items():
            shown = f"{v:.4g}" if isinstance(v, float) else (f"{v[0]:.4f} / {v[1]:.4f}" if isinstance(v, tuple) else v)
            print(f"| {k} | {shown} |")
        print(f"\nstep times (s): {' '.join(f'{t:.3f}' for t in times)}", flush=True)
    return result


if __name__ == "__main__":
    main()
