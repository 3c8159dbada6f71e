"""How closely the 8-bit and 4-bit LLM follows the full-precision one: the same questions over an
evaluation set, answered by each; shares of identical answers and See decisions, and the mean IoU of
each query's first mask against the full-precision mask (both empty counts 1).

    python benchmarks/quant_agreement.py --pretrained_model_path assets/shapes_sesame \\
        --dataset_dir WORLD --val_dataset fprefcoco --split test [--device cpu --precision bf16]

Prints a Markdown table and one JSON line.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import test_sesame  # noqa: E402
from engine.build import load_predictor  # noqa: E402


def answers(predictor, images, read) -> list:
    out = []
    for image in images:
        rgb = read(image)
        out += predictor.ask_many([(rgb, [q.question for q in image.queries])])[0]
    return out


def first_mask_iou(a, b) -> float:
    ma = a.masks[0].numpy() if a.num_seg else None
    mb = b.masks[0].numpy() if b.num_seg else None
    if ma is None or mb is None or not (ma.any() or mb.any()):
        return 1.0 if (ma is None or not ma.any()) and (mb is None or not mb.any()) else 0.0
    return float((ma & mb).sum() / (ma | mb).sum())


def main(argv=None) -> dict:
    parser = test_sesame.build_parser()
    parser.description = __doc__.split("\n")[0]
    args = parser.parse_args(argv)
    images, report = test_sesame.load_eval_images(args)
    read = test_sesame.image_reader(args, report)
    results, reference = {}, None
    for bits in (None, 8, 4):
        args.load_in_8bit, args.load_in_4bit = bits == 8, bits == 4
        start = time.perf_counter()
        got = answers(load_predictor(args), images, read)
        name = f"int{bits}" if bits else args.precision
        if reference is None:
            reference = got
        results[name] = {
            "queries": len(got), "seconds": time.perf_counter() - start,
            "same_answer": float(np.mean([a.text == r.text for a, r in zip(got, reference)])),
            "same_see": float(np.mean([a.see == r.see for a, r in zip(got, reference)])),
            "mean_mask_iou": float(np.mean([first_mask_iou(a, r) for a, r in zip(got, reference)])),
        }
    print(f"\n| LLM weights | queries | identical answers | identical See | mean first-mask IoU vs {args.precision} |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['queries']} | {100 * r['same_answer']:.1f} % | {100 * r['same_see']:.1f} % | "
              f"{r['mean_mask_iou']:.3f} |")
    print(json.dumps({"checkpoint": args.pretrained_model_path, "dataset": f"{args.val_dataset} {args.split}",
                      "device": args.device, "precision": args.precision, "results": results}))
    return results


if __name__ == "__main__":
    main()
