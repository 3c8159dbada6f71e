"""See, Segment, gIoU and a Say proxy over evaluation records, with exactly the original's definitions.

Per query (foreground class, pixels whose ground truth is 255 left out of both counts):
    I = |pred AND gt|,  U = |pred OR gt|
false-premise queries have an all-zero ground truth, so a hallucinated mask adds its area to U.

- See     = accuracy of pred_exists against gt_exists over ALL queries (SESAME `eval_sesame.py`).
- Segment = cIoU = sum(I) / (sum(U) + 1e-10) over ALL queries, false premises included.
- gIoU    = mean over queries of I / (U + 1e-5), where U == 0 (empty prediction and empty ground
            truth) counts 1.0 (LISA's `validate`, which SESAME's training validation copies).
- existence precision / recall, with "object present" as the positive class.
- Say (proxy; the paper's protocol was never released): over false-premise queries that carry a
  corrected expression `gt_sent` and that the model answered as absent, the share of answers that
  name `gt_sent` (normalised: lower case, punctuation and articles dropped, whole-word match) and the
  mean SQuAD-style token F1 between the answer and `gt_sent`. The answer is free text ("... but there
  is a {gt_sent}"), so F1 is diluted by the wording around the suggestion; compare models with it,
  not with the paper's human/LLM-judged Say numbers.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from utils.mask_io import rle_intersection_union
from utils.metrics import CIOU_EPS, mask_giou

from .records import QueryRecord

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")


def normalize_text(text: str) -> str:
    text = text.lower().replace("[seg]", " ").replace("</s>", " ")
    text = _PUNCT.sub(" ", text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    p, r = normalize_text(prediction).split(), normalize_text(reference).split()
    common = Counter(p) & Counter(r)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def names_reference(answer: str, reference: str) -> bool:
    ref = normalize_text(reference)
    return bool(ref) and f" {ref} " in f" {normalize_text(answer)} "


@dataclass
class QueryScore:
    intersection: int
    union: int
    gt_exists: bool
    pred_exists: bool
    say_eligible: bool = False  # false premise with a gt_sent, answered as absent
    say_named: bool = False
    say_f1: float = 0.0
    is_sentence: bool = False  # ReasonSeg: a long (sentence) query, reported apart


def score_record(r: QueryRecord) -> QueryScore:
    # a false premise's ground truth is blank, whatever mask its ref carries
    inter, union = rle_intersection_union(r.pred_mask, r.gt_mask if r.gt_exists else None, r.gt_ignore,
                                          (r.height, r.width), f"query {r.key}")
    s = QueryScore(inter, union, bool(r.gt_exists), bool(r.pred_exists),
                   is_sentence=bool(r.extra.get("is_sentence", False)))
    if not r.gt_exists and r.gt_sent and normalize_text(r.gt_sent) and not r.pred_exists:
        s.say_eligible = True
        s.say_named = names_reference(r.answer, r.gt_sent)
        s.say_f1 = token_f1(r.answer, r.gt_sent)
    return s


def _ratio(a: float, b: float) -> Optional[float]:
    return a / b if b else None


def summarize(scores: Iterable[QueryScore]) -> dict:
    """The metrics of module docstring over a list of per-query scores (fractions in [0, 1])."""
    scores = list(scores)
    n = len(scores)
    tp = sum(s.gt_exists and s.pred_exists for s in scores)
    fp = sum(not s.gt_exists and s.pred_exists for s in scores)
    fn = sum(s.gt_exists and not s.pred_exists for s in scores)
    tn = n - tp - fp - fn
    sum_i = sum(s.intersection for s in scores)
    sum_u = sum(s.union for s in scores)
    giou = [mask_giou(s.intersection, s.union) for s in scores]
    say = [s for s in scores if s.say_eligible]
    return {
        "see": _ratio(tp + tn, n),
        "segment_ciou": sum_i / (sum_u + CIOU_EPS) if n else None,
        "giou": float(np.mean(giou)) if n else None,
        "exist_precision": _ratio(tp, tp + fp),
        "exist_recall": _ratio(tp, tp + fn),
        "say_names_gt": _ratio(sum(s.say_named for s in say), len(say)),
        "say_token_f1": float(np.mean([s.say_f1 for s in say])) if say else None,
        "counts": {"queries": n, "true_premise": tp + fn, "false_premise": fp + tn, "pred_present": tp + fp,
                   "tp": tp, "fp": fp, "fn": fn, "tn": tn, "intersection": sum_i, "union": sum_u,
                   "say_scored": len(say)},
    }


def evaluate_scores(scores: Iterable[QueryScore], dataset: str) -> dict[str, dict]:
    """{"overall": metrics} and, for ReasonSeg, "short" / "long" by the query's is_sentence."""
    scores = list(scores)
    out = {"overall": summarize(scores)}
    if dataset.lower().startswith("reasonseg"):
        out["short"] = summarize(s for s in scores if not s.is_sentence)
        out["long"] = summarize(s for s in scores if s.is_sentence)
    return out


def evaluate_records(records: Iterable[QueryRecord], dataset: str) -> dict[str, dict]:
    return evaluate_scores(map(score_record, records), dataset)


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def format_table(results: dict[str, dict[str, dict]]) -> str:
    """results: {"{dataset} {split}": {group: metrics}} -> a Markdown table (percentages)."""
    head = ("| dataset / split | group | queries | See | Segment (cIoU) | gIoU | exist P | exist R | "
            "Say names gt | Say F1 | Say n |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, groups in results.items():
        for group, m in groups.items():
            c = m["counts"]
            lines.append(f"| {name} | {group} | {c['queries']} | {_pct(m['see'])} | {_pct(m['segment_ciou'])} | "
                         f"{_pct(m['giou'])} | {_pct(m['exist_precision'])} | {_pct(m['exist_recall'])} | "
                         f"{_pct(m['say_names_gt'])} | {_pct(m['say_token_f1'])} | {c['say_scored']} |")
    return "\n".join(lines)
