"""The web demo's server: the page (`app.web_page`) and a JSON API beside it, in one FastAPI app.

    POST /api/segment    multipart form: image (the file), question (text)
      200 {"question", "answer" (as generated, [SEG] included), "say" (without it), "see",
           "image_size": [H, W], "masks": [{"size": [H, W], "counts": COCO RLE}, one per [SEG]],
           "notes", "seconds"}, and "sasp_points" for SasP models
      400 / 413 / 503 / 500 {"error": "<one line>"}: bad input, too large, queue full, a bug

The page and the API share one `AnswerService`: one question at a time, a bounded queue. The page's
own queue (Gradio's) has the same bound.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

import anyio
import gradio as gr
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from utils.errors import one_line

from .web_page import CSS, build_page, theme
from .web_service import AnswerService, WebInputError

LOG = logging.getLogger(__name__)
API_PATH = "/api/segment"
FORM_SLACK_BYTES = 64 * 1024  # multipart headers and the question, on top of the image


def error_response(message: str, status: int) -> JSONResponse:
    headers = {"Retry-After": "5"} if status == 503 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _form_fields(request: Request, service: AnswerService) -> tuple[UploadFile, str]:
    """The form's image and question, refused early when the body is over the upload limit."""
    limit = service.settings.max_upload_bytes + FORM_SLACK_BYTES
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise WebInputError(f"request of {int(declared) / 2**20:.1f} MiB is over the upload limit of "
                            f"{service.settings.max_upload_mb} MiB (--max_upload_mb)", 413)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise WebInputError("send a multipart form with the fields 'image' (a file) and 'question' "
                            "(e.g. curl -F image=@photo.jpg -F question='...')")
    try:
        form = await request.form(max_files=1, max_fields=2)
    except HTTPException as e:  # a malformed body, or more parts than the two fields
        raise WebInputError(f"unreadable form: {e.detail}", e.status_code) from None
    image, question = form.get("image"), form.get("question")
    if not isinstance(image, UploadFile):
        raise WebInputError("image: missing; send the picture as the file field 'image'")
    if not isinstance(question, str):
        raise WebInputError("question: missing; send it as the text field 'question'")
    return image, question


async def api_segment(request: Request, service: AnswerService) -> JSONResponse:
    try:
        image, question = await _form_fields(request, service)
        name = os.path.basename(image.filename or "") or "image"
        with tempfile.TemporaryDirectory(prefix="sesame_web_") as directory:
            path = os.path.join(directory, "upload" + os.path.splitext(name)[1][:16])
            with open(path, "wb") as f:
                shutil.copyfileobj(image.file, f)
            await image.close()
            result = await anyio.to_thread.run_sync(lambda: service.ask(path, question, name=name))
            return JSONResponse(result.to_json())
    except WebInputError as e:
        return error_response(one_line(e), e.status)
    except Exception as e:  # a bug or a failing device: reported, and the server goes on
        LOG.exception("web demo API: a request failed")
        return error_response(f"internal error ({type(e).__name__}): {one_line(e)}", 500)


def build_app(service: AnswerService, *, title: str = "SESAME: See, Say and Segment", model_note: str = "") -> FastAPI:
    """The FastAPI app: POST /api/segment and the page at /."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)

    @app.post(API_PATH)
    async def segment(request: Request) -> JSONResponse:
        return await api_segment(request, service)

    page = build_page(service, title, model_note)
    page.queue(max_size=service.settings.max_queue, default_concurrency_limit=1)
    return gr.mount_gradio_app(app, page, path="/", css=CSS, theme=theme(), ssr_mode=False, show_error=True,
                               max_file_size=service.settings.max_upload_bytes,
                               footer_links=["gradio", "settings"])


def make_server(app: FastAPI, host: str, port: int) -> uvicorn.Server:
    """A uvicorn server for `app`; `.run()` serves until Ctrl-C (or `.should_exit = True`)."""
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5))
