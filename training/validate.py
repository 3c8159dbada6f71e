"""Validation during training.

- Segment: teacher-forced (the answer with its [SEG] is given), as the original's `validate`:
  gIoU (mean over masks of I/(U+1e-5), an empty union counting 1) and cIoU (ΣI/ΣU) of the
  foreground, ignore label 255 left out, over a seeded draw of queries from the held-out refer sets.
- See: greedy generation on a false-premise split (when one is configured and present): the share
  of queries whose predicted existence ([SEG] generated and its mask non-empty) equals the truth.

Each rank handles every world_size-th item; sums are all-reduced, so every rank gets the same metrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from dataset.eval_sets import EvalImage
from dataset.image_io import SkipItem
from model.batch import SesameBatch
from model.conversation import build_prompt, tokenize_with_image
from utils import distributed as dist_utils
from utils.metrics import intersection_union, mask_giou


@dataclass
class SegmentSums:
    intersection: float = 0.0
    union: float = 0.0
    giou_sum: float = 0.0
    num_masks: int = 0

    def add_masks(self, pred_logits: torch.Tensor, gt: torch.Tensor) -> None:
        """pred_logits (n, H, W), gt (n, H, W) uint8 with 255 = ignore."""
        for p, g in zip((pred_logits > 0).cpu().numpy(), gt.cpu().numpy()):
            i, u = intersection_union(p, g)
            self.intersection += i
            self.union += u
            self.giou_sum += mask_giou(i, u)
            self.num_masks += 1


@dataclass
class SeeSums:
    correct: int = 0
    total: int = 0


def draw_queries(images: Sequence[EvalImage], n: int, seed: int, positives_only: bool) -> list[EvalImage]:
    """Up to n (image, query) pairs drawn without replacement with a seeded RNG, regrouped per image
    (in dataset order) so each image is encoded once."""
    pairs = [(i, k) for i, im in enumerate(images) for k, q in enumerate(im.queries)
             if q.gt_exists or not positives_only]
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.permutation(len(pairs))[:n].tolist()) if len(pairs) > n else range(len(pairs))
    keep: dict[int, list[int]] = {}
    for j in chosen:
        i, k = pairs[j]
        keep.setdefault(i, []).append(k)
    return [EvalImage(image_path=images[i].image_path, image_id=images[i].image_id, height=images[i].height,
                      width=images[i].width, queries=[images[i].queries[k] for k in ks]) for i, ks in keep.items()]


def shard(items: Sequence, rank: int, world_size: int, equal: bool = False) -> list:
    """Every world_size-th item from `rank`. `equal` drops the remainder so every rank runs the same
    number of forwards (ZeRO-3 gathers parameters collectively inside each forward)."""
    if equal:
        items = items[:len(items) // world_size * world_size]
    return list(items[rank::world_size])


@torch.no_grad()
def segment_metrics(engine, batches: Iterable[SesameBatch],
                    to_device: Callable[[SesameBatch], SesameBatch]) -> SegmentSums:
    sums = SegmentSums()
    for batch in batches:
        out = engine(to_device(batch))
        for pred, gt in zip(out.pred_masks, out.gt_masks):
            sums.add_masks(pred.float(), gt)
    return sums


@torch.no_grad()
def see_metrics(model, images: Iterable[EvalImage], load_inputs, tokenizer, conv_template: str,
                use_mm_start_end: bool, max_new_tokens: int, eos_token_id: int, pad_token_id: int) -> SeeSums:
    """Greedy answers to each query; See = predicted existence equals the truth. Prompts are built as
    training built them (`conv_template`, `use_mm_start_end`).

    load_inputs(image) -> (clip (1,3,s,s), sam (1,3,S,S), resized_size, original_size).
    """
    sums = SeeSums()
    for image in images:
        try:
            clip, sam, resized, original = load_inputs(image)
        except SkipItem:  # an unreadable image: left out of See (counted by the dataset's skip log)
            continue
        prompts = [tokenize_with_image(build_prompt(q.question, template=conv_template,
                                                    use_mm_start_end=use_mm_start_end), tokenizer)
                   for q in image.queries]
        preds = model.predict(clip, sam, [resized], [original], prompts, [0] * len(prompts),
                              max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        for q, pred in zip(image.queries, preds):
            sums.correct += int(pred.exists == q.gt_exists)
            sums.total += 1
    return sums


def reduce_metrics(seg: SegmentSums | None, see: SeeSums | None) -> dict[str, float]:
    """All-reduce the per-rank sums and turn them into the reported metrics."""
    seg = seg or SegmentSums()
    see = see or SeeSums()
    t = dist_utils.all_reduce_sum(torch.tensor([seg.intersection, seg.union, seg.giou_sum, seg.num_masks,
                                                see.correct, see.total], dtype=torch.float64)).tolist()
    inter, union, giou_sum, n_masks, correct, total = t
    n_masks, correct, total = int(n_masks), int(correct), int(total)
    metrics = {"giou": giou_sum / n_masks if n_masks else 0.0, "ciou": inter / union if union else 0.0,
               "num_masks": n_masks}
    if total:
        metrics["see"] = correct / total
        metrics["see_queries"] = total
    return metrics
