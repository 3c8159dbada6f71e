"""The web demo's page (Gradio Blocks): an image and a question in; the answer, a See badge, the
mask overlay, each [SEG]'s mask and, for SasP models, the similarity map with its points out.

Bad input (no image, a file that is not an image, one too large, an empty or too long question)
shows a one-line message in the red box above the results; the page and the server go on.
"""
from __future__ import annotations

import html
import logging
import os
from typing import Optional

import gradio as gr
import numpy as np

from utils.errors import one_line
from utils.visualize import overlay_mask
from utils.visualize_sasp import render_sasp

from .web_service import AnswerService, WebAnswer, WebInputError

LOG = logging.getLogger(__name__)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES_DIR = os.path.join(ROOT, "assets", "examples")
DEFAULT_EXAMPLE = os.path.join(ROOT, "assets", "shapes.jpg")
WORLD_EXAMPLE = os.path.join(ROOT, "assets", "shapes_world.jpg")  # a Shapes-world scene (assets/shapes_world.json)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# (label, question) about both bundled images: assets/shapes.jpg (a red square, a blue ellipse, a green
# triangle) and assets/shapes_world.jpg (a red square, a green triangle, a purple star: the red square
# is what the Shapes model suggests instead of the yellow one)
EXAMPLE_QUESTIONS = (
    ("object present", "Is there a red square in this image? If so, please segment it."),
    ("false premise", "Is there a yellow square in this image? If so, please segment it."),
    ("object present", "Can you find the green triangle here? Give me its segmentation mask if it is present."),
)
CSS = """
#see .badge {display: inline-block; padding: 4px 12px; border-radius: 12px; font-weight: 600; color: white}
#see .present {background: #1a7f37}
#see .absent {background: #8250df}
#error .message {padding: 8px 12px; border-radius: 6px; background: #ffebe9; color: #a40e26;
                 border: 1px solid #ff8182; font-weight: 600}
"""


