"""The training data stream: which dataset indices each rank reads at each micro-step.

The training set is map-style and item `idx` is a fixed function of (seed, idx), so the whole run is
one numbered stream. Micro-step k (counted from the start of the run, across epochs) on rank r of W
reads the B indices starting at (k * W + r) * B. A resumed run restarts the stream at the first
micro-step after the checkpoint and so reads exactly what the uninterrupted run would have read.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def micro_batch_indices(micro_step: int, rank: int, world_size: int, batch_size: int) -> list[int]:
    start = (micro_step * world_size + rank) * batch_size
    return list(range(start, start + batch_size))


def samples_needed(epochs: int, steps_per_epoch: int, grad_accumulation_steps: int, batch_size: int,
                   world_size: int) -> int:
    """Length of the stream a whole run reads (what the training set's `len` must cover)."""
    return epochs * steps_per_epoch * grad_accumulation_steps * batch_size * world_size


class MicroBatchSampler(Sampler[list[int]]):
    """Index lists for micro-steps [start, stop) of this rank."""

    def __init__(self, start: int, stop: int, rank: int, world_size: int, batch_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.start, self.stop = start, stop
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for k in range(self.start, self.stop):
            yield micro_batch_indices(k, self.rank, self.world_size, self.batch_size)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def stream_loader(dataset: Dataset, collate: Callable[[Sequence], object], start: int, stop: int, rank: int,
                  world_size: int, batch_size: int, workers: int = 0) -> DataLoader:
    """A DataLoader over micro-steps [start, stop) of this rank, collated into model batches."""
    last = micro_batch_indices(stop - 1, world_size - 1, world_size, batch_size)[-1] if stop > start else -1
    if last >= len(dataset):
        raise ValueError(f"the training set has {len(dataset)} samples but micro-step {stop - 1} needs index {last}; "
                         "build it with samples_per_epoch >= samples_needed(...)")
    return DataLoader(dataset, batch_sampler=MicroBatchSampler(start, stop, rank, world_size, batch_size),
                      collate_fn=collate, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, generator=private_generator())


def private_generator() -> torch.Generator:
    """A DataLoader draws its workers' base seed when an iterator starts; from a generator of its own
    that leaves the global stream (LoRA dropout) untouched, so a resumed run draws what the
    uninterrupted one drew. Items do not depend on worker seeds (they are functions of the index)."""
    return torch.Generator().manual_seed(0)
