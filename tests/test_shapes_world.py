"""The shapes world generator: deterministic, in the loaders' formats, every expression naming
exactly one object, false premises naming nothing, ground truth = the visible pixels."""
import collections
import functools
import json
import os
import pickle
import re
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from dataset.coco_masks import decode_segmentation
from dataset.image_io import read_image_rgb
from dataset.refer import ReferData, sentence_exists
from dataset.shapes.__main__ import main as shapes_main
from dataset.shapes.language import DIRECTIONS, ORDINALS, RELATIONS, Description, Expression, pick_expressions
from dataset.shapes.scene import COLORS, KINDS, SIZES, centre_crop, pixel_outlines, polygon_mask
from dataset.shapes.world import MANIFEST, WorldConfig, generate_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "assets", "shapes_tokenizer")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes_world"))
    generate_world(root, WorldConfig(images=80, seed=1, val_fraction=0.15, test_fraction=0.2), workers=2)
    return root


def _manifest(root):
    with open(os.path.join(root, MANIFEST)) as f:
        return {im["image_id"]: im for im in json.load(f)["images"]}


def _refs(root, name):
    split_by = {"refcoco": "unc_exclude_unified", "fprefcoco": "berkeley_exclude_unified"}[name]
    with open(os.path.join(root, "refer_seg", name, f"refs({split_by}).p"), "rb") as f:
        return pickle.load(f)


def _files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return out


# --- text -> structure, independently of the generator's rendering --------------------------------
def _description(text):
    words = text.split()
    kind = words.pop()
    assert kind in KINDS or kind == "shape", text
    size = words.pop(0) if words and words[0] in SIZES else None
    color = words.pop(0) if words and words[0] in COLORS else None
    assert not words, text
    return Description(None if kind == "shape" else kind, color, size)


def parse(text):
    m = re.fullmatch(rf"({'|'.join(ORDINALS)}) (.+) from the ({'|'.join(DIRECTIONS)})", text)
    if m:
        return Expression(_description(m[2]), order=(ORDINALS.index(m[1]), m[3]))
    m = re.fullmatch(rf"(.+?) ({'|'.join(RELATIONS)}) (.+)", text)
    if m:
        return Expression(_description(m[1]), (m[2], _description(m[3])))
    return Expression(_description(text))


def _objects(image):
    return [SimpleNamespace(kind=o["kind"], color=o["color"], size=o["size"], center=tuple(o["center"]))
            for o in image["objects"]]


# --- tests ----------------------------------------------------------------------------------------
def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    config = WorldConfig(images=16, seed=7)
    generate_world(str(tmp_path / "a"), config, workers=1)
    generate_world(str(tmp_path / "b"), config, workers=3)
    a, b = _files(str(tmp_path / "a")), _files(str(tmp_path / "b"))
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    generate_world(str(tmp_path / "c"), WorldConfig(images=16, seed=8), workers=1)
    assert _files(str(tmp_path / "c"))["shapes_manifest.json"] != a["shapes_manifest.json"]


def test_the_loaders_read_the_world(world):
    from dataset.collate import collate_fn
    from dataset.eval_sets import build_eval_dataset
    from dataset.hybrid import HybridDataset
    from model.tokenizer import add_sesame_tokens, load_tokenizer
    from model.transforms import ClipTransform, SamTransform

    for name in ("refcoco", "fprefcoco"):
        data = ReferData(world, name)
        assert data.splits() == ["test", "train", "val"] and data.bad_refs == []
    manifest = _manifest(world)
    fp = build_eval_dataset("fprefcoco", world, "test")
    queries = [q for im in fp for q in im.queries]
    assert any(q.gt_exists for q in queries) and any(not q.gt_exists and q.gt_sent for q in queries)
    for im in fp:
        areas = {o["area"] for o in manifest[im.image_id]["objects"]}
        assert all(int(q.gt_mask.sum()) in areas for q in im.queries if q.gt_exists)
    assert all(q.gt_exists for im in build_eval_dataset("refcoco", world, "val") for q in im.queries)

    tokenizer = load_tokenizer(TOKENIZER)
    add_sesame_tokens(tokenizer)
    train = HybridDataset(world, tokenizer, ClipTransform(140), SamTransform(256),
                          datasets="refer_seg||correct_refer_seg||vqa",
                          sample_rates=(1, 1, 1), refer_seg_data="refcoco", correct_refer_seg_data="fprefcoco",
                          samples_per_epoch=30)
    samples = [train[i] for i in range(30)]
    assert {s.source for s in samples} == {"refer_seg", "correct_refer_seg", "vqa"}
    assert not train.skipped_counts()
    batch = collate_fn(samples, tokenizer)
    assert batch.offset[-1] == batch.input_ids.shape[0] and sum(m.shape[0] for m in batch.masks) > 0


