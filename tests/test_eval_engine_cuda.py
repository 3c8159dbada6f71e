"""The engine on a GPU, where decode steps are captured and replayed as CUDA graphs: same tokens and
masks as `SesameModel.predict` (tiny model, fp32). CPU-only machines (CI) skip this file; the CPU
tests cover the same bookkeeping with a stand-in for the graphs (test_eval_engine.py)."""
import pytest
import torch

from model.inference import BatchedInference, EngineConfig
from model.tiny import tiny_model

from test_eval_engine import _assert_same, _hook, _one_at_a_time, _work

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("column_block,row_block", [(256, 4), (8, 3)])
def test_graphs_equal_predict_on_cuda(tokenizer, token_ids, column_block, row_block):
    model = tiny_model(token_ids, len(tokenizer), seed=1).to("cuda")
    works = _work(model, tokenizer, [(40, 60), (64, 32), (23, 77), (50, 50)], [3, 1, 7, 2])
    hook = _hook(token_ids)
    engine = BatchedInference(model, EngineConfig(max_new_tokens=9, eos_token_id=token_ids.eos,
                                                  pad_token_id=token_ids.pad, slots_per_group=3, first_capacity=4,
                                                  column_block=column_block, row_block=row_block), logits_hook=hook)
    single = _one_at_a_time(model, works, token_ids, 9, hook)
    for _ in range(2):  # the second run replays the kept captures
        _assert_same(engine.run(works), single)
    assert engine.graph_failure is None and engine.graph_captures >= 1
