"""The comparison behind tests/test_sam_kernel.py (CPU, Triton's interpreter) and
tests/test_sam_kernel_cuda.py: model/sam_rel_pos_kernel.py's extended queries and keys against the
PyTorch calls of SdpaSamAttention._extend."""
import torch
from segment_anything.modeling.image_encoder import Attention as SamAttention

from model import sam_rel_pos_kernel
from model.sam import SdpaSamAttention


def sam_attention(dim: int, heads: int, size: tuple[int, int], seed: int = 0) -> SdpaSamAttention:
    torch.manual_seed(seed)
    attn = SamAttention(dim, num_heads=heads, qkv_bias=True, use_rel_pos=True, input_size=size)
    for p in (attn.rel_pos_h, attn.rel_pos_w):
        torch.nn.init.normal_(p, std=0.5)  # SAM starts them at zero; trained ones are not
    return SdpaSamAttention(attn)


def check_extend(batch, h, w, heads, d, dtype, device, tolerance):
    """Copied keys, one-hots, copied queries and zeros exactly equal; the relative-position products
    within `tolerance` of their largest value. Returns (q, table_h, got_q, want_q) for more checks."""
    attn = sam_attention(heads * d, heads, (h, w)).to(device, dtype)
    torch.manual_seed(1)
    qkv = torch.randn(batch, h * w, 3, heads, d, device=device, dtype=dtype)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    with torch.no_grad():
        unscale = 1.0 / attn.scale
        table_h = attn._rel_table(h, attn.rel_pos_h, dtype) * unscale
        table_w = attn._rel_table(w, attn.rel_pos_w, dtype) * unscale
        width = -(-(d + h + w) // 8) * 8
        want_q, want_k = attn._extend(q, k, table_h, table_w, (h, w), width)
        got_q, got_k = sam_rel_pos_kernel.extend_qk(qkv, table_h, table_w, (h, w), width)
    where = (batch, h, w, heads, d, dtype)
    assert sam_rel_pos_kernel.available(qkv) == qkv.is_cuda, where  # the GPU path takes the kernels
    assert got_q.shape == want_q.shape == (batch, heads, h * w, width), where
    # the heads of one token side by side in memory (so SDPA's output needs no copy before the projection)
    assert got_q.transpose(1, 2).is_contiguous() and got_k.transpose(1, 2).is_contiguous(), where
    assert torch.equal(got_k, want_k), where  # copied keys, one-hots and zeros: exact
    assert torch.equal(got_q[..., :d], want_q[..., :d]), where  # copied queries
    assert torch.equal(got_q[..., d + h + w:], want_q[..., d + h + w:]), where  # zeros
    rel_got, rel_want = got_q[..., d:d + h + w].float(), want_q[..., d:d + h + w].float()
    err = (rel_got - rel_want).abs().max()
    assert err <= tolerance * rel_want.abs().max(), (where, float(err / rel_want.abs().max()))
    return q, table_h, got_q, want_q
