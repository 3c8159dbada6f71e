"""One typed question about one image file, the way the demo answers it: the image loaded (EXIF,
odd formats, huge files downscaled), the predictor asked, masks saved at the image file's size, an
overlay, the answer text and a result.json written into a new folder per query. `ask_image` is the
part without files, which the web demo shares."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from model.predictor import Answer, SesamePredictor, check_typed_question
from utils.image_io import LoadedImage, load_image
from utils.mask_io import resize_masks
from utils.text import clean_source
from utils.visualize import new_query_dir, write_query_outputs
from utils.visualize_sasp import save_sasp_pngs


@dataclass
class QuerySettings:
    vis_save_dir: str = "./demo_directory"
    max_image_pixels: int = 50_000_000  # larger images are downscaled for the model
    visualize: bool = False  # READ: also save the similarity map and the chosen points


@dataclass
class QueryResult:
    image: str
    question: str
    see: bool
    say: str  # answer text without the [SEG] marker
    raw_answer: str  # decoded answer as generated, [SEG] included
    num_seg: int
    mask_pixels: int  # positive pixels of the first mask (0 when no [SEG])
    image_size: tuple[int, int]  # (H, W) of the image file: the size the masks are saved at
    output_dir: str
    mask_path: str
    overlay_path: str
    answer_path: str
    extra_mask_paths: list[str] = field(default_factory=list)
    sasp_paths: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class ImageAnswer:
    """A typed question answered about an image file (the demo's and the web demo's common path)."""

    image: LoadedImage  # image.rgb: what the model saw, downscaled when the file is over max_image_pixels
    answer: Answer
    masks: np.ndarray  # (n_seg, h, w) bool at image.rgb's size
    file_masks: np.ndarray  # (n_seg, H, W) bool at the file's own size, image.original_size

    def downscale_note(self, max_image_pixels: int) -> str:
        """'' when the model saw the file at its own size."""
        if not self.image.downscaled:
            return ""
        (height, width), (h, w) = self.image.original_size, self.image.rgb.shape[:2]
        return (f"image downscaled from {width}x{height} to {w}x{h} for the model "
                f"(--max_image_pixels {max_image_pixels})")


def ask_image(predictor: SesamePredictor, image_source: str, question: str, max_image_pixels: int) -> ImageAnswer:
    """Check the question, load the image, answer. Raises PromptError / ImageLoadError on bad input."""
    question = check_typed_question(question)
    image = load_image(image_source, max_pixels=max_image_pixels)
    answer = predictor.ask(image.rgb, question)
    masks = answer.masks.numpy().astype(bool)
    file_masks = resize_masks(masks, image.original_size) if image.downscaled else masks
    return ImageAnswer(image=image, answer=answer, masks=masks, file_masks=file_masks)


def run_query(predictor: SesamePredictor, settings: QuerySettings, image_source: str, question: str) -> QueryResult:
    """Load the image, answer, write the files. Raises PromptError / ImageLoadError on bad input."""
    start = time.perf_counter()
    image_source = clean_source(image_source)
    answered = ask_image(predictor, image_source, question, settings.max_image_pixels)
    image, answer, masks, saved = answered.image, answered.answer, answered.masks, answered.file_masks
    question = answer.question  # stripped
    notes = []
    if image.downscaled:
        notes.append(answered.downscale_note(settings.max_image_pixels)
                     + "; masks are saved at the original size, the overlay at the smaller")
    directory = new_query_dir(settings.vis_save_dir, image_source, question)
    files = write_query_outputs(directory, image.rgb, masks, answer.say, saved_masks=saved)
    sasp_paths = []
    if settings.visualize and predictor.model.config.sasp is None:
        notes.append("--visualize: this model does not use SasP points; nothing extra to draw")
    elif settings.visualize and answer.sasp is None:
        notes.append("--visualize: no [SEG] was generated, so there is no similarity map to draw")
    elif settings.visualize:
        sasp_paths = save_sasp_pngs(directory, image.rgb, answer.sasp, answer.masks.numpy())
    result = QueryResult(image=image_source, question=question, see=answer.see, say=answer.say,
                         raw_answer=answer.text, num_seg=answer.num_seg,
                         mask_pixels=int(saved[0].sum()) if saved.shape[0] else 0,
                         image_size=tuple(image.original_size),
                         output_dir=directory, mask_path=files.mask, overlay_path=files.overlay,
                         answer_path=files.answer, extra_mask_paths=files.extra_masks, sasp_paths=sasp_paths,
                         notes=notes, seconds=round(time.perf_counter() - start, 3))
    with open(os.path.join(directory, "result.json"), "w", encoding="utf-8") as f:
        json.dump(asdict(result), f, indent=2)
    return result
