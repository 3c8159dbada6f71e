"""What is said about a scene: referring expressions, false premises and VQA conversations.

An expression is structured (`Expression`) and its text is rendered from the structure, so that
whether it names exactly one object is decided on the structure (`Expression.resolve`), never
guessed from words:
    attribute  "red circle", "circle", "red shape"
    size       "small blue square", "big star"
    relation   "triangle left of green circle"   (left of / right of / above / below)
    order      "second square from the left"     (from the left / right / top / bottom)
Positions are the centroids of the visible pixels, in units of the side of the square CLIP sees.
A relation or an order holds only with a clear margin; a candidate inside the dead zone makes the
expression ambiguous, and it is not used.

A false premise names a colour-kind pair that is absent from the image and whose nearest present
object is unique: "green star" when the only star is blue (same kind, another colour), or "blue
triangle" when the only blue object is a star and there is no triangle (same colour, another kind).
Its `gt_sent` names that object ("blue star"); an object of the named kind, when there is one, is
the nearest. With `bind` the other colour may be one another object has ("green star" beside a green
circle): colour and kind are then each in the picture, on different objects, and only binding them
tells that the pair is not (without it, "is this colour anywhere?" answers every false premise).
Like FP-RefCOCO's replaced words, the absent pair can sit inside any form of expression: plain, or
in a relation or an order the present object takes part in ("green star left of red circle").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..templates import region_phrase
from .scene import COLORS, KINDS, Scene, SceneObject, centre_crop

RELATIONS = ("left of", "right of", "above", "below")
DIRECTIONS = ("left", "right", "top", "bottom")
EXPRESSION_TYPES = ("attribute", "size", "order", "relation")  # plainest first
ORDINALS = ("first", "second", "third", "fourth", "fifth")
NUMBERS = ("no", "one", "two", "three", "four", "five")
RELATION_MARGIN = 0.1  # a relation holds beyond this offset, and clearly fails below zero
ORDER_GAP = 0.08  # neighbours in an order are at least this far apart
PLURALS = {k: k + "s" for k in KINDS}


@dataclass(frozen=True)
class Description:
    """A set of objects by attributes: any of kind, colour, size (None = any)."""

    kind: Optional[str] = None
    color: Optional[str] = None
    size: Optional[str] = None

    def fits(self, obj: SceneObject) -> bool:
        return ((self.kind is None or obj.kind == self.kind) and (self.color is None or obj.color == self.color)
                and (self.size is None or obj.size == self.size))

    def text(self) -> str:
        return " ".join(w for w in (self.size, self.color, self.kind or "shape") if w)


@dataclass(frozen=True)
class Expression:
    target: Description
    relation: Optional[tuple[str, Description]] = None  # (relation, anchor)
    order: Optional[tuple[int, str]] = None  # (0-based position, direction)

    @property
    def kind(self) -> str:
        return "relation" if self.relation else "order" if self.order else "size" if self.target.size else "attribute"

    def text(self) -> str:
        if self.relation:
            return f"{self.target.text()} {self.relation[0]} {self.relation[1].text()}"
        if self.order:
            return f"{ORDINALS[self.order[0]]} {self.target.text()} from the {self.order[1]}"
        return self.target.text()

    def resolve(self, objects: Sequence[SceneObject], side: float) -> Optional[list[int]]:
        """Indices of the objects this expression names; None when some object sits in a dead zone."""
        cands = [i for i, o in enumerate(objects) if self.target.fits(o)]
        if self.relation:
            rel, anchor_desc = self.relation
            anchors = [i for i, o in enumerate(objects) if anchor_desc.fits(o)]
            if len(anchors) != 1:
                return None
            a = objects[anchors[0]]
            hits = []
            for i in cands:
                if i == anchors[0]:
                    continue
                d = _offset(rel, objects[i], a) / side
                if d >= RELATION_MARGIN:
                    hits.append(i)
                elif d > 0:
                    return None
            return hits
        if self.order:
            k, direction = self.order
            ranked = sorted(cands, key=lambda i: _coordinate(direction, objects[i]))
            coords = [_coordinate(direction, objects[i]) / side for i in ranked]
            if any(b - a < ORDER_GAP for a, b in zip(coords, coords[1:])):
                return None
            return [ranked[k]] if k < len(ranked) else []
        return cands


def _offset(relation: str, obj: SceneObject, anchor: SceneObject) -> float:
    """How far `obj` lies in the relation's direction from `anchor` (pixels; positive = holds)."""
    (x, y), (ax, ay) = obj.center, anchor.center
    return {"left of": ax - x, "right of": x - ax, "above": ay - y, "below": y - ay}[relation]


