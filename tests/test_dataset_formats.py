"""Every loader on the synthetic root, in the original on-disk formats."""
import json
import os
import pickle
import re
import shutil

import cv2
import numpy as np
import pytest
from data_files import read_json_any_encoding

from dataset.coco_masks import decode_segmentation
from dataset.image_io import DatasetFileError, SkipItem, read_image_rgb
from dataset.refer import REFER_DATASETS, ReferData, default_split_by, sentence_exists
from dataset.safe_pickle import safe_load, safe_load_path
from dataset.templates import DEFAULT_TEMPLATES, load_templates


def _manifest(root):
    with open(os.path.join(root, "synthetic_manifest.json")) as f:
        return {im["scene_id"]: im for im in json.load(f)["images"]}


def _form(segm) -> str:
    """The COCO form of a segmentation, as the synthetic generator writes them."""
    if segm == []:
        return "empty"
    if isinstance(segm, dict):
        return "uncompressed RLE" if isinstance(segm["counts"], list) else "compressed RLE"
    if isinstance(segm[0], dict):
        return "RLE list"
    return "overlapping polygons" if len(segm) > 1 else "polygons"


# --- synthetic generator ----------------------------------------------------------------------
def test_synthetic_root_has_every_format(synthetic_root):
    expect = ["refer_seg/refcoco/refs(unc_exclude_unified).p", "refer_seg/refcoco+/instances.json",
              "refer_seg/refcocog/refs(umd_exclude_unified).p", "refer_seg/refclef/refs(unc).p",
              "refer_seg/fprefcoco/refs(berkeley_exclude_unified).p",
              "refer_seg/R-refcocog/refs(umd_exclude_unified).p",
              "refer_seg/images/mscoco/images/train2014/COCO_train2014_000000000001.jpg",
              "refer_seg/images/saiapr_tc-12/00/images/1.jpg", "llava_dataset/llava_instruct_150k.json",
              "coco/train2017/000000000001.jpg", "reason_seg/ReasonSeg/train/shapes_0001.json",
              "reason_seg/ReasonSeg/val/shapes_0007.jpg", "reason_seg/ReasonSeg/test/shapes_0010.jpg",
              "ade20k/images/training/ADE_train_00000001.jpg", "ade20k/annotations/training/ADE_train_00000001.png",
              "cocostuff/train2017/000000000001.png", "mapillary/config_v2.0.json",
              "mapillary/training/v2.0/labels/synthetic000001.png", "vlpart/pascal_part/train.json",
              "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/2008_000001.jpg",
              "vlpart/paco/annotations/paco_lvis_v1_train.json"]
    missing = [p for p in expect if not os.path.exists(os.path.join(synthetic_root, p))]
    assert not missing


def test_synthetic_ground_truth_is_what_is_drawn(synthetic_root):
    """Each annotated shape's mask covers pixels of the shape's colour, and only those."""
    from dataset.synthetic import COLORS
    data = ReferData(synthetic_root, "refcoco")
    manifest = _manifest(synthetic_root)
    checked = 0
    for ref in data.refs:
        if not sentence_exists(ref["sentences"][0]):
            continue
        img = read_image_rgb(data.image_path(ref["image_id"]), "test").astype(int)
        mask = data.ref_mask(ref).astype(bool)
        shape = next(s for s in manifest[ref["image_id"]]["shapes"] if s["name"] == ref["sentences"][0]["sent"])
        color_mask = (np.abs(img - np.array(COLORS[shape["color"]])).sum(-1) < 60)
        iou = (mask & color_mask).sum() / (mask | color_mask).sum()
        assert iou > 0.9, (ref["ref_id"], iou)
        assert mask.sum() == shape["area"]
        checked += 1
    assert checked >= 20


def test_synthetic_is_deterministic(tmp_path):
    from dataset.synthetic import generate
    a, b = generate(str(tmp_path / "a"), seed=3), generate(str(tmp_path / "b"), seed=3)
    assert [[s.name for s in x.shapes] for x in a] == [[s.name for s in x.shapes] for x in b]
    with open(tmp_path / "a/refer_seg/refcoco/refs(unc_exclude_unified).p", "rb") as f1, \
            open(tmp_path / "b/refer_seg/refcoco/refs(unc_exclude_unified).p", "rb") as f2:
        assert f1.read() == f2.read()


def test_synthetic_cli(tmp_path):
    from dataset.synthetic import main
    main([str(tmp_path / "root"), "--seed", "1", "--num-images", "12"])
    assert os.path.exists(tmp_path / "root" / "refer_seg" / "refcoco" / "instances.json")


