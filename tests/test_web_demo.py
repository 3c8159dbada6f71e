"""The web demo's JSON API over real HTTP (the app served by uvicorn in a thread), the page's handler
in process, and web_demo.py as a script. The browser tests are in test_web_demo_browser.py."""
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
from child_env import child_pythonpath
from PIL import Image
from web_demo_server import (
    FALSE_PREMISE,
    FORCED_ANSWERS,
    MAX_IMAGE_PIXELS,
    MODELS,
    POSITIVE,
    ROOT,
    SHAPES,
    TWO_OBJECTS,
    check_trained_mask,
    demo_model,
    forced_predictor,
    free_port,
    huge_png,
    running_server,
    serve,
)

import web_demo
from app.query import QuerySettings, ask_image, run_query
from app.web_page import answer_on_page, example_images
from app.web_service import AnswerService, WebSettings
from model.builder import LoadedSesame
from utils.errors import InputError
from utils.mask_io import decode_rle

API = "/api/segment"
HTTP_TIMEOUT_S = 120
SCRIPT_START_S = 180


@pytest.fixture(scope="module")
def tiny():
    return demo_model("tiny-random")


@pytest.fixture(scope="module")
def tiny_server(tiny, tmp_path_factory):
    with serve(tiny, str(tmp_path_factory.mktemp("gradio"))) as url:
        yield url


@pytest.fixture(scope="module", params=MODELS)
def served(request, tmp_path_factory):
    """(model, server URL) for tiny-random with forced answers and, once it ships, the Shapes model."""
    if request.param == "tiny-random":
        yield request.getfixturevalue("tiny"), request.getfixturevalue("tiny_server")
        return
    model = demo_model(request.param)
    with serve(model, str(tmp_path_factory.mktemp("gradio"))) as url:
        yield model, url


def post(url, image_path, question, name=None, timeout=HTTP_TIMEOUT_S):
    with open(image_path, "rb") as f:
        return requests.post(url + API, files={"image": (name or os.path.basename(image_path), f)},
                             data={"question": question}, timeout=timeout)


def cli_masks(model, tmp_path, image_path, question, max_image_pixels=MAX_IMAGE_PIXELS):
    """The demo's masks for the same query, read back from the PNGs it saved (0 / 255)."""
    result = run_query(model.predictor, QuerySettings(vis_save_dir=str(tmp_path / "cli"),
                                                      max_image_pixels=max_image_pixels), image_path, question)
    paths = [result.mask_path] + result.extra_mask_paths if result.num_seg else []
    return result, [np.asarray(Image.open(p)) == 255 for p in paths]


def test_api_answers_with_the_clis_masks(served, tmp_path):
    model, url = served
    reply = post(url, model.image, POSITIVE)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    size = list(Image.open(model.image).size[::-1])  # [height, width]
    assert set(body) == {"question", "answer", "say", "see", "image_size", "masks", "notes", "seconds"}
    assert body["question"] == POSITIVE and body["image_size"] == size and body["notes"] == []
    cli, expected = cli_masks(model, tmp_path, model.image, POSITIVE)
    masks = [decode_rle(rle) for rle in body["masks"]]
    assert [rle["size"] for rle in body["masks"]] == [size] * len(masks)
    assert len(masks) == len(expected) == cli.num_seg >= 1
    assert all(np.array_equal(m, e) for m, e in zip(masks, expected))
    assert body["see"] == cli.see and body["answer"] == cli.raw_answer and body["say"] == cli.say
    if model.trained:
        assert body["see"]
        check_trained_mask(model, masks[0])
    else:
        assert "[SEG]" in body["answer"]
        assert body["say"] == "Sure, it is." and body["see"] and masks[0].any() and not masks[0].all()

    reply = post(url, model.image, FALSE_PREMISE)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["see"] is False and body["masks"] == []
    if not model.trained:
        assert body["say"] == FORCED_ANSWERS[FALSE_PREMISE]


def test_api_every_seg_gets_its_mask(tiny, tiny_server, tmp_path):
    body = post(tiny_server, SHAPES, TWO_OBJECTS).json()
    cli, expected = cli_masks(tiny, tmp_path, SHAPES, TWO_OBJECTS)
    masks = [decode_rle(rle) for rle in body["masks"]]
    assert len(masks) == len(expected) == 2 and body["say"] == cli.say and body["answer"].count("[SEG]") == 2
    assert all(np.array_equal(m, e) for m, e in zip(masks, expected))
    assert not np.array_equal(masks[0], masks[1])  # each [SEG]'s own mask, not one repeated


def test_api_downscaled_image_gets_masks_at_its_own_size(tiny, tiny_server, tmp_path):
    big = tmp_path / "big.png"
    Image.open(SHAPES).resize((1200, 800), Image.Resampling.NEAREST).save(big)
    body = post(tiny_server, str(big), POSITIVE).json()
    assert body["image_size"] == [800, 1200]
    assert body["notes"] == ["image downscaled from 1200x800 to 670x447 for the model (--max_image_pixels 300000)"]
    _, expected = cli_masks(tiny, tmp_path, str(big), POSITIVE)
    assert decode_rle(body["masks"][0]).shape == (800, 1200)
    assert np.array_equal(decode_rle(body["masks"][0]), expected[0])


