"""The metrics step: merge a set's shards, score every record, write metrics.json."""
from __future__ import annotations

import json
import os
from typing import Optional

from .metrics import evaluate_records, format_table
from .records import merge_shards, shard_dir


class UnfinishedShards(RuntimeError):
    """Shards whose inference has not finished; resume them or pass allow_partial."""


def write_metrics(vis_save_path: str, dataset: str, split: str, *, world_size: Optional[int] = None,
                  allow_partial: bool = False, extra: Optional[dict] = None) -> dict:
    """Score the records of `dataset` `split` under `vis_save_path`, save them as metrics.json next to
    the shards, print a table and return the result. `extra` is stored alongside (e.g. set sizes)."""
    directory = shard_dir(vis_save_path, dataset, split)
    merged = merge_shards(directory, world_size)
    if merged.incomplete and not allow_partial:
        raise UnfinishedShards(f"shards not finished: {', '.join(merged.incomplete)} (resume --cmd inference, "
                               "or pass --allow_partial)")
    groups = evaluate_records(merged.records, dataset)
    result = {"dataset": dataset, "split": split, "world_size": merged.world_size,
              "complete": not merged.incomplete, "metrics": groups, **(extra or {})}
    with open(os.path.join(directory, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(format_table({f"{dataset} {split}": groups}))
    print(json.dumps(result))
    return result
