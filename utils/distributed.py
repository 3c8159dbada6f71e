"""Process-group helpers for single-process, `deepspeed`-launcher and `torchrun` runs.

Everything reads the state torch.distributed already keeps; nothing here holds state of its own.
"""
from __future__ import annotations

import os
import re
import socket

import torch
import torch.distributed as dist

# What a launcher (deepspeed, torchrun, mpirun through deepspeed) exports for every process.
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_launch_env(local_rank: int | None = None) -> None:
    """Fill in the launcher variables for a plain `python train_sesame.py` run (one process).

    A real launcher sets all of them; a half-set environment is a user error worth naming.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        missing = [k for k in LAUNCH_ENV if k not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but the launcher variables {missing} are "
                               "not set; start multi-process runs with `deepspeed` or `torchrun`")
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", str(local_rank if local_rank is not None and local_rank >= 0 else 0))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def default_cuda_arch_list() -> None:
    """DeepSpeed JIT-builds its fused ops (AdamW) for TORCH_CUDA_ARCH_LIST. When unset, set it to the
    GPU present (9.0 on H100/H200): what DeepSpeed would probe, but fixed before any worker process
    forks (DeepSpeed refuses to probe CUDA from a forked process). When set, arch-specific entries
    such as '9.0a' (which some CUDA images export) become '9.0': DeepSpeed's op builder reads each
    entry as MAJOR.MINOR[+PTX] and fails on the suffix."""
    current = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if current:
        entries = [e for e in re.split(r"[;\s]+", current) if e]
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(re.sub(r"^(\d+\.\d+)[a-z]+", r"\1", e) for e in entries)
    elif torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"


def init_distributed() -> None:
    """Start the process group through DeepSpeed (nccl on GPUs, gloo on CPU)."""
    import deepspeed

    ensure_launch_env()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_init_required=True)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (float64 on CPU for gloo and exact counts); returns a new tensor."""
    out = values.detach().to(torch.float64).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            out = out.cuda()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


def sum_counts(counts: dict[str, int]) -> dict[str, int]:
    """{name: count} summed over ranks (every rank gets the total)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return dict(counts)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(counts))
    total: dict[str, int] = {}
    for part in gathered:
        for k, v in part.items():
            total[k] = total.get(k, 0) + int(v)
    return total


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def accelerator_device() -> torch.device:
    """This process's device: its GPU under a launcher, or the CPU."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    acc.set_device(local_rank())
    return torch.device(acc.device_name(local_rank()))
