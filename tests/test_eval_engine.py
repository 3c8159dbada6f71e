"""The batched, prefix-sharing engine (engine/) gives what `SesameModel.predict` gives
one query at a time: the same tokens, the same masks, [SEG] states allclose (fp32, tiny model)."""
import numpy as np
import pytest
import torch

from engine.batched import BatchedInference
from engine.cache import GroupKVCache
from engine.config import EngineConfig
from engine.llama_layers import pack_gate_up, pack_qkv
from engine.plan import batch_images
from engine.timing import StageTimer
from model.config import SasPConfig
from model.conversation import build_prompt, tokenize_with_image
from model.predictor import ImageWork
from model.tiny import tiny_model
from model.transforms import ClipTransform, SamTransform

QUESTIONS = [
    "Can you confirm if the man in red is present in this image?",
    "white car",
    "Is there a small yellow star? If it is, kindly provide the segmentation map.",
    "the left zebra",
    "What is in this image? Please output segmentation mask.",
    "person on right",
    "Is there a dog?",
]


def _work(model, tokenizer, sizes, queries_per_image, template="llava_v1"):
    clip = ClipTransform(model.config.vision.image_size)
    sam = SamTransform(model.config.sam.image_size)
    works, q = [], 0
    for i, ((h, w), count) in enumerate(zip(sizes, queries_per_image)):
        img = (np.random.default_rng(i).random((h, w, 3)) * 255).astype(np.uint8)
        s = sam(img)
        prompts = []
        for _ in range(count):
            prompts.append(tokenize_with_image(build_prompt("<image>\n" + QUESTIONS[q % len(QUESTIONS)] * (1 + q % 2),
                                                            template=template), tokenizer))
            q += 1
        works.append(ImageWork(clip(img), s.pixels, s.resized_size, s.original_size, prompts))
    return works


def _hook(token_ids, seg_every=2):
    """[SEG] at step q % 3 for queries with q % seg_every == 0; EOS at step 3 + q % 5; q = flat index."""
    def hook(step, logits, query):
        logits = logits.clone()
        q = query.clamp(min=0)
        force_seg = (query >= 0) & (q % seg_every == 0) & (q % 3 == step)
        force_eos = (query >= 0) & (3 + q % 5 == step)
        logits[force_seg, token_ids.seg] += 1e4
        logits[force_eos, token_ids.eos] += 1e4
        return logits
    return hook


def _one_at_a_time(model, works, token_ids, max_new, hook):
    out, q = [], 0
    for w in works:
        preds = []
        for prompt in w.prompts:
            h = None
            if hook is not None:
                index = torch.tensor([q])
                h = (lambda idx: (lambda step, logits: hook(step, logits, idx.expand(logits.shape[0]))))(index)
            preds.append(model.predict(w.clip_pixels[None], w.sam_pixels[None], [w.resized_size], [w.original_size],
                                       [prompt], [0], max_new_tokens=max_new, logits_hook=h)[0])
            q += 1
        out.append(preds)
    return out


