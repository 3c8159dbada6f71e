"""Class-name lists of the label-map datasets, indexed by label value (shipped in dataset/classes/)."""
from __future__ import annotations

import json
import os
from typing import Optional

CLASSES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "classes")


def ade20k_class_names(path: Optional[str] = None) -> list[str]:
    with open(path or os.path.join(CLASSES_DIR, "ade20k_classes.json")) as f:
        return [str(n) for n in json.load(f)]


def cocostuff_class_names(path: Optional[str] = None) -> list[str]:
    """Names indexed by label value (the file's "0: unlabeled" line is not a label value)."""
    with open(path or os.path.join(CLASSES_DIR, "cocostuff_classes.txt")) as f:
        lines = [line.strip() for line in f if line.strip()]
    return [line.split(": ", 1)[-1] for line in lines[1:]]
