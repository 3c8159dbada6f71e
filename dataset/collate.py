"""Batching samples into the `SesameBatch` the model trains on.

Labels follow llava_v1: only each round's answer tokens and its closing `</s>` are supervised;
the system prompt, user turns, image placeholder and padding are IGNORE_INDEX. The spans are found
by tokenising the prompt up to each round's "ASSISTANT:" and up to its "</s>" and comparing with the
ids of the whole prompt (which is what the original tokenised, so ids match it exactly). This is
exact for any tokenizer, unlike the original's length arithmetic that assumed LLaMA's (hence its
"- 2" and a warning when lengths disagreed).

Truncation: the original cut every row to model_max_length - 255 ids (a LISA leftover meant to
leave room for 256 CLIP-224 patches), which can cut a [SEG] while keeping its mask. Here a row is
cut so that it never exceeds `model_max_length` ids (counting `<image>` as `image_tokens`
positions): whole trailing rounds are dropped first, as long as the round holding `<image>` stays;
otherwise the row is cut inside a round. Masks of any [SEG] that was cut are dropped with it, so
[SEG]s and masks always agree.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from model.batch import SesameBatch
from model.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Conversation, tokenize_with_image, wrap_image_token

from .sample import Sample
from .templates import SEG


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def encode_conversation(conv: Conversation, tokenizer, use_mm_start_end: bool = True
                        ) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, labels, round_ends): round_ends[k] is the id index just after round k's `</s>`."""
    def ids_of(c: Conversation) -> list[int]:
        return tokenize_with_image(wrap_image_token(c.render(), use_mm_start_end), tokenizer)

    ids = ids_of(conv)
    labels = [IGNORE_INDEX] * len(ids)
    round_ends = []
    q, a = list(conv.questions), list(conv.answers)
    for k in range(len(q)):
        if a[k] is None:
            break
        start = _common_prefix(ids_of(Conversation(q[:k + 1], a[:k] + [None], conv.template)), ids)
        end = _common_prefix(ids_of(Conversation(q[:k + 1], a[:k + 1], conv.template)), ids)
        labels[start:end] = ids[start:end]
        round_ends.append(end)
    return ids, labels, round_ends


def truncation_point(length: int, round_ends: Sequence[int], budget: int, min_keep: int = 0) -> int:
    """How many ids to keep: all if they fit, else up to the last whole round that fits and keeps
    at least `min_keep` ids (the image, which may sit in a later round), else `budget`."""
    if length <= budget:
        return length
    fitting = [e for e in round_ends if min_keep <= e <= budget]
    return fitting[-1] if fitting else budget


def collate_fn(samples: Sequence[Sample], tokenizer, model_max_length: int = 512, conv_template: Optional[str] = None,
               use_mm_start_end: bool = True, image_tokens: int = 1) -> SesameBatch:
    """Samples -> SesameBatch. `conv_template` None keeps each conversation's own template
    (the dataset's `conv_template`); a name overrides it. `image_tokens` is how many positions one
    `<image>` counts for against `model_max_length` (1: count ids; the CLIP patch count: bound the
    sequence the LLM actually sees)."""
    if not samples:
        raise ValueError("collate_fn got an empty list of samples")
    vocab = tokenizer.get_vocab()
    if SEG not in vocab:
        raise ValueError("the tokenizer has no [SEG] token: call model.tokenizer.add_sesame_tokens first")
    if use_mm_start_end and "<im_start>" not in vocab:
        raise ValueError("use_mm_start_end=True but the tokenizer has no <im_start>/<im_end> tokens")
    seg_id = vocab[SEG]
    budget = model_max_length - (image_tokens - 1)
    if budget < 1:
        raise ValueError(f"model_max_length={model_max_length} leaves no room beside {image_tokens} image positions")

    rows, row_labels, offset, masks = [], [], [0], []
    truncated_rows, dropped_masks = 0, 0
    skipped: dict[str, int] = {}
    for s in samples:
        kept_masks, m = [], 0
        for conv in s.conversations:
            if conv_template is not None and conv.template != conv_template:
                conv = Conversation(conv.questions, conv.answers, conv_template)
            ids, labels, round_ends = encode_conversation(conv, tokenizer, use_mm_start_end)
            n_seg = sum(a.count(SEG) for a in conv.answers if a is not None)
            if ids.count(seg_id) != n_seg or ids.count(IMAGE_TOKEN_INDEX) != 1:
                raise ValueError(f"{s.image_path}: a conversation must hold one <image> and [SEG] only in its "
                                 f"answers ({ids.count(seg_id)} [SEG] ids, {n_seg} in answers, "
                                 f"{ids.count(IMAGE_TOKEN_INDEX)} <image>)")
            image_at = ids.index(IMAGE_TOKEN_INDEX)
            keep = truncation_point(len(ids), round_ends, budget, min_keep=image_at + 1)
            if keep <= image_at + 1:
                raise ValueError(f"model_max_length={model_max_length} is too small: it cuts the image out of a "
                                 f"conversation of {s.image_path}")
            if keep < len(ids):
                truncated_rows += 1
                ids, labels = ids[:keep], labels[:keep]
            kept_seg = ids.count(seg_id)
            kept_masks.extend(range(m, m + kept_seg))
            dropped_masks += n_seg - kept_seg
            m += n_seg
            rows.append(ids)
            row_labels.append(labels)
        if m != s.masks.shape[0]:
            raise ValueError(f"{s.image_path}: {m} [SEG] in the answers but {s.masks.shape[0]} masks")
        masks.append(s.masks[kept_masks] if len(kept_masks) != m else s.masks)
        offset.append(len(rows))
        for k, v in s.skipped.items():
            skipped[k] = skipped.get(k, 0) + v

    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for r, (ids, lab) in enumerate(zip(rows, row_labels)):
        input_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[r, :len(lab)] = torch.tensor(lab, dtype=torch.long)
        attention_mask[r, :len(ids)] = True

    meta = {
        "image_paths": [s.image_path for s in samples],
        "sources": [s.source for s in samples],
        "datasets": [s.meta.get("dataset", s.source) for s in samples],
        "sentences": [x for s in samples for x in s.sentences],
        "exists": [x for s in samples for x in s.exists],
        "skipped": skipped,
        "truncated_rows": truncated_rows,
        "dropped_masks": dropped_masks,
    }
    return SesameBatch(
        images_clip=torch.stack([s.images_clip for s in samples]),
        images_sam=torch.stack([s.sam.pixels for s in samples]),
        input_ids=input_ids, labels=labels, attention_mask=attention_mask,
        offset=torch.tensor(offset, dtype=torch.long), masks=masks,
        resized_sizes=[s.sam.resized_size for s in samples],
        original_sizes=[s.sam.original_size for s in samples], meta=meta)