def _assert_same(batched, single):
    assert [len(b) for b in batched] == [len(s) for s in single]
    for bs, ss in zip(batched, single):
        for b, s in zip(bs, ss):
            assert b.output_ids == s.output_ids
            assert b.exists == s.exists
            assert b.masks.shape == s.masks.shape and torch.equal(b.masks, s.masks)
            torch.testing.assert_close(b.seg_hidden, s.seg_hidden, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("slots,first_capacity,column_block", [(8, 32, 256), (3, 2, 4)])
def test_engine_equals_predict_forced_seg(tokenizer, token_ids, slots, first_capacity, column_block, monkeypatch):
    """Several images, 1-7 queries each (more than a group's slots), [SEG] in some answers,
    answers of different lengths (groups finish at different steps and are dropped), cache growth."""
    calls = {"grow": 0, "select": 0}
    for name in calls:
        original = getattr(GroupKVCache, name)
        def counted(self, *a, f=original, key=name):
            calls[key] += 1
            return f(self, *a)
        monkeypatch.setattr(GroupKVCache, name, counted)
    model = tiny_model(token_ids, len(tokenizer), seed=1)
    works = _work(model, tokenizer, [(40, 60), (64, 32), (23, 77), (50, 50)], [3, 1, 7, 2])
    hook = _hook(token_ids)
    engine = BatchedInference(model, EngineConfig(slots_per_group=slots,
                                                  first_capacity=first_capacity, sam_batch=3, prefix_batch=2,
                                                  column_block=column_block),
                              logits_hook=hook)
    batched = engine.run(works, 9)
    single = _one_at_a_time(model, works, token_ids, 9, hook)
    _assert_same(batched, single)
    n_seg = sum(len(p.seg_hidden) for ps in batched for p in ps)
    assert n_seg >= 4 and any(p.exists for ps in batched for p in ps)
    lengths = {len(p.output_ids) for ps in batched for p in ps}
    assert len(lengths) >= 3  # EOS at different steps
    assert calls["select"] >= 1  # finished groups were dropped
    assert (calls["grow"] >= 1) == (first_capacity < 9)


def test_answers_with_several_segs_keep_their_states_in_order(tokenizer, token_ids):
    """Answers with two or three [SEG]s at different steps, answers with none, groups dropped as they
    end: each answer's [SEG] states and masks in its own step order, as predict gives them."""
    def hook(step, logits, query):
        logits = logits.clone()
        q = query.clamp(min=0)
        seg = (query >= 0) & (((q % 2 == 0) & ((step == 0) | (step == 2))) | ((q % 3 == 0) & (step == 1)))
        logits[seg, token_ids.seg] += 1e4
        logits[(query >= 0) & (step == 4 + q % 3), token_ids.eos] += 1e4
        return logits

    model = tiny_model(token_ids, len(tokenizer), seed=2)
    works = _work(model, tokenizer, [(40, 60), (23, 77), (50, 50)], [4, 1, 5])
    engine = BatchedInference(model, EngineConfig(slots_per_group=3, first_capacity=2), logits_hook=hook)
    batched = engine.run(works, 8)
    _assert_same(batched, _one_at_a_time(model, works, token_ids, 8, hook))
    counts = [len(p.seg_hidden) for ps in batched for p in ps]
    assert 3 in counts and 2 in counts and 0 in counts
    several = next(p for ps in batched for p in ps if len(p.seg_hidden) == 3)
    assert not torch.allclose(several.seg_hidden[0], several.seg_hidden[1])  # an order swap would show


def test_engine_equals_predict_free_generation(tokenizer, token_ids):
    """No forcing: whatever the random model says, up to 12 tokens (runs past the first capacity)."""
    model = tiny_model(token_ids, len(tokenizer), seed=5)
    works = _work(model, tokenizer, [(31, 45), (60, 20)], [4, 2], template="vicuna_v1")
    engine = BatchedInference(model, EngineConfig(first_capacity=4))
    _assert_same(engine.run(works, 12), _one_at_a_time(model, works, token_ids, 12, None))


def _tiny_gqa_model(token_ids, vocab_size, seed):
    from model.config import SesameConfig
    from model.sesame import SesameModel

    cfg = SesameConfig.tiny(vocab_size=vocab_size)
    cfg.llm.num_key_value_heads = 2  # 4 query heads share 2 key/value heads
    cfg.use_token_ids(token_ids)
    torch.manual_seed(seed)
    return SesameModel(cfg).eval()


@pytest.mark.parametrize("variant", ["gqa", "lora", "unpacked"])
def test_engine_equals_predict_for_other_llms(tokenizer, token_ids, variant):
    """Grouped-query attention, an LLM with unmerged LoRA layers (its q/v projections are not packed,
    its gate/up are), and packing turned off all give what `predict` gives."""
    if variant == "gqa":
        model = _tiny_gqa_model(token_ids, len(tokenizer), seed=6)
    else:
        model = tiny_model(token_ids, len(tokenizer), seed=6)
    if variant == "lora":
        from model.lora import apply_lora

        apply_lora(model)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.2)
        model.eval()
    works = _work(model, tokenizer, [(40, 60), (52, 33)], [3, 2])
    hook = _hook(token_ids)
    if variant != "unpacked":
        pack_qkv(model.language_model.model)
        pack_gate_up(model.language_model.model)
    engine = BatchedInference(model, EngineConfig(),
                              logits_hook=hook)
    batched = engine.run(works, 7)
    assert engine._layers_of.packed == (variant == "gqa")
    assert engine._layers_of.gate_up_packed == (variant != "unpacked")
    _assert_same(batched, _one_at_a_time(model, works, token_ids, 7, hook))


