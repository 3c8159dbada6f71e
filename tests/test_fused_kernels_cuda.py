"""The fused RMSNorm and SiLU-product kernels (engine/fused_kernels.py) against the PyTorch calls they
replace, on the device, and the engine's layers with them. CPU-only machines (CI) skip this file;
tests/test_fused_kernels.py runs the kernels in Triton's interpreter."""
import pytest
import torch
import torch.nn as nn
from fused_kernels_check import check_rms, check_silu_mul, ulps

from engine import fused_kernels
from engine.llama_layers import LlamaLayers, pack_gate_up, rms_norm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.bfloat16, torch.float16]


# (shape, padding between rows): LLaMA-7B's prefill rows, a decode batch, a strided view, widths that
# are not a power of two, LLaMA-13B's width
@pytest.mark.parametrize("shape,pad", [((300, 4096), 0), ((2, 150, 4096), 64), ((24, 1, 4096), 0),
                                       ((7, 1000), 0), ((3, 5, 80), 8), ((40, 5120), 0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_within_two_ulp(shape, pad, dtype):
    worst, equal = check_rms(shape, dtype, "cuda", row_pad=pad)
    numel = torch.Size(shape).numel()
    print(f"rms {shape} {dtype}: max {worst} ulp, {equal:.6f} equal")
    # the mean of squares is summed in another order than PyTorch's: the normalised value can be one
    # ulp off, which a weight above 1 makes two ulps of the product
    assert worst <= 2, worst
    assert (1 - equal) * numel <= 0.001 * numel + 1, equal


# (shape, packed): LLaMA-7B's prefill and decode MLP (I = 11008) as halves of one product, separate
# tensors, widths that are not a multiple of the block, LLaMA-13B's
@pytest.mark.parametrize("shape,packed", [((300, 11008), True), ((300, 11008), False), ((2, 150, 11008), True),
                                          ((24, 1, 11008), True), ((7, 1000), True), ((3, 5, 80), False),
                                          ((40, 13824), True)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_within_one_ulp(shape, packed, dtype):
    silu, product = check_silu_mul(shape, dtype, "cuda", packed=packed)
    print(f"silu_mul {shape} {dtype}: max ulp silu {silu}, product {product}")
    # CUDA's expf and an IEEE division, as PyTorch's kernel: expected bit for bit
    assert silu <= 1 and product <= 1, (silu, product)


def test_the_kernels_stay_out_of_autograd():
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    assert fused_kernels.available(x)
    assert fused_kernels.available(x.half(), x)
    assert not fused_kernels.available(x.float())
    assert not fused_kernels.available(x.cpu())
    assert not fused_kernels.available(x, x.float())
    assert not fused_kernels.available(x, x.clone().requires_grad_())
    with torch.no_grad():
        assert fused_kernels.available(x.clone().requires_grad_())
    # with grad, the PyTorch calls run and keep the graph
    norm = _llama().layers[0].input_layernorm
    h = x.clone().requires_grad_()
    out = rms_norm(norm, h)
    assert out.grad_fn is not None
    out.float().sum().backward()
    assert h.grad is not None and norm.weight.grad is not None


def _llama(hidden=256, intermediate=688, layers=2):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaModel(cfg).to("cuda", torch.bfloat16)
    for name, p in model.named_parameters():
        if "norm" in name:
            nn.init.normal_(p, mean=1.0, std=0.3)
    return model


def test_the_layers_take_the_kernels_and_give_the_modules_outputs(monkeypatch):
    model = _llama()
    assert pack_gate_up(model) == 2
    layers = LlamaLayers(model)
    calls = {"silu_mul": 0, "rms_norm_weighted": 0}
    for name in calls:
        original = getattr(fused_kernels, name)

        def counted(*a, f=original, key=name):
            calls[key] += 1
            return f(*a)
        monkeypatch.setattr(fused_kernels, name, counted)
    h = torch.randn(3, 37, 256, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        for i, layer in enumerate(layers.layers):
            norm = layer.post_attention_layernorm
            assert int(ulps(rms_norm(norm, h), norm(h)).max()) <= 2
            got, want = layers.mlp(i, h), layer.mlp(h)
            # the packed product may take another cuBLAS kernel than the two separate ones
            err = (got.float() - want.float()).abs().max() / want.float().abs().max()
            assert err < 0.02, float(err)
    assert calls == {"silu_mul": 2, "rms_norm_weighted": 2}
