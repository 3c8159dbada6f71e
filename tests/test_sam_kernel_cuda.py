"""The Triton kernels that write SdpaSamAttention's extended queries and keys
(model/sam_rel_pos_kernel.py) against the PyTorch calls they replace, and SAM's attention with them.
CPU-only machines (CI) skip this file."""
import pytest
import torch
from sam_kernel_check import check_extend, sam_attention

from model import sam_rel_pos_kernel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# (windows or images, grid h, grid w, heads, head width): ViT-H's windowed and global layers, a tiny
# model's, grids that are not square or not a power of two wide, and more heads than one program takes
GEOMETRIES = [(6, 14, 14, 16, 80), (1, 64, 64, 16, 80), (3, 4, 4, 2, 8), (2, 12, 20, 4, 24), (2, 7, 5, 3, 40),
              (1, 20, 17, 20, 16)]


@pytest.mark.parametrize("batch,h,w,heads,d", GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_write_what_the_pytorch_calls_write(batch, h, w, heads, d, dtype):
    q, table_h, got_q, want_q = check_extend(batch, h, w, heads, d, dtype, "cuda", tolerance=0.02)
    # the products: float32 sums rounded once, as cuBLAS's; only the summation order differs
    rel_got, rel_want = got_q[..., d:d + h].float(), want_q[..., d:d + h].float()
    exact = torch.einsum("bnhwc,hkc->bnhwk", q.unflatten(2, (h, w)).float(), table_h.float()).flatten(2, 3)
    assert (rel_got - exact).abs().max() <= (rel_want - exact).abs().max() * 2 + 1e-3


@pytest.mark.parametrize("batch,h,w,heads,d", GEOMETRIES[:3])
def test_attention_with_the_kernels_equals_without(batch, h, w, heads, d, monkeypatch):
    attn = sam_attention(heads * d, heads, (h, w), seed=2).to("cuda", torch.bfloat16)
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