def test_engine_equals_predict_with_sasp(tokenizer, token_ids):
    """READ: masks use the image-token states of the shared prefix pass."""
    model = tiny_model(token_ids, len(tokenizer), seed=2, sasp=SasPConfig(num_points=5, down_sample=1))
    works = _work(model, tokenizer, [(40, 60), (52, 33)], [3, 2])
    hook = _hook(token_ids, seg_every=1)
    engine = BatchedInference(model, EngineConfig(), logits_hook=hook)
    batched = engine.run(works, 6)
    single = _one_at_a_time(model, works, token_ids, 6, hook)
    _assert_same(batched, single)
    with_seg = [(b, s) for bs, ss in zip(batched, single) for b, s in zip(bs, ss) if len(b.seg_hidden)]
    assert len(with_seg) >= 3
    for b, s in with_seg:
        assert b.sasp is not None
        assert torch.equal(b.sasp.labels, s.sasp.labels)
        torch.testing.assert_close(b.sasp.points, s.sasp.points, atol=1e-3, rtol=1e-4)


def test_engine_mixed_templates_and_bf16(tokenizer, token_ids):
    """Two prefixes (system prompts) in one run are handled as two prefix groups; bf16 runs."""
    model = tiny_model(token_ids, len(tokenizer), seed=4, dtype=torch.bfloat16)
    a = _work(model, tokenizer, [(30, 40)], [2])[0]
    b = _work(model, tokenizer, [(30, 40)], [1], template="vicuna_v1")[0]
    a.prompts = a.prompts + b.prompts
    timer = StageTimer()
    engine = BatchedInference(model, EngineConfig(), logits_hook=_hook(token_ids, 1),
                              timer=timer)
    out = engine.run([a], 4)
    assert len(out[0]) == 3 and all(p.masks.shape[1:] == (30, 40) for p in out[0])
    assert set(timer.seconds) == {"encoders", "prefill_prefix", "prefill_suffix", "decode", "masks"}


def test_bad_prompts_are_named(tokenizer, token_ids):
    model = tiny_model(token_ids, len(tokenizer))
    w = _work(model, tokenizer, [(20, 20)], [1])[0]
    engine = BatchedInference(model, EngineConfig())
    w.prompts = [[1, 2, 3]]
    with pytest.raises(ValueError, match="image 0 prompt 0.*exactly one image placeholder"):
        engine.run([w], 2)
    with pytest.raises(ValueError, match="queries_per_batch"):
        EngineConfig(queries_per_batch=0)


def test_common_start_leaves_every_suffix_its_last_token():
    from engine.plan import common_start

    assert common_start([[5, 6, 7, 8], [5, 6, 9], [5, 6, 7]]) == [5, 6]
    assert common_start([[5, 6, 7], [5, 6, 7, 8]]) == [5, 6]  # one suffix is a start of another
    assert common_start([[5, 6, 7]]) == [5, 6]  # a lone query: all but its last token
    assert common_start([[1, 2], [3, 2]]) == [] and common_start([[4]]) == [] and common_start([]) == []


def test_batch_images_respects_budget():
    items = [3, 1, 7, 2, 2, 9, 1]
    batches = list(batch_images(items, lambda n: n, queries_per_batch=5))
    assert batches == [[3, 1], [7], [2, 2], [9], [1]]
    assert [x for b in batches for x in b] == items
    assert list(batch_images(items, lambda n: n, 100, max_images=3)) == [[3, 1, 7], [2, 2, 9], [1]]


