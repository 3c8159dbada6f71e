"""Per-query scores of a finished shard, written by the process that ran it.

The metrics step needs only a few numbers per query (I, U, existence, the Say fields), but reading
and scoring every record (RLE masks, answers) in one parent process after the workers have finished
was the serial tail of a multi-GPU evaluation. So each worker scores its own shard once it is done
and writes `shard_{p}_of_{w}.scores.json` beside it; the metrics step reads those and scores only
the shards without one, or whose records changed since (the file keeps the byte size of the records
it scored)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from .metrics import QueryScore, score_record
from .records import Key, read_shard


@dataclass
class ScoredQuery:
    key: Key
    score: QueryScore


def scores_path(jsonl_path: str) -> str:
    return jsonl_path[:-len(".jsonl")] + ".scores.json"


def score_shard(jsonl_path: str) -> list[ScoredQuery]:
    return [ScoredQuery(r.key, score_record(r)) for r in read_shard(jsonl_path)]


def write_shard_scores(jsonl_path: str) -> list[ScoredQuery]:
    """Score every record of the shard file and save the scores beside it (atomically)."""
    size = os.path.getsize(jsonl_path)
    scored = score_shard(jsonl_path)
    payload = {"records_bytes": size, "scores": [[list(s.key), asdict(s.score)] for s in scored]}
    tmp = scores_path(jsonl_path) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, scores_path(jsonl_path))
    return scored


def load_shard_scores(jsonl_path: str) -> list[ScoredQuery]:
    """The shard's scores: from its scores file when that matches the records on disk, else scored
    now from the records."""
    path = scores_path(jsonl_path)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                payload = json.load(f)
            if payload.get("records_bytes") == os.path.getsize(jsonl_path):
                return [ScoredQuery(tuple(key), QueryScore(**fields)) for key, fields in payload["scores"]]
        except (ValueError, TypeError, KeyError):
            pass  # a cut-off or foreign file: the records are the truth
    return score_shard(jsonl_path)
