"""The web demo in a real browser: Debian's Chromium driven by Selenium through /usr/bin/chromedriver
(nothing is downloaded), against the app served on 127.0.0.1 by uvicorn in a thread.

The page answers a positive and a false-premise question about an uploaded image, and the overlay
it shows is checked pixel by pixel: inside the mask every pixel is tinted, outside it the image is
unchanged, and the false premise tints nothing. Bad uploads and questions show their error on the
page and the next question is answered. Two browsers asking at once each get their own answer.
A screenshot is saved (WEB_DEMO_SCREENSHOT=path also writes it there, e.g. assets/web_demo.png).
"""
import contextlib
import io
import os
import shutil
import threading

import numpy as np
import pytest
import requests
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from web_demo_server import (
    FALSE_PREMISE,
    FORCED_ANSWERS,
    MAX_IMAGE_PIXELS,
    MODELS,
    POSITIVE,
    SHAPES,
    TWO_OBJECTS,
    check_trained_mask,
    demo_model,
    huge_png,
    serve,
)

from app.query import ask_image
from utils.image_io import load_image

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1000")
WAIT_S = 90  # a page load or an answer on a loaded 2-core machine
TINT_FLOOR = 178  # overlay_mask: red = 0.3 * red + 0.7 * 255 >= 178 on every tinted pixel


def require_chromium() -> None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: the browser tests need Debian's Chromium "
                    "(apt-get install -y chromium chromium-driver; .ci/run installs it when missing)")


@pytest.fixture(scope="module")
def browsers(tmp_path_factory):
    """start() -> a new headless Chromium (its own profile); all are closed at the end."""
    require_chromium()
    started = []

    def start():
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
        started.append(webdriver.Chrome(service=Service(CHROMEDRIVER), options=options))
        return started[-1]
    yield start
    for driver in started:
        driver.quit()


@pytest.fixture(scope="module")
def browser(browsers):
    return browsers()


@pytest.fixture(scope="module")
def tiny():
    return demo_model("tiny-random")


@pytest.fixture(scope="module")
def tiny_url(tiny, tmp_path_factory):
    with serve(tiny, str(tmp_path_factory.mktemp("gradio"))) as url:
        yield url


@pytest.fixture(scope="module", params=MODELS)
def served(request, tmp_path_factory):
    """(model, URL): tiny-random with forced answers and, once it ships, the Shapes model."""
    if request.param == "tiny-random":
        yield request.getfixturevalue("tiny"), request.getfixturevalue("tiny_url")
        return
    model = demo_model(request.param)
    with serve(model, str(tmp_path_factory.mktemp("gradio"))) as url:
        yield model, url


@contextlib.contextmanager
def held_model(model):
    """While inside, every question waits at the model: what is in flight can be looked at."""
    gate, ask_many = threading.Event(), model.predictor.ask_many

    def gated(items):
        assert gate.wait(WAIT_S), "the test never let the model answer"
        return ask_many(items)
    model.predictor.ask_many = gated
    try:
        yield gate
    finally:
        gate.set()
        model.predictor.ask_many = ask_many