class _ReplayedStep:
    """Stands in for a CUDA graph on the CPU: every replay recomputes the captured step into the same
    output tensor, so a caller that kept an earlier output sees it overwritten, as with real graphs."""

    def __init__(self, step):
        self.step = step

    def replay(self):
        self.out.copy_(self.step())


def test_graph_bookkeeping_equals_predict(tokenizer, token_ids, monkeypatch):
    """The CUDA-graph path without a GPU: outputs reused across replays, one capture per
    (rows, slots, columns read) reused by later steps and later runs on the kept cache, captures
    dropped when the cache grows and beyond max_graphs."""
    def fake_capture(self, step):
        graph = _ReplayedStep(step)
        result = step()
        graph.out = step()
        self.graph_captures += 1
        return graph, graph.out, result

    monkeypatch.setattr(BatchedInference, "_use_graphs", lambda self: True)
    monkeypatch.setattr(BatchedInference, "_capture", fake_capture)
    model = tiny_model(token_ids, len(tokenizer), seed=3)
    works = _work(model, tokenizer, [(40, 60), (64, 32), (23, 77)], [3, 5, 2])
    hook = _hook(token_ids)
    single = _one_at_a_time(model, works, token_ids, 9, hook)
    counts = {}
    for max_graphs in (64, 2):
        cfg = EngineConfig(slots_per_group=3, first_capacity=3, column_block=8, row_block=2, max_graphs=max_graphs)
        engine = BatchedInference(model, cfg, logits_hook=hook)
        _assert_same(engine.run(works, 9), single)
        first = engine.graph_captures
        assert 2 <= first < 8  # steps share captures
        assert len(engine._graphs) <= max_graphs
        # growth dropped the captures made before it; after a second run the kept cache and captures
        # serve a third one as they are
        _assert_same(engine.run(works, 9), single)
        second = engine.graph_captures
        _assert_same(engine.run(works, 9), single)
        counts[max_graphs] = (first, second - first, engine.graph_captures - second)
    assert 0 < counts[64][1] < counts[64][0] and counts[64][2] == 0
    assert counts[2][2] > 0  # unless they were dropped for max_graphs


def test_engine_reused_across_runs(tokenizer, token_ids):
    """One engine, runs of different shapes: slot counts, more groups than the kept cache has rows,
    longer prompts than it has columns (reallocated), then a small run on the large cache."""
    model = tiny_model(token_ids, len(tokenizer), seed=6)
    hook = _hook(token_ids)
    engine = BatchedInference(model, EngineConfig(slots_per_group=4, first_capacity=4,
                                                  column_block=8, row_block=1), logits_hook=hook)
    runs = [_work(model, tokenizer, [(40, 60)], [2]),
            _work(model, tokenizer, [(30, 30), (64, 32), (23, 77), (50, 20)], [4, 1, 6, 3]),
            _work(model, tokenizer, [(33, 41)], [1])]
    sizes = []
    for works in runs:
        _assert_same(engine.run(works, 7), _one_at_a_time(model, works, token_ids, 7, hook))
        sizes.append((engine._cache.rows, engine._cache.columns))
    assert sizes[1][0] > sizes[0][0] and sizes[2] == sizes[1]


def test_compiled_sam_path_pads_to_one_shape(tokenizer, token_ids, monkeypatch):
    """--compile_sam: the encoder sees only full batches of sam_batch images (the last chunk padded).
    torch.compile itself is replaced by a shape recorder (compiling on the CPU takes minutes)."""
    shapes = []

    def recorder(module, **kwargs):
        def call(x):
            shapes.append(tuple(x.shape))
            return module(x)
        return call

    monkeypatch.setattr(torch, "compile", recorder)
    model = tiny_model(token_ids, len(tokenizer), seed=2)
    works = _work(model, tokenizer, [(40, 60), (64, 32), (23, 77), (50, 50), (31, 45)], [1, 2, 1, 1, 1])
    hook = _hook(token_ids)
    engine = BatchedInference(model, EngineConfig(sam_batch=3, compile_sam=True),
                              logits_hook=hook)
    _assert_same(engine.run(works, 5), _one_at_a_time(model, works, token_ids, 5, hook))
    assert len(shapes) == 2 and {s[0] for s in shapes} == {3}


