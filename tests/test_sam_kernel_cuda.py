"""The Triton kernels that write SdpaSamAttention's extended queries and keys
(model/sam_rel_pos_kernel.py) against the PyTorch calls they replace, and SAM's attention with them.
CPU-only machines (CI) skip this file."""
import pytest
import torch
from segment_anything.modeling.image_encoder import Attention as SamAttention

from model import sam_rel_pos_kernel
from model.sam import SdpaSamAttention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _attention(dim: int, heads: int, size: tuple[int, int], seed: int = 0) -> SdpaSamAttention:
    torch.manual_seed(seed)
    attn = SamAttention(dim, num_heads=heads, qkv_bias=True, use_rel_pos=True, input_size=size)
    for p in (attn.rel_pos_h, attn.rel_pos_w):
        torch.nn.init.normal_(p, std=0.5)  # SAM starts them at zero; trained ones are not
    return SdpaSamAttention(attn).to("cuda", torch.bfloat16)


# (windows or images, grid h, grid w, heads, head width): ViT-H's windowed and global layers, a tiny
# model's, and grids that are not square or not a power of two wide
GEOMETRIES = [(6, 14, 14, 16, 80), (1, 64, 64, 16, 80), (3, 4, 4, 2, 8), (2, 12, 20, 4, 24), (2, 7, 5, 3, 40)]


@pytest.mark.parametrize("batch,h,w,heads,d", GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_write_what_the_pytorch_calls_write(batch, h, w, heads, d, dtype):
    attn = _attention(heads * d, heads, (h, w)).to(dtype)
    torch.manual_seed(1)
    qkv = torch.randn(batch, h * w, 3, heads, d, device="cuda", dtype=dtype)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    unscale = 1.0 / attn.scale
    table_h = attn._rel_table(h, attn.rel_pos_h, dtype) * unscale
    table_w = attn._rel_table(w, attn.rel_pos_w, dtype) * unscale
    width = -(-(d + h + w) // 8) * 8
    want_q, want_k = attn._extend(q, k, table_h, table_w, (h, w), width)
    assert sam_rel_pos_kernel.available(qkv)
    got_q, got_k = sam_rel_pos_kernel.extend_qk(qkv, table_h, table_w, (h, w), width)
    assert got_q.shape == want_q.shape == (batch, heads, h * w, width) and got_q.is_contiguous()
    assert torch.equal(got_k, want_k)  # copied keys, one-hots and zeros: exact
    assert torch.equal(got_q[..., :d], want_q[..., :d])  # copied queries
    assert torch.equal(got_q[..., d + h + w:], want_q[..., d + h + w:])  # zeros
    # the products: float32 sums rounded once, as cuBLAS's; only the summation order differs
    rel_got, rel_want = got_q[..., d:d + h + w].float(), want_q[..., d:d + h + w].float()
    exact = torch.einsum("bnhwc,hkc->bnhwk", q.unflatten(2, (h, w)).float(), table_h.float()).flatten(2, 3)
    assert (rel_got[..., :h] - exact).abs().max() <= (rel_want[..., :h] - exact).abs().max() * 2 + 1e-3
    scale = rel_want.abs().max()
    assert (rel_got - rel_want).abs().max() <= 0.02 * scale, float((rel_got - rel_want).abs().max() / scale)


@pytest.mark.parametrize("batch,h,w,heads,d", GEOMETRIES[:3])
def test_attention_with_the_kernels_equals_without(batch, h, w, heads, d, monkeypatch):
    attn = _attention(heads * d, heads, (h, w), seed=2)
    x = torch.randn(batch, h, w, heads * d, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        got = attn(x)
        monkeypatch.setattr(sam_rel_pos_kernel, "available", lambda _qkv: False)
        want = attn(x)
    assert got.shape == want.shape
    err = (got.float() - want.float()).abs().max() / want.float().abs().max()
    assert err < 0.02, float(err)


def test_the_kernels_stay_out_of_autograd():
    """SAM's encoder is frozen in SESAME; trained (--train_all), the PyTorch calls keep the graph."""
    qkv = torch.randn(1, 16, 3, 2, 8, device="cuda", dtype=torch.bfloat16)
    assert sam_rel_pos_kernel.available(qkv)
    assert not sam_rel_pos_kernel.available(qkv.float())
    assert not sam_rel_pos_kernel.available(qkv.cpu())
    assert not sam_rel_pos_kernel.available(qkv.clone().requires_grad_())
    with torch.no_grad():
        assert sam_rel_pos_kernel.available(qkv.clone().requires_grad_())
