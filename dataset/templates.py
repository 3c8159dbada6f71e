"""Question and answer templates.

The lists below are this project's own, written in the spirit of SESAME's: a question asks whether
something is in the image, asks for its mask if it is, and otherwise asks the model to say so and
suggest what is there; positive answers hold exactly one [SEG]; denials say the object is absent;
corrections deny and name what is there instead (`{gt_name}`).

To train or evaluate with other lists (for instance the original's exact ones), write a JSON file
mapping list names to lists of strings and load it with `load_templates(path)`. Keys may be the
field names below or the original constant names (SHORT_QUESTION_TEMPLATE, ...). Lists that are
present replace ours; missing ones keep ours.

LISA's fixed evaluation prompts (what READ reports ReasonSeg with) are `LISA_EVAL`.
"""
from __future__ import annotations

import json
import string
from dataclasses import dataclass, fields, replace

from .shapes.scene import mask_bbox

SEG = "[SEG]"


@dataclass(frozen=True)
class Templates:
    short_question: tuple[str, ...]  # "{class_name}": a noun phrase (referring expression, class name)
    long_question: tuple[str, ...]  # "{sent}": a full sentence or instruction (ReasonSeg long queries)
    short_answer: tuple[str, ...]  # one [SEG]; may use {class_name} and {where} (see region_phrase)
    long_answer: tuple[str, ...]  # one [SEG]; no placeholders
    neg_answer: tuple[str, ...]  # a plain denial; may use {class_name}; no [SEG]
    correct_answer: tuple[str, ...]  # denial + correction; uses {gt_name}, may use {class_name}; no [SEG]

    def __post_init__(self) -> None:
        validate(self)


# Which placeholders each list may use / must use, and how many [SEG] each entry must hold.
_RULES = {
    "short_question": ({"class_name"}, {"class_name"}, 0),
    "long_question": ({"sent"}, {"sent"}, 0),
    "short_answer": ({"class_name", "where"}, set(), 1),
    "long_answer": (set(), set(), 1),
    "neg_answer": ({"class_name"}, set(), 0),
    "correct_answer": ({"class_name", "gt_name"}, {"gt_name"}, 0),
}
# The original's constant names, accepted as JSON keys.
ORIGINAL_KEYS = {
    "SHORT_QUESTION_TEMPLATE": "short_question", "LONG_QUESTION_TEMPLATE": "long_question",
    "SHORT_ANSWER_TEMPLATE": "short_answer", "LONG_ANSWER_TEMPLATE": "long_answer",
    "NEG_ANSWER_TEMPLATE": "neg_answer", "CORRECT_ANSWER_TEMPLATE": "correct_answer",
}
IGNORED_KEYS = {"EXPLANATORY_QUESTION_TEMPLATE", "explanatory_question"}  # defined by the original, never used


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def validate(t: Templates, source: str = "templates") -> None:
    for name, (allowed, required, n_seg) in _RULES.items():
        entries = getattr(t, name)
        if not entries:
            raise ValueError(f"{source}: list {name!r} is empty")
        for i, entry in enumerate(entries):
            where = f"{source}: {name}[{i}] {entry!r}"
            if not isinstance(entry, str):
                raise ValueError(f"{where}: not a string")
            try:
                found = _placeholders(entry)
            except ValueError as e:
                raise ValueError(f"{where}: bad format string ({e})") from None
            if found - allowed:
                raise ValueError(f"{where}: unknown placeholder(s) {sorted(found - allowed)}; "
                                 f"allowed {sorted(allowed)}")
            if required - found:
                raise ValueError(f"{where}: must contain {{{'}, {'.join(sorted(required - found))}}}")
            if entry.count(SEG) != n_seg:
                raise ValueError(f"{where}: must contain exactly {n_seg} {SEG}")
            if name.endswith("question") and "<image>" not in entry:
                raise ValueError(f"{where}: questions must contain <image> (e.g. start with '<image>\\n')")


def region_phrase(fx: float, fy: float) -> str:
    """Where a point lies in a 3 x 3 grid over the picture, in words: "in the top left corner", "on the
    left", "at the bottom", "in the centre". `fx`, `fy` are fractions of the width and height."""
    col = "left" if fx < 1 / 3 else "right" if fx > 2 / 3 else "middle"
    row = "top" if fy < 1 / 3 else "bottom" if fy > 2 / 3 else "middle"
    if row == col == "middle":
        return "in the centre"
    if row == "middle":
        return f"on the {col}"
    if col == "middle":
        return f"at the {row}"
    return f"in the {row} {col} corner"