def test_engine_takes_resized_uint8_sam_input_and_lazy_images(tokenizer, token_ids):
    """What the evaluation loader hands over: SAM input only resized (uint8, normalised and padded
    by the engine), images as a lazy iterable. Same answers and masks as normalised float input."""
    model = tiny_model(token_ids, len(tokenizer), seed=3)
    works = _work(model, tokenizer, [(40, 60), (52, 33), (20, 70)], [2, 3, 1])
    sam = SamTransform(model.config.sam.image_size)
    raw = []
    for i, w in enumerate(works):  # the same images _work drew, resized only
        h, wd = w.original_size
        img = (np.random.default_rng(i).random((h, wd, 3)) * 255).astype(np.uint8)
        r = sam.resized(img)
        assert r.pixels.dtype == torch.uint8 and tuple(r.pixels.shape[:2]) == w.resized_size
        assert torch.equal(sam(img).pixels, w.sam_pixels)
        raw.append(ImageWork(w.clip_pixels, r.pixels, r.resized_size, r.original_size, w.prompts))
    hook = _hook(token_ids)
    cfg = EngineConfig(sam_batch=2)
    want = BatchedInference(model, cfg, logits_hook=hook).run(works, 6)
    pulled = []

    def lazily():
        for w in raw:
            pulled.append(w)
            yield w

    engine = BatchedInference(model, cfg, logits_hook=hook)
    encoded_after = []  # images pulled when each SAM chunk was queued: as soon as it has all its images
    encode_sam = engine._encode_sam
    engine._encode_sam = lambda pixels: encoded_after.append((len(pulled), len(pixels))) or encode_sam(pixels)
    got = engine.run(lazily(), 6)
    assert len(pulled) == 3 and encoded_after == [(2, 2), (3, 1)]
    _assert_same(got, want)


def test_engine_preprocesses_deferred_images_itself(tokenizer, token_ids):
    """Works whose pixels are only decoded (`prepare(..., defer=True)`, what the loader hands a GPU
    engine): the engine resizes them where it runs, and answers, [SEG] states and masks equal those
    of works preprocessed on the host. The reference backend takes them too."""
    from model.builder import LoadedSesame
    from model.predictor import ReferenceBackend, SesamePredictor

    model = tiny_model(token_ids, len(tokenizer), seed=3)
    loaded = LoadedSesame(model, tokenizer, ClipTransform(model.config.vision.image_size),
                          SamTransform(model.config.sam.image_size))
    predictor = SesamePredictor(loaded, conv_type="llava_v1")
    works = _work(model, tokenizer, [(40, 60), (52, 33), (20, 70)], [2, 3, 1])
    deferred = []
    for i, w in enumerate(works):  # the same images _work drew, decoded only
        img = (np.random.default_rng(i).random((*w.original_size, 3)) * 255).astype(np.uint8)
        d = predictor.prepare(img, w.prompts, defer=True)
        assert d.clip_pixels is None and d.raw is not None and d.resized_size == w.resized_size
        deferred.append(d)
    hook = _hook(token_ids)
    cfg = EngineConfig(sam_batch=2)
    want = BatchedInference(model, cfg, logits_hook=hook).run(works, 6)
    _assert_same(BatchedInference(model, cfg, logits_hook=hook).run(deferred, 6), want)
    reference = ReferenceBackend(model, logits_hook=hook)
    _assert_same(reference.run(deferred[:1], 6), reference.run(works[:1], 6))


