"""What a Shapes model's CLIP tower tells the language model: linear probes on its patch features.

For every patch of CLIP's input (shortest-side resize and centre crop, as LLaVA preprocesses) that an
object covers at the patch centre, the features the projector reads (`select_layer`, LLaVA's -2) are
fitted, on the world's train split, to the object's kind and colour by a linear classifier, then scored
on its test split. The same probe on the patch's raw pixels and the majority class are the baselines:
a tower that has learned shapes beats both on kind. The same is done for every patch's own row and
column of the grid ("row", "column"): a tower whose features keep where a patch is reads them far above
the majority share (one row in ten for a 10 x 10 grid).

    python -m dataset.shapes /tmp/unseen --images 600 --seed 7 --val_fraction 0 --test_fraction 0.5
    python benchmarks/shapes_clip_probe.py --dataset_dir /tmp/unseen --vision_tower tmp/m_q512/vision_tower
    python benchmarks/shapes_clip_probe.py ... --vision_tower random   # the same architecture, untrained
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset.shapes.patches import COLOR_NAMES, PatchLabelled  # noqa: E402
from dataset.shapes.scene import KINDS  # noqa: E402
from training.clip_pretrain import grid_positions, patch_features  # noqa: E402
from training.clip_pretrain import load_tower as load_trained_tower  # noqa: E402


def load_tower(path: str, like: str | None):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if path != "random":
        return load_trained_tower(path, "cpu").eval()
    if like is None:
        raise SystemExit("--vision_tower random needs --like DIR: the tower whose architecture to initialise")
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig.from_pretrained(like)).float().eval()  # the constructor initialises


def collect(tower, patches: PatchLabelled, limit: int | None, select_layer: int):
    """Features, raw pixels and (kind, colour, row, column) labels of every patch of the first `limit`
    images; kind and colour are -1 on background."""
    p = tower.config.patch_size
    feats, pixels, labels = [], [], []
    for i in range(min(len(patches), limit or len(patches))):
        px, lab = patches[i]
        with torch.no_grad():
            hidden = patch_features(tower, px[None], select_layer)[0]
        raw = px.unfold(1, p, p).unfold(2, p, p).permute(1, 2, 0, 3, 4).reshape(-1, 3 * p * p)
        row, column = grid_positions(len(lab))
        feats.append(hidden)
        pixels.append(raw)
        labels.append(torch.cat([lab - 1, row[:, None], column[:, None]], 1))  # 0 (background) -> -1
    return torch.cat(feats), torch.cat(pixels), torch.cat(labels)


def linear_probe(x_train, y_train, x_test, y_test, classes: int, steps: int = 300, seed: int = 0) -> float:
    """Test accuracy of a softmax classifier fitted full-batch on standardised features."""
    torch.manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    head = torch.nn.Linear(x_train.shape[1], classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x_train), y_train).backward()
        opt.step()
    with torch.no_grad():
        return (head(x_test).argmax(1) == y_test).float().mean().item()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset_dir", required=True, help="a Shapes world (python -m dataset.shapes DIR)")
    ap.add_argument("--vision_tower", required=True,
                    help="a CLIP tower directory (a model's vision_tower) or 'random'")
    ap.add_argument("--like", default=None, help="with 'random': the tower whose architecture to initialise")
    ap.add_argument("--select_layer", type=int, default=-2, help="the hidden state LLaVA's projector reads")
    ap.add_argument("--limit_images", type=int, default=None, help="per split")
    args = ap.parse_args(argv)
    tower = load_tower(args.vision_tower, args.like)
    splits = PatchLabelled.splits(args.dataset_dir, ("train", "test"), tower.config.image_size,
                                  tower.config.patch_size)
    if not all(len(d) for d in splits.values()):
        raise SystemExit(f"{args.dataset_dir}: the probe needs train and test images")
    train, test = (collect(tower, splits[s], args.limit_images, args.select_layer) for s in ("train", "test"))
    covered = train[2][:, 0] >= 0, test[2][:, 0] >= 0
    result = {"vision_tower": args.vision_tower, "train_patches": int(covered[0].sum()),
              "test_patches": int(covered[1].sum()), "all_test_patches": len(test[2])}
    grid = tower.config.image_size // tower.config.patch_size
    for name, column, classes, on_objects in (("kind", 0, len(KINDS), True), ("colour", 1, len(COLOR_NAMES), True),
                                              ("row", 2, grid, False), ("column", 3, grid, False)):
        keep_train, keep_test = covered if on_objects else (slice(None), slice(None))
        y_train, y_test = train[2][keep_train, column], test[2][keep_test, column]
        x_train, x_test = train[0][keep_train], test[0][keep_test]
        result[name] = {
            "clip": linear_probe(x_train, y_train, x_test, y_test, classes),
            "raw_pixels": linear_probe(train[1][keep_train], y_train, test[1][keep_test], y_test, classes),
            "majority": float(np.bincount(y_test.numpy(), minlength=classes).max() / len(y_test)),
        }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
