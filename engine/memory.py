"""How much work fits: the engine's batch sizes from the GPU memory it may use.

On a GPU, every size left unset in EngineConfig (None) is chosen here from the memory free for
the process (the driver's free memory plus what PyTorch's allocator holds unused, within a
`torch.cuda.set_per_process_memory_fraction` cap) and a byte estimate of each piece of work, so
the defaults fit a 24 GB card as they fit an 80 GB one. The estimates are deliberately simple
(activation widths times tokens, KV-cache columns); the evaluation runner halves the batch and
retries if one is ever too small (`BatchedInference.on_out_of_memory`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.sesame import SesameModel

from .config import EngineConfig

# sizes that gain nothing from being larger (measured on an H100: benchmarks/RESULTS.md)
# (512 queries: one decode reads the weights for twice the queries of 256; 69 GiB on an 80 GB H100)
MAX_QUERIES, MAX_SAM_BATCH, MAX_PREFIX_BATCH = 512, 8, 32
RESERVE_BYTES = 512 * 2 ** 20  # left free for the allocator's fragmentation and library workspaces
RESERVE_FRACTION = 0.05
SUFFIX_TOKENS = 64  # a question's tokens after the image (SESAME's templates: 40-80)
PREFIX_TEXT_TOKENS = 40  # system prompt and "USER: <im_start>" before the image


@dataclass(frozen=True)
class BatchSizes:
    queries_per_batch: int
    sam_batch: int  # images per CLIP and SAM encoder call
    prefix_batch: int  # images per prefix forward

    def halved(self) -> "BatchSizes":
        return BatchSizes(max(1, self.queries_per_batch // 2), max(1, self.sam_batch // 2),
                          max(1, self.prefix_batch // 2))


@dataclass(frozen=True)
class WorkCost:
    """Bytes of each piece of the engine's work for one model."""

    kv_column: int  # one KV-cache column of one group row (every layer's keys and values)
    sam_image: int  # SAM's image encoder, one image
    prefix_image: int  # the LLM over one image's prefix
    suffix_token: int  # the LLM over one suffix token
    query: int  # a query's share of the KV cache and of the suffix pass


def work_cost(model: SesameModel, config: EngineConfig) -> WorkCost:
    llm, sam, vision = model.config.llm, model.config.sam, model.config.vision
    item = torch.finfo(model.dtype).bits // 8
    head_dim = llm.hidden_size // llm.num_attention_heads
    kv_column = llm.num_hidden_layers * 2 * llm.num_key_value_heads * head_dim * item
    sam_tokens = (sam.image_size // sam.patch_size) ** 2
    # a block's widest moment: MLP hidden (4x), q/k/v (3x), residual and norm copies (~5x), plus the pixels
    sam_image = sam_tokens * sam.encoder_embed_dim * 12 * item + 3 * sam.image_size ** 2 * 4
    per_token = (llm.hidden_size * 6 + llm.intermediate_size * 3) * item
    prefix_tokens = PREFIX_TEXT_TOKENS + vision.num_patches
    prefix_image = prefix_tokens * per_token
    columns = prefix_tokens // config.slots_per_group + SUFFIX_TOKENS + 2 * config.first_capacity  # room to grow once
    suffix_token = per_token + (prefix_tokens + SUFFIX_TOKENS * config.slots_per_group) * item  # + its mask row
    query = columns * kv_column + SUFFIX_TOKENS * suffix_token
    return WorkCost(kv_column, sam_image, prefix_image, suffix_token, query)


def usable_bytes(device: torch.device) -> int:
    """GPU memory this process may still allocate: free on the device plus held unused by PyTorch's
    allocator, within the per-process fraction cap, less a reserve."""
    free, total = torch.cuda.mem_get_info(device)
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _device: 1.0)(device)
    usable = min(free + reserved - allocated, int(fraction * total) - allocated)
    return max(0, int(usable * (1 - RESERVE_FRACTION)) - RESERVE_BYTES)


def choose_sizes(config: EngineConfig, cost: WorkCost, budget: int) -> BatchSizes:
    """The config's sizes, with each unset one the largest (up to the MAX_* values) that the
    budget allows next to the others: encoders and prefix first, the KV cache gets the rest."""
    sam = config.sam_batch or max(1, min(MAX_SAM_BATCH, budget // 6 // cost.sam_image))
    prefix = config.prefix_batch or max(1, min(MAX_PREFIX_BATCH, budget // 6 // cost.prefix_image))
    left = budget - sam * cost.sam_image - prefix * cost.prefix_image
    queries = config.queries_per_batch or max(1, min(MAX_QUERIES, left // cost.query))
    return BatchSizes(queries, sam, prefix)


def batch_sizes(model: SesameModel, config: EngineConfig) -> BatchSizes:
    """Sizes for `model` on its device: chosen from free memory on a GPU, the MAX_* values elsewhere
    (host memory is not the limit there); sizes set in `config` are kept as they are."""
    if model.device.type != "cuda":
        return BatchSizes(config.queries_per_batch or MAX_QUERIES, config.sam_batch or MAX_SAM_BATCH,
                          config.prefix_batch or MAX_PREFIX_BATCH)
    return choose_sizes(config, work_cost(model, config), usable_bytes(model.device))
