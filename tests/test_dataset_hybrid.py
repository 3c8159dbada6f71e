"""HybridDataset sampling and collate_fn (labels, masks, truncation), and the model contract."""
import functools
import os
import shutil

import numpy as np
import pytest
import torch

from dataset.collate import collate_fn, encode_conversation, truncation_point
from dataset.hybrid import HYBRID_SOURCES, HybridDataset
from dataset.sample import Sample
from model.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Conversation
from model.transforms import ClipTransform, SamTransform

ALL = "sem_seg||refer_seg||correct_refer_seg||vqa||neg_refer_seg||reason_seg"


@pytest.fixture(scope="module")
def transforms():
    return ClipTransform(32), SamTransform(64)


def _hybrid(root, tokenizer, transforms, **kw):
    kw.setdefault("samples_per_epoch", 1000)
    return HybridDataset(root, tokenizer, *transforms, **kw)


def _supervised_spans(ids, labels):
    spans, cur = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == i
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return spans


def _assert_decodes_to(tokenizer, ids, text):
    """Exact, except that the legacy tokenizer decodes the added [SEG] token with its own spacing
    ("x: [SEG]." -> "x:[SEG] ."; the ids are the original's), so there only whitespace may differ."""
    decoded = tokenizer.decode(ids)
    if "[SEG]" in text:
        assert "".join(decoded.split()) == "".join(text.split())
    else:
        assert decoded == text


# --- sampling ----------------------------------------------------------------------------------
def test_every_source_and_determinism(synthetic_root, tokenizer, transforms):
    ds = _hybrid(synthetic_root, tokenizer, transforms, datasets=ALL, sample_rates="1,1,1,1,1,1", seed=5)
    again = _hybrid(synthetic_root, tokenizer, transforms, datasets=ALL, sample_rates="1,1,1,1,1,1", seed=5)
    idx = list(range(40))
    a = [ds[i] for i in idx]
    b = [again[i] for i in reversed(idx)][::-1]  # other order, other instance: same items
    assert {s.source for s in a} == set(ALL.split("||"))
    for x, y in zip(a, b):
        assert x.image_path == y.image_path and x.sentences == y.sentences
        assert [c.render() for c in x.conversations] == [c.render() for c in y.conversations]
        assert torch.equal(x.masks, y.masks) and torch.equal(x.images_clip, y.images_clip)
    other = _hybrid(synthetic_root, tokenizer, transforms, datasets=ALL, sample_rates="1,1,1,1,1,1", seed=6)
    assert [other[i].image_path for i in idx] != [s.image_path for s in a]
    for i, s in enumerate(a):
        assert isinstance(s, Sample) and s.source == ds.source_of(i)
        assert s.masks.dtype == torch.uint8 and s.masks.shape[1:] == s.sam.original_size
        assert s.masks.shape[0] == sum(c.answers[0].count("[SEG]") for c in s.conversations)
        assert 1 <= len(s.conversations) <= 3


def test_rates_are_honoured(synthetic_root, tokenizer, transforms):
    ds = _hybrid(synthetic_root, tokenizer, transforms, samples_per_epoch=20000)  # SESAME mix 12:2:2:1
    names = ds.names
    counts = {n: 0 for n in names}
    for i in range(len(ds)):
        counts[ds.source_of(i)] += 1
    p = np.array([12, 2, 2, 1]) / 17
    for n, pi in zip(names, p):
        sd = np.sqrt(len(ds) * pi * (1 - pi))
        assert abs(counts[n] - len(ds) * pi) < 4 * sd, (n, counts[n], len(ds) * pi)
    assert [ds[i].source for i in range(30)] == [ds.source_of(i) for i in range(30)]


def test_bad_arguments(synthetic_root, tokenizer, transforms):
    with pytest.raises(ValueError, match="known: " + ", ".join(HYBRID_SOURCES)):
        _hybrid(synthetic_root, tokenizer, transforms, datasets="refer_seg||vqa_seg", sample_rates=(1, 1))
    with pytest.raises(ValueError, match="sample_rates has 3 values for 4 datasets"):
        _hybrid(synthetic_root, tokenizer, transforms, sample_rates="9,3,3")
    with pytest.raises(ValueError, match="known: refclef"):
        _hybrid(synthetic_root, tokenizer, transforms, datasets="refer_seg", sample_rates=[1],
                refer_seg_data="refcocoX")
    with pytest.raises(ValueError, match="conv_template"):
        _hybrid(synthetic_root, tokenizer, transforms, conv_template="llava_v2")
    with pytest.raises(IndexError):
        _hybrid(synthetic_root, tokenizer, transforms, samples_per_epoch=3)[3]


