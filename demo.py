"""See, Say and Segment from the command line, interactively or once per call.

    python demo.py --pretrained_model_path tsunghanwu/SESAME            # asks for a question, then an image
    python demo.py --pretrained_model_path tiny-random --image assets/shapes.jpg --query "Is there a red square?"

For each query it prints See (is the object there: a [SEG] was generated and its mask is not
empty), Say (the answer text, without the [SEG] marker) and Segment (the folder holding
seg_mask.png, seg_overlay.jpg and answer.txt). Every query gets a new folder
`{vis_save_dir}/{image stem}/{NNN}_{question slug}/`, so nothing is ever overwritten.
Bad input (a missing or broken image, an empty question) prints one line and the loop goes on.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, TextIO

import numpy as np
import torch

from model.builder import TINY_RANDOM, LoadedSesame, load_pretrained
from model.conversation import IMAGE_TOKEN, SYSTEM_PROMPTS, build_prompt, tokenize_with_image
from model.generation import LogitsHook
from model.sasp import add_sasp_arguments, sasp_config_from_args
from model.sesame import QueryPrediction
from utils.image_io import ImageLoadError, load_image
from utils.visualize import new_query_dir, write_query_outputs

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXIT_WORDS = ("exit", "quit")


class QueryError(ValueError):
    """A question the demo cannot ask; the message is one line."""


@dataclass
class DemoSettings:
    conv_type: str = "vicuna_v1"  # what the original demo ran with
    max_new_tokens: int = 512
    vis_save_dir: str = "./demo_directory"
    max_image_pixels: int = 50_000_000
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
    image_size: tuple[int, int]  # (H, W) the masks have
    output_dir: str
    mask_path: str
    overlay_path: str
    answer_path: str
    extra_mask_paths: list[str] = field(default_factory=list)
    sasp_paths: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --- model ------------------------------------------------------------------------------------
def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(args: argparse.Namespace) -> LoadedSesame:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    try:
        loaded = load_pretrained(args.pretrained_model_path, vision_tower=args.vision_tower,
                                 dtype=PRECISIONS[args.precision], device=args.device)
        # READ checkpoints bring SasP, --use_sasp adds it, the knob flags tune it (knobs on a model
        # without SasP are an error). SasP has no weights, so its settings may change after loading.
        loaded.model.config.sasp = sasp_config_from_args(args, loaded.model.config.sasp)
    except (OSError, ValueError) as e:  # missing checkpoint / tower, bad config, SasP flags without SasP
        raise SystemExit(f"error: {one_line(e)}") from None
    return loaded


# --- one query --------------------------------------------------------------------------------
def clean_source(image_source: str) -> str:
    """Trim blanks and one pair of surrounding quotes (what dragging a file into a terminal adds)."""
    source = image_source.strip()
    if len(source) >= 2 and source[0] == source[-1] and source[0] in "'\"":
        source = source[1:-1].strip()
    return source


def check_question(question: str) -> str:
    question = question.strip()
    if not question:
        raise QueryError("empty question: type what to look for (or 'exit')")
    if any("\ud800" <= c <= "\udfff" for c in question):  # undecodable bytes, kept as surrogates by the reader
        raise QueryError("the question is not valid text in this terminal's encoding; type it again")
    if IMAGE_TOKEN in question:
        raise QueryError(f"the question must not contain {IMAGE_TOKEN!r}: the demo places the image itself")
    return question


def say_text(raw_answer: str, seg_token: str = "[SEG]") -> str:
    """'Sure, it is [SEG] .' -> 'Sure, it is.': the marker and the space around it go."""
    marker = re.escape(seg_token)
    text = re.sub(r"\s*" + marker + r"\s*(?=[.,;:!?])", "", raw_answer)
    text = re.sub(r"\s*" + marker, "", text)
    return text.strip()


def printable(text: str) -> str:
    """Control characters (an untrained model emits ESC and friends) shown escaped, not sent to the terminal."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else c.encode("unicode_escape").decode()
                   for c in text)


