"""Every loader on the synthetic root, in the original on-disk formats."""
import json
import os
import pickle
import shutil

import cv2
import numpy as np
import pytest

from conftest_data import synthetic_root  # noqa: F401
from dataset.image_io import DatasetFileError, SkipItem, read_image_rgb
from dataset.refer import REFER_DATASETS, ReferData, decode_segmentation, default_split_by, sentence_exists
from dataset.safe_pickle import safe_load, safe_load_path
from dataset.templates import DEFAULT_TEMPLATES, load_templates


def _manifest(root):
    with open(os.path.join(root, "synthetic_manifest.json")) as f:
        return {im["scene_id"]: im for im in json.load(f)["images"]}


# --- synthetic generator ----------------------------------------------------------------------
def test_synthetic_root_has_every_format(synthetic_root):
    expect = ["refer_seg/refcoco/refs(unc_exclude_unified).p", "refer_seg/refcoco+/instances.json",
              "refer_seg/refcocog/refs(umd_exclude_unified).p", "refer_seg/refclef/refs(unc).p",
              "refer_seg/fprefcoco/refs(berkeley_exclude_unified).p", "refer_seg/R-refcocog/refs(umd_exclude_unified).p",
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
        assert data.malformed_refs == 0 and "train" in data.splits() and "val" in data.splits()
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
    # every encoding occurs and decodes to the drawn shape
    data = ReferData(synthetic_root, "refcoco")
    kinds = {type(a["segmentation"]).__name__ + ("-list" if isinstance(a["segmentation"], dict)
                                                 and isinstance(a["segmentation"]["counts"], list) else "")
             for a in data.anns.values()}
    assert kinds == {"list", "dict", "dict-list"}
    assert len(manifest) == 12


def test_existence_flags(synthetic_root):
    fp = ReferData(synthetic_root, "fprefcoco")
    fps = [s for r in fp.refs for s in r["sentences"] if s.get("is_false_premise")]
    assert fps and all(not sentence_exists(s) and s["gt_sent"] for s in fps)
    r = ReferData(synthetic_root, "R-refcoco")
    negs = [rf for rf in r.refs if not sentence_exists(rf["sentences"][0])]
    assert negs and all(rf["ann_id"] == [-1] for rf in negs)
    assert any(isinstance(rf["ann_id"], int) and rf["ann_id"] == -1 for rf in ReferData(synthetic_root, "R-refcoco+").refs)
    assert sentence_exists({"sent": "x"}) and not sentence_exists({"exist": False})


def test_decode_segmentation_encodings():
    from pycocotools import mask as mask_utils
    m = np.zeros((20, 30), np.uint8)
    m[5:12, 7:20] = 1
    poly = [[7, 5, 20, 5, 20, 12, 7, 12]]
    rle = mask_utils.encode(np.asfortranarray(m))
    np.testing.assert_array_equal(decode_segmentation({"size": [20, 30], "counts": rle["counts"].decode()}, 20, 30), m)
    np.testing.assert_array_equal(decode_segmentation(poly, 20, 30), m)
    with pytest.raises(ValueError):
        decode_segmentation({"size": [10, 10], "counts": rle["counts"]}, 20, 30)
    with pytest.raises(ValueError):
        decode_segmentation("bogus", 20, 30)


def test_missing_files_name_the_path_and_dataset(synthetic_root, tmp_path):
    with pytest.raises(DatasetFileError, match=r"refcoco.*refs\(unc_exclude_unified\)\.p|refs\(unc_exclude_unified\)\.p.*"):
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
    assert data.malformed_refs == 1 and len(data.refs) == len(refs) - 1


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
    with pytest.raises(SkipItem, match="cannot decode"):
        src.sample(np.random.default_rng(0))


# --- VQA ---------------------------------------------------------------------------------------
def test_vqa_multi_turn(synthetic_root):
    from dataset.vqa import VqaSource, parse_llava_conversation
    src = VqaSource("vqa", synthetic_root)
    raw = src.sample(np.random.default_rng(1))
    q, a = raw.questions[0], raw.answers[0]
    assert len(q) == len(a) == 2 and q[0].startswith("<image>\n") and "<image>" not in q[0][8:]
    assert not raw.masks and raw.exists == [False]
    q, a = parse_llava_conversation([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "What?\n<image>"},
                                     {"from": "gpt", "value": "A cat."}])
    assert q == ["<image>\nWhat?"] and a == ["A cat."]
    for bad in ([], [{"from": "human", "value": "x"}], [{"from": "gpt", "value": "x"}, {"from": "gpt", "value": "y"}],
                [{"from": "human", "value": "<image> [SEG]"}, {"from": "gpt", "value": "y"}]):
        with pytest.raises(ValueError):
            parse_llava_conversation(bad)


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
