"""Drawing one scene of the shapes world: coloured shapes on a background, ground truth = visible pixels.

Shapes are placed one after another, later ones on top. Each shape's full silhouette is the
rasterised polygon (pycocotools, exactly as the loaders decode it); what stays visible after the
shapes above it are painted is its ground truth. A shape that nothing covers keeps its own polygon;
a covered one is annotated with the pixel-edge outline of its visible part (`pixel_outline`), which
decodes back to exactly those pixels. Every pixel of the image is therefore painted from the very
mask its annotation decodes to.

All shapes lie inside the centred square of side min(H, W): that square is what CLIP sees after its
shortest-side resize and centre crop, so every object is visible to the language model too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import cv2
import numpy as np
from pycocotools import mask as mask_utils

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 170), "orange": (245, 140, 20)}
KINDS = ("circle", "square", "rectangle", "triangle", "star")
SIZES = ("small", "big")
BACKGROUND_STYLES = ("plain", "gradient", "striped", "checkered", "cloudy")
# Shape extent (bounding-box side) as a fraction of the centred square's side, per size class.
SIZE_RANGE = {"small": (0.13, 0.18), "big": (0.27, 0.36)}


def centre_crop(width: int, height: int) -> tuple[int, int, int]:
    """(x0, y0, side) of the centred square CLIP sees of a width x height picture."""
    side = min(height, width)
    return (width - side) // 2, (height - side) // 2, side


@dataclass(frozen=True)
class SceneSpec:
    """What scenes to draw. The world's defaults; dataset/synthetic.py asks for a stricter kind."""

    min_shapes: int = 1
    max_shapes: int = 5
    kinds: tuple[str, ...] = KINDS
    colors: tuple[str, ...] = tuple(COLORS)
    unique_attributes: bool = False  # every colour and every kind at most once per image
    repeat_probability: float = 0.45  # chance that a new shape reuses a colour or a kind already drawn
    allow_overlap: bool = True
    min_visible: float = 0.7  # a covered shape keeps at least this share of its pixels, (almost) in one piece
    min_side: tuple[int, int] = (160, 288)  # shorter image side, inclusive range
    max_aspect: float = 1.7  # longer side / shorter side at most
    backgrounds: tuple[str, ...] = BACKGROUND_STYLES[1:]
    color_jitter: int = 8  # per-channel jitter of a shape's colour

    def __post_init__(self) -> None:
        if not 1 <= self.min_shapes <= self.max_shapes:
            raise ValueError(f"shapes per image: need 1 <= min ({self.min_shapes}) <= max ({self.max_shapes})")
        if self.unique_attributes and self.max_shapes > min(len(self.kinds), len(self.colors)):
            raise ValueError(f"{self.max_shapes} shapes with unique colours and kinds need as many of each")


@dataclass
class SceneObject:
    kind: str
    color: str
    size: str  # "small" or "big"
    polygon: list[float]  # the full silhouette, flat x, y, ...
    mask: np.ndarray  # (H, W) uint8 visible pixels
    segmentation: list[list[float]]  # COCO polygons that decode to exactly `mask`
    center: tuple[float, float]  # (x, y) centroid of the visible pixels
    covered: bool  # some other shape lies on top of it

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def bbox(self) -> list[int]:
        return mask_bbox(self.mask)


@dataclass
class Scene:
    height: int
    width: int
    background: str  # style name
    objects: list[SceneObject] = field(default_factory=list)  # bottom to top
    image: Optional[np.ndarray] = None  # (H, W, 3) uint8 RGB
    background_rgb: tuple[int, int, int] = (0, 0, 0)  # the base tone

    @property
    def crop(self) -> tuple[int, int, int]:
        """(x0, y0, side) of the centred square CLIP sees."""
        return centre_crop(self.width, self.height)


# --- geometry -------------------------------------------------------------------------------------
def _rotate(points: np.ndarray, angle: float, center: tuple[float, float]) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    p = points - center
    return np.stack([c * p[:, 0] - s * p[:, 1], s * p[:, 0] + c * p[:, 1]], 1) + center


def shape_polygon(kind: str, cx: float, cy: float, extent: float, angle: float = 0.0,
                  portrait: bool = False) -> list[float]:
    """Flat polygon of a shape centred at (cx, cy) whose bounding box side is about `extent`."""
    r = extent / 2
    if kind == "circle":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
        angle = 0.0
    elif kind == "square":
        q = r * 0.85
        pts = np.array([[cx - q, cy - q], [cx + q, cy - q], [cx + q, cy + q], [cx - q, cy + q]])
    elif kind == "rectangle":
        w, h = (r * 0.5, r) if portrait else (r, r * 0.5)
        pts = np.array([[cx - w, cy - h], [cx + w, cy - h], [cx + w, cy + h], [cx - w, cy + h]])
    elif kind == "triangle":
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        pts = np.stack([cx + r * np.cos(t), cy + 0.15 * r + r * np.sin(t)], 1)
    elif kind == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        pts = np.stack([cx + radius * np.cos(t), cy + 0.05 * r + radius * np.sin(t)], 1)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; known: {', '.join(KINDS)}")
    if angle:
        pts = _rotate(pts, angle, (cx, cy))
    return [round(float(v), 2) for v in pts.reshape(-1)]


