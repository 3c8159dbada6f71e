"""The engine on a GPU, where decode steps can be captured and replayed as CUDA graphs: same tokens
and masks as `SesameModel.predict` (tiny model, true fp32: TF32 off). CPU-only machines (CI) skip
this file; the CPU tests cover the same bookkeeping with a stand-in for the graphs
(test_eval_engine.py)."""
import pytest
import torch
from test_eval_engine import _hook, _one_at_a_time, _work

from engine.batched import BatchedInference
from engine.config import EngineConfig
from engine.llama_layers import pack_gate_up, pack_qkv
from model.tiny import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _differences(batched, single) -> list[str]:
    """Every mismatch, described (a failing run on the GPU says what differs, not only that)."""
    out = []
    for i, (bs, ss) in enumerate(zip(batched, single)):
        for k, (b, s) in enumerate(zip(bs, ss)):
            where = f"image {i} query {k}"
            if b.output_ids != s.output_ids:
                out.append(f"{where}: ids {b.output_ids} != {s.output_ids}")
            if b.exists != s.exists:
                out.append(f"{where}: exists {b.exists} != {s.exists}")
            if b.masks.shape != s.masks.shape:
                out.append(f"{where}: mask shape {tuple(b.masks.shape)} != {tuple(s.masks.shape)}")
            elif not torch.equal(b.masks, s.masks):
                out.append(f"{where}: {int((b.masks != s.masks).sum())} of {b.masks.numel()} mask pixels differ")
            if b.seg_hidden.shape != s.seg_hidden.shape:
                out.append(f"{where}: seg_hidden shape {tuple(b.seg_hidden.shape)} != {tuple(s.seg_hidden.shape)}")
            elif b.seg_hidden.numel() and not torch.allclose(b.seg_hidden, s.seg_hidden, atol=2e-5, rtol=1e-4):
                diff = float((b.seg_hidden - s.seg_hidden).abs().max())
                out.append(f"{where}: seg_hidden differs by up to {diff:.3g}")
    return out


@pytest.mark.parametrize("graphs,column_block,row_block", [(True, 256, 4), (True, 8, 3), (False, 256, 4)])
def test_engine_equals_predict_on_cuda(tokenizer, token_ids, no_tf32, graphs, column_block, row_block):
    model = tiny_model(token_ids, len(tokenizer), seed=1).to("cuda")
    works = _work(model, tokenizer, [(40, 60), (64, 32), (23, 77), (50, 50)], [3, 1, 7, 2])
    hook = _hook(token_ids)
    pack_qkv(model.language_model.model)
    pack_gate_up(model.language_model.model)
    engine = BatchedInference(model, EngineConfig(slots_per_group=3, first_capacity=4,
                                                  cuda_graphs=graphs, column_block=column_block,
                                                  row_block=row_block), logits_hook=hook)
    single = _one_at_a_time(model, works, token_ids, 9, hook)
    for run in range(2):  # with graphs, the second run replays the kept captures
        batched = engine.run(works, 9)
        problems = _differences(batched, single)
        assert not problems, f"run {run}: " + "; ".join(problems[:8])
    assert engine.graph_failure is None
    assert (engine.graph_captures >= 1) == graphs
    # on CUDA the engine encodes its masks for evaluation's records itself
    from utils.mask_io import encode_rle

    for p in (p for ps in batched for p in ps):
        assert p.rles == [encode_rle(m.numpy()) for m in p.masks]
    assert any(p.masks.shape[0] for ps in batched for p in ps)


@pytest.mark.parametrize("overlap", [True, False])
def test_sam_beside_the_llm_equals_predict(tokenizer, token_ids, no_tf32, overlap):
    """SAM's image encoder on its own stream: the masks wait for it. SAM is slowed on purpose (a GPU
    sleep before each encoder call, on the stream it runs on), so masks that read the embeddings
    before they are written differ from `predict`'s."""
    model = tiny_model(token_ids, len(tokenizer), seed=2).to("cuda")
    works = _work(model, tokenizer, [(40, 60), (64, 32), (23, 77)], [2, 3, 1])
    hook = _hook(token_ids)
    pack_qkv(model.language_model.model)
    pack_gate_up(model.language_model.model)
    engine = BatchedInference(model, EngineConfig(slots_per_group=3, first_capacity=4, sam_batch=2,
                                                  overlap_sam=overlap), logits_hook=hook)
    streams = []
    encode_sam = engine._encode_sam

    def slow_sam(pixels):
        streams.append(torch.cuda.current_stream())
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU clock cycles
        return encode_sam(pixels)

    engine._encode_sam = slow_sam
    single = _one_at_a_time(model, works, token_ids, 9, hook)
    for run in range(2):
        problems = _differences(engine.run(works, 9), single)
        assert not problems, f"run {run}: " + "; ".join(problems[:8])
    assert len(streams) == 4  # two chunks of two images per run
    on_side = [s == engine._sam_stream for s in streams]
    assert all(on_side) if overlap else not any(on_side)


