"""DeepSpeed on the CPU for the training tests, whatever the host has.

The training tests compare runs bit for bit (exact resume) and start two ranks on one machine; both
hold on the CPU (gloo, deterministic kernels) and not on one GPU (two ranks cannot share it under
NCCL, and GPU kernels are not bit-reproducible). So they choose the CPU explicitly: in this process
by DeepSpeed's CPU accelerator, in the processes they start by hiding the GPUs and naming the
accelerator (the deepspeed launcher sets CUDA_VISIBLE_DEVICES for its children, DS_ACCELERATOR
still holds).
"""
import os
from contextlib import contextmanager

from utils import distributed as dist_utils

CPU_ENV = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}


def child_env(**extra: str) -> dict:
    """This environment for a child process without the launcher variables of this test process (its
    one-rank group must not leak into the launched ones), wandb off unless `extra` says otherwise."""
    env = dict(os.environ, WANDB_MODE="disabled")
    env.update(extra)
    for k in dist_utils.LAUNCH_ENV:
        env.pop(k, None)
    return env


def cpu_subprocess_env(**extra: str) -> dict:
    """child_env, CPU only."""
    return child_env(**{**CPU_ENV, **extra})


@contextmanager
def cpu_process_group():
    """DeepSpeed's CPU accelerator and a one-process gloo group for this test process. The previous
    accelerator and launcher variables come back afterwards, so later tests and their subprocesses
    see the host as it is."""
    import torch.distributed as dist
    from deepspeed.accelerator import real_accelerator, set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    saved_env = {k: os.environ.get(k) for k in dist_utils.LAUNCH_ENV}
    saved_accelerator = real_accelerator.ds_accelerator
    set_accelerator(CPU_Accelerator())
    if dist.is_initialized() and dist.get_backend() != "gloo":  # it has no CPU backend, and DeepSpeed keeps its groups
        raise RuntimeError(f"an earlier test in this process started a {dist.get_backend()} process group: tests "
                           "that run DeepSpeed in-process do it inside cpu_process_group()")
    try:
        dist_utils.init_distributed()
        assert dist_utils.accelerator_device().type == "cpu"
        yield
    finally:
        real_accelerator.ds_accelerator = saved_accelerator
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