def _coordinate(direction: str, obj: SceneObject) -> float:
    """Position counted from `direction`: the first object from the left has the smallest."""
    x, y = obj.center
    return {"left": x, "right": -x, "top": y, "bottom": -y}[direction]


def names_one(expr: Expression, scene: Scene, index: int) -> bool:
    return expr.resolve(scene.objects, scene.crop[2]) == [index]


# --- expressions for one object --------------------------------------------------------------
def candidate_expressions(scene: Scene, index: int,
                          directions: Sequence[str] = DIRECTIONS) -> dict[str, list[Expression]]:
    """Every expression of each type that names object `index` and nothing else (orders counted from
    `directions` only)."""
    o = scene.objects[index]
    attribute = [Description(o.kind, o.color), Description(o.kind), Description(color=o.color)]
    sized = [Description(o.kind, o.color, o.size), Description(o.kind, size=o.size),
             Description(color=o.color, size=o.size)]
    unique_others = []
    for j, a in enumerate(scene.objects):
        if j != index:
            unique_others += [d for d in (Description(a.kind, a.color), Description(a.kind))
                              if Expression(d).resolve(scene.objects, 1.0) == [j]]
    relations = [Expression(t, (rel, anchor)) for t in attribute[:2] for anchor in unique_others for rel in RELATIONS]
    orders = [Expression(t, order=(k, d)) for t in attribute for d in directions for k in range(len(scene.objects))]
    found: dict[str, list[Expression]] = {}
    for expr in [Expression(d) for d in attribute + sized] + relations + orders:
        if names_one(expr, scene, index):
            found.setdefault(expr.kind, []).append(expr)
    if "order" in found:  # an order is only said of groups of two or more
        found["order"] = [e for e in found["order"] if len(Expression(e.target).resolve(scene.objects, 1.0)) >= 2]
        if not found["order"]:
            del found["order"]
    return found


def pick_expressions(rng: np.random.Generator, found: dict[str, list[Expression]], count: int,
                     favoured: Sequence[str] = ()) -> list[Expression]:
    """Up to `count` expressions of different types (random types, a random one of each); the
    `favoured` types come first wherever the object has them."""
    types = sorted(found)
    chosen = [types[int(i)] for i in rng.permutation(len(types))]
    chosen = ([t for t in favoured if t in found] + [t for t in chosen if t not in favoured])[:count]
    return [found[t][int(rng.integers(len(found[t])))] for t in chosen]


def shortest_name(scene: Scene, index: int) -> Optional[Expression]:
    """The plainest expression naming object `index` (what a correction suggests)."""
    found = candidate_expressions(scene, index)
    for kind in EXPRESSION_TYPES:
        if found.get(kind):
            return found[kind][0]
    return None


@dataclass(frozen=True)
class FalsePremise:
    expression: Expression  # names nothing in the image
    gt_sent: str  # names the nearest present object


