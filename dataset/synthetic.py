"""A small data root in every on-disk format the loaders read, for tests and the quick start.

    python -m dataset.synthetic OUT_DIR [--seed N] [--num-images 12]

Each image is a plain background with 2-3 coloured shapes (square, rectangle, triangle, circle),
each colour and kind at most once per image, so "the red square" names exactly one object. Every
shape's pixels are painted from the very mask written to the annotations, so the ground truth is
what is drawn. `synthetic_manifest.json` lists each image's shapes for end-to-end tests.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .class_names import ade20k_class_names, cocostuff_class_names
from .shapes.scene import COLORS, SceneSpec, mask_bbox, polygon_mask
from .shapes.scene import make_scene as draw_scene

KINDS = ("square", "rectangle", "triangle", "circle")
# The shapes world's drawing, kept simple: plain background, 2-3 shapes apart, colours and kinds unique.
SCENE_SPEC = SceneSpec(min_shapes=2, max_shapes=3, kinds=KINDS, unique_attributes=True, allow_overlap=False,
                       min_side=(96, 144), max_aspect=1.5, backgrounds=("plain",), color_jitter=0)
# Refer splits by scene index (first half train); refcoco/+ use testA/testB, refcocog/refclef test.
SPLITS_UNC = ("train", "train", "train", "train", "train", "train", "val", "val", "val", "testA", "testA", "testB")
SPLITS_UMD = ("train", "train", "train", "train", "train", "train", "val", "val", "val", "test", "test", "test")
REASON_SPLITS = SPLITS_UMD


@dataclass
class Shape:
    kind: str
    color: str
    polygon: list[float]  # flat x, y, ...
    mask: np.ndarray  # (H, W) uint8
    center: tuple[float, float]  # (x, y)

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"

    def where(self, width: int, height: int) -> str:
        x, y = self.center
        horiz = "left" if x < width / 3 else "right" if x > 2 * width / 3 else "middle"
        vert = "top" if y < height / 2 else "bottom"
        return f"{vert} {horiz}" if horiz != "middle" else f"{vert}"

    def bbox(self) -> list[int]:
        return mask_bbox(self.mask)


@dataclass
class Scene:
    scene_id: int
    height: int
    width: int
    background: tuple[int, int, int]
    shapes: list[Shape] = field(default_factory=list)
    image: np.ndarray = None  # (H, W, 3) RGB

    def absent(self, rng: np.random.Generator) -> tuple[str, str]:
        """A (colour, kind) pair whose colour and kind both do not occur in the image."""
        colors = [c for c in COLORS if c not in {s.color for s in self.shapes}]
        kinds = [k for k in KINDS if k not in {s.kind for s in self.shapes}]
        return colors[int(rng.integers(len(colors)))], kinds[int(rng.integers(len(kinds)))]


def make_scene(scene_id: int, rng: np.random.Generator) -> Scene:
    drawn = draw_scene(rng, SCENE_SPEC)
    scene = Scene(scene_id, drawn.height, drawn.width, drawn.background_rgb, image=drawn.image)
    scene.shapes = [Shape(o.kind, o.color, o.polygon, o.mask, o.center) for o in drawn.objects]
    return scene


def write_jpg(path: str, image_rgb: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # no chroma subsampling, so colours stay crisp up to the shape edges
    params = [cv2.IMWRITE_JPEG_QUALITY, 98, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    cv2.imwrite(path, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), params)


def write_png(path: str, label: np.ndarray, palette: list[int] | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(label.astype(np.uint8), mode="L" if palette is None else "P")
    if palette is not None:
        im.putpalette(palette)
    im.save(path)


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def coco_file(scene: Scene) -> str:
    return f"COCO_train2014_{scene.scene_id:012d}.jpg"


def clef_file(scene: Scene) -> str:
    return f"{scene.scene_id // 1000:02d}/images/{scene.scene_id}.jpg"


# ---------------------------------------------------------------------------------------------
# Referring datasets
# ---------------------------------------------------------------------------------------------
# Every COCO segmentation form the loaders read, cycled over the annotations of a file. Parts of
# one annotation overlap on purpose (the original summed them into 2s; their union is the shape).
SEGMENTATION_FORMS = ("polygon", "rle_list", "polygon_overlap", "rle", "polygon", "uncompressed_rle")
# The scene (index) whose image has a single ref (its first shape), stored as an RLE list: an image
# whose only ref is RLE-encoded must stay in the evaluation set. A val scene in every refs file.
LONE_REF_SCENE = 7
EMPTY_ANN_SUFFIX = 99  # ann id scene_id * 100 + 99: an annotation with an empty segmentation ([])


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1  # run boundaries; runs alternate 0, 1, ... from a 0-run
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def _inner_polygon(shape: Shape) -> list[float]:
    """A second part inside the shape: the triangle of its first three vertices when its pixels lie
    within the shape's, else the same polygon again (overlapping completely)."""
    triangle = shape.polygon[:6]
    inside = polygon_mask([triangle], *shape.mask.shape)
    return triangle if inside.any() and not (inside > shape.mask).any() else list(shape.polygon)


