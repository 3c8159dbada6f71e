"""The engine's KV cache and the fixed-address inputs of a decode step."""
from __future__ import annotations

from dataclasses import dataclass

import torch


class GroupKVCache:
    """Keys and values per decoder layer, one (rows, columns, 2, kv_heads, head_dim) tensor each (keys
    at [:, :, 0], values at [:, :, 1]: a layer's new keys and values are written by one copy), in the
    column layout of engine/batched.py's docstring. It outlives a batch (CUDA graphs captured on it stay
    valid), so rows and columns are capacities: a batch uses rows [0, groups) and columns [0, used).
    Zero-filled at allocation: columns a step reads but masks out must hold finite numbers (0 * NaN
    is NaN)."""

    def __init__(self, num_layers: int, groups: int, kv_heads: int, head_dim: int, columns: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (groups, columns, 2, kv_heads, head_dim)
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.used = 0

    @property
    def rows(self) -> int:
        return self.kv[0].shape[0]

    @property
    def columns(self) -> int:
        return self.kv[0].shape[1]

    def keys_values(self, layer: int, rows: int, read: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, kv_heads, read, head_dim) views of keys and values, as attention takes them."""
        kv = self.kv[layer][:rows, :read]
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

    def grow(self, columns: int) -> None:
        """More columns, keeping [0, used) of every row (new tensors: captured graphs are stale)."""
        if columns <= self.columns:
            return
        for i, old in enumerate(self.kv):
            new = old.new_zeros((old.shape[0], columns, *old.shape[2:]))
            new[:, :self.used] = old[:, :self.used]
            self.kv[i] = new

    def select(self, groups: torch.Tensor) -> None:
        """Move rows `groups` (ascending) to rows [0, len(groups)), in place."""
        for t in self.kv:
            t[:groups.numel(), :self.used] = t[groups, :self.used]


@dataclass
class StepBuffers:
    """Inputs of one decode step for slot count n, at fixed addresses (what a CUDA graph reads)."""

    mask: torch.Tensor  # (rows, 1, n, columns) additive: 0 visible, -inf not
    ids: torch.Tensor  # (rows, n) token fed at this step
    positions: torch.Tensor  # (rows, n) its position id
    columns: torch.Tensor  # (n,) cache columns this step writes
    # the first of them, known on the host: an eager step writes its n consecutive columns as one
    # slice (a plain copy, cheaper than index_copy_); a replayed graph reads `columns` instead
    first_column: int = 0