def false_premises(rng: np.random.Generator, scene: Scene, index: int, colors: Sequence[str] = tuple(COLORS),
                   kinds: Sequence[str] = KINDS, forms: Optional[dict[str, list[Expression]]] = None,
                   bind: bool = False) -> list[FalsePremise]:
    """The false premises whose nearest present object is exactly object `index` (at most one of
    each kind: another colour, another shape), in random order.

    `forms`: the object's own relation / order expressions (`candidate_expressions`, by type) whose
    form a false premise may take. Each is then said in a form drawn as the positives' types are
    (`pick_expressions`): plainly ("green star", sometimes with a size), or inside one of those
    ("green star left of red circle", "first green star from the left"), so that no form of
    expression is always true. Without forms every false premise is plain, with the random draws of
    plain ones only. `bind`: the other colour may be another object's (see the module's text)."""
    objs = scene.objects
    o = objs[index]
    present_colors, present_kinds = {x.color for x in objs}, {x.kind for x in objs}
    gt = Description(o.kind, o.color).text()
    size = o.size if rng.random() < 0.3 else None
    absent = []
    if sum(x.kind == o.kind for x in objs) == 1:
        others = [c for c in colors if c != o.color and (bind or c not in present_colors)]
        if others:
            absent.append(Description(o.kind, others[int(rng.integers(len(others)))]))
    if sum(x.color == o.color for x in objs) == 1:
        others = [k for k in kinds if k not in present_kinds]
        if others:
            absent.append(Description(others[int(rng.integers(len(others)))], o.color))
    if not absent:
        return []
    out = []
    for target in absent:
        form = pick_expressions(rng, {"plain": [Expression(target)], **forms}, 1)[0] if forms else Expression(target)
        if form.relation or form.order:
            out.append(FalsePremise(Expression(target, form.relation, form.order), gt))
        else:
            out.append(FalsePremise(Expression(Description(target.kind, target.color, size)), gt))
    return [out[int(i)] for i in rng.permutation(len(out))]


# --- VQA -------------------------------------------------------------------------------------
def _count_phrase(n: int, noun: str, plural: str) -> str:
    if n == 0:
        return f"There are no {plural}."
    if n == 1:
        return f"There is one {noun}."
    return f"There are {NUMBERS[n]} {plural}."


def region_of(center: tuple[float, float], width: int, height: int) -> str:
    """`region_phrase` of a point within the centred square CLIP sees of a width x height picture:
    the answer to "Where is the ...?"."""
    x0, y0, side = centre_crop(width, height)
    return region_phrase((center[0] - x0) / side, (center[1] - y0) / side)


def where_question(obj, width: int, height: int) -> tuple[str, str]:
    """"Where is the red square?" and its answer, for an object its colour and kind name alone."""
    return f"Where is the {obj.color} {obj.kind}?", f"It is {region_of(obj.center, width, height)}."


def where_questions(scene) -> list[tuple[str, str]]:
    """`where_question` for each object of `scene` that its colour and kind name alone, in scene order."""
    objs = scene.objects
    return [where_question(o, scene.width, scene.height) for i, o in enumerate(objs)
            if Expression(Description(o.kind, o.color)).resolve(objs, 1.0) == [i]]


def _listing(objects: Sequence[SceneObject]) -> str:
    names = [f"a {o.size} {o.color} {o.kind}" for o in objects]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def vqa_rounds(rng: np.random.Generator, scene: Scene, colors: Sequence[str] = tuple(COLORS),
               kinds: Sequence[str] = KINDS) -> list[tuple[str, str]]:
    """Question-answer pairs about the scene, every answer true; shuffled."""
    objs = scene.objects
    colour_word = "colour" if rng.random() < 0.5 else "color"
    n = len(objs)
    qa = [(["How many shapes are there?", "How many shapes are in this image?", "How many objects can you see?"]
           [int(rng.integers(3))], _count_phrase(n, "shape", "shapes")),
          ("Describe the image.", f"The image shows {_listing(objs)} on a {scene.background} background.")]
    kind = kinds[int(rng.integers(len(kinds)))]
    qa.append((f"How many {PLURALS[kind]} are there?", _count_phrase(sum(o.kind == kind for o in objs), kind,
                                                                     PLURALS[kind])))
    color = colors[int(rng.integers(len(colors)))]
    qa.append((f"How many {color} shapes are there?",
               _count_phrase(sum(o.color == color for o in objs), f"{color} shape", f"{color} shapes")))
    for i, o in enumerate(objs):
        if Expression(Description(o.kind)).resolve(objs, 1.0) == [i]:
            qa.append((f"What {colour_word} is the {o.kind}?", f"The {o.kind} is {o.color}."))
        if Expression(Description(color=o.color)).resolve(objs, 1.0) == [i]:
            qa.append((f"What shape is the {o.color} one?", f"It is a {o.kind}."))
        if Expression(Description(o.kind, o.color)).resolve(objs, 1.0) == [i]:
            qa.append(where_question(o, scene.width, scene.height))
            qa.append((f"Is the {o.name} big or small?", f"It is {o.size}."))
    c, k = colors[int(rng.integers(len(colors)))], kinds[int(rng.integers(len(kinds)))]
    there = any(o.color == c and o.kind == k for o in objs)
    qa.append((f"Is there a {c} {k} in the image?",
               f"Yes, there is a {c} {k}." if there else f"No, there is no {c} {k}."))
    return [qa[int(i)] for i in rng.permutation(len(qa))]


