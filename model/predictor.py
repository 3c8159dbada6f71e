"""The one inference API: images and questions in; answers, See and masks out.

    predictor = SesamePredictor(loaded)              # loaded = model.builder.load_pretrained(...)
    answer = predictor.ask(image_rgb, "Is there a red square? If so, segment it.")
    answer.see, answer.say, answer.masks             # See, Say, Segment (masks at the image's size)
    answers = predictor.ask_many([(image_rgb, [question, ...]), ...])

Prompt building (`prompt_ids`), preprocessing (`prepare`), decoding of answers (`answer_of`) and the
See rule (`model.sesame.sees_object`) exist here and nowhere else: the demo, the web demo, training
validation and the evaluation runner all go through this class.

How the answers are computed is the backend's business. `ReferenceBackend` runs
`SesameModel.predict` image by image (the readable reference); `engine.build_predictor` plugs in the
batched engine of `engine/`, which gives the same outputs faster. A backend takes `ImageWork`s, the
images with their prompts as token ids, and returns `QueryPrediction`s.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Protocol, Sequence

import numpy as np
import torch

from utils.errors import InputError

from .conversation import IMAGE_TOKEN, build_prompt, tokenize_with_image
from .sasp import SasPResult
from .sesame import QueryPrediction, SesameModel
from .tokenizer import SEG_TOKEN
from .transforms import ClipTransform, SamTransform, normalize_and_pad

# (step, logits (R, V) float32, query (R,) long: each row's position in the run's flat query order,
# -1 for an empty row) -> logits. Tests and benchmarks force tokens with it.
RowLogitsHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class PromptError(InputError, ValueError):
    """A question that cannot be asked (empty, too long, ...); the message is one line."""


def check_typed_question(text: str) -> str:
    """A question typed by a person (demo, web demo), stripped. The image is placed by the prompt, so
    `<image>` may not be typed; undecodable bytes (kept as surrogates by a terminal reader) are refused."""
    text = text.strip()
    if not text:
        raise PromptError("empty question: type what to look for")
    if any("\ud800" <= c <= "\udfff" for c in text):
        raise PromptError("the question is not valid text in this terminal's encoding; type it again")
    if IMAGE_TOKEN in text:
        raise PromptError(f"the question must not contain {IMAGE_TOKEN!r}: the image is placed by the prompt")
    return text


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # page-locked host memory (the loader pins on CUDA runs) copies without blocking this thread
    return t.to(device, non_blocking=t.is_pinned())


@dataclass(frozen=True)
class RawImage:
    """A decoded image whose encoder inputs are made where the backend runs: on a GPU the two Pillow
    resizes cost nothing there, while on the host they take the loader threads ~15 ms per image and
    hold the GIL the engine's thread needs (model/pil_resize.py; the same bytes either way)."""

    rgb: torch.Tensor  # uint8 (H, W, 3), on the host (page-locked for a GPU run)
    clip: ClipTransform
    sam: SamTransform

    def encoder_inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rgb = _to_device(self.rgb, device)
        return self.clip.on_tensor(rgb), self.sam.resized_tensor(rgb).pixels