def test_every_expression_names_exactly_one_object(world):
    manifest = _manifest(world)
    anns = {o["ann_id"]: (image_id, k) for image_id, im in manifest.items() for k, o in enumerate(im["objects"])}
    kinds = {"attribute", "size", "relation", "order"}
    seen_kinds, premise_kinds, positives, premises, binding = set(), set(), 0, 0, 0
    for ref in _refs(world, "fprefcoco"):
        image_id, index = anns[ref["ann_id"]]
        image = manifest[image_id]
        objects, side = _objects(image), min(image["height"], image["width"])
        for sent in ref["sentences"]:
            expr = parse(sent["sent"])
            if sentence_exists(sent):
                assert expr.resolve(objects, side) == [index], sent["sent"]
                seen_kinds.add(expr.kind)
                positives += 1
                continue
            premises += 1
            premise_kinds.add(expr.kind)
            target = expr.target
            assert expr.resolve(objects, side) == [], sent["sent"]
            assert not any(o.kind == target.kind and o.color == target.color for o in objects), sent["sent"]
            gt = parse(sent["gt_sent"])
            assert gt.resolve(objects, side) == [index], (sent["sent"], sent["gt_sent"])
            # the nearest present object: the one of the same kind (another colour), else of the same colour
            near = [i for i, o in enumerate(objects) if o.kind == target.kind] or \
                [i for i, o in enumerate(objects) if o.color == target.color]
            assert near == [index], (sent["sent"], sent["gt_sent"])
            # binding: its colour and its kind are both in the picture, on different objects
            binding += any(o.color == target.color for o in objects) and any(o.kind == target.kind for o in objects)
    assert seen_kinds == kinds and positives > 100 and premises > 50
    assert 0.1 * premises < binding < 0.7 * premises  # some need colour bound to kind, not all
    # the absent object is said in every form, so that no form of expression is always true
    assert premise_kinds == kinds
    positives_only = [s for ref in _refs(world, "refcoco") for s in ref["sentences"]]
    assert positives_only and all(sentence_exists(s) and "gt_sent" not in s for s in positives_only)


def test_ground_truth_is_the_visible_pixels(world):
    manifest = _manifest(world)
    with open(os.path.join(world, "refer_seg", "fprefcoco", "instances.json")) as f:
        instances = json.load(f)
    by_image = {}
    for ann in instances["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    covered = 0
    for image_id, anns in by_image.items():
        im = manifest[image_id]
        rgb = read_image_rgb(os.path.join(world, "refer_seg", "images", "mscoco", "images", "train2014",
                                          im["file_name"]), "test").astype(int)
        union = np.zeros((im["height"], im["width"]), np.uint8)
        by_color = {}
        for ann, obj in zip(sorted(anns, key=lambda a: a["id"]), im["objects"]):
            assert all(isinstance(p, list) for p in ann["segmentation"])  # polygons
            mask = decode_segmentation(ann["segmentation"], im["height"], im["width"]).astype(bool)
            assert mask.sum() == obj["area"] and not (union[mask]).any()  # visible parts never overlap
            union[mask] = 1
            near = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            assert not (near & by_color.get(obj["color"], np.zeros_like(mask))).any()  # would look like one shape
            by_color[obj["color"]] = by_color.get(obj["color"], np.zeros_like(mask)) | mask
            error = np.abs(rgb[mask] - np.array(COLORS[obj["color"]])).sum(-1)
            assert np.median(error) < 40, (image_id, obj)  # painted in its colour (JPEG, jitter)
            covered += obj["covered"]
        assert np.median(rgb[union == 0].min(-1)) > 140  # the rest is light background (shapes: a channel <= 70)
    assert covered >= 5


def test_pixel_outlines_decode_back_exactly():
    rng, checked = np.random.default_rng(0), 0
    for _ in range(300):
        mask = np.zeros((24, 24), np.uint8)
        for _ in range(3):
            x, y = rng.integers(0, 20, 2)
            mask[y:y + rng.integers(1, 8), x:x + rng.integers(1, 8)] = 1
        for _ in range(rng.integers(0, 6)):
            x, y = rng.integers(0, 24, 2)
            mask[y, x] ^= 1  # single pixels: corners touching, holes
        outlines = pixel_outlines(mask)
        if outlines is not None:  # None: a hole, which COCO polygons cannot leave out
            checked += 1
            assert np.array_equal(polygon_mask(outlines, 24, 24), mask)
    assert checked > 200
    assert pixel_outlines(np.zeros((5, 5), np.uint8)) is None
    ring = np.ones((5, 5), np.uint8)
    ring[2, 2] = 0
    assert pixel_outlines(ring) is None


@functools.lru_cache(maxsize=None)
def _sentencepiece():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=os.path.join(TOKENIZER, "tokenizer.model"))


