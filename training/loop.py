"""The training loop: epochs of optimizer steps, each of `grad_accumulation_steps` micro-steps of
DeepSpeed forward / backward / step; validation after each epoch; latest and best checkpoints.

Read top to bottom: `run_training` walks the epochs from wherever the resumed state left off;
`train_epoch` runs one epoch's steps and logs; `end_of_epoch` validates and saves.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from model.batch import SesameBatch
from utils import distributed as dist_utils

from .checkpoints import BEST, LATEST, RunCheckpoints, TrainState, set_rng_state

LOSS_PARTS = ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss", "mask_loss")
WEIGHTED_PARTS = {"ce_loss": "ce_loss_weight", "mask_bce_loss": "bce_loss_weight", "mask_dice_loss": "dice_loss_weight"}
BEST_METRICS = ("giou", "ciou", "see")


@dataclass
class LoopConfig:
    epochs: int
    steps_per_epoch: int
    grad_accumulation_steps: int
    print_freq: int = 3
    save_steps: int = 0  # also save `ckpt_model` every N optimizer steps (0: at epoch ends only)
    no_eval: bool = False
    best_metric: str = "giou"

    def __post_init__(self) -> None:
        if self.best_metric not in BEST_METRICS:
            raise ValueError(f"--best_metric must be one of {BEST_METRICS}, got {self.best_metric!r}")
        for name in ("epochs", "steps_per_epoch", "grad_accumulation_steps", "print_freq"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.save_steps < 0:
            raise ValueError(f"--save_steps must be >= 0, got {self.save_steps}")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


class DataCounts:
    """What the data pipeline had to leave out during an epoch: unreadable items (per source and
    reason, from the samples' `skipped`, keyed "<source>/<reason>", e.g. "refcoco/not_found") and
    rows cut by truncation with the masks dropped alongside."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, batch: SesameBatch) -> None:
        meta = batch.meta or {}
        for source_reason, n in (meta.get("skipped") or {}).items():
            self._bump(f"skipped/{source_reason}", n)
        for key in ("truncated_rows", "dropped_masks"):
            self._bump(key, meta.get(key, 0))

    def _bump(self, key: str, n: int) -> None:
        if n:
            self.counts[key] = self.counts.get(key, 0) + int(n)

    def report(self, epoch: int) -> dict[str, int]:
        """Summed over ranks (a collective: every rank calls it)."""
        total = dist_utils.sum_counts(self.counts)
        if total and dist_utils.is_main():
            print(f"[epoch {epoch}] data left out: " + ", ".join(f"{k}={v}" for k, v in sorted(total.items())),
                  flush=True)
        return total


class LossMeter:
    """Sums of the loss parts over the micro-steps since the last report.

    Reported on the original's scale: it logged ce_loss, mask_bce_loss and mask_dice_loss each
    multiplied by its loss weight (so mask_loss = mask_bce_loss + mask_dice_loss and loss = ce_loss
    + mask_loss). The model's per-mask means come out as train/unweighted/<part>.
    """

    def __init__(self, weights) -> None:
        self.weights = weights  # model.config.LossConfig
        self.sums: dict[str, torch.Tensor | float] = {k: 0.0 for k in LOSS_PARTS}
        self.count = 0
        self.samples = 0
        self.data_wait = 0.0  # seconds the loop waited for the data loader
        self.start = time.perf_counter()

    def add(self, out, samples: int) -> None:
        for k in LOSS_PARTS:  # kept on the device: no GPU sync per micro-step
            self.sums[k] = self.sums[k] + getattr(out, k).detach().float()
        self.count += 1
        self.samples += samples

    def report(self) -> dict[str, float]:
        n = max(self.count, 1)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        means = {k: float(v) / n for k, v in self.sums.items()}
        weighted = {k: getattr(self.weights, w) * means[k] for k, w in WEIGHTED_PARTS.items()}
        return {**{f"train/{k}": weighted.get(k, v) for k, v in means.items()},
                **{f"train/unweighted/{k}": means[k] for k in WEIGHTED_PARTS},
                "train/samples_per_sec": self.samples / elapsed,
                "train/data_wait_fraction": self.data_wait / elapsed}


@dataclass
class LoopIO:
    """The run's collaborators, built by the script.

    batches(start, stop): the collated micro-batches of micro-steps [start, stop) for this rank.
    validate(): metrics dict (giou, ciou, see, counts), identical on every rank.
    to_device(batch): the batch on the engine's device, images in the engine's dtype.
    """

    batches: Callable[[int, int], Iterable[SesameBatch]]
    validate: Optional[Callable[[], dict]]
    to_device: Callable[[SesameBatch], SesameBatch]
    checkpoints: RunCheckpoints
    sink: object  # utils.logging.MetricSink
    world_size: int = 1
    progress: bool = True


def run_training(engine, cfg: LoopConfig, io: LoopIO, state: TrainState) -> TrainState:
    if state.rng is not None:  # resumed: continue the random streams (LoRA dropout) where they were saved
        set_rng_state(state.rng)
        state.rng = None
    start_epoch = state.global_step // cfg.steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        train_epoch(engine, cfg, io, state, epoch)
        end_of_epoch(engine, cfg, io, state, epoch)
    return state


def train_epoch(engine, cfg: LoopConfig, io: LoopIO, state: TrainState, epoch: int) -> None:
    first = state.global_step - epoch * cfg.steps_per_epoch  # > 0 when resuming mid-epoch
    last = cfg.steps_per_epoch
    accum = cfg.grad_accumulation_steps
    batches = iter(io.batches(state.global_step * accum, (epoch + 1) * cfg.steps_per_epoch * accum))
    bar = _progress_bar(io.progress, epoch, cfg, first)
    engine.train()
    loss_weights = engine.module.config.loss
    meter = LossMeter(loss_weights)
    data_counts = DataCounts()
    for step_in_epoch in range(first, last):
        lr = float(engine.get_lr()[0])  # the rate this optimizer step uses
        for _ in range(accum):
            waited = time.perf_counter()
            batch = next(batches)
            meter.data_wait += time.perf_counter() - waited
            data_counts.add(batch)
            batch = io.to_device(batch)
            out = engine(batch)
            engine.backward(out.loss)
            engine.step()
            meter.add(out, samples=len(batch.original_sizes) * io.world_size)
        state.global_step += 1
        if engine.global_steps != state.global_step:
            raise RuntimeError(f"DeepSpeed counts {engine.global_steps} optimizer steps, the loop {state.global_step}")
        done_in_epoch = step_in_epoch + 1
        if done_in_epoch % cfg.print_freq == 0 or done_in_epoch == last:
            metrics = {**meter.report(), "train/lr": lr, "train/epoch": epoch}
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            io.sink.log(metrics, step=state.global_step)
            if bar is not None:
                bar.set_postfix(_postfix(metrics), refresh=False)
            meter = LossMeter(loss_weights)
        if bar is not None:
            bar.update(1)
        if cfg.save_steps and state.global_step % cfg.save_steps == 0 and done_in_epoch != last:
            io.checkpoints.save(engine, state, LATEST)
    if bar is not None:
        bar.close()
    left_out = data_counts.report(epoch)
    if left_out:
        io.sink.log({f"data/{k}": v for k, v in left_out.items()}, step=state.global_step)


def end_of_epoch(engine, cfg: LoopConfig, io: LoopIO, state: TrainState, epoch: int) -> None:
    """Validate (unless --no_eval), then save the latest state, and the best one when it improved."""
    improved = cfg.no_eval or io.validate is None
    if not improved:
        metrics = io.validate()
        if cfg.best_metric not in metrics:
            raise ValueError(f"--best_metric {cfg.best_metric} is not among the validation metrics {sorted(metrics)}")
        score = metrics[cfg.best_metric]
        improved = state.best_score is None or score > state.best_score
        if improved:
            state.best_score, state.best_step = score, state.global_step
        state.validations.append({"step": state.global_step, "epoch": epoch, **metrics})
        io.sink.log({f"val/{k}": v for k, v in metrics.items()} | {"val/best": state.best_score},
                    step=state.global_step)
        if dist_utils.is_main():
            print(f"[epoch {epoch}] step {state.global_step} " + " ".join(_fmt(k, v) for k, v in metrics.items())
                  + f" | best {cfg.best_metric}={state.best_score:.4f} (step {state.best_step})", flush=True)
    # Best first: once `latest` says an epoch is done, its best checkpoint is on disk too.
    if improved and not (cfg.no_eval or io.validate is None):
        io.checkpoints.save(engine, state, BEST)
    io.checkpoints.save(engine, state, LATEST)


def _fmt(name: str, value) -> str:
    return f"{name}={value:.4f}" if isinstance(value, float) else f"{name}={value}"


def _progress_bar(enabled: bool, epoch: int, cfg: LoopConfig, first: int):
    if not (enabled and dist_utils.is_main()):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps_per_epoch, initial=first, desc=f"epoch {epoch}/{cfg.epochs}", dynamic_ncols=True)


def _postfix(metrics: dict[str, float]) -> dict[str, str]:
    short = {"train/loss": "loss", "train/ce_loss": "ce", "train/mask_bce_loss": "bce", "train/mask_dice_loss": "dice",
             "train/lr": "lr", "train/samples_per_sec": "samples/s"}
    return {name: (f"{metrics[k]:.2e}" if name == "lr" else f"{metrics[k]:.3f}") for k, name in short.items()}


@torch.no_grad()
def loss_on_batch(engine, batch: SesameBatch) -> float:
    """The loss of one batch in eval mode (used by tests and sanity checks)."""
    was_training = engine.module.training
    engine.eval()
    out = engine(batch)
    if was_training:
        engine.train()
    return float(out.loss.float())
