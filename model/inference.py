"""Fast batched evaluation: many images, many queries per image, one shared prompt prefix per image.

Every SESAME prompt of an image starts with the same tokens:

    BOS + system + " USER: <im_start>" + the image's P projected CLIP patches      (the prefix)
    "<im_end>\\n{question} ASSISTANT:"                                              (the suffix)

(`conversation.tokenize_with_image` tokenises the text after `<image>` on its own, so the prefix ids
never depend on the question.) The engine therefore

1. encodes each image once with CLIP and SAM, for all of its queries;
2. runs the LLM over each image's prefix once;
3. gives each query a *slot* next to its image's prefix and runs all suffixes, then all decode
   steps, as one batch over images and slots, with a KV cache;
4. decodes the masks of all [SEG]s of an image in one SAM mask-decoder call.

The KV cache holds one row per *group* (an image and up to `slots_per_group` of its queries); its
columns are

    [ prefix: P columns | the n slots' suffixes, one after another, S columns | token s of slot j at P + S + s*n + j ]

(S: the longest sum of a group's suffix lengths; no per-query padding is computed or read).

A query attends to the prefix and to its own slot's columns only (an additive mask handed to PyTorch's
`scaled_dot_product_attention`). The prefix is read once per group and step however many queries
share it, which is what makes large batches cheap: decode is bound by reading weights and cache.

A decode step is ~600 PyTorch calls for LLaMA-7B (model/llama_layers.py packs the projections and
rotates q and k together to keep it there), which can take the host longer than the GPU needs for
the step. With `EngineConfig.cuda_graphs` (opt-in, see there) each step is captured once as a CUDA
graph and replayed: the cache, the mask and the step's inputs live at fixed addresses and are kept
between batches, and a step reads whole blocks of `column_block` cache columns for
`row_block`-rounded groups (columns past the last written one are masked), so one capture serves
many steps and later batches.

The decoder layers' own modules (projections, rotary embedding, norms, MLP, LoRA-wrapped or not)
do the work; only the attention call and the cache are ours, because transformers' caches have no
notion of a prefix shared between batch rows.

Outputs equal `SesameModel.predict` run one query at a time (tests/test_eval_engine.py).
"""
from __future__ import annotations

import time
import warnings
from collections import Counter, OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from model.transforms import normalize_and_pad

from .conversation import IMAGE_TOKEN_INDEX
from .llama_layers import LlamaLayers, rms_norm, rotary_tables, rotate_
from .sesame import QueryPrediction, SesameModel

# (step, logits (R, V) float32, query index (R,) long: position in `run`'s flat query order, -1 for
# an empty slot) -> logits. Tests and benchmarks use it to force tokens.
RowLogitsHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ImageWork:
    """One image and the prompts asked about it."""

    clip_pixels: torch.Tensor  # (3, s, s) from ClipTransform
    sam_pixels: torch.Tensor  # (3, S, S) from SamTransform, or uint8 (h, w, 3) from SamTransform.resized
    resized_size: tuple[int, int]
    original_size: tuple[int, int]
    prompts: list[list[int]]  # token ids with exactly one IMAGE_TOKEN_INDEX each


@dataclass
class EngineConfig:
    max_new_tokens: int = 512
    eos_token_id: int = 2
    pad_token_id: int = 0
    slots_per_group: int = 8  # queries of one image that share one cached prefix; more -> another group
    sam_batch: int = 8  # images per CLIP and SAM encoder call (its attention materialises no (HW x HW) maps)
    prefix_batch: int = 32  # images per prefix forward
    first_capacity: int = 32  # decode steps the cache is sized for at first; doubles when reached
    # On CUDA, replay each decode step as a captured CUDA graph. Off by default: on an H100 it made the
    # decode stage faster (1.03 s vs 1.26 s for 48 steps of 256 queries) but the real loop slower
    # (87 vs 90 queries/s), as each new step shape costs a capture (the first in a process seconds).
    cuda_graphs: bool = False
    # Decode reads the cache in whole blocks of columns and runs groups in multiples of `row_block`,
    # so a captured step serves many steps and batches. Larger: fewer captures, more masked reads.
    column_block: int = 256
    row_block: int = 4
    max_graphs: int = 48  # captured decode steps kept (oldest dropped first)
    compile_sam: bool = False  # torch.compile SAM's image encoder (fixed batch of sam_batch images)
    # Pack each layer's q/k/v weights into one tensor (model/llama_layers.py): fewer kernels per
    # step. The modules keep their values, their parameters become views of the packed tensors, so
    # the model stays usable; turn off if something else must own those parameters.
    pack_projections: bool = True

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "slots_per_group", "sam_batch", "prefix_batch", "first_capacity",
                     "column_block", "row_block", "max_graphs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")


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

    def reset(self) -> None:
        self.seconds.clear()


