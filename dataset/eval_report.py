"""What an evaluation set holds, and what had to be left out of it, with the reasons.

An evaluation set never shrinks quietly. When a ref, an annotation or an image cannot be read,
building the set (and reading its images at evaluation time) either stops with an `EvalDataError`
(one line naming the file and the ref / annotation / image id: `on_error="stop"`, the default), or,
with `on_error="skip"`, leaves the item out and records it in an `EvalSetReport`:

    found      images, refs, queries of the split as its files list them (compare with the paper)
    evaluated  what is left once the skipped items are taken out
    skipped    the difference, with a count per "<kind>/<reason>" and every item (file, id, detail)

`stage` of a skipped item is "build" (left out while building the set) or "run" (its image failed
to decode at evaluation time; `dataset.eval_sets.read_eval_image`). Shards of one run build the
same set and differ only in their run-stage skips: `EvalSetReport.merged` combines them.
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Sequence

from .image_io import DataError

ON_ERROR = ("stop", "skip")
STAGES = ("build", "run")


class EvalDataError(DataError):
    """An evaluation item cannot be read and the set was built with on_error="stop"."""


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


@dataclass(frozen=True)
class SkippedItem:
    kind: str  # "image", "ref" or "annotation"
    item: str  # which one, e.g. "image 391895", "ref 4123", "annotation 1234 (ref 4123)"
    path: str  # the file at fault
    reason: str  # a short code (dataset/image_io.py), e.g. "not_found", "bad_annotation"
    detail: str  # what exactly, one line
    refs: int  # refs of the set lost with it
    queries: int  # queries of the set lost with it
    stage: str = "build"


@dataclass
class EvalSetReport:
    """Counts of one evaluation set (see the module docstring). Safe to update from loader threads."""

    dataset: str = ""
    split: str = ""
    on_error: str = "stop"
    found_images: int = 0
    found_refs: int = 0
    found_queries: int = 0
    built_images: int = 0  # what the set held when it was built (before run-stage skips)
    built_refs: int = 0
    built_queries: int = 0
    skipped: list[SkippedItem] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def start(self, dataset: str, split: str, on_error: str) -> None:
        """Describe a new set (what build_eval_dataset calls first): counts and skips cleared."""
        with self._lock:
            self.dataset, self.split, self.on_error = dataset, split, check_on_error(on_error)
            self.found_images = self.found_refs = self.found_queries = 0
            self.built_images = self.built_refs = self.built_queries = 0
            self.skipped = []

    def add(self, item: SkippedItem) -> None:
        with self._lock:
            self.skipped.append(item)

    def _run_skips(self) -> list[SkippedItem]:
        return [s for s in self.skipped if s.stage == "run"]

    @property
    def evaluated(self) -> dict[str, int]:
        run = self._run_skips()
        return {"images": self.built_images - sum(s.kind == "image" for s in run),
                "refs": self.built_refs - sum(s.refs for s in run),
                "queries": self.built_queries - sum(s.queries for s in run)}

    @property
    def found(self) -> dict[str, int]:
        return {"images": self.found_images, "refs": self.found_refs, "queries": self.found_queries}

    @property
    def complete(self) -> bool:
        """True when every query the files list for the split is evaluated."""
        return self.evaluated["queries"] == self.found_queries

    def reasons(self) -> dict[str, int]:
        """Skipped items per "<kind>/<reason>"."""
        return dict(sorted(Counter(f"{s.kind}/{s.reason}" for s in self.skipped).items()))

    def as_dict(self) -> dict:
        """JSON-ready, for metrics.json."""
        found, evaluated = self.found, self.evaluated
        return {"dataset": self.dataset, "split": self.split, "on_error": self.on_error, "found": found,
                "evaluated": evaluated, "complete": self.complete,
                "skipped": {**{k: found[k] - evaluated[k] for k in found}, "reasons": self.reasons()},
                "built": {"images": self.built_images, "refs": self.built_refs, "queries": self.built_queries},
                "skipped_items": [asdict(s) for s in self.skipped]}

    @classmethod
    def from_dict(cls, d: dict) -> "EvalSetReport":
        return cls(d["dataset"], d["split"], d["on_error"], *(d["found"][k] for k in ("images", "refs", "queries")),
                   *(d["built"][k] for k in ("images", "refs", "queries")),
                   [SkippedItem(**s) for s in d["skipped_items"]])

    @classmethod
    def merged(cls, reports: Sequence["EvalSetReport"]) -> "EvalSetReport":
        """One report for the shards of a run: the set (and its build-stage skips) of the first,
        the run-stage skips of all. ValueError if the shards did not build the same set."""
        if not reports:
            raise ValueError("no reports to merge")
        first = reports[0]
        key = (first.dataset, first.split, first.found, first.built_queries)
        for r in reports[1:]:
            if (r.dataset, r.split, r.found, r.built_queries) != key:
                raise ValueError(f"shard reports describe different sets: {key} and "
                                 f"{(r.dataset, r.split, r.found, r.built_queries)}")
        build = [s for s in first.skipped if s.stage == "build"]
        run = [s for r in reports for s in r._run_skips()]
        return cls(first.dataset, first.split, first.on_error, first.found_images, first.found_refs,
                   first.found_queries, first.built_images, first.built_refs, first.built_queries, build + run)

    def summary(self) -> str:
        """One line: what is evaluated, what the files hold, and what was skipped why."""
        e, f = self.evaluated, self.found
        line = (f"{self.dataset} {self.split}: evaluating {e['images']} images, {e['refs']} refs, "
                f"{e['queries']} queries")
        if self.complete:
            return line + " (all the files list)"
        reasons = ", ".join(f"{k}={v}" for k, v in self.reasons().items())
        return (line + f" of {f['images']} / {f['refs']} / {f['queries']} in the files; skipped "
                f"{f['queries'] - e['queries']} queries ({reasons})")
