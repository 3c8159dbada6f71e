"""The batched engine, the predictor's fast path: many images, many queries per image, one shared
prompt prefix per image.

Every SESAME prompt of an image starts with the same tokens:

    BOS + system + " USER: <im_start>" + the image's P projected CLIP patches      (the prefix)
    "<im_end>\\n{question} ASSISTANT:"                                              (the suffix)

(`conversation.tokenize_with_image` tokenises the text after `<image>` on its own, so the prefix ids
never depend on the question.) The engine therefore

1. encodes each image once with CLIP and SAM, for all of its queries;
2. runs the LLM over each image's prefix once;
3. gives each query a *slot* next to its image's prefix and runs all suffixes, then all decode
   steps, as one batch over images and slots, with a KV cache;
4. decodes the masks of all [SEG]s of a batch in one SAM mask-decoder call (`SesameModel.seg_masks`).

The KV cache holds one row per *group* (an image and up to `slots_per_group` of its queries); its
columns are

    [ prefix: P columns | the n slots' suffixes, one after another, S columns | token s of slot j at P + S + s*n + j ]

(S: the longest sum of a group's suffix lengths; no per-query padding is computed or read).

A query attends to the prefix and to its own slot's columns only (an additive mask handed to PyTorch's
`scaled_dot_product_attention`, or at a decode step on CUDA to engine/decode_attention.py's kernel,
which reads it the same way). The prefix is read once per group and step however many queries
share it, which is what makes large batches cheap: decode is bound by reading weights and cache.

A decode step is ~600 PyTorch calls for LLaMA-7B (engine/llama_layers.py runs packed projections and
rotates q and k together to keep it there), which can take the host longer than the GPU needs for
the step. With `EngineConfig.cuda_graphs` (opt-in, see there) each step is captured once as a CUDA
graph and replayed: the cache, the mask and the step's inputs live at fixed addresses and are kept
between batches, and a step reads whole blocks of `column_block` cache columns for
`row_block`-rounded groups (columns past the last written one are masked), so one capture serves
many steps and later batches. The host learns whether answers have ended one step late (a small
copy it waits for only after queueing the next step), so it never holds the GPU up between steps.

On CUDA, SAM's image encoder runs on a stream of its own (`EngineConfig.overlap_sam`) while the LLM
stages run on a higher-priority one; only the masks wait for its embeddings.

The decoder layers' own modules (projections, rotary embedding, norms, MLP, LoRA-wrapped or not)
do the work; only the attention call and the cache are ours, because transformers' caches have no
notion of a prefix shared between batch rows.

Outputs equal `SesameModel.predict` run one query at a time (tests/test_eval_engine.py).
"""

from __future__ import annotations

import gc
import warnings
from collections import OrderedDict
from contextlib import nullcontext
from itertools import accumulate
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F

from model.predictor import ImageWork, RowLogitsHook
from model.sesame import MASK_THRESHOLD, QueryPrediction, SesameModel
from model.transforms import normalize_and_pad
from utils.mask_rle_torch import encode_rle_stacks

from . import decode_attention, rotary_kernel
from .cache import GroupKVCache, StepBuffers
from .config import EngineConfig
from .llama_layers import LlamaLayers, lm_head_logits, rms_norm, rotary_tables, rotate_
from .memory import batch_sizes
from .plan import Plan, common_start, plan_groups, round_up, split_prompt
from .timing import StageTimer


