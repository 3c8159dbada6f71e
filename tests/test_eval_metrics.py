"""Metrics on constructed cases, against values computed by hand; RLE round trips; records I/O."""
import json
import os

import numpy as np
import pytest

from evaluation.metrics import (
    evaluate_records,
    format_table,
    names_reference,
    normalize_text,
    score_record,
    summarize,
    token_f1,
)
from evaluation.records import QueryRecord, ShardWriter, merge_shards, read_shard, shard_items, shard_path
from utils.mask_io import decode_rle, encode_optional, encode_rle, rle_area, rle_intersection_union
from utils.metrics import intersection_union

H, W = 10, 10


def _box(y0, y1, x0, x1):
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _record(i, gt, pred, gt_exists=True, pred_exists=None, answer="", gt_sent=None, ignore=None, extra=None):
    pred = np.zeros((H, W), bool) if pred is None else pred.astype(bool)
    return QueryRecord(image_id=i // 10, ref_id=i, sent_id=i, image_path=f"img{i}.jpg", sentence="s", question="q",
                       answer=answer, gt_exists=gt_exists,
                       pred_exists=bool(pred.any()) if pred_exists is None else pred_exists,
                       pred_mask=encode_optional(pred), gt_mask=encode_optional(gt == 1 if gt is not None else None),
                       gt_ignore=encode_optional(ignore), height=H, width=W, gt_sent=gt_sent, extra=extra or {})


def test_record_json_is_what_json_dumps_writes():
    """QueryRecord.to_json's faster escaping of RLE strings writes what json.dumps(asdict(record))
    writes, for noisy masks' long strings (backslashes among their characters) and for strings that
    need json's own escaper (quotes, control characters, non-ASCII) in any field."""
    from dataclasses import asdict

    rng = np.random.default_rng(3)
    noisy = _record(0, None, rng.random((H, W)) > 0.5, answer='say "hi"\n\t é \u2028 [SEG]',
                    extra={"is_sentence": np.bool_(True), "n": np.int64(3), "a": np.arange(2)})
    noisy.pred_mask = encode_rle(rng.random((480, 640)) > 0.5)
    assert "\\" in noisy.pred_mask["counts"]
    records = [noisy,
               _record(1, np.ones((H, W)), None, gt_sent="ok", ignore=np.eye(H, W, dtype=bool)),
               QueryRecord(image_id=2, ref_id=2, sent_id=2, image_path="p\\q.jpg", sentence="s\x01", question="q",
                           answer="", gt_exists=False, pred_exists=True, height=H, width=W,
                           pred_mask={"size": [H, W], "counts": 'a\\b"c'}, gt_mask={"size": [H, W], "counts": "x\x1fy"},
                           gt_ignore={"size": [H, W], "counts": "é\\ü"})]
    for r in records:
        want = json.dumps(asdict(r), ensure_ascii=False, separators=(",", ":"),
                          default=lambda v: v.item() if isinstance(v, np.generic) else v.tolist())
        assert r.to_json() == want
        assert QueryRecord.from_dict(json.loads(r.to_json())) == QueryRecord.from_dict(json.loads(want))


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 13), (480, 640)]:
        m = rng.random(shape) > 0.6
        rle = encode_rle(m)
        assert rle["size"] == list(shape) and isinstance(rle["counts"], str)
        json.dumps(rle)
        assert np.array_equal(decode_rle(rle), m) and rle_area(rle) == int(m.sum())
    assert encode_optional(np.zeros((3, 3))) is None
    with pytest.raises(ValueError, match="gt_mask"):
        decode_rle({"counts": "x"}, "gt_mask")


def test_intersection_union_ignores_255():
    gt = _box(0, 4, 0, 4)  # 16 px
    gt[0, :] = 255  # ignore row 0: 10 px, 4 of them were foreground -> 12 fg px left
    pred = np.zeros((H, W), bool)
    pred[0:2, 0:6] = True  # row 0 ignored; row 1: 6 px, 4 on gt
    assert intersection_union(pred, gt) == (4, 12 + 2)
    with pytest.raises(ValueError, match="shape"):
        intersection_union(pred[:5], gt)