def mask_region(mask) -> str:
    """`region_phrase` of a mask's bounding-box centre, within the centred square that CLIP's crop
    keeps (what the language model sees of the image)."""
    h, w = mask.shape[:2]
    if not mask.any():
        return "in the centre"
    side = min(h, w)
    x, y, bw, bh = mask_bbox(mask)
    return region_phrase((x + bw / 2 - (w - side) / 2) / side, (y + bh / 2 - (h - side) / 2) / side)


def positive_answer(rng, templates: "Templates", class_name: str, mask=None) -> str:
    """One short answer for an object that is there; `{where}` (when the drawn template has it) is
    filled from the object's mask, so a model trained on it says where the object is before [SEG].
    `mask`: the (H, W) mask, or a function giving it (read only when the template says where)."""
    template = templates.short_answer[int(rng.integers(len(templates.short_answer)))]  # sample.choice's draw
    if "{where}" not in template:
        return template.format(class_name=class_name)
    if callable(mask):
        mask = mask()
    if mask is None:
        raise ValueError(f"answer template {template!r} needs the object's mask for {{where}}, and none was given")
    return template.format(class_name=class_name, where=mask_region(mask))


def load_templates(path: str, base: "Templates | None" = None) -> Templates:
    """Templates from a JSON object of lists; lists it does not name are taken from `base` (ours)."""
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object mapping list names to lists of strings")
    known = {f.name for f in fields(Templates)}
    updates = {}
    for key, value in data.items():
        if key in IGNORED_KEYS:
            continue
        name = ORIGINAL_KEYS.get(key, key)
        if name not in known:
            raise ValueError(f"{path}: unknown template list {key!r}; known: "
                             f"{', '.join(sorted(known | set(ORIGINAL_KEYS)))}")
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{path}: {key!r} must be a list of strings")
        updates[name] = tuple(value)
    try:
        return replace(base or DEFAULT_TEMPLATES, **updates)  # validates
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def resolve_templates(templates: "Templates | str | None") -> Templates:
    """None -> ours; a path -> loaded from JSON; a Templates -> itself."""
    if templates is None:
        return DEFAULT_TEMPLATES
    if isinstance(templates, Templates):
        return templates
    return load_templates(str(templates))