def _to_host(flags: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.cuda.Event]]:
    """A small tensor's copy on its way to the host (pinned, not waited for), and the event after it."""
    if not flags.is_cuda:
        return flags, None
    host = flags.to("cpu", non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def _store_keys_values(store: torch.Tensor, new_kv: torch.Tensor, prefix_rows, columns) -> None:
    """A layer's new keys and values (B, L, 2, kv_heads, d) into its cache `store`: the prefix pass's
    (prefix_rows: a slice of cache rows, one per row of new_kv, or (cache rows, new_kv rows) index
    tensors) into columns [0, L); a later pass's into rows [0, B), columns `columns` (a slice, or a
    replayed graph's column tensor on the device)."""
    batch, length = new_kv.shape[:2]
    if prefix_rows is None and isinstance(columns, slice):
        store[:batch, columns].copy_(new_kv)
    elif prefix_rows is None:
        store[:batch].index_copy_(1, columns, new_kv)
    elif isinstance(prefix_rows, slice):
        store[prefix_rows, :length].copy_(new_kv)
    else:
        rows, source = prefix_rows
        store[rows, :length] = new_kv[source]


def _read(pending: tuple[torch.Tensor, Optional[torch.cuda.Event]]) -> list:
    host, done = pending
    if done is not None:
        done.synchronize()
    return host.tolist()


class BatchedInference:
    """See the module docstring: a `model.predictor.Backend`. `run` takes any number of images;
    callers size batches with `plan.batch_images` (KV memory grows with queries x prompt length). The
    KV cache and the captured decode steps are kept between calls. Pack the model's q/k/v projections
    first (`llama_layers.pack_qkv`, done by `engine.build_predictor`) for fewer kernels per step."""

    def __init__(self, model: SesameModel, config: EngineConfig, logits_hook: Optional[RowLogitsHook] = None,
                 timer: Optional[StageTimer] = None):
        self.model = model
        self.config = config
        self.logits_hook = logits_hook
        self.timer = timer
        self._cache: Optional[GroupKVCache] = None
        self._buffers: dict[int, StepBuffers] = {}  # per slot count n
        self._graphs: OrderedDict[tuple[int, int, int], tuple[object, torch.Tensor]] = OrderedDict()
        self._graph_pool = None
        self._capture_stream = None
        self.graph_failure: Optional[str] = None  # why a capture failed, if one did (then: eager steps)
        self.graph_captures = 0
        self._layers_of: Optional[LlamaLayers] = None
        self.sizes = batch_sizes(model, config)  # from free GPU memory where config leaves them unset
        self._sam_encoder = None
        # config.overlap_sam (CUDA): SAM's image encoder on a stream of its own, the LLM's stages on a
        # stream of higher priority, so SAM's blocks mostly fill what decode leaves idle rather than
        # slowing the compute-bound prefills
        self._sam_stream = self._llm_stream = None
        self._sam_done = None  # event recorded on SAM's stream after the last run's embeddings
        if config.overlap_sam and model.device.type == "cuda":
            self._sam_stream = torch.cuda.Stream(model.device, priority=0)
            self._llm_stream = torch.cuda.Stream(model.device, priority=-5)  # the highest the device allows
        if config.compile_sam:
            self._sam_encoder = torch.compile(model.visual_model.image_encoder, dynamic=False)

    @property
    def queries_per_batch(self) -> int:
        return self.sizes.queries_per_batch

    def on_out_of_memory(self) -> bool:
        """After a run ran out of GPU memory: drop the cache and captured steps and halve the batch
        sizes. False when they are at their smallest already (nothing left to try)."""
        self._release()
        gc.collect()  # tensors of the failed run that only reference cycles still hold
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
        smaller = self.sizes.halved()
        if smaller == self.sizes:
            return False
        self.sizes = smaller
        return True

    @property
    def max_images_per_batch(self) -> int:
        return self.config.max_images_per_batch

    def _stage(self, name: str):
        return self.timer.stage(name) if self.timer is not None else nullcontext()

    def _use_graphs(self) -> bool:
        return self.config.cuda_graphs and self.model.device.type == "cuda" and self.graph_failure is None

    # --- public -----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, images: Iterable[ImageWork], max_new_tokens: int) -> list[list[QueryPrediction]]:
        """Greedy answers, masks and See decisions for every prompt of every image, in input order.

        `images` may be a lazy iterable (e.g. images still being decoded by loader threads): the
        encoders start on the first `sam_batch` images as soon as they are there, so the GPU works
        while the rest of the batch loads."""
        if self._llm_stream is None:
            return self._run(images, max_new_tokens)
        caller = torch.cuda.current_stream(self.model.device)
        self._llm_stream.wait_stream(caller)
        with torch.cuda.stream(self._llm_stream):
            out = self._run(images, max_new_tokens)
        caller.wait_stream(self._llm_stream)  # what the caller queues next sees this run's tensors
        return out

    def _run(self, images: Iterable[ImageWork], max_new_tokens: int) -> list[list[QueryPrediction]]:
        with self._stage("encoders"):
            images, clip_features, sam_embeddings = self._encode(images)
        flat: list[tuple[int, int]] = [(i, k) for i, im in enumerate(images) for k in range(len(im.prompts))]
        if not flat:
            return [[] for _ in images]
        split = [split_prompt(images[i].prompts[k], f"image {i} prompt {k}") for i, k in flat]
        by_prefix: dict[tuple[int, ...], list[int]] = {}
        for q, (prefix, _) in enumerate(split):
            by_prefix.setdefault(prefix, []).append(q)
        predictions: list[Optional[QueryPrediction]] = [None] * len(flat)
        for prefix, queries in by_prefix.items():  # one template -> one prefix, the normal case
            # at most queries_per_batch queries decode together (an image's queries may be split)
            for start in range(0, len(queries), self.sizes.queries_per_batch):
                part = queries[start:start + self.sizes.queries_per_batch]
                preds = self._run_prefix(images, clip_features, sam_embeddings, prefix,
                                         [(flat[q][0], split[q][1], q) for q in part], max_new_tokens)
                for q, p in zip(part, preds):
                    predictions[q] = p
        out: list[list[QueryPrediction]] = [[] for _ in images]
        for (i, _), p in zip(flat, predictions):
            out[i].append(p)
        return out

    # --- stages -------------------------------------------------------------------------------
    def _encode(self, images: Iterable[ImageWork]) -> tuple[list[ImageWork], torch.Tensor, torch.Tensor]:
        """Both encoders over chunks of `sam_batch` images, each chunk as soon as it has arrived (CUDA
        work is queued, so the host goes back to waiting for the next images while the GPU runs)."""
        device, chunk = self.model.device, self.sizes.sam_batch
        seen: list[ImageWork] = []
        clip_features, sam_embeddings = [], []

        side = self._sam_stream
        main = torch.cuda.current_stream(device) if side is not None else None

        def on_sam_stream():
            return torch.cuda.stream(side) if side is not None else nullcontext()

        def encode(part: list[ImageWork]) -> None:
            inputs = [im.encoder_inputs(device) for im in part]  # copies (and any preprocessing) on the main stream
            sam_inputs = [sam for _, sam in inputs]
            if side is not None:  # SAM on its stream, after these; CLIP meanwhile on the main one
                side.wait_stream(main)
                for t in sam_inputs:
                    t.record_stream(side)  # made on the main stream, read on the side one
            with on_sam_stream():
                sam_embeddings.append(self._encode_sam(self._sam_pixels(sam_inputs)))
            clip_features.append(self.model.encode_images_clip(torch.stack([clip for clip, _ in inputs])))

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
        with on_sam_stream():
            embeddings = torch.cat(sam_embeddings)
        if side is not None:
            self._sam_done = side.record_event()
            embeddings.record_stream(main)  # made on the side stream, read on the main one (after _sam_ready)
        return seen, torch.cat(clip_features), embeddings

    def _sam_ready(self) -> None:
        """The main stream waits here for the side stream's SAM embeddings (a GPU-side wait; the host
        goes on queueing work)."""
        if self._sam_done is not None:
            torch.cuda.current_stream(self.model.device).wait_event(self._sam_done)

    def _sam_pixels(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(B, 3, S, S) SAM input from images on the device, each either ready or resized only (uint8,
        normalised and padded here)."""
        size = self.model.config.sam.image_size
        return torch.stack([normalize_and_pad(t, size) if t.dtype == torch.uint8 else t for t in images])

    def _encode_sam(self, pixels: torch.Tensor) -> torch.Tensor:
        # channels-last pixels make the patch-embedding convolution write channels-last, so the
        # encoder's (B, H, W, C) token grid is contiguous: its layer norms, residual adds and matrix
        # products then need no layout copies (the largest kernel time in the profiled encoder)
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        if self._sam_encoder is None:
            return self.model.encode_images_sam(pixels)
        count, batch = pixels.shape[0], self.sizes.sam_batch
        if count < batch:  # one shape for the compiled encoder: pad the last chunk with blank images
            pixels = torch.cat([pixels, pixels.new_zeros((batch - count, *pixels.shape[1:]))])
        weight = self.model.visual_model.image_encoder.patch_embed.proj.weight
        return self._sam_encoder(pixels.to(weight.dtype))[:count]

    def _cache_for(self, groups: int, columns: int) -> GroupKVCache:
        """The kept cache, reallocated (graphs dropped) only when it is too small."""
        cfg, model = self.config, self.model
        cache = self._cache
        if cache is not None and cache.rows >= groups and cache.columns >= columns:
            return cache
        rows = round_up(max(groups, cache.rows if cache else 0), cfg.row_block)
        cols = self._round_columns(max(columns, cache.columns if cache else 0))
        self._release()
        llm = model.language_model
        self._cache = GroupKVCache(llm.config.num_hidden_layers, rows, llm.config.num_key_value_heads,
                                   llm.model.layers[0].self_attn.head_dim, cols, model.dtype, model.device)
        return self._cache

    def _round_columns(self, columns: int, block: Optional[int] = None) -> int:
        # whole blocks; on CUDA also a multiple of 16, so SDPA's fused kernels take mask rows as they are
        columns = round_up(columns, self.config.column_block if block is None else block)
        return round_up(columns, 16) if self.model.device.type == "cuda" else columns

    def _release(self) -> None:
        self._graphs.clear()
        self._buffers.clear()
        self._cache = None

    def _buffers_for(self, n: int) -> StepBuffers:
        cache = self._cache
        buf = self._buffers.get(n)
        if buf is None or buf.mask.shape[0] != cache.rows or buf.mask.shape[3] != cache.columns:
            device, rows = self.model.device, cache.rows
            old = buf
            buf = StepBuffers(mask=torch.full((rows, 1, n, cache.columns), float("-inf"), dtype=self.model.dtype,
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
                    queries: list[tuple[int, list[int], int]], max_new_tokens: int) -> list[QueryPrediction]:
        """All queries that share `prefix` text. queries: (image index, suffix ids, flat query index)."""
        model, cfg = self.model, self.config
        llm = model.language_model
        decoder = llm.model
        device, dtype = model.device, model.dtype
        # what every suffix starts with (e.g. "<im_end>\n" and the question's first words) is run
        # once per image with the prefix, not once per query
        shared = common_start([ids for _, ids, _ in queries])
        queries = [(image, ids[len(shared):], q) for image, ids, q in queries]
        plan = plan_groups(queries, cfg.slots_per_group)
        groups, n = len(plan.group_image), plan.slots
        num_patches = clip_features.shape[1]
        P = len(prefix) + num_patches + len(shared)
        # suffix columns: each group's slots one after another, unpadded; groups padded to the longest
        lengths = [[len(queries[local][1]) for local in slot_list] for slot_list in plan.slot_query]
        S = max(sum(row) for row in lengths)
        capacity_steps = min(max_new_tokens, cfg.first_capacity)
        cache = self._cache_for(groups, P + S + capacity_steps * n)

        # 1) prefix: each distinct image once, copied into each of its groups' cache rows
        with self._stage("prefill_prefix"):
            image_ids = sorted(set(plan.group_image))
            image_hidden = self._prefill_prefix(decoder, prefix, shared, image_ids, clip_features, cache, plan)
        cache.used = P

        # 2) suffixes: slot j of group g holds columns P + offset_gj .. + len - 1
        with self._stage("prefill_suffix"):
            ids = torch.full((groups, S), model.config.llm.pad_token_id, dtype=torch.long)
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
            x = self._layers(decoder, x, P + index_in_slot, cache, slice(P, end), read, mask)
            rows = torch.arange(groups, device=device)[:, None]
            hidden = rms_norm(decoder.norm, x[rows, last])  # (G, n, H): each slot's last suffix token
            cache.used = end
            # decode rows see their own slot's suffix columns
            suffix_keys = slot_of[:, None, :] == torch.arange(n, device=device)[None, :, None]  # (G, n, S)

        # 3) greedy decoding over all slots at once
        with self._stage("decode"):
            tokens, steps_run, seg_steps = self._decode(llm, decoder, hidden, slot_query, suffix_len, suffix_keys,
                                                        P, S, n, max_new_tokens)

        # 4) answers, [SEG] states, masks
        with self._stage("masks"):
            return self._finish(queries, plan, tokens, steps_run, seg_steps, sam_embeddings, image_hidden,
                                images)

    def _prefill_prefix(self, decoder, prefix, shared, image_ids, clip_features, cache: GroupKVCache, plan: Plan):
        """Cache columns [0, P) of every group: the prefix text, the image's patches, then `shared`
        (the start of every suffix)."""
        model = self.model
        device = model.device
        embed = model.language_model.get_input_embeddings()
        text = embed(torch.tensor(prefix, dtype=torch.long, device=device))
        after = embed(torch.tensor(shared, dtype=torch.long, device=device))
        text_len, num_patches = len(prefix), clip_features.shape[1]
        P = text_len + num_patches + len(shared)
        keep_image_hidden = model.config.sasp is not None
        image_hidden: dict[int, torch.Tensor] = {}
        for a in range(0, len(image_ids), self.sizes.prefix_batch):
            chunk = image_ids[a:a + self.sizes.prefix_batch]
            feats = clip_features[torch.tensor(chunk, device=device)].to(text.dtype)
            x = torch.cat([text[None].expand(len(chunk), -1, -1), feats, after[None].expand(len(chunk), -1, -1)],
                          dim=1)
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
                columns: Union[torch.Tensor, slice, None], read: int, mask: Optional[torch.Tensor],
                prefix_rows=None):
        """Run every decoder layer over x (B, L, H).

        mask None (the prefix pass): plain causal attention over x itself; its keys and values go to
        cache columns [0, L) of rows prefix_rows[0], taken from x's rows prefix_rows[1] (or of the rows
        of slice prefix_rows, one per row of x). Otherwise x's
        B rows are cache rows [0, B), its L tokens take cache columns `columns` (an (L,) tensor, or a
        slice of L columns), and they attend to columns [0, read) through `mask` (B, 1, L, read),
        additive (0 or -inf).
        """
        layers = self._llama_layers(decoder)
        heads, kv_heads = layers.heads, layers.kv_heads
        cos, signed_sin = rotary_tables(decoder, x, positions)
        batch, length = x.shape[:2]
        gqa = {"enable_gqa": True} if heads != kv_heads else {}
        # on CUDA the rotary kernel writes keys and values to the cache itself (rows: a slice)
        first_row = 0 if mask is not None else prefix_rows.start if isinstance(prefix_rows, slice) else None
        token_columns = None
        if first_row is not None and rotary_kernel.can_store(cache.kv[0]):
            token_columns = (columns if isinstance(columns, torch.Tensor) else
                             torch.arange(*((0, length) if columns is None else (columns.start, columns.stop)),
                                          device=x.device))
        for i, layer in enumerate(layers.layers):
            attn = layer.self_attn
            qkv = layers.qkv(i, rms_norm(layer.input_layernorm, x))  # (B, L, heads + 2 kv_heads, d)
            q = qkv[:, :, :heads].transpose(1, 2)
            new_kv = qkv[:, :, heads:].unflatten(2, (2, kv_heads))  # (B, L, 2, kv_heads, d)
            store = cache.kv[i]
            if token_columns is not None:  # q rotated in place; keys rotated into the cache, with values
                rotary_kernel.rotate_and_store_(qkv, cos, signed_sin, heads, kv_heads, store, first_row,
                                                token_columns)
            else:
                rotate_(qkv[:, :, :heads + kv_heads], cos, signed_sin)  # q and k together
                _store_keys_values(store, new_kv, prefix_rows if mask is None else None, columns)
            if mask is None:
                if token_columns is not None:  # qkv's keys were left unrotated: read them from the cache
                    new_kv = store[prefix_rows, :length]
                k, v = new_kv[:, :, 0].transpose(1, 2), new_kv[:, :, 1].transpose(1, 2)
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling, **gqa)
                o = o.transpose(1, 2).reshape(batch, length, -1)
            elif decode_attention.available(q, store, mask):  # a decode step: a few query rows per cache row
                o = decode_attention.attend(q, store, mask, attn.scaling)
            else:
                k, v = cache.keys_values(i, batch, read)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, **gqa)
                o = o.transpose(1, 2).reshape(batch, length, -1)
            x = x + attn.o_proj(o)
            x = x + layers.mlp(i, rms_norm(layer.post_attention_layernorm, x))
        return x

    def _llama_layers(self, decoder) -> LlamaLayers:
        if self._layers_of is None or self._layers_of.decoder is not decoder:
            self._layers_of = LlamaLayers(decoder)
        return self._layers_of

    def _decode(self, llm, decoder, hidden, slot_query, suffix_len, suffix_keys, P, S, n, max_new_tokens):
        """Greedy steps; the token of slot j at step s takes cache column P + S + s*n + j.
        suffix_keys (G, n, S): the suffix columns each slot sees. Returns tokens (G0, n, steps) on the
        device, steps run, and the [SEG] states as a list of (step, group ids, seg flags (g, n),
        hidden (g, n, H))."""
        cfg = self.config
        device = hidden.device
        groups0 = hidden.shape[0]
        cache = self._cache
        embed_dtype = hidden.dtype
        seg_id, eos_id = self.model.seg_token_id, self.model.config.llm.eos_token_id
        tokens = torch.full((groups0, n, max_new_tokens), self.model.config.llm.pad_token_id, dtype=torch.long,
                            device=device)
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
        steps_run = 0
        last_flags = None  # the last step's (every group done, groups done), on their way to the host
        for step in range(max_new_tokens):
            logits = lm_head_logits(llm, hidden).float()  # (g, n, V)
            if self.logits_hook is not None:
                g = logits.shape[0]
                logits = self.logits_hook(step, logits.reshape(g * n, -1), slot_query.reshape(-1)).reshape(g, n, -1)
            next_ids = logits.argmax(-1)  # (g, n)
            tokens[active, :, step] = next_ids
            is_seg = (next_ids == seg_id) & ~finished
            finished = finished | (next_ids == eos_id)
            group_done = finished.all(1)
            # every step's states are kept ([SEG]s are picked out after decoding, with no wait here);
            # a replayed graph overwrites its output, an eager step makes a new one
            seg_steps.append((step, active, is_seg, hidden.clone() if self._use_graphs() else hidden))
            steps_run = step + 1
            # The host reads whether groups are done one step late: it has queued this step before it
            # waits for the last one's flags, so the GPU does not idle while the host decides. The
            # price: one step run after every answer has ended, whose tokens are dropped.
            flags, last_flags = last_flags, _to_host(torch.stack([group_done.all().long(), group_done.sum()]))
            all_done, groups_done = _read(flags) if flags is not None else (False, 0)
            if all_done:
                seg_steps.pop()
                steps_run = step
                break
            if step == max_new_tokens - 1:
                break
            if groups_done * 2 >= active.numel() and groups_done > 0:  # drop groups that are done: less to read
                last_flags = None  # counted over the rows before this drop
                keep = (~group_done).nonzero()[:, 0]
                if keep.numel() == 0:  # every group ended at this very step (a late flag did not say so)
                    break
                active, finished, slot_query, suffix_len, next_ids = (
                    active[keep], finished[keep], slot_query[keep], suffix_len[keep], next_ids[keep])
                cache.select(keep)
                buf.mask[:keep.numel()] = buf.mask[keep]
            column = P + S + step * n
            if column + n > cache.columns:
                steps_now = (cache.columns - P - S) // n
                wanted = P + S + min(max_new_tokens, 2 * steps_now) * n
                cache.grow(self._round_columns(wanted))
                buf = self._buffers_for(n)  # a wider mask, same contents
                self._graphs.clear()  # they read the old cache tensors
            g = active.numel()
            buf.ids[:g] = next_ids
            buf.positions[:g] = P + suffix_len + step
            torch.add(slot_offsets, column, out=buf.columns)
            buf.first_column = column
            buf.mask[:g, 0, :, column:column + n] = own
            if self._use_graphs():  # whole blocks: few shapes, so few captures
                rows = min(round_up(g, cfg.row_block), cache.rows)
                read = min(round_up(column + n, cfg.column_block), cache.columns)
            else:
                rows, read = g, min(self._round_columns(column + n, 1), cache.columns)
            hidden = self._step(decoder, llm, buf, rows, n, read)[:g]
            cache.used = column + n
        return tokens, steps_run, seg_steps

    def _step(self, decoder, llm, buf: StepBuffers, rows: int, n: int, read: int) -> torch.Tensor:
        """One decode step over cache rows [0, rows) reading columns [0, read): (rows, n, H) final-norm
        states. On CUDA, replayed from a graph captured once per (rows, n, read)."""
        cache, embed = self._cache, llm.get_input_embeddings()
        graphed = self._use_graphs()
        # a graph's step reads its columns from the device; an eager one writes a slice
        columns = buf.columns if graphed else slice(buf.first_column, buf.first_column + n)

        def step() -> torch.Tensor:
            x = embed(buf.ids[:rows])
            x = self._layers(decoder, x, buf.positions[:rows], cache, columns, read, buf.mask[:rows, :, :, :read])
            return rms_norm(decoder.norm, x)

        if not graphed:
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
        if self._graph_pool is None or not self._graphs:
            # a fresh memory pool once every graph of the last one is dropped: PyTorch's allocator
            # refuses to capture into a pool whose graphs are gone while tensors of it are still alive
            self._graph_pool = torch.cuda.graph_pool_handle()
        if self._capture_stream is None:
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

    def _finish(self, queries, plan: Plan, tokens, steps_run, seg_steps, sam_embeddings, image_hidden, images):
        """QueryPredictions of `queries` from the decode: answers through EOS, [SEG] states, and masks
        from one `SesameModel.seg_masks` call (a mask group per answer), copied to the host with one wait."""
        model = self.model
        eos = model.config.llm.eos_token_id
        self._sam_ready()
        tokens = tokens[:, :, :steps_run].cpu()
        # every [SEG] state, step after step, and its (group, slot): one gather puts them in query order
        states, owners = [], []
        sizes = [is_seg.numel() for _, _, is_seg, _ in seg_steps]
        flags = torch.cat([is_seg.flatten() for _, _, is_seg, _ in seg_steps]).cpu().split(sizes) if sizes else []
        for (_, active, is_seg, hidden), host_flags in zip(seg_steps, flags):
            where = host_flags.view(is_seg.shape).nonzero().tolist()
            if where:
                groups = active.tolist()
                owners += [(groups[row], j) for row, j in where]
                states.append(hidden[is_seg])
        rows_of: dict[tuple[int, int], list[int]] = {}
        for row, owner in enumerate(owners):
            rows_of.setdefault(owner, []).append(row)
        answer_ids: dict[int, list[int]] = {}
        seg_rows: dict[int, list[int]] = {}
        for g, slot_list in enumerate(plan.slot_query):
            for j, local in enumerate(slot_list):
                ids = tokens[g, j].tolist()
                if eos in ids:
                    ids = ids[:ids.index(eos) + 1]
                answer_ids[local] = ids
                seg_rows[local] = rows_of.get((g, j), [])
        count = len(queries)
        image_of = [queries[q][0] for q in range(count)]
        seg_query = [q for q in range(count) for _ in seg_rows[q]]
        order = [row for q in range(count) for row in seg_rows[q]]
        width = model.language_model.config.hidden_size
        seg_hidden = (torch.cat(states)[torch.tensor(order, device=sam_embeddings.device)] if order else
                      sam_embeddings.new_zeros((0, width), dtype=model.dtype))
        ends = list(accumulate(len(seg_rows[q]) for q in range(count)))
        answer_seg = {q: seg_hidden[end - len(seg_rows[q]):end] for q, end in enumerate(ends)}
        sasp_states = None
        if model.config.sasp is not None:
            sasp_states = torch.stack([image_hidden[image_of[q]] for q in seg_query]) if seg_query else None
        owner = torch.tensor(image_of, device=sam_embeddings.device)
        per_answer = model.seg_masks(sam_embeddings[owner], seg_hidden, seg_query,
                                     [tuple(images[i].resized_size) for i in image_of],
                                     [tuple(images[i].original_size) for i in image_of], sasp_states)
        masks, exists, rles = self._answer_masks(per_answer)
        return [QueryPrediction(output_ids=answer_ids[q], masks=masks[q], exists=exists[q],
                                seg_hidden=answer_seg[q], rles=rles[q],
                                sasp=per_answer[q].sasp.detached_cpu() if per_answer[q].sasp is not None else None)
                for q in range(count)]

    def _answer_masks(self, per_answer: list) -> tuple[list[torch.Tensor], list[bool], list[Optional[list[dict]]]]:
        """Each answer's masks on the host, whether its first one has pixels (`sees_object`), and their
        RLEs where wanted (`EngineConfig.mask_rles`). Thresholded, copied and encoded once per image
        size, not once per answer: a batch has hundreds of answers, and per-answer calls were most of
        the masks stage's host time (benchmarks/RESULTS.md). Waits for the device once."""
        device = self.model.device
        count = len(per_answer)
        masks: list = [None] * count
        exists = [False] * count
        rles: list[Optional[list[dict]]] = [None] * count
        by_size: dict[tuple, list[int]] = {}
        for q, m in enumerate(per_answer):
            by_size.setdefault(tuple(m.logits.shape[1:]), []).append(q)
        wanted = self.config.mask_rles
        encode = wanted or (wanted is None and device.type == "cuda")
        copies, stacks = [], []
        for members in by_size.values():
            counts = [per_answer[q].logits.shape[0] for q in members]
            binary = torch.cat([per_answer[q].logits for q in members]) > MASK_THRESHOLD
            firsts = [start for start, k in zip(accumulate([0, *counts]), counts) if k]
            seen = binary[firsts].flatten(1).any(1) if firsts else binary.new_zeros(0)
            # non_blocking copies from CUDA land in page-locked memory (PyTorch pins them): no wait here
            copies.append((members, counts, binary.to("cpu", non_blocking=True), seen.to("cpu", non_blocking=True)))
            stacks.append(binary)
        flat = encode_rle_stacks(stacks) if encode else None  # mask after mask, size after size
        if device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # the copies above have landed
        taken = 0
        for members, counts, host, seen in copies:
            firsts = iter(seen.tolist())
            for q, part in zip(members, host.split(counts)):
                masks[q] = part
                exists[q] = bool(next(firsts)) if part.shape[0] else False
                if flat is not None:
                    rles[q], taken = flat[taken:taken + part.shape[0]], taken + part.shape[0]
        return masks, exists, rles
