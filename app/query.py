"""One typed question about one image file, the way the demo answers it: the image loaded (EXIF,
odd formats, huge files downscaled), the predictor asked, masks saved at the image file's size, an
overlay, the answer text and a result.json written into a new folder per query."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

from model.predictor import SesamePredictor, check_typed_question
from utils.image_io import load_image
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


def run_query(predictor: SesamePredictor, settings: QuerySettings, image_source: str, question: str) -> QueryResult:
    """Load the image, answer, write the files. Raises PromptError / ImageLoadError on bad input."""
    start = time.perf_counter()
    question = check_typed_question(question)
    image_source = clean_source(image_source)
    image = load_image(image_source, max_pixels=settings.max_image_pixels)
    notes = []
    answer = predictor.ask(image.rgb, question)
    masks = saved = answer.masks.numpy().astype(bool)
    if image.rgb.shape[:2] != tuple(image.original_size):
        notes.append(f"image downscaled from {image.original_size[1]}x{image.original_size[0]} to "
                     f"{image.rgb.shape[1]}x{image.rgb.shape[0]} for the model (--max_image_pixels "
                     f"{settings.max_image_pixels}); masks are saved at the original size, the overlay at the smaller")
        saved = resize_masks(masks, image.original_size)
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
                         mask_pixels=int(saved[0].sum()) if saved.shape[0] else 0, image_size=tuple(image.original_size),
                         output_dir=directory, mask_path=files.mask, overlay_path=files.overlay,
                         answer_path=files.answer, extra_mask_paths=files.extra_masks, sasp_paths=sasp_paths,
                         notes=notes, seconds=round(time.perf_counter() - start, 3))
    with open(os.path.join(directory, "result.json"), "w", encoding="utf-8") as f:
        json.dump(asdict(result), f, indent=2)
    return result
