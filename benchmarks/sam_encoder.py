"""SAM ViT-H image encoder throughput: segment_anything's own blocks against this project's (model/sam.py:
SDPA attention, WindowedBlock), with every GPU kernel family on, and with each off in turn (the
relative-position channels, the fused LayerNorm / window passes), optionally under torch.compile.
Random bf16 weights on the GPU.

    python benchmarks/sam_encoder.py [--batch 8] [--iters 5] [--compile] [--profile]

--profile: the encoder's costliest GPU kernels (torch.profiler, one batch), in ms per image.
"""
import argparse
import os
import sys
import time
from contextlib import contextmanager

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the library reference encoder

from sam_reference import library_encoder  # noqa: E402

from model import sam_block_kernels, sam_rel_pos_kernel  # noqa: E402
from model.config import SAM_PRESETS  # noqa: E402
from model.sam import SdpaSamAttention, build_sam  # noqa: E402

# the encoder's GPU kernel families, each with the `available` check that turns it on
KERNELS = {"relative-position kernel": sam_rel_pos_kernel, "fused LayerNorm / window kernels": sam_block_kernels}


@contextmanager
def kernels_off(module):
    """module's kernels not used: its `available` says no."""
    available = module.available
    module.available = lambda *_: False
    try:
        yield
    finally:
        module.available = available


def timeit(fn, x, iters):
    with torch.inference_mode():
        fn(x)
        torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(iters):
            out = fn(x)
        torch.cuda.synchronize()
    return (time.time() - t0) / iters, out


def profile_kernels(encoder, x, top: int) -> None:
    """One profiled batch: GPU busy time, and the `top` kernels by summed time, per image."""
    import tempfile

    from eval_throughput import _costliest, _read_trace, _union_length
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        encoder(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            encoder(x)
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        _, kernels = _read_trace(path)
    images = x.shape[0]
    busy = _union_length([(a, b) for a, b, _, _ in kernels]) / 1e3
    counts: dict[str, int] = {}
    for _, _, name, _ in kernels:
        counts[name[:80]] = counts.get(name[:80], 0) + 1
    print(f"| profiled batch of {images} | GPU busy {busy / images:.2f} ms/image, {len(kernels)} kernels |")
    print("| kernel (first 80 characters) | ms/image | launches |")
    for name, ms in _costliest(kernels, top):
        print(f"| {name} | {ms / images:.3f} | {counts[name]} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    torch.manual_seed(0)
    encoder = build_sam(SAM_PRESETS["vit_h"]).image_encoder.to("cuda", torch.bfloat16).eval()
    assert all(isinstance(b.attn, SdpaSamAttention) for b in encoder.blocks)
    # channels-last pixels, as the engine passes them (engine/batched.py `_encode_sam`): the encoder's
    # token grid is then contiguous, so its elementwise kernels read it as they do in an evaluation
    x = torch.randn(args.batch, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    lib = library_encoder(encoder)
    t_lib, out_lib = timeit(lib, x, args.iters)
    t_all, out_all = timeit(encoder, x, args.iters)
    scale = out_lib.float().abs().max().item()
    print(f"| SAM ViT-H encoder, batch {args.batch}, bf16 | ms/image "
          f"| max abs diff vs library (output max {scale:.3g}) |")
    print("|---|---|---|")
    print(f"| segment_anything's blocks | {1000 * t_lib / args.batch:.2f} | 0 |")
    print(f"| this project's blocks, every GPU kernel | {1000 * t_all / args.batch:.2f} | "
          f"{(out_all.float() - out_lib.float()).abs().max().item():.3g} |")
    for name, module in KERNELS.items():  # each kernel family off in turn: PyTorch calls instead
        with kernels_off(module):
            t, out = timeit(encoder, x, args.iters)
        print(f"| ... without the {name} | {1000 * t / args.batch:.2f} | "
              f"{(out.float() - out_lib.float()).abs().max().item():.3g} |")
    if args.profile:
        profile_kernels(encoder, x, args.top)
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
