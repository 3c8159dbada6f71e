"""Settings of the batched engine."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    """How the engine groups and batches work. Answers do not depend on these (tests check it),
    only speed and memory do."""

    queries_per_batch: int = 256  # queries decoded together (KV memory grows with it)
    max_images_per_batch: int = 64
    slots_per_group: int = 8  # queries of one image that share one cached prefix; more -> another group
    sam_batch: int = 8  # images per CLIP and SAM encoder call
    prefix_batch: int = 32  # images per prefix forward
    first_capacity: int = 32  # decode steps the cache is sized for at first; doubles when reached
    # On CUDA, replay each decode step as a captured CUDA graph (opt-in: each new step shape costs a
    # capture, see benchmarks/RESULTS.md). The cache, the mask and the step's inputs then live at
    # fixed addresses, and a step reads whole blocks of `column_block` cache columns for
    # `row_block`-rounded groups, so one capture serves many steps and batches.
    cuda_graphs: bool = False
    column_block: int = 256
    row_block: int = 4
    max_graphs: int = 48  # captured decode steps kept (oldest dropped first)
    compile_sam: bool = False  # torch.compile SAM's image encoder (fixed batch of sam_batch images)

    def __post_init__(self) -> None:
        for name in ("queries_per_batch", "max_images_per_batch", "slots_per_group", "sam_batch", "prefix_batch",
                     "first_capacity", "column_block", "row_block", "max_graphs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
