"""See, Say and Segment from the command line, interactively or once per call.

    python demo.py --pretrained_model_path tsunghanwu/SESAME            # asks for a question, then an image
    python demo.py --pretrained_model_path assets/shapes_sesame --image assets/shapes.jpg \\
        --query "Is there a red square?"

For each query it prints See (is the object there: a [SEG] was generated and its mask is not
empty), Say (the answer text, without the [SEG] marker) and Segment (the folder holding
seg_mask.png, seg_overlay.jpg and answer.txt). Every query gets a new folder
`{vis_save_dir}/{image stem}/{NNN}_{question slug}/`, so nothing is ever overwritten.
Bad input (a missing or broken image, an empty question) prints one line and the loop goes on.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
from dataclasses import asdict
from typing import Callable, Optional, TextIO

from app.query import QueryResult, QuerySettings, run_query
from model.builder import TINY_RANDOM
from model.predictor import PromptError, SesamePredictor, check_typed_question
from utils.errors import add_debug_flag, one_line
from utils.image_io import ImageLoadError
from utils.text import printable

EXIT_WORDS = ("exit", "quit")


def print_result(result: QueryResult, out: TextIO) -> None:
    for note in result.notes:
        print(f"note: {note}", file=out)
    print(f"* Object Existence (See): {result.see}", file=out)
    print(f"* Text Response (Say): {printable(result.say)}", file=out)
    print(f"* Segmentation Paths (Segment): {result.output_dir}", file=out)
    out.flush()


def interactive(predictor: SesamePredictor, settings: QuerySettings, read: Callable[[str], str] = input,
                out: Optional[TextIO] = None) -> None:
    """Question, then image path, until 'exit', 'quit' or end of input. Nothing typed ends it otherwise."""
    out = out or sys.stdout
    if read is input:
        with contextlib.suppress(ImportError):
            importlib.import_module("readline")  # importing it gives input() line editing and history
    print("Type a question, then an image path or URL ('exit' or Ctrl-D to stop).", file=out)
    while True:
        try:
            question = read("Human Prompts: ")
            if question.strip().lower() in EXIT_WORDS:
                return
            try:
                question = check_typed_question(question)
            except PromptError as e:
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
            print_result(run_query(predictor, settings, image_source, question), out)
        except (PromptError, ImageLoadError) as e:
            print(f"error: {one_line(e)}", file=out)
        except KeyboardInterrupt:
            print("\ninterrupted; ask another question", file=out)
        except Exception as e:  # a failure on one query must not end the session
            print(f"error: {type(e).__name__} while answering: {one_line(e)}", file=out)
        out.flush()


def one_shot(predictor: SesamePredictor, settings: QuerySettings, image_source: str, question: str, as_json: bool,
             out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    try:
        result = run_query(predictor, settings, image_source, question)
    except (PromptError, ImageLoadError) as e:
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
    from engine.build import add_predictor_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_predictor_arguments(p)
    p.add_argument("--vis_save_dir", default=QuerySettings.vis_save_dir)
    p.add_argument("--max_image_pixels", type=int, default=QuerySettings.max_image_pixels,
                   help="larger images are downscaled to this many pixels before inference")
    p.add_argument("--image", default=None, help="one-shot mode: image path or http(s) URL (needs --query)")
    p.add_argument("--query", default=None, help="one-shot mode: the question (needs --image)")
    p.add_argument("--json", action="store_true", help="one-shot mode: print one JSON object instead of text")
    p.add_argument("--visualize", action="store_true",
                   help="SasP models: also save the similarity map and the chosen points next to the mask")
    add_debug_flag(p)
    args = p.parse_args(argv)
    if (args.image is None) != (args.query is None):
        p.error("one-shot mode needs both --image and --query")
    if args.json and args.image is None:
        p.error("--json is for one-shot mode (--image and --query)")
    if args.max_image_pixels < 1:
        p.error(f"--max_image_pixels must be positive, got {args.max_image_pixels}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    from engine.build import load_predictor, resolve_device_and_precision
    from engine.config import EngineConfig

    args = parse_args(argv)
    # Typed bytes the terminal's encoding cannot decode, and odd characters in answers or paths,
    # must not raise inside the loop: keep them as surrogates on input, escape them on output.
    for stream, errors in ((sys.stdin, "surrogateescape"), (sys.stdout, "backslashreplace"),
                           (sys.stderr, "backslashreplace")):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=errors)
    resolve_device_and_precision(args)
    print(f"Loading {args.pretrained_model_path} ({args.device}, {args.precision}) ...", file=sys.stderr, flush=True)
    predictor = load_predictor(args, config=EngineConfig.interactive())
    if args.pretrained_model_path == TINY_RANDOM:
        print("note: tiny-random is an untrained, randomly initialised model: its answers are gibberish, "
              "but every step of inference is the real one.", file=sys.stderr, flush=True)
    settings = QuerySettings(vis_save_dir=args.vis_save_dir, max_image_pixels=args.max_image_pixels,
                            visualize=args.visualize)
    if args.image is not None:
        return one_shot(predictor, settings, args.image, args.query, args.json)
    interactive(predictor, settings)
    return 0


if __name__ == "__main__":
    from utils.errors import run_main

    sys.exit(run_main(main))