def test_rle_intersection_union_equals_the_pixel_definition():
    """The metrics step counts on the runs (utils.mask_io.rle_intersection_union); the definition is
    utils.metrics.intersection_union on decoded pixels. Random masks, ignore pixels overlapping the
    ground truth or not, empty masks (None) on either side, a false premise's blanked ground truth."""
    rng = np.random.default_rng(1)
    for trial in range(300):
        h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        pred, gt, ign = (rng.random((h, w)) > rng.random() for _ in range(3))
        if trial % 5 == 0:
            pred[:] = False
        if trial % 7 == 0:
            gt[:] = False
        if trial % 2 == 0:
            ign[:] = False
        if trial % 3 == 0:
            ign &= ~gt  # the records' case: foreground and ignore disjoint
        labels = np.where(ign, 255, gt).astype(np.uint8)
        expected = intersection_union(pred, labels)
        got = rle_intersection_union(encode_optional(pred), encode_optional(gt), encode_optional(ign), (h, w))
        assert got == expected, (trial, got, expected)
    with pytest.raises(ValueError, match="query 7 pred_mask: size"):
        rle_intersection_union(encode_rle(np.ones((3, 4))), None, None, (4, 3), "query 7")


def test_metrics_hand_computed():
    """Perfect positive, empty prediction on a positive, hallucinated mask on a false premise, a
    correct rejection, a partial overlap with ignore pixels."""
    g1 = _box(0, 4, 0, 4)  # 16
    perfect = _record(0, g1, g1)  # I 16, U 16
    g2 = _box(5, 10, 5, 10)  # 25
    missed = _record(1, g2, None)  # I 0, U 25, pred absent
    halluc = _record(2, None, _box(0, 2, 0, 5), gt_exists=False)  # I 0, U 10, FP
    reject = _record(3, None, None, gt_exists=False, answer="No, but there is a blue circle.",
                     gt_sent="the blue circle")  # I 0, U 0
    g5 = _box(0, 4, 0, 4)
    ign = np.zeros((H, W), bool)
    ign[3, :] = True  # ignore row 3 (4 fg px of g5 and 6 bg px)
    g5 = np.where(ign, 255, g5).astype(np.uint8)
    p5 = _box(2, 6, 0, 4)  # rows 2..5: row 2 hits 4, row 3 ignored, rows 4-5 miss 8
    partial = _record(4, g5, p5, ignore=ign)  # gt fg 12 px; I = 4, U = 12 + 8 = 20
    recs = [perfect, missed, halluc, reject, partial]
    scores = [score_record(r) for r in recs]
    assert [(s.intersection, s.union) for s in scores] == [(16, 16), (0, 25), (0, 10), (0, 0), (4, 20)]
    m = summarize(scores)
    # See: gt (T,T,F,F,T) vs pred (T,F,T,F,T): correct 0, 3, 4 -> 3/5
    assert m["see"] == pytest.approx(3 / 5)
    assert m["segment_ciou"] == pytest.approx(20 / 71)
    expected_giou = (16 / (16 + 1e-5) + 0 + 0 + 1.0 + 4 / (20 + 1e-5)) / 5
    assert m["giou"] == pytest.approx(expected_giou, rel=1e-9)
    # existence: tp = 2 (0, 4), fp = 1 (2), fn = 1 (1), tn = 1 (3)
    assert m["exist_precision"] == pytest.approx(2 / 3) and m["exist_recall"] == pytest.approx(2 / 3)
    c = m["counts"]
    assert (c["queries"], c["tp"], c["fp"], c["fn"], c["tn"]) == (5, 2, 1, 1, 1)
    assert (c["true_premise"], c["false_premise"], c["intersection"], c["union"]) == (3, 2, 20, 71)
    # Say: only query 3 is a false premise with gt_sent answered as absent
    assert c["say_scored"] == 1 and m["say_names_gt"] == 1.0
    # answer tokens: no but there is blue circle (6); reference: blue circle (2); common 2
    assert m["say_token_f1"] == pytest.approx(2 * (2 / 6) * 1 / (2 / 6 + 1))