def ask(loaded: LoadedSesame, image_rgb: np.ndarray, question: str, *, conv_type: str, max_new_tokens: int,
        logits_hook: Optional[LogitsHook] = None) -> tuple[QueryPrediction, str]:
    """One image, one question -> the prediction and the decoded answer (special tokens dropped)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt = build_prompt(IMAGE_TOKEN + "\n" + question, template=conv_type,
                          use_mm_start_end=model.config.use_mm_start_end)
    prompt_ids = tokenize_with_image(prompt, tokenizer)
    context = model.config.llm.max_position_embeddings
    length = len(prompt_ids) - 1 + model.config.vision.num_patches
    if length >= context:
        raise QueryError(f"question too long: {length} positions with the image, the model's context is {context}")
    sam_input = loaded.sam_transform(image_rgb)
    prediction = model.predict(loaded.clip_transform(image_rgb)[None], sam_input.pixels[None],
                               [sam_input.resized_size], [sam_input.original_size], [prompt_ids], [0],
                               max_new_tokens=max_new_tokens, eos_token_id=loaded.token_ids.eos,
                               pad_token_id=loaded.token_ids.pad, logits_hook=logits_hook)[0]
    ids = [t for t in prediction.output_ids if t != loaded.token_ids.eos]
    return prediction, tokenizer.decode(ids, skip_special_tokens=True).strip()


def write_sasp_outputs(directory: str, image_rgb: np.ndarray, prediction: QueryPrediction) -> list[str]:
    """--visualize with READ: per [SEG], the similarity heat map and the chosen points beside the
    mask (sasp.png, sasp_1.png, ...). [] when no [SEG] was generated (no SasP result)."""
    if prediction.sasp is None:
        return []
    from utils.visualize_sasp import save_sasp_pngs  # READ's drawing; only needed for SasP models

    return save_sasp_pngs(directory, image_rgb, prediction.sasp, prediction.masks.numpy())


def run_query(loaded: LoadedSesame, settings: DemoSettings, image_source: str, question: str,
              logits_hook: Optional[LogitsHook] = None) -> QueryResult:
    """Load the image, answer, write the files. Raises QueryError / ImageLoadError on bad input."""
    start = time.perf_counter()
    question = check_question(question)
    image_source = clean_source(image_source)
    image = load_image(image_source, max_pixels=settings.max_image_pixels)
    notes = []
    if image.downscaled:
        notes.append(f"image downscaled from {image.original_size[1]}x{image.original_size[0]} to "
                     f"{image.rgb.shape[1]}x{image.rgb.shape[0]} (--max_image_pixels {settings.max_image_pixels})")
    prediction, raw_answer = ask(loaded, image.rgb, question, conv_type=settings.conv_type,
                                 max_new_tokens=settings.max_new_tokens, logits_hook=logits_hook)
    masks = prediction.masks.numpy().astype(bool)
    say = say_text(raw_answer, loaded.model.config.seg_token)
    directory = new_query_dir(settings.vis_save_dir, image_source, question)
    files = write_query_outputs(directory, image.rgb, masks, say)
    sasp_paths = []
    if settings.visualize:
        if loaded.model.config.sasp is None:
            notes.append("--visualize: this model does not use SasP points; nothing extra to draw")
        else:
            sasp_paths = write_sasp_outputs(directory, image.rgb, prediction)
            if not sasp_paths:
                notes.append("--visualize: no [SEG] was generated, so there is no similarity map to draw")
    result = QueryResult(image=image_source, question=question, see=prediction.exists, say=say, raw_answer=raw_answer,
                         num_seg=int(masks.shape[0]), mask_pixels=int(masks[0].sum()) if masks.shape[0] else 0,
                         image_size=(int(image.rgb.shape[0]), int(image.rgb.shape[1])), output_dir=directory,
                         mask_path=files.mask, overlay_path=files.overlay, answer_path=files.answer,
                         extra_mask_paths=files.extra_masks, sasp_paths=sasp_paths, notes=notes)
    result.seconds = round(time.perf_counter() - start, 3)
    with open(os.path.join(directory, "result.json"), "w", encoding="utf-8") as f:
        json.dump(asdict(result), f, indent=2)
    return result


def print_result(result: QueryResult, out: TextIO) -> None:
    for note in result.notes:
        print(f"note: {note}", file=out)
    print(f"* Object Existence (See): {result.see}", file=out)
    print(f"* Text Response (Say): {printable(result.say)}", file=out)
    print(f"* Segmentation Paths (Segment): {result.output_dir}", file=out)
    out.flush()


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# --- the two modes ----------------------------------------------------------------------------
def interactive(loaded: LoadedSesame, settings: DemoSettings, read: Callable[[str], str] = input,
                out: Optional[TextIO] = None) -> None:
    """Question, then image path, until 'exit', 'quit' or end of input. Nothing typed ends it otherwise."""
    out = out or sys.stdout
    if read is input:
        try:
            importlib.import_module("readline")  # importing it gives input() line editing and history
        except ImportError:
            pass
    print("Type a question, then an image path or URL ('exit' or Ctrl-D to stop).", file=out)
    while True:
        try:
            question = read("Human Prompts: ")
            if question.strip().lower() in EXIT_WORDS:
                return
            try:
                question = check_question(question)
            except QueryError as e:
                print(f"error: {e}", file=out)
                continue
            image_source = read("Image path: ")
            if image_source.strip().lower() in EXIT_WORDS:
                return
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return
        except UnicodeDecodeError as e:  # bytes the terminal's encoding cannot read
            print(f"error: could not read that line as text ({e.encoding}); type it again", file=out)
            continue
        try:
            print_result(run_query(loaded, settings, image_source, question), out)
        except (QueryError, ImageLoadError) as e:
            print(f"error: {one_line(e)}", file=out)
        except KeyboardInterrupt:
            print("\ninterrupted; ask another question", file=out)
        except Exception as e:  # a failure on one query must not end the session
            print(f"error: {type(e).__name__} while answering: {one_line(e)}", file=out)
        out.flush()


def one_shot(loaded: LoadedSesame, settings: DemoSettings, image_source: str, question: str, as_json: bool,
             out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    try:
        result = run_query(loaded, settings, image_source, question)
    except (QueryError, ImageLoadError) as e:
        if as_json:
            print(json.dumps({"error": one_line(e), "image": image_source, "question": question}), file=out)
        print(f"error: {one_line(e)}", file=err)
        return 1
    if as_json:
        print(json.dumps(asdict(result)), file=out)
    else:
        print_result(result, out)
    return 0


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained_model_path", default="tsunghanwu/SESAME",
                   help=f"hub id or local directory of a SESAME / READ / LISA checkpoint; '{TINY_RANDOM}' is a "
                        "tiny untrained model for trying the pipeline")
    p.add_argument("--vision_tower", default=None, help="CLIP tower (hub id or directory) instead of the config's")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    p.add_argument("--device", default=default_device())
    p.add_argument("--conv_type", choices=sorted(SYSTEM_PROMPTS), default=DemoSettings.conv_type,
                   help="system prompt: vicuna_v1 is what the original demo used, llava_v1 what training used")
    p.add_argument("--max_new_tokens", type=int, default=DemoSettings.max_new_tokens)
    p.add_argument("--vis_save_dir", default=DemoSettings.vis_save_dir)
    p.add_argument("--max_image_pixels", type=int, default=DemoSettings.max_image_pixels,
                   help="larger images are downscaled to this many pixels before inference")
    p.add_argument("--image", default=None, help="one-shot mode: image path or http(s) URL (needs --query)")
    p.add_argument("--query", default=None, help="one-shot mode: the question (needs --image)")
    p.add_argument("--json", action="store_true", help="one-shot mode: print one JSON object instead of text")
    add_sasp_arguments(p)  # --use_sasp --num_points --t_pos --t_neg --down_sample (READ)
    p.add_argument("--visualize", action="store_true",
                   help="SasP models: also save the similarity map and the chosen points next to the mask")
    args = p.parse_args(argv)
    if (args.image is None) != (args.query is None):
        p.error("one-shot mode needs both --image and --query")
    if args.json and args.image is None:
        p.error("--json is for one-shot mode (--image and --query)")
    if args.max_new_tokens < 1:
        p.error(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.max_image_pixels < 1:
        p.error(f"--max_image_pixels must be positive, got {args.max_image_pixels}")
    try:
        torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    # Typed bytes the terminal's encoding cannot decode, and odd characters in answers or paths,
    # must not raise inside the loop: keep them as surrogates on input, escape them on output.
    for stream, errors in ((sys.stdin, "surrogateescape"), (sys.stdout, "backslashreplace"),
                           (sys.stderr, "backslashreplace")):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=errors)
    log = sys.stderr  # stdout stays clean for --json
    print(f"Loading {args.pretrained_model_path} ({args.precision}, {args.device}) ...", file=log, flush=True)
    loaded = load_model(args)
    if args.pretrained_model_path == TINY_RANDOM:
        print("note: tiny-random is an untrained, randomly initialised model: its answers are gibberish, "
              "but every step of inference is the real one.", file=log, flush=True)
    settings = DemoSettings(conv_type=args.conv_type, max_new_tokens=args.max_new_tokens,
                            vis_save_dir=args.vis_save_dir, max_image_pixels=args.max_image_pixels,
                            visualize=args.visualize)
    if args.image is not None:
        return one_shot(loaded, settings, args.image, args.query, args.json)
    interactive(loaded, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
