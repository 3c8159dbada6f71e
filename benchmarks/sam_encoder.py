"""SAM ViT-H image encoder throughput: segment_anything's own attention vs the SDPA attention this
project uses (model/sam.py), with its relative-position channels written by the Triton kernels
(model/sam_rel_pos_kernel.py) and by PyTorch calls, optionally under torch.compile. Random bf16
weights on the GPU.

    python benchmarks/sam_encoder.py [--batch 8] [--iters 5] [--compile]
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the library reference encoder

from sam_reference import library_encoder  # noqa: E402

from model import sam_rel_pos_kernel  # noqa: E402
from model.config import SAM_PRESETS  # noqa: E402
from model.sam import SdpaSamAttention, build_sam  # noqa: E402


def timeit(fn, x, iters):
    with torch.inference_mode():
        fn(x)
        torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(iters):
            out = fn(x)
        torch.cuda.synchronize()
    return (time.time() - t0) / iters, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    encoder = build_sam(SAM_PRESETS["vit_h"]).image_encoder.to("cuda", torch.bfloat16).eval()
    assert all(isinstance(b.attn, SdpaSamAttention) for b in encoder.blocks)
    x = torch.randn(args.batch, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    lib = library_encoder(encoder)
    t_lib, out_lib = timeit(lib, x, args.iters)
    t_sdpa, out_sdpa = timeit(encoder, x, args.iters)
    kernel = sam_rel_pos_kernel.available
    sam_rel_pos_kernel.available = lambda _qkv: False  # the relative-position channels in PyTorch calls
    try:
        t_torch, out_torch = timeit(encoder, x, args.iters)
    finally:
        sam_rel_pos_kernel.available = kernel
    diff = (out_lib.float() - out_sdpa.float()).abs().max().item()
    diff_torch = (out_torch.float() - out_sdpa.float()).abs().max().item()
    print(f"| SAM ViT-H encoder, batch {args.batch}, bf16 | library blocks {1000 * t_lib / args.batch:.1f} ms/image "
          f"| this project's blocks (SDPA attention, WindowedBlock), relative-position channels by PyTorch calls "
          f"{1000 * t_torch / args.batch:.1f} ms/image, "
          f"by the Triton kernels {1000 * t_sdpa / args.batch:.1f} ms/image "
          f"| max |diff| vs library {diff:.3g}, kernels vs PyTorch calls {diff_torch:.3g} "
          f"(output max |value| {out_lib.float().abs().max().item():.3g}) |")
    if args.compile:
        compiled = torch.compile(encoder)
        t0 = time.time()
        with torch.inference_mode():
            compiled(x)
        torch.cuda.synchronize()
        t_c, _ = timeit(compiled, x, args.iters)
        print(f"| compiled SDPA encoder | {1000 * t_c / args.batch:.1f} ms/image (compile {time.time() - t0:.0f} s) |")


if __name__ == "__main__":
    main()