@pytest.mark.parametrize("heads,kv_heads,d", [(32, 32, 128), (4, 2, 16), (40, 40, 128), (3, 1, 64)])
def test_rotary_kernel_equals_transformers(heads, kv_heads, d):
    """The Triton rotary kernel gives transformers' apply_rotary_pos_emb bit for bit in bf16, on the
    strided q/k view the engine passes; other dtypes go to the PyTorch calls."""
    dtype = torch.bfloat16
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from engine import rotary_kernel
    from engine.llama_layers import rotary_tables

    class Rope(torch.nn.Module):  # transformers' rotary module for head_dim d
        def __init__(self):
            super().__init__()
            from transformers import LlamaConfig
            from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

            cfg = LlamaConfig(hidden_size=heads * d, num_attention_heads=heads, num_key_value_heads=kv_heads)
            self.rotary_emb = LlamaRotaryEmbedding(cfg)

    rope = Rope().cuda()
    torch.manual_seed(0)
    qkv = torch.randn(3, 37, heads + 2 * kv_heads, d, device="cuda", dtype=dtype) * 4
    positions = torch.randint(0, 2000, (3, 37), device="cuda")
    q, k = qkv[:, :, :heads], qkv[:, :, heads:heads + kv_heads]
    cos, sin = rope.rotary_emb(qkv, positions)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    qk = qkv[:, :, :heads + kv_heads]
    assert rotary_kernel.available(qk)
    untouched = qkv[:, :, heads + kv_heads:].clone()
    rotary_kernel.rotate_triton_(qk, *rotary_tables(rope, qkv, positions))
    got_q, got_k = qkv[:, :, :heads].transpose(1, 2), qkv[:, :, heads:heads + kv_heads].transpose(1, 2)
    mismatched = int((got_q != want_q).sum() + (got_k != want_k).sum())
    assert mismatched == 0, f"{mismatched} of {got_q.numel() + got_k.numel()} elements differ"
    assert torch.equal(qkv[:, :, heads + kv_heads:], untouched)  # values are not rotated
    assert not rotary_kernel.available(qkv.float()) and not rotary_kernel.available(qkv.half())


@pytest.mark.parametrize("heads,kv_heads,d", [(32, 32, 128), (4, 2, 16), (3, 1, 64)])
def test_rotary_kernel_stores_what_rotating_and_copying_store(heads, kv_heads, d):
    """rotate_and_store_: queries rotated in place and keys (rotated) and values written to their
    cache rows and columns, bit for bit what rotate_ of q and k and then a copy give; nothing else in
    the cache is touched."""
    from engine import rotary_kernel

    torch.manual_seed(0)
    batch, length, rows, columns, first_row = 3, 37, 6, 90, 2
    qkv = torch.randn(batch, length, heads + 2 * kv_heads, d, device="cuda", dtype=torch.bfloat16) * 4
    positions = torch.randint(0, 2000, (batch, 1, length), device="cuda").float()
    angles = positions.transpose(1, 2)[..., None] * torch.rand(d, device="cuda")  # (B, L, 1, d)
    cos, sin = angles.cos().to(qkv.dtype), angles.sin().to(qkv.dtype)
    where = torch.randperm(columns, device="cuda")[:length]  # any columns, not only consecutive ones
    want = qkv.clone()
    rotary_kernel.rotate_triton_(want[:, :, :heads + kv_heads], cos, sin)
    want_cache = torch.full((rows, columns, 2, kv_heads, d), 7.0, device="cuda", dtype=qkv.dtype)
    got_cache = want_cache.clone()
    want_cache[first_row:first_row + batch, where] = want[:, :, heads:].unflatten(2, (2, kv_heads))
    assert rotary_kernel.can_store(got_cache)
    rotary_kernel.rotate_and_store_(qkv, cos, sin, heads, kv_heads, got_cache, first_row, where)
    assert torch.equal(qkv[:, :, :heads], want[:, :, :heads])
    assert torch.equal(got_cache, want_cache)
    with pytest.raises(ValueError, match="key/value heads"):
        rotary_kernel.rotate_and_store_(qkv, cos, sin, heads + 1, kv_heads, got_cache, first_row, where)
    assert not rotary_kernel.can_store(got_cache.float()) and not rotary_kernel.can_store(got_cache[:, ::2])