def test_all_perfect_and_all_rejected():
    g = _box(2, 5, 2, 5)
    perfect = summarize([score_record(_record(i, g, g)) for i in range(3)])
    assert perfect["see"] == 1 and perfect["segment_ciou"] == pytest.approx(1, abs=1e-9)
    assert perfect["giou"] == pytest.approx(9 / (9 + 1e-5), rel=1e-12)
    rejected = summarize([score_record(_record(i, None, None, gt_exists=False)) for i in range(3)])
    # nothing predicted on false premises: See 1, cIoU 0/0 -> 0 (the original's 1e-10), gIoU 1 (LISA's rule)
    assert rejected["see"] == 1 and rejected["segment_ciou"] == 0 and rejected["giou"] == 1
    assert rejected["exist_precision"] is None and rejected["exist_recall"] is None


def test_see_uses_pred_exists_not_mask():
    """A [SEG] whose mask is empty is 'absent' (pred_exists False) even if written otherwise."""
    g = _box(0, 3, 0, 3)
    r = _record(0, g, None, pred_exists=False)
    assert summarize([score_record(r)])["see"] == 0


def test_false_premise_gt_is_blank_even_if_ref_mask_given():
    g = _box(0, 3, 0, 3)
    s = score_record(_record(0, g, g, gt_exists=False))
    assert (s.intersection, s.union) == (0, 9)


def test_say_normalisation():
    assert normalize_text("The Blue-Circle, [SEG]!") == "blue circle"
    assert names_reference("While the red square is not here, I see a blue circle.", "blue circle")
    assert not names_reference("I see a blue circles.", "blue circle")
    assert token_f1("blue circle", "the blue circle") == 1.0 and token_f1("red", "blue") == 0.0


def test_reasonseg_short_long_split_and_table():
    g = _box(0, 2, 0, 2)
    recs = [_record(0, g, g, extra={"is_sentence": False}), _record(1, g, None, extra={"is_sentence": True}),
            _record(2, g, g, extra={"is_sentence": True})]
    res = evaluate_records(recs, "ReasonSeg")
    assert set(res) == {"overall", "short", "long"}
    assert res["short"]["giou"] == pytest.approx(4 / (4 + 1e-5))
    assert res["long"]["counts"]["queries"] == 2 and res["long"]["segment_ciou"] == pytest.approx(4 / 8)
    table = format_table({"ReasonSeg val": res})
    assert table.count("\n") == 4 and "| ReasonSeg val | long | 2 |" in table
    assert set(evaluate_records(recs, "fprefcoco")) == {"overall"}


def test_shards_cover_every_item_once():
    items = list(range(23))
    parts = [shard_items(items, p, 4) for p in range(4)]
    assert [len(p) for p in parts] == [6, 6, 6, 5]
    assert sum(parts, []) == items
    with pytest.raises(ValueError, match="process_num"):
        shard_items(items, 4, 4)


