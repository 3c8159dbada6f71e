"""Training-data throughput: HybridDataset items (image decode, CLIP + SAM preprocessing, masks) and
collate (tokenisation, label spans), per source and for the whole mixture, in one process.

    python benchmarks/data_throughput.py --dataset_dir ./dataset            # real data root
    python benchmarks/data_throughput.py --tiny                             # CPU smoke check on the synthetic root

The training step needs batch_size items per GPU per step; with W DataLoader workers the loader keeps
up when W * items/s exceeds batch_size / step time. Prints a Markdown table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset.collate import collate_fn  # noqa: E402
from dataset.hybrid import HybridDataset, split_names  # noqa: E402
from model.transforms import ClipTransform, SamTransform  # noqa: E402


def load_tokenizer(path: str | None):
    from model.tiny import tiny_tokenizer
    from model.tokenizer import add_sesame_tokens

    if path is None:
        return tiny_tokenizer(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                                           "tiny_tokenizer"))[0]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, use_fast=False, legacy=True)
    add_sesame_tokens(tok)
    return tok


def time_items(ds: HybridDataset, n: int, batch_size: int, tokenizer, max_len: int) -> dict:
    t0 = time.perf_counter()
    samples = [ds[i] for i in range(n)]
    t_items = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = 0
    for i in range(0, n, batch_size):
        b = collate_fn(samples[i:i + batch_size], tokenizer, model_max_length=max_len)
        rows += b.input_ids.shape[0]
    t_collate = time.perf_counter() - t0
    return {"items": n, "items_per_s": n / t_items, "collate_ms_per_item": 1000 * t_collate / n,
            "conversations_per_item": rows / n, "skipped": ds.skipped_counts()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", default=None)
    ap.add_argument("--tiny", action="store_true", help="synthetic root, tiny tokenizer, small images")
    ap.add_argument("--tokenizer", default=None, help="tokenizer path (default: the tiny test tokenizer)")
    ap.add_argument("--dataset", default="refer_seg||correct_refer_seg||vqa||neg_refer_seg")
    ap.add_argument("--sample_rates", default="12,2,2,1")
    ap.add_argument("--items", type=int, default=96)
    ap.add_argument("--batch_size", type=int, default=12)
    ap.add_argument("--clip_size", type=int, default=336)
    ap.add_argument("--sam_size", type=int, default=1024)
    ap.add_argument("--model_max_length", type=int, default=512)
    args = ap.parse_args(argv)

    tmp = None
    if args.tiny:
        from dataset.synthetic import generate
        tmp = tempfile.TemporaryDirectory()
        generate(tmp.name)
        args.dataset_dir = tmp.name
        args.clip_size, args.sam_size, args.items = 32, 64, min(args.items, 24)
        args.dataset = "sem_seg||refer_seg||correct_refer_seg||vqa||neg_refer_seg||reason_seg"
        args.sample_rates = "1,1,1,1,1,1"
    if not args.dataset_dir:
        ap.error("--dataset_dir is required unless --tiny")
    tokenizer = load_tokenizer(args.tokenizer)
    clip, sam = ClipTransform(args.clip_size), SamTransform(args.sam_size)
    names = split_names(args.dataset, "--dataset")
    results = {}
    for name in names + ["mixture"]:
        single = name != "mixture"
        ds = HybridDataset(args.dataset_dir, tokenizer, clip, sam, datasets=name if single else args.dataset,
                           sample_rates=[1] if single else args.sample_rates, samples_per_epoch=args.items)
        results[name] = time_items(ds, args.items, args.batch_size, tokenizer, args.model_max_length)
    print("| source | items/s (1 process) | collate ms/item | conversations/item |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['items_per_s']:.1f} | {r['collate_ms_per_item']:.2f} | "
              f"{r['conversations_per_item']:.2f} |")
    print(json.dumps({"clip_size": args.clip_size, "sam_size": args.sam_size, "results": results}))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
