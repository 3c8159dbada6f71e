"""Load a SESAME / SESAME- / READ / LISA checkpoint (hub id or local directory) for inference or
fine-tuning. OWNER: checkpoint issue (#3). This file is an interface stub until that lands."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from dataset.transforms import ClipTransform, SamTransform

from .config import SasPConfig
from .sesame import SesameModel
from .tokenizer import SpecialTokenIds


@dataclass
class LoadedSesame:
    model: SesameModel
    tokenizer: Any
    token_ids: SpecialTokenIds
    clip_transform: ClipTransform
    sam_transform: SamTransform


def load_pretrained(path: str, *, vision_tower: Optional[str] = None, dtype: torch.dtype = torch.bfloat16,
                    device: str = "cuda", sasp: Optional[SasPConfig] = None) -> LoadedSesame:
    """Build the model described by `path`/config.json and load its weights; CLIP from the config's
    `vision_tower` unless `vision_tower` overrides it."""
    raise NotImplementedError("checkpoint loading is not implemented yet (issue #3)")
