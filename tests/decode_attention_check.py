"""The comparison behind tests/test_decode_attention.py (CPU, Triton's interpreter) and
tests/test_decode_attention_cuda.py: engine/decode_attention.py against SDPA on the same cache views,
at the engine's decode layouts."""
import torch
import torch.nn.functional as F

from engine import decode_attention


def engine_like_inputs(rows: int, heads: int, kv_heads: int, n: int, d: int, columns: int, read: int,
                       dtype, device, seed: int = 0):
    """q as the engine slices it from a packed projection, (B, heads, n, d) with strides; a cache
    tensor (rows + 2, columns, 2, kv_heads, d) whose first `rows` rows are read; an additive mask
    (B, 1, n, read) as the engine's: a prefix every row sees, then per query row its own scattered
    columns, and the padding past `read` of a wider buffer."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(rows, n, heads + 2 * kv_heads, d, generator=g).to(device, dtype)
    q = qkv[:, :, :heads].transpose(1, 2)
    kv = torch.randn(rows + 2, columns, 2, kv_heads, d, generator=g).mul_(2).to(device, dtype)
    prefix = max(1, read // 3)
    visible = torch.rand(rows, 1, n, columns, generator=g) < 0.3
    visible[..., :prefix] = True
    visible[..., read:] = False
    buffer = torch.zeros(rows, 1, n, columns + 16).masked_fill_(
        ~torch.cat([visible, visible.new_zeros(rows, 1, n, 16)], -1), float("-inf")).to(device, dtype)
    return q, kv, buffer[..., :read]


def reference(q, kv, mask):
    """SDPA over the cache's (B, kv_heads, read, d) key and value views, as the engine called it."""
    batch, read = q.shape[0], mask.shape[-1]
    part = kv[:batch, :read]
    k, v = part[:, :, 0].transpose(1, 2), part[:, :, 1].transpose(1, 2)
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float(),
                                         scale=q.shape[-1] ** -0.5, **gqa)
    return out.transpose(1, 2).reshape(batch, q.shape[2], -1)


def worst_error(rows, heads, kv_heads, n, d, columns, read, dtype, device) -> float:
    """max |kernel - float32 SDPA|, relative to the output's largest value."""
    q, kv, mask = engine_like_inputs(rows, heads, kv_heads, n, d, columns, read, dtype, device)
    got = decode_attention.attend(q, kv, mask, d ** -0.5)
    want = reference(q, kv, mask)
    assert got.shape == want.shape == (rows, n, heads * d), (got.shape, want.shape)
    assert got.dtype == q.dtype and got.is_contiguous()
    return float((got.float() - want).abs().max() / want.abs().max())
