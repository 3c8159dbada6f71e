"""Full-size smoke check on a GPU: LLaMA-7B + CLIP-L/336 + SAM ViT-H with random bf16 weights.

Builds the model directly on the GPU, runs one KV-cached `predict` over 4 queries of 2 images and one
LoRA training forward/backward with gradient checkpointing, and prints timings and peak memory.
Usage: python benchmarks/smoke_full_size.py [--llm llama-7b] [--batch 2]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.batch import SesameBatch  # noqa: E402
from model.config import SesameConfig  # noqa: E402
from model.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from model.lora import apply_lora, enable_gradient_checkpointing, set_trainable  # noqa: E402
from model.sesame import SesameModel  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm", default="llama-7b")
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    dev = "cuda"
    cfg = SesameConfig.preset(args.llm, "clip-l-336", "vit_h")
    seg, eos = 32000, 2
    t0 = time.time()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        model = SesameModel(cfg)
    torch.set_default_dtype(torch.float32)
    model._apply(lambda t: t)  # keep SAM's PE float32
    torch.cuda.synchronize()
    print(f"build: {time.time() - t0:.1f}s params={sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
          f"mem={torch.cuda.memory_allocated() / 2**30:.1f}GiB")
    model.eval()
    g = torch.Generator().manual_seed(0)
    clip = torch.randn(2, 3, 336, 336, generator=g).to(dev, torch.bfloat16)
    sam = torch.randn(2, 3, 1024, 1024, generator=g).to(dev, torch.bfloat16)
    prompts = [[1] + list(range(100, 100 + n)) + [32001, IMAGE_TOKEN_INDEX, 32002] + list(range(200, 230))
               for n in (40, 45, 38, 50)]

    def hook(step, logits):
        logits = logits.clone()
        if step == 3:
            logits[::2, seg] += 1e4
        if step == 8:
            logits[:, eos] += 1e4
        return logits
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.time()
        preds = model.predict(clip, sam, [(768, 1024)] * 2, [(480, 640)] * 2, prompts, [0, 0, 1, 1], max_new_tokens=24,
                              logits_hook=hook)
        torch.cuda.synchronize()
    print(f"predict 4 queries: {time.time() - t0:.2f}s  segs={[p.output_ids.count(seg) for p in preds]} "
          f"mask shapes={[tuple(p.masks.shape) for p in preds]}")

    apply_lora(model)
    set_trainable(model)
    enable_gradient_checkpointing(model)
    model.train()
    b = args.batch
    rows = []
    for i in range(b):
        ids = ([1] + list(range(100, 140)) + [32001, IMAGE_TOKEN_INDEX, 32002] + list(range(200, 240))
               + [300, 301, seg, 302, eos])
        rows.append(ids)
    ids = torch.tensor(rows, device=dev)
    labels = ids.clone()
    labels[:, :-5] = IGNORE_INDEX
    masks = [torch.zeros(1, 480, 640, dtype=torch.uint8, device=dev) for _ in range(b)]
    for m in masks:
        m[0, 100:200, 100:300] = 1
    batch = SesameBatch(images_clip=clip[:1].repeat(b, 1, 1, 1), images_sam=sam[:1].repeat(b, 1, 1, 1), input_ids=ids,
                        labels=labels, attention_mask=torch.ones_like(ids, dtype=torch.bool),
                        offset=torch.arange(b + 1, device=dev), masks=masks, resized_sizes=[(768, 1024)] * b,
                        original_sizes=[(480, 640)] * b)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.time()
        out = model(batch)
        out.loss.backward()
        torch.cuda.synchronize()
    print(f"train fwd+bwd batch {b}: {time.time() - t0:.2f}s loss={out.loss.item():.3f} ce={out.ce_loss.item():.3f} "
          f"bce={out.mask_bce_loss.item():.3f} dice={out.mask_dice_loss.item():.3f} "
          f"peak={torch.cuda.max_memory_allocated() / 2**30:.1f}GiB")


if __name__ == "__main__":
    main()
