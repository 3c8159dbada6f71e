"""Writing a shapes world to disk in the formats the loaders read, under the names they know.

    refer_seg/images/mscoco/images/train2014/COCO_train2014_<id>.jpg    every image
    refer_seg/refcoco/   refs(unc_exclude_unified).p       instances.json   positives only
    refer_seg/fprefcoco/ refs(berkeley_exclude_unified).p  instances.json   positives + false premises
    llava_dataset/llava_instruct_150k.json + coco/train2017/<id>.jpg       VQA about training images
    shapes_manifest.json                                                   every object, every sentence

Splits (train / val / test) are by image. Image k is a pure function of (seed, k): workers draw
and write images independently and the annotation files are assembled in image order, so the
output is the same byte for byte whatever the number of workers.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil
from dataclasses import dataclass
from types import SimpleNamespace

import cv2
import numpy as np

from .language import (
    DIRECTIONS,
    EXPRESSION_TYPES,
    candidate_expressions,
    false_premises,
    pick_expressions,
    position_conversations,
    vqa_conversation,
)
from .scene import KINDS, SceneSpec, centre_crop, make_scene

SPLITS = ("train", "val", "test")
REFER_SETS = {"refcoco": "unc_exclude_unified", "fprefcoco": "berkeley_exclude_unified"}
VQA_FILE = "llava_instruct_150k"
MANIFEST = "shapes_manifest.json"


@dataclass(frozen=True)
class WorldConfig:
    images: int
    seed: int = 0
    val_fraction: float = 0.05
    test_fraction: float = 0.1
    positives_per_object: int = 2  # at most, of different expression types
    # expression types every object gets wherever it has them (a training world that stresses, e.g., order)
    favoured_expressions: tuple[str, ...] = ()
    false_premises_per_object: int = 2  # at most (another colour, another kind)
    # forms a false premise may take besides the plain one (a reduced world may keep them plain)
    premise_forms: tuple[str, ...] = ("relation", "order")
    # a false premise's other colour may be one another object has: the model must bind colour to kind
    binding_false_premises: bool = True
    vqa_rounds: tuple[int, int] = (2, 4)
    order_questions: int = 0  # VQA rounds per image that ask an order ("What is the first square from the left?")
    # besides each training picture's own conversation, conversations that ask every "Where is ...?" and
    # every order question it has, mixed in (the model must learn to read places from the image tokens)
    position_questions: bool = False
    # the directions orders are counted from, in expressions and questions (a curriculum's first stage
    # may count from one side only: see README, "The Shapes world")
    order_directions: tuple[str, ...] = DIRECTIONS
    jpeg_quality: int = 95
    scene: SceneSpec = SceneSpec()  # a reduced world: fewer shapes, kinds or colours

    def __post_init__(self) -> None:
        if self.images < 1:
            raise ValueError(f"--images must be >= 1, got {self.images}")
        if not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction <= 1):
            raise ValueError(f"--val_fraction {self.val_fraction} and --test_fraction {self.test_fraction} must be "
                             "non-negative with a sum of at most 1")
        unknown = [t for t in self.favoured_expressions if t not in EXPRESSION_TYPES]
        if unknown:
            raise ValueError(f"--favour: unknown expression type(s) {', '.join(unknown)}; "
                             f"choose from {', '.join(EXPRESSION_TYPES)}")
        wrong = [d for d in self.order_directions if d not in DIRECTIONS]
        if wrong or not self.order_directions:
            raise ValueError(f"--order_directions: unknown or no directions {wrong or list(self.order_directions)}; "
                             f"choose from {', '.join(DIRECTIONS)}")


def coco_file(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def image_dir(root: str) -> str:
    return os.path.join(root, "refer_seg", "images", "mscoco", "images", "train2014")


def write_jpg(path: str, image_rgb: np.ndarray, quality: int) -> None:
    # 4:4:4 sampling: colours stay crisp up to the shape edges
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    if not cv2.imwrite(path, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), params):
        raise OSError(f"could not write {path}")


def _split(u: float, config: WorldConfig) -> str:
    if u < config.test_fraction:
        return "test"
    if u < config.test_fraction + config.val_fraction:
        return "val"
    return "train"


def draw_image(root: str, config: WorldConfig, index: int) -> dict:
    """Draw image `index`, write its JPEG (and the VQA copy), return its annotations (JSON-able)."""
    rng = np.random.default_rng([config.seed, index])
    split = _split(float(rng.random()), config)
    spec = config.scene
    scene = make_scene(rng, spec)
    image_id = index + 1
    write_jpg(os.path.join(image_dir(root), coco_file(image_id)), scene.image, config.jpeg_quality)
    objects, refs = [], []
    for j, obj in enumerate(scene.objects):
        objects.append({"ann_id": image_id * 10 + j, "kind": obj.kind, "color": obj.color, "size": obj.size,
                        "center": [round(obj.center[0], 2), round(obj.center[1], 2)], "bbox": obj.bbox(),
                        "area": obj.area, "covered": obj.covered, "segmentation": obj.segmentation})
        candidates = candidate_expressions(scene, j, config.order_directions)
        positives = pick_expressions(rng, candidates, config.positives_per_object, config.favoured_expressions)
        forms = {k: v for k, v in candidates.items() if k in config.premise_forms}
        premises = false_premises(rng, scene, j, spec.colors, spec.kinds, forms,
                                  bind=config.binding_false_premises)[:config.false_premises_per_object]
        if positives:
            refs.append({"object": j, "positives": [[e.text(), e.kind] for e in positives],
                         "false_premises": [[p.expression.text(), p.gt_sent] for p in premises]})
    record = {"image_id": image_id, "file_name": coco_file(image_id), "split": split, "height": scene.height,
              "width": scene.width, "background": scene.background, "objects": objects, "refs": refs}
    if split == "train":
        lo, hi = config.vqa_rounds
        record["vqa"] = vqa_conversation(rng, scene, int(rng.integers(lo, hi + 1)), spec.colors, spec.kinds,
                                         config.order_questions, config.order_directions)
        _link(os.path.join(image_dir(root), coco_file(image_id)),
              os.path.join(root, "coco", "train2017", f"{image_id:012d}.jpg"))
    return record


def _link(src: str, dst: str) -> None:
    """The same JPEG under a second name: a hard link where the file system allows, else a copy."""
    if os.path.lexists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _sentence(text: str, sent_id: int, **extra) -> dict:
    return {"tokens": text.split(), "raw": text, "sent_id": sent_id, "sent": text, **extra}


def refer_files(records: list[dict]) -> tuple[dict, dict[str, list[dict]]]:
    """(instances.json, {dataset: refs}) for refcoco (positives) and fprefcoco (with false premises)."""
    images, annotations = [], []
    refs: dict[str, list[dict]] = {name: [] for name in REFER_SETS}
    sent_id = 0
    for rec in records:
        images.append({"id": rec["image_id"], "file_name": rec["file_name"], "height": rec["height"],
                       "width": rec["width"]})
        for obj in rec["objects"]:
            annotations.append({"id": obj["ann_id"], "image_id": rec["image_id"],
                                "category_id": KINDS.index(obj["kind"]) + 1, "segmentation": obj["segmentation"],
                                "area": obj["area"], "bbox": obj["bbox"], "iscrowd": 0})
        for ref in rec["refs"]:
            obj = rec["objects"][ref["object"]]
            pos = [_sentence(text, sent_id + k) for k, (text, _) in enumerate(ref["positives"])]
            sent_id += len(pos)
            fp = [_sentence(text, sent_id + k, is_false_premise=True, gt_sent=gt)
                  for k, (text, gt) in enumerate(ref["false_premises"])]
            sent_id += len(fp)
            for name, sents in (("refcoco", pos), ("fprefcoco", [dict(s, is_false_premise=False) for s in pos] + fp)):
                refs[name].append({"ref_id": len(refs[name]), "ann_id": obj["ann_id"], "image_id": rec["image_id"],
                                   "category_id": KINDS.index(obj["kind"]) + 1, "split": rec["split"],
                                   "file_name": rec["file_name"], "sent_ids": [s["sent_id"] for s in sents],
                                   "sentences": sents})
    categories = [{"id": i + 1, "name": k, "supercategory": "shape"} for i, k in enumerate(KINDS)]
    return {"images": images, "annotations": annotations, "categories": categories}, refs


def vqa_records(records: list[dict]) -> list[dict]:
    return [{"id": f"{rec['image_id']:012d}", "image": f"{rec['image_id']:012d}.jpg", "conversations": rec["vqa"]}
            for rec in records if "vqa" in rec]


def manifest_scene(record: dict) -> SimpleNamespace:
    """A manifest (or record) entry as the language functions read a scene: objects with kind, colour,
    size and centre, the picture's size and CLIP's crop."""
    objects = [SimpleNamespace(kind=o["kind"], color=o["color"], size=o["size"], center=tuple(o["center"]))
               for o in record["objects"]]
    return SimpleNamespace(objects=objects, width=record["width"], height=record["height"],
                           crop=centre_crop(record["width"], record["height"]))


def with_position_questions(vqa: list[dict], records: list[dict],
                            directions: tuple[str, ...] = DIRECTIONS) -> list[dict]:
    """`vqa` (`vqa_records(records)`) plus, for each picture with VQA (the training ones),
    `position_conversations`, all shuffled together. The stream is seeded apart from the pictures' own
    (seed 0), so the questions follow from the pictures alone."""
    rng = np.random.default_rng(0)
    extra = []
    for rec in records:
        if "vqa" in rec:
            image_id = f"{rec['image_id']:012d}"
            extra += [{"id": image_id, "image": f"{image_id}.jpg", "conversations": turns}
                      for turns in position_conversations(rng, manifest_scene(rec), directions=directions)]
    mixed = vqa + extra
    return [mixed[int(i)] for i in rng.permutation(len(mixed))]


def _write_json(path: str, payload) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f)


def _draw(args: tuple[str, WorldConfig, int]) -> dict:
    return draw_image(*args)


def generate_world(root: str, config: WorldConfig, workers: int = 1) -> list[dict]:
    """Write the whole world under `root`; returns the per-image records (as in the manifest)."""
    os.makedirs(image_dir(root), exist_ok=True)
    os.makedirs(os.path.join(root, "coco", "train2017"), exist_ok=True)
    jobs = [(root, config, k) for k in range(config.images)]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            records = list(pool.imap(_draw, jobs, chunksize=max(1, min(32, config.images // (4 * workers)))))
    else:
        records = [_draw(job) for job in jobs]
    instances, refs = refer_files(records)
    for name, split_by in REFER_SETS.items():
        folder = os.path.join(root, "refer_seg", name)
        _write_json(os.path.join(folder, "instances.json"), instances)
        # through JSON first: pickle's memo follows object identity, which differs between
        # records drawn here and records sent back by worker processes
        canonical = json.loads(json.dumps(refs[name]))
        with open(os.path.join(folder, f"refs({split_by}).p"), "wb") as f:
            pickle.dump(canonical, f, protocol=2)  # as the released (Python 2 era) files
    vqa = vqa_records(records)
    if config.position_questions:
        vqa = with_position_questions(vqa, records, config.order_directions)
    _write_json(os.path.join(root, "llava_dataset", VQA_FILE + ".json"), vqa)
    manifest = [{k: v for k, v in rec.items() if k != "vqa"} for rec in records]
    for rec in manifest:
        rec["objects"] = [{k: v for k, v in o.items() if k != "segmentation"} for o in rec["objects"]]
    _write_json(os.path.join(root, MANIFEST), {"seed": config.seed, "images": manifest})
    return records


def summary(records: list[dict]) -> dict[str, int]:
    out = {f"{s}_images": sum(r["split"] == s for r in records) for s in SPLITS}
    out["objects"] = sum(len(r["objects"]) for r in records)
    out["refs"] = sum(len(r["refs"]) for r in records)
    out["positive_sentences"] = sum(len(ref["positives"]) for r in records for ref in r["refs"])
    out["false_premise_sentences"] = sum(len(ref["false_premises"]) for r in records for ref in r["refs"])
    out["vqa_conversations"] = sum("vqa" in r for r in records)
    return out