@pytest.mark.parametrize("graphs,slots", [(False, 4), (True, 4), (False, 2)])
def test_keys_stored_by_the_rotary_kernel_change_nothing(tokenizer, token_ids, monkeypatch, graphs, slots):
    """bf16 engine: keys and values written to the cache by the rotary kernel, against rotated in
    place and copied: the same answers, [SEG] states and masks (slots 2: images of several groups,
    whose prefix goes to the cache the old way)."""
    from engine import rotary_kernel

    model = tiny_model(token_ids, len(tokenizer), seed=3, dtype=torch.bfloat16).to("cuda")
    pack_qkv(model.language_model.model)
    works = _work(model, tokenizer, [(40, 60), (64, 32), (23, 77)], [3, 1, 4])
    stores = []
    original = rotary_kernel.rotate_and_store_
    def recorded(*a):  # the first column written; not read inside a graph capture (a sync there breaks it)
        stores.append(None if torch.cuda.is_current_stream_capturing() else int(a[-1][0]))
        return original(*a)

    monkeypatch.setattr(rotary_kernel, "rotate_and_store_", recorded)
    runs = {}
    can_store = rotary_kernel.can_store
    for fused in (False, True):
        monkeypatch.setattr(rotary_kernel, "can_store", can_store if fused else lambda cache: False)
        engine = BatchedInference(model, EngineConfig(slots_per_group=slots, first_capacity=4, cuda_graphs=graphs,
                                                      column_block=8, row_block=2), logits_hook=_hook(token_ids))
        runs[fused] = [p for ps in engine.run(works, 9) for p in ps]
        assert bool(stores) == fused
        assert engine.graph_failure is None and (engine.graph_captures > 0) == graphs  # graphs were tested
    for plain, fused in zip(runs[False], runs[True]):
        assert fused.output_ids == plain.output_ids
        assert torch.equal(fused.seg_hidden, plain.seg_hidden)
        assert torch.equal(fused.masks, plain.masks)
    assert any(p.masks.shape[0] for p in runs[True])
    # the prefix pass (first column 0) stores through the kernel when each image has one group
    assert (0 in stores) == (slots == 4)


def bf16_engine_work(tokenizer, token_ids):
    """A packed bf16 tiny model on the GPU, three images' work and the logits hook: what the tests
    that run the engine with and without a kernel compare on."""
    model = tiny_model(token_ids, len(tokenizer), seed=3, dtype=torch.bfloat16).to("cuda")
    pack_qkv(model.language_model.model)
    pack_gate_up(model.language_model.model)
    return model, _work(model, tokenizer, [(40, 60), (64, 32), (23, 77)], [3, 1, 4]), _hook(token_ids)


def assert_only_rounding_differs(plain_run, kernel_run) -> None:
    """The same answers, [SEG] states equal to bf16 rounding, masks that agree, some mask drawn."""
    for plain, fused in zip(plain_run, kernel_run):
        assert fused.output_ids == plain.output_ids
        assert fused.seg_hidden.shape == plain.seg_hidden.shape
        if plain.seg_hidden.numel():
            scale = plain.seg_hidden.float().abs().max()
            assert float((fused.seg_hidden.float() - plain.seg_hidden.float()).abs().max()) <= 0.05 * scale
        if plain.masks.numel():
            assert float((fused.masks == plain.masks).float().mean()) >= 0.98
    assert any(p.masks.shape[0] for p in kernel_run)


def test_fused_kernels_in_the_engine_change_only_rounding(tokenizer, token_ids, monkeypatch):
    """bf16 on the GPU: the engine with the fused RMSNorm and SiLU-product kernels, against the engine
    with the PyTorch calls: the same answers, [SEG] states equal to bf16 rounding, masks that agree."""
    from engine import fused_kernels

    model, works, hook = bf16_engine_work(tokenizer, token_ids)
    calls = []
    for name in ("rms_norm_weighted", "silu_mul"):
        original = getattr(fused_kernels, name)
        monkeypatch.setattr(fused_kernels, name, lambda *a, f=original, key=name: calls.append(key) or f(*a))
    runs = {}
    available = fused_kernels.available
    for fused in (False, True):
        monkeypatch.setattr(fused_kernels, "available", available if fused else lambda *tensors: False)
        engine = BatchedInference(model, EngineConfig(slots_per_group=3, first_capacity=4), logits_hook=hook)
        runs[fused] = [p for ps in engine.run(works, 9) for p in ps]
        assert bool(calls) == fused and (not fused or set(calls) == {"rms_norm_weighted", "silu_mul"})
    assert_only_rounding_differs(runs[False], runs[True])
