"""Wall time per named stage of the engine, for benchmarks and profiles."""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class StageTimer:
    """Wall time per named stage. With `sync`, CUDA work is waited for at each stage boundary, so
    the split is honest (use it for benchmarks; it costs a little). Stages also show as ranges in
    torch.profiler traces."""

    def __init__(self, sync: bool = False):
        self.sync = sync
        self.seconds: dict[str, float] = {}

    def _wait(self) -> None:
        if self.sync and torch.cuda.is_available():
            torch.cuda.synchronize()

    @contextmanager
    def stage(self, name: str):
        self._wait()
        start = time.perf_counter()
        with torch.profiler.record_function(name):
            try:
                yield
            finally:
                self._wait()
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