# --- restricted unpickler ---------------------------------------------------------------------
class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    for protocol in (0, 2, 4):
        payload = pickle.dumps([{"ref_id": 1, "x": _Exploit(marker)}], protocol=protocol)
        with pytest.raises(pickle.UnpicklingError, match="refused to load global"):
            safe_load(payload)
    assert not marker.exists()
    # also through the refs file path: the error names the file
    bad = tmp_path / "refs(unc).p"
    bad.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(pickle.UnpicklingError, match=r"refs\(unc\)\.p"):
        safe_load_path(str(bad))
    assert not marker.exists()
    for forbidden in (eval, getattr, __import__):
        class Call:
            def __reduce__(self, f=forbidden):
                return (f, ("1",))
        with pytest.raises(pickle.UnpicklingError):
            safe_load(pickle.dumps(Call()))


def test_unreadable_pickles_are_one_line_errors_naming_the_file(tmp_path):
    data = pickle.dumps([{"ref_id": i, "sentences": ["x" * 50]} for i in range(50)], protocol=2)
    for name, content in [("empty", b""), ("cut", data[:len(data) // 2]), ("garbage", b"hello world")]:
        path = tmp_path / f"refs({name}).p"
        path.write_bytes(content)
        with pytest.raises(pickle.UnpicklingError) as info:
            safe_load_path(str(path))
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_restricted_unpickler_loads_plain_data():
    data = [{"ref_id": 1, "sentences": [{"sent": "man in red", "tokens": ["man"]}], "ann_id": [3, -1],
             "split": "train", "f": 1.5, "t": (1, 2), "s": {1, 2}, "b": b"\x00\xff", "n": None, "ok": True}]
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        assert safe_load(pickle.dumps(data, protocol=protocol)) == data
    loaded = safe_load(pickle.dumps({"id": np.int64(7), "score": np.float32(0.5)}, protocol=2))
    assert loaded == {"id": 7, "score": 0.5} and type(loaded["id"]) is int
    for protocol in (2, 4, 5):  # numeric arrays (e.g. a bbox) come back as lists; others are refused
        assert safe_load(pickle.dumps({"bbox": np.array([1.5, 2.0])}, protocol=protocol)) == {"bbox": [1.5, 2.0]}
    for bad in (np.array([None, 1], dtype=object), np.array(["a"]), np.zeros(2).view(np.ma.MaskedArray)):
        with pytest.raises(pickle.UnpicklingError, match="refused"):
            safe_load(pickle.dumps(bad, protocol=2))


# --- referring datasets -----------------------------------------------------------------------
def test_split_by_choices():
    assert default_split_by("refclef") == "unc"
    assert default_split_by("refcoco") == default_split_by("R-refcoco+") == "unc_exclude_unified"
    assert default_split_by("refcocog") == default_split_by("R-refcocog") == "umd_exclude_unified"
    assert default_split_by("fprefcocog") == "berkeley_exclude_unified"
    with pytest.raises(ValueError, match="refcocog"):
        default_split_by("refcocox")


def test_every_refer_dataset_loads_with_consistent_masks(synthetic_root):
    manifest = _manifest(synthetic_root)
    for name in REFER_DATASETS:
        data = ReferData(synthetic_root, name)
        assert not data.bad_refs and "train" in data.splits() and "val" in data.splits()
        for ref in data.refs:
            mask = data.ref_mask(ref)
            im = data.images[ref["image_id"]]
            assert mask.shape == (im.height, im.width) and mask.dtype == np.uint8
            ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
            if -1 in ids:
                assert mask.sum() == 0
            else:
                areas = {a["id"]: a["area"] for a in [data.anns[i] for i in ids]}
                assert mask.sum() == sum(areas.values())  # shapes do not overlap
        assert os.path.exists(data.image_path(data.refs[0]["image_id"]))
    # every COCO form occurs in the synthetic files
    data = ReferData(synthetic_root, "refcoco")
    assert {_form(a["segmentation"]) for a in data.anns.values()} == {
        "empty", "polygons", "overlapping polygons", "compressed RLE", "uncompressed RLE", "RLE list"}
    assert len(manifest) == 12


def test_existence_flags(synthetic_root):
    fp = ReferData(synthetic_root, "fprefcoco")
    fps = [s for r in fp.refs for s in r["sentences"] if s.get("is_false_premise")]
    assert fps and all(not sentence_exists(s) and s["gt_sent"] for s in fps)
    r = ReferData(synthetic_root, "R-refcoco")
    negs = [rf for rf in r.refs if not sentence_exists(rf["sentences"][0])]
    assert negs and all(rf["ann_id"] == [-1] for rf in negs)
    refs = ReferData(synthetic_root, "R-refcoco+").refs
    assert any(isinstance(rf["ann_id"], int) and rf["ann_id"] == -1 for rf in refs)
    assert sentence_exists({"sent": "x"}) and not sentence_exists({"exist": False})


def _pycocotools_parts(segm, h, w) -> np.ndarray:
    """pycocotools' own decoding of every part of a segmentation: (H, W, parts)."""
    from pycocotools import mask as mask_utils
    parts = [segm] if isinstance(segm, dict) else segm
    if not parts:
        return np.zeros((h, w, 0), np.uint8)
    if isinstance(parts[0], dict):
        rles = [mask_utils.frPyObjects(p, h, w) if isinstance(p["counts"], list)
                else {"size": p["size"], "counts": p["counts"].encode()} for p in parts]
    else:
        rles = mask_utils.frPyObjects(parts, h, w)
    return mask_utils.decode(rles)


def test_every_form_decodes_as_pycocotools_does(synthetic_root):
    """Pixel for pixel, every annotation of every refer file: the union of pycocotools' own decoding
    of its parts (the original summed them: overlapping parts, present in the files, made 2s)."""
    forms, overlaps = set(), 0
    for name in REFER_DATASETS:
        data = ReferData(synthetic_root, name)
        for ann in data.anns.values():
            im = data.images[ann["image_id"]]
            parts = _pycocotools_parts(ann["segmentation"], im.height, im.width)
            ours = decode_segmentation(ann["segmentation"], im.height, im.width)
            assert ours.dtype == np.uint8 and ours.shape == (im.height, im.width)
            np.testing.assert_array_equal(ours, parts.max(axis=2) if parts.shape[2] else 0 * ours)
            overlaps += int(parts.sum(axis=2).max(initial=0) > 1)
            forms.add(_form(ann["segmentation"]))
        for ref in data.refs:  # and through the refs: the OR of every ann_id
            im = data.images[ref["image_id"]]
            want = np.zeros((im.height, im.width), np.uint8)
            for ann_id in ([] if -1 in np.atleast_1d(ref["ann_id"]) else np.atleast_1d(ref["ann_id"])):
                segm = data.anns[int(ann_id)]["segmentation"]
                want |= _pycocotools_parts(segm, im.height, im.width).max(axis=2)
            np.testing.assert_array_equal(data.ref_mask(ref), want)
    assert len(forms) == 6 and overlaps > 0


def test_decode_segmentation_forms_and_errors():
    from pycocotools import mask as mask_utils

    from dataset.coco_masks import compressed_rle_total
    m = np.zeros((20, 30), np.uint8)
    m[5:12, 7:20] = 1
    poly = [[7, 5, 20, 5, 20, 12, 7, 12]]
    rle = mask_utils.encode(np.asfortranarray(m))
    counts = rle["counts"].decode()
    assert compressed_rle_total(rle["counts"]) == 600
    np.testing.assert_array_equal(decode_segmentation({"size": [20, 30], "counts": counts}, 20, 30), m)
    np.testing.assert_array_equal(decode_segmentation({"size": [20, 30], "counts": rle["counts"]}, 20, 30), m)
    np.testing.assert_array_equal(decode_segmentation(poly, 20, 30), m)
    np.testing.assert_array_equal(decode_segmentation([{"size": [20, 30], "counts": counts}] * 2, 20, 30), m)
    assert decode_segmentation([], 20, 30).sum() == 0
    # a part with fewer than 3 points covers nothing (pycocotools would read 4 numbers as a box)
    np.testing.assert_array_equal(decode_segmentation([[1, 1, 4, 1]] + poly, 20, 30), m)
    bad = [({"size": [10, 10], "counts": counts}, "differs from the image size"),
           ({"size": [20, 30], "counts": counts[:-2]}, "runs cover"),  # short: pycocotools reads garbage
           ({"size": [20, 30], "counts": "\x7f" + counts}, "invalid character"),
           ({"size": [20, 30], "counts": [100, 5]}, "runs cover 105 pixels"),
           ({"size": [20, 30], "counts": [-1, 601]}, "non-negative"),
           ({"counts": counts}, "'size'"), ([poly[0], {"size": [20, 30], "counts": counts}], "mixes"),
           ([["a", 1, 2, 3, 4, 5]], "finite numbers"), ("bogus", "got str"), (None, "got NoneType")]
    for segm, message in bad:
        with pytest.raises(ValueError, match=message):
            decode_segmentation(segm, 20, 30)


def test_split_selection_follows_the_refer_api(synthetic_root):
    from dataset.refer import in_split
    assert in_split("testA", "test") and in_split("testB", "test") and not in_split("val", "test")
    assert in_split("testAB", "testA") and in_split("testAB", "testB") and not in_split("testB", "testA")
    assert in_split("val", "val") and not in_split("valx", "val")
    data = ReferData(synthetic_root, "refcoco")
    test = data.refs_by_image("test")
    want = [r["ref_id"] for r in data.refs if r["split"] in ("testA", "testB")]
    assert sorted(r["ref_id"] for refs in test.values() for r in refs) == sorted(want) and want
    with pytest.raises(ValueError, match="has no split 'testA'"):
        ReferData(synthetic_root, "refcocog").refs_by_image("testA")


def _copy_refer(synthetic_root, tmp_path, name="refcoco"):
    root = tmp_path / "r"
    shutil.copytree(os.path.join(synthetic_root, "refer_seg", name), root / "refer_seg" / name)
    shutil.copytree(os.path.join(synthetic_root, "refer_seg", "images"), root / "refer_seg" / "images")
    return root


def test_malformed_instances_name_file_dataset_and_field(synthetic_root, tmp_path):
    from dataset.image_io import DataError
    root = _copy_refer(synthetic_root, tmp_path)
    path = root / "refer_seg" / "refcoco" / "instances.json"
    instances = json.loads(path.read_text())
    for change, field in [(lambda d: d["images"][2].pop("height"), "images\\[2\\] \\(id 3\\) has no 'height'"),
                          (lambda d: d["images"][0].update(width="640"), "'width' must be positive integers"),
                          (lambda d: d["annotations"][1].pop("id"), "annotations\\[1\\] has no integer 'id'"),
                          (lambda d: d.pop("annotations"), "missing list 'annotations'"),
                          (lambda d: d["categories"].append({"id": 9}), "categories\\[4\\]")]:
        broken = json.loads(json.dumps(instances))
        change(broken)
        path.write_text(json.dumps(broken))
        with pytest.raises(DataError) as info:
            ReferData(str(root), "refcoco")
        message = str(info.value)
        assert "\n" not in message and str(path) in message and "(dataset refcoco)" in message
        assert re.search(field, message), message
    path.write_text("{not json")
    with pytest.raises(DataError, match="instances.json \\(dataset refcoco\\): not valid JSON"):
        ReferData(str(root), "refcoco")


def test_unreadable_annotations_are_skip_items_naming_ids(synthetic_root, tmp_path):
    root = _copy_refer(synthetic_root, tmp_path)
    path = root / "refer_seg" / "refcoco" / "instances.json"
    instances = json.loads(path.read_text())
    instances["annotations"][0]["segmentation"] = {"size": [1, 1], "counts": "0"}
    path.write_text(json.dumps(instances))
    data = ReferData(str(root), "refcoco")
    ann_id = instances["annotations"][0]["id"]
    ref = next(r for r in data.refs if r["ann_id"] == ann_id)
    with pytest.raises(SkipItem, match=f"annotation {ann_id} \\(ref {ref['ref_id']}\\): RLE size") as info:
        data.ref_mask(ref)
    assert info.value.key == "refcoco/bad_annotation" and info.value.path == str(path)
    ref = dict(ref, ann_id=123456)
    with pytest.raises(SkipItem, match="names annotation 123456") as info:
        data.ref_mask(ref)
    assert info.value.reason == "unknown_annotation"


def test_missing_files_name_the_path_and_dataset(synthetic_root, tmp_path):
    with pytest.raises(DatasetFileError,
                       match=r"refcoco.*refs\(unc_exclude_unified\)\.p|refs\(unc_exclude_unified\)\.p.*"):
        root = tmp_path / "r"
        shutil.copytree(os.path.join(synthetic_root, "refer_seg", "refcoco"), root / "refer_seg" / "refcoco")
        os.remove(root / "refer_seg" / "refcoco" / "refs(unc_exclude_unified).p")
        ReferData(str(root), "refcoco")
    with pytest.raises(DatasetFileError) as e:
        ReferData(str(tmp_path / "nowhere"), "refcocog")
    assert "refcocog" in str(e.value) and "nowhere" in str(e.value)
    with pytest.raises(ValueError, match="known: refclef"):
        ReferData(synthetic_root, "refcoco-")


def test_malformed_refs_are_counted_not_fatal(synthetic_root, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(os.path.join(synthetic_root, "refer_seg", "refcoco"), root / "refer_seg" / "refcoco")
    os.makedirs(root / "refer_seg" / "images" / "mscoco" / "images" / "train2014")
    path = root / "refer_seg" / "refcoco" / "refs(unc_exclude_unified).p"
    refs = pickle.load(open(path, "rb"))
    refs.append({"ref_id": 999, "image_id": 123456})  # no split / sentences / ann_id
    pickle.dump(refs, open(path, "wb"), protocol=2)
    data = ReferData(str(root), "refcoco")
    assert len(data.bad_refs) == 1 and len(data.refs) == len(refs) - 1
    assert data.bad_refs[0].ref_id == 999 and "no 'ann_id'" in data.bad_refs[0].problem


# --- refer sampling ----------------------------------------------------------------------------
def test_refer_seg_source_answers(synthetic_root):
    from dataset.refer_seg import ReferSegSource
    src = ReferSegSource("correct_refer_seg", synthetic_root, ["fprefcoco"], DEFAULT_TEMPLATES, 3)
    rng = np.random.default_rng(0)
    seen_fp = 0
    for _ in range(30):
        raw = src.sample(rng)
        assert len(raw.questions) <= 3
        assert len(raw.masks) == sum(raw.exists)
        for q, a, ok, sent in zip(raw.questions, raw.answers, raw.exists, raw.sentences):
            assert sent.lower() in q[0]
            assert ("[SEG]" in a[0]) == ok
            if not ok:
                seen_fp += 1
                gts = [s["gt_sent"] for r in src.data[0].refs for s in r["sentences"]
                       if r["image_id"] == raw.meta["image_id"] and s["sent"] == sent and s.get("is_false_premise")]
                assert any(gt.lower() in a[0] for gt in gts)  # the correction names the true object
    assert seen_fp > 0
    neg = ReferSegSource("neg_refer_seg", synthetic_root, ["R-refcoco"], DEFAULT_TEMPLATES, 3)
    denials = []
    for _ in range(30):
        raw = neg.sample(rng)
        denials += [(a[0], s) for a, ok, s in zip(raw.answers, raw.exists, raw.sentences) if not ok]
    assert denials
    for answer, sent in denials:  # a plain denial from the list, about the asked object
        assert answer in {t.format(class_name=sent.lower()) for t in DEFAULT_TEMPLATES.neg_answer}


def test_refer_source_skips_corrupt_image(synthetic_root, tmp_path):
    from dataset.refer_seg import ReferSegSource
    root = tmp_path / "r"
    shutil.copytree(synthetic_root, root, ignore=shutil.ignore_patterns("ade20k", "mapillary", "vlpart", "cocostuff"))
    for f in (root / "refer_seg" / "images" / "mscoco" / "images" / "train2014").iterdir():
        f.write_bytes(b"not a jpeg")
    src = ReferSegSource("refer_seg", str(root), ["refcoco"], DEFAULT_TEMPLATES, 3)
    with pytest.raises(SkipItem, match="not an image file") as info:
        src.sample(np.random.default_rng(0))
    assert info.value.key == "refcoco/not_an_image"


# --- VQA ---------------------------------------------------------------------------------------
def test_vqa_multi_turn(synthetic_root):
    from dataset.vqa import VqaSource, parse_llava_conversation
    src = VqaSource("vqa", synthetic_root)
    raw = src.sample(np.random.default_rng(1))
    q, a = raw.questions[0], raw.answers[0]
    assert len(q) == len(a) == 2 and sum(x.count("<image>") for x in q) == 1
    assert not raw.masks and raw.exists == [False]
    q, a = parse_llava_conversation([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "What?\n<image>"},
                                     {"from": "gpt", "value": "A cat."}])
    assert q == ["<image>\nWhat?"] and a == ["A cat."]
    for bad in ([], [{"from": "human", "value": "x"}], [{"from": "gpt", "value": "x"}, {"from": "gpt", "value": "y"}],
                [{"from": "human", "value": "<image> [SEG]"}, {"from": "gpt", "value": "y"}],
                [{"from": "human", "value": "no image"}, {"from": "gpt", "value": "y"}],
                [{"from": "human", "value": "<image> a"}, {"from": "gpt", "value": "b"},
                 {"from": "human", "value": "<image> c"}, {"from": "gpt", "value": "d"}],
                [{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image> b"}]):
        with pytest.raises(ValueError):
            parse_llava_conversation(bad)


def test_vqa_image_stays_in_its_turn_and_only_that_turn_is_stripped(synthetic_root):
    """As the original: `<image>` moves to the front of the turn that holds it (that turn stripped);
    other turns, and answers, are kept as written."""
    from dataset.vqa import VqaSource, parse_llava_conversation
    turns = [{"from": "human", "value": "  What is this?  "}, {"from": "gpt", "value": " A cat. \n"},
             {"from": "human", "value": " And here? <image> \n"}, {"from": "gpt", "value": "A dog."}]
    q, a = parse_llava_conversation(turns)
    assert q == ["  What is this?  ", "<image>\nAnd here?"] and a == [" A cat. \n", "A dog."]
    # the synthetic file holds records with <image> in the second question: it stays there
    with open(os.path.join(synthetic_root, "llava_dataset", "llava_instruct_150k.json")) as f:
        records = json.load(f)
    late = [r for r in records if "<image>" not in next(t for t in r["conversations"] if t["from"] == "human")["value"]]
    assert late
    src = VqaSource("vqa", synthetic_root)
    for rec in late:
        questions, answers = parse_llava_conversation(rec["conversations"])
        human = [t["value"] for t in rec["conversations"] if t["from"] == "human"]
        assert questions[0] == human[0] and questions[1] == "<image>\n" + human[1].replace("<image>", "").strip()
        assert answers == [t["value"] for t in rec["conversations"] if t["from"] == "gpt"][-len(answers):]
    rng = np.random.default_rng(0)
    seen_late = 0
    for _ in range(40):
        raw = src.sample(rng)
        seen_late += raw.questions[0][1].startswith("<image>\n")
    assert seen_late > 0


def test_vqa_malformed_record_is_skipped(synthetic_root, tmp_path):
    from dataset.vqa import VqaSource
    root = tmp_path / "v"
    os.makedirs(root / "llava_dataset")
    shutil.copytree(os.path.join(synthetic_root, "coco"), root / "coco")
    with open(root / "llava_dataset" / "llava_instruct_150k.json", "w") as f:
        json.dump([{"image": "000000000001.jpg", "conversations": [{"from": "human", "value": "only"}]}], f)
    src = VqaSource("vqa", str(root))
    with pytest.raises(SkipItem, match="alternating"):
        src.sample(np.random.default_rng(0))


# --- ReasonSeg ---------------------------------------------------------------------------------
def test_reason_seg_mask_rules():
    from dataset.reason_seg import reason_seg_mask
    shapes = [{"label": "target", "points": [[2, 2], [17, 2], [17, 17], [2, 17]]},
              {"label": "ignore", "points": [[5, 5], [9, 5], [9, 9], [5, 9]]},  # smaller: drawn on top
              {"label": "flag", "points": [[0, 0], [19, 0], [19, 19]]}]
    m = reason_seg_mask(shapes, 20, 20)
    assert m[3, 3] == 1 and m[7, 7] == 255 and m[0, 19] == 0 and m[1, 1] == 0
    assert set(np.unique(m)) == {0, 1, 255}
    # order in the file does not matter: largest first
    np.testing.assert_array_equal(reason_seg_mask(shapes[::-1], 20, 20), m)


def test_reason_seg_source(synthetic_root):
    from dataset.reason_seg import ReasonSegSource, parse_reason_seg_data
    assert parse_reason_seg_data("ReasonSeg|train_val") == ("ReasonSeg", ["train", "val"])
    with pytest.raises(ValueError):
        parse_reason_seg_data("ReasonSeg")
    src = ReasonSegSource("reason_seg", synthetic_root, "ReasonSeg|train", DEFAULT_TEMPLATES, 3)
    assert len(src) == 6
    rng = np.random.default_rng(0)
    modes = {"true_premise": 0, "false_premise_correction": 0}
    for _ in range(60):
        raw = src.sample(rng)
        modes[raw.meta["mode"]] += 1
        if raw.meta["mode"] == "true_premise":
            assert all(raw.exists) and len(raw.masks) == len(raw.questions)
            assert all((m == 255).any() and (m == 1).any() for m in raw.masks)
        else:
            assert not any(raw.exists) and not raw.masks and "There is no" in raw.answers[0][0]
    assert modes["false_premise_correction"] > 0 and modes["true_premise"] > modes["false_premise_correction"]


def test_reason_seg_reads_cp1252_files_as_the_original(synthetic_root, tmp_path):
    import glob

    from dataset.reason_seg import load_reason_seg_annotation
    paths = sorted(glob.glob(os.path.join(synthetic_root, "reason_seg", "ReasonSeg", "*", "*.json")))
    not_utf8 = 0
    for path in paths:
        raw = open(path, "rb").read()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            not_utf8 += 1
        anno = load_reason_seg_annotation(path, 200, 200)
        held = read_json_any_encoding(path)
        assert anno.texts == held["text"] and anno.is_sentence == held["is_sentence"]
        assert [list(x) for x in anno.false_premise_qa] == held["false_premise_QA"]
    assert not_utf8 == 2  # one train and one val file are cp1252, with characters UTF-8 cannot read
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"text": ["\x81\xff"], "shapes": []}')  # neither UTF-8 nor cp1252
    with pytest.raises(SkipItem, match="neither UTF-8 nor cp1252") as info:
        load_reason_seg_annotation(str(bad), 10, 10)
    assert info.value.reason == "bad_annotation"
    bom = tmp_path / "bom.json"
    bom.write_bytes("\ufeff".encode() + json.dumps({"text": ["x"], "shapes": []}).encode())
    assert load_reason_seg_annotation(str(bom), 10, 10).texts == ["x"]


def test_reason_seg_false_premise_phrase_is_kept_as_written(synthetic_root):
    from dataset.reason_seg import ReasonSegSource
    src = ReasonSegSource("reason_seg", synthetic_root, "ReasonSeg|train", DEFAULT_TEMPLATES, 3)
    rng = np.random.default_rng(0)
    seen = 0
    for _ in range(60):
        raw = src.sample(rng)
        if raw.meta["mode"] == "true_premise":
            continue
        for q, sent in zip(raw.questions, raw.sentences):
            assert sent.startswith("The ") and sent in q[0]  # capital kept; a short true phrase is lower-cased
            seen += 1
    assert seen


def test_reason_seg_malformed_json(tmp_path):
    from dataset.reason_seg import load_reason_seg_annotation
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"text": [], "shapes": []}))
    with pytest.raises(SkipItem, match="malformed"):
        load_reason_seg_annotation(str(p), 10, 10)
    p.write_text("{not json")
    with pytest.raises(SkipItem):
        load_reason_seg_annotation(str(p), 10, 10)
    with pytest.raises(SkipItem, match="missing"):
        load_reason_seg_annotation(str(tmp_path / "none.json"), 10, 10)


# --- semantic segmentation sources -------------------------------------------------------------
def _shape_masks(synthetic_root, scene_id):
    data = ReferData(synthetic_root, "refcoco")
    return [data.ref_mask(r) for r in data.refs if r["image_id"] == scene_id and sentence_exists(r["sentences"][0])]


@pytest.mark.parametrize("name", ["ade20k", "cocostuff", "mapillary", "pascal_part", "paco_lvis"])
def test_sem_seg_sources(synthetic_root, name):
    from dataset import sem_seg
    src = sem_seg._BUILDERS[name](synthetic_root, DEFAULT_TEMPLATES, 3)
    rng = np.random.default_rng(0)
    modes = {}
    for _ in range(40):
        raw = src.sample(rng)
        modes[raw.meta["mode"]] = modes.get(raw.meta["mode"], 0) + 1
        assert len(raw.masks) == sum(raw.exists) == raw.exists.count(True)
        for q, a, ok in zip(raw.questions, raw.answers, raw.exists):
            assert ("[SEG]" in a[0]) == ok
        for m in raw.masks:
            assert m.shape == raw.image.shape[:2] and set(np.unique(m)) <= {0, 1, 255} and (m == 1).any()
    assert modes["true_premise"] > 20 and len(modes) >= 2


def test_sem_seg_labels_match_shapes(synthetic_root):
    """The class masks of each label-map source are exactly the drawn shapes (or the background)."""
    from dataset import sem_seg
    from dataset.image_io import read_label_map
    shapes = {frozenset(zip(*np.nonzero(m))) for m in _shape_masks(synthetic_root, 1)}
    ade = sem_seg.ade20k_source(synthetic_root, DEFAULT_TEMPLATES, 3)
    label = ade.to_class_ids(read_label_map(ade.pairs[0][1], "ade20k"))
    names = ade.class_names
    found = {frozenset(zip(*np.nonzero(label == c))) for c in np.unique(label) if names[c] != "wall"}
    assert found == shapes
    assert names[int(np.bincount(label.ravel()).argmax())] == "wall"
    stuff = sem_seg.cocostuff_source(synthetic_root, DEFAULT_TEMPLATES, 3)
    label = stuff.to_class_ids(read_label_map(stuff.pairs[0][1], "cocostuff"))
    assert (label[:3] == 255).all()  # unlabelled border
    assert not any("-" in stuff.class_names[c] for c in np.unique(label) if c != 255)  # merged classes ignored
    mp = sem_seg.mapillary_source(synthetic_root, DEFAULT_TEMPLATES, 3)
    label = mp.to_class_ids(read_label_map(mp.pairs[0][1], "mapillary"))
    assert (label[-2:] == 255).all() and mp.class_names[0] == "road"


def test_part_names():
    from dataset.sem_seg import part_name
    rng = np.random.default_rng(0)
    got = {part_name("dog:left_ear", rng) for _ in range(20)}
    assert got == {"dog left ear", "the left ear of the dog"}
    assert part_name("bowl_(dish):rim", np.random.default_rng(1)) in {"bowl rim", "the rim of the bowl"}
    assert part_name("traffic_light", rng) == "traffic light"


def test_class_lists():
    from dataset.class_names import ade20k_class_names, cocostuff_class_names
    ade, stuff = ade20k_class_names(), cocostuff_class_names()
    assert len(ade) == 150 and ade[0] == "wall" and ade[-1] == "flag"
    assert len(stuff) == 182 and stuff[0] == "person" and stuff[-1] == "wood"


def test_unknown_sem_seg_name(synthetic_root):
    from dataset.sem_seg import SemSegSource
    with pytest.raises(ValueError, match="known: ade20k"):
        SemSegSource("sem_seg", synthetic_root, ["ade21k"], DEFAULT_TEMPLATES)


# --- templates ---------------------------------------------------------------------------------
def test_template_override(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"SHORT_QUESTION_TEMPLATE": ["<image>\nIs {class_name} here?"],
                             "neg_answer": ["Nope, no {class_name}."],
                             "EXPLANATORY_QUESTION_TEMPLATE": ["Please explain."]}))
    t = load_templates(str(p))
    assert t.short_question == ("<image>\nIs {class_name} here?",) and t.neg_answer == ("Nope, no {class_name}.",)
    assert t.short_answer == DEFAULT_TEMPLATES.short_answer  # lists not named keep ours