class DemoPage:
    """One browser tab on the demo, used the way a person does: upload, type, click, read."""

    def __init__(self, driver, url):
        self.driver, self.url = driver, url
        driver.get(url)
        self.wait_for(lambda: self.find("#ask").is_displayed(), "the page did not load")

    def find(self, css):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def wait_for(self, condition, message, timeout=WAIT_S):
        def check(_):
            with contextlib.suppress(StaleElementReferenceException):
                return condition()
            return False
        WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(check, message)

    def upload(self, path):
        self.find("#image input[type=file]").send_keys(path)
        name = os.path.basename(path)
        self.wait_for(lambda: any(name in (img.get_attribute("src") or "")
                                  for img in self.driver.find_elements(By.CSS_SELECTOR, "#image img")),
                      f"{name} was not uploaded")

    def type_question(self, text):
        box = self.find("#question textarea")
        if len(text) > 200:  # typing thousands of keys takes long: set the value as pasting does
            self.driver.execute_script("arguments[0].value = arguments[1];"
                                       "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));", box, text)
        else:
            box.clear()
            box.send_keys(text)
        self.wait_for(lambda: box.get_attribute("value") == text, "the question box did not take the text")

    def ask(self, question):
        self.type_question(question)
        self.find("#ask").click()

    def wait_for_answer(self, question):
        try:
            # the notes and the See badge are separate components: wait until both show this answer
            self.wait_for(lambda: f"Asked: {question}" in self.find("#notes").text and self.see(), "")
        except TimeoutException:
            pytest.fail(f"no answer to {question!r}; the page's error box says {self.error()!r}")
        assert not self.error()

    def wait_for_error(self, text):
        self.wait_for(lambda: text in self.error(), f"no error saying {text!r} on the page")
        assert not self.see()

    def shown_text(self, css):
        """The text of an element that is on the page and displayed, else '' (Gradio leaves hidden
        components out of the page)."""
        return " ".join(e.text for e in self.driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed())

    def error(self):
        return self.shown_text("#error")

    def see(self):
        return self.shown_text("#see")

    def answer(self):
        return self.find("#answer textarea").get_attribute("value")

    def progress(self):
        """What the progress indicator on the overlay says ('' when there is none): the step and its
        share while answering, the place in the queue while waiting."""
        return " ".join(t.text for t in self.driver.find_elements(By.CSS_SELECTOR,
                                                                  "#overlay [data-testid=status-tracker]"))

    def overlay(self):
        """The overlay the page shows, fetched from the URL the page loaded it from."""
        src = self.find("#overlay img").get_attribute("src")
        reply = requests.get(src, timeout=30)
        assert reply.status_code == 200, src
        return np.asarray(Image.open(io.BytesIO(reply.content)).convert("RGB"))


def check_overlay(overlay, image, mask):
    """Inside the mask every pixel tinted towards red, outside it the image exactly (PNG, lossless)."""
    assert overlay.shape == image.shape
    assert np.array_equal(overlay[~mask], image[~mask]), "pixels outside the mask were changed"
    inside = overlay[mask].astype(int)
    assert (inside != image[mask]).any(axis=1).all() and (inside[:, 0] >= TINT_FLOOR).all(), \
        "pixels inside the mask are not tinted"


def save_screenshot(driver, tmp_path):
    path = str(tmp_path / "web_demo.png")
    assert driver.save_screenshot(path)
    if os.environ.get("WEB_DEMO_SCREENSHOT"):
        shutil.copyfile(path, os.environ["WEB_DEMO_SCREENSHOT"])
    return path


def test_page_answers_and_the_overlay_shows_the_mask(served, browser, tmp_path):
    model, url = served
    image = load_image(model.image).rgb
    answered = ask_image(model.predictor, model.image, POSITIVE, MAX_IMAGE_PIXELS)
    assert len(answered.masks), f"{model.name} does not See the red square: {answered.answer.say!r}"
    mask = answered.masks[0]
    page = DemoPage(browser, url)
    page.upload(model.image)
    with held_model(model) as gate:
        page.ask(POSITIVE)
        page.wait_for(lambda: "Answering" in page.progress(), "no progress indicator while answering")
        gate.set()
    page.wait_for_answer(POSITIVE)
    assert page.see() == "See: object present"
    # the trained model answers on its own: the page shows what the predictor says
    assert page.answer() == ("Sure, it is." if not model.trained else answered.answer.say)
    assert mask.any() and not mask.all()
    check_overlay(page.overlay(), image, mask)
    check_trained_mask(model, mask)
    assert os.path.getsize(save_screenshot(browser, tmp_path)) > 10_000

    page.ask(FALSE_PREMISE)
    page.wait_for_answer(FALSE_PREMISE)
    assert page.see() == "See: false premise, nothing segmented"
    if not model.trained:
        assert page.answer() == FORCED_ANSWERS[FALSE_PREMISE]
    else:  # the correction names the square that is there
        assert page.answer() == ask_image(model.predictor, model.image, FALSE_PREMISE, MAX_IMAGE_PIXELS).answer.say
        assert "red square" in page.answer()
    assert np.array_equal(page.overlay(), image), "a false premise must tint no pixel"


