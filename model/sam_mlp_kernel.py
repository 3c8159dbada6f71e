"""The first half of SAM's image-encoder MLP, gelu(x @ W^T + b), as one GPU kernel (Triton).

SAM's MLPBlock is `lin2(gelu(lin1(x)))`, lin1 four times wider than the model (ViT-H: 1280 -> 5120).
In eager PyTorch cuBLAS writes lin1's output and a second, elementwise kernel reads it back and writes
the GELU: the widest activation of the encoder crosses memory three times. Here one tiled matrix
product (`tl.dot`, float32 accumulation, programs in groups of GROUP_M row tiles for L2 reuse) applies
the bias and the GELU to its tile before the one store.

It rounds where PyTorch rounds: product plus bias in float32, rounded to the output dtype once (as
cuBLAS's bias epilogue does), then the exact GELU (erf, not tanh) in float32 from that rounded value,
rounded again (as PyTorch's GELU kernel on a bf16 / fp16 tensor does). Values then differ from eager
only by the product's summation order (tests/sam_mlp_check.py).

The block shapes are autotuned per (M, N, K), on first use of each. SAM_MLP_CONFIG pins one config
and skips the tuning, e.g. `SAM_MLP_CONFIG="BLOCK_M=128,BLOCK_N=256,BLOCK_K=64,num_warps=8,num_stages=3"`
(unnamed keys take CONFIG_DEFAULTS); it is read at import.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

CONFIG_DEFAULTS = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
# (BLOCK_M, BLOCK_N, num_warps, num_stages), BLOCK_K 64 and GROUP_M 8: tiles for an H100 (sm90)
TUNED = [(128, 256, 8, 3), (128, 256, 8, 4), (256, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 4),
         (128, 128, 8, 3)]


def available(x: torch.Tensor, linear: nn.Module) -> bool:
    """For half-precision CUDA tensors outside autograd (SAM's image encoder is frozen in SESAME), a
    contiguous x and an nn.Linear with a bias, of x's dtype."""
    if triton is None or not isinstance(linear, nn.Linear) or linear.bias is None:
        return False
    params = (linear.weight, linear.bias)
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.is_contiguous()
            and x.shape[-1] == linear.in_features
            and all(p.dtype == x.dtype and p.device == x.device and p.is_contiguous() for p in params)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params))))


def linear_gelu(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """F.gelu(linear(x)) in one kernel: x (..., K) contiguous -> (..., N), x's dtype. See available()."""
    weight, bias = linear.weight, linear.bias
    N, K = weight.shape
    rows = x.reshape(-1, K)
    out = torch.empty(rows.shape[0], N, device=x.device, dtype=x.dtype)
    M = rows.shape[0]
    if M:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        gemm_gelu_kernel[grid](rows, weight, bias, out, M, N, K)
    return out.view(*x.shape[:-1], N)


def _configs() -> list:
    """SAM_MLP_CONFIG's one config when set, else TUNED."""
    pinned = os.environ.get("SAM_MLP_CONFIG")
    if pinned:
        named = dict(CONFIG_DEFAULTS)
        for item in pinned.split(","):
            key, value = item.split("=")
            if key.strip() not in named:
                raise ValueError(f"SAM_MLP_CONFIG: unknown key {key!r}, expected some of {list(named)}")
            named[key.strip()] = int(value)
        chosen = [named]
    else:
        chosen = [dict(CONFIG_DEFAULTS, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in TUNED]
    return [triton.Config({k: c[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")},
                          num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in chosen]


if triton is not None:
    @triton.autotune(configs=_configs(), key=["M", "N", "K"])
    @triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
    @triton.jit
    def gemm_gelu_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
        """out (M, N) = gelu(x (M, K) @ w (N, K)^T + b (N,)), one (BLOCK_M, BLOCK_N) tile a program."""
        # program -> tile: down a column of GROUP_M row tiles, then the next column, so that programs
        # running together share their x rows and w columns in L2
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * tiles_n)
        first_m = group * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        tile_m = first_m + (pid % (GROUP_M * tiles_n)) % group_m
        tile_n = (pid % (GROUP_M * tiles_n)) // group_m

        rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        # rows and columns past the edge load a valid one (wrapped) and are not stored
        x_ptrs = x_ptr + (rows % M).to(tl.int64)[:, None] * K + ks[None, :]
        w_ptrs = w_ptr + (cols % N).to(tl.int64)[:, None] * K + ks[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a, b = tl.load(x_ptrs), tl.load(w_ptrs)
            else:
                inside = ks[None, :] < K - k * BLOCK_K
                a = tl.load(x_ptrs, mask=inside, other=0.0)
                b = tl.load(w_ptrs, mask=inside, other=0.0)
            acc = tl.dot(a, tl.trans(b), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

        dtype = out_ptr.dtype.element_ty
        bias = tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        h = (acc + bias[None, :]).to(dtype).to(tl.float32)  # lin1's output, as eager rounds it
        gelu = h * 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        keep = (rows < M)[:, None] & (cols < N)[None, :]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], gelu.to(dtype), mask=keep)