def _segmentation(shape: Shape, form: str):
    """(segmentation, iscrowd) of a shape in one of SEGMENTATION_FORMS; the union of the parts is
    exactly shape.mask."""
    if form == "rle":
        return _compressed_rle(shape.mask), 0
    if form == "uncompressed_rle":  # how COCO stores crowd annotations
        return _uncompressed_rle(shape.mask), 1
    if form == "rle_list":
        ys = np.nonzero(shape.mask)[0]
        top = shape.mask.copy()
        top[int(np.round(ys.mean())):] = 0
        return [_compressed_rle(shape.mask), _compressed_rle(top)], 0
    if form == "polygon_overlap":
        return [shape.polygon, _inner_polygon(shape)], 0
    return [shape.polygon], 0


def instances_json(scenes: list[Scene], file_name) -> tuple[dict, dict[tuple[int, int], int]]:
    cats = [{"id": i + 1, "name": k, "supercategory": "shape"} for i, k in enumerate(KINDS)]
    images, anns, ann_ids = [], [], {}
    for i, scene in enumerate(scenes):
        images.append({"id": scene.scene_id, "file_name": file_name(scene), "height": scene.height,
                       "width": scene.width})
        for j, shape in enumerate(scene.shapes):
            ann_id = scene.scene_id * 100 + j
            lone = i == LONE_REF_SCENE and j == 0
            segm, crowd = _segmentation(shape, "rle_list" if lone else SEGMENTATION_FORMS[len(anns) % 6])
            anns.append({"id": ann_id, "image_id": scene.scene_id, "category_id": KINDS.index(shape.kind) + 1,
                         "segmentation": segm, "iscrowd": crowd, "area": int(shape.mask.sum()), "bbox": shape.bbox()})
            ann_ids[(scene.scene_id, j)] = ann_id
        if i == 0:  # referred by no ref; an empty segmentation is an empty mask
            anns.append({"id": scene.scene_id * 100 + EMPTY_ANN_SUFFIX, "image_id": scene.scene_id,
                         "category_id": 1, "segmentation": [], "iscrowd": 0, "area": 0, "bbox": [0, 0, 0, 0]})
    return {"images": images, "annotations": anns, "categories": cats}, ann_ids


def _expressions(dataset: str, scene: Scene, shape: Shape) -> list[str]:
    if dataset.endswith("refcoco+"):  # RefCOCO+ has no location words
        return [shape.name, f"the {shape.kind} that is {shape.color}"]
    if dataset.endswith("refcocog"):  # longer, sentence-like expressions
        other = next(s for s in scene.shapes if s is not shape)
        return [f"a {shape.name} next to the {other.name}"]
    return [shape.name, f"{shape.kind} at the {shape.where(scene.width, scene.height)}"]


def _sentence(text: str, sent_id: int, **extra) -> dict:
    return {"tokens": text.split(), "raw": text, "sent_id": sent_id, "sent": text, **extra}