@contextmanager
def _no_timer(name: str):
    yield


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


class GroupKVCache:
    """Keys and values per decoder layer, one (rows, columns, 2, kv_heads, head_dim) tensor each (keys
    at [:, :, 0], values at [:, :, 1]: a layer's new keys and values are written by one copy), in the
    column layout of the module docstring. It outlives a batch (CUDA graphs captured on it stay
    valid), so rows and columns are capacities: a batch uses rows [0, groups) and columns [0, used).
    Zero-filled at allocation: columns a step reads but masks out must hold finite numbers (0 * NaN
    is NaN)."""

    def __init__(self, num_layers: int, groups: int, kv_heads: int, head_dim: int, columns: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (groups, columns, 2, kv_heads, head_dim)
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.used = 0

    @property
    def rows(self) -> int:
        return self.kv[0].shape[0]

    @property
    def columns(self) -> int:
        return self.kv[0].shape[1]

    def keys_values(self, layer: int, rows: int, read: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, kv_heads, read, head_dim) views of keys and values, as attention takes them."""
        kv = self.kv[layer][:rows, :read]
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

    def grow(self, columns: int) -> None:
        """More columns, keeping [0, used) of every row (new tensors: captured graphs are stale)."""
        if columns <= self.columns:
            return
        for i, old in enumerate(self.kv):
            new = old.new_zeros((old.shape[0], columns, *old.shape[2:]))
            new[:, :self.used] = old[:, :self.used]
            self.kv[i] = new

    def select(self, groups: torch.Tensor) -> None:
        """Move rows `groups` (ascending) to rows [0, len(groups)), in place."""
        for t in self.kv:
            t[:groups.numel(), :self.used] = t[groups, :self.used]


@dataclass
class _StepBuffers:
    """Inputs of one decode step for slot count n, at fixed addresses (what a CUDA graph reads)."""

    mask: torch.Tensor  # (rows, 1, n, columns) additive: 0 visible, -inf not
    ids: torch.Tensor  # (rows, n) token fed at this step
    positions: torch.Tensor  # (rows, n) its position id
    columns: torch.Tensor  # (n,) cache columns this step writes


@dataclass
class _Plan:
    """Which query sits in which (group, slot)."""

    group_image: list[int]  # image index per group
    slot_query: list[list[int]]  # per group, flat query indices (len <= slots)
    slots: int


def _split_prompt(ids: Sequence[int], where: str) -> tuple[tuple[int, ...], list[int]]:
    positions = [k for k, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
    if len(positions) != 1:
        raise ValueError(f"{where}: a prompt needs exactly one image placeholder ({IMAGE_TOKEN_INDEX}), "
                         f"found {len(positions)}")
    k = positions[0]
    if k + 1 == len(ids):
        raise ValueError(f"{where}: the prompt has no text after the image (expected '<im_end>\\n{{question}} ASSISTANT:')")
    return tuple(ids[:k]), list(ids[k + 1:])


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # pinned host memory (the loader pins on CUDA runs) copies without blocking this thread
    return t.to(device, non_blocking=t.is_pinned())


class BatchedInference:
    """See the module docstring. `run` takes any number of images; callers size batches with
    `batch_images` (KV memory grows with queries x prompt length). The KV cache and the captured
    decode steps are kept between calls."""

    def __init__(self, model: SesameModel, config: EngineConfig, logits_hook: Optional[RowLogitsHook] = None,
                 timer: Optional[StageTimer] = None):
        self.model = model
        self.config = config
        self.logits_hook = logits_hook
        self.timer = timer
        self._cache: Optional[GroupKVCache] = None
        self._buffers: dict[int, _StepBuffers] = {}  # per slot count n
        self._graphs: OrderedDict[tuple[int, int, int], tuple[object, torch.Tensor]] = OrderedDict()
        self._graph_pool = None
        self._capture_stream = None
        self.graph_failure: Optional[str] = None  # why a capture failed, if one did (then: eager steps)
        self.graph_captures = 0
        self._layers_of: Optional[LlamaLayers] = None
        self._sam_encoder = None
        if config.compile_sam:
            self._sam_encoder = torch.compile(model.visual_model.image_encoder, dynamic=False)

    def _stage(self, name: str):
        return self.timer.stage(name) if self.timer is not None else _no_timer(name)

    def _use_graphs(self) -> bool:
        return self.config.cuda_graphs and self.model.device.type == "cuda" and self.graph_failure is None

    # --- public -----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, images: Iterable[ImageWork]) -> list[list[QueryPrediction]]:
        """Greedy answers, masks and See decisions for every prompt of every image, in input order.

        `images` may be a lazy iterable (e.g. images still being decoded by loader threads): the
        encoders start on the first `sam_batch` images as soon as they are there, so the GPU works
        while the rest of the batch loads."""
        with self._stage("encoders"):
            images, clip_features, sam_embeddings = self._encode(images)
        flat: list[tuple[int, int]] = [(i, k) for i, im in enumerate(images) for k in range(len(im.prompts))]
        if not flat:
            return [[] for _ in images]
        split = [_split_prompt(images[i].prompts[k], f"image {i} prompt {k}") for i, k in flat]
        by_prefix: dict[tuple[int, ...], list[int]] = {}
        for q, (prefix, _) in enumerate(split):
            by_prefix.setdefault(prefix, []).append(q)
        predictions: list[Optional[QueryPrediction]] = [None] * len(flat)
        for prefix, queries in by_prefix.items():  # one template -> one prefix, the normal case
            preds = self._run_prefix(images, clip_features, sam_embeddings, prefix,
                                     [(flat[q][0], split[q][1], q) for q in queries])
            for q, p in zip(queries, preds):
                predictions[q] = p
        out: list[list[QueryPrediction]] = [[] for _ in images]
        for (i, _), p in zip(flat, predictions):
            out[i].append(p)
        return out

    # --- stages -------------------------------------------------------------------------------
    def _encode(self, images: Iterable[ImageWork]) -> tuple[list[ImageWork], torch.Tensor, torch.Tensor]:
        """Both encoders over chunks of `sam_batch` images, each chunk as soon as it has arrived (CUDA
        work is queued, so the host goes back to waiting for the next images while the GPU runs)."""
        device, chunk = self.model.device, self.config.sam_batch
        seen: list[ImageWork] = []
        clip_features, sam_embeddings = [], []

        def encode(part: list[ImageWork]) -> None:
            pixels = torch.stack([_to_device(im.clip_pixels, device) for im in part])
            clip_features.append(self.model.encode_images_clip(pixels))
            pixels = torch.stack([self._sam_pixels(im.sam_pixels, device) for im in part])
            sam_embeddings.append(self._encode_sam(pixels))

        start = 0
        for im in images:
            seen.append(im)
            if len(seen) - start == chunk:
                encode(seen[start:])
                start = len(seen)
        if start < len(seen):
            encode(seen[start:])
        if not seen:
            return seen, torch.empty(0), torch.empty(0)
        return seen, torch.cat(clip_features), torch.cat(sam_embeddings)

    def _sam_pixels(self, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
        pixels = _to_device(pixels, device)
        if pixels.dtype == torch.uint8:  # resized only: normalise and pad here, on the device
            return normalize_and_pad(pixels, self.model.config.sam.image_size)
        return pixels

    def _encode_sam(self, pixels: torch.Tensor) -> torch.Tensor:
        # channels-last pixels make the patch-embedding convolution write channels-last, so the
        # encoder's (B, H, W, C) token grid is contiguous: its layer norms, residual adds and matrix
        # products then need no layout copies (the largest kernel time in the profiled encoder)
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        if self._sam_encoder is None:
            return self.model.encode_images_sam(pixels)
        count, batch = pixels.shape[0], self.config.sam_batch
        if count < batch:  # one shape for the compiled encoder: pad the last chunk with blank images
            pixels = torch.cat([pixels, pixels.new_zeros((batch - count, *pixels.shape[1:]))])
        weight = self.model.visual_model.image_encoder.patch_embed.proj.weight
        return self._sam_encoder(pixels.to(weight.dtype))[:count]

    def _plan(self, queries: list[tuple[int, list[int], int]]) -> _Plan:
        per_image: dict[int, list[int]] = {}
        for local, (image, _, _) in enumerate(queries):
            per_image.setdefault(image, []).append(local)
        cap = self.config.slots_per_group
        group_image, slot_query = [], []
        for image, locals_ in per_image.items():
            # as few groups as the cap allows, of near-equal size: 13 queries -> 7 + 6, not 8 + 5
            k = -(-len(locals_) // cap)
            for part in np.array_split(np.asarray(locals_), k):
                group_image.append(image)
                slot_query.append(part.tolist())
        return _Plan(group_image, slot_query, max(len(s) for s in slot_query))

    def _cache_for(self, groups: int, columns: int) -> GroupKVCache:
        """The kept cache, reallocated (graphs dropped) only when it is too small."""
        cfg, model = self.config, self.model
        cache = self._cache
        if cache is not None and cache.rows >= groups and cache.columns >= columns:
            return cache
        rows = _round_up(max(groups, cache.rows if cache else 0), cfg.row_block)
        cols = self._round_columns(max(columns, cache.columns if cache else 0))
        self._release()
        llm = model.language_model
        self._cache = GroupKVCache(llm.config.num_hidden_layers, rows, llm.config.num_key_value_heads,
                                   llm.model.layers[0].self_attn.head_dim, cols, model.dtype, model.device)
        return self._cache

    def _round_columns(self, columns: int, block: Optional[int] = None) -> int:
        # whole blocks; on CUDA also a multiple of 16, so SDPA's fused kernels take mask rows as they are
        columns = _round_up(columns, self.config.column_block if block is None else block)
        return _round_up(columns, 16) if self.model.device.type == "cuda" else columns

    def _release(self) -> None:
        self._graphs.clear()
        self._buffers.clear()
        self._cache = None

    def _buffers_for(self, n: int) -> _StepBuffers:
        cache = self._cache
        buf = self._buffers.get(n)
        if buf is None or buf.mask.shape[0] != cache.rows or buf.mask.shape[3] != cache.columns:
            device, rows = self.model.device, cache.rows
            old = buf
            buf = _StepBuffers(mask=torch.full((rows, 1, n, cache.columns), float("-inf"), dtype=self.model.dtype,
                                               device=device),
                               ids=torch.zeros((rows, n), dtype=torch.long, device=device),
                               positions=torch.zeros((rows, n), dtype=torch.long, device=device),
                               columns=torch.zeros((n,), dtype=torch.long, device=device))
            if old is not None and old.mask.shape[0] == rows:  # the cache grew mid-decode: keep the mask
                width = min(old.mask.shape[3], cache.columns)
                buf.mask[..., :width] = old.mask[..., :width]
            self._buffers[n] = buf
            self._graphs = OrderedDict((k, v) for k, v in self._graphs.items() if k[1] != n)
        return buf

    def _run_prefix(self, images, clip_features, sam_embeddings, prefix: tuple[int, ...],
                    queries: list[tuple[int, list[int], int]]) -> list[QueryPrediction]:
        """All queries that share `prefix` text. queries: (image index, suffix ids, flat query index)."""
        model, cfg = self.model, self.config
        llm = model.language_model
        decoder = llm.model
        device, dtype = model.device, model.dtype
        plan = self._plan(queries)
        groups, n = len(plan.group_image), plan.slots
        num_patches = clip_features.shape[1]
        text_len = len(prefix)
        P = text_len + num_patches
        # suffix columns: each group's slots one after another, unpadded; groups padded to the longest
        lengths = [[len(queries[local][1]) for local in slot_list] for slot_list in plan.slot_query]
        S = max(sum(row) for row in lengths)
        capacity_steps = min(cfg.max_new_tokens, cfg.first_capacity)
        cache = self._cache_for(groups, P + S + capacity_steps * n)

        # 1) prefix: each distinct image once, copied into each of its groups' cache rows
        with self._stage("prefill_prefix"):
            image_ids = sorted(set(plan.group_image))
            image_hidden = self._prefill_prefix(decoder, prefix, image_ids, clip_features, cache, plan)
        cache.used = P

        # 2) suffixes: slot j of group g holds columns P + offset_gj .. + len - 1
        with self._stage("prefill_suffix"):
            ids = torch.full((groups, S), cfg.pad_token_id, dtype=torch.long)
            slot_of = torch.full((groups, S), -1, dtype=torch.long)  # -1: padding
            index_in_slot = torch.zeros((groups, S), dtype=torch.long)
            last = torch.zeros((groups, n), dtype=torch.long)  # column (from P) of each slot's last token
            suffix_len = torch.zeros((groups, n), dtype=torch.long)
            slot_query = torch.full((groups, n), -1, dtype=torch.long)
            for g, slot_list in enumerate(plan.slot_query):
                offset = 0
                for j, local in enumerate(slot_list):
                    suffix = queries[local][1]
                    span = slice(offset, offset + len(suffix))
                    ids[g, span] = torch.tensor(suffix)
                    slot_of[g, span] = j
                    index_in_slot[g, span] = torch.arange(len(suffix))
                    offset += len(suffix)
                    last[g, j], suffix_len[g, j], slot_query[g, j] = offset - 1, len(suffix), queries[local][2]
            ids, slot_of, index_in_slot, last, suffix_len, slot_query = (
                t.to(device) for t in (ids, slot_of, index_in_slot, last, suffix_len, slot_query))
            # key column b visible from column a: same slot, b <= a (a slot's tokens are consecutive),
            # not padding; the prefix always
            causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
            visible = (slot_of[:, :, None] == slot_of[:, None, :]) & causal & (slot_of >= 0)[:, None, :]
            end = P + S
            read = min(self._round_columns(end, 1), cache.columns)  # aligned mask rows; extra columns are masked
            mask = torch.full((groups, 1, S, read), float("-inf"), dtype=dtype, device=device)
            mask[:, 0, :, :P] = 0
            mask[:, 0, :, P:end].masked_fill_(visible, 0)
            x = llm.get_input_embeddings()(ids)
            x = self._layers(decoder, x, P + index_in_slot, cache, torch.arange(P, end, device=device), read, mask)
            rows = torch.arange(groups, device=device)[:, None]
            hidden = rms_norm(decoder.norm, x[rows, last])  # (G, n, H): each slot's last suffix token
            cache.used = end
            # decode rows see their own slot's suffix columns
            suffix_keys = slot_of[:, None, :] == torch.arange(n, device=device)[None, :, None]  # (G, n, S)

        # 3) greedy decoding over all slots at once
        with self._stage("decode"):
            tokens, steps_run, seg_steps = self._decode(llm, decoder, hidden, slot_query, suffix_len, suffix_keys,
                                                        P, S, n)

        # 4) answers, [SEG] states, masks
        with self._stage("masks"):
            return self._finish(queries, plan, tokens, steps_run, seg_steps, sam_embeddings, image_hidden,
                                images)

    def _prefill_prefix(self, decoder, prefix, image_ids, clip_features, cache: GroupKVCache, plan: _Plan):
        model, cfg = self.model, self.config
        device = model.device
        prefix_ids = torch.tensor(prefix, dtype=torch.long, device=device)
        text = model.language_model.get_input_embeddings()(prefix_ids)
        text_len, num_patches = len(prefix), clip_features.shape[1]
        P = text_len + num_patches
        keep_image_hidden = model.config.sasp is not None
        image_hidden: dict[int, torch.Tensor] = {}
        for a in range(0, len(image_ids), cfg.prefix_batch):
            chunk = image_ids[a:a + cfg.prefix_batch]
            feats = clip_features[torch.tensor(chunk, device=device)].to(text.dtype)
            x = torch.cat([text[None].expand(len(chunk), -1, -1), feats], dim=1)
            positions = torch.arange(P, device=device)[None].expand(len(chunk), -1)
            # cache rows (groups) of these images, and which chunk row feeds each
            rows = [g for g, im in enumerate(plan.group_image) if im in chunk]
            source = [chunk.index(plan.group_image[g]) for g in rows]
            if source == list(range(len(chunk))) and rows == list(range(rows[0], rows[0] + len(rows))):
                target = slice(rows[0], rows[0] + len(rows))  # one group per image, in order: a plain copy
            else:
                target = (torch.tensor(rows, device=device), torch.tensor(source, device=device))
            x = self._layers(decoder, x, positions, cache, None, P, None, prefix_rows=target)
            if keep_image_hidden:
                states = rms_norm(decoder.norm, x[:, text_len:text_len + num_patches])
                for r, im in enumerate(chunk):
                    image_hidden[im] = states[r]
        return image_hidden

    def _layers(self, decoder, x: torch.Tensor, positions: torch.Tensor, cache: GroupKVCache,
                columns: Optional[torch.Tensor], read: int, mask: Optional[torch.Tensor],
                prefix_rows=None):
        """Run every decoder layer over x (B, L, H).

        mask None (the prefix pass): plain causal attention over x itself; its keys and values go to
        cache columns [0, L) of rows prefix_rows[0], taken from x's rows prefix_rows[1] (or of the rows
        of slice prefix_rows, one per row of x). Otherwise x's
        B rows are cache rows [0, B), its L tokens take cache columns `columns` (L,), and they attend
        to columns [0, read) through `mask` (B, 1, L, read), additive (0 or -inf).
        """
        layers = self._llama_layers(decoder)
        heads, kv_heads = layers.heads, layers.kv_heads
        cos, signed_sin = rotary_tables(decoder, x, positions)
        batch, length = x.shape[:2]
        gqa = {"enable_gqa": True} if heads != kv_heads else {}
        for i, layer in enumerate(layers.layers):
            attn = layer.self_attn
            qkv = layers.qkv(i, rms_norm(layer.input_layernorm, x))  # (B, L, heads + 2 kv_heads, d)
            rotate_(qkv[:, :, :heads + kv_heads], cos, signed_sin)  # q and k together
            q = qkv[:, :, :heads].transpose(1, 2)
            new_kv = qkv[:, :, heads:].unflatten(2, (2, kv_heads))  # (B, L, 2, kv_heads, d)
            store = cache.kv[i]
            if mask is None:
                if isinstance(prefix_rows, slice):
                    store[prefix_rows, :length].copy_(new_kv)
                else:
                    rows, source = prefix_rows
                    store[rows, :length] = new_kv[source]
                k, v = new_kv[:, :, 0].transpose(1, 2), new_kv[:, :, 1].transpose(1, 2)
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling, **gqa)
            else:
                store[:batch].index_copy_(1, columns, new_kv)
                k, v = cache.keys_values(i, batch, read)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, **gqa)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(batch, length, -1))
            x = x + layer.mlp(rms_norm(layer.post_attention_layernorm, x))
        return x

    def _llama_layers(self, decoder) -> LlamaLayers:
        if self._layers_of is None or self._layers_of.decoder is not decoder:
            self._layers_of = LlamaLayers(decoder, pack=self.config.pack_projections)
        return self._layers_of

    def _decode(self, llm, decoder, hidden, slot_query, suffix_len, suffix_keys, P, S, n):
        """Greedy steps; the token of slot j at step s takes cache column P + S + s*n + j.
        suffix_keys (G, n, S): the suffix columns each slot sees. Returns tokens (G0, n, steps) on the
        device, steps run, and the [SEG] states as a list of (step, group ids, seg flags (g, n),
        hidden (g, n, H))."""
        cfg = self.config
        device = hidden.device
        groups0 = hidden.shape[0]
        cache = self._cache
        embed_dtype = hidden.dtype
        lm_head = llm.lm_head
        seg_id, eos_id = self.model.seg_token_id, cfg.eos_token_id
        tokens = torch.full((groups0, n, cfg.max_new_tokens), cfg.pad_token_id, dtype=torch.long, device=device)
        active = torch.arange(groups0, device=device)  # cache row -> original group
        finished = slot_query < 0  # empty slots never produce anything
        # each slot sees the prefix, its own suffix, then its own generated columns (added per step);
        # rows past the batch's groups (graph padding) see the prefix only, so they stay finite
        buf = self._buffers_for(n)
        buf.mask.fill_(float("-inf"))
        buf.mask[:, :, :, :P] = 0
        buf.mask[:groups0, 0, :, P:P + S].masked_fill_(suffix_keys, 0)
        own = torch.full((n, n), float("-inf"), dtype=embed_dtype, device=device).fill_diagonal_(0)
        slot_offsets = torch.arange(n, device=device)
        seg_steps = []
        step = 0
        for step in range(cfg.max_new_tokens):
            logits = lm_head(hidden).float()  # (g, n, V)
            if self.logits_hook is not None:
                g = logits.shape[0]
                logits = self.logits_hook(step, logits.reshape(g * n, -1), slot_query.reshape(-1)).reshape(g, n, -1)
            next_ids = logits.argmax(-1)  # (g, n)
            tokens[active, :, step] = next_ids
            is_seg = (next_ids == seg_id) & ~finished
            finished = finished | (next_ids == eos_id)
            group_done = finished.all(1)
            flags = torch.stack([group_done.all().long(), is_seg.any().long(), group_done.sum()]).tolist()  # one sync per step
            if flags[1]:
                seg_steps.append((step, active, is_seg, hidden.clone()))  # graph outputs are overwritten
            if flags[0] or step == cfg.max_new_tokens - 1:
                break
            if flags[2] * 2 >= active.numel() and flags[2] > 0:  # drop groups that are done: less to read
                keep = (~group_done).nonzero()[:, 0]
                active, finished, slot_query, suffix_len, next_ids = (
                    active[keep], finished[keep], slot_query[keep], suffix_len[keep], next_ids[keep])
                cache.select(keep)
                buf.mask[:keep.numel()] = buf.mask[keep]
            column = P + S + step * n
            if column + n > cache.columns:
                steps_now = (cache.columns - P - S) // n
                wanted = P + S + min(cfg.max_new_tokens, 2 * steps_now) * n
                cache.grow(self._round_columns(wanted))
                buf = self._buffers_for(n)  # a wider mask, same contents
                self._graphs.clear()  # they read the old cache tensors
            g = active.numel()
            buf.ids[:g] = next_ids
            buf.positions[:g] = P + suffix_len + step
            torch.add(slot_offsets, column, out=buf.columns)
            buf.mask[:g, 0, :, column:column + n] = own
            if self._use_graphs():  # whole blocks: few shapes, so few captures
                rows = min(_round_up(g, cfg.row_block), cache.rows)
                read = min(_round_up(column + n, cfg.column_block), cache.columns)
            else:
                rows, read = g, min(self._round_columns(column + n, 1), cache.columns)
            hidden = self._step(decoder, llm, buf, rows, n, read)[:g]
            cache.used = column + n
        return tokens, step + 1, seg_steps

    def _step(self, decoder, llm, buf: _StepBuffers, rows: int, n: int, read: int) -> torch.Tensor:
        """One decode step over cache rows [0, rows) reading columns [0, read): (rows, n, H) final-norm
        states. On CUDA, replayed from a graph captured once per (rows, n, read)."""
        cache, embed = self._cache, llm.get_input_embeddings()

        def step() -> torch.Tensor:
            x = embed(buf.ids[:rows])
            x = self._layers(decoder, x, buf.positions[:rows], cache, buf.columns, read,
                             buf.mask[:rows, :, :, :read])
            return rms_norm(decoder.norm, x)

        if not self._use_graphs():
            return step()
        key = (rows, n, read)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                graph, out, result = self._capture(step)
            except Exception as e:  # noqa: BLE001 - any capture failure: keep going without graphs
                self.graph_failure = f"{type(e).__name__}: {e}"
                warnings.warn(f"CUDA graph capture of the decode step failed; decoding without graphs "
                              f"({self.graph_failure})")
                torch.cuda.synchronize()
                return step()
            self._graphs[key] = (graph, out)
            while len(self._graphs) > self.config.max_graphs:
                self._graphs.popitem(last=False)
            return result  # this step ran eagerly before the capture; later steps replay
        self._graphs.move_to_end(key)
        graph, out = entry
        graph.replay()
        return out

    def _capture(self, step: Callable[[], torch.Tensor]):
        """Run the step eagerly on a side stream kept for all captures (which also warms up what
        libraries set up per stream, never while capturing), then capture it there. Returns the
        graph, its output tensor and the eager result of this step. (Not `torch.cuda.graph`, which
        empties the allocator's cache at every capture: costly with a large KV cache around.)"""
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
            self._capture_stream = torch.cuda.Stream()
        side, main = self._capture_stream, torch.cuda.current_stream()
        side.wait_stream(main)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            result = step()
            # thread_local: the loader threads may pin host memory meanwhile, which is no capture error
            graph.capture_begin(pool=self._graph_pool, capture_error_mode="thread_local")
            try:
                out = step()  # recorded, not run: replays rewrite the same cache columns from the inputs
            finally:
                graph.capture_end()
        main.wait_stream(side)
        result.record_stream(main)  # made on the side stream, read on the main one
        self.graph_captures += 1
        return graph, out, result

    def _masks(self, by_image, answers, sam_embeddings, image_hidden, images) -> dict[int, torch.Tensor]:
        """Per image, the (n, H, W) bool masks (CPU) of its [SEG]s in query order. What
        `model.masks_for_image` (`sam.decode_masks`) computes image by image, for all images in one
        mask-decoder call: SAM's decoder adds the dense prompt to the image embedding repeated per
        prompt, so each prompt's own image embedding goes in as its dense prompt (plus SAM's no-mask
        embedding, the true dense prompt) with a zero image embedding: the same sums, so the same
        masks."""
        model = self.model
        sam = model.visual_model
        owners, states, points = [], [], []
        for image, locals_ in by_image.items():
            seg = torch.cat([answers[q][1] for q in locals_])
            if seg.shape[0]:
                owners += [image] * seg.shape[0]
                states.append(seg)
                if model.config.sasp is not None:
                    work = images[image]
                    points.append(model.point_prompts(seg, image_hidden[image][None].expand(seg.shape[0], -1, -1),
                                                      tuple(work.resized_size), tuple(work.original_size)))
        out: dict[int, torch.Tensor] = {}
        if states:
            seg = torch.cat(states)
            embeddings = model.project_seg(seg)
            dtype, count = embeddings.dtype, embeddings.shape[0]
            prompts = (torch.cat([c for c, _ in points]), torch.cat([lab for _, lab in points])) if points else None
            sparse, dense = sam.prompt_encoder(points=prompts, boxes=None, masks=None)
            sparse = torch.cat([sparse.to(dtype).expand(count, -1, -1), embeddings[:, None]], dim=1)
            owner = torch.tensor(owners, device=seg.device)
            own_image = sam_embeddings[owner].to(dtype) + dense.to(dtype)
            low_res, _ = sam.mask_decoder(image_embeddings=torch.zeros_like(own_image[:1]),
                                          image_pe=sam.prompt_encoder.get_dense_pe().to(dtype),
                                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=own_image,
                                          multimask_output=False)
            counts = Counter(owners)
            start = 0
            for image, n in counts.items():  # insertion order: the order of `owners`
                work = images[image]
                logits = sam.postprocess_masks(low_res[start:start + n].float(), input_size=tuple(work.resized_size),
                                               original_size=tuple(work.original_size))[:, 0]
                out[image] = (logits > 0).to("cpu", non_blocking=True)  # pinned, no wait on CUDA
                start += n
        if model.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        for image in by_image:
            if image not in out:
                out[image] = torch.zeros((0, *tuple(images[image].original_size)), dtype=torch.bool)
        return out

    def _finish(self, queries, plan: _Plan, tokens, steps_run, seg_steps, sam_embeddings, image_hidden, images):
        model, cfg = self.model, self.config
        tokens = tokens[:, :, :steps_run].cpu()
        # [SEG] states per (group, slot), in step order
        seg_states: dict[tuple[int, int], list[torch.Tensor]] = {}
        for _, active, is_seg, hidden in seg_steps:
            where = is_seg.nonzero().tolist()
            for (row, j), h in zip(where, hidden[is_seg]):
                seg_states.setdefault((int(active[row]), j), []).append(h)
        # per query: answer ids (through EOS) and [SEG] states
        answers: dict[int, tuple[list[int], torch.Tensor]] = {}
        width = model.language_model.config.hidden_size
        for g, slot_list in enumerate(plan.slot_query):
            for j, local in enumerate(slot_list):
                ids = tokens[g, j].tolist()
                if cfg.eos_token_id in ids:
                    ids = ids[:ids.index(cfg.eos_token_id) + 1]
                states = seg_states.get((g, j))
                h = torch.stack(states) if states else sam_embeddings.new_zeros((0, width), dtype=model.dtype)
                answers[local] = (ids, h)
        # masks: one mask-decoder call for every [SEG] of the batch; one wait for all of them
        by_image: dict[int, list[int]] = {}
        for local, (image, _, _) in enumerate(queries):
            by_image.setdefault(image, []).append(local)
        image_masks = self._masks(by_image, answers, sam_embeddings, image_hidden, images)
        results: dict[int, QueryPrediction] = {}
        for image, locals_ in by_image.items():
            work = images[image]
            resized, original = tuple(work.resized_size), tuple(work.original_size)
            masks, offset = image_masks[image], 0
            for q in locals_:
                h = answers[q][1]
                c = h.shape[0]
                m = masks[offset:offset + c]
                offset += c
                sasp = None
                if model.config.sasp is not None and c and hasattr(model, "sasp_points"):
                    sasp = model.sasp_points(h, image_hidden[image][None].expand(c, -1, -1), resized,
                                             original).detached_cpu()
                extra = {"sasp": sasp} if sasp is not None else {}
                results[q] = QueryPrediction(output_ids=answers[q][0], masks=m, exists=bool(c > 0 and m[0].any()),
                                             seg_hidden=h, **extra)
        return [results[q] for q in range(len(queries))]


T = TypeVar("T")


def batch_images(items: Iterable[T], queries_of: Callable[[T], int], queries_per_batch: int,
                 max_images: int = 64) -> Iterator[list[T]]:
    """Group a stream of images into batches of about `queries_per_batch` queries (an image is never
    split across batches; one with more queries than the budget is a batch of its own)."""
    if queries_per_batch < 1 or max_images < 1:
        raise ValueError(f"queries_per_batch and max_images must be >= 1, got {queries_per_batch}, {max_images}")
    batch: list[T] = []
    count = 0
    for item in items:
        n = queries_of(item)
        if batch and (count + n > queries_per_batch or len(batch) >= max_images):
            yield batch
            batch, count = [], 0
        batch.append(item)
        count += n
    if batch:
        yield batch