def test_missing_source_names_path_and_dataset(synthetic_root, tokenizer, transforms, tmp_path):
    from dataset.image_io import DatasetFileError
    root = tmp_path / "r"
    shutil.copytree(synthetic_root, root, ignore=shutil.ignore_patterns("llava_dataset"))
    with pytest.raises(DatasetFileError, match="llava_instruct_150k.*llava_instruct_150k.json"):
        _hybrid(str(root), tokenizer, transforms)


def test_corrupt_images_are_skipped_and_counted(synthetic_root, tokenizer, transforms, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(synthetic_root, root)
    folder = root / "refer_seg" / "images" / "mscoco" / "images" / "train2014"
    broken = sorted(folder.iterdir())[0:6:2]  # half of the training images
    for f in broken:
        f.write_bytes(b"\xff\xd8 truncated")
    ds = _hybrid(str(root), tokenizer, transforms, datasets="refer_seg", sample_rates=[1],
                 refer_seg_data="refcoco||refcocog")
    samples = [ds[i] for i in range(40)]
    assert all(os.path.basename(s.image_path) not in {f.name for f in broken} for s in samples)
    counts = ds.skipped_counts()  # per source and reason
    assert counts and set(counts) <= {"refcoco/not_an_image", "refcocog/not_an_image"} and sum(counts.values()) > 0
    batch = collate_fn(samples, tokenizer)
    assert sum(batch.meta["skipped"].values()) == sum(counts.values())


# --- labels --------------------------------------------------------------------------------------
def test_labels_supervise_answers_and_eos_only(tokenizer, token_ids):
    answers = ["Sure, here is red square: [SEG].", "There is no dog in this image, but there is a cat."]
    for a in answers:
        conv = Conversation(["<image>\nIs there red square here?"], [a])
        ids, labels, ends = encode_conversation(conv, tokenizer)
        spans = _supervised_spans(ids, labels)
        assert len(spans) == 1
        assert spans[0] == tokenizer(a, add_special_tokens=False).input_ids + [token_ids.eos]
        _assert_decodes_to(tokenizer, spans[0], a + "</s>")
        assert ends == [len(ids)] and ids.count(IMAGE_TOKEN_INDEX) == 1 and ids[0] == token_ids.bos


def test_multi_turn_labels(tokenizer, token_ids):
    qs = ["<image>\nWhat shapes are in this picture?", "Where is the red square?", "And the circle?"]
    ans = ["A red square and a blue circle.", "At the top left.", "It is at the bottom right."]
    ids, labels, ends = encode_conversation(Conversation(qs, ans, "vicuna_v1"), tokenizer)
    spans = _supervised_spans(ids, labels)
    for span, a in zip(spans, ans):
        _assert_decodes_to(tokenizer, span, a + "</s>")
    assert [s[-1] for s in spans] == [token_ids.eos] * 3 and ends[-1] == len(ids)
    # the user turns and the system prompt are never supervised
    unsupervised = [i for i, label in zip(ids, labels) if label == IGNORE_INDEX and i >= 0]
    text = tokenizer.decode(unsupervised)
    assert "curious user" in text and "Where is the red square" in text


def test_vqa_sample_labels_through_collate(synthetic_root, tokenizer, token_ids, transforms):
    ds = _hybrid(synthetic_root, tokenizer, transforms, datasets="vqa", sample_rates=[1])
    s = ds[0]
    batch = collate_fn([s], tokenizer)
    row = batch.input_ids[0][batch.attention_mask[0]].tolist()
    spans = _supervised_spans(row, batch.labels[0][batch.attention_mask[0]].tolist())
    ans = s.conversations[0].answers
    assert len(spans) == len(ans) == 2
    for span, a in zip(spans, ans):
        assert span == tokenizer(a, add_special_tokens=False).input_ids + [token_ids.eos]
        _assert_decodes_to(tokenizer, span, a + "</s>")


def test_every_source_supervises_exactly_its_answers(synthetic_root, tokenizer, token_ids, transforms):
    ds = _hybrid(synthetic_root, tokenizer, transforms, datasets=ALL, sample_rates="1,1,1,1,1,1")
    samples = [ds[i] for i in range(24)]
    b = collate_fn(samples, tokenizer)
    answers = [c.answers for s in samples for c in s.conversations]
    for r, ans in enumerate(answers):
        keep = b.attention_mask[r]
        spans = _supervised_spans(b.input_ids[r][keep].tolist(), b.labels[r][keep].tolist())
        assert len(spans) == len(ans)
        for span, a in zip(spans, ans):
            _assert_decodes_to(tokenizer, span, a + "</s>")


def test_vqa_image_in_a_later_turn_through_collate(synthetic_root, tokenizer, token_ids, transforms):
    """A record whose <image> is in its second question keeps it there, in the prompt the model sees;
    truncation keeps the round that holds it."""
    ds = _hybrid(synthetic_root, tokenizer, transforms, datasets="vqa", sample_rates=[1], samples_per_epoch=200)
    s = next(ds[i] for i in range(200) if "<image>" in ds[i].conversations[0].questions[1])
    b = collate_fn([s], tokenizer)
    ids = b.input_ids[0][b.attention_mask[0]].tolist()
    image_at = ids.index(IMAGE_TOKEN_INDEX)
    first_answer_end = _supervised_spans(ids, b.labels[0][b.attention_mask[0]].tolist())[0]
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and image_at > ids.index(first_answer_end[-1])
    # a limit that only the first round fits: the row is cut inside the second round, keeping the image
    cut = collate_fn([s], tokenizer, model_max_length=image_at + 3)
    assert cut.meta["truncated_rows"] == 1 and int((cut.input_ids == IMAGE_TOKEN_INDEX).sum()) == 1


# --- collate -------------------------------------------------------------------------------------
def test_collate_batch_layout(synthetic_root, tokenizer, token_ids, transforms):
    ds = _hybrid(synthetic_root, tokenizer, transforms, datasets=ALL, sample_rates="1,1,1,1,1,1")
    samples = [ds[i] for i in range(8)]
    b = collate_fn(samples, tokenizer, conv_template="llava_v1")
    n_conv = [len(s.conversations) for s in samples]
    assert b.offset.tolist() == np.cumsum([0] + n_conv).tolist()
    assert b.images_clip.shape == (8, 3, 32, 32) and b.images_sam.shape == (8, 3, 64, 64)
    assert b.input_ids.shape == b.labels.shape == b.attention_mask.shape and b.input_ids.shape[0] == sum(n_conv)
    assert b.original_sizes == [s.sam.original_size for s in samples]
    assert ((b.input_ids == IMAGE_TOKEN_INDEX).sum(1) == 1).all()
    assert (b.input_ids[~b.attention_mask] == token_ids.pad).all()
    assert (b.labels[~b.attention_mask] == IGNORE_INDEX).all()
    for i, s in enumerate(samples):
        rows = b.input_ids[b.offset[i]:b.offset[i + 1]]
        assert int((rows == token_ids.seg).sum()) == b.masks[i].shape[0]
        assert torch.equal(b.masks[i], s.masks)
    assert len(b.meta["sentences"]) == sum(n_conv) and b.meta["image_paths"][0] == samples[0].image_path
    # the dataset's template unless overridden
    assert "curious human" in tokenizer.decode([i for i in b.input_ids[0].tolist() if i >= 0])
    bv = collate_fn(samples[:1], tokenizer, conv_template="vicuna_v1")
    assert "curious user" in tokenizer.decode([i for i in bv.input_ids[0].tolist() if i >= 0])


def test_truncation_never_cuts_seg_without_its_mask(synthetic_root, tokenizer, token_ids, transforms):
    ds = _hybrid(synthetic_root, tokenizer, transforms, datasets="refer_seg", sample_rates=[1])
    s = next(ds[i] for i in range(50) if len(ds[i].conversations) == 3 and ds[i].masks.shape[0] == 3)
    full = collate_fn([s], tokenizer)
    lengths = full.attention_mask.sum(1).tolist()
    seg_pos = [(row == token_ids.seg).nonzero()[0, 0].item() for row in full.input_ids]
    # a limit between the shortest row's [SEG] and its end: rows longer than it lose their [SEG]
    limit = max(p for p in seg_pos) - 1
    cut = collate_fn([s], tokenizer, model_max_length=limit)
    assert cut.input_ids.shape[1] <= limit and cut.meta["truncated_rows"] >= 1
    keep = [p < limit for p in seg_pos]
    assert cut.masks[0].shape[0] == sum(keep) == int((cut.input_ids == token_ids.seg).sum())
    assert torch.equal(cut.masks[0], s.masks[torch.tensor(keep)])
    assert cut.meta["dropped_masks"] == 3 - sum(keep)
    assert max(lengths) > limit
    with pytest.raises(ValueError, match="too small"):
        collate_fn([s], tokenizer, model_max_length=5)
    # counting the image as its patch count shrinks the text budget accordingly
    fit = collate_fn([s], tokenizer, model_max_length=max(lengths) + 15, image_tokens=16)
    assert fit.meta["truncated_rows"] == 0
    tight = collate_fn([s], tokenizer, model_max_length=max(lengths) + 15, image_tokens=17)
    assert tight.meta["truncated_rows"] >= 1


def test_multi_turn_truncation_drops_whole_rounds(tokenizer):
    conv = Conversation(["<image>\nq one?", "q two?", "q three?"], ["answer one.", "answer two.", "answer three."])
    ids, labels, ends = encode_conversation(conv, tokenizer)
    assert truncation_point(len(ids), ends, len(ids)) == len(ids)
    assert truncation_point(len(ids), ends, len(ids) - 1) == ends[1]
    assert truncation_point(len(ids), ends, ends[1] - 1) == ends[0]
    assert truncation_point(len(ids), ends, ends[0] - 1) == ends[0] - 1


def test_collate_rejects_bad_input(tokenizer, transforms):
    with pytest.raises(ValueError, match="empty"):
        collate_fn([], tokenizer)


# --- model contract --------------------------------------------------------------------------------
def test_tiny_model_trains_on_collated_batches(synthetic_root, tokenizer, token_ids):
    from model.tiny import tiny_model
    model = tiny_model(token_ids, len(tokenizer))
    clip, sam = ClipTransform(model.config.vision.image_size), SamTransform(model.config.sam.image_size)
    ds = HybridDataset(synthetic_root, tokenizer, clip, sam, datasets=ALL, sample_rates="1,1,1,1,1,1",
                       samples_per_epoch=100)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=0,
                                         collate_fn=functools.partial(collate_fn, tokenizer=tokenizer))
    it = iter(loader)
    for _ in range(2):
        batch = next(it)
        out = model(batch)
        assert torch.isfinite(out.loss) and out.ce_loss > 0
        assert [p.shape for p in out.pred_masks] == [m.shape for m in batch.masks]