def refer_refs(dataset: str, scenes: list[Scene], ann_ids: dict, rng: np.random.Generator) -> list[dict]:
    splits = SPLITS_UMD if dataset in ("refcocog", "R-refcocog", "refclef") else SPLITS_UNC
    file_name = clef_file if dataset == "refclef" else coco_file
    refs, sent_id = [], 0
    for i, scene in enumerate(scenes):
        split = splits[i % len(splits)]
        lone = i == LONE_REF_SCENE
        for j, shape in enumerate(scene.shapes[:1] if lone else scene.shapes):
            sents = []
            for text in _expressions(dataset, scene, shape):
                extra = {}
                if dataset.startswith("fp"):
                    extra = {"is_false_premise": False}
                elif dataset.startswith("R-"):
                    extra = {"exist": True}
                sents.append(_sentence(text, sent_id, **extra))
                sent_id += 1
            if dataset.startswith("fp"):  # a false premise on the same ref, with the true expression to suggest
                color, kind = scene.absent(rng)
                sents.append(_sentence(f"{color} {kind}", sent_id, is_false_premise=True, gt_sent=shape.name))
                sent_id += 1
            refs.append({"ref_id": len(refs), "ann_id": ann_ids[(scene.scene_id, j)], "image_id": scene.scene_id,
                         "category_id": KINDS.index(shape.kind) + 1, "split": split, "file_name": file_name(scene),
                         "sent_ids": [s["sent_id"] for s in sents], "sentences": sents})
        if dataset.startswith("R-") and not lone:
            # a ref over every shape at once (ann_id list) and a no-object ref (-1 as list or int)
            both = [ann_ids[(scene.scene_id, j)] for j in range(len(scene.shapes))]
            refs.append({"ref_id": len(refs), "ann_id": both, "image_id": scene.scene_id, "category_id": 1,
                         "split": split, "file_name": file_name(scene), "sent_ids": [sent_id],
                         "sentences": [_sentence("all the shapes", sent_id, exist=True)]})
            sent_id += 1
            color, kind = scene.absent(rng)
            no_obj = [-1] if dataset == "R-refcoco" else -1
            refs.append({"ref_id": len(refs), "ann_id": no_obj, "image_id": scene.scene_id, "category_id": 1,
                         "split": split, "file_name": file_name(scene), "sent_ids": [sent_id],
                         "sentences": [_sentence(f"{color} {kind}", sent_id, exist=False)]})
            sent_id += 1
    return refs


def write_refer(root: str, scenes: list[Scene], rng: np.random.Generator) -> None:
    from .refer import REFER_DATASETS, default_split_by

    for scene in scenes:
        coco_dir = os.path.join(root, "refer_seg", "images", "mscoco", "images", "train2014")
        write_jpg(os.path.join(coco_dir, coco_file(scene)), scene.image)
        write_jpg(os.path.join(root, "refer_seg", "images", "saiapr_tc-12", clef_file(scene)), scene.image)
    for dataset in REFER_DATASETS:
        folder = os.path.join(root, "refer_seg", dataset)
        instances, ann_ids = instances_json(scenes, clef_file if dataset == "refclef" else coco_file)
        write_json(os.path.join(folder, "instances.json"), instances)
        refs = refer_refs(dataset, scenes, ann_ids, rng)
        names = {default_split_by(dataset)}
        names.add(default_split_by(dataset).replace("_exclude_unified", ""))  # the plain unc / umd / berkeley file too
        for split_by in sorted(names):
            with open(os.path.join(folder, f"refs({split_by}).p"), "wb") as f:
                pickle.dump(refs, f, protocol=2)  # the released files are Python 2 era pickles


# ---------------------------------------------------------------------------------------------
# VQA, ReasonSeg
# ---------------------------------------------------------------------------------------------
VQA_LATE_IMAGE = 4  # records of scene_id % 4 == 2 hold <image> in their second question, not the first


def write_vqa(root: str, scenes: list[Scene]) -> None:
    records = []
    for scene in scenes:
        write_jpg(os.path.join(root, "coco", "train2017", f"{scene.scene_id:012d}.jpg"), scene.image)
        names = " and ".join(f"a {s.name}" for s in scene.shapes)
        first, second = "What shapes are in this picture?", f"Where is the {scene.shapes[0].name}?"
        if scene.scene_id % VQA_LATE_IMAGE == 2:
            second += "\n<image>"
        else:
            first = ("<image>\n" + first) if scene.scene_id % 2 else (first + "\n<image>")
        turns = [{"from": "human", "value": first},
                 {"from": "gpt", "value": f"The picture shows {names} on a plain background."},
                 {"from": "human", "value": second},
                 {"from": "gpt",
                  "value": f"It is at the {scene.shapes[0].where(scene.width, scene.height)} of the image."}]
        if scene.scene_id % 3 == 0:  # LLaVA records occasionally open with a non-human turn; it is dropped
            turns = [{"from": "gpt", "value": "Hello."}] + turns
        records.append({"id": f"{scene.scene_id:012d}", "image": f"{scene.scene_id:012d}.jpg", "conversations": turns})
    write_json(os.path.join(root, "llava_dataset", "llava_instruct_150k.json"), records)


def _labelme_points(shape: Shape) -> list[list[float]]:
    p = shape.polygon
    return [[p[i], p[i + 1]] for i in range(0, len(p), 2)]


REASON_CP1252 = (1, 7)  # scene indices whose ReasonSeg json is cp1252 text (a train and a val image)