def order_questions(scene: Scene, colour_word: str = "colour",
                    directions: Sequence[str] = DIRECTIONS) -> list[tuple[str, str]]:
    """Questions whose answer turns on an order's ordinal and direction ("What is the second shape from
    the left?"), one for each order that names a single object among all shapes, or among two or more of
    one kind. In the language loss, a model that ignores the direction word answers half of them wrongly."""
    objs, side = scene.objects, scene.crop[2]
    qa = []
    for direction in directions:
        for k, ordinal in enumerate(ORDINALS):
            hit = Expression(Description(), order=(k, direction)).resolve(objs, side)
            if hit and len(hit) == 1 and len(objs) >= 2:
                o = objs[hit[0]]
                qa.append((f"What is the {ordinal} shape from the {direction}?",
                           f"It is a {o.size} {o.color} {o.kind}."))
            for kind in sorted({o.kind for o in objs}):
                if sum(o.kind == kind for o in objs) < 2:
                    continue
                hit = Expression(Description(kind), order=(k, direction)).resolve(objs, side)
                if hit and len(hit) == 1:
                    qa.append((f"What {colour_word} is the {ordinal} {kind} from the {direction}?",
                               f"It is {objs[hit[0]].color}."))
    return qa


def position_conversations(rng: np.random.Generator, scene, rounds: int = 4,
                           directions: Sequence[str] = DIRECTIONS) -> list[list[dict]]:
    """Every question of a picture whose answer is a place or turns on one: "Where is the red square?"
    for each object its colour and kind name alone, and all its `order_questions`; shuffled, `rounds` to
    a conversation, `<image>` after the first question. `scene` needs only objects (kind, colour, size,
    centre), width, height and crop, so a manifest entry will do (`world.manifest_scene`)."""
    qa = where_questions(scene) + order_questions(scene, "colour" if rng.random() < 0.5 else "color", directions)
    qa = [qa[int(i)] for i in rng.permutation(len(qa))]
    conversations = []
    for start in range(0, len(qa), rounds):
        turns = []
        for k, (q, a) in enumerate(qa[start:start + rounds]):
            turns += [{"from": "human", "value": q + "\n<image>" if k == 0 else q}, {"from": "gpt", "value": a}]
        conversations.append(turns)
    return conversations


def vqa_conversation(rng: np.random.Generator, scene: Scene, rounds: int, colors: Sequence[str] = tuple(COLORS),
                     kinds: Sequence[str] = KINDS, order_rounds: int = 0,
                     directions: Sequence[str] = DIRECTIONS) -> list[dict]:
    """LLaVA-Instruct turns: `rounds` question-answer pairs, `<image>` in the first question; with
    `order_rounds`, that many of them (where the scene has them) are `order_questions`, asked first."""
    turns = []
    qa = vqa_rounds(rng, scene, colors, kinds)
    if order_rounds:
        ordered = order_questions(scene, "colour" if rng.random() < 0.5 else "color", directions)
        ordered = [ordered[int(i)] for i in rng.permutation(len(ordered))[:order_rounds]]
        qa = ordered + qa
    for k, (q, a) in enumerate(qa[:rounds]):
        if k == 0:
            q = "<image>\n" + q if rng.random() < 0.5 else q + "\n<image>"
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return turns