def test_inconsistent_raw_samples_are_skip_items():
    from dataset.image_io import SkipItem
    from dataset.sample import RawSample
    img = np.zeros((4, 5, 3), np.uint8)
    m = np.zeros((4, 5), np.uint8)
    ok = dict(source="refcoco", image_path="x.jpg", image=img, questions=[["<image>\nq"]], answers=[["a [SEG]."]],
              masks=[m], exists=[True], sentences=["q"])
    RawSample(**ok)
    for change, reason in [({"masks": []}, "1 \\[SEG\\] in the answers but 0 masks"),
                           ({"questions": [["q [SEG]"]]}, "exactly one <image>"),
                           ({"questions": [["<image>\nq [SEG]"]]}, "\\[SEG\\] in a question"),
                           ({"masks": [np.zeros((3, 5), np.uint8)]}, "mask shape"),
                           ({"exists": []}, "exists")]:
        with pytest.raises(SkipItem, match=reason):
            RawSample(**{**ok, **change})


def test_workers_give_the_same_stream_and_report_skips(synthetic_root, tokenizer, transforms, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(synthetic_root, root)
    folder = root / "refer_seg" / "images" / "mscoco" / "images" / "train2014"
    for f in sorted(folder.iterdir())[0:6:2]:
        f.write_bytes(b"\xff\xd8 truncated")
    ds = _hybrid(str(root), tokenizer, transforms, datasets="refer_seg||vqa", sample_rates=[3, 1],
                 refer_seg_data="refcoco", samples_per_epoch=24)
    collate = functools.partial(collate_fn, tokenizer=tokenizer)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert ds.skipped_counts() == {}  # the skips happened in the workers ...
    assert sum(sum(b.meta["skipped"].values()) for b in batches) > 0  # ... and travel with the batches
    direct = [collate([ds[i] for i in range(k, k + 4)]) for k in range(0, 24, 4)]
    for a, b in zip(batches, direct):
        assert torch.equal(a.input_ids, b.input_ids) and a.meta["image_paths"] == b.meta["image_paths"]
