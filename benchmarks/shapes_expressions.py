"""Where a Shapes model's masks go wrong, by the form of the referring expression.

    # IoU per expression type (attribute, size, order, relation), from an evaluation's records and
    # the world they came from (its shapes_manifest.json says each sentence's type)
    python benchmarks/shapes_expressions.py by_type --records EV/fprefcoco_test/shard_0_of_1.jsonl --world WORLD
    # does the model read an order's direction? For each test-split order expression ("second square
    # from the left") it also asks the opposite direction ("second square from the right"), which names
    # another object, and counts which object each mask covers
    python benchmarks/shapes_expressions.py direction --model assets/shapes_sesame --world WORLD --limit 200
    # does the direction word reach the state that prompts SAM? the distance between the [SEG] states of
    # the two directions, beside that between two attribute expressions for different objects
    python benchmarks/shapes_expressions.py states --model assets/shapes_sesame --world WORLD --device cpu
    # the same in text: "What is the first shape from the left?" / "... from the right?"
    python benchmarks/shapes_expressions.py order_answers --model MODEL --world WORLD --device cpu
    # does the language model say where an object is? "Where is the red square?" (a VQA form of every
    # world), scored against the 3 x 3 region of the object's centre in what CLIP sees
    python benchmarks/shapes_expressions.py where_answers --model MODEL --world WORLD --device cpu
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset.coco_masks import decode_segmentation  # noqa: E402
from dataset.shapes.language import DIRECTIONS, ORDINALS, Description, Expression, where_questions  # noqa: E402
from dataset.shapes.scene import COLORS, KINDS, SIZES  # noqa: E402
from dataset.shapes.world import MANIFEST, coco_file, image_dir, manifest_scene  # noqa: E402

QUESTION = ("Segment {} if you can see it in this image. Otherwise, answer that it is not present and, "
            "if possible, name something resembling it.")
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
ORDER = re.compile(rf"({'|'.join(ORDINALS)}) (.+) from the ({'|'.join(DIRECTIONS)})")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _manifest(world: str) -> dict[int, dict]:
    with open(os.path.join(world, MANIFEST)) as f:
        return {im["image_id"]: im for im in json.load(f)["images"]}


def _description(text: str) -> Description:
    words = text.split()
    kind = words.pop()
    size = words.pop(0) if words and words[0] in SIZES else None
    color = words.pop(0) if words and words[0] in COLORS else None
    return Description(kind if kind in KINDS else None, color, size)


def by_type(records_path: str, world: str) -> dict:
    from evaluation.records import read_shard
    from utils.mask_io import decode_rle

    images = _manifest(world)
    types = {(iid, text): kind for iid, im in images.items() for ref in im["refs"] for text, kind in ref["positives"]}
    ious: dict[str, list[float]] = collections.defaultdict(list)
    for r in read_shard(records_path):
        if not r.gt_exists:
            continue
        gt = decode_rle(r.gt_mask) == 1
        pred = decode_rle(r.pred_mask).astype(bool) if r.pred_mask else np.zeros_like(gt)
        kind = types.get((r.image_id, r.sentence), "unknown")
        ious[kind].append(_iou(pred, gt))
        m = ORDER.fullmatch(r.sentence)
        if m:
            ious[f"order, {m[1]}"].append(ious[kind][-1])
    out = {k: {"queries": len(v), "mean_iou": float(np.mean(v)), "hit": float(np.mean(np.array(v) > 0.5))}
           for k, v in sorted(ious.items())}
    for k, v in out.items():
        print(f"{k:16s} {v['queries']:5d} queries  mean IoU {v['mean_iou']:.3f}  IoU > 0.5: {v['hit']:.1%}")
    return out


def _direction_asks(images: dict[int, dict], limit: int) -> list:
    """(image, [(text, target object index)] for an order expression and its opposite), test split."""
    asks = []
    for im in images.values():
        if im["split"] != "test":
            continue
        objects = manifest_scene(im).objects
        for ref in im["refs"]:
            for text, kind in ref["positives"]:
                m = ORDER.fullmatch(text) if kind == "order" else None
                if not m:
                    continue
                flipped = Expression(_description(m[2]), order=(ORDINALS.index(m[1]), OPPOSITE[m[3]]))
                target = flipped.resolve(objects, 1.0)
                if target and target != [ref["object"]]:
                    asks.append((im, [(text, ref["object"]), (flipped.text(), target[0])]))
        if len(asks) >= limit:
            break
    return asks[:limit]


def _predictor(model: str, device: str):
    import torch

    from engine.build import build_predictor
    from model.builder import load_pretrained

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    return build_predictor(load_pretrained(model, device=device, dtype=dtype), max_new_tokens=32)


def _answers(predictor, world: str, chunk: list, template: str = QUESTION) -> list:
    """The answers to each (image, [(text, _), ...]) of `chunk`, each text put into `template`."""
    from dataset.image_io import read_image_rgb

    paths = [os.path.join(image_dir(world), coco_file(im["image_id"])) for im, _ in chunk]
    return predictor.ask_many([(read_image_rgb(path, "image"), [template.format(t) for t, _ in pair])
                               for path, (_, pair) in zip(paths, chunk)])


def direction(model: str, world: str, limit: int, device: str) -> dict:
    images = _manifest(world)
    asks = _direction_asks(images, limit)
    with open(os.path.join(world, "refer_seg", "fprefcoco", "instances.json")) as f:  # the visible pixels
        segmentation = {a["id"]: a["segmentation"] for a in json.load(f)["annotations"]}
    predictor = _predictor(model, device)
    per_question, per_pair, per_axis = collections.Counter(), collections.Counter(), collections.Counter()
    for start in range(0, len(asks), 16):
        chunk = asks[start:start + 16]
        for (im, pair), outs in zip(chunk, _answers(predictor, world, chunk)):
            h, w = im["height"], im["width"]
            truths = [decode_segmentation(segmentation[o["ann_id"]], h, w).astype(bool) for o in im["objects"]]
            hits = []
            for (_, target), a in zip(pair, outs):
                mask = a.masks[0].cpu().numpy().astype(bool) if a.num_seg else np.zeros((h, w), bool)
                best = int(np.argmax([_iou(mask, t) for t in truths]))
                hits.append(best if _iou(mask, truths[best]) > 0.5 else -1)
                where = "asked object" if hits[-1] == target else "another object" if hits[-1] >= 0 else "no object"
                per_question[where] += 1
            axis = "left/right" if ORDER.fullmatch(pair[0][0])[3] in ("left", "right") else "top/bottom"
            both = hits[0] == pair[0][1] and hits[1] == pair[1][1]
            per_pair["both right"] += both
            per_pair["same object for both directions"] += hits[0] == hits[1] >= 0
            per_axis[axis] += 1
            per_axis[f"{axis}: both right"] += both
    pairs = len(asks)
    out = {"pairs": pairs, **{k: v / (2 * pairs) for k, v in per_question.items()},
           **{k: v / pairs for k, v in per_pair.items()},
           **{f"{axis} pairs": per_axis[axis] for axis in ("left/right", "top/bottom")},
           **{k: per_axis[k] / per_axis[k.split(":")[0]] for k in per_axis if ":" in k}}
    print(json.dumps(out, indent=1))
    return out


def states(model: str, world: str, limit: int, device: str) -> dict:
    """How far the state that predicts [SEG] moves when only an order's direction changes ("first square
    from the left" / "... from the right", one picture), against two attribute expressions that name
    different objects of one picture ("the red circle" / "the blue square"). A model that reads the
    direction moves it about as far; one that ignores the word hardly moves it."""
    images = _manifest(world)
    pairs = _direction_asks(images, limit)
    for im in images.values():  # attribute pairs: the first two objects with an attribute expression
        if im["split"] != "test" or len(pairs) >= 2 * limit:
            continue
        named = [(text, ref["object"]) for ref in im["refs"] for text, kind in ref["positives"] if kind == "attribute"]
        firsts = list({obj: (text, obj) for text, obj in reversed(named)}.values())
        if len(firsts) >= 2:
            pairs.append((im, firsts[:2]))
    predictor = _predictor(model, device)
    distances: dict[str, list[float]] = collections.defaultdict(list)
    for start in range(0, len(pairs), 16):
        chunk = pairs[start:start + 16]
        for (im, pair), outs in zip(chunk, _answers(predictor, world, chunk)):
            if not all(a.num_seg for a in outs):
                continue
            a, b = (o.seg_hidden[0].float().cpu().numpy() for o in outs)
            kind = "order, direction flipped" if ORDER.fullmatch(pair[0][0]) else "attribute, another object"
            distances[kind].append(float(np.linalg.norm(a - b)))
            distances["state norm"] += [float(np.linalg.norm(a)), float(np.linalg.norm(b))]
    out = {k: {"pairs" if k != "state norm" else "states": len(v), "mean": float(np.mean(v))}
           for k, v in distances.items()}
    print(json.dumps(out, indent=1))
    return out


def order_answers(model: str, world: str, limit: int, device: str) -> dict:
    """The same question in text: "What is the first shape from the left?" and "... from the right?" on
    test pictures where the two name different objects (the VQA form of `--order_questions`); an answer
    is right when it names the object's colour and kind."""
    asks = []
    for im in _manifest(world).values():
        if im["split"] != "test" or len(im["objects"]) < 2:
            continue
        objects = manifest_scene(im).objects
        side = min(im["width"], im["height"])
        named = [Expression(Description(), order=(0, d)).resolve(objects, side) for d in ("left", "right")]
        if all(n and len(n) == 1 for n in named) and named[0] != named[1]:
            asks.append((im, [(f"What is the first shape from the {d}?", f"{objects[n[0]].color} {objects[n[0]].kind}")
                              for d, n in zip(("left", "right"), named)]))
        if len(asks) >= limit:
            break
    predictor = _predictor(model, device)
    counts = collections.Counter()
    for start in range(0, len(asks), 16):
        chunk = asks[start:start + 16]
        for (_, qs), answers in zip(chunk, _answers(predictor, world, chunk, template="{}")):
            right = [want in a.text for (_, want), a in zip(qs, answers)]
            counts["questions right"] += sum(right)
            counts["from the left: right"] += right[0]
            counts["from the right: right"] += right[1]
            counts["pairs both right"] += all(right)
            counts["pairs, same answer"] += answers[0].text == answers[1].text
    pairs = len(asks)
    out = {"pairs": pairs, "questions right": counts["questions right"] / max(1, 2 * pairs),
           "from the left: right": counts["from the left: right"] / max(1, pairs),
           "from the right: right": counts["from the right: right"] / max(1, pairs),
           "pairs both right": counts["pairs both right"] / max(1, pairs),
           "pairs, same answer": counts["pairs, same answer"] / max(1, pairs)}
    print(json.dumps(out, indent=1))
    return out