def test_answer_masks_threshold_copy_and_encode_by_size(tokenizer, token_ids):
    """_answer_masks, done once per image size: the same masks, See decisions and RLEs as answer by
    answer, for answers without masks, with an empty first mask, and of several sizes, interleaved."""
    from model.sesame import SegMasks, sees_object
    from utils.mask_io import encode_rle

    model = tiny_model(token_ids, len(tokenizer), seed=2)
    engine = BatchedInference(model, EngineConfig(mask_rles=True))
    g = torch.Generator().manual_seed(0)

    def logits(k, h, w, empty_first=False):
        x = torch.randn(k, h, w, generator=g)
        if empty_first and k:
            x[0] = -1.0
        return SegMasks(logits=x)

    answers = [logits(1, 5, 7), logits(0, 6, 4), logits(2, 6, 4, empty_first=True), logits(1, 5, 7, empty_first=True),
               logits(3, 5, 7), logits(0, 5, 7), logits(1, 6, 4)]
    masks, exists, rles = engine._answer_masks(answers)
    for a, m, e, r in zip(answers, masks, exists, rles):
        want = a.logits > 0
        assert torch.equal(m, want) and e == sees_object(want)
        assert r == [encode_rle(x.numpy()) for x in want]
    assert exists == [True, False, False, False, True, False, True]
    engine.config.mask_rles = False
    assert engine._answer_masks(answers)[2] == [None] * len(answers)


def test_decode_stops_when_every_group_ends_at_a_drop(tokenizer, token_ids, monkeypatch):
    """The decode reads whether groups have ended one step late. Two one-query groups end at steps 3
    and 4: at step 4 the late flags ask for a drop of the ended group, and the drop finds every group
    ended. Decoding stops there (a step over no cache rows fails on a GPU) with the same answers."""
    steps = []
    step = BatchedInference._step

    def counted(self, decoder, llm, buf, rows, n, read):
        steps.append(rows)
        return step(self, decoder, llm, buf, rows, n, read)

    monkeypatch.setattr(BatchedInference, "_step", counted)
    model = tiny_model(token_ids, len(tokenizer), seed=1)
    works = _work(model, tokenizer, [(40, 60)], [2])
    hook = _hook(token_ids)  # EOS at step 3 + q: queries 0 and 1 end at steps 3 and 4
    engine = BatchedInference(model, EngineConfig(slots_per_group=1), logits_hook=hook)
    batched = engine.run(works, 9)
    _assert_same(batched, _one_at_a_time(model, works, token_ids, 9, hook))
    assert [len(p.output_ids) for p in batched[0]] == [4, 5]
    assert steps == [2, 2, 2, 2], steps  # steps 0-3 over both groups; none after both ended


@pytest.mark.parametrize("engine", [False, True])
def test_ask_gives_what_fully_prepared_work_gives(tokenizer, token_ids, engine):
    """`ask_many` hands the backend SAM's input resized only (normalised where the model runs): the
    same answers and masks as work prepared in full on the host, for both backends."""
    from model.builder import LoadedSesame
    from model.predictor import SesamePredictor

    model = tiny_model(token_ids, len(tokenizer), seed=4)
    loaded = LoadedSesame(model, tokenizer, ClipTransform(model.config.vision.image_size),
                          SamTransform(model.config.sam.image_size))
    hook = _hook(token_ids, seg_every=1)
    backend = BatchedInference(model, EngineConfig(), logits_hook=hook) if engine else None
    predictor = SesamePredictor(loaded, conv_type="llava_v1", max_new_tokens=6, backend=backend)
    if not engine:
        from model.predictor import ReferenceBackend
        predictor.backend = ReferenceBackend(model, logits_hook=hook)
    images = [(np.random.default_rng(k).random((37 + 9 * k, 52, 3)) * 255).astype(np.uint8) for k in range(2)]
    questions = ["Is there a red square? Please segment it.", "the left zebra"]
    answers = predictor.ask_many([(image, questions) for image in images])
    works = [predictor.prepare(image, [predictor.prompt_ids(q) for q in questions]) for image in images]
    assert works[0].sam_pixels.dtype == torch.float32  # prepared in full
    expected = predictor.run(works)
    for got, want in zip(answers, expected):
        for a, p in zip(got, want):
            assert a.output_ids == p.output_ids
            assert torch.equal(a.masks, p.masks) and a.masks.shape[0] >= 1
