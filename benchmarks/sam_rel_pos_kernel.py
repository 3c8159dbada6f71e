"""SdpaSamAttention's extended queries and keys (model/sam_rel_pos_kernel.py) on ViT-H's two attention
geometries (bf16, CUDA events): the Triton kernel against the PyTorch calls it replaces
(SdpaSamAttention._extend) and against a plain copy of as many bytes (the bandwidth it could reach).

    python benchmarks/sam_rel_pos_kernel.py [--images 8] [--iters 20]

One markdown row per geometry: ms per call of each; ms per image for the kernel (the call times its
layers in the encoder, over the images); the kernel's effective GB/s (q and k read, q_ext and k_ext
written); the largest |difference| from the PyTorch calls in the copied, one-hot and zero channels
(must be 0) and in the relative-position products (float rounding).
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cuda_timing import time_call  # noqa: E402 - beside this script

from model.sam_rel_pos_kernel import extend_qk  # noqa: E402

HEADS, D = 16, 80
# name, calls per image batch: (windows or images per image, grid side, layers)
GEOMETRIES = [("windowed 14x14", 25, 14, 28), ("global 64x64", 1, 64, 4)]


def differences(got, want, d: int, h: int, w: int) -> tuple[float, float]:
    """Largest |got - want| in the copied, one-hot and zero channels, and in the products."""
    (got_q, got_k), (want_q, want_k) = got, want

    def most(a, b) -> float:
        return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0

    exact = max(most(got_k, want_k), most(got_q[..., :d], want_q[..., :d]),
                most(got_q[..., d + h + w:], want_q[..., d + h + w:]))
    return exact, most(got_q[..., d:d + h + w], want_q[..., d:d + h + w])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device (tests/test_sam_kernel.py runs the kernel on the CPU, in Triton's interpreter)")
    from segment_anything.modeling.image_encoder import Attention

    from model.sam import SdpaSamAttention

    print(f"{torch.cuda.get_device_name()}, bf16, {args.images} images, {HEADS} heads of {D}")
    print("| geometry | kernel ms/call | PyTorch calls ms/call | plain copy ms/call | kernel ms/image | kernel GB/s "
          "| max diff, exact channels | max diff, products |")
    print("|---|---|---|---|---|---|---|---|")
    for name, per_image, side, layers in GEOMETRIES:
        torch.manual_seed(0)
        batch, length = args.images * per_image, side * side
        width = -(-(D + 2 * side) // 8) * 8
        qkv = torch.randn(batch, length, 3, HEADS, D, device="cuda", dtype=torch.bfloat16)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        table_h, table_w = (0.1 * torch.randn(side, side, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        moved = qkv.element_size() * batch * length * HEADS * 2 * (D + width)  # q, k read; q_ext, k_ext written

        attn = SdpaSamAttention(Attention(HEADS * D, num_heads=HEADS, qkv_bias=True, use_rel_pos=True,
                                          input_size=(side, side)))

        def kernel():
            return extend_qk(qkv, table_h, table_w, (side, side), width)

        def calls():
            return attn._extend(q, k, table_h, table_w, (side, side), width)

        source = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
        target = torch.empty_like(source)
        exact, products = differences(kernel(), calls(), D, side, side)
        ms, ms_calls = time_call(kernel, args.iters), time_call(calls, args.iters)
        ms_copy = time_call(lambda: target.copy_(source), args.iters)
        print(f"| {name} | {ms:.3f} | {ms_calls:.3f} | {ms_copy:.3f} | {ms * layers / args.images:.3f} "
              f"| {moved / ms / 1e6:.0f} | {exact:g} | {products:g} |")


if __name__ == "__main__":
    main()