DEFAULT_TEMPLATES = Templates(
    short_question=(
        "<image>\nIs there {class_name} in this image? If so, please segment it; if not, tell me so and suggest what might be meant instead.",
        "<image>\nCan you find {class_name} here? Give me its segmentation mask if it is present, otherwise say it is not there and mention what is.",
        "<image>\nPlease check whether {class_name} appears in the picture. Segment it if you see it; if you don't, explain that and point out a similar object.",
        "<image>\nDoes this image contain {class_name}? If yes, output its mask. If no, say that it is missing and, if you can, name what could be confused with it.",
        "<image>\nLook for {class_name} in this image. Segment it when it is there; when it is not, let me know and suggest the closest thing you can see.",
        "<image>\nI am looking for {class_name}. If it is in the image, please provide a segmentation mask; otherwise tell me it is absent and what is there instead.",
        "<image>\nWould you segment {class_name} for me, if it exists in this photo? If it does not exist, please say so and describe a likely alternative.",
        "<image>\nIs {class_name} visible in this image? Please respond with a segmentation mask if it is, or with a short correction if it is not.",
        "<image>\nFind {class_name} and segment it. If the image has no such thing, do not segment anything; say so and mention what you see instead.",
        "<image>\nCheck the image for {class_name}. Produce its mask if present; if absent, state that clearly and, where appropriate, name a similar object.",
        "<image>\nWhere is {class_name} in this image? If it cannot be found, please say that it is not in the image and suggest what else it could be.",
        "<image>\nCould you locate {class_name} in the picture and give its segmentation? If it isn't there, tell me, and say what is present instead.",
        "<image>\nSegment {class_name} if you can see it in this image. Otherwise, answer that it is not present and, if possible, name something resembling it.",
        "<image>\nPlease tell me whether {class_name} is in this image, with a segmentation mask if it is and a correction if it is not.",
        "<image>\nIs it true that this image shows {class_name}? If it does, segment it; if it doesn't, correct me and suggest what I might mean.",
        "<image>\nShow me the mask of {class_name}, if the image contains it. If it does not, say so and point to any object that could be mistaken for it.",
    ),
    long_question=(
        "<image>\n{sent} Please provide a segmentation mask for the answer if it is in the image.",
        "<image>\n{sent} If the answer is visible, segment it; if not, say so.",
        "<image>\n{sent} Respond with a segmentation mask of the relevant region when it is present.",
        "<image>\n{sent} Segment the region that answers this, or explain that it is not in the image.",
        "<image>\n{sent} Please output the segmentation mask if such a region exists.",
        "<image>\n{sent} Give me the mask of the part of the image this refers to, if there is one.",
        "<image>\n{sent} Mark the matching area with a segmentation mask, if it appears in the picture.",
        "<image>\n{sent} If you can find it in the image, please segment it.",
        "<image>\n{sent} Kindly answer with a segmentation mask when the described object is present.",
        "<image>\n{sent} Outline the relevant object with a mask, or tell me it is not there.",
    ),
    short_answer=(
        "Sure, here is {class_name}: [SEG].",
        "Yes, {class_name} is in the image: [SEG].",
        "I found {class_name}: [SEG].",
        "{class_name} is present, segmented here: [SEG].",
        "Here is the mask of {class_name}: [SEG].",
        "Yes, I can see {class_name}. [SEG].",
        "The segmentation of {class_name} is [SEG].",
        "{class_name} is right here: [SEG].",
        "Certainly, {class_name} appears in the image: [SEG].",
        "Yes, it is there: [SEG].",
        "Found it: [SEG].",
        "Here it is: [SEG].",
        "Sure, [SEG].",
        "It is [SEG].",
        "Sure, the segmentation result is [SEG].",
        "[SEG].",
    ),
    long_answer=(
        "Sure, the segmentation result is [SEG].",
        "Here is the segmentation: [SEG].",
        "The relevant region is [SEG].",
        "I found it: [SEG].",
        "Yes, it is in the image: [SEG].",
        "This is the area you are asking about: [SEG].",
        "Sure, [SEG].",
        "It is [SEG].",
        "Sure, it is [SEG].",
        "[SEG].",
    ),
    neg_answer=(
        "There is no {class_name} in this image.",
        "I cannot find {class_name} in the picture.",
        "No, {class_name} is not present here.",
        "The image does not contain {class_name}.",
        "Sorry, {class_name} does not appear in this image.",
        "{class_name} is not in the image, so there is nothing to segment.",
        "I don't see {class_name} anywhere in this image.",
        "No such object is visible here.",
        "That is not in this image.",
        "There is nothing like that in the picture.",
        "No, I cannot see it in this image.",
        "It does not appear in this image.",
    ),
    correct_answer=(
        "There is no {class_name} in this image, but there is {gt_name}.",
        "I cannot find {class_name}; perhaps you mean {gt_name}?",
        "No, {class_name} is not present. The image does show {gt_name}, though.",
        "The image does not contain {class_name}, but it does contain {gt_name}.",
        "Sorry, {class_name} is not here. Did you mean {gt_name}?",
        "{class_name} does not appear in this image; what I can see is {gt_name}.",
        "I don't see {class_name}, but {gt_name} is in the picture.",
        "There is no such object here. You might be thinking of {gt_name}.",
        "That is not in this image, although {gt_name} is.",
        "No, but there is {gt_name} in the image.",
        "It isn't in the picture; the closest match is {gt_name}.",
        "Not present. The image shows {gt_name} instead.",
    ),
)


@dataclass(frozen=True)
class FixedEvalPrompts:
    """LISA's fixed prompts (READ evaluates ReasonSeg with them)."""
    short_question: str = "<image>\nWhat is {class_name} in this image? Please output segmentation mask."
    long_question: str = "<image>\n{sent} Please output segmentation mask."
    answer: str = "Sure, the segmentation result is [SEG]."


LISA_EVAL = FixedEvalPrompts()