def write_reason_seg(root: str, scenes: list[Scene], rng: np.random.Generator) -> None:
    for i, scene in enumerate(scenes):
        split = REASON_SPLITS[i % len(REASON_SPLITS)]
        name = f"shapes_{scene.scene_id:04d}"
        folder = os.path.join(root, "reason_seg", "ReasonSeg", split)
        write_jpg(os.path.join(folder, name + ".jpg"), scene.image)
        target, other = scene.shapes[0], scene.shapes[1]
        is_sentence = bool(i % 2)
        if i in REASON_CP1252:  # characters that cp1252 encodes differently from UTF-8
            text = [f"Which shape here is {target.color} and looks like a {target.kind}? "
                    f"It\u2019s the \u201cone\u201d.",
                    f"Find the {target.color} object that has the shape of a {target.kind} (caf\u00e9 style)."]
        elif is_sentence:
            text = [f"Which shape in this picture is {target.color} and looks like a {target.kind}?",
                    f"Find the {target.color} object that has the shape of a {target.kind}."]
        else:
            text = [target.name, f"the {target.kind}"]
        color, kind = scene.absent(rng)
        shapes = [{"label": "target", "points": _labelme_points(target), "shape_type": "polygon"},
                  {"label": "ignore_hard", "points": _labelme_points(other), "shape_type": "polygon"},
                  {"label": "flag", "points": [[0, 0], [3, 0], [3, 3]], "shape_type": "polygon"}]
        # the false-premise phrase keeps its capital: the original does not lower-case it
        anno = {"text": text, "is_sentence": is_sentence, "shapes": shapes,
                "false_premise_QA": [[f"The {color} {kind}", False,
                                      f"There is no {color} {kind} in this image, but there is a {target.name}."]]}
        path = os.path.join(folder, name + ".json")
        if i in REASON_CP1252:
            with open(path, "wb") as f:
                f.write(json.dumps(anno, ensure_ascii=False).encode("cp1252"))
        else:
            write_json(path, anno)


# ---------------------------------------------------------------------------------------------
# Semantic / part segmentation sources
# ---------------------------------------------------------------------------------------------
ADE_FOR_KIND = {"square": "box", "rectangle": "signboard", "triangle": "flag", "circle": "ball"}
COCOSTUFF_FOR_KIND = {"square": "tv", "rectangle": "wall-other", "triangle": "kite", "circle": "sports ball"}
MAPILLARY_LABELS = [("construction--flat--road", "Road"), ("object--traffic-sign--front", "Traffic Sign (Front)"),
                    ("object--manhole", "Manhole"), ("object--traffic-sign--back", "Traffic Sign (Back)"),
                    ("object--banner", "Banner"), ("void--unlabeled", "Unlabeled")]
MAPILLARY_FOR_KIND = {"square": 1, "rectangle": 4, "triangle": 3, "circle": 2}


def _label_map(scene: Scene, background: int, value_of_kind) -> np.ndarray:
    label = np.full((scene.height, scene.width), background, np.uint8)
    for s in scene.shapes:
        label[s.mask.astype(bool)] = value_of_kind(s.kind)
    return label


def _halves(shape: Shape) -> dict[str, np.ndarray]:
    ys, xs = np.nonzero(shape.mask)
    cy, cx = int(np.round(ys.mean())), int(np.round(xs.mean()))
    top, left = shape.mask.copy(), shape.mask.copy()
    top[cy:] = 0
    left[:, cx:] = 0
    return {"top_half": top, "bottom_half": shape.mask - top, "left_half": left, "right_half": shape.mask - left}


