"""Weight-only 8-bit and 4-bit LLM linears for small GPUs, on PyTorch's own kernels (what gpt-fast and
torchao build on): no extra library to install.

- 8 bit: per output channel, symmetric: w ~ q * s, q int8 (N, K), s (N,). `torch._weight_int8pack_mm`.
- 4 bit: per group of `group_size` input channels, affine: w ~ (q - 8) * s + z, q in 0..15, packed
  for `torch._weight_int4pack_mm` (tinygemm, CUDA) or `torch._weight_int4pack_mm_for_cpu`.

Only the LLaMA decoder's projections (q/k/v/o, gate/up/down: ~87% of a 7B model's bytes) are
quantised; the embeddings, lm_head, CLIP, the projector, SAM and text_hidden_fcs keep their dtype.
A quantised model runs in the same code paths (predict, the engine); it is for inference only.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.errors import InputError

BITS = (8, 4)
INT4_GROUP_SIZE = 128
INT4_INNER_K_TILES = 8  # tinygemm's tile count along K on CUDA (K must be a multiple of 8 * 16 = 128 there)
# PyTorch's int8 kernel (`_weight_int8pack_mm`) on the CPU for a few rows; on a GPU, converting the
# weight and running the ordinary product was faster at every row count measured (H100: 0.17 vs 0.26 ms
# at 1 row, 0.18 vs 25 ms at 256 rows; benchmarks/RESULTS.md)
INT8_KERNEL_MAX_ROWS = 16


@functools.lru_cache(maxsize=None)
def int8_kernel_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this PyTorch build has `_weight_int8pack_mm` for `device` and `dtype` (tried once)."""
    try:
        torch._weight_int8pack_mm(torch.zeros(1, 32, dtype=dtype, device=device),
                                  torch.zeros(16, 32, dtype=torch.int8, device=device),
                                  torch.ones(16, dtype=dtype, device=device))
        return True
    except (RuntimeError, NotImplementedError):
        return False


class Int8Linear(nn.Module):
    """y = x W^T (+ b) with W stored as int8 rows and one scale per row: on the CPU PyTorch's int8
    kernel for up to INT8_KERNEL_MAX_ROWS rows, otherwise the weight converted for an ordinary product
    (the same result)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight", (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        device = linear.weight.device
        self.kernel = device.type == "cpu" and int8_kernel_runs(device, linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat, scale = x.reshape(-1, shape[-1]), self.scale.to(x.dtype)
        if self.kernel and flat.shape[0] <= INT8_KERNEL_MAX_ROWS:
            y = torch._weight_int8pack_mm(flat, self.weight, scale)
        else:
            y = F.linear(flat, self.weight.to(x.dtype)) * scale
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W in 4-bit groups of `group_size` input channels (tinygemm's layout); the
    group is the largest of 128, 64, 32 that divides the input width."""

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE):
        super().__init__()
        n, k = linear.out_features, linear.in_features
        group_size = next((g for g in (group_size, 64, 32) if g <= group_size and k % g == 0), None)
        if group_size is None:
            raise InputError(f"4-bit: the input width {k} of a projection is not a multiple of 32")
        self.in_features, self.out_features, self.group_size = k, n, group_size
        w = linear.weight.detach().float().reshape(n, k // group_size, group_size)
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = (high - low).clamp(min=1e-6) / 15.0
        zero = low + scale * 8.0
        q = ((w - low) / scale).round().clamp(0, 15).reshape(n, k).to(torch.int32)
        self.on_cuda = linear.weight.is_cuda
        if self.on_cuda:
            packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8),
                                                       INT4_INNER_K_TILES)
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        self.register_buffer("weight", packed)
        scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (k / g, n, 2)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        mm = torch._weight_int4pack_mm if self.on_cuda else torch._weight_int4pack_mm_for_cpu
        y = mm(x.reshape(-1, shape[-1]), self.weight, self.group_size, self.scales_and_zeros.to(x.dtype))
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def check_quantization(bits: Optional[int], device: torch.device, dtype: torch.dtype) -> None:
    """One clear line for a quantisation this machine cannot run."""
    if bits is None:
        return
    if bits not in BITS:
        raise InputError(f"weight quantisation: {bits} bits is not supported (choose from {BITS})")
    needed = ["_weight_int8pack_mm"] if bits == 8 else (
        ["_convert_weight_to_int4pack", "_weight_int4pack_mm"] if device.type == "cuda"
        else ["_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"])
    missing = [name for name in needed if not hasattr(torch, name)]
    if missing:
        raise InputError(f"--load_in_{bits}bit: this PyTorch ({torch.__version__}) lacks {', '.join(missing)}; "
                         f"upgrade torch or run without --load_in_{bits}bit")
    if bits == 4 and device.type == "cuda" and dtype != torch.bfloat16:
        raise InputError("--load_in_4bit on a GPU runs in bf16 (PyTorch's 4-bit kernel): use --precision bf16")


def quantize_llm(llm: nn.Module, bits: int, device: torch.device,
                 group_size: int = INT4_GROUP_SIZE) -> int:
    """Replace the decoder's nn.Linear projections of a LlamaForCausalLM by Int8Linear / Int4Linear,
    one at a time on `device` (the weights may come from the CPU: only one full-precision layer is on
    the device at once). The rest of `llm` is moved to `device` too. Returns the layers quantised."""
    make: Callable[[nn.Linear], nn.Module] = (
        Int8Linear if bits == 8 else (lambda linear: Int4Linear(linear, group_size)))
    count = 0
    for layer in llm.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, make(child.to(device)))
                    count += 1
    llm.to(device)
    return count


def quantized_bits(llm: nn.Module) -> Optional[int]:
    """8 or 4 when `llm`'s decoder projections are quantised, else None."""
    for module in llm.modules():
        if isinstance(module, Int8Linear):
            return 8
        if isinstance(module, Int4Linear):
            return 4
    return None

