"""Evaluation sets and the teacher-forced validation samples."""
import json
import os
import pickle
import random
import shutil

import numpy as np
import pytest

from conftest_data import synthetic_root  # noqa: F401
from dataset.collate import collate_fn
from dataset.eval_sets import EVAL_DATASETS, EvalImage, EvalQuery, build_eval_dataset, teacher_forced_samples
from dataset.image_io import SkipLog
from dataset.refer import ReferData, sentence_exists
from dataset.templates import DEFAULT_TEMPLATES, LISA_EVAL
from model.transforms import ClipTransform, SamTransform


@pytest.mark.parametrize("name", [n for n in EVAL_DATASETS if n != "ReasonSeg"])
def test_refer_eval_sets(synthetic_root, name):
    images = build_eval_dataset(name, synthetic_root, "val", seed=0)
    data = ReferData(synthetic_root, name)
    val_refs = [r for r in data.refs if r["split"] == "val"]
    assert len(images) == len({r["image_id"] for r in val_refs}) and len({im.image_id for im in images}) == len(images)
    assert sum(len(im.queries) for im in images) == sum(len(r["sentences"]) for r in val_refs)
    by_ref = {r["ref_id"]: r for r in val_refs}
    for im in images:
        assert os.path.exists(im.image_path) and im.dataset == name and im.split == "val"
        for q in im.queries:
            ref = by_ref[q.ref_id]
            sent = next(s for s in ref["sentences"] if s["sent_id"] == q.sent_id)
            assert q.sentence == sent["sent"] and q.gt_exists == sentence_exists(sent)
            assert q.question.startswith("<image>\n") and q.sentence.lower() in q.question
            m = q.gt_mask
            assert m.shape == (im.height, im.width) and m.dtype == np.uint8
            if q.gt_exists:
                np.testing.assert_array_equal(m, data.ref_mask(ref))
            else:
                assert m.sum() == 0
            if name.startswith("fp") and not q.gt_exists:
                assert q.gt_sent == sent["gt_sent"]
            else:
                assert q.gt_sent is None
    if name.startswith(("fp", "R-")):
        assert any(not q.gt_exists for im in images for q in im.queries)


def test_refer_test_splits(synthetic_root):
    assert build_eval_dataset("refcoco", synthetic_root, "testA") and build_eval_dataset("refcoco+", synthetic_root, "testB")
    assert build_eval_dataset("refcocog", synthetic_root, "test")
    with pytest.raises(ValueError, match="has no split 'testA'"):
        build_eval_dataset("refcocog", synthetic_root, "testA")
    plain = build_eval_dataset("refcoco", synthetic_root, "val", split_by="unc")
    assert len(plain) == len(build_eval_dataset("refcoco", synthetic_root, "val"))


def test_questions_are_seeded_and_order_independent(synthetic_root, tmp_path):
    a = build_eval_dataset("fprefcoco", synthetic_root, "val", seed=1)
    b = build_eval_dataset("fprefcoco", synthetic_root, "val", seed=1)
    c = build_eval_dataset("fprefcoco", synthetic_root, "val", seed=2)
    qa = {(q.ref_id, q.sent_id): q.question for im in a for q in im.queries}
    assert qa == {(q.ref_id, q.sent_id): q.question for im in b for q in im.queries}
    assert qa != {(q.ref_id, q.sent_id): q.question for im in c for q in im.queries}
    # the same refs in another order (as another shard or file version would list them): same questions
    root = tmp_path / "r"
    shutil.copytree(os.path.join(synthetic_root, "refer_seg", "fprefcoco"), root / "refer_seg" / "fprefcoco")
    os.makedirs(root / "refer_seg" / "images" / "mscoco" / "images" / "train2014")
    path = root / "refer_seg" / "fprefcoco" / "refs(berkeley_exclude_unified).p"
    refs = pickle.load(open(path, "rb"))
    random.Random(0).shuffle(refs)
    pickle.dump(refs, open(path, "wb"), protocol=2)
    shuffled = build_eval_dataset("fprefcoco", str(root), "val", seed=1)
    assert qa == {(q.ref_id, q.sent_id): q.question for im in shuffled for q in im.queries}
    # both styles
    lisa = build_eval_dataset("refcoco", synthetic_root, "val", question_style="lisa")
    q = lisa[0].queries[0]
    assert q.question == LISA_EVAL.short_question.format(class_name=q.sentence.lower())


