"""Per-query evaluation records: one JSON line per query in one file per shard, resumable.

Layout under --vis_save_path:

    {dataset}_{split}/shard_{p}_of_{w}.jsonl       records of shard p (process p of w), appended as the run goes
    {dataset}_{split}/shard_{p}_of_{w}.done.json   written when shard p has every query of its images
    {dataset}_{split}/shard_{p}_of_{w}.scores.json the shard's per-query scores, written by its process
                                                   once it is done (evaluation.shard_scores)
    {dataset}_{split}/metrics.json                 written by `--cmd metrics`

A batch of records is written, flushed and fsync'ed before the next batch's are (test_sesame.py
writes them from a background thread while the GPU runs the next batch), so a killed run loses at
most the two batches in flight. On restart the keys (image_id, ref_id, sent_id) already on disk are
read back and skipped; a last line cut off by the kill is dropped from the file first. Shards are
contiguous chunks of the image list (`np.array_split`, like the original), so every query belongs to
exactly one shard.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Optional, Sequence, TypeVar

import numpy as np

Key = tuple[int, int, int]
T = TypeVar("T")


@dataclass
class QueryRecord:
    image_id: int
    ref_id: int
    sent_id: int
    image_path: str
    sentence: str  # the referring expression / ReasonSeg text
    question: str  # the user turn as asked
    answer: str  # decoded generation (special tokens dropped; [SEG] kept, as the original)
    gt_exists: bool
    pred_exists: bool  # See: a [SEG] was generated and its first mask is non-empty
    pred_mask: Optional[dict]  # COCO RLE of the first [SEG]'s mask; None when empty / no [SEG]
    gt_mask: Optional[dict]  # COCO RLE of the ground-truth foreground (label 1); None when empty
    gt_ignore: Optional[dict]  # COCO RLE of ignore pixels (label 255); None when there are none
    height: int
    width: int
    gt_sent: Optional[str] = None  # FP-RefCOCO: the true expression the answer should suggest
    num_seg: int = 0  # [SEG] tokens generated
    extra: dict = field(default_factory=dict)  # e.g. ReasonSeg is_sentence

    @property
    def key(self) -> Key:
        return (self.image_id, self.ref_id, self.sent_id)

    def to_json(self) -> str:
        """One line of JSON: `json.dumps(asdict(self))` (compact, UTF-8), with the masks' RLE strings
        escaped by `_string_json`, which is several times faster for them."""
        return "{" + ",".join(f'"{f.name}":' + (_rle_json if f.name in _RLE_FIELDS else _dumps)(getattr(self, f.name))
                              for f in fields(self)) + "}"

    @classmethod
    def from_dict(cls, d: dict, where: str = "record") -> "QueryRecord":
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(f"{where}: not a query record ({e})") from None


_RLE_FIELDS = ("pred_mask", "gt_mask", "gt_ignore")


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_plain)


def _string_json(text: str) -> str:
    """`_dumps(text)` for a string, by `str.replace` when only backslashes need escaping (no quote,
    no control character): the case of COCO RLE counts, written in the characters '0'..'o'. json's
    escaper goes character by character: 0.5 ms for a noisy 640 x 480 mask's 150 kB string, against
    0.1 ms here, and an evaluation batch writes hundreds of them while the GPU waits at a run's end."""
    if '"' in text or (text and np.frombuffer(text.encode(), np.uint8).min() < 32):
        return _dumps(text)
    return '"' + text.replace("\\", "\\\\") + '"'


def _rle_json(rle) -> str:
    if not isinstance(rle, dict):
        return _dumps(rle)
    return "{" + ",".join(f"{_dumps(k)}:{_string_json(v) if isinstance(v, str) else _dumps(v)}"
                          for k, v in rle.items()) + "}"