def theme() -> gr.themes.Theme:
    """Gradio's default look in the system's own fonts (its bundled bold face draws some letters
    oddly in Chromium)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def example_images(examples_dir: str = EXAMPLES_DIR) -> list[str]:
    """The images in `examples_dir` (sorted by name), if it exists, then the bundled Shapes-world scene and
    assets/shapes.jpg."""
    found = []
    if os.path.isdir(examples_dir):
        found = sorted(os.path.join(examples_dir, name) for name in os.listdir(examples_dir)
                       if name.lower().endswith(IMAGE_SUFFIXES))
    return found + [WORLD_EXAMPLE, DEFAULT_EXAMPLE]


def see_badge(see: bool) -> str:
    if see:
        return '<span class="badge present">See: object present</span>'
    return '<span class="badge absent">See: false premise, nothing segmented</span>'


def error_box(message: str) -> str:
    return f'<div class="message">error: {html.escape(message)}</div>'


def upload_path_and_name(upload: Optional[dict]) -> tuple[str, str]:
    """Gradio's file payload (the image component, not preprocessed) -> (server path, sender's name)."""
    if not upload or not upload.get("path"):
        return "", ""
    path = upload["path"]
    return path, upload.get("orig_name") or os.path.basename(path)


def result_pictures(result: WebAnswer) -> tuple[np.ndarray, list, list]:
    """(overlay of the first [SEG]'s mask, [(overlay, caption)] per [SEG] when there are several,
    [(SasP picture, caption)] per [SEG] for SasP models), all on the image the model saw."""
    rgb, masks, answer = result.answered.image.rgb, result.answered.masks, result.answered.answer
    first = masks[0] if len(masks) else np.zeros(rgb.shape[:2], bool)
    per_seg = [(overlay_mask(rgb, m), f"[SEG] {k + 1}") for k, m in enumerate(masks)] if len(masks) > 1 else []
    sasp = []
    if answer.sasp is not None:
        sasp = [(render_sasp(rgb, answer.sasp, k, masks[k]), f"[SEG] {k + 1}") for k in range(len(masks))]
    return overlay_mask(rgb, first), per_seg, sasp


def _outputs(*, error: str = "", result: Optional[WebAnswer] = None) -> tuple:
    """Values for (error, see, answer, overlay, per-[SEG] masks, SasP, notes); the notes name the
    question, so a result is never mistaken for the answer to what the box holds now."""
    if result is None:
        return (gr.update(value=error_box(error), visible=True), gr.update(value="", visible=False), "", None,
                gr.update(value=None, visible=False), gr.update(value=None, visible=False), "")
    overlay, per_seg, sasp = result_pictures(result)
    answer = result.answered.answer
    notes = f"Asked: {html.escape(answer.question)}\n\n{answer.num_seg} [SEG], answered in {result.seconds:.1f} s"
    notes += "".join(f"\n- note: {html.escape(n)}" for n in result.notes)
    return (gr.update(value="", visible=False), gr.update(value=see_badge(answer.see), visible=True), answer.say,
            overlay, gr.update(value=per_seg or None, visible=bool(per_seg)),
            gr.update(value=sasp or None, visible=bool(sasp)), notes)


def answer_on_page(service: AnswerService, upload: Optional[dict], question: str,
                   progress: gr.Progress) -> tuple:
    path, name = upload_path_and_name(upload)
    progress(0.1, desc="Waiting for the model" if service.in_flight else "Answering")
    try:
        result = service.ask(path, question, name=name)
    except WebInputError as e:
        return _outputs(error=one_line(e))
    except Exception as e:  # a bug or a failing device: reported, and the server goes on
        LOG.exception("web demo: answering %r about %s failed", question, name)
        return _outputs(error=f"internal error ({type(e).__name__}): {one_line(e)}")
    progress(0.9, desc="Drawing")
    return _outputs(result=result)


def build_page(service: AnswerService, title: str, model_note: str) -> gr.Blocks:
    """The Blocks; queue settings are the caller's (`app.web.build_app`)."""
    with gr.Blocks(title=title, analytics_enabled=False) as page:  # a demo server phones nowhere
        gr.Markdown(f"# {html.escape(title)}\n{model_note}")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"], elem_id="image")
                question = gr.Textbox(label="Question", lines=2, elem_id="question",
                                      placeholder="Is there a red square? If so, segment it.")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                gr.Examples([[p] for p in example_images()], inputs=[image], label="Example images")
                gr.Examples([[q] for _, q in EXAMPLE_QUESTIONS], inputs=[question], label="Example questions",
                            example_labels=[f"{label}: {q}" for label, q in EXAMPLE_QUESTIONS])
            with gr.Column():
                error = gr.HTML(visible=False, elem_id="error")
                see = gr.HTML(visible=False, elem_id="see")
                answer = gr.Textbox(label="Answer (Say)", interactive=False, elem_id="answer")
                overlay = gr.Image(label="Mask overlay (Segment)", format="png", interactive=False, elem_id="overlay",
                                   buttons=["download", "fullscreen"])
                per_seg = gr.Gallery(label="Each [SEG]'s mask", format="png", visible=False, columns=3,
                                     elem_id="seg-masks")
                sasp = gr.Gallery(label="SasP: similarity map and points (green positive, red negative)",
                                  format="png", visible=False, columns=2, elem_id="sasp")
                notes = gr.Markdown(elem_id="notes")

        def on_ask(upload, text, progress=gr.Progress()):
            return answer_on_page(service, upload, text, progress)

        outputs = [error, see, answer, overlay, per_seg, sasp, notes]
        # preprocess=False: the handler gets the upload's path and reads it with utils.image_io (EXIF,
        # odd formats, the size guard), not with Gradio's own decoder; Gradio still checks the path is an upload
        # The JSON API is app.web's /api/segment; this event stays out of Gradio's API page.
        gr.on([ask.click, question.submit], on_ask, inputs=[image, question], outputs=outputs, preprocess=False,
              api_name="ask", api_visibility="undocumented")
    return page