def test_reason_seg_eval(synthetic_root):
    for split in ("val", "test"):
        images = build_eval_dataset("ReasonSeg", synthetic_root, split)
        assert len(images) == 3
        for im in images:
            true_q, fp_q = im.queries
            with open(os.path.splitext(im.image_path)[0] + ".json") as f:
                anno = json.load(f)
            assert true_q.sentence == anno["text"][0] and true_q.gt_exists and not fp_q.gt_exists
            assert true_q.extra["is_sentence"] == anno["is_sentence"]
            if anno["is_sentence"]:
                assert true_q.question == LISA_EVAL.long_question.format(sent=anno["text"][0])
            else:
                assert true_q.question == LISA_EVAL.short_question.format(class_name=anno["text"][0].lower())
            m = true_q.gt_mask
            assert m.shape == (im.height, im.width) and (m == 1).any() and (m == 255).any()
            assert fp_q.gt_mask.sum() == 0 and fp_q.sentence == anno["false_premise_QA"][0][0]
            assert fp_q.extra["answer"] == anno["false_premise_QA"][0][2]
    sesame = build_eval_dataset("ReasonSeg", synthetic_root, "val", question_style="sesame", include_false_premise=False)
    assert all(len(im.queries) == 1 for im in sesame)
    q = sesame[0].queries[0]
    pool = DEFAULT_TEMPLATES.long_question if q.extra["is_sentence"] else DEFAULT_TEMPLATES.short_question
    assert q.question in {t.format(sent=q.sentence, class_name=q.sentence.lower()) for t in pool}


def test_reason_seg_malformed_json_is_skipped(synthetic_root, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(os.path.join(synthetic_root, "reason_seg"), root / "reason_seg")
    victim = sorted((root / "reason_seg" / "ReasonSeg" / "val").glob("*.json"))[0]
    victim.write_text('{"text": ["x"]}')
    log = SkipLog()
    images = build_eval_dataset("ReasonSeg", str(root), "val", skip_log=log)
    assert len(images) == 2 and log.as_dict() == {"ReasonSeg": 1}


def test_eval_sets_pickle_with_lazy_masks(synthetic_root):
    images = build_eval_dataset("R-refcoco", synthetic_root, "val") + build_eval_dataset("ReasonSeg", synthetic_root, "val")
    back = pickle.loads(pickle.dumps(images))
    for a, b in zip(images, back):
        for qa, qb in zip(a.queries, b.queries):
            assert qa == qb  # gt_mask is not part of equality: compare it explicitly
            np.testing.assert_array_equal(qa.gt_mask, qb.gt_mask)


def test_bad_names(synthetic_root):
    with pytest.raises(ValueError, match="known: refcoco, refcoco\\+"):
        build_eval_dataset("refcoco++", synthetic_root)
    with pytest.raises(ValueError, match="question_style"):
        build_eval_dataset("refcoco", synthetic_root, question_style="fancy")
    with pytest.raises(TypeError, match="unknown argument"):
        build_eval_dataset("refcoco", synthetic_root, sed=3)


def test_eval_query_takes_plain_arrays():
    q = EvalQuery(ref_id=1, sent_id=2, sentence="s", question="<image>\nq", gt_exists=True, gt_sent=None,
                  gt_mask=np.ones((2, 3), np.uint8))
    assert q.gt_mask.shape == (2, 3) and "gt_mask" not in repr(q)
    with pytest.raises(TypeError, match="gt_mask"):
        EvalQuery(1, 2, "s", "q", True, None)
    im = EvalImage("x.jpg", 1, 2, 3, [q])
    assert im.queries[0].gt_mask.sum() == 6


def test_teacher_forced_samples(synthetic_root, tokenizer, token_ids):
    clip, sam = ClipTransform(32), SamTransform(64)
    images = build_eval_dataset("fprefcoco", synthetic_root, "val") + build_eval_dataset("ReasonSeg", synthetic_root, "val")
    samples = list(teacher_forced_samples(images, clip, sam))
    assert len(samples) == len(images)
    for im, s in zip(images, samples):
        assert s.image_path == im.image_path and [c.questions[0] for c in s.conversations] == [q.question for q in im.queries]
        for q, c in zip(im.queries, s.conversations):
            a = c.answers[0]
            assert ("[SEG]" in a) == q.gt_exists
            if not q.gt_exists and q.gt_sent:
                assert q.gt_sent.lower() in a
            if q.extra.get("answer"):
                assert a == q.extra["answer"]
            if q.gt_exists and q.extra["question_style"] == "lisa":
                assert a == LISA_EVAL.answer
        assert s.masks.shape[0] == sum(q.gt_exists for q in im.queries)
    batch = collate_fn(samples, tokenizer)
    assert int((batch.input_ids == token_ids.seg).sum()) == sum(m.shape[0] for m in batch.masks)
    again = list(teacher_forced_samples(images, clip, sam))
    assert [c.answers for s in again for c in s.conversations] == [c.answers for s in samples for c in s.conversations]
    limited = teacher_forced_samples(images, clip, sam, max_queries_per_image=1)
    assert all(len(s.conversations) == 1 for s in limited)


def test_teacher_forced_skips_unreadable_images(synthetic_root, tmp_path):
    images = build_eval_dataset("refcoco", synthetic_root, "val")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"nope")
    images[0].image_path = str(bad)
    ds = teacher_forced_samples(images, ClipTransform(32), SamTransform(64))
    s = ds[0]
    assert s.image_path == images[1].image_path and s.skipped == {"refcoco": 1}
    assert ds.skip_log.as_dict() == {"refcoco": 1}
