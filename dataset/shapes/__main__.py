"""python -m dataset.shapes OUT_DIR --images N --seed S [--workers K]: write a shapes world."""
from __future__ import annotations

import argparse
import json
import os
import time

from .language import DIRECTIONS
from .scene import COLORS, KINDS, SceneSpec
from .world import WorldConfig, generate_world, summary


def _names(value: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"--{what}: unknown or no names {unknown or value!r}; known: {','.join(known)}")
    return names


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dataset.shapes",
                                description="Write a world of coloured shapes in the FP-RefCOCO / RefCOCO / "
                                            "LLaVA-Instruct formats (see dataset/shapes/__init__.py)")
    p.add_argument("out_dir")
    p.add_argument("--images", type=int, required=True, help="number of images (all splits)")
    p.add_argument("--seed", type=int, default=0, help="the world: same seed and arguments, same bytes")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes drawing images")
    p.add_argument("--val_fraction", type=float, default=0.05)
    p.add_argument("--test_fraction", type=float, default=0.1)
    p.add_argument("--no_binding_false_premises", dest="binding_false_premises", action="store_false",
                   help="false premises replace only attributes no object has (the worlds before 2026-11-26 "
                        "evening; a model trained on them accepts 'green square' beside a green triangle and a "
                        "red square)")
    p.add_argument("--favour", default="", help="comma-separated expression types (attribute, size, order, "
                   "relation) that every object's positives include wherever it has them: a training world "
                   "that stresses them (default: random types)")
    p.add_argument("--order_questions", type=int, default=0,
                   help="VQA rounds per training image that ask what an order names ('What is the second shape "
                        "from the left?'), where the scene has such orders: a language-loss signal that turns on "
                        "the direction word (default 0: none, the worlds before 2026-11-26 night)")
    p.add_argument("--position_questions", action="store_true",
                   help="mix into the VQA file, for each training image, conversations asking every 'Where is the "
                        "red square?' and every order question it has (the shipped model's last stage)")
    p.add_argument("--order_directions", default=",".join(DIRECTIONS),
                   help="comma-separated directions orders are counted from, in expressions and questions "
                        "(default: all four; a curriculum's first stage counts from the left only)")
    g = p.add_argument_group("a reduced world (default: the full one)")
    g.add_argument("--max_shapes", type=int, default=SceneSpec.max_shapes, help="shapes per image at most")
    g.add_argument("--min_shapes", type=int, default=SceneSpec.min_shapes, help="shapes per image at least")
    g.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of " + ",".join(KINDS))
    g.add_argument("--colors", default=",".join(COLORS), help="comma-separated subset of " + ",".join(COLORS))
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1")
    try:
        spec = SceneSpec(min_shapes=args.min_shapes, max_shapes=args.max_shapes,
                         kinds=_names(args.kinds, KINDS, "kinds"),
                         colors=_names(args.colors, tuple(COLORS), "colors"))
        config = WorldConfig(images=args.images, seed=args.seed, val_fraction=args.val_fraction,
                             test_fraction=args.test_fraction, scene=spec,
                             binding_false_premises=args.binding_false_premises,
                             favoured_expressions=tuple(t for t in args.favour.split(",") if t),
                             order_questions=args.order_questions, position_questions=args.position_questions,
                             order_directions=_names(args.order_directions, DIRECTIONS, "order_directions"))
    except ValueError as e:
        p.error(str(e))
    t0 = time.perf_counter()
    records = generate_world(args.out_dir, config, workers=args.workers)
    print(json.dumps({"out_dir": args.out_dir, "seed": args.seed, **summary(records),
                      "seconds": round(time.perf_counter() - t0, 2)}))


if __name__ == "__main__":
    main()