def test_writer_resume_truncated_line_and_merge(tmp_path):
    g = _box(0, 2, 0, 2)
    recs = [_record(i, g, g) for i in range(5)]
    path = shard_path(str(tmp_path), "fprefcoco", "val", 0, 2)
    with ShardWriter(path) as w:
        w.write(recs[:2])
    with open(path, "a") as f:  # a kill in the middle of a line
        f.write(recs[2].to_json()[:37])
    with ShardWriter(path) as w:
        assert w.done == {recs[0].key, recs[1].key}
        w.write(recs[2:3])
        with pytest.raises(ValueError, match="already recorded"):
            w.write(recs[:1])
        w.mark_complete(1, 3)
    assert [r.key for r in read_shard(path)] == [r.key for r in recs[:3]]
    directory = os.path.dirname(path)
    with pytest.raises(FileNotFoundError, match="shard_1_of_2"):
        merge_shards(directory)
    with ShardWriter(shard_path(str(tmp_path), "fprefcoco", "val", 1, 2)) as w:
        w.write(recs[3:])
    merged = merge_shards(directory)
    assert sorted(r.key for r in merged.records) == sorted(r.key for r in recs)
    assert merged.incomplete == [shard_path(str(tmp_path), "fprefcoco", "val", 1, 2)]
    with ShardWriter(shard_path(str(tmp_path), "fprefcoco", "val", 1, 2)) as w:
        pass
    with open(shard_path(str(tmp_path), "fprefcoco", "val", 1, 2), "a") as f:
        f.write(recs[0].to_json() + "\n")
    with pytest.raises(ValueError, match="recorded twice"):
        merge_shards(directory)


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = str(tmp_path / "shard_0_of_1.jsonl")
    g = _box(0, 2, 0, 2)
    with open(path, "w") as f:
        f.write("{not json\n" + _record(0, g, g).to_json() + "\n")
    with pytest.raises(ValueError, match=r"shard_0_of_1.jsonl:1: corrupt record"):
        ShardWriter(path)


def test_worker_scores_are_what_the_records_give_and_go_stale_with_them(tmp_path):
    """The metrics step reads each shard's scores file (written by its worker) instead of scoring
    the records, so the file must hold exactly the records' scores, and a file whose records have
    changed since must be ignored."""
    from evaluation.report import write_metrics
    from evaluation.shard_scores import load_shard_scores, scores_path, write_shard_scores

    rng = np.random.default_rng(3)
    recs = [_record(i, rng.random((H, W)) < 0.4, rng.random((H, W)) < 0.5, gt_exists=bool(i % 3),
                    answer="there is a red circle", gt_sent="red circle" if i % 3 == 0 else None,
                    extra={"is_sentence": i % 2 == 0}) for i in range(12)]
    paths = [shard_path(str(tmp_path), "ReasonSeg", "val", p, 2) for p in range(2)]
    for p, part in zip(paths, (recs[:7], recs[7:])):
        with ShardWriter(p) as w:
            w.write(part)
            w.mark_complete(1, len(part))
        scored = write_shard_scores(p)
        assert [s.key for s in scored] == [r.key for r in part]
        assert [s.score for s in load_shard_scores(p)] == [score_record(r) for r in part]
    from_records = json.loads(json.dumps(evaluate_records(recs, "ReasonSeg")))
    assert write_metrics(str(tmp_path), "ReasonSeg", "val")["metrics"] == from_records
    # a file that disagrees with the records on disk is not used: the records are scored again
    with open(scores_path(paths[1])) as f:
        payload = json.load(f)
    payload["scores"][0][1]["intersection"] += 1000
    with open(scores_path(paths[1]), "w") as f:
        json.dump(payload, f)
    assert write_metrics(str(tmp_path), "ReasonSeg", "val")["metrics"] != from_records  # the file is read
    with ShardWriter(paths[1]) as w:  # a resumed shard gains a record after its scores were written
        w.write([_record(40, None, None, gt_exists=False)])
        w.mark_complete(1, 6)
    assert [s.key for s in load_shard_scores(paths[1])][-1] == (4, 40, 40)
    assert write_metrics(str(tmp_path), "ReasonSeg", "val")["metrics"] == json.loads(json.dumps(
        evaluate_records(recs + [_record(40, None, None, gt_exists=False)], "ReasonSeg")))
    with open(scores_path(paths[0]), "w") as f:
        f.write('{"records_bytes": ')  # cut off
    assert [s.score for s in load_shard_scores(paths[0])] == [score_record(r) for r in recs[:7]]
