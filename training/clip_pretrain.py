"""Teach a Shapes model's CLIP tower to see shapes, before (or between) SESAME trainings.

LLaVA starts from a CLIP that already knows what is in a picture. The Shapes model's CLIP starts at
random and learns only through the language model's loss, and after thousands of SESAME steps its
patch features still say nothing about an object's kind (benchmarks/shapes_clip_probe.py: no better
than an untrained tower), so the model cannot tell a green triangle from a green circle.
This trains the tower on the world's own pixels, densely: from the features the projector reads
(`select_layer`), one linear head names the kind and another the colour of the object under each
patch centre (or background), and, with `--position_weight`, two more name the patch's own row and
column of the grid. A tower trained on kind and colour alone keeps a patch's place only loosely
(benchmarks/shapes_clip_probe.py reads the exact row of about half the patches from the shipped tower;
with the target, all of them), and the language model sees image tokens only through RoPE's relative
offsets, so orders ("the first square from the left") need the place in the features. The target is off
by default: on its own it did not teach the shipped model to read orders (benchmarks/RESULTS.md, eleventh
session). The heads are dropped afterwards; the tower is written in the released layout, into a copy of a
model directory (`--model`) or alone (`--out` only).

    python -m training.clip_pretrain --dataset_dir ./dataset_shapes --model runs/shapes/hf_model \\
        --out runs/shapes/hf_model_clip --steps 2000
    VERSION=runs/shapes/hf_model_clip bash train_sesame.sh Shapes localhost:0 29500 ...
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time

import torch
import torch.nn.functional as F

from dataset.shapes.patches import COLOR_NAMES, PatchLabelled
from dataset.shapes.scene import KINDS
from model.tiny import write_clip_checkpoint
from utils.errors import InputError

BACKGROUND_WEIGHT = 0.1


class PatchHeads(torch.nn.Module):
    """Linear read-outs of each patch's features: kind and colour under its centre, its row and column."""

    def __init__(self, width: int, grid: int):
        super().__init__()
        # a tower trained by SESAME at a high rate can carry features of norm ~800: normalising first keeps
        # the heads' first losses (and gradients) at the scale of a fresh tower's
        self.norm = torch.nn.LayerNorm(width, elementwise_affine=False)
        self.kind = torch.nn.Linear(width, len(KINDS) + 1)
        self.colour = torch.nn.Linear(width, len(COLOR_NAMES) + 1)
        self.row = torch.nn.Linear(width, grid)
        self.column = torch.nn.Linear(width, grid)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.norm(features)
        return {name: getattr(self, name)(features) for name in ("kind", "colour", "row", "column")}


def grid_positions(num_patches: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each patch in CLIP's row-major patch order (a square grid)."""
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid")
    index = torch.arange(num_patches, device=device)
    return index // grid, index % grid


def patch_features(tower, pixels: torch.Tensor, select_layer: int) -> torch.Tensor:
    """(B, num_patches, width): LLaVA's projector input (CLS dropped)."""
    return tower(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer][:, 1:]


def losses_and_hits(tower, heads, pixels, labels, select_layer: int, position_weight: float = 0.0):
    """The weighted patch loss and the counts `evaluate` sums: kind and colour right on covered patches,
    row and column right on every patch."""
    logits = heads(patch_features(tower, pixels, select_layer))
    kind, colour = labels[..., 0], labels[..., 1]
    on_object = kind > 0
    # background is most of a picture: weigh it down so the objects' kinds drive the tower
    weight = torch.where(on_object, 1.0, BACKGROUND_WEIGHT).flatten()
    per_patch = F.cross_entropy(logits["kind"].flatten(0, 1), kind.flatten(), reduction="none") + \
        F.cross_entropy(logits["colour"].flatten(0, 1), colour.flatten(), reduction="none")
    loss = (per_patch * weight).sum() / weight.sum()
    row, column = (t.expand_as(kind) for t in grid_positions(kind.shape[1], kind.device))
    if position_weight:
        # every patch alike: a place is as much the background's as an object's
        loss = loss + position_weight * (F.cross_entropy(logits["row"].flatten(0, 1), row.flatten()) +
                                         F.cross_entropy(logits["column"].flatten(0, 1), column.flatten()))
    hits = {"kind": int((logits["kind"].argmax(-1) == kind)[on_object].sum()),
            "colour": int((logits["colour"].argmax(-1) == colour)[on_object].sum()), "patches": int(on_object.sum()),
            "row": int((logits["row"].argmax(-1) == row).sum()),
            "column": int((logits["column"].argmax(-1) == column).sum()), "all_patches": kind.numel()}
    return loss, hits


@torch.no_grad()
def evaluate(tower, heads, loader, select_layer: int, device) -> dict[str, float]:
    """Kind and colour accuracy on the patches an object covers (background left out); row and column
    accuracy on every patch (meaningful only when the heads were trained, --position_weight > 0)."""
    tower.eval()
    total = dict.fromkeys(("kind", "colour", "patches", "row", "column", "all_patches"), 0)
    for pixels, labels in loader:
        _, hits = losses_and_hits(tower, heads, pixels.to(device), labels.to(device), select_layer)
        total = {k: total[k] + hits[k] for k in total}
    tower.train()
    n, everywhere = max(1, total["patches"]), max(1, total["all_patches"])
    return {"kind_accuracy": total["kind"] / n, "colour_accuracy": total["colour"] / n, "patches": total["patches"],
            "row_accuracy": total["row"] / everywhere, "column_accuracy": total["column"] / everywhere}


def load_tower(path: str, device):
    from transformers import CLIPVisionModel

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"{path}: not a CLIP directory (no config.json)")
    return CLIPVisionModel.from_pretrained(path, dtype=torch.float32).to(device)


