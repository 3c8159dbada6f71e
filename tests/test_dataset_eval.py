"""Evaluation sets and the teacher-forced validation samples."""
import json
import os
import pickle
import random
import shutil

import numpy as np
import pytest
from data_files import read_json_any_encoding

from dataset.collate import collate_fn
from dataset.eval_report import EvalDataError, EvalSetReport
from dataset.eval_sets import (
    EVAL_DATASETS,
    EvalImage,
    EvalQuery,
    build_eval_dataset,
    read_eval_image,
    teacher_forced_samples,
)
from dataset.refer import ReferData, sentence_exists
from dataset.templates import DEFAULT_TEMPLATES, LISA_EVAL
from model.transforms import ClipTransform, SamTransform


def _keys(images):
    return sorted((im.image_id, q.ref_id, q.sent_id) for im in images for q in im.queries)


def _copy(synthetic_root, tmp_path, name):
    """A data root with one refer dataset and every refer image."""
    root = tmp_path / "r"
    shutil.copytree(os.path.join(synthetic_root, "refer_seg", name), root / "refer_seg" / name)
    shutil.copytree(os.path.join(synthetic_root, "refer_seg", "images"), root / "refer_seg" / "images")
    return root


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
    assert build_eval_dataset("refcoco", synthetic_root, "testA")
    assert build_eval_dataset("refcoco+", synthetic_root, "testB")
    assert build_eval_dataset("refcocog", synthetic_root, "test")
    # "test" on RefCOCO / RefCOCO+ is testA and testB together, as the REFER API selects it
    for name in ("refcoco", "refcoco+"):
        both = build_eval_dataset(name, synthetic_root, "test")
        parts = build_eval_dataset(name, synthetic_root, "testA") + build_eval_dataset(name, synthetic_root, "testB")
        assert both and _keys(both) == _keys(parts)
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
    root = _copy(synthetic_root, tmp_path, "fprefcoco")
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
            anno = read_json_any_encoding(os.path.splitext(im.image_path)[0] + ".json")
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
            # the false-premise phrase as written (the original does not lower-case it)
            assert fp_q.question == LISA_EVAL.short_question.format(class_name=fp_q.sentence)
            assert fp_q.sentence != fp_q.sentence.lower()
    sesame = build_eval_dataset("ReasonSeg", synthetic_root, "val", question_style="sesame",
                                include_false_premise=False)
    assert all(len(im.queries) == 1 for im in sesame)
    q = sesame[0].queries[0]
    pool = DEFAULT_TEMPLATES.long_question if q.extra["is_sentence"] else DEFAULT_TEMPLATES.short_question
    assert q.question in {t.format(sent=q.sentence, class_name=q.sentence.lower()) for t in pool}


