"""How the engine lays out work: prompts split at the image, queries placed in groups, images in batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, TypeVar, Union

import numpy as np

from model.conversation import IMAGE_TOKEN_INDEX


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def split_prompt(ids: Sequence[int], where: str) -> tuple[tuple[int, ...], list[int]]:
    positions = [k for k, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
    if len(positions) != 1:
        raise ValueError(f"{where}: a prompt needs exactly one image placeholder ({IMAGE_TOKEN_INDEX}), "
                         f"found {len(positions)}")
    k = positions[0]
    if k + 1 == len(ids):
        raise ValueError(f"{where}: the prompt has no text after the image "
                         f"(expected '<im_end>\\n{{question}} ASSISTANT:')")
    return tuple(ids[:k]), list(ids[k + 1:])


def common_start(suffixes: Sequence[Sequence[int]]) -> list[int]:
    """The tokens that every suffix starts with, leaving each suffix at least its last token (whose
    final state starts that query's answer). The engine runs them once per image, with the prefix."""
    if not suffixes:
        return []
    limit = min(len(s) for s in suffixes) - 1
    first = suffixes[0]
    k = 0
    while k < limit and all(s[k] == first[k] for s in suffixes):
        k += 1
    return list(first[:k])


@dataclass
class Plan:
    """Which query sits in which (group, slot)."""

    group_image: list[int]  # image index per group
    slot_query: list[list[int]]  # per group, flat query indices (len <= slots)
    slots: int


def plan_groups(queries: list[tuple[int, list[int], int]], slots_per_group: int) -> Plan:
    """Groups of up to `slots_per_group` queries of one image. queries: (image index, suffix ids,
    flat query index)."""
    per_image: dict[int, list[int]] = {}
    for local, (image, _, _) in enumerate(queries):
        per_image.setdefault(image, []).append(local)
    group_image, slot_query = [], []
    for image, locals_ in per_image.items():
        # as few groups as the cap allows, of near-equal size: 13 queries -> 7 + 6, not 8 + 5
        k = -(-len(locals_) // slots_per_group)
        for part in np.array_split(np.asarray(locals_), k):
            group_image.append(image)
            slot_query.append(part.tolist())
    return Plan(group_image, slot_query, max(len(s) for s in slot_query))


T = TypeVar("T")


def batch_images(items: Iterable[T], queries_of: Callable[[T], int], queries_per_batch: Union[int, Callable[[], int]],
                 max_images: int = 64) -> Iterator[list[T]]:
    """Group a stream of images into batches of about `queries_per_batch` queries (an image is never
    split across batches; one with more queries than the budget is a batch of its own). A callable
    budget is asked again for every batch (it may shrink while the stream is consumed)."""
    budget = queries_per_batch if callable(queries_per_batch) else (lambda: queries_per_batch)
    if budget() < 1 or max_images < 1:
        raise ValueError(f"queries_per_batch and max_images must be >= 1, got {budget()}, {max_images}")
    batch: list[T] = []
    count = 0
    for item in items:
        n = queries_of(item)
        if batch and (count + n > budget() or len(batch) >= max_images):
            yield batch
            batch, count = [], 0
        batch.append(item)
        count += n
    if batch:
        yield batch
