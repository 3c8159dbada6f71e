"""Weight-only 8-bit / 4-bit LLM linears (model/quantize.py): the kernels give the dequantised
weights' product, a quantised tiny model still runs every inference path, bad requests are one line."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.quantize import Int4Linear, Int8Linear, check_quantization, quantize_llm, quantized_bits
from model.tiny import tiny_model
from utils.errors import InputError


def _int4_reference(linear: nn.Linear, group: int) -> torch.Tensor:
    """The 4-bit weight as the module docstring defines it, computed here independently."""
    n, k = linear.weight.shape
    w = linear.weight.detach().float().reshape(n, k // group, group)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-6) / 15
    q = ((w - low) / scale).round().clamp(0, 15)
    return ((q - 8) * scale + low + 8 * scale).reshape(n, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_kernels_equal_the_dequantised_product(dtype, bias):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=bias).to(dtype)
    x = torch.randn(2, 5, 256, dtype=dtype)
    q8 = Int8Linear(linear)
    scale = linear.weight.detach().float().abs().amax(1) / 127
    w8 = (linear.weight.detach().float() / scale[:, None]).round().clamp(-128, 127) * scale[:, None]
    b = None if linear.bias is None else linear.bias.float()
    tol = dict(atol=5e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(q8(x).float(), F.linear(x.float(), w8, b), **tol)  # 10 rows: the kernel
    many = torch.randn(40, 256, dtype=dtype)  # more rows than INT8_KERNEL_MAX_ROWS: the converted weight
    torch.testing.assert_close(q8(many).float(), F.linear(many.float(), w8, b), **tol)
    q8.kernel = False  # builds without the int8 kernel for the device
    torch.testing.assert_close(q8(x).float(), F.linear(x.float(), w8, b), **tol)
    q4 = Int4Linear(linear)
    assert q4.group_size == 128 and q4(x).shape == (2, 5, 96) and q4(x).dtype == dtype
    torch.testing.assert_close(q4(x).float(), F.linear(x.float(), _int4_reference(linear, 128), b), **tol)
    # the quantised weights are close to the originals (what makes the answers agree)
    assert (w8 - linear.weight.float()).abs().max() <= scale.max() / 2 + 1e-6
    assert Int4Linear(nn.Linear(96, 16)).group_size == 32


def test_quantised_tiny_model_runs_predict(tokenizer, token_ids):
    import numpy as np

    from model.conversation import build_prompt, tokenize_with_image
    from model.transforms import ClipTransform, SamTransform

    image = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    clip, sam = ClipTransform(112)(image)[None], SamTransform(128)(image)
    prompt = tokenize_with_image(build_prompt("<image>\nIs there a red square?"), tokenizer)
    outputs = {}
    for bits in (None, 8, 4):
        model = tiny_model(token_ids, len(tokenizer), seed=3)
        if bits:
            assert quantize_llm(model.language_model, bits, torch.device("cpu")) == 2 * 7
            assert quantized_bits(model.language_model) == bits
        hidden = model.language_model.model(input_ids=torch.tensor([[t for t in prompt if t >= 0]])).last_hidden_state
        pred = model.predict(clip, sam.pixels[None], [sam.resized_size], [sam.original_size], [prompt], [0],
                             max_new_tokens=4)[0]
        outputs[bits] = (hidden, pred)
    assert quantized_bits(tiny_model(token_ids, len(tokenizer)).language_model) is None
    base = outputs[None][0]
    err8 = (outputs[8][0] - base).abs().max() / base.abs().max()
    err4 = (outputs[4][0] - base).abs().max() / base.abs().max()
    assert err8 < 0.02 and err4 < 0.2 and err8 < err4  # 8 bits are closer than 4
    assert all(len(p.output_ids) == 4 for _, p in outputs.values())


def test_bad_requests_are_one_line(monkeypatch):
    with pytest.raises(InputError, match="3 bits is not supported"):
        check_quantization(3, torch.device("cpu"), torch.float32)
    with pytest.raises(InputError, match="use --precision bf16"):
        check_quantization(4, torch.device("cuda"), torch.float16)
    monkeypatch.delattr(torch, "_weight_int8pack_mm")
    with pytest.raises(InputError, match="lacks _weight_int8pack_mm"):
        check_quantization(8, torch.device("cpu"), torch.bfloat16)
    check_quantization(None, torch.device("cpu"), torch.float32)
    check_quantization(4, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("flag,bits", [("--load_in_8bit", 8), ("--load_in_4bit", 4)])
def test_the_flags_load_a_quantised_predictor(flag, bits):
    """demo.py / test_sesame.py / web_demo.py share these flags (engine.build.add_predictor_arguments)."""
    import numpy as np

    import demo
    from engine.build import load_predictor

    predictor = load_predictor(demo.parse_args(["--pretrained_model_path", "tiny-random", "--device", "cpu",
                                                "--precision", "fp32", "--max_new_tokens", "3", flag]))
    assert quantized_bits(predictor.model.language_model) == bits
    answer = predictor.ask((np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8), "Is there a cat?")
    assert len(answer.output_ids) <= 3 and answer.masks.shape[1:] == (30, 40)
    with pytest.raises(SystemExit):  # one or the other
        demo.parse_args(["--load_in_8bit", "--load_in_4bit"])