def test_the_tokenizer_covers_the_world(world):
    from dataset.templates import DEFAULT_TEMPLATES
    from model.conversation import SYSTEM_PROMPTS
    from model.tokenizer import add_sesame_tokens, load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    ids = add_sesame_tokens(tokenizer)
    assert (ids.seg, ids.im_start, ids.im_end, len(tokenizer)) == (1000, 1001, 1002, 1003)
    texts = list(SYSTEM_PROMPTS.values())
    for entries in (DEFAULT_TEMPLATES.short_question, DEFAULT_TEMPLATES.short_answer, DEFAULT_TEMPLATES.neg_answer,
                    DEFAULT_TEMPLATES.correct_answer, DEFAULT_TEMPLATES.long_question, DEFAULT_TEMPLATES.long_answer):
        filled = (e.format(class_name="red circle", gt_name="blue star", sent="Where is the star?") for e in entries)
        # the newline after <image> goes with it: next to <im_end> it is dropped when tokenising
        texts += [t.replace("<image>", "").replace("[SEG]", "").strip() for t in filled]
    texts += [s.get("gt_sent", s["sent"]) for ref in _refs(world, "fprefcoco") for s in ref["sentences"]]
    texts += [s["sent"] for ref in _refs(world, "fprefcoco") for s in ref["sentences"]]
    with open(os.path.join(world, "llava_dataset", "llava_instruct_150k.json")) as f:
        texts += [t["value"].replace("<image>", "").strip() for rec in json.load(f) for t in rec["conversations"]]
    sp = _sentencepiece()
    fallback = [t for t in texts if any(sp.id_to_piece(i).startswith("<0x") for i in sp.encode(t))]
    assert not fallback
    assert len(sp.encode("Is there a small red star left of the blue circle?")) <= 12  # whole words


