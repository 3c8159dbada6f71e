"""Latest and best DeepSpeed checkpoints of a run, and exact resume.

`{run_dir}/ckpt_model` is the latest state (for resume), `{run_dir}/ckpt_model_best` the best one by
the chosen validation metric. Both are ordinary DeepSpeed ZeRO checkpoint directories (`latest`,
`global_stepN/`, `zero_to_fp32.py`), plus what a merge needs to rebuild the model without the
training flags: `sesame_config.json` and `tokenizer/`.

A new state is written under a new tag and DeepSpeed updates `latest` only after every rank has
written, so a run killed while saving still resumes from the previous tag; older tags are removed
afterwards. Each rank also stores its random-number generators next to the DeepSpeed files, so LoRA
dropout draws the same numbers after a resume, and rank 0 the data stream's layout
(`data_stream.json`: batch size, world size, accumulation), which a resume must match to be exact.

Every file is read weights-only (training/safe_load.py): a checkpoint cannot run code.
"""
from __future__ import annotations

import glob
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable, Optional

import numpy as np
import torch

from utils import distributed as dist_utils
from utils.errors import InputError

from .deepspeed_config import OPTIMIZER_FLAGS
from .safe_load import refuse_unsafe_files, weights_only_loading

LATEST = "ckpt_model"
BEST = "ckpt_model_best"
CONFIG_FILE = "sesame_config.json"
TOKENIZER_DIR = "tokenizer"
STREAM_FILE = "data_stream.json"
_STREAM_NAMES = {"batch_size": "--batch_size", "world_size": "world size (processes)",
                 "grad_accumulation_steps": "--grad_accumulation_steps"}


@dataclass
class TrainState:
    """What the loop needs to continue: stored as DeepSpeed client state."""

    global_step: int = 0  # optimizer steps done
    best_score: Optional[float] = None
    best_step: Optional[int] = None
    validations: list[dict] = field(default_factory=list)  # one entry per validation: step, metrics
    logger_run_id: Optional[str] = None  # wandb run to continue
    optimizer: Optional[str] = None  # the optimizer implementation whose state the checkpoint holds
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


