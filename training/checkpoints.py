"""Latest and best DeepSpeed checkpoints of a run, and exact resume.

`{run_dir}/ckpt_model` is the latest state (for resume), `{run_dir}/ckpt_model_best` the best one by
the chosen validation metric. Both are ordinary DeepSpeed ZeRO checkpoint directories (`latest`,
`global_stepN/`, `zero_to_fp32.py`), plus what a merge needs to rebuild the model without the
training flags: `sesame_config.json` and `tokenizer/`.

A new state is written under a new tag and DeepSpeed updates `latest` only after every rank has
written, so a run killed while saving still resumes from the previous tag; older tags are removed
afterwards. Each rank also stores its random-number generators next to the DeepSpeed files, so LoRA
dropout draws the same numbers after a resume.
"""
from __future__ import annotations

import glob
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from utils import distributed as dist_utils

LATEST = "ckpt_model"
BEST = "ckpt_model_best"
CONFIG_FILE = "sesame_config.json"
TOKENIZER_DIR = "tokenizer"


@dataclass
class TrainState:
    """What the loop needs to continue: stored as DeepSpeed client state."""

    global_step: int = 0  # optimizer steps done
    best_score: Optional[float] = None
    best_step: Optional[int] = None
    validations: list[dict] = field(default_factory=list)  # one entry per validation: step, metrics
    logger_run_id: Optional[str] = None  # wandb run to continue
    # This rank's random generators at the save, put back by the loop right before its first step
    # (anything that draws random numbers while the run is being set up must not shift them).
    rng: Optional[dict] = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("rng")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "rng"}
        return cls(**known)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _rng_path(ckpt_dir: str, tag: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, f"rng_state_rank{rank}.pt")


def read_latest_tag(ckpt_dir: str) -> Optional[str]:
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


class RunCheckpoints:
    """Saving and resuming the DeepSpeed engine of one run.

    `write_model_recipe(dir)` writes what rebuilding the model needs (config + tokenizer); it is called
    on rank 0 for every checkpoint directory.
    """

    def __init__(self, run_dir: str, write_model_recipe: Callable[[str], None]):
        self.run_dir = run_dir
        self.write_model_recipe = write_model_recipe

    def path(self, which: str = LATEST) -> str:
        return os.path.join(self.run_dir, which)

    def save(self, engine, state: TrainState, which: str = LATEST) -> str:
        ckpt_dir = self.path(which)
        tag = f"global_step{state.global_step}"
        rank = dist_utils.rank()
        os.makedirs(os.path.join(ckpt_dir, tag), exist_ok=True)
        torch.save(rng_state(), _rng_path(ckpt_dir, tag, rank))
        if dist_utils.is_main():
            self.write_model_recipe(ckpt_dir)
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"train_state": state.to_dict()})
        dist_utils.barrier()
        if dist_utils.local_rank() == 0:  # one process per node, in case checkpoints are node-local
            for old in glob.glob(os.path.join(ckpt_dir, "global_step*")):
                if os.path.basename(old) != tag:
                    shutil.rmtree(old, ignore_errors=True)
        dist_utils.barrier()
        return os.path.join(ckpt_dir, tag)

    def resume(self, engine, which: str = LATEST, load_optimizer: bool = True) -> Optional[TrainState]:
        """Load the engine from `which` if it holds a checkpoint; returns its TrainState or None."""
        ckpt_dir = self.path(which)
        tag = read_latest_tag(ckpt_dir)
        if tag is None:
            return None
        return load_engine_checkpoint(engine, ckpt_dir, tag, load_optimizer=load_optimizer)


def load_engine_checkpoint(engine, ckpt_dir: str, tag: Optional[str] = None, load_optimizer: bool = True) -> TrainState:
    """Restore model, optimizer and scheduler from a DeepSpeed checkpoint directory; the saved random
    generator states come back in `TrainState.rng` (run_training puts them back)."""
    tag = tag or read_latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint in {ckpt_dir} (its 'latest' file is missing)")
    load_path, client_state = engine.load_checkpoint(
        ckpt_dir, tag=tag, load_optimizer_states=load_optimizer, load_lr_scheduler_states=load_optimizer,
        load_module_only=not load_optimizer)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(ckpt_dir, tag)}")
    state = TrainState.from_dict((client_state or {}).get("train_state", {}))
    rng_file = _rng_path(ckpt_dir, tag, dist_utils.rank())
    if load_optimizer and os.path.exists(rng_file):  # a run resumed on more ranks starts the extra ones fresh
        state.rng = torch.load(rng_file, weights_only=True)
    return state


def write_model_recipe(ckpt_dir: str, config_dict: dict, tokenizer) -> None:
    """The model config and tokenizer (released slow-tokenizer files) a merge rebuilds the network from."""
    from model.tokenizer import save_slow_tokenizer

    os.makedirs(ckpt_dir, exist_ok=True)
    with open(os.path.join(ckpt_dir, CONFIG_FILE), "w") as f:
        json.dump({"sesame_config": config_dict}, f, indent=2)
    save_slow_tokenizer(tokenizer, os.path.join(ckpt_dir, TOKENIZER_DIR))