def mask_bbox(mask: np.ndarray) -> list[int]:
    """COCO [x, y, width, height] of a non-empty (H, W) mask's pixels."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def polygon_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """(H, W) uint8: COCO polygons rasterised by pycocotools, as the loaders decode them."""
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    return mask_utils.decode(rle).astype(np.uint8)


def pixel_outlines(mask: np.ndarray) -> Optional[list[list[float]]]:
    """The outlines of a region along pixel edges, one flat polygon per 4-connected piece, in
    pycocotools' pixel-edge convention: together they decode back to exactly `mask`. None if the
    region is empty or has a hole (COCO polygons cannot leave one out)."""
    m = np.pad(mask.astype(bool), 1)
    inside = m[1:-1, 1:-1]
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}  # edges run with the inside on their right (y down)
    for neighbour, first, second in ((m[:-2, 1:-1], (0, 0), (1, 0)), (m[2:, 1:-1], (1, 1), (0, 1)),
                                     (m[1:-1, :-2], (0, 1), (0, 0)), (m[1:-1, 2:], (1, 0), (1, 1))):
        ys, xs = np.nonzero(inside & ~neighbour)
        for y, x in zip(ys.tolist(), xs.tolist()):
            out.setdefault((x + first[0], y + first[1]), []).append((x + second[0], y + second[1]))
    loops = []
    while out:
        start = min(out)
        loop, v, heading = [start], start, None
        while True:
            ends = out[v]
            if len(ends) > 1 and heading is not None:  # pixels touching at a corner: turn right, hug one piece
                right = (-heading[1], heading[0])
                nxt = next(e for e in ends if (e[0] - v[0], e[1] - v[1]) == right)
            else:
                nxt = ends[0]
            ends.remove(nxt)
            if not ends:
                del out[v]
            heading, v = (nxt[0] - v[0], nxt[1] - v[1]), nxt
            if v == start:
                break
            loop.append(v)
        pts = np.array(loop, dtype=float)
        if _signed_area(pts) < 0:
            return None  # a hole
        step = np.roll(pts, -1, 0) - pts
        corner = np.any(step != np.roll(step, 1, 0), axis=1)
        loops.append(pts[corner].reshape(-1).tolist())
    return loops or None


def _signed_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)) / 2


def polygon_area(polygon: list[float]) -> float:
    return abs(_signed_area(np.asarray(polygon, float).reshape(-1, 2)))


# --- backgrounds ------------------------------------------------------------------------------------
def _pale(rng: np.random.Generator) -> np.ndarray:
    """A light, low-saturation tone: far from every shape colour (each has a channel <= 70)."""
    level = rng.uniform(185, 240)
    return np.clip(level + rng.uniform(-14, 14, 3), 160, 250)


def draw_background(rng: np.random.Generator, style: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """((H, W, 3) float image, its base tone)."""
    a, b = _pale(rng), _pale(rng)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    along = (xx * np.cos(angle) + yy * np.sin(angle)) / max(height, width)
    if style == "plain":
        t = np.zeros_like(xx)
    elif style == "gradient":
        t = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
    elif style == "striped":
        period = rng.uniform(0.06, 0.16)
        t = (np.floor(along / period) % 2).astype(np.float32)
    elif style == "checkered":
        cell = rng.uniform(10, 28)
        t = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
    elif style == "cloudy":
        coarse = rng.uniform(0, 1, (int(rng.integers(3, 7)), int(rng.integers(3, 7)), 1)).astype(np.float32)
        t = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    else:
        raise ValueError(f"unknown background style {style!r}; known: {', '.join(BACKGROUND_STYLES)}")
    image = a.astype(np.float32) + (b - a).astype(np.float32) * t[..., None]
    if style != "plain":
        image += 3.0 * rng.standard_normal((height, width, 1), dtype=np.float32)
    return image, a


# --- placing shapes -------------------------------------------------------------------------------
def _pick_attributes(rng: np.random.Generator, spec: SceneSpec, drawn: list[tuple[str, str]]) -> tuple[str, str]:
    kinds, colors = list(spec.kinds), list(spec.colors)
    if spec.unique_attributes:
        kinds = [k for k in kinds if k not in {d[1] for d in drawn}]
        colors = [c for c in colors if c not in {d[0] for d in drawn}]
        return colors[int(rng.integers(len(colors)))], kinds[int(rng.integers(len(kinds)))]
    color, kind = colors[int(rng.integers(len(colors)))], kinds[int(rng.integers(len(kinds)))]
    if drawn and rng.random() < spec.repeat_probability:
        c0, k0 = drawn[int(rng.integers(len(drawn)))]
        which = rng.random()
        if which < 0.4:
            kind = k0
        elif which < 0.8:
            color = c0
        else:
            color, kind = c0, k0
    return color, kind


def _visible_masks(full: list[np.ndarray]) -> list[np.ndarray]:
    visible, above = [], np.zeros_like(full[0], dtype=bool)
    for m in reversed(full):
        visible.append((m.astype(bool) & ~above).astype(np.uint8))
        above |= m.astype(bool)
    return visible[::-1]


def _acceptable(full: list[np.ndarray], visible: list[np.ndarray], spec: SceneSpec) -> Optional[list]:
    """Per shape its COCO polygons, or None when a covered shape shows too little or not in one piece."""
    segs = []
    for f, v, covered in zip(full, visible, _covered_flags(full)):
        if not covered:
            segs.append(None)
            continue
        if v.sum() < spec.min_visible * f.sum():
            return None
        outlines = pixel_outlines(v)
        if outlines is None or max(polygon_area(p) for p in outlines) < 0.95 * v.sum():
            return None  # a hole, or split in pieces
        segs.append(outlines)
    return segs


def _covered_flags(full: list[np.ndarray]) -> list[bool]:
    flags = []
    for i, m in enumerate(full):
        above = np.zeros_like(m, dtype=bool)
        for n in full[i + 1:]:
            above |= n.astype(bool)
        flags.append(bool((m.astype(bool) & above).any()))
    return flags


def make_scene(rng: np.random.Generator, spec: SceneSpec = SceneSpec(), max_tries: int = 60) -> Scene:
    """One scene drawn from `rng` (everything about it comes from this generator)."""
    short = int(rng.integers(spec.min_side[0], spec.min_side[1] + 1))
    long = int(rng.integers(short, int(short * spec.max_aspect) + 1))
    height, width = (short, long) if rng.random() < 0.5 else (long, short)
    style = spec.backgrounds[int(rng.integers(len(spec.backgrounds)))]
    canvas, base = draw_background(rng, style, height, width)
    scene = Scene(height, width, style, background_rgb=tuple(int(round(v)) for v in base))
    x0, y0, side = scene.crop
    n = int(rng.integers(spec.min_shapes, spec.max_shapes + 1))
    polys, full, attrs, sizes = [], [], [], []
    for _ in range(n):
        color, kind = _pick_attributes(rng, spec, attrs)
        for _ in range(max_tries):
            size = SIZES[int(rng.integers(len(SIZES)))]
            lo, hi = SIZE_RANGE[size]
            extent = rng.uniform(lo, hi) * side
            margin = extent / 2 + 2
            cx = rng.uniform(x0 + margin, x0 + side - margin)
            cy = rng.uniform(y0 + margin, y0 + side - margin)
            angle = 0.0 if kind == "circle" else float(rng.uniform(-0.2, 0.2))
            poly = shape_polygon(kind, cx, cy, extent, angle, portrait=bool(rng.random() < 0.5))
            mask = polygon_mask([poly], height, width)
            if any((mask & m).any() for m in full) and not spec.allow_overlap:
                continue
            near = cv2.dilate(mask, np.ones((5, 5), np.uint8))
            if any(c == color and (near & m).any() for (c, _), m in zip(attrs, full)):
                continue  # same colour touching: the two would look like one shape
            trial = full + [mask]
            segs = _acceptable(trial, _visible_masks(trial), spec)
            if segs is None:
                continue
            polys.append(poly)
            full.append(mask)
            attrs.append((color, kind))
            sizes.append(size)
            break
    if len(full) < spec.min_shapes:
        raise RuntimeError(f"could not place {spec.min_shapes} shapes in a {width}x{height} image")
    visible = _visible_masks(full)
    segs = _acceptable(full, visible, spec)
    covered = _covered_flags(full)
    image = canvas
    for (color, kind), size, poly, v, seg, cov in zip(attrs, sizes, polys, visible, segs, covered):
        rgb = np.asarray(COLORS[color], float) + rng.integers(-spec.color_jitter, spec.color_jitter + 1, 3)
        image[v.astype(bool)] = rgb
        ys, xs = np.nonzero(v)
        scene.objects.append(SceneObject(kind, color, size, poly, v, seg or [poly],
                                         (float(xs.mean()), float(ys.mean())), cov))
    scene.image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return scene