@dataclass(frozen=True)
class StreamLayout:
    """What decides which training items rank r reads at micro-step k (training/data_stream.py); a
    resumed run reads what the uninterrupted one would have read only when all of it is unchanged."""

    batch_size: int
    world_size: int
    grad_accumulation_steps: int

    def differences(self, other: "StreamLayout") -> list[str]:
        """'--batch_size 12 (now 6)' for every field where `other` (the current run) differs."""
        return [f"{_STREAM_NAMES[f.name]} {getattr(self, f.name)} (now {getattr(other, f.name)})"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


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
    on rank 0 for every checkpoint directory. `stream` is this run's data-stream layout: a checkpoint
    written with another batch size or accumulation is refused unless `allow_stream_change` (the run
    then continues, on a data stream that differs from the uninterrupted run's); one written by
    another number of processes always (DeepSpeed cannot re-partition ZeRO optimizer state).
    """

    def __init__(self, run_dir: str, write_model_recipe: Callable[[str], None], stream: StreamLayout,
                 allow_stream_change: bool = False, optimizer: Optional[str] = None):
        self.run_dir = run_dir
        self.write_model_recipe = write_model_recipe
        self.stream = stream
        self.allow_stream_change = allow_stream_change
        self.optimizer = optimizer  # training/deepspeed_config.optimizer_name

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
            with open(os.path.join(ckpt_dir, tag, STREAM_FILE), "w", encoding="utf-8") as f:
                json.dump(asdict(self.stream), f)
        saved = replace(state, optimizer=self.optimizer or state.optimizer)
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"train_state": saved.to_dict()})
        dist_utils.barrier()
        if dist_utils.local_rank() == 0:  # one process per node, in case checkpoints are node-local
            for old in glob.glob(os.path.join(ckpt_dir, "global_step*")):
                if os.path.basename(old) != tag:
                    shutil.rmtree(old, ignore_errors=True)
        dist_utils.barrier()
        return os.path.join(ckpt_dir, tag)

    def resume(self, engine, source: Optional[str] = None) -> Optional[TrainState]:
        """Load the engine from `source` (a DeepSpeed checkpoint directory, e.g. --resume) or else
        from this run's latest checkpoint; returns its TrainState, or None when there is none to
        continue from (no `source` and no latest checkpoint yet)."""
        ckpt_dir = source or self.path(LATEST)
        tag = read_latest_tag(ckpt_dir)
        if tag is None:
            if source is None:
                return None
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {ckpt_dir} (its 'latest' file is missing)")
        self._check_stream(os.path.join(ckpt_dir, tag))
        state = load_engine_checkpoint(engine, ckpt_dir, tag)
        if self.optimizer and state.optimizer and state.optimizer != self.optimizer:
            # The implementations keep their state differently (FusedAdam: integer steps and group keys of
            # its own; torch: tensor steps): continue with the one that wrote it rather than convert.
            how = OPTIMIZER_FLAGS.get(state.optimizer, "with it")
            raise InputError(f"{ckpt_dir}/{tag} holds the optimizer state of {state.optimizer} and this run uses "
                             f"{self.optimizer}: resume {how}")
        return state

    def _check_stream(self, tag_dir: str) -> None:
        path = os.path.join(tag_dir, STREAM_FILE)
        if not os.path.isfile(path):
            _log(f"note: {tag_dir} does not record its data-stream layout ({STREAM_FILE}); whether this resume "
                 "reads the same data as an uninterrupted run cannot be checked")
            return
        try:
            with open(path, encoding="utf-8") as f:
                saved = StreamLayout(**json.load(f))
        except (ValueError, TypeError) as e:
            raise InputError(f"{path}: not a data-stream record ({e})") from None
        if saved.world_size != self.stream.world_size:
            raise InputError(f"{tag_dir} was written by {saved.world_size} processes and this run has "
                             f"{self.stream.world_size}: DeepSpeed cannot split its ZeRO optimizer state over another "
                             f"number of processes; resume with {saved.world_size}")
        changed = saved.differences(self.stream)
        if not changed:
            return
        if not self.allow_stream_change:
            raise InputError(f"{tag_dir} was trained with {', '.join(changed)}: an exact resume needs the same "
                             "settings; restore them, or pass --allow_resume_mismatch to continue on a different "
                             "data stream")
        _log(f"note: resuming with {', '.join(changed)} (--allow_resume_mismatch): the data stream differs from "
             "the uninterrupted run's from here on")


def load_engine_checkpoint(engine, ckpt_dir: str, tag: str) -> TrainState:
    """Restore model, optimizer and scheduler from a DeepSpeed checkpoint directory, weights-only;
    the saved random generator states come back in `TrainState.rng` (run_training puts them back)."""
    tag_dir = os.path.join(ckpt_dir, tag)
    refuse_unsafe_files(tag_dir)
    with weights_only_loading(tag_dir):
        load_path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint files in {tag_dir}")
        state = TrainState.from_dict((client_state or {}).get("train_state", {}))
        rng_file = _rng_path(ckpt_dir, tag, dist_utils.rank())
        if os.path.exists(rng_file):  # absent from checkpoints DeepSpeed wrote without RunCheckpoints.save
            state.rng = torch.load(rng_file, weights_only=True)
    return state


def write_model_recipe(ckpt_dir: str, config_dict: dict, tokenizer) -> None:
    """The model config and tokenizer (released slow-tokenizer files) a merge rebuilds the network from."""
    from model.tokenizer import save_slow_tokenizer

    os.makedirs(ckpt_dir, exist_ok=True)
    with open(os.path.join(ckpt_dir, CONFIG_FILE), "w") as f:
        json.dump({"sesame_config": config_dict}, f, indent=2)
    save_slow_tokenizer(tokenizer, os.path.join(ckpt_dir, TOKENIZER_DIR))


def _log(msg: str) -> None:
    if dist_utils.is_main():
        print(msg, flush=True)