@dataclass
class ImageWork:
    """One image and the prompts asked about it: what a backend runs."""

    clip_pixels: Optional[torch.Tensor]  # (3, s, s) from ClipTransform; None when `raw` is given
    sam_pixels: Optional[torch.Tensor]  # (3, S, S) from SamTransform, or uint8 (h, w, 3) from SamTransform.resized
    resized_size: tuple[int, int]
    original_size: tuple[int, int]
    prompts: list[list[int]]  # token ids with exactly one IMAGE_TOKEN_INDEX each
    raw: Optional[RawImage] = None  # the pixels still to be preprocessed, where the backend runs

    def encoder_inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLIP pixels (3, s, s) float32, SAM input: uint8 (h, w, 3) resized or float32 (3, S, S)
        finished) on `device`; page-locked host tensors are copied without blocking."""
        if self.raw is not None:
            return self.raw.encoder_inputs(device)
        return _to_device(self.clip_pixels, device), _to_device(self.sam_pixels, device)


class Backend(Protocol):
    # how much work one `run` should get: about this many queries, at most this many images
    queries_per_batch: int
    max_images_per_batch: int

    def run(self, images: Iterable[ImageWork], max_new_tokens: int) -> list[list[QueryPrediction]]:
        """Greedy answers for every prompt of every image, in input order."""

    def on_out_of_memory(self) -> bool:
        """A run ran out of GPU memory: free what can be freed and take less work per run from now on.
        False when there is nothing smaller to try."""


class ReferenceBackend:
    """`SesameModel.predict`, one call per image (all of its prompts as one left-padded batch)."""

    queries_per_batch = 1  # an image at a time: larger runs would gain nothing
    max_images_per_batch = 1

    def __init__(self, model: SesameModel, logits_hook: Optional[RowLogitsHook] = None):
        self.model, self.logits_hook = model, logits_hook

    def on_out_of_memory(self) -> bool:
        return False  # one image per run already

    def run(self, images: Iterable[ImageWork], max_new_tokens: int) -> list[list[QueryPrediction]]:
        out, first = [], 0
        for work in images:
            clip, sam = work.encoder_inputs(self.model.device)
            if sam.dtype == torch.uint8:
                sam = normalize_and_pad(sam, self.model.config.sam.image_size)
            hook = None
            if self.logits_hook is not None:
                rows = torch.arange(first, first + len(work.prompts))
                hook = (lambda r: lambda step, logits: self.logits_hook(step, logits, r.to(logits.device)))(rows)
            out.append(self.model.predict(clip[None], sam[None], [work.resized_size], [work.original_size],
                                          work.prompts, [0] * len(work.prompts), max_new_tokens=max_new_tokens,
                                          logits_hook=hook))
            first += len(work.prompts)
        return out


def say_text(raw_answer: str) -> str:
    """'Sure, it is [SEG] .' -> 'Sure, it is.': the [SEG] marker and the space around it go."""
    marker = re.escape(SEG_TOKEN)
    text = re.sub(r"\s*" + marker + r"\s*(?=[.,;:!?])", "", raw_answer)
    text = re.sub(r"\s*" + marker, "", text)
    return re.sub(r"(?<=\S) {2,}(?=\S)", " ", text).strip()  # no double space where a marker went


@dataclass
class Answer:
    """One answered question: See, Say, Segment."""

    question: str
    text: str  # the decoded answer, [SEG] markers included (they are not special tokens)
    see: bool  # the object is there: a [SEG] was generated and its mask is not empty
    masks: torch.Tensor  # (n_seg, H, W) bool, one per [SEG], at the image's size
    output_ids: list[int] = field(repr=False)
    seg_hidden: torch.Tensor = field(repr=False)  # (n_seg, hidden) states that predicted each [SEG]
    sasp: Optional[SasPResult] = field(default=None, repr=False)  # READ: similarity maps and points (CPU)

    @property
    def say(self) -> str:
        """The answer without the [SEG] marker."""
        return say_text(self.text)

    @property
    def num_seg(self) -> int:
        return int(self.masks.shape[0])


class SesamePredictor:
    """A loaded model with its tokenizer and transforms: images and questions -> answers.

    loaded: `model.builder.LoadedSesame` (model, tokenizer, clip_transform, sam_transform).
    conv_type: the system prompt, "vicuna_v1" (what the original evaluation and demo used) or
        "llava_v1" (what training used).
    max_new_tokens: longest answer, in tokens.
    max_text_tokens: longest prompt text (image positions not counted); None: the model's context.
    backend: how answers are computed; `ReferenceBackend(model)` by default.
    """

    def __init__(self, loaded, *, conv_type: str = "vicuna_v1", max_new_tokens: int = 512,
                 max_text_tokens: Optional[int] = None, backend: Optional[Backend] = None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model: SesameModel = loaded.model
        self.tokenizer = loaded.tokenizer
        self.clip_transform, self.sam_transform = loaded.clip_transform, loaded.sam_transform
        self.conv_type, self.max_new_tokens, self.max_text_tokens = conv_type, max_new_tokens, max_text_tokens
        self.backend = backend if backend is not None else ReferenceBackend(self.model)
        build_prompt("", template=conv_type)  # an unknown template fails here, not at the first question

    # --- the parts ---------------------------------------------------------------------------
    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the one-turn prompt for `question`, ending in "ASSISTANT:". The user turn is
        `question` as it is when it holds `<image>` once (evaluation templates place it), else
        "<image>\n" + question. Raises PromptError for a question that cannot be asked."""
        turn = question.strip()
        if not turn:
            raise PromptError("empty question")
        count = turn.count(IMAGE_TOKEN)
        if count > 1:
            raise PromptError(f"the question holds {IMAGE_TOKEN!r} {count} times; a prompt has one image")
        cfg = self.model.config
        text = build_prompt(turn if count else IMAGE_TOKEN + "\n" + turn, template=self.conv_type,
                            use_mm_start_end=cfg.use_mm_start_end)
        ids = tokenize_with_image(text, self.tokenizer)
        text_tokens = len(ids) - 1
        if self.max_text_tokens is not None and text_tokens > self.max_text_tokens:
            raise PromptError(f"question too long: the prompt has {text_tokens} text tokens, the limit is "
                              f"{self.max_text_tokens}")
        context = cfg.llm.max_position_embeddings
        if text_tokens + cfg.vision.num_patches >= context:
            raise PromptError(f"question too long: {text_tokens + cfg.vision.num_patches} positions with the image, "
                              f"the model's context is {context}")
        return ids

    def prepare(self, image_rgb: np.ndarray, prompts: list[list[int]], *, resize_only: bool = False,
                defer: bool = False) -> ImageWork:
        """Both encoders' inputs of one uint8 (H, W, 3) RGB image. `resize_only`: SAM's input is left
        resized, not normalised or padded (uint8, a quarter of the bytes; the engine finishes it on the
        GPU). `defer`: nothing is computed here; the backend preprocesses the pixels where it runs (for
        a GPU model: the resizes leave the host, see RawImage)."""
        if defer:
            height, width = image_rgb.shape[:2]
            rgb = torch.from_numpy(np.ascontiguousarray(image_rgb))
            return ImageWork(None, None, self.sam_transform.resized_size(height, width), (int(height), int(width)),
                             prompts, raw=RawImage(rgb, self.clip_transform, self.sam_transform))
        sam = self.sam_transform.resized(image_rgb) if resize_only else self.sam_transform(image_rgb)
        return ImageWork(self.clip_transform(image_rgb), sam.pixels, sam.resized_size, sam.original_size, prompts)

    def run(self, images: Iterable[ImageWork]) -> list[list[QueryPrediction]]:
        """The backend's predictions for prepared images (a lazy iterable is fine: the engine starts
        encoding the first images while later ones are still being prepared)."""
        return self.backend.run(images, self.max_new_tokens)

    def answer_of(self, question: str, prediction: QueryPrediction) -> Answer:
        eos = self.model.config.llm.eos_token_id
        text = self.tokenizer.decode([t for t in prediction.output_ids if t != eos], skip_special_tokens=True).strip()
        return Answer(question=question, text=text, see=prediction.exists, masks=prediction.masks,
                      output_ids=prediction.output_ids, seg_hidden=prediction.seg_hidden, sasp=prediction.sasp)

    # --- the whole way ---------------------------------------------------------------------
    def ask_many(self, items: Iterable[tuple[np.ndarray, Sequence[str]]]) -> list[list[Answer]]:
        """Answers to several questions about several images (each image encoded once)."""
        items = [(image, list(questions)) for image, questions in items]
        # SAM's input resized only: the backend normalises and pads it where the model runs (on the GPU
        # for the engine: a quarter of the bytes to copy and ~10 ms less host work per image)
        on_gpu = self.model.device.type == "cuda"  # there the resizes run too (RawImage)
        works = [self.prepare(image, [self.prompt_ids(q) for q in questions], resize_only=True, defer=on_gpu)
                 for image, questions in items]
        predictions = self.run(works)
        return [[self.answer_of(q, p) for q, p in zip(questions, preds)]
                for (_, questions), preds in zip(items, predictions)]

    def ask(self, image_rgb: np.ndarray, question: str) -> Answer:
        """One question about one uint8 (H, W, 3) RGB image."""
        return self.ask_many([(image_rgb, [question])])[0][0]
