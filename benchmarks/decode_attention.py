"""The decode attention kernel (engine/decode_attention.py) against SDPA (cuDNN) on the engine's cache
views, at a 512-query decode step of LLaMA-7B (64 cache rows x 32 heads x 8 query rows, d 128, bf16,
CUDA events), for several reads and launch settings: ms per call, the bytes of keys and values read
per second, and the largest difference from SDPA relative to its largest output.

    python benchmarks/decode_attention.py [--iters 20]
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from cuda_timing import time_call  # noqa: E402 - beside this script
from decode_attention_check import engine_like_inputs  # noqa: E402

from engine import decode_attention  # noqa: E402

ROWS, HEADS, N, D = 64, 32, 8, 128
SETTINGS = [(64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (32, 4, 4), (64, 8, 4)]  # block_n, warps, stages


def attention_rows(iters: int) -> list[str]:
    out = ["| read | SDPA ms | SDPA TB/s | " + " | ".join(f"kernel {s} ms" for s in SETTINGS) +
           " | best TB/s | max rel. diff |", "|---" * (4 + len(SETTINGS)) + "|"]
    for read in (704, 1104, 1296):
        q, kv, mask = engine_like_inputs(ROWS, HEADS, HEADS, N, D, 1344, read, torch.bfloat16, "cuda")
        scale = D ** -0.5
        part = kv[:ROWS, :read]
        k, v = part[:, :, 0].transpose(1, 2), part[:, :, 1].transpose(1, 2)

        def sdpa():
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            return o.transpose(1, 2).reshape(ROWS, N, -1)

        bytes_read = ROWS * read * 2 * HEADS * D * 2
        base = time_call(sdpa, iters)
        want = sdpa().float()
        times, worst = [], 0.0
        for block_n, warps, stages in SETTINGS:
            def kernel(block_n=block_n, warps=warps, stages=stages):
                return decode_attention.attend(q, kv, mask, scale, block_n, warps, stages)
            times.append(time_call(kernel, iters))
            worst = max(worst, float((kernel().float() - want).abs().max() / want.abs().max()))
        out.append(f"| {read} | {base:.3f} | {bytes_read / base / 1e9:.2f} | " + " | ".join(f"{t:.3f}" for t in times)
                   + f" | {bytes_read / min(times) / 1e9:.2f} | {worst:.1e} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    print("\n".join(attention_rows(args.iters)))


if __name__ == "__main__":
    main()