@pytest.mark.parametrize("bad", [
    {"SHORT_ANSWER_TEMPLATE": ["Yes, {class_name}."]},  # no [SEG]
    {"LONG_ANSWER_TEMPLATE": ["[SEG] and [SEG]."]},  # two [SEG]
    {"NEG_ANSWER_TEMPLATE": ["No {thing}."]},  # unknown placeholder
    {"CORRECT_ANSWER_TEMPLATE": ["No {class_name}."]},  # missing {gt_name}
    {"SHORT_QUESTION_TEMPLATE": ["Is {class_name} here?"]},  # no <image>
    {"SHORT_QUESTION_TEMPLATE": []},
    {"MYSTERY": ["x"]},
])
def test_template_override_rejects_bad_lists(tmp_path, bad):
    p = tmp_path / "t.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="t.json"):
        load_templates(str(p))


def test_where_placeholder_says_where_the_mask_is(synthetic_root, tmp_path):
    from dataset.refer_seg import ReferSegSource
    from dataset.templates import mask_region, region_phrase

    assert region_phrase(0.1, 0.1) == "in the top left corner" and region_phrase(0.5, 0.5) == "in the centre"
    assert region_phrase(0.9, 0.5) == "on the right" and region_phrase(0.5, 0.9) == "at the bottom"
    wide = np.zeros((100, 300), np.uint8)  # the centred square CLIP keeps is columns 100-199
    wide[10:20, 100:110] = 1
    assert mask_region(wide) == "in the top left corner"
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"short_answer": ["{class_name} is {where}: [SEG]."]}))
    src = ReferSegSource("refer_seg", synthetic_root, ["refcoco"], load_templates(str(p)), 3)
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(10):
        raw = src.sample(rng)
        positives = [a[0] for a, ok in zip(raw.answers, raw.exists) if ok]
        for answer, mask, sent in zip(positives, raw.masks, [s for s, ok in zip(raw.sentences, raw.exists) if ok]):
            assert answer == f"{sent.strip().lower()} is {mask_region(mask)}: [SEG]."  # each answer its own mask
            checked += 1
    assert checked >= 10
    from dataset.eval_sets import build_eval_dataset, teacher_forced_answer  # teacher-forced validation too
    image, query = next((im, q) for im in build_eval_dataset("refcoco", synthetic_root, "val") for q in im.queries
                        if q.gt_exists and mask_region(q.gt_mask == 1) != "in the centre")
    expected = f"{query.sentence.strip().lower()} is {mask_region(query.gt_mask == 1)}: [SEG]."
    assert teacher_forced_answer(query, image.image_id, load_templates(str(p)), 0) == expected


def test_default_templates_follow_the_rules():
    t = DEFAULT_TEMPLATES
    assert all(a.count("[SEG]") == 1 for a in t.short_answer + t.long_answer)
    assert all("[SEG]" not in a for a in t.neg_answer + t.correct_answer)
    assert all("{gt_name}" in a for a in t.correct_answer)
    assert all(q.startswith("<image>\n") for q in t.short_question + t.long_question)


def test_corrupt_image_read(tmp_path):
    p = tmp_path / "x.jpg"
    p.write_bytes(b"\xff\xd8garbage")
    with pytest.raises(SkipItem):
        read_image_rgb(str(p), "refcoco")
    cv2.imwrite(str(tmp_path / "ok.png"), np.zeros((4, 5, 3), np.uint8))
    assert read_image_rgb(str(tmp_path / "ok.png"), "x").shape == (4, 5, 3)