def test_api_bad_input_gets_an_error_and_the_server_goes_on(tiny_server, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    huge = huge_png(str(tmp_path / "huge.png"))
    heavy = tmp_path / "heavy.jpg"
    heavy.write_bytes(os.urandom(1_200_000))  # over --max_upload_mb 1
    cases = [
        (post(tiny_server, str(text), POSITIVE), 400, "notes.jpg: not an image file"),
        (post(tiny_server, huge, POSITIVE), 400, "huge.png: image is too large to decode safely"),
        (post(tiny_server, str(heavy), POSITIVE), 413, "over the upload limit of 1 MiB"),
        (post(tiny_server, SHAPES, "   "), 400, "question: empty question"),
        (post(tiny_server, SHAPES, "word " * 1200), 400, "question: question too long"),
        (post(tiny_server, SHAPES, "<image> where?"), 400, "must not contain '<image>'"),
        (requests.post(tiny_server + API, data={"question": POSITIVE}, files={"other": ("a", b"x")}), 400,
         "image: missing"),
        (requests.post(tiny_server + API, files={"image": ("a.jpg", open(SHAPES, "rb"))}), 400, "question: missing"),
        (requests.post(tiny_server + API, json={"question": POSITIVE}), 400, "send a multipart form"),
        (requests.post(tiny_server + API, data={"question": POSITIVE},
                       files={"image": ("a.jpg", b"x"), "more": ("b.jpg", b"y")}), 400,
         "unreadable form: Too many files"),
    ]
    for reply, status, message in cases:
        assert reply.status_code == status, (message, reply.text)
        assert list(reply.json()) == ["error"] and message in reply.json()["error"], reply.text
        assert "\n" not in reply.json()["error"] and str(tmp_path) not in reply.json()["error"]
    assert post(tiny_server, SHAPES, POSITIVE).status_code == 200  # still serving


def _variants(tmp_path):
    """Four different pictures of different sizes, so that an answer shows whose image it was."""
    image = Image.open(SHAPES)
    variants = {"shapes.png": image, "flipped.png": image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((400, 300)),
                "upside_down.png": image.transpose(Image.Transpose.FLIP_TOP_BOTTOM).resize((360, 240)),
                "small.png": image.crop((0, 0, 300, 200))}
    paths = {}
    for name, picture in variants.items():
        paths[name] = str(tmp_path / name)
        picture.save(paths[name])
    return paths


def test_api_concurrent_requests_get_their_own_answers(tiny, tiny_server, tmp_path):
    paths = _variants(tmp_path)
    expected = {name: ask_image(tiny.predictor, path, POSITIVE, MAX_IMAGE_PIXELS).file_masks[0]
                for name, path in paths.items()}
    replies = {}

    def send(name):
        replies[name] = post(tiny_server, paths[name], POSITIVE)
    threads = [threading.Thread(target=send, args=(name,)) for name in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HTTP_TIMEOUT_S)
    assert sorted(replies) == sorted(paths)
    for name, reply in replies.items():
        assert reply.status_code == 200, reply.text
        mask = decode_rle(reply.json()["masks"][0])
        assert reply.json()["image_size"] == list(expected[name].shape)
        assert np.array_equal(mask, expected[name]), name


def test_api_queue_is_bounded(tiny, tmp_path):
    """One answered, max_queue waiting, the next refused at once with 503; then all is served."""
    gate, service = threading.Event(), AnswerService(tiny.predictor, WebSettings(max_queue=1))
    ask_many = tiny.predictor.ask_many
    replies = []

    def gated(items):
        gate.wait(HTTP_TIMEOUT_S)
        return ask_many(items)
    try:
        tiny.predictor.ask_many = gated
        with running_server(service, str(tmp_path / "gradio")) as url:
            threads = [threading.Thread(target=lambda: replies.append(post(url, SHAPES, POSITIVE))) for _ in range(2)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while service.waiting < 1:
                assert time.monotonic() < deadline, "the two requests did not reach the service"
                time.sleep(0.02)
            busy = post(url, SHAPES, POSITIVE, timeout=10)
            assert busy.status_code == 503 and busy.headers["Retry-After"]
            full = "server busy: the queue is full (1 waiting for the model); try again shortly"
            assert busy.json() == {"error": full}
            gate.set()
            for t in threads:
                t.join(HTTP_TIMEOUT_S)
            assert [r.status_code for r in replies] == [200, 200]
            assert post(url, SHAPES, POSITIVE).status_code == 200 and service.waiting == 0
    finally:
        gate.set()
        tiny.predictor.ask_many = ask_many


def test_page_handler_draws_masks_sasp_and_errors(tiny, tmp_path):
    """The page's handler in process: overlays per [SEG], the SasP pictures of a READ model, errors."""
    from engine.build import load_predictor

    read = load_predictor(web_demo.parse_args(["--pretrained_model_path", "tiny-random", "--precision", "fp32",
                                               "--device", "cpu", "--use_sasp", "--num_points", "5"]))
    loaded = LoadedSesame(read.model, read.tokenizer, read.clip_transform, read.sam_transform)
    service = AnswerService(forced_predictor(loaded, FORCED_ANSWERS), WebSettings())
    upload = {"path": SHAPES, "orig_name": "shapes.jpg"}
    steps = []

    def progress(fraction, desc):
        steps.append(desc)
    error, see, answer, overlay, per_seg, sasp, notes = answer_on_page(service, upload, TWO_OBJECTS, progress)
    assert steps == ["Answering", "Drawing"] and not error["visible"] and see["visible"]
    assert "object present" in see["value"] and answer.startswith("Sure,") and overlay.shape == (320, 480, 3)
    assert per_seg["visible"] and [caption for _, caption in per_seg["value"]] == ["[SEG] 1", "[SEG] 2"]
    assert sasp["visible"] and len(sasp["value"]) == 2 and sasp["value"][0][0].shape[0] > 320
    assert "2 [SEG]" in notes
    result = service.ask(SHAPES, POSITIVE, name="shapes.jpg").to_json()
    points = result["sasp_points"]
    assert len(points) == 1 and 0 < len(points[0]) <= 5 and {p["label"] for p in points[0]} <= {1, 0, -1}
    assert all(0 <= p["x"] < 480 and 0 <= p["y"] < 320 for p in points[0])

    _, see, answer, overlay, per_seg, sasp, _ = answer_on_page(service, upload, FALSE_PREMISE, progress)
    assert "false premise" in see["value"] and not per_seg["visible"] and not sasp["visible"]
    assert np.array_equal(overlay, np.asarray(Image.open(SHAPES).convert("RGB")))  # nothing tinted

    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    for bad_upload, question, message in (({"path": str(text), "orig_name": "notes.jpg"}, POSITIVE,
                                           "error: notes.jpg: not an image file"),
                                          (None, POSITIVE, "error: no image: upload one or pick an example"),
                                          (upload, "", "error: question: empty question")):
        error, see, answer, overlay, *_ = answer_on_page(service, bad_upload, question, progress)
        assert error["visible"] and message in error["value"] and not see["visible"] and overlay is None


def test_example_images_pick_up_a_folder(tmp_path):
    world = os.path.join(os.path.dirname(SHAPES), "shapes_world.jpg")
    assert example_images(str(tmp_path / "none")) == [world, SHAPES]
    for name in ("b.png", "a.JPG", "readme.txt"):
        (tmp_path / name).write_bytes(b"")
    assert example_images(str(tmp_path)) == [str(tmp_path / "a.JPG"), str(tmp_path / "b.png"), world, SHAPES]


def test_flags(monkeypatch, tmp_path):
    args = web_demo.parse_args([])
    assert args.pretrained_model_path == os.path.join(ROOT, "assets", "shapes_sesame")
    assert (args.host, args.port, args.precision, args.max_queue) == ("127.0.0.1", 7860, None, 16)
    assert args.use_sasp is False and args.num_points is None  # READ's SasP flags are there
    for argv in (["--port", "0"], ["--max_queue", "0"], ["--max_upload_mb", "0"], ["--precision", "fp8"]):
        with pytest.raises(SystemExit):
            web_demo.parse_args(argv)
    monkeypatch.setattr(web_demo, "BUILT_IN_MODEL", str(tmp_path / "shapes_sesame"))
    with pytest.raises(InputError, match="the built-in Shapes model is missing"):
        web_demo.main(["--pretrained_model_path", str(tmp_path / "shapes_sesame")])


def test_script_serves_page_and_api(tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    env["PYTHONPATH"] = child_pythonpath(with_repo=False)
    cmd = [sys.executable, os.path.join(ROOT, "web_demo.py"), "--pretrained_model_path", "tiny-random", "--device",
           "cpu", "--precision", "fp32", "--max_new_tokens", "4", "--port", str(port)]
    child = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SCRIPT_START_S
        while True:
            assert child.poll() is None, child.stdout.read()
            assert time.monotonic() < deadline, "web_demo.py did not start serving"
            try:
                page = requests.get(url + "/", timeout=5)
                break
            except requests.ConnectionError:
                time.sleep(0.5)
        assert page.status_code == 200 and "gradio" in page.text.lower()
        reply = post(url, SHAPES, POSITIVE)
        assert reply.status_code == 200 and reply.json()["image_size"] == [320, 480], reply.text
    finally:
        child.send_signal(signal.SIGINT)
        output = child.communicate(timeout=60)[0]
    assert child.returncode == 130 and output.strip().endswith("interrupted"), output  # Ctrl-C, as demo.py
    assert "untrained" in output and f"Serving the web demo on {url}" in output
