"""The engine's batch sizes from the memory it may use (engine/memory.py)."""
import torch

from engine.config import EngineConfig
from engine.memory import MAX_PREFIX_BATCH, MAX_QUERIES, MAX_SAM_BATCH, BatchSizes, choose_sizes, work_cost
from model.config import SesameConfig
from model.sesame import SesameModel

GIB = 2 ** 30


def _full_size_cost(config: EngineConfig):
    """The 7B + ViT-H cost, computed from a model built on the meta device (no memory used)."""
    with torch.device("meta"):
        model = SesameModel(SesameConfig.preset("llama-7b", "clip-l-336", "vit_h")).to(torch.bfloat16)
    return work_cost(model, config)


def test_full_size_costs_are_what_the_layers_say():
    cost = _full_size_cost(EngineConfig())
    assert cost.kv_column == 32 * 2 * 32 * 128 * 2  # layers x (k, v) x heads x head_dim x bf16
    assert 50 * 2 ** 20 < cost.query < 200 * 2 ** 20  # ~600 cached columns over 8 slots + suffix + growth
    assert 100 * 2 ** 20 < cost.sam_image < 300 * 2 ** 20  # ViT-H, 64 x 64 tokens of width 1280


def test_sizes_grow_with_the_budget_and_fit_it():
    cost = _full_size_cost(EngineConfig())
    previous = None
    for budget_gib in (0.25, 1, 4, 6, 16, 60):
        budget = int(budget_gib * GIB)
        sizes = choose_sizes(EngineConfig(), cost, budget)
        assert 1 <= sizes.queries_per_batch <= MAX_QUERIES and 1 <= sizes.sam_batch <= MAX_SAM_BATCH
        assert 1 <= sizes.prefix_batch <= MAX_PREFIX_BATCH
        used = (sizes.queries_per_batch * cost.query + sizes.sam_batch * cost.sam_image
                + sizes.prefix_batch * cost.prefix_image)
        if sizes.queries_per_batch > 1:
            assert used <= budget
        if previous is not None:
            assert sizes.queries_per_batch >= previous.queries_per_batch
        previous = sizes
    assert previous == BatchSizes(MAX_QUERIES, MAX_SAM_BATCH, MAX_PREFIX_BATCH)  # an 80 GB card: the maxima
    # a 22 GiB cap leaves ~6 GiB next to the 15.5 GiB of weights: tens of queries, not hundreds
    assert 10 <= choose_sizes(EngineConfig(), cost, 5 * GIB).queries_per_batch <= 64


def test_sizes_set_by_hand_are_kept_and_halving_stops_at_one():
    cost = _full_size_cost(EngineConfig())
    sizes = choose_sizes(EngineConfig(queries_per_batch=7, sam_batch=2, prefix_batch=3), cost, 1)
    assert sizes == BatchSizes(7, 2, 3)
    assert sizes.halved() == BatchSizes(3, 1, 1) and BatchSizes(1, 1, 1).halved() == BatchSizes(1, 1, 1)


def test_cpu_engine_takes_the_maxima_and_the_interactive_preset(tokenizer, token_ids):
    from engine.batched import BatchedInference
    from model.tiny import tiny_model

    model = tiny_model(token_ids, len(tokenizer))
    assert BatchedInference(model, EngineConfig()).sizes == BatchSizes(MAX_QUERIES, MAX_SAM_BATCH, MAX_PREFIX_BATCH)
    interactive = EngineConfig.interactive()
    assert interactive.cuda_graphs and interactive.row_block == 1
    assert BatchedInference(model, interactive).queries_per_batch == interactive.queries_per_batch