def test_cli_writes_a_reduced_world_and_names_bad_arguments(tmp_path, capsys):
    shapes_main([str(tmp_path / "w"), "--images", "12", "--workers", "1", "--max_shapes", "2",
                 "--kinds", "circle,star", "--colors", "red,blue,green"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["train_images"] + summary["val_images"] + summary["test_images"] == 12
    objects = [o for im in _manifest(str(tmp_path / "w")).values() for o in im["objects"]]
    assert {o["kind"] for o in objects} <= {"circle", "star"} and max(
        len(im["objects"]) for im in _manifest(str(tmp_path / "w")).values()) <= 2
    for bad in (["--kinds", "circle,blob"], ["--images", "0"], ["--max_shapes", "0"], ["--test_fraction", "1.5"]):
        with pytest.raises(SystemExit):
            shapes_main([str(tmp_path / "x"), "--images", "4", *bad])
        assert bad[0] in capsys.readouterr().err


def test_favoured_expressions_come_first_and_leave_the_scenes_alone(tmp_path, capsys):
    """--favour order: every object that has an order expression gets one among its positives; the
    pictures and objects are those of the same world without it."""
    plain, favoured = str(tmp_path / "plain"), str(tmp_path / "order")
    shapes_main([plain, "--images", "30", "--seed", "3", "--workers", "1"])
    shapes_main([favoured, "--images", "30", "--seed", "3", "--workers", "1", "--favour", "order"])
    a, b = _manifest(plain), _manifest(favoured)
    assert [im["objects"] for im in a.values()] == [im["objects"] for im in b.values()]
    share = {}
    for name, world in (("plain", a), ("order", b)):
        with_order = [ref for im in world.values() for ref in im["refs"]
                      if any(parse(text).order for text, _ in ref["positives"])]
        share[name] = len(with_order)
    assert share["order"] > share["plain"] > 0
    for im in b.values():  # an object with two shapes of its description in a row gets its order
        for ref in im["refs"]:
            kinds = [kind for _, kind in ref["positives"]]
            assert len(set(kinds)) == len(kinds)
    found = {t: [Expression(Description("circle"), order=(0, "left")) if t == "order" else Expression(Description(t))]
             for t in ("attribute", "size", "order", "relation")}
    for seed in range(20):
        picked = pick_expressions(np.random.default_rng(seed), found, 2, favoured=("order",))
        assert len(picked) == 2 and picked[0].order
    with pytest.raises(SystemExit):
        shapes_main([str(tmp_path / "x"), "--images", "4", "--favour", "colour"])
    assert "--favour" in capsys.readouterr().err


def test_order_questions_are_answered_by_the_scene(tmp_path):
    """--order_questions 2: each training image's VQA starts with up to two questions whose answer is the
    object an order names ("What is the second shape from the left?"), right by the objects' centres; the
    pictures are those of the world without them, which has no such question."""
    plain, asked = str(tmp_path / "plain"), str(tmp_path / "asked")
    shapes_main([plain, "--images", "30", "--seed", "3", "--workers", "1"])
    shapes_main([asked, "--images", "30", "--seed", "3", "--workers", "1", "--order_questions", "2"])
    a, b = _manifest(plain), _manifest(asked)
    assert [im["objects"] for im in a.values()] == [im["objects"] for im in b.values()]

    def vqa(root):
        with open(os.path.join(root, "llava_dataset", "llava_instruct_150k.json")) as f:
            return {int(c["id"]): c["conversations"] for c in json.load(f)}

    question = re.compile(rf"(?:What (?:colour|color) is the|What is the) ({'|'.join(ORDINALS)}) (\w+) from the "
                          rf"({'|'.join(DIRECTIONS)})\?")
    assert not any(question.search(t["value"]) for conv in vqa(plain).values() for t in conv)
    checked = 0
    for image_id, conv in vqa(asked).items():
        objects = b[image_id]["objects"]
        for q, answer in zip(conv[::2], conv[1::2]):
            m = question.search(q["value"])
            if not m:
                continue
            group = [o for o in objects if m[2] == "shape" or o["kind"] == m[2]]
            axis, reverse = {"left": (0, False), "right": (0, True), "top": (1, False), "bottom": (1, True)}[m[3]]
            named = sorted(group, key=lambda o: o["center"][axis], reverse=reverse)[ORDINALS.index(m[1])]
            want = f"It is a {named['size']} {named['color']} {named['kind']}." if m[2] == "shape" \
                else f"It is {named['color']}."
            assert answer["value"] == want, (q["value"], answer["value"], objects)
            checked += 1
        first = [question.search(t["value"]) is not None for t in conv[::2]]
        assert first == sorted(first, reverse=True)  # the order questions come first
    assert checked > 20


def test_position_questions_ask_every_place_and_keep_the_world(tmp_path):
    """--position_questions: the world's own conversations stay (the pictures too), and the added ones ask,
    of each training picture, "Where is ...?" once for every object its colour and kind name alone, with
    the row and column words of its centre in CLIP's crop, and order questions; 4 rounds at most, the
    image once, after the first question."""
    plain, mixed = str(tmp_path / "plain"), str(tmp_path / "mixed")
    shapes_main([plain, "--images", "30", "--seed", "3", "--workers", "1"])
    shapes_main([mixed, "--images", "30", "--seed", "3", "--workers", "1", "--position_questions"])
    manifest = _manifest(mixed)
    assert [im["objects"] for im in _manifest(plain).values()] == [im["objects"] for im in manifest.values()]

    def vqa(root):
        with open(os.path.join(root, "llava_dataset", "llava_instruct_150k.json")) as f:
            return json.load(f)

    own = vqa(plain)
    added = [c for c in vqa(mixed) if c not in own]
    assert len(vqa(mixed)) == len(own) + len(added) and len(added) > len(own)
    asked, order = collections.Counter(), 0
    for conv in added:
        turns = conv["conversations"]
        assert 2 <= len(turns) <= 8 and [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].endswith("\n<image>") and all("<image>" not in t["value"] for t in turns[1:])
        im = manifest[int(conv["id"])]
        assert im["split"] == "train"
        x0, y0, side = centre_crop(im["width"], im["height"])
        for q, a in zip(turns[::2], turns[1::2]):
            m = re.fullmatch(r"Where is the (\w+) (\w+)\?", q["value"].replace("\n<image>", ""))
            if not m:
                order += "from the" in q["value"]
                continue
            named = [o for o in im["objects"] if (o["color"], o["kind"]) == (m[1], m[2])]
            assert len(named) == 1
            fx, fy = (named[0]["center"][0] - x0) / side, (named[0]["center"][1] - y0) / side
            assert ("left" in a["value"]) == (fx < 1 / 3) and ("right" in a["value"]) == (fx > 2 / 3)
            assert ("top" in a["value"]) == (fy < 1 / 3) and ("bottom" in a["value"]) == (fy > 2 / 3)
            asked[(im["image_id"], m[1], m[2])] += 1
    names = {im["image_id"]: collections.Counter((o["color"], o["kind"]) for o in im["objects"])
             for im in manifest.values() if im["split"] == "train"}
    unique = {(i, *name) for i, counts in names.items() for name, n in counts.items() if n == 1}
    assert set(asked) == unique and set(asked.values()) == {1}
    assert order > len(unique)


def test_bundled_world_scene_is_what_its_json_says():
    """assets/shapes_world.jpg (the web demo's and README's Shapes example) is the scene its JSON names,
    drawn by today's generator: objects, boxes and pixels (up to JPEG loss)."""
    from dataset.shapes.scene import make_scene

    assets = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
    with open(os.path.join(assets, "shapes_world.json")) as f:
        meta = json.load(f)
    scene = make_scene(np.random.default_rng(meta["seed"]))
    assert [(o.name, o.size, o.bbox()) for o in scene.objects] == \
        [(o["name"], o["size"], o["bbox_xywh"]) for o in meta["objects"]]
    pixels = cv2.imread(os.path.join(assets, "shapes_world.jpg"))[:, :, ::-1]
    assert pixels.shape == (meta["height"], meta["width"], 3) == scene.image.shape
    assert np.abs(pixels.astype(int) - scene.image.astype(int)).mean() < 2.0


def test_order_directions_count_from_the_named_sides_only(tmp_path, capsys):
    """--order_directions left (a curriculum's first stage): every order, in positives, false premises,
    order questions and position questions, counts from the left; the pictures are those of the full
    world, whose orders count from all four sides."""
    full, left = str(tmp_path / "full"), str(tmp_path / "left")
    flags = ["--images", "40", "--seed", "3", "--workers", "1", "--favour", "order", "--order_questions", "2",
             "--position_questions"]
    shapes_main([full, *flags])
    shapes_main([left, *flags, "--order_directions", "left"])
    assert [im["objects"] for im in _manifest(full).values()] == [im["objects"] for im in _manifest(left).values()]

    def sides(root):
        said = collections.Counter()
        for name in ("refcoco", "fprefcoco"):
            for ref in _refs(root, name):
                for s in ref["sentences"]:
                    order = parse(s["sent"]).order
                    said[order[1] if order else None] += 1
        with open(os.path.join(root, "llava_dataset", "llava_instruct_150k.json")) as f:
            for conv in json.load(f):
                for turn in conv["conversations"][::2]:
                    said.update(re.findall(rf"from the ({'|'.join(DIRECTIONS)})\?", turn["value"]))
        return said

    everywhere, left_only = sides(full), sides(left)
    assert all(everywhere[d] > 20 for d in DIRECTIONS)
    assert left_only["left"] > 50 and not any(left_only[d] for d in ("right", "top", "bottom"))
    with pytest.raises(SystemExit):
        shapes_main([str(tmp_path / "x"), "--images", "4", "--order_directions", "left,up"])
    assert "--order_directions" in capsys.readouterr().err
