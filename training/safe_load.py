"""Reading DeepSpeed checkpoint files without running code from them.

`torch.save` writes pickles, and unpickling an arbitrary pickle can call any function: a planted
`global_stepN/mp_rank_00_model_states.pt` whose object `__reduce__`s to `os.system` would run on
resume or merge. So every file of a training checkpoint is read weights-only: tensors, plain
containers, and the few DeepSpeed classes that DeepSpeed writes into its files. Those were found by
saving ZeRO-0/1/2/3 checkpoints in fp32 and bf16 with DeepSpeed 0.19 and listing the pickle globals
of each file (`torch.serialization.get_unsafe_globals_in_checkpoint`):

- `ZeroStageEnum` (the ZeRO stage, in every optimizer shard),
- `fragment_address` (ZeRO-1/2 parameter slice mappings),
- `LossScaler` (the static scaler of fp32/bf16 runs); `DynamicLossScaler` is what fp16 runs write.

Two layers guard a load:
1. `refuse_unsafe_files(dir)` lists the globals of each `*.pt` file's pickle without unpickling it,
   so a planted file is refused, by name, before DeepSpeed opens anything;
2. `weights_only_loading()` makes every `torch.load` inside it weights-only with that allow-list,
   including DeepSpeed's own calls that pass `weights_only=False` (its checkpoint engine,
   `zero_to_fp32`), through torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD switch, restored on exit.
"""
from __future__ import annotations

import glob
import os
import pickle
from contextlib import contextmanager
from typing import Iterator

import torch

from model.checkpoint import CheckpointError

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def deepspeed_pickled_types() -> list[type]:
    """The classes DeepSpeed pickles into its checkpoint files (see the module docstring)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def refuse_unsafe_files(directory: str) -> None:
    """Raise CheckpointError naming the first `*.pt` file in `directory` whose pickle asks for
    anything outside the weights-only allow-list (nothing is unpickled to find out)."""
    with torch.serialization.safe_globals(deepspeed_pickled_types()):
        for path in sorted(glob.glob(os.path.join(directory, "*.pt"))):
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except (ValueError, RuntimeError, pickle.UnpicklingError) as e:
                raise CheckpointError(f"{path}: cannot be checked before loading, it is not in torch.save's zip "
                                      f"format ({e})") from None
            if unsafe:
                raise CheckpointError(f"{path}: refused: its pickle asks for {', '.join(sorted(unsafe))}, which no "
                                      "DeepSpeed checkpoint holds (a tampered file?); nothing from it was loaded or "
                                      "run")


@contextmanager
def weights_only_loading(what: str) -> Iterator[None]:
    """Every torch.load in the block unpickles weights-only, DeepSpeed's classes allowed; a refused
    pickle becomes a CheckpointError naming `what` (the checkpoint being read)."""
    saved = {k: os.environ.get(k) for k in (FORCE_WEIGHTS_ONLY, FORCE_NO_WEIGHTS_ONLY)}
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    os.environ.pop(FORCE_NO_WEIGHTS_ONLY, None)
    try:
        with torch.serialization.safe_globals(deepspeed_pickled_types()):
            yield
    except pickle.UnpicklingError as e:
        # torch's message: a paragraph of advice, then the line that names the refused global
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line), lines[-1] if lines else type(e).__name__)
        raise CheckpointError(f"{what}: refused to unpickle a file that asks for more than tensors and DeepSpeed's "
                              f"state ({reason}); nothing from it was run") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_checkpoint_file(path: str) -> dict:
    """One checkpoint file on the CPU, weights-only (memory-mapped: large module files stay on disk
    until their tensors are used)."""
    with weights_only_loading(path):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
