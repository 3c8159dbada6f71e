"""Settings of the batched engine."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class EngineConfig:
    """How the engine groups and batches work. Answers do not depend on these (tests check it),
    only speed and memory do. Sizes left None are chosen from free GPU memory (engine/memory.py)."""

    queries_per_batch: Optional[int] = None  # queries decoded together (KV memory grows with it); max 512
    max_images_per_batch: int = 64
    slots_per_group: int = 8  # queries of one image that share one cached prefix; more -> another group
    sam_batch: Optional[int] = None  # images per CLIP and SAM encoder call; max 8
    prefix_batch: Optional[int] = None  # images per prefix forward; max 32
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
    # On CUDA, SAM's image encoder runs on a stream of its own while the LLM prefills and decodes (only
    # the masks need its embeddings, and decode leaves most of the GPU's arithmetic idle)
    overlap_sam: bool = True
    # COCO RLEs of the masks (what evaluation records store), made where the masks are, so the host
    # does not encode them (pycocotools holds the GIL for a whole mask); None: on CUDA only
    mask_rles: Optional[bool] = None

    def __post_init__(self) -> None:
        for name in ("queries_per_batch", "max_images_per_batch", "slots_per_group", "sam_batch", "prefix_batch",
                     "first_capacity", "column_block", "row_block", "max_graphs"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {value}")

    @classmethod
    def interactive(cls) -> "EngineConfig":
        """One question at a time (demo, web demo): decode steps replayed as CUDA graphs on a one-row
        cache read in small blocks (the step is launch-bound, not bandwidth-bound, at batch 1)."""
        return cls(queries_per_batch=8, max_images_per_batch=1, cuda_graphs=True, column_block=128, row_block=1,
                   mask_rles=False)
