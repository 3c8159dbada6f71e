"""Timing a GPU call with CUDA events, for the kernel benchmarks in this folder (run as scripts, this
folder is on their import path)."""
import torch


def time_call(fn, iters: int) -> float:
    """ms per call: CUDA events around `iters` calls, after three warm-up calls."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