def test_reason_seg_malformed_json_stops_or_is_skipped(synthetic_root, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(os.path.join(synthetic_root, "reason_seg"), root / "reason_seg")
    victim = sorted((root / "reason_seg" / "ReasonSeg" / "val").glob("*.json"))[0]
    victim.write_text('{"text": ["x"]}')
    with pytest.raises(EvalDataError) as info:
        build_eval_dataset("ReasonSeg", str(root), "val")
    assert str(victim) in str(info.value) and "no 'shapes'" in str(info.value) and "\n" not in str(info.value)
    report = EvalSetReport()
    images = build_eval_dataset("ReasonSeg", str(root), "val", on_error="skip", report=report)
    assert len(images) == 2 and report.reasons() == {"annotation/bad_annotation": 1}
    # the broken json names no false premise: its image counts its true-premise query only
    assert report.found == {"images": 3, "refs": 3, "queries": 5} and report.evaluated["queries"] == 4
    assert not report.complete


def test_eval_sets_pickle_with_lazy_masks(synthetic_root):
    images = (build_eval_dataset("R-refcoco", synthetic_root, "val")
              + build_eval_dataset("ReasonSeg", synthetic_root, "val"))
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
    images = (build_eval_dataset("fprefcoco", synthetic_root, "val")
              + build_eval_dataset("ReasonSeg", synthetic_root, "val"))
    samples = list(teacher_forced_samples(images, clip, sam))
    assert len(samples) == len(images)
    for im, s in zip(images, samples):
        assert s.image_path == im.image_path
        assert [c.questions[0] for c in s.conversations] == [q.question for q in im.queries]
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
    assert s.image_path == images[1].image_path and s.skipped == {"refcoco/not_an_image": 1}
    assert ds.skip_log.as_dict() == {"refcoco/not_an_image": 1}


# --- nothing lost silently ---------------------------------------------------------------------
def test_an_image_whose_only_ref_is_rle_stays_in_the_set(synthetic_root):
    """The generator gives one val image a single ref stored as a list of RLE dicts: the image is in
    every refer set, with the mask pycocotools decodes (the union of its parts)."""
    from pycocotools import mask as mask_utils

    from dataset.synthetic import LONE_REF_SCENE
    for name in [n for n in EVAL_DATASETS if n != "ReasonSeg"]:
        data = ReferData(synthetic_root, name)
        image_id = LONE_REF_SCENE + 1
        refs = data.refs_by_image("val")[image_id]
        assert len(refs) == 1
        segm = data.anns[refs[0]["ann_id"]]["segmentation"]
        assert isinstance(segm, list) and all(isinstance(p, dict) for p in segm)
        im = next(im for im in build_eval_dataset(name, synthetic_root, "val") if im.image_id == image_id)
        want = mask_utils.decode([{"size": p["size"], "counts": p["counts"].encode()} for p in segm]).max(axis=2)
        for q in im.queries:
            np.testing.assert_array_equal(q.gt_mask, want if q.gt_exists else 0 * want)
        assert [q.sentence for q in im.queries] == [s["sent"] for s in refs[0]["sentences"]]
        assert [q.sent_id for q in im.queries] == [s["sent_id"] for s in refs[0]["sentences"]]


def _faulty_refcoco(synthetic_root, tmp_path):
    """A refcoco root whose val split has one fault of each kind (image, annotation, unknown and malformed
    refs); returns the root, the queries each fault costs, and the two annotation files."""
    root = _copy(synthetic_root, tmp_path, "refcoco")
    data = ReferData(str(root), "refcoco")
    by_image = data.refs_by_image("val")
    ids = list(by_image)
    inst_path = root / "refer_seg" / "refcoco" / "instances.json"
    instances = json.loads(inst_path.read_text())
    # image faults on the first val image: the file holds text; annotation fault on a ref of the second
    (root / "refer_seg" / "images" / "mscoco" / "images" / "train2014" / data.images[ids[0]].file_name
     ).write_text("not an image\n")
    many = max(ids[1:], key=lambda i: len(by_image[i]))  # an image that keeps other refs
    victim = by_image[many][0]
    ann = next(a for a in instances["annotations"] if a["id"] == victim["ann_id"])
    ann["segmentation"] = {"size": [3, 3], "counts": [9]}
    inst_path.write_text(json.dumps(instances))
    # a ref naming an annotation that does not exist, and a ref without sentences, both in val
    refs_path = root / "refer_seg" / "refcoco" / "refs(unc_exclude_unified).p"
    refs = pickle.load(open(refs_path, "rb"))
    ghost = dict(by_image[ids[2]][0], ref_id=9001, ann_id=424242)
    other = next(i for i in data.images if i not in by_image)  # an image with no other val ref
    broken = {"ref_id": 9002, "image_id": other, "split": "val", "ann_id": 1}
    pickle.dump(refs + [ghost, broken], open(refs_path, "wb"), protocol=2)
    lost = {"image": sum(len(r["sentences"]) for r in by_image[ids[0]]), "annotation": len(victim["sentences"]),
            "ref": len(ghost["sentences"])}
    return root, lost, inst_path, refs_path


def test_unreadable_eval_items_stop_with_one_line(synthetic_root, tmp_path):
    root, _, inst_path, refs_path = _faulty_refcoco(synthetic_root, tmp_path)
    with pytest.raises(EvalDataError) as info:  # the refs are read first: the malformed ref
        build_eval_dataset("refcoco", str(root), "val")
    message = str(info.value)
    assert "\n" not in message and str(refs_path) in message and "ref 9002" in message and "no 'sentences'" in message
    assert "on_error='skip'" in message


def test_unreadable_eval_items_are_skipped_and_counted(synthetic_root, tmp_path):
    root, lost, inst_path, refs_path = _faulty_refcoco(synthetic_root, tmp_path)
    clean = build_eval_dataset("refcoco", synthetic_root, "val")
    report = EvalSetReport()
    images = build_eval_dataset("refcoco", str(root), "val", on_error="skip", report=report)
    assert report.reasons() == {"annotation/bad_annotation": 1, "image/not_an_image": 1, "ref/bad_ref": 1,
                                "ref/unknown_annotation": 1}
    n_clean = sum(len(im.queries) for im in clean)
    assert report.found == {"images": len(clean) + 1, "refs": len({(im.image_id, q.ref_id) for im in clean
                                                               for q in im.queries}) + 2,
                            "queries": n_clean + lost["ref"]}
    evaluated = sum(len(im.queries) for im in images)
    assert report.evaluated["queries"] == evaluated == n_clean - lost["image"] - lost["annotation"]
    assert report.evaluated["images"] == len(images) == len(clean) - 1 and not report.complete
    items = {s.reason: s for s in report.skipped}
    assert items["bad_annotation"].path == str(inst_path) and "RLE size [3, 3]" in items["bad_annotation"].detail
    assert items["unknown_annotation"].item == "ref 9001" and items["unknown_annotation"].path == str(refs_path)
    assert items["not_an_image"].kind == "image" and items["not_an_image"].queries == lost["image"]
    d = json.loads(json.dumps(report.as_dict()))
    assert d["skipped"]["queries"] == report.found_queries - evaluated and d["complete"] is False
    assert EvalSetReport.from_dict(d).as_dict() == d
    build_eval_dataset("refcoco", str(root), "val", on_error="skip", report=report)  # a report describes one set
    assert report.as_dict() == d
    summary = report.summary()
    assert "\n" not in summary and "image/not_an_image=1" in summary and f"{evaluated} queries" in summary
    # the same set read cleanly is complete
    ok = EvalSetReport()
    build_eval_dataset("refcoco", synthetic_root, "val", on_error="skip", report=ok)
    assert ok.complete and not ok.skipped and ok.evaluated == ok.found and "all the files list" in ok.summary()
    with pytest.raises(ValueError, match="on_error"):
        build_eval_dataset("refcoco", synthetic_root, "val", on_error="ignore")


def _unreadable(tmp_path, kind):
    from data_files import jpeg_claiming, jpeg_cut_after_header
    path = tmp_path / f"{kind}.jpg"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not an image\n")
    elif kind == "bomb":
        jpeg_claiming(path, 30000, 30000)
    elif kind == "cut":
        jpeg_cut_after_header(path)
    return path


@pytest.mark.parametrize("kind,says,reason", [("missing", "no such file", "not_found"),
                                              ("empty", "file is empty", "empty"),
                                              ("text", "not an image file", "not_an_image"),
                                              ("bomb", "too large", "too_large"),
                                              ("cut", "cannot decode image", "cannot_decode")])
def test_read_eval_image_stops_or_skips(synthetic_root, tmp_path, kind, says, reason):
    report = EvalSetReport()
    images = build_eval_dataset("fprefcoco", synthetic_root, "val", report=report)
    assert read_eval_image(images[0]).shape == (images[0].height, images[0].width, 3)
    im = images[1]
    im.image_path = str(_unreadable(tmp_path, kind))
    with pytest.raises(EvalDataError) as info:
        read_eval_image(im)
    message = str(info.value)
    assert "\n" not in message and im.image_path in message and says in message and f"image {im.image_id}" in message
    assert not isinstance(info.value, FileNotFoundError)
    assert read_eval_image(im, "skip", report) is None
    (item,) = report.skipped
    assert (item.stage, item.kind, item.reason, item.queries) == ("run", "image", reason, len(im.queries))
    assert report.evaluated["queries"] == report.found_queries - len(im.queries) and not report.complete
    with pytest.raises(ValueError, match="needs the report"):
        read_eval_image(im, "skip")


def test_read_eval_image_checks_the_annotated_size(synthetic_root, tmp_path):
    import cv2
    im = build_eval_dataset("refcoco", synthetic_root, "val")[0]
    cv2.imwrite(str(tmp_path / "small.png"), np.zeros((7, 9, 3), np.uint8))
    im.image_path = str(tmp_path / "small.png")
    with pytest.raises(EvalDataError, match=f"image is 7x9 but the annotation says {im.height}x{im.width}"):
        read_eval_image(im)


def test_shard_reports_merge(synthetic_root, tmp_path):
    reports = []
    for shard in range(2):
        r = EvalSetReport()
        images = build_eval_dataset("refcoco", synthetic_root, "val", on_error="skip", report=r)
        images[shard].image_path = str(tmp_path / "gone.jpg")
        read_eval_image(images[shard], "skip", r)
        reports.append(EvalSetReport.from_dict(json.loads(json.dumps(r.as_dict()))))
    merged = EvalSetReport.merged(reports)
    assert [s.item for s in merged.skipped] == [f"image {images[0].image_id}", f"image {images[1].image_id}"]
    assert merged.evaluated["images"] == merged.found_images - 2
    other = EvalSetReport()
    build_eval_dataset("refcoco+", synthetic_root, "val", report=other)
    with pytest.raises(ValueError, match="different sets"):
        EvalSetReport.merged([reports[0], other])


def test_reason_seg_ignore_as_background(synthetic_root):
    kept = build_eval_dataset("ReasonSeg", synthetic_root, "val")
    zeroed = build_eval_dataset("ReasonSeg", synthetic_root, "val", ignore_as_background=True)
    for a, b in zip(kept, zeroed):
        ma, mb = a.queries[0].gt_mask, b.queries[0].gt_mask
        assert (ma == 255).any() and not (mb == 255).any()
        np.testing.assert_array_equal(mb, np.where(ma == 255, 0, ma))