def test_page_shows_each_seg_mask(tiny, tiny_url, browser):
    model, url = tiny, tiny_url
    masks = ask_image(model.predictor, SHAPES, TWO_OBJECTS, MAX_IMAGE_PIXELS).masks
    page = DemoPage(browser, url)
    page.upload(SHAPES)
    page.ask(TWO_OBJECTS)
    page.wait_for_answer(TWO_OBJECTS)
    page.wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#seg-masks img")) == len(masks) == 2,
                  "the page does not show each [SEG]'s mask")
    items = browser.find_elements(By.CSS_SELECTOR, "#seg-masks img")
    for item, mask in zip(items, masks):
        shown = np.asarray(Image.open(io.BytesIO(requests.get(item.get_attribute("src"), timeout=30).content)))
        check_overlay(shown[..., :3], load_image(SHAPES).rgb, mask)


def test_bad_input_shows_an_error_and_the_page_goes_on(tiny_url, browser, tmp_path):
    url = tiny_url
    text_as_jpg = tmp_path / "notes.jpg"
    text_as_jpg.write_text("not an image")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    page = DemoPage(browser, url)

    page.upload(str(text_as_jpg))  # the browser takes it by its name; the server finds it is no image
    page.ask(POSITIVE)
    page.wait_for_error("error: notes.jpg: not an image file Pillow can read")

    heavy = tmp_path / "heavy.jpg"
    heavy.write_bytes(os.urandom(1_200_000))  # over the server's --max_upload_mb 1
    for path, message in ((text_file, "Invalid file type: notes.txt"),  # refused by the page itself
                          (heavy, 'exceed the maximum allowed size of 1.0 Mb: "heavy.jpg"')):  # by Gradio's server
        page.find("#image input[type=file]").send_keys(str(path))
        page.wait_for(lambda: message in page.driver.find_element(By.TAG_NAME, "body").text,
                      f"no message for {path.name}")

    page.upload(huge_png(str(tmp_path / "huge.png")))
    page.ask(POSITIVE)
    page.wait_for_error("error: huge.png: image is too large to decode safely")

    page.upload(SHAPES)
    page.ask("   ")
    page.wait_for_error("error: question: empty question")
    page.ask("word " * 1200)
    page.wait_for_error("error: question: question too long")

    page.ask(POSITIVE)
    page.wait_for_answer(POSITIVE)
    assert page.see() == "See: object present" and not page.error()


def test_two_browsers_at_once_get_their_own_answers(tiny, tiny_url, browsers, tmp_path):
    model, url = tiny, tiny_url
    source = Image.open(SHAPES)
    pictures = {"flipped.png": source.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((400, 300)),
                "upside_down.png": source.transpose(Image.Transpose.FLIP_TOP_BOTTOM).resize((360, 240))}
    pages, expected = [], []
    for name, picture in pictures.items():
        path = str(tmp_path / name)
        picture.save(path)
        answered = ask_image(model.predictor, path, POSITIVE, MAX_IMAGE_PIXELS)
        expected.append((answered.image.rgb, answered.masks[0]))
        page = DemoPage(browsers(), url)
        page.upload(path)
        page.type_question(POSITIVE)
        pages.append(page)
    with held_model(model) as gate:
        for page in pages:
            page.find("#ask").click()
        for page in pages:  # both in flight: one answering, the other waiting its turn in the queue
            page.wait_for(lambda: page.progress(), "a page shows no progress while its question waits")
        shown = sorted(page.progress() for page in pages)
        assert "Answering" in shown[0] and "queue: 1/1" in shown[1], shown
        gate.set()
    for page, (image, mask) in zip(pages, expected):
        page.wait_for_answer(POSITIVE)
        assert page.see() == "See: object present"
        check_overlay(page.overlay(), image, mask)  # its own picture, at its own size
