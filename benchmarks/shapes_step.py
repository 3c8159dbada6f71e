"""Where the time of a Shapes training step goes: train_sesame.py's own data, model and DeepSpeed
engine (the Shapes recipe of train_sesame.sh), timed phase by phase and profiled.

    python -m dataset.shapes /tmp/world --images 2000 --seed 0
    python -m model.tiny /tmp/start --llava_base --preset shapes --tokenizer assets/shapes_tokenizer
    python benchmarks/shapes_step.py --version /tmp/start --vision_pretrained /tmp/start/sam_shapes.pth \\
        --dataset_dir /tmp/world --batch_size 32 [-- train_sesame.py flags, e.g. --zero_stage 0]

Batches are drawn by the training data loader first and kept in memory, so data loading is not timed
(training logs it as train/data_wait_fraction). Prints:
  - each phase (batch to the device, forward, backward, optimizer step) with a device synchronisation
    after it: where the time would go if nothing overlapped;
  - the step as training runs it, without those synchronisations;
  - a torch.profiler window: the device's busy time per step (summed kernel time) against the step's
    wall time, host synchronisations per step (`aten::_local_scalar_dense`: .item(), bool(), .tolist();
    `aten::nonzero` and boolean indexing also wait for the device), and the operators with the most
    host time.
A device busy for a small part of the step means the step is bound by the host (Python, operator
dispatch, DeepSpeed's bookkeeping), not by the GPU.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time

import torch
from torch.autograd import DeviceType

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.args import parse_args as parse_train_args  # noqa: E402
from training.build import (  # noqa: E402
    build_model,
    data_from_args,
    engine_io,
    recipe_from_args,
    train_batches_from_args,
)
from training.engine import build_engine  # noqa: E402
from utils import distributed as dist_utils  # noqa: E402
from utils.sdpa import enabled_sdpa_backends  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")


def device_seconds(averages) -> float:
    """Kernels, copies and fills of a profile (its `key_averages()`), each counted once: the device-side
    entries only, as the table's "Self CUDA time total" sums them. Host operators carry their kernels'
    time as well; adding theirs counted it again (busy > 100 % of the step)."""
    return sum(e.self_device_time_total for e in averages
               if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e6


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--version", required=True, help="start point (python -m model.tiny DIR --llava_base ...)")
    p.add_argument("--vision_pretrained", default=None, help="SAM weights of a LLaVA-base start point")
    p.add_argument("--dataset_dir", required=True, help="a Shapes world (python -m dataset.shapes DIR)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=5, help="steps before timing (kernels, allocator, DeepSpeed)")
    p.add_argument("--steps", type=int, default=20, help="steps timed by phase, then as many without syncs")
    p.add_argument("--profile_steps", type=int, default=5)
    p.add_argument("--precision", default=None, choices=("bf16", "fp32"), help="default: bf16 on a GPU, else fp32")
    p.add_argument("--workers", type=int, default=4, help="data loader workers (drawing the batches only)")
    p.add_argument("--top", type=int, default=15, help="operators listed by host time")
    p.add_argument("--compile", action="store_true", help="train_sesame.py --compile (compiled blocks)")
    p.add_argument("--local_rank", type=int, default=-1)
    # after "--": train_sesame.py flags on top of the recipe's, e.g. -- --zero_stage 0
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:len(argv) - len(extra) - (1 if "--" in argv else 0)])
    args.train_flags = extra
    return args


def shapes_recipe_flags(version: str, dataset_dir: str) -> list[str]:
    """train_sesame.py's flags as train_sesame.sh's Shapes recipe gives them (read from its DRY_RUN
    print, so this benchmark follows the recipe wherever it changes)."""
    env = dict(os.environ, DRY_RUN="1", VERSION=version, DATASET_DIR=dataset_dir, PYTHON=sys.executable)
    out = subprocess.run(["bash", os.path.join(ROOT, "train_sesame.sh"), "Shapes", "localhost:0", "0"], env=env,
                         capture_output=True, text=True, check=True).stdout
    argv = shlex.split([line for line in out.splitlines() if "train_sesame.py" in line][-1])
    return argv[next(k for k, a in enumerate(argv) if a.endswith("train_sesame.py")) + 1:]


def device_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    args = parse_args(argv)
    dist_utils.ensure_launch_env(args.local_rank)
    dist_utils.default_cuda_arch_list()
    dist_utils.init_distributed()
    device = dist_utils.accelerator_device()
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    n_batches = args.warmup + 2 * args.steps + args.profile_steps
    # the recipe's flags, then this benchmark's (argparse keeps the last value of a flag)
    train_argv = [*shapes_recipe_flags(args.version, args.dataset_dir), "--batch_size", str(args.batch_size),
                  "--precision", precision, "--workers", str(args.workers), "--epochs", "1",
                  "--steps_per_epoch", str(n_batches), "--warmup_steps", "1", "--log_base_dir", "/tmp/shapes_step",
                  "--no_eval"]
    if args.vision_pretrained:
        train_argv += ["--vision_pretrained", args.vision_pretrained]
    if args.compile:
        train_argv.append("--compile")
    train_argv += args.train_flags
    targs = parse_train_args(train_argv)
    torch.manual_seed(targs.seed)
    data = data_from_args(targs)
    loaded = build_model(targs, device)
    engine = build_engine(loaded.model, recipe_from_args(targs, device))
    to_device = engine_io(engine)
    batches = list(train_batches_from_args(targs, data, loaded)(0, n_batches))
    engine.train()

    from torch.profiler import ProfilerActivity, profile, record_function

    def step(batch, phases=None):
        marks = [time.perf_counter()]

        def mark():
            if phases is not None:
                device_sync(device)
                marks.append(time.perf_counter())

        with record_function("phase:to_device"):
            batch = to_device(batch)
        mark()
        with record_function("phase:forward"):
            out = engine(batch)
        mark()
        with record_function("phase:backward"):
            engine.backward(out.loss)
        mark()
        with record_function("phase:optimizer_step"):
            engine.step()
        mark()
        if phases is not None:
            for name, a, b in zip(("to_device", "forward", "backward", "optimizer_step"), marks, marks[1:]):
                phases.setdefault(name, []).append(b - a)

    queue = iter(batches)
    for _ in range(args.warmup):
        step(next(queue))
    device_sync(device)

    phases: dict[str, list[float]] = {}
    for _ in range(args.steps):
        step(next(queue), phases)

    device_sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(next(queue))
    device_sync(device)
    step_s = (time.perf_counter() - t0) / args.steps

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    device_sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.profile_steps):
            step(next(queue))
        device_sync(device)
        profiled_step_s = (time.perf_counter() - t0) / args.profile_steps
    averages = prof.key_averages()
    per_step = 1.0 / args.profile_steps
    device_busy_s = None
    if device.type == "cuda":
        device_busy_s = device_seconds(averages) * per_step
    syncs = {name: sum(e.count for e in averages if e.key == name) * per_step for name in SYNC_OPS}
    aten_ops = sum(e.count for e in averages if e.key.startswith("aten::")) * per_step
    events = prof.events()
    host_aten = [e for e in events if e.name.startswith("aten::") and e.device_type != DeviceType.CUDA]
    ops_per_phase: dict[str, float] = {}
    for p in (e for e in events if e.name.startswith("phase:")):  # host operators inside each phase
        inside = sum(1 for e in host_aten if e.thread == p.thread and p.time_range.start <= e.time_range.start
                     and e.time_range.end <= p.time_range.end)
        ops_per_phase[p.name[6:]] = ops_per_phase.get(p.name[6:], 0.0) + inside * per_step

    phase_ms = {k: 1e3 * statistics.mean(v) for k, v in phases.items()}
    result = {"train_flags": " ".join(args.train_flags), "zero_stage": engine.zero_optimization_stage(),
              "sdpa_backends": ",".join(enabled_sdpa_backends()),
              "device": str(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu",
              "precision": precision, "compiled": args.compile, "batch_size": args.batch_size,
              "conversations_per_step": statistics.mean(int(b.input_ids.shape[0]) for b in batches),
              "phase_ms_synchronised": phase_ms, "phases_sum_ms": sum(phase_ms.values()),
              "step_ms": 1e3 * step_s, "images_per_s": args.batch_size / step_s,
              "profiled_step_ms": 1e3 * profiled_step_s,
              "device_busy_ms_per_step": None if device_busy_s is None else 1e3 * device_busy_s,
              "device_busy_fraction": None if device_busy_s is None else device_busy_s / profiled_step_s,
              "host_syncs_per_step": syncs, "aten_ops_per_step": aten_ops, "aten_ops_per_phase": ops_per_phase}
    if dist_utils.is_main():
        print(averages.table(sort_by="self_cpu_time_total", row_limit=args.top))
        for k, v in result.items():
            print(f"{k}: {v}")
    return result


if __name__ == "__main__":
    main()