def where_asks(images: dict[int, dict], limit: int) -> list:
    """(image, [(question, expected answer), ...]) for test pictures: every object unique by colour and
    kind, answered as the world's VQA answers it (`language.where_questions`)."""
    asks = []
    for im in images.values():
        if im["split"] != "test":
            continue
        pair = where_questions(manifest_scene(im))
        if pair:
            asks.append((im, pair))
        if len(asks) >= limit:
            break
    return asks


def _row_column(answer: str) -> tuple[str, str]:
    row = next((w for w in ("top", "bottom") if w in answer), "middle")
    column = next((w for w in ("left", "right") if w in answer), "middle")
    return row, column


def where_answers(model: str, world: str, limit: int, device: str) -> dict:
    asks = where_asks(_manifest(world), limit)
    predictor = _predictor(model, device)
    counts = collections.Counter()
    for start in range(0, len(asks), 16):
        chunk = asks[start:start + 16]
        for (_, qs), answers in zip(chunk, _answers(predictor, world, chunk, template="{}")):
            for (_, want), a in zip(qs, answers):
                got, expected = _row_column(a.text), _row_column(want)
                counts["questions"] += 1
                counts["region right"] += a.text.strip() == want
                counts["row right"] += got[0] == expected[0]
                counts["column right"] += got[1] == expected[1]
    n = max(1, counts["questions"])
    out = {"questions": counts["questions"],
           **{k: counts[k] / n for k in ("region right", "row right", "column right")}}
    print(json.dumps(out, indent=1))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("by_type")
    a.add_argument("--records", required=True)
    a.add_argument("--world", required=True)
    # the three that ask a model: (function, --limit default, what --limit counts)
    asking = {"direction": (direction, 200, "order expressions (each asked both ways)"),
              "states": (states, 200, "order pairs (and as many attribute pairs)"),
              "order_answers": (order_answers, 120, "pictures (each asked both ways)"),
              "where_answers": (where_answers, 120, "pictures (each object unique by colour and kind asked)")}
    for name, (_, limit, counts) in asking.items():
        b = sub.add_parser(name)
        b.add_argument("--model", required=True)
        b.add_argument("--world", required=True)
        b.add_argument("--limit", type=int, default=limit, help=counts)
        b.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    if args.cmd == "by_type":
        return by_type(args.records, args.world)
    return asking[args.cmd][0](args.model, args.world, args.limit, args.device)


if __name__ == "__main__":
    main()
