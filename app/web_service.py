"""The web demo's one way to the model, shared by the page and the JSON API.

One question is answered at a time (the predictor and its engine are not thread-safe), and at most
`max_queue` more may wait; one more is refused at once with `ServerBusy`. Every refusal is a
`WebInputError` whose message is one line naming the uploaded file or the field, and whose
`status` is the HTTP code the API answers with.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from model.predictor import PromptError, SesamePredictor
from utils.errors import InputError, one_line
from utils.image_io import ImageLoadError
from utils.mask_io import encode_rle

from .query import ImageAnswer, ask_image

MIB = 1024 * 1024


class WebInputError(InputError):
    """A request the server refuses; the message is one line, `status` the HTTP code."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ServerBusy(WebInputError):
    def __init__(self, waiting: int):
        super().__init__(f"server busy: the queue is full ({waiting} waiting for the model); try again shortly", 503)


@dataclass(frozen=True)
class WebSettings:
    max_image_pixels: int = 50_000_000  # larger images are downscaled for the model, masks come back full size
    max_upload_mb: int = 50  # larger files are refused before they are read
    max_queue: int = 16  # requests that may wait while one is answered; more are refused (503)

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * MIB


@dataclass
class WebAnswer:
    answered: ImageAnswer
    notes: list[str]
    seconds: float

    def to_json(self) -> dict:
        """What the API returns: the answer, See, and one COCO RLE per [SEG] at the file's size.
        SasP models add each [SEG]'s points, (x, y) in the file's pixels, labels 1 / 0 / -1."""
        answer, masks = self.answered.answer, self.answered.file_masks
        out = {"question": answer.question, "answer": answer.text, "say": answer.say, "see": answer.see,
               "image_size": [int(s) for s in self.answered.image.original_size],
               "masks": [encode_rle(m) for m in masks], "notes": self.notes, "seconds": round(self.seconds, 3)}
        if answer.sasp is not None:
            out["sasp_points"] = sasp_points_json(self.answered)
        return out


def sasp_points_json(answered: ImageAnswer) -> list[list[dict]]:
    """Per [SEG], its valid SasP points scaled from the model's copy of the image to the file."""
    sasp = answered.answer.sasp
    (height, width), (h, w) = answered.image.original_size, answered.image.rgb.shape[:2]
    scale = np.array([width / w, height / h], np.float64)
    out = []
    for points, labels, valid in zip(sasp.points.float().numpy(), sasp.labels.numpy(), sasp.valid.numpy()):
        out.append([{"x": round(float(x), 2), "y": round(float(y), 2), "label": int(label)}
                    for (x, y), label in zip(points[valid] * scale, labels[valid])])
    return out


class AnswerService:
    """The predictor behind a lock, with a bounded number of requests waiting for it."""

    def __init__(self, predictor: SesamePredictor, settings: WebSettings):
        self.predictor, self.settings = predictor, settings
        self._model_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._inside = 0  # requests answered or waiting

    @property
    def in_flight(self) -> int:
        """Requests being answered or waiting for the model."""
        with self._count_lock:
            return self._inside

    @property
    def waiting(self) -> int:
        """Requests waiting for the model (not counting the one being answered)."""
        return max(0, self.in_flight - 1)

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        with self._count_lock:
            if self._inside > self.settings.max_queue:
                raise ServerBusy(self._inside - 1)
            self._inside += 1
        try:
            with self._model_lock:
                yield
        finally:
            with self._count_lock:
                self._inside -= 1

    def check_upload(self, path: str, name: str) -> None:
        """Refuse a missing, empty or too large upload before anything reads it."""
        if not path or not os.path.isfile(path):
            raise WebInputError("no image: upload one or pick an example")
        size = os.path.getsize(path)
        if size > self.settings.max_upload_bytes:
            raise WebInputError(f"{name}: the file is {size / MIB:.1f} MiB, the limit is "
                                f"{self.settings.max_upload_mb} MiB (--max_upload_mb)", 413)

    def ask(self, image_path: str, question: str, *, name: str) -> WebAnswer:
        """Answer `question` about the uploaded file at `image_path`; `name` is what messages call it
        (the file's name on the sender's machine, not the server's temporary path)."""
        self.check_upload(image_path, name)
        with self._turn():
            start = time.perf_counter()
            try:
                answered = ask_image(self.predictor, image_path, question, self.settings.max_image_pixels)
            except PromptError as e:
                raise WebInputError(f"question: {one_line(e)}") from None
            except ImageLoadError as e:
                raise WebInputError(one_line(e).replace(image_path, name)) from None
        note = answered.downscale_note(self.settings.max_image_pixels)
        return WebAnswer(answered=answered, notes=[note] if note else [], seconds=time.perf_counter() - start)