def source_tower(args) -> str:
    """The CLIP directory trained: --vision_tower, else --model's own."""
    return args.vision_tower or os.path.join(args.model, "vision_tower")


def train(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tower = load_tower(source_tower(args), device)
    tower.train()
    cfg = tower.config
    heads = PatchHeads(cfg.hidden_size, cfg.image_size // cfg.patch_size).to(device)
    torch.manual_seed(args.seed)
    splits = PatchLabelled.splits(args.dataset_dir, ("train", "test"), cfg.image_size, cfg.patch_size)
    data, test = splits["train"], splits["test"]
    if not len(data):
        raise InputError(f"--dataset_dir {args.dataset_dir}: no training images")
    sampler = torch.utils.data.RandomSampler(data, replacement=True, num_samples=args.steps * args.batch_size,
                                             generator=torch.Generator().manual_seed(args.seed))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.workers, drop_last=True)
    test_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(test, range(min(len(test), args.test_images))),
                                              batch_size=args.batch_size, num_workers=args.workers)
    params = [p for p in tower.parameters() if p.requires_grad] + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup_steps) * max(0.0, 1 - s / args.steps))
    start, log = time.time(), []
    for step, (pixels, labels) in enumerate(loader, 1):
        loss, _ = losses_and_hits(tower, heads, pixels.to(device), labels.to(device), args.select_layer,
                                  args.position_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        if step % args.print_freq == 0 or step == args.steps:
            log.append({"step": step, "loss": loss.item(), "seconds": round(time.time() - start, 1)})
            if args.eval_freq and step % args.eval_freq == 0 and step < args.steps and len(test):
                log[-1]["test"] = evaluate(tower, heads, test_loader, args.select_layer, device)
            print(json.dumps(log[-1]), flush=True)
    after = evaluate(tower, heads, test_loader, args.select_layer, device) if len(test) else None
    write_tower(tower, args)
    result = {"losses": [e["loss"] for e in log], "steps": args.steps, "batch_size": args.batch_size,
              "device": str(device), "seconds": round(time.time() - start, 1), "test": after, "out": args.out}
    print(json.dumps(result), flush=True)
    return result


def write_tower(tower, args) -> None:
    """The tower in the released layout, in the source's dtype: `--out` is a copy of `--model` with its
    vision_tower replaced, or, without --model, the tower directory itself."""
    source = source_tower(args)
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")
    target = args.out
    if args.model:
        if os.path.abspath(args.out) != os.path.abspath(args.model):
            shutil.copytree(args.model, args.out, dirs_exist_ok=True)
        target = os.path.join(args.out, "vision_tower")
        point_at_own_tower(args.out)
    write_clip_checkpoint(tower.cpu(), target, dtype=dtype, processor_from=source)


def point_at_own_tower(model_dir: str) -> None:
    """config.json names the tower beside it ("vision_tower", relative), as the Shapes models do: a
    copy whose config kept an absolute path would load the old tower."""
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    for key in ("mm_vision_tower", "vision_tower"):
        if key in config:
            config[key] = "vision_tower"
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset_dir", required=True, help="a Shapes world (python -m dataset.shapes DIR)")
    p.add_argument("--model", default=None, help="a model directory in the released layout (its vision_tower)")
    p.add_argument("--vision_tower", default=None,
                   help="the CLIP directory to train (default: --model's); with --model, the trained tower replaces "
                        "the model's in --out (e.g. a fresh tower for a trained model)")
    p.add_argument("--out", required=True, help="the copy of --model with the trained tower (or the tower alone)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--position_weight", type=float, default=0.0,
                   help="weight of the row and column targets (0: kind and colour only, as the shipped model's tower "
                        "was trained; 1 makes every patch's place readable from its features)")
    p.add_argument("--select_layer", type=int, default=-2, help="the hidden state LLaVA's projector reads")
    p.add_argument("--test_images", type=int, default=300, help="test-split images scored after training")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--print_freq", type=int, default=100)
    p.add_argument("--eval_freq", type=int, default=0,
                   help="also score the test images every N steps (a multiple of --print_freq; 0: at the end only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if not (args.model or args.vision_tower):
        build_parser().error("give --model (its tower is trained) or --vision_tower (or both)")
    return train(args)


if __name__ == "__main__":
    main()
