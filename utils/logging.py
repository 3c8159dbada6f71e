"""Where training metrics go: wandb when it is installed and enabled, else TensorBoard; always a
JSONL file next to them. Only rank 0 writes; other ranks get a sink that drops everything.

wandb honours WANDB_MODE (online / offline / disabled). `auto` picks wandb when it can log (an API
key is configured, or WANDB_MODE=offline) so an unattended run never stops at a login prompt.

A run resumed at step S logs steps S+1, ... again; what an earlier attempt logged after S is dropped
when the sink opens: records past S leave metrics.jsonl, and TensorBoard purges events past S.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Protocol

LOGGERS = ("auto", "wandb", "tensorboard", "none")


class MetricSink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class NullSink:
    run_id = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink:
    """One JSON object per log call: {"step": ..., **metrics}, appended after the records of steps
    up to `start_step` that the file already holds (later ones are dropped: they are logged again)."""

    def __init__(self, path: str, start_step: int = 0):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        dropped = drop_records_after(path, start_step)
        if dropped:
            print(f"{path}: dropped {dropped} records past step {start_step} (the run continues from there)",
                  flush=True)
        self.file = open(path, "a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def drop_records_after(path: str, step: int) -> int:
    """Rewrite the JSONL file at `path` without its records of steps after `step` (and without a
    torn last line); returns how many lines went. The file is replaced atomically."""
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a kill mid-write
            continue
        if record.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) == len(lines):
        return 0
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return len(lines) - len(kept)


class TensorBoardSink:
    def __init__(self, log_dir: str, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the events of steps > start_step that an earlier attempt wrote
        self.writer = SummaryWriter(log_dir, purge_step=start_step + 1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, project: str, run_name: str, log_dir: str, config: dict, resume_id: Optional[str] = None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, name=run_name, dir=log_dir, config=config, id=resume_id,
                              resume="allow" if resume_id else None)

    @property
    def run_id(self) -> Optional[str]:
        return getattr(self.run, "id", None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MultiSink:
    def __init__(self, sinks: list):
        self.sinks = sinks

    @property
    def run_id(self) -> Optional[str]:
        """The wandb run id, if one of the sinks is wandb (to continue it after a resume)."""
        return next((s.run_id for s in self.sinks if getattr(s, "run_id", None)), None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for s in self.sinks:
            s.log(metrics, step)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def wandb_usable() -> bool:
    """wandb is installed, not disabled, and can log without asking for a key."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode == "disabled":
        return False
    try:
        import wandb
    except ImportError:
        return False
    if mode in ("offline", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return bool(wandb.Api().api_key)
    except Exception:  # no key configured, no network: fall back quietly
        return False


def resolve_logger(kind: str) -> str:
    if kind not in LOGGERS:
        raise ValueError(f"--logger must be one of {LOGGERS}, got {kind!r}")
    if kind == "auto":
        return "wandb" if wandb_usable() else "tensorboard"
    if kind == "wandb" and os.environ.get("WANDB_MODE", "").lower() == "disabled":
        return "none"
    return kind


def open_sink(kind: str, log_dir: str, *, is_main: bool, start_step: int = 0, project: str = "sesame",
              run_name: str = "sesame", config: Optional[dict] = None, resume_id: Optional[str] = None):
    """The metric sink for this process. `kind` is one of LOGGERS; `start_step` the step the run
    continues from (0 for a fresh run); returns (sink, resolved kind)."""
    if not is_main:
        return NullSink(), "none"
    resolved = resolve_logger(kind)
    sinks: list = [JsonlSink(os.path.join(log_dir, "metrics.jsonl"), start_step)]
    if resolved == "wandb":
        sinks.append(WandbSink(project, run_name, log_dir, config or {}, resume_id))
    elif resolved == "tensorboard":
        sinks.append(TensorBoardSink(log_dir, start_step))
    return MultiSink(sinks), resolved
