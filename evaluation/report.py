"""The metrics step: merge a set's shards' scores (each worker wrote its own; a shard without them is
scored here from its records), write metrics.json."""
from __future__ import annotations

import json
import os
from typing import Optional

from dataset.eval_report import EvalSetReport
from utils.errors import InputError

from .metrics import evaluate_scores, format_table
from .records import merge_shards, shard_dir
from .shard_scores import load_shard_scores


class UnfinishedShards(InputError, RuntimeError):
    """Shards whose inference has not finished; resume them or pass allow_partial."""


def write_metrics(vis_save_path: str, dataset: str, split: str, *, world_size: Optional[int] = None,
                  allow_partial: bool = False) -> dict:
    """Score the records of `dataset` `split` under `vis_save_path`, save them as metrics.json next to
    the shards, print a table and return the result.

    metrics.json also holds the set's counts (`set`: images, refs, queries found in the files and
    evaluated; skipped items with their reasons) and `complete`: true only when every shard finished
    and every query the files list for the split has a record (not so after --limit_images or
    skipped items)."""
    directory = shard_dir(vis_save_path, dataset, split)
    merged = merge_shards(directory, world_size, read=load_shard_scores)  # each worker scored its own shard
    if merged.incomplete and not allow_partial:
        raise UnfinishedShards(f"shards not finished: {', '.join(merged.incomplete)} (resume --cmd inference, "
                               "or pass --allow_partial)")
    groups = evaluate_scores((q.score for q in merged.records), dataset)
    set_report = None
    if len(merged.set_reports) == merged.world_size:  # every shard said what its set held
        set_report = EvalSetReport.merged([EvalSetReport.from_dict(d) for d in merged.set_reports]).as_dict()
        print(f"set: {EvalSetReport.from_dict(set_report).summary()}")
    # without set reports (shards run outside test_sesame.py) the set's size is what the shards hold
    complete = not merged.incomplete and (set_report is None or len(merged.records) == set_report["found"]["queries"])
    result = {"dataset": dataset, "split": split, "world_size": merged.world_size, "complete": complete,
              "set": set_report, "metrics": groups}
    with open(os.path.join(directory, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(format_table({f"{dataset} {split}": groups}))
    print(json.dumps(result))
    return result
