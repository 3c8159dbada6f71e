"""Per-call time of one LLaMA-7B MLP projection (4096 -> 11008) in bf16, through PyTorch's int8 kernel,
through the converted int8 weight, and through the 4-bit kernel, at several row counts (GPU).

    python benchmarks/quant_kernels.py
"""
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.quantize import Int4Linear, Int8Linear  # noqa: E402


def per_call_ms(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    linear = nn.Linear(4096, 11008, bias=False).cuda().bfloat16()
    q8, q4 = Int8Linear(linear), Int4Linear(linear)
    print("| rows | bf16 | int8 kernel | int8 converted | int4 kernel |\n|---|---|---|---|---|")
    for rows in (1, 8, 16, 64, 256, 4096):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        times = (per_call_ms(lambda: F.linear(x, linear.weight)),
                 per_call_ms(lambda: torch._weight_int8pack_mm(x, q8.weight, q8.scale)),
                 per_call_ms(lambda: F.linear(x, q8.weight.to(x.dtype)) * q8.scale),
                 per_call_ms(lambda: torch._weight_int4pack_mm(x, q4.weight, q4.group_size, q4.scales_and_zeros)))
        print(f"| {rows} | " + " | ".join(f"{t:.3f} ms" for t in times) + " |", flush=True)


if __name__ == "__main__":
    main()
