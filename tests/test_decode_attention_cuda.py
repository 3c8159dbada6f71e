"""engine/decode_attention.py on the device: against SDPA at the engine's layouts (full size too), and
inside the engine, where it must change nothing but rounding. CPU-only machines (CI) skip this file;
tests/test_decode_attention.py runs the kernel in Triton's interpreter."""
import pytest
import torch
from decode_attention_check import engine_like_inputs, worst_error
from test_eval_engine_cuda import assert_only_rounding_differs, bf16_engine_work

from engine import decode_attention
from engine.batched import BatchedInference
from engine.config import EngineConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# (rows, heads, kv_heads, n, d, columns, read): the evaluation's decode step (LLaMA-7B heads, 8 slots),
# grouped-query heads, one query row, reads ending inside a block, n not a power of two, 64 query rows
@pytest.mark.parametrize("shape", [(64, 32, 32, 8, 128, 1344, 1104), (5, 8, 2, 3, 64, 300, 257),
                                   (2, 4, 4, 1, 128, 40, 33), (3, 4, 1, 7, 16, 130, 130), (2, 2, 2, 64, 32, 90, 70)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_equals_sdpa(shape, dtype):
    err = worst_error(*shape, dtype, "cuda")
    assert err < (1e-2 if dtype == torch.bfloat16 else 2e-3), err


def test_available_only_where_the_kernel_applies():
    q, kv, mask = engine_like_inputs(2, 4, 4, 8, 32, 64, 50, torch.bfloat16, "cuda")
    assert decode_attention.available(q, kv, mask)
    assert not decode_attention.available(q.float(), kv.float(), mask.float())  # float32: SDPA
    assert not decode_attention.available(q.cpu(), kv.cpu(), mask.cpu())
    wide, kv_w, mask_w = engine_like_inputs(1, 2, 2, 65, 32, 80, 70, torch.bfloat16, "cuda")
    assert not decode_attention.available(wide, kv_w, mask_w)  # a prefill's many query rows
    odd, kv_o, mask_o = engine_like_inputs(1, 2, 2, 4, 24, 80, 70, torch.bfloat16, "cuda")
    assert not decode_attention.available(odd, kv_o, mask_o)  # head size not a power of two
    assert not decode_attention.available(q.clone().requires_grad_(), kv, mask)


@pytest.mark.parametrize("graphs", [False, True])
def test_kernel_in_the_engine_changes_only_rounding(tokenizer, token_ids, monkeypatch, graphs):
    """bf16: the engine with the decode attention kernel against the engine with SDPA: the same
    answers, [SEG] states equal to bf16 rounding, masks that agree; the kernel did run."""
    model, works, hook = bf16_engine_work(tokenizer, token_ids)
    calls = []
    attend, available = decode_attention.attend, decode_attention.available
    monkeypatch.setattr(decode_attention, "attend", lambda *a: calls.append(a[0].shape) or attend(*a))
    runs = {}
    for kernel in (False, True):
        monkeypatch.setattr(decode_attention, "available", available if kernel else lambda *a: False)
        engine = BatchedInference(model, EngineConfig(slots_per_group=3, first_capacity=4, cuda_graphs=graphs),
                                  logits_hook=hook)
        runs[kernel] = [p for ps in engine.run(works, 9) for p in ps]
        assert bool(calls) == kernel
        assert engine.graph_failure is None and (engine.graph_captures > 0) == graphs
    assert_only_rounding_differs(runs[False], runs[True])
