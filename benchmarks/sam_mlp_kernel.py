"""SAM ViT-H's MLP first half, gelu(lin1(x)) (1280 -> 5120, bf16): cuBLAS's F.linear then F.gelu (two
kernels) against model/sam_mlp_kernel.py's linear_gelu (one), timed with CUDA events.

    python benchmarks/sam_mlp_kernel.py [--images 8] [--iters 20]

Token rows per call: images x 4096 (global blocks: a 64x64 grid) and images x 4900 (windowed blocks:
25 windows of 14x14). One markdown row per (rows, path): ms per call; TFLOP/s of the matrix product;
ms per image as if every one of the encoder's 32 blocks had these rows (ms x 32 / images); the largest
|difference| from eager's output. The first call of each shape (autotuning included) is timed apart,
and the config the autotuner chose is printed.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model.sam_mlp_kernel import available, gemm_gelu_kernel, linear_gelu  # noqa: E402

K, N, LAYERS = 1280, 5120, 32


def time_call(fn, iters: int) -> float:
    """ms per call: CUDA events around `iters` calls, after three warm-up calls."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device (tests/test_sam_mlp_kernel.py runs the kernel on the CPU, in Triton's "
                 "interpreter)")
    torch.manual_seed(0)
    lin1 = nn.Linear(K, N, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    print(f"{torch.cuda.get_device_name()}, bf16, {args.images} images, x (M, {K}) -> gelu (M, {N})")
    rows, tuned = [], []
    for per_image in (4096, 4900):
        m = args.images * per_image
        x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
        assert available(x, lin1)
        torch.cuda.synchronize()
        began = time.perf_counter()
        got = linear_gelu(x, lin1)  # autotunes this (M, N, K)
        torch.cuda.synchronize()
        tuned.append(f"M {m}: {gemm_gelu_kernel.best_config} (first call {time.perf_counter() - began:.1f} s)")
        want = F.gelu(F.linear(x, lin1.weight, lin1.bias))
        diff = float((got.float() - want.float()).abs().max())
        flop = 2 * m * K * N
        for path, fn, d in [("cuBLAS F.linear alone", lambda: F.linear(x, lin1.weight, lin1.bias), ""),
                            ("F.linear + F.gelu", lambda: F.gelu(F.linear(x, lin1.weight, lin1.bias)), "0"),
                            ("linear_gelu", lambda: linear_gelu(x, lin1), f"{diff:g}")]:
            ms = time_call(fn, args.iters)
            rows.append(f"| {m} | {path} | {ms:.3f} | {flop / ms / 1e9:.0f} | {ms * LAYERS / args.images:.3f} | {d} |")
    print("| M | path | ms/call | TFLOP/s | ms/image (x32 layers) | max diff vs eager |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("autotune:", *tuned, sep="\n  ")


if __name__ == "__main__":
    main()