def _plain(value):
    """numpy scalars / arrays in `extra` -> plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"record field of type {type(value).__name__} is not JSON serialisable")


def shard_dir(vis_save_path: str, dataset: str, split: str) -> str:
    return os.path.join(vis_save_path, f"{dataset}_{split}")


def shard_path(vis_save_path: str, dataset: str, split: str, process_num: int, world_size: int) -> str:
    check_shard(process_num, world_size)
    return os.path.join(shard_dir(vis_save_path, dataset, split), f"shard_{process_num}_of_{world_size}.jsonl")


def done_path(jsonl_path: str) -> str:
    return jsonl_path[:-len(".jsonl")] + ".done.json"


def check_shard(process_num: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"--world_size must be >= 1, got {world_size}")
    if not 0 <= process_num < world_size:
        raise ValueError(f"--process_num must be in [0, {world_size}), got {process_num}")


def shard_items(items: Sequence[T], process_num: int, world_size: int) -> list[T]:
    """The contiguous chunk of `items` that process `process_num` of `world_size` evaluates
    (np.array_split sizes: the first len % w chunks get one more)."""
    check_shard(process_num, world_size)
    bounds = np.array_split(np.arange(len(items)), world_size)[process_num]
    return [items[i] for i in bounds.tolist()]


def _read_lines(path: str) -> tuple[list[dict], int]:
    """Parsed complete lines and the byte length they span (a torn last line is not counted)."""
    records, good = [], 0
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    line_no = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            break  # no newline: the write was cut off
        line_no += 1
        raw = data[pos:end]
        if raw.strip():
            try:
                records.append(json.loads(raw))
            except json.JSONDecodeError as e:
                rest = data[end + 1:]
                if rest.strip():
                    raise ValueError(f"{path}:{line_no}: corrupt record in the middle of the file ({e})") from None
                break  # a torn final line that happened to end in a newline
        pos = end + 1
        good = pos
    return records, good


class ShardWriter:
    """Append-only JSONL writer that knows which queries are already done."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        existing: list[dict] = []
        if os.path.exists(path):
            existing, good = _read_lines(path)
            if good != os.path.getsize(path):
                with open(path, "r+b") as f:
                    f.truncate(good)
        self.done: set[Key] = set()
        for i, d in enumerate(existing):
            self.done.add(QueryRecord.from_dict(d, f"{path}:{i + 1}").key)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, records: Iterable[QueryRecord]) -> int:
        n = 0
        for r in records:
            if r.key in self.done:
                raise ValueError(f"{self.path}: query {r.key} is already recorded")
            self._file.write(r.to_json() + "\n")
            self.done.add(r.key)
            n += 1
        self._file.flush()
        os.fsync(self._file.fileno())
        return n

    def mark_complete(self, num_images: int, num_queries: int, set_report: Optional[dict] = None) -> None:
        """The shard is done: `num_queries` records are on disk (queries whose image was skipped and
        counted are not among them; `set_report`, dataset.eval_report.EvalSetReport.as_dict(), says
        which)."""
        with open(done_path(self.path), "w", encoding="utf-8") as f:
            json.dump({"num_images": num_images, "num_queries": num_queries, "set_report": set_report}, f)
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_shard(path: str) -> list[QueryRecord]:
    records, _ = _read_lines(path)
    return [QueryRecord.from_dict(d, f"{path}:{i + 1}") for i, d in enumerate(records)]


@dataclass
class MergedShards:
    records: list  # QueryRecord, or whatever `read` gave (merge_shards)
    world_size: int
    incomplete: list[str]  # shard files without a .done marker or with fewer queries than it says
    set_reports: list[dict] = field(default_factory=list)  # of the finished shards that wrote one


def merge_shards(directory: str, world_size: Optional[int] = None,
                 read: Callable[[str], list] = read_shard) -> MergedShards:
    """All records of one dataset/split. `world_size` None: the one the files were written with
    (an error if several are present). Every shard file must exist; a query must not repeat.
    `read(shard_path)` gives a shard's items (anything with a `.key`): its records by default, or
    their scores (evaluation.shard_scores)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no inference output at {directory} (run --cmd inference first)")
    found = {}
    for p in glob.glob(os.path.join(directory, "shard_*_of_*.jsonl")):
        m = re.fullmatch(r"shard_(\d+)_of_(\d+)\.jsonl", os.path.basename(p))
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    if not found:
        raise FileNotFoundError(f"no shard_*_of_*.jsonl files in {directory}")
    if world_size is None:
        if len(found) > 1:
            raise ValueError(f"{directory} holds shards of several world sizes {sorted(found)}; pass --world_size")
        world_size = next(iter(found))
    shards = found.get(world_size, {})
    missing = [os.path.join(directory, f"shard_{p}_of_{world_size}.jsonl")
               for p in range(world_size) if p not in shards]
    if missing:
        raise FileNotFoundError(f"missing shard files: {', '.join(missing)}")
    records, seen, incomplete, set_reports = [], {}, [], []
    for p in range(world_size):
        shard = read(shards[p])
        done = done_path(shards[p])
        if not os.path.exists(done):
            incomplete.append(shards[p])
        else:
            with open(done, encoding="utf-8") as f:
                marker = json.load(f)
            expected = marker.get("num_queries")
            if expected is not None and expected != len(shard):
                incomplete.append(shards[p])
            if marker.get("set_report"):
                set_reports.append(marker["set_report"])
        for r in shard:
            if r.key in seen:
                raise ValueError(f"query {r.key} is recorded twice ({seen[r.key]} and {shards[p]})")
            seen[r.key] = shards[p]
        records.extend(shard)
    return MergedShards(records, world_size, incomplete, set_reports)
