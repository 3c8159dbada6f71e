"""What the web demo's tests share: the models they serve, a server in a thread, pictures to post.

`demo_model(name)` gives the predictor a test serves and what it should answer:
- "tiny-random": the untrained model, with its answers forced per question by a logits hook
  (`forced`), so that the positive question gets one [SEG], the two-object question two, and the
  false premise none; its masks are whatever the random SAM draws.
- "shapes": the built-in Shapes model (assets/shapes_sesame), answering on its own about a scene of its
  world (assets/shapes_world.jpg); a trained model must See the red square, segment it inside its box,
  and not See the yellow square.
Each model has its picture (`DemoModel.image`): tiny-random answers about assets/shapes.jpg.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import pytest
import torch

from app.web_page import EXAMPLE_QUESTIONS
from app.web_service import AnswerService, WebSettings
from engine.build import build_predictor
from model.builder import load_pretrained
from model.predictor import SesamePredictor
from model.tokenizer import SEG_TOKEN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(ROOT, "assets", "shapes.jpg")
SHAPES_MODEL = os.path.join(ROOT, "assets", "shapes_sesame")
POSITIVE = EXAMPLE_QUESTIONS[0][1]  # the red square
FALSE_PREMISE = EXAMPLE_QUESTIONS[1][1]  # a yellow square
TWO_OBJECTS = "Please segment the red square and the green triangle."
WORLD = os.path.join(ROOT, "assets", "shapes_world.jpg")


def world_mask(name: str) -> np.ndarray:
    """(H, W) bool: the visible pixels of object `name` of assets/shapes_world.jpg, redrawn from the seed
    its JSON records (a square may be turned: its box says little about its pixels)."""
    from dataset.shapes.scene import make_scene

    with open(os.path.join(ROOT, "assets", "shapes_world.json")) as f:
        seed = json.load(f)["seed"]
    scene = make_scene(np.random.default_rng(seed))
    return next(o.mask for o in scene.objects if o.name == name) > 0


FORCED_ANSWERS = {POSITIVE: "Sure, it is [SEG].", FALSE_PREMISE: "No, there is no yellow square in this image.",
                  TWO_OBJECTS: "Sure, [SEG] and [SEG]."}
MODELS = ["tiny-random"] + (["shapes"] if os.path.isdir(SHAPES_MODEL) else [])
SERVER_START_S = 60
MAX_IMAGE_PIXELS = 300_000  # shapes.jpg (480 x 320) is answered at its size, the 1200 x 800 test image downscaled


@dataclass
class DemoModel:
    name: str
    predictor: SesamePredictor
    image: str  # the picture the tests ask it about
    forced: dict[str, str] = field(default_factory=dict)  # question -> answer the hook makes the model give

    @property
    def trained(self) -> bool:
        return not self.forced


def forced_predictor(loaded, answers: dict[str, str], max_new_tokens: int = 24) -> SesamePredictor:
    """An engine predictor over `loaded` that gives `answers[question]` for the listed questions
    (greedy decoding pushed onto each answer's tokens) and its own answer otherwise. One question per
    call, as the web demo asks."""
    tokenizer, cfg = loaded.tokenizer, loaded.model.config
    scripts = {}
    for question, text in answers.items():
        pieces = [tokenizer(p, add_special_tokens=False).input_ids for p in (" " + text).split(SEG_TOKEN)]
        tokens = pieces[0]
        for piece in pieces[1:]:
            tokens = tokens + [cfg.seg_token_id] + piece
        scripts[question] = tokens + [cfg.llm.eos_token_id]
    current: dict[str, Optional[list[int]]] = {"script": None}

    def hook(step, logits, rows):
        script = current["script"]
        if script is None:
            return logits
        logits = logits.clone()
        logits[:, script[min(step, len(script) - 1)]] += 1e4
        return logits

    predictor = build_predictor(loaded, max_new_tokens=max_new_tokens, logits_hook=hook)
    ask_many = predictor.ask_many

    def forced_ask_many(items):
        items = [(image, list(questions)) for image, questions in items]
        asked = {q.strip() for _, questions in items for q in questions}
        assert len(asked) == 1, "forced answers need one question per call"
        current["script"] = scripts.get(asked.pop())
        try:
            return ask_many(items)
        finally:
            current["script"] = None
    predictor.ask_many = forced_ask_many  # ask() goes through it
    return predictor


def demo_model(name: str) -> DemoModel:
    if name == "tiny-random":
        loaded = load_pretrained("tiny-random", device="cpu", dtype=torch.float32)
        return DemoModel(name, forced_predictor(loaded, FORCED_ANSWERS), SHAPES, dict(FORCED_ANSWERS))
    loaded = load_pretrained(SHAPES_MODEL, device="cpu", dtype=torch.float32)
    return DemoModel(name, build_predictor(loaded, max_new_tokens=64), WORLD)


def check_trained_mask(model: DemoModel, mask: np.ndarray) -> None:
    """A trained model's mask for POSITIVE on its picture lies on the red square."""
    if not model.trained:
        return
    assert model.image == WORLD
    truth = world_mask("red square")
    inside = (mask.astype(bool) & truth).sum()
    assert inside > 0.8 * truth.sum() and inside > 0.9 * mask.sum(), "the mask misses the red square"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(service: AnswerService, upload_dir: str, model_note: str = "test server") -> Iterator[str]:
    """The web demo's app (page + API) served by uvicorn in a thread on a free port; yields its URL."""
    from app.web import build_app, make_server

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", upload_dir)  # Gradio keeps uploads and outputs there
        port = free_port()
        server = make_server(build_app(service, model_note=model_note), "127.0.0.1", port)
        thread = threading.Thread(target=server.run, name="web-demo-server", daemon=True)
        thread.start()
        deadline = time.monotonic() + SERVER_START_S
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the web demo server did not start"
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=15)


def service_for(model: DemoModel, **settings) -> AnswerService:
    return AnswerService(model.predictor, WebSettings(**settings))


def serve(model: DemoModel, upload_dir: str):
    """The tests' server for `model`: small limits (MAX_IMAGE_PIXELS, 1 MiB uploads, 3 waiting), the
    model named on the page; a context manager yielding its URL."""
    service = service_for(model, max_image_pixels=MAX_IMAGE_PIXELS, max_upload_mb=1, max_queue=3)
    note = f"Model: `{model.name}`" + (" · answers forced by the test" if model.forced else "")
    return running_server(service, upload_dir, note)


def huge_png(path: str, width: int = 20_000, height: int = 10_000) -> str:
    """A valid 1-bit PNG of width x height (200 megapixels, over every decode limit) in a few kB."""
    row = b"\x00" + bytes((width + 7) // 8)  # filter byte + packed pixels

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * height, 9))
                + chunk(b"IEND", b""))
    return path
