"""LLaVA-Instruct-150k visual question answering (multi-turn, no masks).

    llava_dataset/<vqa_data>.json   [{"id", "image": "<file in coco/train2017>", "conversations":
                                      [{"from": "human"|"gpt", "value": ...}, ...]}, ...]

As the original: all turns stay in one multi-turn conversation; the one turn holding `<image>` gets
it moved to its front (`"<image>\\n" + rest`, stripped), wherever that turn is; the other turns are
kept as written; a leading non-human turn is dropped. A record the model cannot take (no `<image>`,
several, one in an answer, turns that do not alternate) is skipped and counted as `bad_record`.
"""
from __future__ import annotations

import json
import os

import numpy as np

from model.conversation import IMAGE_TOKEN

from .image_io import DataError, SkipItem, read_image_rgb, require_path
from .sample import RawSample
from .templates import SEG

ROLE_USER, ROLE_ASSISTANT = "human", "gpt"


def image_to_front(text: str) -> str:
    """The original's handling of the turn that holds `<image>`."""
    return (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()


def parse_llava_conversation(turns) -> tuple[list[str], list[str]]:
    """LLaVA turns -> (questions, answers). Raises ValueError if the record is malformed."""
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list")
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) and "from" in t for t in turns):
        raise ValueError("each turn needs 'from' and a string 'value'")
    if turns[0]["from"] != ROLE_USER:
        turns = turns[1:]
    if len(turns) < 2 or len(turns) % 2:
        raise ValueError(f"expected alternating human/gpt turns, got {len(turns)} turns")
    questions, answers = [], []
    for i in range(0, len(turns), 2):
        q, a = turns[i], turns[i + 1]
        if q["from"] != ROLE_USER or a["from"] != ROLE_ASSISTANT:
            raise ValueError(f"turns {i}, {i + 1} are {q['from']!r}, {a['from']!r}, expected 'human', 'gpt'")
        if SEG in q["value"] or SEG in a["value"]:
            raise ValueError(f"turn {i} contains the literal {SEG} token")
        if IMAGE_TOKEN in a["value"]:
            raise ValueError(f"answer {i + 1} contains {IMAGE_TOKEN}")
        questions.append(image_to_front(q["value"]) if IMAGE_TOKEN in q["value"] else q["value"])
        answers.append(a["value"])
    holding = sum(IMAGE_TOKEN in q for q in questions)
    if holding != 1:
        raise ValueError(f"{holding} questions hold {IMAGE_TOKEN}; exactly one must")
    return questions, answers


class VqaSource:
    def __init__(self, name: str, dataset_dir: str, vqa_data: str = "llava_instruct_150k"):
        self.name = name
        json_path = require_path(os.path.join(dataset_dir, "llava_dataset", f"{vqa_data}.json"), vqa_data)
        self.image_dir = require_path(os.path.join(dataset_dir, "coco", "train2017"), vqa_data, "image folder")
        with open(json_path, "rb") as f:
            try:
                self.records = json.loads(f.read())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{json_path} (dataset {vqa_data}): not valid JSON ({e})") from None
        if not isinstance(self.records, list) or not self.records:
            raise DataError(f"{json_path} (dataset {vqa_data}): expected a non-empty list of records")
        self.json_path = json_path

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, rng: np.random.Generator) -> RawSample:
        k = int(rng.integers(len(self.records)))
        rec = self.records[k]
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
            raise SkipItem(self.name, f"{self.json_path}[{k}]", "bad_record", "record without an 'image' file name")
        path = os.path.join(self.image_dir, rec["image"])
        try:
            questions, answers = parse_llava_conversation(rec.get("conversations"))
        except ValueError as e:
            raise SkipItem(self.name, f"{self.json_path}[{k}]", "bad_record", str(e)) from None
        image = read_image_rgb(path, self.name)
        return RawSample(self.name, path, image, [questions], [answers], [], [False], [""],
                         meta={"record": k, "id": rec.get("id")})