def _part_json(scenes: list[Scene], file_name, object_name) -> dict:
    cats: dict[str, int] = {}
    images, anns = [], []

    def cat_id(name: str) -> int:
        return cats.setdefault(name, len(cats) + 1)

    for k in KINDS:  # every category exists in the file, also those absent from some images
        cat_id(object_name(k))
        for part in ("top_half", "bottom_half", "left_half", "right_half"):
            cat_id(f"{object_name(k)}:{part}")
    for scene in scenes:
        images.append({"id": scene.scene_id, "file_name": file_name(scene), "height": scene.height,
                       "width": scene.width})
        for s in scene.shapes:
            parts = {"": s.mask, **_halves(s)}
            for part, m in parts.items():
                if not m.any():
                    continue
                rle = mask_utils.encode(np.asfortranarray(m))
                segm = [s.polygon] if part == "" else {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
                name = object_name(s.kind) + (f":{part}" if part else "")
                anns.append({"id": len(anns) + 1, "image_id": scene.scene_id, "category_id": cat_id(name),
                             "segmentation": segm, "area": int(m.sum()), "bbox": s.bbox(), "iscrowd": 0})
    return {"images": images, "annotations": anns,
            "categories": [{"id": i, "name": n} for n, i in sorted(cats.items(), key=lambda x: x[1])]}


def write_sem_seg(root: str, scenes: list[Scene]) -> None:
    ade, stuff = ade20k_class_names(), cocostuff_class_names()
    for scene in scenes:
        sid = scene.scene_id
        # ADE20K: 0 = "other" (ignored), class k stored as k + 1; background here is "wall".
        write_jpg(os.path.join(root, "ade20k", "images", "training", f"ADE_train_{sid:08d}.jpg"), scene.image)
        write_png(os.path.join(root, "ade20k", "annotations", "training", f"ADE_train_{sid:08d}.png"),
                  _label_map(scene, ade.index("wall") + 1, lambda k: ade.index(ADE_FOR_KIND[k]) + 1))
        # COCO-Stuff: label = class index, 255 unlabelled (a 3-pixel border here); "wall-other" is a merged class.
        label = _label_map(scene, stuff.index("paper"), lambda k: stuff.index(COCOSTUFF_FOR_KIND[k]))
        label[:3] = 255
        write_png(os.path.join(root, "cocostuff", "train2017", f"{sid:012d}.png"), label)
        # Mapillary Vistas v2.0: palette PNG of label indices; the last label is "Unlabeled".
        key = f"synthetic{sid:06d}"
        write_jpg(os.path.join(root, "mapillary", "training", "images", key + ".jpg"), scene.image)
        label = _label_map(scene, 0, lambda k: MAPILLARY_FOR_KIND[k])
        label[-2:] = len(MAPILLARY_LABELS) - 1
        palette = [c for i in range(256) for c in ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)]
        write_png(os.path.join(root, "mapillary", "training", "v2.0", "labels", key + ".png"), label, palette)
        # PASCAL-Part images
        voc_dir = os.path.join(root, "vlpart", "pascal_part", "VOCdevkit", "VOC2010", "JPEGImages")
        write_jpg(os.path.join(voc_dir, f"2008_{sid:06d}.jpg"), scene.image)
    write_json(os.path.join(root, "mapillary", "config_v2.0.json"),
               {"labels": [{"name": n, "readable": r, "color": [(37 * i) % 256, (91 * i) % 256, (53 * i) % 256],
                            "instances": False, "evaluate": r != "Unlabeled"}
                           for i, (n, r) in enumerate(MAPILLARY_LABELS)],
                "version": "2.0"})
    write_json(os.path.join(root, "vlpart", "pascal_part", "train.json"),
               _part_json(scenes, lambda s: f"2008_{s.scene_id:06d}.jpg", lambda k: k))
    write_json(os.path.join(root, "vlpart", "paco", "annotations", "paco_lvis_v1_train.json"),
               _part_json(scenes, lambda s: f"train2017/{s.scene_id:012d}.jpg", lambda k: f"{k}_(shape)"))


def write_manifest(root: str, scenes: list[Scene]) -> None:
    write_json(os.path.join(root, "synthetic_manifest.json"), {
        "images": [{"scene_id": s.scene_id, "height": s.height, "width": s.width,
                    "coco_train2014": os.path.join("refer_seg", "images", "mscoco", "images", "train2014",
                                                   coco_file(s)),
                    "coco_train2017": os.path.join("coco", "train2017", f"{s.scene_id:012d}.jpg"),
                    "shapes": [{"kind": sh.kind, "color": sh.color, "name": sh.name, "bbox": sh.bbox(),
                                "area": int(sh.mask.sum())} for sh in s.shapes]} for s in scenes]})


def generate(out_dir: str, seed: int = 0, num_images: int = 12) -> list[Scene]:
    """Write the whole synthetic root under `out_dir`; returns the scenes (with their masks)."""
    if num_images < len(SPLITS_UNC):
        raise ValueError(f"--num-images must be at least {len(SPLITS_UNC)} so every split has images")
    rng = np.random.default_rng(seed)
    scenes = [make_scene(i + 1, rng) for i in range(num_images)]
    write_refer(out_dir, scenes, rng)
    write_vqa(out_dir, scenes)
    write_reason_seg(out_dir, scenes, rng)
    write_sem_seg(out_dir, scenes)
    write_manifest(out_dir, scenes)
    return scenes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-images", type=int, default=12)
    args = ap.parse_args(argv)
    t0 = time.time()
    generate(args.out_dir, args.seed, args.num_images)
    print(f"wrote a synthetic data root with {args.num_images} images to {args.out_dir} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
